CREATE TABLE stock_movements (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    warehouse_id  bigint NOT NULL,
    product_sku   text NOT NULL,
    delta         integer NOT NULL CHECK (delta <> 0),
    reason        text NOT NULL,
    moved_at      timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (warehouse_id, product_sku) REFERENCES stock_levels (warehouse_id, product_sku)
);

CREATE INDEX stock_movements_moved_at_idx ON stock_movements (moved_at);

-- Keep stock_levels in step with movements.
CREATE FUNCTION apply_stock_movement() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE stock_levels
       SET quantity = quantity + NEW.delta, updated_at = now()
     WHERE warehouse_id = NEW.warehouse_id AND product_sku = NEW.product_sku;
    RETURN NEW;
END;
$$;

CREATE TRIGGER stock_movements_apply AFTER INSERT ON stock_movements
FOR EACH ROW EXECUTE FUNCTION apply_stock_movement();

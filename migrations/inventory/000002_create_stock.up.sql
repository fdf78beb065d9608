-- Stock per product and warehouse. product_sku refers to the product service's products
-- by their SKU: the services own separate databases, so there is no cross-database key.
CREATE TABLE stock_levels (
    warehouse_id  bigint NOT NULL REFERENCES warehouses (id),
    product_sku   text NOT NULL,
    quantity      integer NOT NULL DEFAULT 0 CHECK (quantity >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (warehouse_id, product_sku)
);

CREATE INDEX stock_levels_product_sku_idx ON stock_levels (product_sku);

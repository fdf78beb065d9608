ALTER TABLE orders ADD CONSTRAINT orders_ref UNIQUE (reference);

-- dbplan:no-transaction
CREATE INDEX CONCURRENTLY orders_ref_idx ON orders (reference);
ALTER TABLE orders ADD CONSTRAINT orders_ref UNIQUE USING INDEX orders_ref_idx;
ALTER TABLE orders ADD CONSTRAINT orders_customer FOREIGN KEY (customer_id) REFERENCES customers (id) NOT VALID;
ALTER TABLE orders VALIDATE CONSTRAINT orders_customer;
DROP INDEX CONCURRENTLY orders_created;
ALTER TABLE orders ADD COLUMN region text NOT NULL DEFAULT 'eu';

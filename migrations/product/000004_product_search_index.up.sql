-- dbplan:no-transaction
-- Built concurrently so that writes to products go on while the index is built; this
-- cannot run in a transaction, so dbplan runs the file statement by statement.
CREATE INDEX CONCURRENTLY IF NOT EXISTS products_search_idx
    ON products USING gin (to_tsvector('simple', coalesce(name, '') || ' ' || coalesce(description, '')));

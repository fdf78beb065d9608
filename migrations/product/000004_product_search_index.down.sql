-- dbplan:no-transaction
DROP INDEX CONCURRENTLY IF EXISTS products_search_idx;

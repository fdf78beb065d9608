ALTER TABLE products ADD COLUMN description text;

CREATE FUNCTION products_search_vector(p products) RETURNS tsvector
LANGUAGE sql IMMUTABLE
RETURN to_tsvector('simple', coalesce(p.name, '') || ' ' || coalesce(p.description, ''));

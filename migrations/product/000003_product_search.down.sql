DROP FUNCTION products_search_vector(products);
ALTER TABLE products DROP COLUMN description;

CREATE TABLE prices (
    product_id  bigint NOT NULL REFERENCES products (id) ON DELETE CASCADE,
    currency    char(3) NOT NULL,
    amount      numeric(12, 2) NOT NULL CHECK (amount >= 0),
    valid_from  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (product_id, currency, valid_from)
);

CREATE DOMAIN positive AS integer CHECK (VALUE > 0);

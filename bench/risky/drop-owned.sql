DROP OWNED BY old_app;

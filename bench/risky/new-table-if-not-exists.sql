CREATE TABLE IF NOT EXISTS audit (id bigint, note varchar(20));
CREATE INDEX audit_note ON audit (note);
ALTER TABLE audit ADD CONSTRAINT audit_pk PRIMARY KEY (id);

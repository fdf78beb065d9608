"""Tests for orchestrator.sqlscript: splitting migration files with pglast, and lint."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orchestrator.migrations.lint import (
    KNOWN_RULES,
    Finding,
    lint,
    new_tables_after,
    relations_named,
)
from orchestrator.migrations.sqlscript import (
    Script,
    Statement,
    line_of_offset,
    parse_script,
)


def sqls(script: Script) -> list[str]:
    return [s.sql for s in script.statements]


def rules(findings: tuple[Finding, ...]) -> list[str]:
    return [f.rule for f in findings]


def assert_consistent(text: str, script: Script) -> None:
    """Every statement's text, offsets and line agree with the file text."""
    for stmt in script.statements:
        assert text[stmt.offset : stmt.end_offset] == stmt.sql
        assert stmt.line == text.count("\n", 0, stmt.offset) + 1


# --------------------------------------------------------------------------- splitting

TEN_STATEMENTS = """\
-- 000007_orders.up.sql: orders, with triggers; and a report function.
/* header /* nested; comment */ still the header; */
CREATE TABLE orders (
    id bigint PRIMARY KEY,
    note text DEFAULT 'a;b',   -- a comment; with a semicolon
    "weird;name" int
);
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $body$
BEGIN
  NEW.note := 'touched; again';
  IF NEW.id < 0 THEN
    RAISE EXCEPTION 'negative; id';
  END IF;
  RETURN NEW;
END;
$body$;
CREATE TRIGGER orders_touch BEFORE UPDATE ON orders
    FOR EACH ROW EXECUTE FUNCTION touch();
CREATE FUNCTION order_count() RETURNS bigint LANGUAGE sql
BEGIN ATOMIC
  SELECT 1;
  SELECT count(*) FROM orders;
END;
INSERT INTO orders (id, note) VALUES (1, E'it\\'s; fine'), (2, $$x;y$$);
CREATE INDEX orders_note_idx ON orders (note);
COMMENT ON TABLE orders IS 'one row per order; nothing else';
DO $do$ BEGIN PERFORM 1; PERFORM 2; END $do$;
UPDATE orders SET note = ';' WHERE id = 1;
SELECT 1 /* trailing; comment */ ;  -- after; the end
"""


def test_ten_statement_file_is_split_exactly():
    script = parse_script(TEN_STATEMENTS)
    assert script.parsed and script.parse_error is None and not script.empty
    assert [s.kind for s in script.statements] == [
        "CreateStmt",
        "CreateFunctionStmt",
        "CreateTrigStmt",
        "CreateFunctionStmt",
        "InsertStmt",
        "IndexStmt",
        "CommentStmt",
        "DoStmt",
        "UpdateStmt",
        "SelectStmt",
    ]
    assert [s.line for s in script.statements] == [3, 8, 17, 19, 24, 25, 26, 27, 28, 29]
    assert [s.index for s in script.statements] == list(range(10))
    assert_consistent(TEN_STATEMENTS, script)
    body = script.statements[1].sql
    assert body.startswith("CREATE FUNCTION touch()") and body.endswith("END;\n$body$")
    atomic = script.statements[3].sql
    assert atomic.startswith("CREATE FUNCTION order_count()")
    assert atomic.endswith("SELECT count(*) FROM orders;\nEND")
    assert script.statements[4].sql == "INSERT INTO orders (id, note) VALUES (1, E'it\\'s; fine'), (2, $$x;y$$)"
    # A trailing comment before the semicolon is not part of the statement.
    assert script.statements[9].sql == "SELECT 1"
    assert script.transaction_style == "none"
    assert script.inner_statements == script.statements
    assert script.non_transactional == ()


def test_leading_comments_are_skipped_for_line_and_offset():
    text = "-- one\n\n/* two\n three */\n   SELECT 1;\n-- four\nSELECT 2"
    script = parse_script(text)
    assert sqls(script) == ["SELECT 1", "SELECT 2"]
    assert [s.line for s in script.statements] == [5, 7]
    assert script.statements[0].offset == text.index("SELECT 1")
    assert script.statements[1].offset == text.index("SELECT 2")


def test_nested_comments_hide_semicolons_and_statements():
    text = "/* outer /* inner; SELECT 9; */ still comment; */ SELECT 1; SELECT 2"
    script = parse_script(text)
    assert sqls(script) == ["SELECT 1", "SELECT 2"]


def test_trailing_comment_after_last_statement_without_semicolon():
    text = "SELECT 1;\nSELECT 2 -- no semicolon\n/* end */\n"
    script = parse_script(text)
    assert sqls(script) == ["SELECT 1", "SELECT 2"]


def test_comment_inside_a_statement_is_kept():
    text = "SELECT 1, -- first\n  2;"
    assert sqls(parse_script(text)) == ["SELECT 1, -- first\n  2"]


def test_crlf_line_endings():
    text = "-- header\r\nCREATE TABLE t (\r\n  a int\r\n);\r\n\r\nSELECT 1;\r\n"
    script = parse_script(text)
    assert sqls(script) == ["CREATE TABLE t (\r\n  a int\r\n)", "SELECT 1"]
    assert [s.line for s in script.statements] == [2, 6]
    assert_consistent(text, script)


def test_utf8_bom_is_ignored_and_counts_as_one_character():
    text = "\ufeffCREATE TABLE t (a int);\nSELECT 1;"
    script = parse_script(text)
    assert script.parsed
    assert sqls(script) == ["CREATE TABLE t (a int)", "SELECT 1"]
    assert script.statements[0].offset == 1
    assert script.statements[0].line == 1
    assert script.statements[1].offset == text.index("SELECT 1")
    assert_consistent(text, script)


@pytest.mark.parametrize(
    "prefix",
    [
        "-- café, naïve, 日本語 and 🎉 before anything\n",
        "SELECT 'é€🎉';\n",
        'CREATE TABLE "таблиця" (a int);\n',
        "/* 🎉 /* ü */ */ SELECT $$ü;€$$;\n",
    ],
)
def test_offsets_are_characters_after_multibyte_text(prefix):
    text = prefix + "SELECT 'ü' AS x;\nDROP TABLE zz;"
    script = parse_script(text)
    last = script.statements[-1]
    assert last.sql == "DROP TABLE zz"
    assert last.offset == text.index("DROP TABLE zz")  # a byte offset would be larger
    assert last.line == 3
    assert script.statements[-2].sql == "SELECT 'ü' AS x"
    assert_consistent(text, script)


def test_dollar_tags_differing_only_in_non_ascii_characters():
    # `$é$` and `$xx$` are different tags; the body of the first contains the second.
    text = "SELECT $é$ x $xx$ -- $é$\n;\nSELECT 2"
    script = parse_script(text)
    assert sqls(script) == ["SELECT $é$ x $xx$ -- $é$", "SELECT 2"]
    assert script.statements[1].line == 3


def test_non_ascii_identifier_directly_after_statement_keyword():
    text = "CREATE TABLE ñ(a int);INSERT INTO ñ VALUES (1);"
    script = parse_script(text)
    assert sqls(script) == ["CREATE TABLE ñ(a int)", "INSERT INTO ñ VALUES (1)"]
    assert script.statements[1].offset == 22


@pytest.mark.parametrize("text", ["", "   \n\t\n", "-- only a comment\n", "/* a */ -- b\n/* c /* d */ */", ";;\n;"])
def test_empty_and_comment_only_files(text):
    script = parse_script(text)
    assert script.parsed
    assert script.empty
    assert script.statements == ()
    assert script.transaction_style == "none"
    assert lint(script) == ()


def test_non_empty_file_is_not_empty():
    assert not parse_script("SELECT 1").empty


def test_big_non_ascii_file_parses_fast():
    block = (
        "-- Коментар: таблиця замовлень для клієнтів магазину, ще трохи тексту\n"
        "INSERT INTO замовлення (опис) VALUES ('нове замовлення; з крапкою з комою');\n"
    )
    text = block * 400  # ~60 kB, ~40 000 non-ASCII characters
    parse_script(text)
    started = time.perf_counter()
    script = parse_script(text)
    elapsed = time.perf_counter() - started
    assert len(script.statements) == 400
    assert script.statements[-1].offset == text.rindex("INSERT")
    # pglast.scan() on this text alone takes seconds (quadratic offset mapping).
    assert elapsed < 0.25


# --------------------------------------------------------------------------- parse errors


def test_parse_error_does_not_raise_and_reports_the_line():
    script = parse_script("SELECT 1;\nCREATE TABLE t (a int);\nSELEC 2;\n")
    assert not script.parsed
    assert script.statements == () and script.inner_statements == ()
    assert script.parse_error_line == 3
    assert script.parse_error == 'line 3: syntax error at or near "SELEC"'
    assert not script.empty


def test_parse_error_line_after_multibyte_text():
    script = parse_script("SELECT '€€€€€€€€€€';\n-- ü\nSELECT FROM WHERE;")
    assert script.parse_error_line == 3
    assert 'at or near "WHERE"' in script.parse_error


def test_parse_error_at_end_of_input_points_at_last_line():
    script = parse_script("SELECT 1;\nSELECT 1 +\n\n")
    assert not script.parsed
    assert script.parse_error == "line 2: syntax error at end of input"


def test_unterminated_string_is_a_parse_error():
    script = parse_script("SELECT 1;\nSELECT 'abc;\n")
    assert not script.parsed
    assert script.parse_error_line == 2
    assert "unterminated quoted string" in script.parse_error


def test_nul_character_is_a_parse_error_not_a_silent_cut():
    script = parse_script("SELECT 1;\nDROP\x00 TABLE t;")
    assert not script.parsed
    assert script.parse_error_line == 2
    assert "NUL" in script.parse_error


def test_parse_error_keeps_the_marker():
    script = parse_script("-- dbplan:no-transaction\nCREATE INDEX CONCURRENTLY ON;")
    assert not script.parsed
    assert script.no_transaction_marker


# --------------------------------------------------------------------------- line_of_offset


def test_line_of_offset():
    text = "a\nbc\r\nd\n"
    assert [line_of_offset(text, i) for i in range(len(text) + 1)] == [1, 1, 2, 2, 2, 2, 3, 3, 4]
    assert line_of_offset(text, -5) == 1
    assert line_of_offset(text, 1000) == 4
    assert line_of_offset("", 0) == 1


def test_server_error_position_maps_to_file_line():
    text = "-- x\nCREATE TABLE t (\n  a int,\n  b nosuchtype\n);"
    stmt = parse_script(text).statements[0]
    position = stmt.sql.index("nosuchtype") + 1  # PostgreSQL positions are 1-based characters
    assert line_of_offset(text, stmt.offset + position - 1) == 4


# --------------------------------------------------------------------------- marker


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-- dbplan:no-transaction\nCREATE INDEX CONCURRENTLY i ON t (a);", True),
        ("-- dbplan:no-transaction   \t\r\nSELECT 1;", True),
        ("\ufeff-- dbplan:no-transaction\nSELECT 1;", True),
        ("-- dbplan:no-transaction", True),
        ("SELECT 1;\n-- dbplan:no-transaction\n", False),
        ("-- header\n-- dbplan:no-transaction\nSELECT 1;", False),
        (" -- dbplan:no-transaction\nSELECT 1;", False),
        ("--dbplan:no-transaction\nSELECT 1;", False),
        ("-- dbplan:no-transactions\nSELECT 1;", False),
        ("-- dbplan:no-transaction please\nSELECT 1;", False),
        ("", False),
    ],
)
def test_no_transaction_marker(text, expected):
    assert parse_script(text).no_transaction_marker is expected


# --------------------------------------------------------------------------- transaction style


@pytest.mark.parametrize(
    ("text", "style", "inner"),
    [
        ("CREATE TABLE t (a int);\nINSERT INTO t VALUES (1);", "none", ["CREATE TABLE t (a int)", "INSERT INTO t VALUES (1)"]),
        ("BEGIN;\nCREATE TABLE t (a int);\nINSERT INTO t VALUES (1);\nCOMMIT;", "wrapped", ["CREATE TABLE t (a int)", "INSERT INTO t VALUES (1)"]),
        ("-- c\nSTART TRANSACTION;\nCREATE TABLE t (a int);\nEND;\n-- done", "wrapped", ["CREATE TABLE t (a int)"]),
        ("BEGIN TRANSACTION;\nSELECT 1;\nEND TRANSACTION", "wrapped", ["SELECT 1"]),
        ("BEGIN; COMMIT;", "wrapped", []),
        ("BEGIN;\nSELECT 1;\nCOMMIT;\nBEGIN;\nSELECT 2;\nCOMMIT;", "multiple", None),
        ("SELECT 1;\nCOMMIT;\nSELECT 2;", "multiple", None),
        ("BEGIN;\nSELECT 1;\nROLLBACK;", "multiple", None),
        ("BEGIN;\nSELECT 1;\nABORT;", "multiple", None),
        # Savepoints live inside a transaction: they neither open nor end one.
        ("BEGIN;\nSAVEPOINT s;\nSELECT 1;\nRELEASE SAVEPOINT s;\nCOMMIT;", "wrapped", ["SAVEPOINT s", "SELECT 1", "RELEASE SAVEPOINT s"]),
        ("SAVEPOINT a;\nSELECT 1;\nROLLBACK TO SAVEPOINT a;\nRELEASE a;", "none", ["SAVEPOINT a", "SELECT 1", "ROLLBACK TO SAVEPOINT a", "RELEASE a"]),
        ("BEGIN;\nSELECT 1;\nCOMMIT AND CHAIN;", "multiple", None),
        ("BEGIN;\nSELECT 1;", "multiple", None),
        ("SELECT 1;\nCOMMIT;", "multiple", None),
        ("SELECT 0;\nBEGIN;\nSELECT 1;\nCOMMIT;", "multiple", None),
        ("BEGIN;\nSELECT 1;\nCOMMIT;\nSELECT 2;", "multiple", None),
        ("BEGIN;\nSELECT 1;\nPREPARE TRANSACTION 'x';", "multiple", None),
    ],
)
def test_transaction_style(text, style, inner):
    script = parse_script(text)
    assert script.transaction_style == style
    if inner is None:
        assert script.inner_statements == script.statements
    else:
        assert [s.sql for s in script.inner_statements] == inner


def test_end_is_commit():
    script = parse_script("BEGIN;\nSELECT 1;\nEND;")
    assert [s.transaction_kind for s in script.statements] == ["begin", None, "commit"]
    assert script.statements[2].sql == "END"


def test_wrapped_keeps_begin_options_in_the_first_statement():
    script = parse_script("BEGIN ISOLATION LEVEL SERIALIZABLE;\nSELECT 1;\nCOMMIT;")
    assert script.transaction_style == "wrapped"
    assert script.statements[0].sql == "BEGIN ISOLATION LEVEL SERIALIZABLE"


def test_begin_atomic_and_plpgsql_begin_are_not_transaction_control():
    text = (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END;\n"
        "DO $$ BEGIN PERFORM 1; END $$;\n"
    )
    script = parse_script(text)
    assert script.transaction_style == "none"
    assert [s.transaction_kind for s in script.statements] == [None, None]


# --------------------------------------------------------------------------- non-transactional

NON_TRANSACTIONAL = [
    ("CREATE INDEX CONCURRENTLY i ON t (a)", "CREATE INDEX CONCURRENTLY"),
    ("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS i ON s.t (a)", "CREATE INDEX CONCURRENTLY"),
    ("DROP INDEX CONCURRENTLY i", "DROP INDEX CONCURRENTLY"),
    ("REINDEX INDEX CONCURRENTLY i", "REINDEX CONCURRENTLY"),
    ("REINDEX (CONCURRENTLY) TABLE t", "REINDEX CONCURRENTLY"),
    ("REINDEX SCHEMA s", "REINDEX SCHEMA"),
    ("REINDEX DATABASE d", "REINDEX DATABASE"),
    ("REINDEX SYSTEM", "REINDEX SYSTEM"),
    ("VACUUM", "VACUUM"),
    ("VACUUM (ANALYZE) t", "VACUUM"),
    ("VACUUM FULL t", "VACUUM"),
    ("CLUSTER", "CLUSTER without a table"),
    ("CREATE DATABASE d", "CREATE DATABASE"),
    ("DROP DATABASE IF EXISTS d", "DROP DATABASE"),
    ("ALTER DATABASE d SET TABLESPACE ts", "ALTER DATABASE SET TABLESPACE"),
    ("ALTER SYSTEM SET work_mem = '64MB'", "ALTER SYSTEM"),
    ("CREATE TABLESPACE ts LOCATION '/srv/ts'", "CREATE TABLESPACE"),
    ("DROP TABLESPACE ts", "DROP TABLESPACE"),
    ("DISCARD ALL", "DISCARD ALL"),
    ("COMMIT PREPARED 'x'", "COMMIT PREPARED"),
    ("ROLLBACK PREPARED 'x'", "ROLLBACK PREPARED"),
    ("ALTER TABLE t DETACH PARTITION p CONCURRENTLY", "ALTER TABLE ... DETACH PARTITION ... CONCURRENTLY"),
    ("CREATE SUBSCRIPTION s CONNECTION 'host=x' PUBLICATION p", "CREATE SUBSCRIPTION ... WITH (create_slot = true)"),
    ("CREATE SUBSCRIPTION s CONNECTION 'host=x' PUBLICATION p WITH (create_slot = true)", "CREATE SUBSCRIPTION ... WITH (create_slot = true)"),
    ("ALTER SUBSCRIPTION s REFRESH PUBLICATION", "ALTER SUBSCRIPTION ... REFRESH PUBLICATION"),
    ("ALTER SUBSCRIPTION s SET PUBLICATION p", "ALTER SUBSCRIPTION with refresh"),
    ("ALTER SUBSCRIPTION s ADD PUBLICATION p WITH (refresh = true)", "ALTER SUBSCRIPTION with refresh"),
]

TRANSACTIONAL = [
    "CREATE INDEX i ON t (a)",
    "DROP INDEX i",
    "REINDEX INDEX i",
    "REINDEX TABLE t",
    "REINDEX (CONCURRENTLY false) TABLE t",
    "ANALYZE t",
    "ANALYZE",
    "CLUSTER t USING i",
    "ALTER DATABASE d SET work_mem = '1MB'",
    "ALTER DATABASE d RENAME TO e",
    "ALTER TYPE mood ADD VALUE 'meh'",
    "DISCARD PLANS",
    "ALTER TABLE t DETACH PARTITION p",
    "CREATE SUBSCRIPTION s CONNECTION 'host=x' PUBLICATION p WITH (create_slot = false)",
    "CREATE SUBSCRIPTION s CONNECTION 'host=x' PUBLICATION p WITH (connect = off)",
    "ALTER SUBSCRIPTION s SET PUBLICATION p WITH (refresh = false)",
    "ALTER SUBSCRIPTION s ENABLE",
    "REFRESH MATERIALIZED VIEW CONCURRENTLY mv",
    "BEGIN",
    "PREPARE TRANSACTION 'x'",
    "CREATE TABLE t (a int)",
]


@pytest.mark.parametrize(("sql", "name"), NON_TRANSACTIONAL)
def test_non_transactional_statements(sql, name):
    script = parse_script(f"SELECT 1;\n{sql};\nSELECT 2;")
    assert [s.sql for s in script.non_transactional] == [sql]
    assert script.statements[1].non_transactional == name


@pytest.mark.parametrize("sql", TRANSACTIONAL)
def test_statements_allowed_in_a_transaction(sql):
    script = parse_script(sql)
    assert len(script.statements) == 1
    assert script.non_transactional == ()
    assert script.statements[0].non_transactional is None


# --------------------------------------------------------------------------- allow comments


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-- dbplan:allow drop-table\nDROP TABLE t;", {"drop-table"}),
        ("SELECT 1;\n--   dbplan:allow drop-table, truncate,set-not-null\n", {"drop-table", "truncate", "set-not-null"}),
        ("DROP TABLE t; -- dbplan:allow drop-table the table moved to the archive service", {"drop-table"}),
        ("-- dbplan:allow truncate, drop-table because it is a cache\n", {"truncate", "drop-table"}),
        ("-- dbplan:allow drop-table\n-- dbplan:allow TRUNCATE\n", {"drop-table", "truncate"}),
        ("-- dbplan:allowed drop-table\n", set()),
        ("-- please dbplan:allow drop-table\n", set()),
        ("/* dbplan:allow drop-table */ SELECT 1;", set()),
        ("SELECT '-- dbplan:allow drop-table';", set()),
        ("SELECT $$\n-- dbplan:allow drop-table\n$$;", set()),
        ("-- dbplan:allow\n", set()),
    ],
)
def test_allowed_rules(text, expected):
    assert parse_script(text).allowed_rules == frozenset(expected)


# --------------------------------------------------------------------------- lint

FIRES = [
    ("DROP TABLE orders", "drop-table", "destructive"),
    ("DROP TABLE IF EXISTS a.orders, b CASCADE", "drop-table", "destructive"),
    ("ALTER TABLE orders DROP COLUMN note", "drop-column", "destructive"),
    ("ALTER TABLE IF EXISTS orders DROP COLUMN IF EXISTS note", "drop-column", "destructive"),
    ("DROP SCHEMA sales CASCADE", "drop-schema", "destructive"),
    ("DROP TYPE mood", "drop-type", "destructive"),
    ("DROP DOMAIN positive", "drop-type", "destructive"),
    ("DROP OWNED BY old_role", "drop-owned", "destructive"),
    ("TRUNCATE orders", "truncate", "destructive"),
    ("DELETE FROM orders", "delete-without-where", "destructive"),
    ("WITH gone AS (DELETE FROM orders RETURNING id) SELECT count(*) FROM gone", "delete-without-where", "destructive"),
    ("UPDATE orders SET note = ''", "update-without-where", "destructive"),
    ("ALTER TABLE orders ALTER COLUMN total TYPE numeric(14,2)", "alter-column-type", "locking"),
    ("ALTER TABLE orders ALTER total SET DATA TYPE text", "alter-column-type", "locking"),
    ("CREATE INDEX orders_note ON orders (note)", "create-index-not-concurrently", "locking"),
    ("CREATE UNIQUE INDEX ON sales.orders (id)", "create-index-not-concurrently", "locking"),
    ("ALTER TABLE orders ADD COLUMN r float8 DEFAULT random()", "add-column-volatile-default", "locking"),
    ("ALTER TABLE orders ADD COLUMN u uuid DEFAULT gen_random_uuid()", "add-column-volatile-default", "locking"),
    ("ALTER TABLE orders ADD COLUMN u uuid NOT NULL DEFAULT public.uuid_generate_v4()", "add-column-volatile-default", "locking"),
    ("ALTER TABLE orders ADD COLUMN t timestamptz DEFAULT clock_timestamp()", "add-column-volatile-default", "locking"),
    ("ALTER TABLE orders ADD COLUMN n int DEFAULT (random() * 10)::int", "add-column-volatile-default", "locking"),
    ("ALTER TABLE orders ADD COLUMN n bigint DEFAULT nextval('s')", "add-column-volatile-default", "locking"),
    ("ALTER TABLE orders ADD COLUMN n bigserial", "add-column-volatile-default", "locking"),
    ("ALTER TABLE orders ADD COLUMN n int GENERATED ALWAYS AS IDENTITY", "add-column-volatile-default", "locking"),
    ("ALTER TABLE orders ADD COLUMN n int GENERATED ALWAYS AS (id * 2) STORED", "add-column-volatile-default", "locking"),
    ("ALTER TABLE orders ALTER COLUMN note SET NOT NULL", "set-not-null", "locking"),
    ("ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (cid) REFERENCES customers (id)", "add-foreign-key-validated", "locking"),
    ("ALTER TABLE orders ADD FOREIGN KEY (cid) REFERENCES customers", "add-foreign-key-validated", "locking"),
    ("ALTER TABLE orders ADD CONSTRAINT pos CHECK (total >= 0)", "add-check-validated", "locking"),
    ("CREATE INDEX CONCURRENTLY i ON orders (note)", "non-transactional-statement", "error"),
    ("VACUUM orders", "non-transactional-statement", "error"),
    ("DROP INDEX i", "drop-index-not-concurrently", "locking"),
    ("DROP INDEX IF EXISTS sales.i", "drop-index-not-concurrently", "locking"),
    ("REINDEX INDEX i", "reindex-not-concurrently", "locking"),
    ("REINDEX TABLE orders", "reindex-not-concurrently", "locking"),
    ("ALTER TABLE orders ADD CONSTRAINT u UNIQUE (note)", "add-unique-without-index", "locking"),
    ("ALTER TABLE orders ADD PRIMARY KEY (id)", "add-primary-key-without-index", "locking"),
    ("ALTER TABLE orders RENAME COLUMN a TO b", "rename-column", "destructive"),
    ("ALTER TABLE orders RENAME TO purchases", "rename-table", "destructive"),
    ("ALTER TABLE orders DETACH PARTITION orders_2020", "detach-partition-not-concurrently", "locking"),
    ("ALTER DOMAIN positive ADD CONSTRAINT p CHECK (VALUE > 0)", "alter-domain-add-constraint-validated", "locking"),
    ("CLUSTER orders USING orders_pkey", "cluster", "locking"),
    ("ALTER TABLE orders ADD COLUMN c int NOT NULL", "add-column-not-null-without-default", "locking"),
    ("ALTER TABLE orders ALTER COLUMN note TYPE varchar(20)", "alter-column-type", "locking"),
    ("ALTER TABLE orders ALTER COLUMN note TYPE text USING note::text", "alter-column-type", "locking"),
]

QUIET = [
    "DROP VIEW v",
    "DROP FUNCTION f()",
    "ALTER INDEX i RENAME TO j",
    "ALTER TABLE orders ADD CONSTRAINT u UNIQUE USING INDEX orders_note",
    "ALTER TABLE orders ADD CONSTRAINT pk PRIMARY KEY USING INDEX orders_id",
    "ALTER DOMAIN positive ADD CONSTRAINT p CHECK (VALUE > 0) NOT VALID",
    "ALTER DOMAIN positive VALIDATE CONSTRAINT p",
    "CREATE DOMAIN positive AS int CHECK (VALUE > 0)",
    "ALTER TABLE orders ALTER COLUMN note SET STATISTICS 500",
    "ALTER TABLE orders ADD COLUMN c int NOT NULL DEFAULT 1",
    "DELETE FROM orders WHERE id = 1",
    "DELETE FROM orders WHERE CURRENT OF c",
    "UPDATE orders SET note = '' WHERE id = 1",
    "WITH x AS (DELETE FROM orders WHERE id = 1 RETURNING id) SELECT 1",
    "CREATE FUNCTION purge() RETURNS void LANGUAGE sql BEGIN ATOMIC DELETE FROM orders; END",
    "CREATE FUNCTION purge() RETURNS void LANGUAGE plpgsql AS $$ BEGIN DROP TABLE orders; END $$",
    "ALTER TABLE orders ADD COLUMN c int",
    "ALTER TABLE orders ADD COLUMN c int NOT NULL DEFAULT 0",
    "ALTER TABLE orders ADD COLUMN c timestamptz NOT NULL DEFAULT now()",
    "ALTER TABLE orders ADD COLUMN c timestamptz DEFAULT CURRENT_TIMESTAMP",
    "ALTER TABLE orders ADD COLUMN c text DEFAULT 'random()'",
    "ALTER TABLE orders ADD COLUMN c int DEFAULT my_function()",
    "ALTER TABLE orders ADD COLUMN c int REFERENCES customers (id)",
    "ALTER TABLE orders ALTER COLUMN note DROP NOT NULL",
    "ALTER TABLE orders ALTER COLUMN note SET DEFAULT random()",
    "ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (cid) REFERENCES customers (id) NOT VALID",
    "ALTER TABLE orders VALIDATE CONSTRAINT fk",
    "ALTER TABLE orders ADD CONSTRAINT pos CHECK (total >= 0) NOT VALID",
    "ALTER TYPE mood ADD VALUE 'meh'",
    "ANALYZE orders",
]


@pytest.mark.parametrize(("sql", "rule", "severity"), FIRES)
def test_lint_rule_fires(sql, rule, severity):
    text = f"-- migration\nSELECT 1;\n{sql};\n"
    findings = lint(parse_script(text))
    assert rules(findings) == [rule]
    finding = findings[0]
    assert finding.severity == severity
    assert finding.line == 3
    assert finding.statement == sql
    assert finding.message and "\n" not in finding.message
    assert finding.rule in KNOWN_RULES


@pytest.mark.parametrize(("sql", "rule", "severity"), FIRES)
def test_lint_rule_silenced_by_allow_comment(sql, rule, severity):
    text = f"-- dbplan:allow {rule}\n{sql};\n"
    assert lint(parse_script(text)) == ()
    text = f"-- dbplan:allow some-other-rule\n{sql};\n"
    assert rules(lint(parse_script(text))) == [rule]


@pytest.mark.parametrize(("sql", "rule", "severity"), FIRES)
def test_lint_rule_silenced_by_plan_file(sql, rule, severity):
    script = parse_script(sql)
    assert lint(script, allow=frozenset({rule})) == ()
    assert rules(lint(script, allow=frozenset({"something-else"}))) == [rule]


@pytest.mark.parametrize("sql", QUIET)
def test_lint_quiet(sql):
    assert lint(parse_script(sql + ";")) == ()


def test_drop_database():
    findings = lint(parse_script("-- dbplan:no-transaction\nDROP DATABASE sales;"))
    assert [(f.rule, f.severity, f.line) for f in findings] == [("drop-database", "destructive", 2)]
    assert "sales" in findings[0].message
    # Without the marker it is also an error: DROP DATABASE cannot run in a transaction.
    findings = lint(parse_script("DROP DATABASE sales;"))
    assert sorted(rules(findings)) == ["drop-database", "non-transactional-statement"]
    assert lint(parse_script("-- dbplan:no-transaction\n-- dbplan:allow drop-database\nDROP DATABASE sales;")) == ()


def test_non_transactional_statement_is_fine_with_the_marker():
    text = "-- dbplan:no-transaction\nCREATE INDEX CONCURRENTLY i ON orders (note);\nVACUUM orders;"
    assert lint(parse_script(text)) == ()
    assert len(parse_script(text).non_transactional) == 2


def test_non_transactional_message_names_the_command_and_the_marker():
    (finding,) = lint(parse_script("DROP INDEX CONCURRENTLY i;"))
    assert finding.message.startswith("DROP INDEX CONCURRENTLY cannot run inside a transaction block")
    assert "-- dbplan:no-transaction" in finding.message


def test_statements_on_a_table_created_earlier_in_the_file_are_quiet():
    text = """
CREATE TABLE orders (id bigint PRIMARY KEY, note text, cid bigint, total numeric);
CREATE INDEX orders_note ON orders (note);
ALTER TABLE orders ADD CONSTRAINT fk FOREIGN KEY (cid) REFERENCES customers (id);
ALTER TABLE orders ADD CONSTRAINT pos CHECK (total >= 0);
ALTER TABLE orders ALTER COLUMN note SET NOT NULL;
ALTER TABLE orders ALTER COLUMN total TYPE numeric(14,2);
ALTER TABLE orders ADD COLUMN u uuid DEFAULT gen_random_uuid();
ALTER TABLE orders DROP COLUMN cid;
UPDATE orders SET note = '';
DELETE FROM orders;
TRUNCATE orders;
DROP TABLE orders;
"""
    assert lint(parse_script(text)) == ()


def test_the_new_table_exemption_needs_the_table_created_before():
    text = "CREATE INDEX i ON orders (note);\nCREATE TABLE orders (note text);\n"
    findings = lint(parse_script(text))
    assert rules(findings) == ["create-index-not-concurrently"]
    assert findings[0].line == 1


def test_the_new_table_exemption_is_per_table():
    text = "CREATE TABLE a (x int);\nCREATE INDEX ON a (x);\nCREATE INDEX ON b (x);\n"
    findings = lint(parse_script(text))
    assert [(f.rule, f.line) for f in findings] == [("create-index-not-concurrently", 3)]


def test_create_table_if_not_exists_is_a_new_table_unless_it_exists_already():
    text = "CREATE TABLE IF NOT EXISTS a (x int);\nCREATE INDEX ON a (x);\n"
    assert lint(parse_script(text)) == ()
    # Live inspection found a table of that name: IF NOT EXISTS created nothing.
    assert rules(lint(parse_script(text), existing_tables=["public.a"])) == ["create-index-not-concurrently"]
    text = "CREATE TABLE IF NOT EXISTS a AS SELECT 1 AS x;\nALTER TABLE a ADD COLUMN y int NOT NULL;\n"
    assert lint(parse_script(text)) == ()


def test_tables_created_by_as_into_and_rename_are_new():
    text = (
        "CREATE TABLE a AS SELECT 1 AS x;\nCREATE INDEX ON a (x);\n"
        "SELECT 1 AS x INTO b;\nCREATE INDEX ON b (x);\n"
        "CREATE TABLE c (x int);\nALTER TABLE c RENAME TO d;\nCREATE INDEX ON d (x);\n"
        "CREATE MATERIALIZED VIEW m AS SELECT 1 AS x;\nCREATE INDEX ON m (x);\n"
    )
    assert lint(parse_script(text)) == ()


def test_schema_qualified_names_match_unqualified_ones_but_not_other_schemas():
    text = (
        "CREATE TABLE sales.orders (x int);\n"
        "CREATE INDEX ON orders (x);\n"
        "CREATE INDEX ON sales.orders (x);\n"
        "CREATE INDEX ON archive.orders (x);\n"
    )
    findings = lint(parse_script(text))
    assert [f.line for f in findings] == [4]


def test_dropping_a_new_table_ends_its_exemption():
    text = "CREATE TABLE a (x int);\nDROP TABLE a;\nCREATE INDEX ON a (x);\n"
    assert [f.line for f in lint(parse_script(text))] == [3]


def test_new_tables_keyword():
    script = parse_script("CREATE INDEX ON orders (x);\nCREATE INDEX ON sales.items (x);\nCREATE INDEX ON other (x);")
    findings = lint(script, new_tables=["orders", "sales.items"])
    assert [f.line for f in findings] == [3]


def test_drop_table_names_only_old_tables():
    text = "CREATE TABLE tmp (x int);\nDROP TABLE tmp, orders;\n"
    (finding,) = lint(parse_script(text))
    assert finding.rule == "drop-table"
    assert "orders" in finding.message and "tmp" not in finding.message


def test_one_finding_per_alter_table_subcommand():
    text = "ALTER TABLE orders DROP COLUMN a, DROP COLUMN b, ALTER COLUMN c SET NOT NULL;"
    findings = lint(parse_script(text))
    assert rules(findings) == ["drop-column", "drop-column", "set-not-null"]
    assert "orders.a" in findings[0].message and "orders.b" in findings[1].message


def test_findings_come_in_file_order_with_statement_lines():
    text = "-- x\nTRUNCATE a;\n\nDELETE FROM b;\n/* y */ UPDATE c SET x = 1;\n"
    findings = lint(parse_script(text))
    assert [(f.rule, f.line) for f in findings] == [
        ("truncate", 2),
        ("delete-without-where", 4),
        ("update-without-where", 5),
    ]


def test_finding_statement_is_one_shortened_line():
    long_sql = "UPDATE orders\n   SET note = '" + "x" * 200 + "'"
    (finding,) = lint(parse_script(long_sql + ";"))
    assert "\n" not in finding.statement
    assert len(finding.statement) == 120
    assert finding.statement.startswith("UPDATE orders SET note = 'xxx")
    assert finding.statement.endswith("...")


def test_unparsed_script_has_no_findings():
    script = parse_script("DROP TABLE orders; DROP TABL x;")
    assert not script.parsed
    assert lint(script) == ()


def test_allow_comment_only_silences_its_rules():
    text = "-- dbplan:allow drop-table\nDROP TABLE a;\nTRUNCATE b;\n"
    assert rules(lint(parse_script(text))) == ["truncate"]


def test_statement_dataclasses_are_hashable_and_compare_by_position():
    a = parse_script("SELECT 1;").statements[0]
    b = parse_script("SELECT 1;").statements[0]
    c = parse_script("\nSELECT 1;").statements[0]
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert isinstance(a, Statement)
    assert a.ast == {"SelectStmt": a.ast["SelectStmt"]}


# --------------------------------------------------------------------------- statement spans

SPAN_CASES = [
    TEN_STATEMENTS,
    "SELECT 1",
    "SELECT 1 -- trailing comment, no semicolon",
    "SELECT 1 /* trailing block */",
    "SELECT '--not a comment'",
    "SELECT 'a' -- comment\n;",
    "SELECT $$ -- in a dollar quote; $$; SELECT 2 /* x */ ;",
    "/* a /* nested */ comment */ SELECT 1; -- after\n-- only comments\n",
    "/**/SELECT 1;/*/ still a comment */SELECT 2;",
    "SELECT 1;\r\n\r\n  \t-- crlf\r\nSELECT 2;\r\n",
    "\ufeffSELECT 'é' AS \"ünïcode\"; -- é\nSELECT 'ж';",
    "SELECT 1 --x\n + 1;",
    "SELECT 2 /* -- */ + 3;",
    "SELECT E'it''s -- here';\nSELECT 1\n-- c1\n-- c2\n;",
    "CREATE TABLE t (\n  a int, -- the a\n  b int  /* the b */\n);",
    "SELECT 1;;;SELECT 2",
    "-- only a comment\n",
    "",
]


# The cases where no statement may end in a comment: there the scanner is not needed.
WITHOUT_SCANNER = {1, 7, 8, 9, 10, 11, 14, 15, 16, 17}


@pytest.mark.parametrize(("index", "text"), list(enumerate(SPAN_CASES)), ids=range(len(SPAN_CASES)))
def test_statement_spans_without_the_scanner_are_the_scanners(index: int, text: str) -> None:
    """Skipping comments and whitespace forward from the parser's ranges gives what the
    scanner's tokens give, or gives up (None) where only the scanner can tell."""
    import json

    from pglast.parser import parse_sql_json

    from orchestrator.migrations import sqlspans

    src = " " + text[1:] if text.startswith("\ufeff") else text
    utf8 = src.encode()
    raw = json.loads(parse_sql_json(src)).get("stmts", [])
    fast = sqlspans.statement_spans(raw, utf8)
    exact = sqlspans.spans_from_tokens(raw, utf8, sqlspans.scan_tokens(src, utf8))
    assert fast == (exact if index in WITHOUT_SCANNER else None)
    assert_consistent(text, parse_script(text))


def test_a_comment_that_may_end_a_statement_is_left_to_the_scanner() -> None:
    from orchestrator.migrations import sqlspans

    script = parse_script("SELECT 'a' -- comment\n;\nSELECT '--' AS dashes;")
    assert sqls(script) == ["SELECT 'a'", "SELECT '--' AS dashes"]
    assert sqlspans.statement_spans([{"stmt_location": 0, "stmt_len": 21}], b"SELECT 'a' -- comment\n") is None


# --------------------------------------------------------------------------- inline COPY data


@pytest.mark.parametrize(
    ("text", "data"),
    [
        ("COPY t FROM stdin;\n1\tO'Brien\n\\.\n", ["1\tO'Brien\n"]),
        ("COPY t FROM STDIN;\r\n1\r\n\\.\r\nSELECT 1;\r\n", ["1\r\n"]),
        ("COPY t FROM STDIN;\n\\.\n", [""]),
        ("COPY t (a)\n  FROM STDIN WITH (FORMAT csv) ; -- rows\n\"x;\ny\"\n\\.\nCOPY u FROM stdin;\n2\n\\.", ['"x;\ny"\n', "2\n"]),
        # A BOM and non-ASCII data keep every offset a character offset.
        ("\ufeffCOPY t FROM stdin;\nÄ\t€\n\\.\nSELECT 'é';\n", ["Ä\t€\n"]),
    ],
    ids=["text", "crlf", "empty", "multi-line-statement-and-two-blocks", "non-ascii"],
)
def test_inline_copy_data_goes_to_its_statement_and_the_rest_parses(text: str, data: list[str]) -> None:
    script = parse_script(text)
    assert script.parsed, script.parse_error
    assert [s.copy_data for s in script.statements if s.kind == "CopyStmt"] == data
    assert script.has_inline_copy
    assert_consistent(text, script)


@pytest.mark.parametrize(
    "text",
    [
        "SELECT '\n\\.\n';\n",  # inside a string
        "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS $$\nSELECT 'stdin';\n\\.\n$$;\n",  # inside a body
        "-- COPY t FROM STDIN;\nSELECT 1;\n",  # a comment
    ],
    ids=["string", "function-body", "comment"],
)
def test_what_only_looks_like_copy_data_is_sql(text: str) -> None:
    script = parse_script(text)
    assert script.parsed
    assert not script.has_inline_copy


def test_a_stray_end_of_data_line_is_a_parse_error_on_its_line() -> None:
    script = parse_script("COPY t FROM stdin;\n1\n\\.\nSELECT 1;\n\\.\n")
    assert not script.parsed
    assert script.parse_error_line == 5


def test_the_lines_after_inline_data_are_the_files_lines() -> None:
    script = parse_script("COPY t FROM stdin;\n1\n2\n\\.\nSELECT 1;\n-- dbplan:allow truncate\nTRUNCATE t;\n")
    assert [(s.line, s.kind) for s in script.statements] == [(1, "CopyStmt"), (5, "SelectStmt"), (7, "TruncateStmt")]
    assert script.statements[0].copy_data_line == 2
    assert script.allow_comments == (("truncate", 6),)


def test_the_schema_names_exactly_the_rules_that_can_be_allowed() -> None:
    from orchestrator.estate.load import load_schema
    from orchestrator.migrations.lint import ALLOWABLE_RULES

    assert set(load_schema()["$defs"]["lint_rule"]["enum"]) == ALLOWABLE_RULES
# --------------------------------------------------------------------------- what the mutation benchmark found

# An option's value as PostgreSQL's defGetBoolean reads it: no value is true, 0 and 1,
# and true/false/on/off in any case and any spelling the grammar allows (a string, a
# keyword, a quoted identifier). The planner must see the same boolean the server will.
SUBSCRIPTION = "CREATE SUBSCRIPTION s CONNECTION 'host=x' PUBLICATION p WITH "
SLOT = "CREATE SUBSCRIPTION ... WITH (create_slot = true)"
SET_PUBLICATION = "ALTER SUBSCRIPTION s SET PUBLICATION p WITH "
REFRESH = "ALTER SUBSCRIPTION with refresh"


@pytest.mark.parametrize(
    ("sql", "name"),
    [
        (SUBSCRIPTION + "(connect = 'FALSE')", None),
        (SUBSCRIPTION + "(connect = 'false')", None),
        (SUBSCRIPTION + "(connect = 0)", None),
        (SUBSCRIPTION + "(connect = false)", None),
        (SUBSCRIPTION + "(connect = OFF)", None),
        (SUBSCRIPTION + '(connect = "off")', None),
        (SUBSCRIPTION + "(connect = 'Off')", None),
        (SUBSCRIPTION + "(create_slot = 'off', enabled = false)", None),
        (SUBSCRIPTION + "(create_slot = 0)", None),
        (SUBSCRIPTION + "(connect = 1)", SLOT),
        (SUBSCRIPTION + "(connect = 'TRUE')", SLOT),
        (SUBSCRIPTION + "(connect = on)", SLOT),
        (SUBSCRIPTION + "(connect)", SLOT),
        (SUBSCRIPTION + "(create_slot = 1)", SLOT),
        (SUBSCRIPTION + "(create_slot = 'on')", SLOT),
        (SUBSCRIPTION + "(create_slot)", SLOT),
        (SUBSCRIPTION + "(enabled = false, copy_data = false)", SLOT),
        (SET_PUBLICATION + "(refresh = 0)", None),
        (SET_PUBLICATION + "(refresh = 'FALSE')", None),
        (SET_PUBLICATION + "(refresh = off)", None),
        (SET_PUBLICATION + "(refresh = 1)", REFRESH),
        (SET_PUBLICATION + "(refresh = 'On')", REFRESH),
        ("ALTER SUBSCRIPTION s DROP PUBLICATION p WITH (refresh)", REFRESH),
        ("ALTER SUBSCRIPTION s ADD PUBLICATION p WITH (refresh = false)", None),
        ("ALTER SUBSCRIPTION s REFRESH PUBLICATION WITH (copy_data = false)", "ALTER SUBSCRIPTION ... REFRESH PUBLICATION"),
        ("REINDEX (CONCURRENTLY 0) TABLE t", None),
        ("REINDEX (CONCURRENTLY off) TABLE t", None),
        ("REINDEX (CONCURRENTLY 'FALSE') TABLE t", None),
        ("REINDEX (CONCURRENTLY 1) TABLE t", "REINDEX CONCURRENTLY"),
        ("REINDEX (CONCURRENTLY 'on') TABLE t", "REINDEX CONCURRENTLY"),
        ("REINDEX (VERBOSE, CONCURRENTLY true) INDEX i", "REINDEX CONCURRENTLY"),
        ("REINDEX (VERBOSE) TABLE t", None),
        # PostgreSQL refuses these spellings (not booleans to defGetBoolean): the statement
        # fails whatever dbplan thinks, so dbplan reads them as no value and keeps the default.
        ("REINDEX (CONCURRENTLY 'yes') TABLE t", None),
        ("REINDEX (CONCURRENTLY tru) TABLE t", None),
        (SUBSCRIPTION + "(connect = 'no')", SLOT),
        (SUBSCRIPTION + "(connect = of)", SLOT),
    ],
)
def test_option_values_are_read_as_postgresql_reads_them(sql: str, name: str | None) -> None:
    (statement,) = parse_script(sql).statements
    assert statement.non_transactional == name


@pytest.mark.parametrize(
    ("sql", "name"),
    [
        ("DISCARD TEMP", None),
        ("DISCARD SEQUENCES", None),
        ("DISCARD PLANS", None),
        ("DISCARD ALL", "DISCARD ALL"),
        ("CLUSTER VERBOSE", "CLUSTER without a table"),
        ("CLUSTER t", None),
        ("VACUUM t", "VACUUM"),
        ("ANALYZE t", None),
        ("DROP INDEX i", None),
        ("DROP TABLE t", None),
        ("ALTER DATABASE d WITH ALLOW_CONNECTIONS false", None),
        ("ALTER DATABASE d SET TABLESPACE ts", "ALTER DATABASE SET TABLESPACE"),
        ("ALTER TABLE t ADD COLUMN c int, ALTER COLUMN d SET DEFAULT 1", None),
        ("ALTER TABLE t ATTACH PARTITION p FOR VALUES IN (1)", None),
        ("REINDEX TABLE t", None),
        ("REINDEX SCHEMA s", "REINDEX SCHEMA"),
        ("COMMIT", None),
        ("ROLLBACK", None),
    ],
)
def test_non_transactional_is_exact_per_statement_kind(sql: str, name: str | None) -> None:
    (statement,) = parse_script(sql).statements
    assert statement.non_transactional == name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The words after a rule are a reason: a rule named in the reason is not allowed.
        ("-- dbplan:allow drop-table because the data moved, truncate comes later\n", {"drop-table"}),
        ("-- dbplan:allow drop-table reason, truncate\n", {"drop-table"}),
        ("-- dbplan:allow drop-table,truncate\n", {"drop-table", "truncate"}),
        ("-- dbplan:allow drop-table,, truncate\n", {"drop-table", "truncate"}),
        ("-- dbplan:allow\tdrop-table\n", {"drop-table"}),
        ("-- dbplan:allow DROP-TABLE\n", {"drop-table"}),
        ("-- dbplan:allow: drop-table\n", set()),
        ("-- dbplan:allow-all\n", set()),
        ("-- dbplan:no-transaction\n-- dbplan:allow truncate\nTRUNCATE t;\n", {"truncate"}),
        ("SELECT 1; -- dbplan:allow truncate\nSELECT 2; -- dbplan:allow drop-table why\n", {"truncate", "drop-table"}),
        ("SELECT 'é'; -- dbplan:allow truncate\n", {"truncate"}),
    ],
)
def test_allow_comments_silence_exactly_the_rules_they_name(text: str, expected: set[str]) -> None:
    assert parse_script(text).allowed_rules == frozenset(expected)


def test_parse_error_in_the_middle_names_its_own_line() -> None:
    script = parse_script("SELECT 1;\nSELEC 2;\nSELECT 3;\n\nSELECT 4;\n")
    assert script.parse_error == 'line 2: syntax error at or near "SELEC"'
    assert script.parse_error_line == 2


@pytest.mark.parametrize(
    "comment",
    [
        "-- reviewed by: truncate, drop-column",  # 12 characters, a space, then rule names
        "-- 0123456789ab truncate",
        "-- dbplan:deny  truncate",
        "-- see dbplan:allow truncate",
        "/* dbplan:allow truncate */",
    ],
)
def test_a_comment_without_the_allow_prefix_allows_nothing(comment: str) -> None:
    """Beside a real allow comment, so that the file's comments are read at all."""
    text = f"-- dbplan:allow drop-table\n{comment}\nTRUNCATE t;\n"
    assert parse_script(text).allowed_rules == frozenset({"drop-table"})


def test_a_rule_named_only_in_the_reason_still_fires() -> None:
    text = "-- dbplan:allow drop-table the old data is gone, truncate is fine too\nDROP TABLE a;\nTRUNCATE b;\n"
    assert rules(lint(parse_script(text))) == ["truncate"]


@pytest.mark.parametrize(
    ("text", "style"),
    [
        ("BEGIN;\nSELECT 1;\nCOMMIT;\nBEGIN;\nSELECT 2;\nCOMMIT;", "multiple"),
        ("START TRANSACTION;\nSELECT 1;\nCOMMIT;\nSTART TRANSACTION;\nSELECT 2;\nEND;", "multiple"),
        ("BEGIN;\nCOMMIT;\nBEGIN;\nCOMMIT;", "multiple"),
        ("BEGIN;\nBEGIN;\nSELECT 1;\nCOMMIT;", "multiple"),
        ("BEGIN;\nSELECT 1;\nCOMMIT;\nCOMMIT;", "multiple"),
        ("COMMIT;\nSELECT 1;\nBEGIN;", "multiple"),
        ("BEGIN;\nSELECT 1;\nROLLBACK PREPARED 'x';", "multiple"),
        ("BEGIN;\nSELECT 1;\nCOMMIT PREPARED 'x';", "multiple"),
        ("BEGIN;\nSELECT 1;\nCOMMIT AND NO CHAIN;", "wrapped"),
        ("BEGIN;\nSELECT 1;\nCOMMIT;", "wrapped"),
        ("BEGIN", "multiple"),
        ("COMMIT", "multiple"),
    ],
)
def test_several_transaction_blocks_are_never_folded_into_one(text: str, style: str) -> None:
    script = parse_script(text)
    assert script.transaction_style == style
    if style == "multiple":
        assert script.inner_statements == script.statements


def test_transaction_kinds_of_every_control_statement() -> None:
    text = (
        "BEGIN; START TRANSACTION; COMMIT; END; ROLLBACK; ABORT; SAVEPOINT s; RELEASE SAVEPOINT s; "
        "ROLLBACK TO SAVEPOINT s; PREPARE TRANSACTION 'x'; COMMIT PREPARED 'x'; ROLLBACK PREPARED 'x'; SELECT 1;"
    )
    kinds = [s.transaction_kind for s in parse_script(text).statements]
    assert kinds == [
        "begin", "start", "commit", "commit", "rollback", "rollback", "savepoint", "release",
        "rollback_to", "prepare", "commit_prepared", "rollback_prepared", None,
    ]  # fmt: skip


def test_text_that_is_not_valid_unicode_is_a_parse_error_not_a_crash() -> None:
    script = parse_script("SELECT 1;\nSELECT '\ud800';\n")  # a lone surrogate: no UTF-8 for it
    assert not script.parsed
    assert script.parse_error == "line 2: the text is not valid Unicode (surrogates not allowed)"
    assert script.parse_error_line == 2


@pytest.mark.parametrize("text", ["\nSELECT 1;", "\n\n  SELECT 1;", "\r\nSELECT 1;"])
def test_leading_newlines_count_in_the_first_statements_line(text: str) -> None:
    (statement,) = parse_script(text).statements
    assert statement.line == text.count("\n") + 1


def test_a_file_that_starts_with_a_nul_character_is_refused_at_its_first_line() -> None:
    script = parse_script("\x00SELECT 1;\n")
    assert not script.parsed
    assert "NUL character" in (script.parse_error or "")
    assert script.parse_error_line == 1


def test_every_lock_warning_names_its_lock_and_table():
    findings = lint(
        parse_script(
            "CREATE INDEX i ON orders (note);\n"
            "ALTER TABLE orders ALTER COLUMN note SET STATISTICS 100, ADD FOREIGN KEY (cid) REFERENCES customers;\n"
            "ALTER TABLE orders ALTER COLUMN total TYPE numeric(20, 2);\n"
        )
    )
    assert [(f.rule, f.lock, f.table) for f in findings] == [
        ("create-index-not-concurrently", "SHARE", "orders"),
        ("add-foreign-key-validated", "SHARE ROW EXCLUSIVE", "orders"),
        ("alter-column-type", "ACCESS EXCLUSIVE", "orders"),
    ]
    assert "takes SHARE on orders" in findings[0].message
    assert "takes SHARE ROW EXCLUSIVE on orders and on customers" in findings[1].message
    assert "takes ACCESS EXCLUSIVE on orders" in findings[2].message


@pytest.mark.parametrize(
    ("old", "new", "rewrites"),
    [
        ("character varying(20)", "varchar(40)", False),
        ("character varying(20)", "varchar(20)", False),
        ("character varying(20)", "text", False),
        ("character varying(20)", "varchar", False),
        ("character varying", "text", False),
        ("text", "varchar", False),
        ("character varying(40)", "varchar(20)", True),
        ("text", "varchar(20)", True),
        ("integer", "text", True),
        ("integer", "bigint", True),
    ],
)
def test_widening_a_varchar_is_quiet_when_the_old_type_is_known(old, new, rewrites):
    script = parse_script(f"ALTER TABLE orders ALTER COLUMN note TYPE {new};")
    findings = lint(script, column_types={"public.orders": {"note": old}})
    assert rules(findings) == (["alter-column-type"] if rewrites else [])
    if rewrites:
        assert "unless" not in findings[0].message


def test_a_varchar_change_on_an_unknown_column_says_what_it_depends_on():
    (finding,) = lint(parse_script("ALTER TABLE orders ALTER COLUMN note TYPE text;"))
    assert "unless it only widens a varchar or text column" in finding.message


def test_new_tables_after_chains_over_files():
    first = parse_script("CREATE TABLE IF NOT EXISTS a (x int);\nCREATE TABLE b AS SELECT 1 AS x;\nCREATE TABLE c (x int);")
    second = parse_script("DROP TABLE c;\nALTER TABLE b RENAME TO d;")
    after_first = new_tables_after(first)
    assert after_first == ("a", "b", "c")
    assert new_tables_after(second, after_first) == ("a", "b", "d")
    assert new_tables_after(first, existing_tables=["public.a"]) == ("b", "c")


def test_relations_named_lists_tables_and_indexes():
    script = parse_script("CREATE INDEX i ON sales.orders (x);\nDROP INDEX j;\nUPDATE items SET x = 1;")
    assert relations_named(script) == {"orders", "j", "items"}


def test_vacuum_full_is_a_rewrite_under_access_exclusive():
    findings = lint(parse_script("-- dbplan:no-transaction\nVACUUM FULL orders;\nVACUUM orders;\nVACUUM (FULL) items;"))
    assert [(f.rule, f.line, f.lock, f.table) for f in findings] == [
        ("vacuum-full", 2, "ACCESS EXCLUSIVE", "orders"),
        ("vacuum-full", 4, "ACCESS EXCLUSIVE", "items"),
    ]


RISKY = sorted((Path(__file__).resolve().parent.parent / "bench" / "risky").glob("*.sql"))


@pytest.mark.parametrize("path", [p for p in RISKY if p.stem in KNOWN_RULES], ids=lambda p: p.stem)
def test_each_risky_file_of_the_squawk_comparison_triggers_its_rule(path: Path) -> None:
    assert path.stem in rules(lint(parse_script(path.read_text())))


def test_the_safe_variants_of_the_squawk_comparison_are_quiet() -> None:
    names = ("safe-variants", "new-table-if-not-exists", "create-domain-with-check", "drop-not-null")
    for name in names:
        path = next(p for p in RISKY if p.stem == name)
        assert lint(parse_script(path.read_text())) == (), name


def test_an_index_of_a_new_table_is_new_too():
    text = "CREATE TABLE a (x int);\nCREATE INDEX a_x ON a (x);\nDROP INDEX a_x;\nREINDEX INDEX a_x;\nDROP INDEX b_x;\n"
    assert [(f.rule, f.line) for f in lint(parse_script(text))] == [("drop-index-not-concurrently", 5)]
    assert "a_x" in new_tables_after(parse_script("CREATE TABLE a (x int);\nCREATE INDEX a_x ON a (x);"))

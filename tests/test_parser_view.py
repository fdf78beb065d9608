"""The parser's view of a file is the server's: nothing commits early, every hint is true.

dbplan's promise that a migration commits once, with its bookkeeping, rests on reading
each file as PostgreSQL will. These tests try the ways the two readings can part (syntax
the parser does not know, savepoints, COPY and its data, settings that change how the
server reads, names that rewrite the terminal, allow lists that say nothing) and check
the exit code, the output and what is in the database afterwards.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from estate import Estate


def _estate(tmp_path: Path, url: str, prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    estate = Estate(tmp_path, url, prefix, capsys)
    estate.add_app()
    return estate


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    return _estate(tmp_path, pg_url, dbname_prefix, capsys)


@pytest.fixture
def estate_any(tmp_path: Path, pg_any_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    """On each PostgreSQL major the suite runs."""
    return _estate(tmp_path, pg_any_url, dbname_prefix, capsys)


def _server_version(estate: Estate) -> int:
    with psycopg.connect(estate.url) as conn:
        return conn.info.server_version


def _state(estate: Estate) -> list[tuple[int, bool]]:
    return estate.query("app", "SELECT version, dirty FROM schema_migrations")


def _applied(estate: Estate) -> list[int]:
    return [v for (v,) in estate.query("app", "SELECT version FROM dbplan_history WHERE event = 'apply' ORDER BY id")]


def _start(estate: Estate) -> None:
    """The database and version 1 applied, so later files meet a live service."""
    estate.write("app", "1_start.up.sql", "CREATE TABLE start (id int);\n")
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output


# --------------------------------------------------------------------------- item 4: files the parser cannot read

# PostgreSQL 15 accepts system_user as a column name; from 16 on it is a reserved word, and
# dbplan's parser (PostgreSQL 18's grammar) refuses it. The COMMIT would end dbplan's
# transaction early, and the division by zero would then leave `early` behind, unrecorded.
OLD_SYNTAX = "CREATE TABLE early (id int);\nCOMMIT;\nCREATE TABLE words (system_user text);\nSELECT 1/0;\n"


def test_a_file_the_parser_cannot_read_blocks_the_plan_and_nothing_of_it_runs(estate_any: Estate) -> None:
    estate = estate_any
    _start(estate)
    estate.write("app", "2_old_syntax.up.sql", OLD_SYNTAX)

    plan = estate.dbplan("plan")
    apply = estate.dbplan("apply", "--yes")

    for run in (plan, apply):
        assert run.code == 1, run.output
        assert 'migrations/app/2_old_syntax.up.sql:3: PostgreSQL\'s parser as dbplan has it cannot read this file (line 3: syntax error at or near "system_user")' in run.output
        assert "-- dbplan:no-transaction" in run.output  # the way out, in the hint
        assert "nothing of it is left" not in run.output
    assert "early" not in estate.tables("app")
    assert _state(estate) == [(1, False)]


def test_a_down_file_the_parser_cannot_read_blocks_its_revert(estate: Estate) -> None:
    estate.write("app", "1_start.up.sql", "CREATE TABLE start (id int);\n")
    estate.write("app", "2_two.up.sql", "CREATE TABLE two (id int);\n")
    estate.write("app", "2_two.down.sql", "DROP TABLE two;\nCOMMIT;\nDROP TABLE (;\n")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.document["services"]["app"]["target"] = 1
    estate.save()

    run = estate.dbplan("apply", "--yes")

    assert run.code == 1
    assert "migrations/app/2_two.down.sql:3: PostgreSQL's parser as dbplan has it cannot read this file" in run.output
    assert "two" in estate.tables("app")
    assert _state(estate) == [(2, False)]


def test_an_unreadable_file_marked_no_transaction_runs_outside_one_as_the_hint_says(estate_any: Estate) -> None:
    estate = estate_any
    if _server_version(estate) >= 160000:
        pytest.skip("system_user is a reserved word from PostgreSQL 16 on")
    _start(estate)
    estate.write("app", "2_old_syntax.up.sql", "-- dbplan:no-transaction\nCREATE TABLE words (system_user text);\n")

    plan = estate.dbplan("plan")
    apply = estate.dbplan("apply", "--yes")

    assert plan.code == 0, plan.output
    assert "it runs as one string outside a transaction" in plan.output
    assert apply.code == 0, apply.output
    assert "words" in estate.tables("app")
    assert _state(estate) == [(2, False)]


# --------------------------------------------------------------------------- item 5: savepoints


@pytest.mark.parametrize(
    ("sql", "rows"),
    [
        (
            (
                "CREATE TABLE seeded (id int);\nSAVEPOINT before_seed;\nINSERT INTO seeded VALUES (1);\n"
                "ROLLBACK TO SAVEPOINT before_seed;\nINSERT INTO seeded VALUES (2);\nRELEASE SAVEPOINT before_seed;\n"
            ),
            [(2,)],
        ),
        (
            (
                "BEGIN;\nCREATE TABLE seeded (id int);\nSAVEPOINT a;\nINSERT INTO seeded VALUES (3);\nRELEASE a;\n"
                "SAVEPOINT b;\nINSERT INTO seeded VALUES (4);\nROLLBACK TO b;\nCOMMIT;\n"
            ),
            [(3,)],
        ),
    ],
    ids=["bare", "wrapped"],
)
def test_a_file_with_savepoints_runs_in_dbplans_transaction_as_written(estate: Estate, sql: str, rows: list[tuple[int]]) -> None:
    _start(estate)
    estate.write("app", "2_savepoints.up.sql", sql)

    plan = estate.dbplan("plan", "--format", "json")
    run = estate.dbplan("apply", "--yes")

    assert '"transactional": true' in plan.out
    assert "own-transactions" not in plan.out
    assert run.code == 0, run.output
    assert estate.query("app", "SELECT id FROM seeded") == rows
    assert _state(estate) == [(2, False)]


def test_a_failing_file_with_savepoints_leaves_nothing_and_no_dirty_service(estate: Estate) -> None:
    _start(estate)
    estate.write("app", "2_savepoints.up.sql", "CREATE TABLE half (id int);\nSAVEPOINT a;\nSELECT 1/0;\nRELEASE a;\n")

    run = estate.dbplan("apply", "--yes")

    assert run.code == 1
    assert "migrations/app/2_savepoints.up.sql:3: division by zero" in run.err
    assert "nothing of it is left in the database" in run.err
    assert "half" not in estate.tables("app")
    assert _state(estate) == [(1, False)]
    assert estate.dbplan("plan").code == 0


def test_a_savepoint_in_a_file_that_runs_outside_a_transaction_is_refused_in_the_plan(estate: Estate) -> None:
    _start(estate)
    estate.write("app", "2_outside.up.sql", "-- dbplan:no-transaction\nCREATE TABLE t (id int);\nSAVEPOINT a;\n")

    run = estate.dbplan("apply", "--yes")

    assert run.code == 1
    assert "migrations/app/2_outside.up.sql:3: SAVEPOINT works only inside a transaction" in run.output
    assert "t" not in estate.tables("app")
    assert _state(estate) == [(1, False)]

    # Inside the file's own transaction blocks, the same savepoint is fine.
    estate.write(
        "app",
        "2_outside.up.sql",
        "BEGIN;\nCREATE TABLE t (id int);\nSAVEPOINT a;\nINSERT INTO t VALUES (1);\nROLLBACK TO a;\nCOMMIT;\n"
        "BEGIN;\nINSERT INTO t VALUES (2);\nCOMMIT;\n",
    )
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    assert estate.query("app", "SELECT id FROM t") == [(2,)]
    assert _state(estate) == [(2, False)]


# --------------------------------------------------------------------------- item 6: COPY

# Data as pg_dump writes it, with what would confuse a splitter: a quote, "--", a COMMIT.
SEED = (
    "CREATE TABLE country (code text PRIMARY KEY, name text);\n"
    "COPY country (code, name) FROM stdin;\n"
    "ie\tIreland\n"
    "xx\tO'Brien -- not a comment; COMMIT;\n"
    "\\.\n"
    "COPY country FROM STDIN WITH (FORMAT csv);\n"
    'fr,"France, the ""hexagon"""\n'
    "\\.\n"
    "UPDATE country SET name = upper(name) WHERE code = 'ie';\n"
)


def test_copy_from_stdin_with_inline_data_seeds_the_table_in_the_migrations_transaction(estate: Estate) -> None:
    _start(estate)
    estate.write("app", "2_seed.up.sql", SEED)
    estate.write("app", "3_after.up.sql", "CREATE TABLE after_seed (id int);\n")
    estate.write("app", "4_more.up.sql", "COPY country FROM stdin; -- psql reads the data from the next line\nde\tGermany\n\\.\n")

    plan = estate.dbplan("plan")
    run = estate.dbplan("apply", "--yes")

    assert plan.code == 0, plan.output
    assert run.code == 0, run.output
    assert estate.query("app", "SELECT code, name FROM country ORDER BY code") == [
        ("de", "Germany"),
        ("fr", 'France, the "hexagon"'),
        ("ie", "IRELAND"),
        ("xx", "O'Brien -- not a comment; COMMIT;"),
    ]
    assert _applied(estate) == [1, 2, 3, 4]
    assert _state(estate) == [(4, False)]
    assert estate.dbplan("plan", "--detailed-exitcode").code == 0


def test_copy_data_that_fails_rolls_back_the_whole_migration(estate: Estate) -> None:
    _start(estate)
    estate.write("app", "2_seed.up.sql", "CREATE TABLE n (id int);\nCOPY n FROM stdin;\n1\nnot a number\n\\.\n")

    run = estate.dbplan("apply", "--yes")

    assert run.code == 1
    assert "migrations/app/2_seed.up.sql:4: invalid input syntax for type integer" in run.err  # the row's line
    assert "FAILED" in run.err
    assert "nothing of it is left in the database" in run.err
    assert "n" not in estate.tables("app")
    assert _state(estate) == [(1, False)]


def test_copy_data_waiting_for_a_lock_is_retried_then_leaves_nothing(
    estate: Estate, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.execution import batches

    monkeypatch.setattr(batches, "LOCK_TIMEOUT_RETRY_SECONDS", (0.1, 0.1, 0.1))
    estate.document["services"]["app"]["lock_timeout"] = "100ms"
    estate.save()
    _start(estate)
    estate.write("app", "2_seed.up.sql", "CREATE TABLE side (id int);\nCOPY start FROM stdin;\n1\n\\.\n")
    with psycopg.connect(estate.url, dbname=estate.name("app"), autocommit=True) as blocker:
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE start IN ACCESS EXCLUSIVE MODE")
        run = estate.dbplan("apply", "--yes")
        blocker.execute("ROLLBACK")

    assert run.code == 1
    assert run.err.count("retrying in") == 3
    assert "migrations/app/2_seed.up.sql:2: canceling statement due to lock timeout (SQLSTATE 55P03)" in run.err
    assert "for a lock another session holds, 4 times" in run.err
    assert "rolled back: nothing of it is left in the database" in run.err
    assert "side" not in estate.tables("app")
    assert estate.query("app", "SELECT count(*) FROM start") == [(0,)]
    assert _state(estate) == [(1, False)]


def test_copy_with_inline_data_in_a_no_transaction_file(estate: Estate) -> None:
    _start(estate)
    estate.write(
        "app", "2_seed.up.sql", "-- dbplan:no-transaction\nCREATE TABLE n (id int);\nCOPY n FROM stdin;\n7\n\\.\n"
    )

    run = estate.dbplan("apply", "--yes")

    assert run.code == 0, run.output
    assert estate.query("app", "SELECT id FROM n") == [(7,)]
    assert _state(estate) == [(2, False)]


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("CREATE TABLE t (id int);\nCOPY t TO STDOUT;\n", "2: COPY ... TO STDOUT sends rows to dbplan"),
        ("CREATE TABLE t (id int);\nCOPY (SELECT 1) TO STDOUT WITH (FORMAT csv);\n", "2: COPY ... TO STDOUT"),
        ("-- dbplan:no-transaction\nCREATE TABLE t (id int);\nCOPY t TO STDOUT;\n", "3: COPY ... TO STDOUT"),
        ("CREATE TABLE t (id int);\nCOPY t FROM STDIN;\n", "2: COPY ... FROM STDIN has no data in the file"),
        ("CREATE TABLE t (id int);\nCOPY t FROM STDIN;\nSELECT 1;\n", "2: COPY ... FROM STDIN has no data"),
    ],
    ids=["to-stdout", "query-to-stdout", "no-transaction", "stdin-without-data", "stdin-then-sql"],
)
def test_copy_that_cannot_work_is_refused_in_the_plan_never_at_apply_time(estate: Estate, sql: str, message: str) -> None:
    _start(estate)
    estate.write("app", "2_copy.up.sql", sql)

    plan = estate.dbplan("plan")
    apply = estate.dbplan("apply", "--yes")

    for run in (plan, apply):
        assert run.code == 1
        assert f"migrations/app/2_copy.up.sql:{message}" in run.output
        assert "internal error" not in run.output
    assert "t" not in estate.tables("app")
    assert _state(estate) == [(1, False)]


# --------------------------------------------------------------------------- item 7: how the server reads

# Read as dbplan's parser reads it (standard_conforming_strings on), '\' is a string and
# the COMMIT hides inside the next one; read with it off, the server sees the COMMIT.
HIDDEN_COMMIT = "CREATE TABLE early (id int);\nSELECT '\\' ; SELECT ' ; COMMIT; --';\nSELECT 1/0;\n"


def test_a_database_that_reads_backslashes_as_escapes_reads_files_as_dbplan_does(estate: Estate) -> None:
    _start(estate)
    estate.execute("app", f"ALTER DATABASE {estate.name('app')} SET standard_conforming_strings = off")
    estate.write("app", "2_backslash.up.sql", "CREATE TABLE paths (p text);\nINSERT INTO paths VALUES ('C:\\temp\\new');\n")
    estate.write("app", "3_hidden_commit.up.sql", HIDDEN_COMMIT)

    run = estate.dbplan("apply", "--yes")

    assert run.code == 1
    assert "migrations/app/3_hidden_commit.up.sql:3: division by zero" in run.err
    assert "nothing of it is left in the database" in run.err
    assert "early" not in estate.tables("app")
    assert estate.query("app", "SELECT p FROM paths") == [("C:\\temp\\new",)]
    assert _state(estate) == [(2, False)]


def test_a_migration_that_turns_escapes_on_behind_the_parsers_back_does_not_change_the_next(estate: Estate) -> None:
    _start(estate)
    # Hidden from the plan's checks in a DO block: the session reads the next query with it.
    estate.write(
        "app", "2_sneaky.up.sql", "DO $$ BEGIN EXECUTE 'SET standard_conforming_strings = off'; END $$;\n"
    )
    estate.write("app", "3_hidden_commit.up.sql", HIDDEN_COMMIT)

    run = estate.dbplan("apply", "--yes")

    assert run.code == 1
    assert "migrations/app/3_hidden_commit.up.sql:3: division by zero" in run.err
    assert "early" not in estate.tables("app")
    assert _state(estate) == [(2, False)]


def test_a_client_encoding_from_the_environment_does_not_change_how_the_server_reads(
    estate: Estate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read as Shift JIS, the last byte of "ā" (C4 81) and the backslash after it make one
    character: the escaped quote is gone, the string ends early and the COMMIT is seen."""
    _start(estate)
    estate.execute("app", f"ALTER DATABASE {estate.name('app')} SET backslash_quote = on")
    estate.write("app", "2_sjis.up.sql", "CREATE TABLE early (id int);\nSELECT E'ā\\'; COMMIT; --';\nSELECT 1/0;\n")
    monkeypatch.setenv("PGCLIENTENCODING", "SJIS")

    run = estate.dbplan("apply", "--yes")

    assert run.code == 1
    assert "migrations/app/2_sjis.up.sql:3: division by zero" in run.err
    assert "early" not in estate.tables("app")
    assert _state(estate) == [(1, False)]


@pytest.mark.parametrize(
    "statement",
    [
        "SET standard_conforming_strings = off",
        "SET LOCAL standard_conforming_strings TO false",
        "SET SESSION standard_conforming_strings = 0",
        "RESET standard_conforming_strings",
        "SET standard_conforming_strings TO DEFAULT",
        "SELECT set_config('standard_conforming_strings', 'off', false)",
        "SELECT pg_catalog.set_config('standard_conforming_strings', current_setting('x.y'), true)",
        "SET NAMES 'SJIS'",
        "SET client_encoding = 'LATIN1'",
        "ALTER ROLE CURRENT_USER SET standard_conforming_strings = off",
        "ALTER SYSTEM SET standard_conforming_strings = off",
    ],
)
def test_a_statement_that_changes_how_the_server_reads_the_file_blocks_the_plan(estate: Estate, statement: str) -> None:
    _start(estate)
    estate.write("app", "2_setting.up.sql", f"CREATE TABLE t (id int);\n{statement};\nSELECT 1;\n")

    run = estate.dbplan("apply", "--yes")

    assert run.code == 1
    assert "migrations/app/2_setting.up.sql:2: " in run.output
    assert "changes how PostgreSQL reads the statements after it" in run.output
    assert "t" not in estate.tables("app")


def test_settings_that_match_dbplans_reading_are_fine_and_the_file_is_read_as_the_parser_did(estate: Estate) -> None:
    """pg_dump writes these at the top of every dump; they are no reason to refuse it. The
    server lexes the whole query before it runs the SET, so on a database that reads
    backslashes as escapes the file is read as dbplan's parser read it only because
    dbplan's session already does."""
    _start(estate)
    estate.execute("app", f"ALTER DATABASE {estate.name('app')} SET standard_conforming_strings = off")
    estate.write(
        "app",
        "2_dump.up.sql",
        "SET standard_conforming_strings = on;\nSET client_encoding = 'UTF8';\nCREATE TABLE t (p text);\n"
        "INSERT INTO t VALUES ('a\\b');\n",
    )

    run = estate.dbplan("apply", "--yes")

    assert run.code == 0, run.output
    assert estate.query("app", "SELECT p FROM t") == [("a\\b",)]


# --------------------------------------------------------------------------- item 12: file names


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("2_x\x1b[2K\x1b[1Aok.up.sql", "2_x\\x1b[2K\\x1b[1Aok.up.sql"),
        ("2_fine\rapply app 9 ok.up.sql", "2_fine\\rapply app 9 ok.up.sql"),
        ("2_c1\x9b2K.up.sql", "2_c1\\x9b2K.up.sql"),
        ("2_bidi\u202elqs.pu.up.sql", "2_bidi\\u202elqs.pu.up.sql"),
        ("not a migration \x1b[31m.sql", "not a migration \\x1b[31m.sql"),
    ],
    ids=["escape", "carriage-return", "c1-csi", "bidi-override", "unparsable-name"],
)
def test_a_file_name_with_control_characters_is_refused_and_shown_escaped(estate: Estate, name: str, shown: str) -> None:
    estate.write("app", "1_start.up.sql", "SELECT 1;\n")
    estate.write("app", name, "SELECT 1;\n")

    run = estate.dbplan("validate")

    assert run.code == 1
    assert f"migrations/app/{shown}" in run.output
    assert "control or formatting characters" in run.output
    assert not any(char in run.output for char in "\x1b\r\x9b\u202e")


@pytest.mark.parametrize(
    ("sql", "shown"),
    [
        ("ALTER TABLE start ADD COLUMN c text;\nUPDATE start SET c = '\x1b[2K\x1b[1Aall good\r';\n", "\\x1b[2K\\x1b[1Aall good '"),
        ("SELECT 1;\n\x1b[2K;\n", "\\x1b"),
    ],
    ids=["lint-excerpt", "parse-error-quoting-the-escape"],
)
def test_what_a_file_holds_is_shown_escaped_in_the_plan(estate: Estate, sql: str, shown: str) -> None:
    _start(estate)
    estate.write("app", "2_noisy.up.sql", sql)

    run = estate.dbplan("plan")

    assert shown in run.output
    assert "\x1b" not in run.output and "\r" not in run.output


def test_a_servers_error_quoting_the_file_is_shown_escaped(estate: Estate) -> None:
    _start(estate)
    estate.write("app", "2_noisy.up.sql", "COPY start FROM stdin;\n\x1b[2K\x1b[1A\n\\.\n")

    run = estate.dbplan("apply", "--yes")

    assert run.code == 1
    assert 'invalid input syntax for type integer: "\\x1b[2K\\x1b[1A"' in run.err
    assert "\x1b" not in run.output


# --------------------------------------------------------------------------- item 19: allow lists


def test_an_unknown_rule_in_an_allow_comment_blocks_the_plan_and_suggests_one(estate: Estate) -> None:
    _start(estate)
    estate.write("app", "2_drop.up.sql", "ALTER TABLE start ADD COLUMN c int;\n-- dbplan:allow drop-colum\nALTER TABLE start DROP COLUMN c;\n")

    run = estate.dbplan("plan")

    assert run.code == 1
    assert "migrations/app/2_drop.up.sql:2: -- dbplan:allow names unknown rule 'drop-colum'; did you mean 'drop-column'?" in run.output


def test_an_unknown_rule_in_lint_allow_is_an_error_with_its_place(estate: Estate) -> None:
    estate.document["services"]["app"]["lint"] = {"allow": ["truncate", "create-index-concurrently"]}
    estate.save()
    estate.write("app", "1_start.up.sql", "SELECT 1;\n")

    run = estate.dbplan("validate")

    assert run.code == 1
    assert "services.app.lint.allow[1]" in run.output
    assert "unknown lint rule 'create-index-concurrently'; did you mean 'create-index-not-concurrently'?" in run.output


def test_the_rules_of_the_plans_own_warnings_can_be_allowed(estate: Estate) -> None:
    estate.document["services"]["app"]["lint"] = {"allow": ["missing-down"]}
    estate.save()
    estate.write("app", "1_start.up.sql", "-- dbplan:allow own-transaction\nBEGIN;\nSELECT 1;\nCOMMIT;\n")

    run = estate.dbplan("plan")

    assert run.code == 0, run.output
    assert "no down file" not in run.output and "manages its own transaction" not in run.output


# --------------------------------------------------------------------------- item 20: down files


def test_the_down_file_of_a_planned_revert_is_linted(estate: Estate) -> None:
    estate.write("app", "1_start.up.sql", "CREATE TABLE start (id int);\n")
    estate.write("app", "2_email.up.sql", "ALTER TABLE start ADD COLUMN email text;\n")
    estate.write("app", "2_email.down.sql", "SELECT 1;\nALTER TABLE start DROP COLUMN email;\n")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.document["services"]["app"]["target"] = 1
    estate.save()

    run = estate.dbplan("plan")

    assert run.code == 0, run.output
    assert "migrations/app/2_email.down.sql:2" in run.output
    assert "DROP COLUMN deletes start.email and its data for good" in run.output

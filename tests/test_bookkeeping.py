"""The bookkeeping a user (and golang-migrate) reads after an apply (execution/bookkeeping.py).

Found by the mutation benchmark (bench/mutate.py): mistakes in the bookkeeping's SQL that
the end-to-end tests let through, because each shows only in a situation they did not
build (a second apply into a named schema, versions above 2^31 in one batch, the exact
shape golang-migrate expects).
"""

from __future__ import annotations

import getpass
import hashlib
import socket
from pathlib import Path

import pytest
from estate import Estate

from orchestrator.execution import bookkeeping


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    return Estate(tmp_path, pg_url, dbname_prefix, capsys)


def _history(estate: Estate, table: str = "dbplan_history") -> list[tuple[object, ...]]:
    return estate.query("app", f"SELECT version, title, event FROM {table} ORDER BY id")


@pytest.mark.parametrize("precreated", [False, True], ids=["new-schema", "existing-schema"])
def test_a_service_with_its_own_schema_applies_again_and_again(estate: Estate, precreated: bool) -> None:
    estate.add_app(schema="meta", table="versions")
    if precreated:  # the database exists, and someone made the schema before dbplan's first migration
        assert estate.dbplan("apply", "--yes").code == 0
        estate.execute("app", "DROP SCHEMA IF EXISTS meta CASCADE; CREATE SCHEMA meta")
    estate.write("app", "1_first.up.sql", "CREATE TABLE first (id int);")
    first = estate.dbplan("apply", "--yes")
    assert first.code == 0, first.output
    for version in (2, 3):
        estate.write("app", f"{version}_next.up.sql", f"CREATE TABLE t{version} (id int);")
        again = estate.dbplan("apply", "--yes")
        assert again.code == 0, again.output
    assert estate.query("app", "SELECT version, dirty FROM meta.versions") == [(3, False)]
    assert [row[0] for row in _history(estate, "meta.versions_history") if row[2] == "apply"][-3:] == [1, 2, 3]
    assert "versions" not in estate.tables("app")  # nothing in public


QUOTED = '"Team ""A"""'
SEARCH_PATH_TO_QUOTED = (
    "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET search_path = %I', current_database(), 'Team \"A\"'); END $$"
)


def test_bookkeeping_in_a_schema_whose_name_needs_quotes_is_found_there_again(estate: Estate) -> None:
    # The database's search_path puts the bookkeeping in 'Team "A"' (golang-migrate's
    # current_schema()); the catalog read that finds it again prints the name quoted.
    estate.add_app()
    assert estate.dbplan("apply", "--yes").code == 0  # the database, nothing to migrate yet
    estate.execute("app", f"CREATE SCHEMA {QUOTED}; " + SEARCH_PATH_TO_QUOTED)
    estate.write("app", "1_first.up.sql", "CREATE TABLE public.first (id int);")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.write("app", "2_second.up.sql", "CREATE TABLE public.second (id int);")
    planned = estate.dbplan("plan")
    assert planned.code == 0 and "at 1 -> 2" in planned.out, planned.output
    again = estate.dbplan("apply", "--yes")
    assert again.code == 0 and "Apply complete: 1 done." in again.out, again.output
    assert estate.query("app", f"SELECT version, dirty FROM {QUOTED}.schema_migrations") == [(2, False)]
    assert "schema_migrations" not in estate.tables("app")  # nothing in public


def test_timestamp_versions_apply_end_to_end_in_one_batch_and_revert(estate: Estate) -> None:
    """Versions like 20240101120000 do not fit in an integer: every statement must take a bigint."""
    estate.add_app()
    versions = [20240101120000 + minute * 100 for minute in range(5)]
    for version in versions:
        estate.write("app", f"{version}_m.up.sql", f"CREATE TABLE t{version} (id int);")
        estate.write("app", f"{version}_m.down.sql", f"DROP TABLE t{version};")
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(versions[-1], False)]
    assert [row[0] for row in _history(estate)] == versions
    estate.add_service("app", "app", target=versions[2])
    back = estate.dbplan("apply", "--yes")
    assert back.code == 0, back.output
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(versions[2], False)]
    assert [(row[0], row[2]) for row in _history(estate)][-2:] == [(versions[4], "revert"), (versions[3], "revert")]


def test_the_tables_have_golang_migrates_shape_and_the_documented_history(estate: Estate) -> None:
    estate.add_app()
    estate.write("app", "1_first.up.sql", "CREATE TABLE first (id int);")
    assert estate.dbplan("apply", "--yes").code == 0
    columns = """SELECT column_name, data_type, is_nullable, column_default IS NOT NULL
                 FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s
                 ORDER BY ordinal_position"""
    assert estate.query("app", columns, ("schema_migrations",)) == [
        ("version", "bigint", "NO", False),
        ("dirty", "boolean", "NO", False),
    ]
    assert estate.query("app", columns, ("dbplan_history",)) == [
        ("id", "bigint", "NO", True),
        ("version", "bigint", "NO", False),
        ("title", "text", "YES", False),
        ("checksum", "text", "YES", False),
        ("event", "text", "NO", False),
        ("applied_at", "timestamp with time zone", "NO", True),
        ("duration_ms", "integer", "YES", False),
        ("applied_by", "text", "YES", False),
        ("reason", "text", "YES", False),
    ]
    primary_keys = """SELECT c.relname, a.attname FROM pg_constraint k
                      JOIN pg_class c ON c.oid = k.conrelid
                      JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = ANY (k.conkey)
                      WHERE k.contype = 'p' AND c.relname IN ('schema_migrations', 'dbplan_history') ORDER BY 1"""
    assert estate.query("app", primary_keys) == [("dbplan_history", "id"), ("schema_migrations", "version")]


def test_each_apply_records_who_what_and_which_file(estate: Estate) -> None:
    estate.add_app()
    files = {f"{v}_step_{v}.up.sql": f"CREATE TABLE t{v} (id int);" for v in (1, 2, 3)}
    for name, sql in files.items():
        estate.write("app", name, sql)
    assert estate.dbplan("apply", "--yes").code == 0
    rows = estate.query("app", "SELECT version, title, checksum, event, applied_by, reason, duration_ms >= 0 FROM dbplan_history ORDER BY id")
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    assert rows == [
        (v, f"step_{v}", hashlib.sha256(sql.encode()).hexdigest(), "apply", who, None, True)
        for v, sql in zip((1, 2, 3), files.values())
    ]


def test_applied_by_says_unknown_when_the_user_cannot_be_found(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_user() -> str:
        raise KeyError("uid 12345 has no name")

    bookkeeping.applied_by.cache_clear()
    monkeypatch.setattr(getpass, "getuser", no_user)
    try:
        assert bookkeeping.applied_by() == f"unknown@{socket.gethostname()}"
    finally:
        bookkeeping.applied_by.cache_clear()


def test_an_out_of_order_file_applied_without_a_version_row_keeps_the_highest_version(estate: Estate) -> None:
    """schema_migrations lost its row (someone emptied it); history says 1 and 3 ran: 2 comes
    in late, with 4 and 5 behind it in one batch. The row must come back as the highest."""
    estate.add_app(allow_out_of_order=True)
    for version in (1, 3):
        estate.write("app", f"{version}_m.up.sql", f"CREATE TABLE t{version} (id int);")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.execute("app", "DELETE FROM schema_migrations")
    for version in (2, 4, 5):
        estate.write("app", f"{version}_m.up.sql", f"CREATE TABLE t{version} (id int);")
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(5, False)]
    assert [row[0] for row in _history(estate)] == [1, 3, 2, 4, 5]


def test_an_out_of_order_file_that_recreates_the_version_row_is_right_even_if_the_next_fails(estate: Estate) -> None:
    """As above, but the migration after the late one fails: what stays is the late one's
    own bookkeeping, which must name the highest applied version (3), not its own (2)."""
    estate.add_app(allow_out_of_order=True)
    for version in (1, 3):
        estate.write("app", f"{version}_m.up.sql", f"CREATE TABLE t{version} (id int);")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.execute("app", "DELETE FROM schema_migrations")
    estate.write("app", "2_m.up.sql", "CREATE TABLE t2 (id int);")
    estate.write("app", "4_broken.up.sql", "SELECT * FROM nowhere;")
    run = estate.dbplan("apply", "--yes")
    assert run.code == 1, run.output
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(3, False)]
    assert [row[0] for row in _history(estate)] == [1, 3, 2]


def test_a_migration_after_a_batch_finds_no_statement_of_dbplan_prepared_in_its_session(estate: Estate) -> None:
    """The batch's prepared bookkeeping is deallocated when the batch ends: a later file in
    the same session (here a no-transaction one) sees no leftover of dbplan's."""
    estate.add_app()
    for version in (1, 2, 3):
        estate.write("app", f"{version}_m.up.sql", f"CREATE TABLE t{version} (id int);")
    estate.write(
        "app",
        "4_look.up.sql",
        "-- dbplan:no-transaction\nCREATE TABLE seen AS SELECT name FROM pg_prepared_statements;\n",
    )
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    assert estate.query("app", "SELECT name FROM seen") == []

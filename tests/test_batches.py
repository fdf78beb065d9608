"""Consecutive transactional migrations share round trips (orchestrator/batches.py).

What a user must not be able to tell, apart from the speed: each migration is still its
own transaction with its own bookkeeping, a failure in the middle of a batch keeps what
came before it and names its own file and line, and the durations are each migration's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from estate import Estate
from processes import Finished, start_dbplan, wait_until
from tcpproxy import TcpProxy


def _app_estate(tmp_path: Path, url: str, prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    estate = Estate(tmp_path, url, prefix, capsys)
    estate.add_app()
    return estate


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    return _app_estate(tmp_path, pg_url, dbname_prefix, capsys)


@pytest.fixture
def estate_any(tmp_path: Path, pg_any_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    """On each PostgreSQL major the suite runs."""
    return _app_estate(tmp_path, pg_any_url, dbname_prefix, capsys)


# Sleeps only in the runs that set the setting (through PGOPTIONS), so replays and later runs are quick.
SLEEP = "SELECT pg_sleep(coalesce(current_setting('dbplan_test.sleep', true), '0')::float8);\n"


def _table(version: int) -> str:
    return f"CREATE TABLE t{version} (id int PRIMARY KEY);\nINSERT INTO t{version} VALUES ({version});\n"


def _write_tables(estate: Estate, versions: range, special: dict[int, str] | None = None) -> None:
    for version in versions:
        sql = (special or {}).get(version, _table(version))
        estate.write("app", f"{version:04d}_m{version}.up.sql", sql)


def _applied(estate: Estate) -> list[int]:
    return [v for (v,) in estate.query("app", "SELECT version FROM dbplan_history WHERE event = 'apply' ORDER BY id")]


def test_many_migrations_of_every_kind_each_run_once_in_order(estate: Estate) -> None:
    special = {
        40: "BEGIN;\n" + _table(40) + "COMMIT;\n",  # wraps itself: dbplan's transaction replaces its own
        41: "-- only a comment: a no-op that is still recorded\n",
        80: "-- dbplan:no-transaction\nCREATE INDEX CONCURRENTLY t79_id ON t79 (id);\n",
        81: "BEGIN ISOLATION LEVEL SERIALIZABLE;\n" + _table(81) + "END;\n",
    }
    versions = range(1, 151)
    _write_tables(estate, versions, special)

    run = estate.dbplan("apply", "--yes")

    assert run.code == 0, run.output
    assert _applied(estate) == list(versions)
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(150, False)]
    tables = estate.tables("app")
    assert all(f"t{v}" in tables for v in versions if v not in (41, 80))
    assert estate.query("app", "SELECT indisvalid FROM pg_index WHERE indexrelid = 't79_id'::regclass") == [(True,)]
    assert run.err.count(": done in ") == 151  # the database, then every migration
    assert "[151/151] apply app 150 m150: done in" in run.err
    assert estate.dbplan("plan", "--detailed-exitcode").code == 0


@pytest.mark.parametrize(
    ("failing_sql", "line", "message"),
    [
        # PostgreSQL gives a position: the line comes from it, counted inside the batch.
        ("CREATE TABLE t7 (id int);\n\nINSERT INTO nowhere VALUES (1);\n", 3, 'relation "nowhere" does not exist (SQLSTATE 42P01)'),
        # No position: the file is replayed alone, statement by statement, and rolled back.
        ("CREATE TABLE t7 (id int);\nSELECT 1;\nSELECT 1 / 0;\n", 3, "division by zero (SQLSTATE 22012)"),
    ],
    ids=["with-position", "without-position"],
)
def test_a_failure_inside_a_batch_keeps_what_ran_before_it_and_names_its_line(
    estate: Estate, failing_sql: str, line: int, message: str
) -> None:
    # Batches grow 1, 2, 4: version 7 is the last of the batch 4-7, after three that commit.
    _write_tables(estate, range(1, 13), {7: failing_sql})

    run = estate.dbplan("apply", "--yes")

    assert run.code == 1
    assert f"migrations/app/0007_m7.up.sql:{line}: {message}" in run.err
    assert "nothing of it is left in the database" in run.err
    assert "[7/13] apply app 6 m6: done in" in run.err  # the database is action 1
    assert "[8/13] apply app 7 m7: FAILED" in run.err
    assert _applied(estate) == [1, 2, 3, 4, 5, 6]
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(6, False)]
    tables = estate.tables("app")
    assert {f"t{v}" for v in range(1, 7)} <= tables
    assert not tables & {f"t{v}" for v in range(7, 13)}

    estate.write("app", "0007_m7.up.sql", _table(7))
    assert estate.dbplan("apply", "--yes").code == 0
    assert _applied(estate) == list(range(1, 13))


def test_a_later_file_this_server_cannot_parse_fails_as_its_own_after_those_before_it(estate_any: Estate) -> None:
    """A file the parser dbplan ships reads (newer PostgreSQL syntax) but an older server
    refuses: the server refuses the whole query before running any of it, so dbplan runs
    the files before it, then that file, which fails with its own line."""
    estate = estate_any
    with psycopg.connect(estate.url) as conn:
        if conn.info.server_version >= 170000:
            pytest.skip("JSON_TABLE is valid SQL from PostgreSQL 17 on")
    json_table = "SELECT *\nFROM JSON_TABLE('[1]'::jsonb, '$[*]' COLUMNS (a int PATH '$')) AS jt;\n"
    _write_tables(estate, range(1, 9), {6: _table(6) + json_table})  # in the batch 4-7

    run = estate.dbplan("apply", "--yes")

    assert run.code == 1
    assert "migrations/app/0006_m6.up.sql:4: syntax error" in run.err
    assert "(SQLSTATE 42601)" in run.err
    assert _applied(estate) == [1, 2, 3, 4, 5]
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(5, False)]
    assert "t6" not in estate.tables("app")


def test_each_migration_in_a_batch_keeps_its_own_duration_and_start(estate: Estate) -> None:
    # Version 2 sleeps first in the batch 2-3; version 3, after it in the same query, does not.
    # (The server's now() is when the query arrived: the same for both.)
    _write_tables(estate, range(1, 5), {2: _table(2) + "SELECT pg_sleep(0.3);\n"})

    run = estate.dbplan("apply", "--yes")

    assert run.code == 0, run.output
    rows = estate.query("app", "SELECT version, duration_ms, applied_at FROM dbplan_history WHERE event = 'apply'")
    durations = {version: duration for version, duration, _ in rows}
    started = {version: applied_at for version, _, applied_at in rows}
    assert durations[2] >= 300
    assert durations[3] < 300
    assert (started[3] - started[2]).total_seconds() >= 0.3
    shown = {line.split(" m", 1)[1].split(":")[0]: line for line in run.err.splitlines() if " apply app " in line}
    assert int(shown["2"].rsplit("done in ", 1)[1].split()[0]) == durations[2]


def _sleeping_query(url: str) -> tuple[object, str] | None:
    """When the dbplan session sleeps right now: its query's start, and text (the first 1 kB)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT query_start, query FROM pg_stat_activity WHERE application_name = 'dbplan' AND wait_event = 'PgSleep'"
        ).fetchone()
    return (row[0], str(row[1])) if row else None


def test_quick_migrations_travel_together_and_a_slow_one_ends_its_batch(estate: Estate) -> None:
    """Version 7 sleeps in a query that begins with version 4: the batch 4-7. After that
    slow batch each next one holds a single migration: 8 and 9 sleep in queries of their own."""
    _write_tables(estate, range(1, 11), {v: SLEEP + _table(v) for v in (7, 8, 9)})

    process = start_dbplan(estate.plan_file, "apply", "--yes", env={"PGOPTIONS": "-c dbplan_test.sleep=0.5"})
    seen = []
    for version in (7, 8, 9):
        seen.append(wait_until(lambda: _sleeping_query(estate.url), what=f"version {version}'s sleep"))
        wait_until(lambda: estate.query("app", f"SELECT 1 FROM dbplan_history WHERE version = {version}"))
    run = process.finish(timeout=30)

    assert run.code == 0, run.err
    (_, seventh), (eighth_started, eighth), (ninth_started, _) = seen  # type: ignore[misc]
    assert seventh.startswith("BEGIN;") and "CREATE TABLE t4 " in seventh and "CREATE TABLE t3 " not in seventh
    assert eighth.startswith("BEGIN;") and "CREATE TABLE t7 " not in eighth
    assert ninth_started != eighth_started
    assert _applied(estate) == list(range(1, 11))


def test_a_file_that_deallocates_prepared_statements_does_not_break_the_bookkeeping(estate: Estate) -> None:
    """The bookkeeping goes as a statement prepared once per run; a file that runs
    DEALLOCATE ALL (or one the parser cannot read) makes the rest go as plain statements.
    A file that runs RESET ALL drops the mark of its own start: it is still timed."""
    special = {
        3: _table(3) + "RESET ALL;\n",
        5: _table(5) + "DEALLOCATE ALL;\n",
        9: _table(9) + "ALTER TABLE schema_migrations ADD COLUMN note text DEFAULT 'kept';\n",
    }
    _write_tables(estate, range(1, 13), special)

    run = estate.dbplan("apply", "--yes")

    assert run.code == 0, run.output
    assert _applied(estate) == list(range(1, 13))
    assert estate.query("app", "SELECT version, dirty, note FROM schema_migrations") == [(12, False, "kept")]
    durations = estate.query("app", "SELECT count(*) FROM dbplan_history WHERE duration_ms IS NULL OR applied_at IS NULL")
    assert durations == [(0,)]


def test_a_server_that_ends_the_session_inside_a_batch_names_the_migration_it_ran(estate: Estate) -> None:
    """The server says why it ends a session before it closes it: the results that came
    before say exactly which migrations of the batch committed."""
    _write_tables(estate, range(1, 11), {7: _table(7) + SLEEP})  # the batch 4-7

    process = start_dbplan(estate.plan_file, "apply", "--yes", env={"PGOPTIONS": "-c dbplan_test.sleep=5"})
    wait_until(lambda: _sleeping_query(estate.url), what="version 7's sleep")
    with psycopg.connect(estate.url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event = 'PgSleep'")
    run = process.finish(timeout=30)

    assert run.code == 1
    assert "[7/11] apply app 6 m6: done in" in run.err and "[8/11] apply app 7 m7: FAILED" in run.err
    assert (
        "lost the connection to server 'main' while running migrations/app/0007_m7.up.sql (service 'app', "
        "version 7): terminating connection due to administrator command"
    ) in run.err
    assert _applied(estate) == [1, 2, 3, 4, 5, 6]
    assert estate.dbplan("apply", "--yes").code == 0
    assert _applied(estate) == list(range(1, 11))


@contextmanager
def _through_a_proxy(estate: Estate) -> Iterator[TcpProxy]:
    """The plan file's server reached through a TCP proxy that can cut connections."""
    parts = urlsplit(estate.url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    proxy.start()
    estate.document["servers"]["main"]["url"] = estate.url.replace(f":{parts.port}/", f":{proxy.port}/")
    estate.save()
    try:
        yield proxy
    finally:
        proxy.close()
        estate.document["servers"]["main"]["url"] = estate.url
        estate.save()


def _apply_cut_while_a_migration_sleeps(estate: Estate) -> Finished:
    """``dbplan apply`` through a proxy whose connections are cut while a migration sleeps."""
    with _through_a_proxy(estate) as proxy:
        process = start_dbplan(estate.plan_file, "apply", "--yes", env={"PGOPTIONS": "-c dbplan_test.sleep=1"})
        wait_until(lambda: _sleeping_query(estate.url), what="a migration's sleep")
        proxy.cut()
        return process.finish(timeout=30)


def test_a_network_cut_inside_a_batch_says_what_may_have_happened(estate: Estate) -> None:
    """Cut without a word from the server, dbplan cannot know which migrations of the batch
    committed, and says so; the database stays consistent, and the next run goes on."""
    _write_tables(estate, range(1, 11), {7: _table(7) + SLEEP})  # the batch 4-7
    run = _apply_cut_while_a_migration_sleeps(estate)

    assert run.code == 1
    assert "lost the connection to server 'main' while it ran versions 4 to 7 of service 'app' in one batch" in run.err
    assert "dbplan status" in run.err
    assert "internal error" not in run.err
    wait_until(lambda: not _sleeping_query(estate.url), what="the server to finish the batch")
    applied = _applied(estate)
    assert applied in ([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7])  # 7 may have finished on the server
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(applied[-1], False)]

    assert estate.dbplan("apply", "--yes").code == 0
    assert _applied(estate) == list(range(1, 11))


def test_a_network_cut_during_a_lone_migration_does_not_claim_it_was_rolled_back(estate: Estate) -> None:
    _write_tables(estate, range(1, 3), {1: _table(1) + SLEEP})  # the first batch holds version 1 alone
    run = _apply_cut_while_a_migration_sleeps(estate)

    assert run.code == 1
    assert "lost the connection to server 'main' while running migrations/app/0001_m1.up.sql" in run.err
    assert "broke without a word from the server, which may still have finished the migration" in run.err
    assert "rolled the migration back" not in run.err

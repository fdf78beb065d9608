"""Crashes, signals and a server that goes away (issue "Nothing lost, nothing twice").

``dbplan apply`` is killed with SIGKILL at many moments of a run (deterministic kill
points: the executor's DBPLAN_TEST_KILL_AT hook); after each, the database must hold no
half-recorded migration, and the next ``dbplan apply`` must finish the job with every
migration applied exactly once. SIGINT and SIGTERM stop a run cleanly; a server that
terminates dbplan's session gives a clear error and the next run resumes.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from estate import Estate
from pgcluster import drop_databases_with_prefix
from processes import ForkServer, dbplan_backends, start_dbplan, wait_until

SERVICES = ("alpha", "beta")
VERSIONS = range(1, 9)
NO_TRANSACTION_VERSION = 5  # alpha's index migration, run statement by statement
SLOW_VERSION = 3  # alpha's migration that sleeps, to be killed while it runs
# beta's sleeping migration, in the middle of a batch: beta's migrations travel several to a
# round trip (1, 2-3, 4-7, 8), so a kill while 6 sleeps finds 4 and 5 committed, 7 not begun.
SLOW_IN_BATCH = ("beta", 6)
# The sleeps read a setting that only the runs to be killed in them set (through PGOPTIONS),
# so every other run, dozens of them, goes at full speed.
SLEEP = "SELECT pg_sleep(coalesce(current_setting('dbplan_test.sleep', true), '0')::float8);\n"
SLEEP_SECONDS = "0.3"


@dataclass(frozen=True)
class KillPoint:
    spec: str  # DBPLAN_TEST_KILL_AT: event:n[:ms]
    fresh: bool = False  # start with no roles and databases: the creation phase is under test
    dirty: bool = False  # inside alpha's no-transaction migration: leaves alpha dirty at it
    slow: bool = False  # the sleeping statements sleep (SLEEP_SECONDS) in this run, to be killed in them

    def __str__(self) -> str:
        return self.spec


# In a fresh run: the server lock (locked 1), two roles and two databases (create/created
# 1-4), alpha's lock (locked 2) and bookkeeping (prepared 1), its migrations (migration
# 1-4, then the no-transaction one: marked_dirty, statement 1-3, then migration 5-7),
# beta's lock (locked 3), bookkeeping (prepared 2) and migrations (migration 8-15).
# Without creations the locks are alpha's (locked 1) and beta's (locked 2).
# "migrated n" follows the n-th migration of either kind (alpha's index is migrated 5).
KILL_POINTS = [
    KillPoint("locked:1", fresh=True),
    KillPoint("create:1", fresh=True),
    KillPoint("created:1", fresh=True),
    KillPoint("create:2", fresh=True),
    KillPoint("created:2", fresh=True),
    KillPoint("create:3", fresh=True),
    KillPoint("create:3:15", fresh=True),  # while CREATE DATABASE runs
    KillPoint("created:3", fresh=True),
    KillPoint("create:4:15", fresh=True),
    KillPoint("created:4", fresh=True),
    KillPoint("locked:2", fresh=True),
    KillPoint("prepared:1", fresh=True),
    KillPoint("migration:1", fresh=True),
    KillPoint("locked:1"),
    KillPoint("prepared:1"),
    KillPoint("migration:1"),
    KillPoint("migrated:1"),
    KillPoint("migration:2"),
    KillPoint("migration:3:150", slow=True),  # while version 3 sleeps, inside its transaction
    KillPoint("migrated:3"),
    KillPoint("migration:4"),
    KillPoint("migrated:4"),
    KillPoint("marked_dirty:1", dirty=True),  # first bookkeeping step of the no-transaction path done
    KillPoint("statement:1", dirty=True),
    KillPoint("statement:1:100", dirty=True, slow=True),  # while a no-transaction statement runs
    KillPoint("statement:2", dirty=True),
    KillPoint("statement:3", dirty=True),  # every statement done, the second bookkeeping step not
    KillPoint("migrated:5"),
    KillPoint("migration:5"),
    KillPoint("migrated:8"),
    KillPoint("locked:2"),
    KillPoint("prepared:2"),
    KillPoint("migration:8"),
    KillPoint("migration:13:150", slow=True),  # while beta 6 sleeps, inside a batch (SLOW_IN_BATCH)
    KillPoint("migrated:12"),
    KillPoint("migration:15"),
    KillPoint("migrated:16"),  # the very end: everything recorded, nothing left to do
]


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    return Estate(tmp_path, pg_url, dbname_prefix, capsys)


def _crash_estate(estate: Estate) -> None:
    estate.add_role("alpha_svc", password="alpha-secret")
    estate.add_role("beta_svc")
    estate.add_database("alpha", owner="alpha_svc")
    estate.add_database("beta", owner="beta_svc")
    estate.add_service("alpha", "alpha")
    estate.add_service("beta", "beta", depends_on=["alpha"])
    for service in SERVICES:
        for version in VERSIONS:
            if service == "alpha" and version == NO_TRANSACTION_VERSION:
                # Idempotent, as a no-transaction migration should be: after a crash it is run again.
                sql = (
                    "-- dbplan:no-transaction\n"
                    "CREATE INDEX CONCURRENTLY IF NOT EXISTS alpha_t1_a ON alpha_t1 (id);\n"
                    + SLEEP
                    +                     "CREATE INDEX CONCURRENTLY IF NOT EXISTS alpha_t1_b ON alpha_t1 (id);\n"
                )
            else:
                slow = (service, version) in (("alpha", SLOW_VERSION), SLOW_IN_BATCH)
                pause = SLEEP if slow else ""
                sql = f"CREATE TABLE {service}_t{version} (id int PRIMARY KEY);\n{pause}INSERT INTO {service}_t{version} VALUES ({version});\n"
            estate.write(service, f"{version:03d}_{service}_{version}.up.sql", sql)


def _transactional(service: str) -> list[int]:
    return [v for v in VERSIONS if not (service == "alpha" and v == NO_TRANSACTION_VERSION)]


def _wait_for_sessions_to_end(url: str) -> None:
    """A killed client's backend runs on until its query ends: wait, so that what we read is final."""
    wait_until(lambda: not dbplan_backends(url), timeout=30, what="the killed run's sessions to end")


def _check_nothing_half_done(estate: Estate, point: KillPoint) -> None:
    for service in SERVICES:
        if not estate.database_exists(service):
            continue
        tables = estate.tables(service)
        if "dbplan_history" not in tables:
            assert not any(t.startswith(f"{service}_t") for t in tables), f"{point}: {service} ran unrecorded"
            continue
        applied = dict(
            estate.query(service, "SELECT version, count(*) FROM dbplan_history WHERE event = 'apply' GROUP BY version")
        )
        assert all(count == 1 for count in applied.values()), f"{point}: {service} applied twice: {applied}"
        for version in _transactional(service):
            table_there = f"{service}_t{version}" in tables
            assert table_there == (version in applied), f"{point}: {service} {version} half done"
        rows = estate.query(service, "SELECT version, dirty FROM schema_migrations")
        if point.dirty and service == "alpha":
            assert rows == [(NO_TRANSACTION_VERSION, True)], f"{point}: {rows}"
            assert NO_TRANSACTION_VERSION not in applied
        else:
            assert rows == ([(max(applied), False)] if applied else []), f"{point}: {service} {rows}, {applied}"


def _recover(estate: Estate, point: KillPoint) -> None:
    if point.dirty:
        refused = estate.dbplan("apply", "--yes")
        assert refused.code == 1
        assert f"dirty at version {NO_TRANSACTION_VERSION}" in refused.out
        # What a person does: drop what the half-run left broken, then run the migration again.
        for (index,) in estate.query("alpha", "SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid"):
            estate.execute("alpha", f"DROP INDEX {index}")
        forced = estate.dbplan("force", "alpha", str(NO_TRANSACTION_VERSION - 1), "--reason", f"crash test at {point}")
        assert forced.code == 0, forced.output
    recovered = estate.dbplan("apply", "--yes")
    assert recovered.code == 0, f"{point}: {recovered.output}"


def _check_complete(estate: Estate, point: KillPoint) -> None:
    for service in SERVICES:
        applied = estate.query(
            service, "SELECT version, count(*) FROM dbplan_history WHERE event = 'apply' GROUP BY version ORDER BY version"
        )
        assert applied == [(v, 1) for v in VERSIONS], f"{point}: {service} {applied}"
        assert estate.query(service, "SELECT version, dirty FROM schema_migrations") == [(max(VERSIONS), False)]
        counts = estate.query(service, " UNION ALL ".join(f"SELECT count(*) FROM {service}_t{v}" for v in _transactional(service)))
        assert all(count == (1,) for count in counts), f"{point}: {service} {counts}"
    indexes = estate.query("alpha", "SELECT indexrelid::regclass::text, indisvalid FROM pg_index WHERE indrelid = 'alpha_t1'::regclass ORDER BY 1")
    assert indexes == [("alpha_t1_a", True), ("alpha_t1_b", True), ("alpha_t1_pkey", True)], f"{point}: {indexes}"


def _reset(estate: Estate, point: KillPoint) -> None:
    if point.fresh:
        drop_databases_with_prefix(estate.url, estate.prefix)
        return
    for service in SERVICES:  # keep roles and databases, forget every migration
        estate.execute(service, f'DROP OWNED BY "{estate.name(service + "_svc")}"')


@pytest.fixture
def forks(tmp_path: Path) -> Iterator[ForkServer]:
    server = ForkServer(tmp_path)
    yield server
    server.close()


def test_sigkill_at_every_moment_then_the_next_run_finishes_the_job(estate: Estate, forks: ForkServer) -> None:
    _crash_estate(estate)
    assert len(KILL_POINTS) >= 30
    killed = []
    for point in KILL_POINTS:
        _reset(estate, point)
        env = {"DBPLAN_TEST_KILL_AT": point.spec}
        if point.slow:
            env["PGOPTIONS"] = f"-c dbplan_test.sleep={SLEEP_SECONDS}"
        run = forks.run(estate.plan_file, "apply", "--yes", env=env)
        assert run.code == -signal.SIGKILL, f"{point} was never reached: the run ended with {run.code}\n{run.err}"
        killed.append(point.spec)
        _wait_for_sessions_to_end(estate.url)
        _check_nothing_half_done(estate, point)
        _recover(estate, point)
        _check_complete(estate, point)
    assert len(killed) == len({(point.spec, point.fresh) for point in KILL_POINTS}) == len(KILL_POINTS)


# ---------------------------------------------------------------------------
# SIGINT and SIGTERM


def _app_estate(estate: Estate, second: str) -> None:
    estate.add_app()
    estate.write("app", "1_first.up.sql", "CREATE TABLE first (id int);")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.write("app", "2_slow.up.sql", second)
    estate.write("app", "3_third.up.sql", "CREATE TABLE third (id int);")


def test_sigterm_cancels_a_transactional_migration_in_flight_and_rolls_it_back(estate: Estate) -> None:
    _app_estate(estate, "CREATE TABLE second (id int);\nSELECT pg_sleep(30);\n")
    process = start_dbplan(estate.plan_file, "apply", "--yes")
    wait_until(lambda: dbplan_backends(estate.url, "%pg_sleep(30)%"), what="the slow migration")
    signalled = time.monotonic()
    process.signal(signal.SIGTERM)
    run = process.finish(timeout=30)

    assert time.monotonic() - signalled < 10, "the query was cancelled, not waited for"
    assert run.code == 128 + signal.SIGTERM
    assert "received SIGTERM: cancelling migrations/app/2_slow.up.sql (version 2); it is rolled back" in run.err
    assert re.search(r"error: SIGTERM: cancelled migrations/app/2_slow\.up\.sql .* it was rolled back, nothing of it is left", run.err)
    assert "run 'dbplan apply' again" in run.err
    assert "second" not in estate.tables("app") and "third" not in estate.tables("app")
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(1, False)]
    assert estate.query("app", "SELECT count(*) FROM dbplan_history WHERE version = 2") == [(0,)]

    estate.write("app", "2_slow.up.sql", "CREATE TABLE second (id int);\n")  # not applied: may change
    assert estate.dbplan("apply", "--yes").code == 0
    assert {"second", "third"} <= estate.tables("app")


def test_first_sigint_lets_a_no_transaction_migration_finish_then_stops_between_migrations(estate: Estate) -> None:
    _app_estate(estate, "-- dbplan:no-transaction\nSELECT pg_sleep(1.5);\nCREATE TABLE second (id int);\n")
    process = start_dbplan(estate.plan_file, "apply", "--yes")
    wait_until(lambda: dbplan_backends(estate.url, "%pg_sleep(1.5)%"), what="the no-transaction migration")
    process.signal(signal.SIGINT)
    run = process.finish(timeout=30)

    assert run.code == 128 + signal.SIGINT
    assert "received SIGINT: letting migrations/app/2_slow.up.sql (version 2) finish" in run.err
    assert "send SIGINT again to cancel it" in run.err
    assert "apply app 2 slow: done" in run.err
    assert "error: SIGINT: stopped before applying version 3 of service 'app'" in run.err
    assert "nothing is half done" in run.err
    assert "second" in estate.tables("app") and "third" not in estate.tables("app")
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(2, False)]

    assert estate.dbplan("apply", "--yes").code == 0
    assert "third" in estate.tables("app")


def test_second_sigint_cancels_a_no_transaction_migration_and_says_the_service_is_dirty(estate: Estate) -> None:
    _app_estate(estate, "-- dbplan:no-transaction\nCREATE TABLE second (id int);\nSELECT pg_sleep(30);\n")
    process = start_dbplan(estate.plan_file, "apply", "--yes")
    wait_until(lambda: dbplan_backends(estate.url, "%pg_sleep(30)%"), what="the no-transaction migration")
    process.signal(signal.SIGINT)
    process.wait_for("send SIGINT again to cancel it")
    process.signal(signal.SIGINT)
    run = process.finish(timeout=30)

    assert run.code == 128 + signal.SIGINT
    assert "received SIGINT again: cancelling migrations/app/2_slow.up.sql (version 2); the service will be left dirty" in run.err
    assert "service 'app' is now dirty at version 2" in run.err
    assert "dbplan force app" in run.err
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(2, True)]
    assert "second" in estate.tables("app")  # the statement before the cancelled one stays: that is "dirty"
    refused = estate.dbplan("apply", "--yes")
    assert refused.code == 1 and "dirty at version 2" in refused.out


def test_sigterm_while_waiting_for_the_lock_stops_without_changing_anything(estate: Estate) -> None:
    from orchestrator.live.locks import migrations_lock_key

    _app_estate(estate, "CREATE TABLE second (id int);\n")
    key = migrations_lock_key(estate.name("app"), "public", "schema_migrations")
    with psycopg.connect(estate.url, dbname=estate.name("app"), autocommit=True, application_name="blocker") as blocker:
        blocker.execute("SELECT pg_advisory_lock(%s::bigint)", (key,))
        process = start_dbplan(estate.plan_file, "apply", "--yes")
        process.wait_for("waiting for the lock on the migrations of service 'app'")
        process.signal(signal.SIGTERM)
        run = process.finish(timeout=30)
    assert run.code == 128 + signal.SIGTERM
    assert "error: SIGTERM: stopped while waiting for the lock on the migrations of service 'app'" in run.err
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(1, False)]


# ---------------------------------------------------------------------------
# The server goes away


def test_terminated_session_mid_migration_gives_a_clear_error_and_the_next_run_resumes(estate: Estate) -> None:
    _app_estate(estate, "CREATE TABLE second (id int);\nSELECT pg_sleep(5);\n")
    process = start_dbplan(estate.plan_file, "apply", "--yes")
    pid, _state, _query = wait_until(
        lambda: dbplan_backends(estate.url, "%pg_sleep(5)%"), what="the slow migration"
    )[0]  # type: ignore[index]
    with psycopg.connect(estate.url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    run = process.finish(timeout=30)

    assert run.code == 1
    assert (
        "lost the connection to server 'main' while running migrations/app/2_slow.up.sql "
        "(service 'app', version 2): terminating connection due to administrator command"
    ) in run.err
    assert "nothing of it is recorded or left" in run.err
    assert "internal error" not in run.err
    assert "second" not in estate.tables("app")
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(1, False)]
    assert estate.query("app", "SELECT count(*) FROM dbplan_history WHERE version = 2") == [(0,)]

    estate.write("app", "2_slow.up.sql", "CREATE TABLE second (id int);\n")
    resumed = estate.dbplan("apply", "--yes")
    assert resumed.code == 0, resumed.output
    assert {"second", "third"} <= estate.tables("app")

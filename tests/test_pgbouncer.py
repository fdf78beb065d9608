"""Through PgBouncer in transaction pooling mode (issue "Nothing lost, nothing twice").

A session advisory lock protects nothing there: each transaction may run on another
server connection, and a lock left on one blocks every client of the pool. dbplan sees
the pooler (the backend pid it was told at connection time is not its backend's), takes
a transaction-level lock in every transaction instead, and checks that the bookkeeping
is still what it planned from. What cannot run in a transaction is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from estate import Estate
from pgbouncer import PgBouncer, find_pgbouncer
from processes import assert_applied_exactly_once, finish, race_estate, start_dbplan

PROCESSES = 8


@pytest.fixture(scope="module")
def bouncer(pg_url: str) -> Iterator[PgBouncer]:
    binary = find_pgbouncer()
    if binary is None:
        pytest.skip("pgbouncer is not installed (CI's .ci/run installs it: apt-get install pgbouncer)")
    pooler = PgBouncer(binary, pg_url, pool_mode="transaction")
    yield pooler
    pooler.stop()


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str], bouncer: PgBouncer) -> Estate:
    """An estate whose plan file reaches the cluster only through PgBouncer; queries go direct."""
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    estate.document["servers"]["main"]["url"] = bouncer.url
    estate.save()
    return estate


def _advisory_locks_left(pg_url: str) -> list[tuple[object, ...]]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        return conn.execute("SELECT pid, objid FROM pg_locks WHERE locktype = 'advisory'").fetchall()


def test_the_pooler_is_recognised(pg_url: str, bouncer: PgBouncer) -> None:
    from orchestrator.live.connection import behind_pooler

    with psycopg.connect(bouncer.url, autocommit=True, prepare_threshold=None) as pooled:
        assert behind_pooler(pooled)
    with psycopg.connect(pg_url, autocommit=True) as direct:
        assert not behind_pooler(direct)


def test_eight_processes_through_pgbouncer_apply_everything_exactly_once(estate: Estate, pg_url: str) -> None:
    latest = race_estate(estate, migrations=20, sleep=0.05)
    processes = [start_dbplan(estate.plan_file, "apply", "--yes") for _ in range(PROCESSES)]
    runs = [finish(process) for process in processes]

    for run in runs:
        assert run.code == 0, run.err
    for service in ("orders", "billing"):
        assert_applied_exactly_once(estate, service, service, range(1, latest[service] + 1))
    done = sum(run.err.count(": done") for run in runs)
    assert done == 2 + 2 + 40, "two roles, two databases and forty migrations, each done by exactly one process"
    waiters = [run for run in runs if "waiting for the lock on the migrations of service" in run.err]
    assert waiters, "with eight processes started at once, some must have waited"
    assert any("skipped (already done by another run)" in run.err for run in waiters)
    assert _advisory_locks_left(pg_url) == [], "no lock may stay behind on a pooled server connection"


def test_eight_one_pass_applies_of_a_saved_plan_through_pgbouncer_apply_everything_once(
    estate: Estate, pg_url: str
) -> None:
    latest = race_estate(estate, migrations=12, sleep=0.02)
    for service in ("orders", "billing"):  # roles and databases made, version 1 applied
        estate.document["services"][service]["target"] = 1
    estate.save()
    assert estate.dbplan("apply", "--yes").code == 0
    for service in ("orders", "billing"):
        del estate.document["services"][service]["target"]
    estate.save()
    saved = estate.root / "plan.json"
    assert estate.dbplan("plan", "--out", str(saved)).code == 0
    processes = [start_dbplan(estate.plan_file, "apply", "--one-pass", str(saved), "--yes") for _ in range(PROCESSES)]
    runs = [finish(process) for process in processes]

    for service in ("orders", "billing"):
        assert_applied_exactly_once(estate, service, service, range(1, latest[service] + 1))
    # A database another run got into first is refused (changed since the plan), unless
    # that run got to the plan's end, and then it is skipped: never applied twice.
    for run in runs:
        assert run.code == 0 or "changed since the plan was saved" in run.out, run.err + run.out
    assert any(run.code == 0 for run in runs)
    assert _advisory_locks_left(pg_url) == [], "no lock may stay behind on a pooled server connection"


def test_a_direct_session_lock_keeps_pooled_runs_out(estate: Estate, pg_url: str) -> None:
    """The transaction-level lock uses golang-migrate's key: a session that holds it directly
    (golang-migrate, or dbplan connected without the pooler) keeps a pooled run waiting."""
    from orchestrator.live.locks import migrations_lock_key

    estate.add_app()
    estate.write("app", "1_first.up.sql", "CREATE TABLE first (id int);")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.write("app", "2_second.up.sql", "CREATE TABLE second (id int);")
    key = migrations_lock_key(estate.name("app"), "public", "schema_migrations")
    with psycopg.connect(pg_url, dbname=estate.name("app"), autocommit=True, application_name="blocker") as blocker:
        blocker.execute("SELECT pg_advisory_lock(%s::bigint)", (key,))
        run = estate.dbplan("apply", "--yes", "--lock-wait", "1")
    assert run.code == 1
    assert "gave up waiting 1 s for the lock on the migrations of service 'app'" in run.err
    assert "held by 'blocker'" in run.err
    assert "second" not in estate.tables("app")
    assert estate.dbplan("apply", "--yes").code == 0
    assert "second" in estate.tables("app")


def test_no_transaction_migration_through_pgbouncer_is_refused_before_anything_runs(estate: Estate, pg_url: str) -> None:
    estate.add_app()
    estate.write("app", "1_items.up.sql", "CREATE TABLE items (id int, sku text);")
    estate.write("app", "2_index.up.sql", "-- dbplan:no-transaction\nCREATE INDEX CONCURRENTLY items_sku_idx ON items (sku);\n")
    run = estate.dbplan("apply", "--yes")
    assert run.code == 1
    assert "server 'main' is reached through a connection pooler" in run.err
    assert "2_index.up.sql (version 2 of service 'app') runs outside a transaction" in run.err
    assert "direct connection" in run.err
    assert not estate.database_exists("app"), "refused before anything ran"
    assert _advisory_locks_left(pg_url) == []


def test_force_through_pgbouncer_refuses_to_take_a_session_lock(estate: Estate, pg_url: str) -> None:
    estate.add_app()
    estate.write("app", "1_first.up.sql", "CREATE TABLE first (id int);")
    assert estate.dbplan("apply", "--yes").code == 0
    run = estate.dbplan("force", "app", "0")
    assert run.code == 1
    assert "is reached through a connection pooler" in run.err
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(1, False)]
    assert _advisory_locks_left(pg_url) == []


def test_transaction_guard_refuses_a_held_lock_and_a_moved_on_state(pg_url: str, dbname_prefix: str) -> None:
    """The guard itself, on a direct connection: it is what makes a pooled run safe."""
    from psycopg import sql

    from orchestrator.estate.model import Service
    from orchestrator.execution import bookkeeping
    from orchestrator.execution.guard import GUARD_BUSY_SQLSTATE, GUARD_MOVED_SQLSTATE, transaction_guard
    from orchestrator.live.facts import read_service
    from orchestrator.live.locks import migrations_lock_key

    database = f"{dbname_prefix}_guard"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    service = Service(name="app", database=database, migrations_dir=Path("."), migrations_display="migrations/app")
    tables = bookkeeping.Tables("public", service.table, service.history_table)
    key = migrations_lock_key(database, "public", service.table)

    def guarded(conn: psycopg.Connection, facts: object) -> str | None:
        try:
            with conn.transaction():
                conn.execute(transaction_guard(key, tables, facts))  # type: ignore[arg-type]
        except psycopg.Error as err:
            return err.diag.sqlstate
        return None

    with psycopg.connect(pg_url, dbname=database, autocommit=True) as conn, psycopg.connect(
        pg_url, dbname=database, autocommit=True
    ) as other:
        before = read_service(conn, service, None)
        assert guarded(conn, before) is None  # no tables yet, and none expected
        other.execute(bookkeeping.create_tables(tables, create_schema=False))
        assert guarded(conn, before) == GUARD_MOVED_SQLSTATE  # someone created the bookkeeping
        fresh = read_service(conn, service, None)
        assert guarded(conn, fresh) is None
        other.execute(
            bookkeeping.record_event(tables, version=1, title="t", checksum="c", event="apply", duration_ms=1)
            + bookkeeping.set_version(tables, 1, False)
        )
        assert guarded(conn, fresh) == GUARD_MOVED_SQLSTATE  # someone applied version 1
        fresh = read_service(conn, service, None)
        other.execute("SELECT pg_advisory_lock(%s::bigint)", (key,))
        assert guarded(conn, fresh) == GUARD_BUSY_SQLSTATE  # golang-migrate (or a direct dbplan) holds the lock
        other.execute("SELECT pg_advisory_unlock(%s::bigint)", (key,))
        assert guarded(conn, fresh) is None


def test_inline_copy_data_through_pgbouncer_is_guarded_and_recorded_with_its_migration(estate: Estate) -> None:
    """The COPY path runs statement by statement, all in the transaction that holds the guard."""
    estate.add_app()
    estate.write("app", "1_seed.up.sql", "CREATE TABLE seed (id int);\nCOPY seed FROM stdin;\n1\n2\n\\.\n")
    estate.write("app", "2_after.up.sql", "INSERT INTO seed VALUES (3);\n")

    run = estate.dbplan("apply", "--yes")

    assert run.code == 0, run.output
    assert estate.query("app", "SELECT id FROM seed ORDER BY id") == [(1,), (2,), (3,)]
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(2, False)]
    assert estate.query("app", "SELECT version FROM dbplan_history WHERE event = 'apply' ORDER BY id") == [(1,), (2,)]


def test_a_flyway_repeatable_runs_through_pgbouncer_and_again_when_edited(estate: Estate, pg_url: str) -> None:
    estate.add_database("app")
    estate.add_service("app", "app", format="flyway")
    estate.write("app", "V1__items.sql", "CREATE TABLE items (id int, sku text);\n")
    estate.write("app", "R__views.sql", "CREATE OR REPLACE VIEW skus AS SELECT sku FROM items;\n")
    first = estate.dbplan("apply", "--yes")
    estate.write("app", "R__views.sql", "CREATE OR REPLACE VIEW skus AS SELECT sku, id FROM items;\n")
    second = estate.dbplan("apply", "--yes")

    assert first.code == 0, first.output
    assert second.code == 0, second.output
    events = estate.query("app", "SELECT version, event, title FROM dbplan_history ORDER BY id")
    assert events == [(1000000, "apply", "items"), (1000000, "repeat", "views"), (1000000, "repeat", "views")]
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(1000000, False)]
    assert "No changes" in estate.dbplan("plan").out
    assert _advisory_locks_left(pg_url) == []

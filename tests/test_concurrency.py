"""Concurrent runs: nothing lost, nothing twice (issue "Nothing lost, nothing twice").

Real ``dbplan apply`` processes race on one estate; the locks must serialise them, the
waiters must say that they waited and then find nothing to do, a bounded wait must name
who holds the lock, and waiting must never hold a snapshot that CREATE INDEX
CONCURRENTLY would wait for.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import psycopg
import pytest
from estate import Estate
from processes import (
    TableGate,
    assert_applied_exactly_once,
    dbplan_backends,
    finish,
    race_estate,
    start_dbplan,
    wait_until,
)

PROCESSES = 8


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    return Estate(tmp_path, pg_url, dbname_prefix, capsys)


def _crc32_ieee(data: bytes) -> int:
    """CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320) bit by bit, independent of zlib."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_migrations_lock_key_is_golang_migrates() -> None:
    from orchestrator.live.locks import migrations_lock_key

    # golang-migrate's own test vector (database/util_test.go): GenerateAdvisoryLockId(
    # "database_name", "schema_name_1", "schema_name_2") == "3743845847".
    assert migrations_lock_key("database_name", "schema_name_1", "schema_name_2") == 3743845847
    # And its formula, computed here without zlib: crc32("schema\0table\0database") * salt mod 2^32.
    for database, schema, table in [("products", "public", "schema_migrations"), ("ünïcode", "s", "t")]:
        expected = (_crc32_ieee(f"{schema}\x00{table}\x00{database}".encode()) * 1486364155) % 2**32
        assert migrations_lock_key(database, schema, table) == expected
    assert _crc32_ieee(b"123456789") == 0xCBF43926  # the CRC-32 check value: the helper itself is right


def test_eight_processes_apply_everything_exactly_once(estate: Estate) -> None:
    latest = race_estate(estate, migrations=20, sleep=0.05)
    processes = [start_dbplan(estate.plan_file, "apply", "--yes") for _ in range(PROCESSES)]
    runs = [finish(process) for process in processes]

    for run in runs:
        assert run.code == 0, run.err
    for service, database in (("orders", "orders"), ("billing", "billing")):
        assert_applied_exactly_once(estate, database, service, range(1, latest[service] + 1))

    done = sum(len(re.findall(r"^\[\d+/\d+\] .*: done", run.err, re.M)) for run in runs)
    assert done == 2 + 2 + 40, "two roles, two databases and forty migrations, each done by exactly one process"
    waiters = [run for run in runs if "waiting for the lock on" in run.err]
    assert waiters, "with eight processes started at once, some must have waited"
    for run in waiters:
        assert "held by 'dbplan' from 127.0.0.1" in run.err  # dbplan names itself in pg_stat_activity
    idle = [run for run in runs if not re.search(r": done", run.err)]
    for run in idle:  # found nothing left to do, whether it planned early or late
        assert "Apply complete: 0 done" in run.out or "No changes." in run.out, run.out + run.err
    assert any("skipped (already done by another run)" in run.err for run in waiters)


def test_lock_wait_runs_out_and_names_the_holder(estate: Estate) -> None:
    from orchestrator.live.locks import migrations_lock_key

    estate.add_app()
    estate.write("app", "1_first.up.sql", "CREATE TABLE first (id int);")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.write("app", "2_second.up.sql", "CREATE TABLE second (id int);")

    key = migrations_lock_key(estate.name("app"), "public", "schema_migrations")
    with psycopg.connect(estate.url, dbname=estate.name("app"), autocommit=True, application_name="blocker") as blocker:
        blocker.execute("SELECT pg_advisory_lock(%s::bigint)", (key,))
        started = time.monotonic()
        run = estate.dbplan("apply", "--yes", "--lock-wait", "1")
        waited = time.monotonic() - started

    assert run.code == 1
    assert 1 <= waited < 6
    assert "gave up waiting 1 s for the lock on the migrations of service 'app'" in run.err
    assert re.search(r"held by 'blocker' from 127\.0\.0\.1 \(pid \d+, connected since \d{4}-\d\d-\d\d", run.err), run.err
    assert "--lock-wait" in run.err  # what to do next
    assert "second" not in estate.tables("app")
    assert estate.dbplan("apply", "--yes").code == 0  # the holder is gone: the next run goes through
    assert "second" in estate.tables("app")


def test_create_index_concurrently_finishes_while_others_wait(estate: Estate) -> None:
    """A waiter polling for the lock holds no transaction, so CIC (which waits for every
    older snapshot) is never blocked by it: no deadlock. Runs that plan while the index
    is being built see the service dirty, learn that a run is in progress, and wait too."""
    estate.add_app()
    estate.write("app", "1_items.up.sql", "CREATE TABLE items AS SELECT g AS id, g % 97 AS sku FROM generate_series(1, 20000) g;")
    assert estate.dbplan("apply", "--yes").code == 0
    # Two tables the test keeps locked hold the first run where the test wants it.
    before_index = TableGate(estate.url, estate.name("app"), "gate_before_index")
    in_index = TableGate(estate.url, estate.name("app"), "gate_in_index")
    estate.write("app", "2_warm_up.up.sql", "SELECT count(*) FROM gate_before_index;")
    estate.write(
        "app",
        "3_index.up.sql",
        "-- dbplan:no-transaction\nSELECT count(*) FROM gate_in_index;\n"
        "CREATE INDEX CONCURRENTLY items_sku_idx ON items (sku);\n",
    )
    estate.write("app", "4_after.up.sql", "CREATE TABLE after_index (id int);")

    try:
        holder = start_dbplan(estate.plan_file, "apply", "--yes")
        wait_until(lambda: dbplan_backends(estate.url, "%gate_before_index%", waiting_for_lock=True), what="migration 2")
        lock_waiters = [start_dbplan(estate.plan_file, "apply", "--yes") for _ in range(3)]
        for waiter in lock_waiters:
            waiter.wait_for("waiting for the lock on the migrations of service 'app'")
        before_index.open()
        wait_until(lambda: dbplan_backends(estate.url, "%gate_in_index%", waiting_for_lock=True), what="migration 3")
        dirty_waiters = [start_dbplan(estate.plan_file, "apply", "--yes") for _ in range(2)]
        for waiter in dirty_waiters:
            waiter.wait_for("service 'app' is dirty at version 3 because another run is applying it right now")
    finally:
        before_index.open()
        in_index.open()  # now the index is built, with five runs waiting

    samples: list[list[tuple[object, ...]]] = []
    stop = threading.Event()

    def sample_waiters() -> None:
        # The waiters are the dbplan sessions that do not hold the advisory lock.
        query = """
            SELECT a.pid, a.state, now() - a.xact_start
            FROM pg_stat_activity a
            WHERE a.application_name = 'dbplan' AND a.datname = %s AND a.pid <> pg_backend_pid()
              AND NOT EXISTS (SELECT FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.granted)
        """
        with psycopg.connect(estate.url, autocommit=True) as conn:
            while not stop.is_set():
                samples.append(conn.execute(query, (estate.name("app"),)).fetchall())
                time.sleep(0.01)

    sampler = threading.Thread(target=sample_waiters)
    sampler.start()
    try:
        first = finish(holder, timeout=60)
        waited_for_lock = [finish(waiter, timeout=60) for waiter in lock_waiters]
        waited_for_run = [finish(waiter, timeout=60) for waiter in dirty_waiters]
    finally:
        stop.set()
        sampler.join()

    assert first.code == 0, first.err
    assert "apply app 3 index: done" in first.err
    for run in waited_for_lock:
        assert run.code == 0, run.err
        assert "skipped (already done by another run)" in run.err
    for run in waited_for_run:
        assert run.code == 0, run.err
        assert "No changes." in run.out
    assert estate.query("app", "SELECT indisvalid FROM pg_index WHERE indexrelid = 'items_sku_idx'::regclass") == [(True,)]
    history = estate.query("app", "SELECT version, count(*) FROM dbplan_history GROUP BY version ORDER BY version")
    assert history == [(1, 1), (2, 1), (3, 1), (4, 1)]

    seen = [row for sample in samples for row in sample]
    assert len(seen) > 10, "the sampler must have seen the waiters"
    for _pid, state, in_transaction_for in seen:
        # Caught in a try or a re-read at most: each is one short transaction, and nothing is
        # held open between them (a held snapshot would also have hung the index build above).
        assert in_transaction_for is None or in_transaction_for.total_seconds() < 1.0, (state, in_transaction_for)
    assert any(state == "idle" for sample in samples for _pid, state, _age in sample), "waiters idle between tries"

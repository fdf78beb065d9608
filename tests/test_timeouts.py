"""Timeouts: lock_timeout and statement_timeout per service, and waiting for a server.

A migration that needs a table lock another session holds gives up after lock_timeout
instead of queueing every query on that table behind it; a transactional one is rolled
back and tried again a few times, a no-transaction one is not. ``--wait`` retries
connecting while a server starts; without it an unreachable server fails at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from estate import Estate
from processes import wait_until
from tcpproxy import TcpProxy


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    return Estate(tmp_path, pg_url, dbname_prefix, capsys)


def _items_estate(estate: Estate, **service_options: object) -> None:
    estate.add_app(**service_options)
    estate.write("app", "1_items.up.sql", "CREATE TABLE items (id int);")
    assert estate.dbplan("apply", "--yes").code == 0


class TableLock:
    """Another session holding ACCESS EXCLUSIVE on a table until released."""

    def __init__(self, estate: Estate, table: str) -> None:
        self.conn = psycopg.connect(estate.url, dbname=estate.name("app"), autocommit=True, application_name="long report")
        self.conn.execute("BEGIN")
        self.conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        self.lock = threading.Lock()

    def release(self) -> None:
        with self.lock:
            if not self.conn.closed:
                self.conn.execute("ROLLBACK")
                self.conn.close()



def _record_settings(table: str) -> str:
    """A migration that keeps the timeouts it ran with in ``table``."""
    return f"CREATE TABLE {table} AS SELECT current_setting('lock_timeout') AS lock, current_setting('statement_timeout') AS statement;"


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.execution import batches

    monkeypatch.setattr(batches, "LOCK_TIMEOUT_RETRY_SECONDS", (0.1, 0.1, 0.1))


def test_timeouts_are_set_for_the_migration_with_safe_defaults(estate: Estate) -> None:
    estate.add_app()
    estate.add_service("tuned", "app", table="tuned_migrations", lock_timeout="5s", statement_timeout=90000)
    estate.write("app", "1_seen.up.sql", _record_settings("seen_default"))
    estate.write("tuned", "1_seen.up.sql", _record_settings("seen_tuned"))
    estate.write(
        "tuned",
        "2_seen_outside.up.sql",
        "-- dbplan:no-transaction\n" + _record_settings("seen_outside"),
    )
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    # 30 s by default; statement_timeout is the server's own (0 here): long migrations are not cut short.
    assert estate.query("app", "SELECT * FROM seen_default") == [("30s", "0")]
    assert estate.query("app", "SELECT * FROM seen_tuned") == [("5s", "90s")]
    assert estate.query("app", "SELECT * FROM seen_outside") == [("5s", "90s")]


def test_each_migration_of_a_batch_gets_the_service_settings_again(estate: Estate) -> None:
    """The settings go with every transaction, not once per session: a migration that
    loosens them for the session (2) does not loosen them for the next one (3), which
    travels in the same query."""
    estate.add_app(lock_timeout="5s", statement_timeout=90000)
    estate.write("app", "1_a.up.sql", "CREATE TABLE a (id int);")
    estate.write("app", "2_loosen.up.sql", "SET lock_timeout = 0;\nSET statement_timeout = 0;\nCREATE TABLE b (id int);")
    estate.write("app", "3_seen.up.sql", _record_settings("seen"))

    run = estate.dbplan("apply", "--yes")

    assert run.code == 0, run.output
    assert estate.query("app", "SELECT * FROM seen") == [("5s", "90s")]


def test_bad_timeout_is_a_config_error(estate: Estate) -> None:
    estate.add_app(lock_timeout="5 parsecs")
    run = estate.dbplan("validate")
    assert run.code == 1
    assert "services.app.lock_timeout" in run.err


def test_lock_timeout_is_retried_until_the_blocker_lets_go(estate: Estate) -> None:
    _items_estate(estate, lock_timeout="200ms")
    estate.write("app", "2_add_note.up.sql", "ALTER TABLE items ADD COLUMN note text;")
    blocker = TableLock(estate, "items")

    def release_once_the_first_try_gave_up() -> None:
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dbplan' AND wait_event_type = 'Lock'"
        with psycopg.connect(estate.url, autocommit=True) as conn:
            wait_until(lambda: conn.execute(waiting).fetchone() == (1,), what="the migration to wait for the lock")
            wait_until(lambda: conn.execute(waiting).fetchone() == (0,), what="the first try to give up")
        blocker.release()  # during the 1 s pause before the second try

    releaser = threading.Thread(target=release_once_the_first_try_gave_up)
    releaser.start()
    try:
        run = estate.dbplan("apply", "--yes")
    finally:
        releaser.join(30)
        blocker.release()
    assert run.code == 0, run.output
    assert "migrations/app/2_add_note.up.sql (version 2) waited longer than lock_timeout (200 ms)" in run.err
    assert "retrying in 1 s (attempt 2 of 4)" in run.err
    assert ("note",) in estate.query("app", "SELECT column_name FROM information_schema.columns WHERE table_name = 'items'")
    assert estate.query("app", "SELECT version, count(*) FROM dbplan_history GROUP BY version ORDER BY 1") == [(1, 1), (2, 1)]


def test_lock_timeout_gives_up_after_a_few_tries_and_leaves_nothing(estate: Estate, quick_retries: None) -> None:
    _items_estate(estate, lock_timeout="100ms")
    estate.write("app", "2_add_note.up.sql", "CREATE TABLE side (id int);\nALTER TABLE items ADD COLUMN note text;")
    blocker = TableLock(estate, "items")
    try:
        started = time.monotonic()
        run = estate.dbplan("apply", "--yes")
        took = time.monotonic() - started
    finally:
        blocker.release()
    assert run.code == 1
    assert took < 10
    assert run.err.count("retrying in") == 3
    assert "canceling statement due to lock timeout (SQLSTATE 55P03)" in run.err
    assert "lock_timeout (100 ms) for a lock another session holds, 4 times" in run.err
    assert "raise lock_timeout of service 'app'" in run.err
    assert "rolled back: nothing of it is left in the database; apply again once the lock is free" in run.err
    assert "side" not in estate.tables("app")
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(1, False)]


def test_lock_timeout_of_a_no_transaction_migration_is_not_retried(estate: Estate, quick_retries: None) -> None:
    _items_estate(estate, lock_timeout="100ms")
    estate.write("app", "2_add_note.up.sql", "-- dbplan:no-transaction\nALTER TABLE items ADD COLUMN note text;\n")
    blocker = TableLock(estate, "items")
    try:
        run = estate.dbplan("apply", "--yes")
    finally:
        blocker.release()
    assert run.code == 1
    assert "retrying" not in run.err
    assert "55P03" in run.err
    assert "dirty at version 2" in run.err
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(2, True)]


def test_statement_timeout_stops_a_long_statement_and_rolls_back(estate: Estate, quick_retries: None) -> None:
    _items_estate(estate, statement_timeout="300ms")
    estate.write("app", "2_slow.up.sql", "CREATE TABLE side (id int);\nSELECT pg_sleep(3);\n")
    started = time.monotonic()
    run = estate.dbplan("apply", "--yes")
    assert time.monotonic() - started < 2.5
    assert run.code == 1
    assert "canceling statement due to statement timeout (SQLSTATE 57014)" in run.err
    assert "retrying" not in run.err
    assert "raise statement_timeout of service 'app'" in run.err
    assert "side" not in estate.tables("app")
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(1, False)]


TIMED_OUT_FILES = [
    # (options of the service, files 2.. of it, the file and line that time out)
    pytest.param(
        {"lock_timeout": "100ms"},
        {"2_note.up.sql": "CREATE TABLE side (id int);\n\nINSERT INTO side VALUES (1);\nALTER TABLE items ADD COLUMN note text;\n"},
        "2_note.up.sql:4", id="lock-timeout",
    ),
    pytest.param(
        {"statement_timeout": "300ms"},
        {"2_slow.up.sql": "CREATE TABLE side (id int);\nSELECT 1;\nSELECT pg_sleep(3);\n"},
        "2_slow.up.sql:3", id="statement-timeout",
    ),
    pytest.param(
        {"statement_timeout": "300ms"},
        # batches of 1, 2, ... migrations: 4 is the second of the batch 3-4
        {"2_a.up.sql": "CREATE TABLE a (id int);\n", "3_b.up.sql": "CREATE TABLE b (id int);\n",
         "4_slow.up.sql": "SELECT 1;\n\nSELECT pg_sleep(3);\n", "5_c.up.sql": "CREATE TABLE c (id int);\n"},
        "4_slow.up.sql:3", id="statement-timeout-in-a-batch",
    ),
    pytest.param(
        {"statement_timeout": "300ms"},
        {"2_wrapped.up.sql": "BEGIN;\nCREATE TABLE side (id int);\nSELECT pg_sleep(3);\nCOMMIT;\n"},
        "2_wrapped.up.sql:3", id="statement-timeout-in-a-file-with-its-own-begin",
    ),
]


@pytest.mark.parametrize(("options", "files", "where"), TIMED_OUT_FILES)
def test_a_timeout_names_the_line_of_the_statement_that_timed_out(
    estate: Estate, quick_retries: None, options: dict[str, str], files: dict[str, str], where: str
) -> None:
    _items_estate(estate, **options)
    for name, text in files.items():
        estate.write("app", name, text)
    blocker = TableLock(estate, "items")
    try:
        run = estate.dbplan("apply", "--yes")
    finally:
        blocker.release()
    assert run.code == 1
    assert f"migrations/app/{where}: canceling statement due to" in run.err, run.err
    assert "side" not in estate.tables("app")


# ---------------------------------------------------------------------------
# Waiting for a server


@pytest.fixture
def late_server(pg_url: str) -> Iterator[TcpProxy]:
    parts = urlsplit(pg_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    yield proxy
    proxy.close()


def test_wait_retries_until_a_server_that_starts_two_seconds_later_answers(estate: Estate, pg_url: str, late_server: TcpProxy) -> None:
    estate.add_app()
    estate.write("app", "1_items.up.sql", "CREATE TABLE items (id int);")
    estate.document["servers"]["main"]["url"] = pg_url.replace(f":{urlsplit(pg_url).port}/", f":{late_server.port}/")
    estate.save()
    timer = threading.Timer(2.0, late_server.start)
    started = time.monotonic()
    timer.start()
    try:
        run = estate.dbplan("apply", "--yes", "--wait", "20")
    finally:
        timer.cancel()
    took = time.monotonic() - started
    assert run.code == 0, run.output
    assert 2.0 <= took < 10
    assert "server 'main' is not reachable yet" in run.err and "retrying" in run.err
    assert "items" in estate.tables("app")


def test_unreachable_server_fails_fast_naming_the_server_not_its_password(estate: Estate, late_server: TcpProxy) -> None:
    estate.add_app()
    estate.write("app", "1_items.up.sql", "CREATE TABLE items (id int);")
    estate.document["servers"]["main"]["url"] = f"postgresql://admin:Hunter2-Secret@127.0.0.1:{late_server.port}/postgres"
    estate.save()  # nothing listens on that port: the proxy is never started
    for command in (["plan"], ["apply", "--yes"], ["status"]):
        started = time.monotonic()
        run = estate.dbplan(*command)
        assert time.monotonic() - started < 2, command
        assert run.code == 1, command
        assert f"cannot connect to server 'main' (database 'postgres', host 127.0.0.1, port {late_server.port})" in run.err
        assert "Connection refused" in run.err
        assert "--wait SECONDS" in run.err
        assert "Hunter2-Secret" not in run.output

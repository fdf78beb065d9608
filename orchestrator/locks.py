"""Advisory locks that serialise concurrent ``dbplan apply`` runs (and golang-migrate).

Waiting polls ``pg_try_advisory_lock`` and holds nothing open between tries: a session
blocked inside ``pg_advisory_lock`` keeps a snapshot that ``CREATE INDEX CONCURRENTLY``
waits for, the deadlock golang-migrate and Flyway users meet.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .errors import LockTimeout

if TYPE_CHECKING:
    import psycopg

GOLANG_MIGRATE_SALT = 1486364155
DEFAULT_LOCK_WAIT_SECONDS = 300.0
POLL_SECONDS = 0.2

LOCK_HOLDER = """
SELECT a.application_name, a.client_addr::text, a.backend_start, a.state_change, a.pid
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = %s AND l.objid = %s AND l.objsubid = 1
LIMIT 1
"""


def migrations_lock_key(database: str, schema: str, table: str) -> int:
    """The key golang-migrate's postgres driver derives, so both tools exclude each other."""
    name = "\x00".join([schema, table, database]).encode("utf-8")
    return (zlib.crc32(name) * GOLANG_MIGRATE_SALT) % 2**32


def server_lock_key(server_name: str) -> int:
    """Key taken on the maintenance database while creating roles and databases."""
    return (zlib.crc32(f"dbplan\x00server\x00{server_name}".encode()) * GOLANG_MIGRATE_SALT) % 2**32


@contextmanager
def advisory_lock(
    conn: psycopg.Connection,
    key: int,
    what: str,
    *,
    wait_seconds: float = DEFAULT_LOCK_WAIT_SECONDS,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold a session advisory lock on ``conn`` for the duration of the block."""
    deadline = time.monotonic() + wait_seconds
    announced = False
    while not _try_lock(conn, key):
        if not announced and on_wait:
            on_wait(f"waiting for the lock on {what}, held by {describe_holder(conn, key)}")
            announced = True
        if time.monotonic() >= deadline:
            raise LockTimeout(
                f"gave up waiting {wait_seconds:g} s for the lock on {what}; it is held by "
                f"{describe_holder(conn, key)}",
                hint="wait for that run to finish, or raise --lock-wait",
            )
        time.sleep(POLL_SECONDS)
    try:
        yield
    finally:
        if not conn.closed and not conn.broken:
            conn.execute("SELECT pg_advisory_unlock(%s::bigint)", (key,))


def _try_lock(conn: psycopg.Connection, key: int) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s::bigint)", (key,)).fetchone()
    return bool(row and row[0])


def describe_holder(conn: psycopg.Connection, key: int) -> str:
    row = conn.execute(LOCK_HOLDER, (key >> 32, key & 0xFFFFFFFF)).fetchone()
    if row is None:
        return "another session (it has just released it)"
    application, address, backend_start, state_change, pid = row
    who = application or "an unnamed client"
    where = f" from {address}" if address else " over a local socket"
    return f"'{who}'{where} (pid {pid}, connected since {backend_start:%Y-%m-%d %H:%M:%S %Z})"

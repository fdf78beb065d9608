"""Advisory locks that serialise concurrent ``dbplan apply`` runs (and golang-migrate).

Waiting polls ``pg_try_advisory_lock`` and holds nothing open between tries: a session
blocked inside ``pg_advisory_lock`` keeps a snapshot that ``CREATE INDEX CONCURRENTLY``
waits for, the deadlock golang-migrate and Flyway users meet.

Through a pooler in transaction mode a session lock would stay behind on whichever
server connection took it (and block everyone until the pooler recycles it), so there
``advisory_lock`` refuses, and the executor opens each of its transactions with a guard
instead (``execution.guard``): a transaction-level lock on the same key, and a check that
the bookkeeping is still what the plan was made from.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..errors import ConnectionFailed, DbplanError, LockTimeout
from .connection import behind_pooler

if TYPE_CHECKING:
    import psycopg


GOLANG_MIGRATE_SALT = 1486364155
DEFAULT_LOCK_WAIT_SECONDS = 300.0
POLL_SECONDS = 0.2

POOLER_MESSAGE = (
    "{server} is reached through a connection pooler (PgBouncer or similar): a session "
    "advisory lock taken there stays with whichever server connection ran it, not with dbplan"
)


def pooler_message(server: str | None) -> str:
    return POOLER_MESSAGE.format(server=f"server '{server}'" if server else "the server")

# Every name with its schema, as in facts.py: these run in sessions whose search_path a
# migration may have put a schema of its own in front of (a pg_locks of its own would say
# that the lock is held).
_THIS_DATABASE = (
    "(SELECT oid FROM pg_catalog.pg_database WHERE datname OPERATOR(pg_catalog.=) pg_catalog.current_database())"
)
LOCK_HOLDER = (
    """
SELECT a.application_name, pg_catalog.host(a.client_addr), a.backend_start, a.state, a.state_change, a.pid
FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid OPERATOR(pg_catalog.=) l.pid
WHERE l.locktype OPERATOR(pg_catalog.=) 'advisory' AND l.granted
  AND l.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()
  AND l.database OPERATOR(pg_catalog.=) """
    + _THIS_DATABASE
    + """
  AND l.classid OPERATOR(pg_catalog.=) %s::pg_catalog.oid AND l.objid OPERATOR(pg_catalog.=) %s::pg_catalog.oid
  AND l.objsubid OPERATOR(pg_catalog.=) 1
LIMIT 1
"""
)

HOLDS_LOCK = (
    """
SELECT EXISTS (
  SELECT FROM pg_catalog.pg_locks
  WHERE locktype OPERATOR(pg_catalog.=) 'advisory' AND granted AND pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()
    AND database OPERATOR(pg_catalog.=) """
    + _THIS_DATABASE
    + """
    AND classid OPERATOR(pg_catalog.=) %s::pg_catalog.oid AND objid OPERATOR(pg_catalog.=) %s::pg_catalog.oid
    AND objsubid OPERATOR(pg_catalog.=) 1)
"""
)
TRY_LOCK = "SELECT pg_catalog.pg_try_advisory_lock(%s::pg_catalog.int8)"
UNLOCK = "SELECT pg_catalog.pg_advisory_unlock(%s::pg_catalog.int8)"


def migrations_lock_key(database: str, schema: str, table: str) -> int:
    """The key golang-migrate's postgres driver derives, so both tools exclude each other."""
    name = "\x00".join([schema, table, database]).encode("utf-8")
    return (zlib.crc32(name) * GOLANG_MIGRATE_SALT) % 2**32


def server_lock_key(server_name: str) -> int:
    """Key taken on the maintenance database while creating roles and databases."""
    return (zlib.crc32(f"dbplan\x00server\x00{server_name}".encode()) * GOLANG_MIGRATE_SALT) % 2**32


def database_lock_key(server_name: str, database: str) -> int:
    """Key taken on the maintenance database while creating one database (or changing its
    owner): a fleet's databases are created side by side, each under a lock of its own."""
    return (zlib.crc32(f"dbplan\x00database\x00{server_name}\x00{database}".encode()) * GOLANG_MIGRATE_SALT) % 2**32


class LockWait:
    """Waiting for a lock someone else holds: announce once, poll, give up at the deadline.

    ``stop`` is called before every pause; it raises to end the wait (a signal arrived).
    """

    def __init__(
        self,
        conn: psycopg.Connection,
        key: int,
        what: str,
        *,
        wait_seconds: float = DEFAULT_LOCK_WAIT_SECONDS,
        on_wait: Callable[[str], None] | None = None,
        stop: Callable[[], None] | None = None,
    ) -> None:
        self.conn, self.key, self.what = conn, key, what
        self.wait_seconds = wait_seconds
        self.on_wait = on_wait
        self.stop = stop
        self.restart()

    def restart(self) -> None:
        """Wait afresh: a full ``wait_seconds`` from now, announced again."""
        self.deadline = time.monotonic() + self.wait_seconds
        self.announced = False

    def pause(self) -> None:
        """Called after a try that failed; returns when it is time to try again."""
        if self.stop:
            self.stop()
        if not self.announced and self.on_wait:
            self.on_wait(f"waiting for the lock on {self.what}, held by {describe_holder(self.conn, self.key)}")
            self.announced = True
        if time.monotonic() >= self.deadline:
            raise LockTimeout(
                f"gave up waiting {self.wait_seconds:g} s for the lock on {self.what}; it is held by "
                f"{describe_holder(self.conn, self.key)}",
                hint="wait for that run to finish, or raise --lock-wait",
            )
        time.sleep(POLL_SECONDS)


@contextmanager
def advisory_lock(
    waiting: LockWait, *, server: str = "", taken: bool = False, closing: bool = False
) -> Iterator[None]:
    """Hold the session advisory lock ``waiting`` is for, on its connection, for the
    duration of the block; while another session holds it, wait as ``waiting`` says.

    ``taken``: the caller took it already (``try_lock_unless_pooled``). ``closing``: the
    caller closes the session right after the block, which releases the lock (PostgreSQL
    releases a session's locks as it ends), so no round trip is spent on releasing it.
    """
    conn, key = waiting.conn, waiting.key
    if behind_pooler(conn):
        raise DbplanError(
            pooler_message(server) + f", so it cannot protect {waiting.what}",
            server=server or None,
            hint="connect to PostgreSQL directly for this command",
        )
    if not taken:
        _wait_for(waiting, server)
    try:
        yield
    finally:
        if not closing:
            _unlock(conn, key)


def _wait_for(waiting: LockWait, server: str) -> None:
    """Try, pause, try again; a session lost while waiting is said to be lost while waiting
    (nothing runs before the lock is held), not left as a driver error."""
    import psycopg

    try:
        while not _try_lock(waiting.conn, waiting.key):
            waiting.pause()
    except psycopg.Error as err:
        reason = (str(err).strip().splitlines() or ["unknown error"])[0]
        raise ConnectionFailed(
            f"lost the connection to {f'server {server!r}' if server else 'the server'} while waiting for the lock "
            f"on {waiting.what}: {reason}; nothing of it had started",
            server=server or None,
            hint="run 'dbplan apply' again once the server is back",
        ) from err


def _unlock(conn: psycopg.Connection, key: int) -> None:
    """Release the lock without hiding why the block ended: a transaction the block left
    failed is rolled back first, and a session that is gone took its lock with it."""
    import psycopg

    if conn.closed or conn.broken:
        return
    try:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
        conn.execute(UNLOCK, (key,))
    except psycopg.Error:
        pass  # the connection is closed right after this, which releases the lock as well


def hold_again(waiting: LockWait) -> bool:
    """Make sure this session still holds the lock ``waiting`` is for; take it again
    (waiting as ``waiting`` says) if something released it. True if it had to.

    A migration may release it (DISCARD ALL, pg_advisory_unlock_all(), ...); the
    bookkeeping's own check (``execution.guard.expect_version``) keeps that from applying
    anything twice, and this keeps the runs in turn, as the lock promised.
    """
    conn, key = waiting.conn, waiting.key
    if holds_lock(conn, key):
        return False
    waiting.restart()
    while not _try_lock(conn, key):
        waiting.pause()
    return True


def holds_lock(conn: psycopg.Connection, key: int) -> bool:
    row = conn.execute(HOLDS_LOCK, (key >> 32, key & 0xFFFFFFFF)).fetchone()
    return bool(row and row[0])


def _try_lock(conn: psycopg.Connection, key: int) -> bool:
    row = conn.execute(TRY_LOCK, (key,)).fetchone()
    return bool(row and row[0])


def describe_holder(conn: psycopg.Connection, key: int) -> str:
    """Who holds the lock on ``key``: application name, client address, since when."""
    return lock_holder(conn, key) or "another session (it has just released it)"


def lock_holder(conn: psycopg.Connection, key: int) -> str | None:
    """The session other than this one that holds the lock on ``key``, described; None if none."""
    row = conn.execute(LOCK_HOLDER, (key >> 32, key & 0xFFFFFFFF)).fetchone()
    if row is None:
        return None
    application, address, backend_start, state, state_change, pid = row
    who = application or "an unnamed client"
    where = f" from {address}" if address else " over a local socket"
    doing = f", {state} since {state_change:%H:%M:%S}" if state and state_change else ""
    return f"'{who}'{where} (pid {pid}, connected since {backend_start:%Y-%m-%d %H:%M:%S %Z}{doing})"

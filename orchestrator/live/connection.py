"""Connections to the estate's servers, shared by inspection and execution.

Every connection is autocommit (dbplan opens its transactions explicitly, so a migration
and its bookkeeping always travel together), names itself ``dbplan`` in
``pg_stat_activity``, and never prepares statements (PgBouncer in transaction mode cannot
keep them). Errors name the server and never its password.

A connection pooler in transaction mode (PgBouncer) hands each transaction to whichever
server connection is free, so session state (advisory locks, SET) does not stay with the
client: ``behind_pooler`` tells the executor to rely on transaction-level locks instead.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConnectionFailed
from ..estate import conninfo
from ..estate.model import (
    DEFAULT_MAINTENANCE_DATABASE,
    DEFAULT_PARALLEL_PER_SERVER,
    Server,
)
from . import scram

if TYPE_CHECKING:
    import psycopg

APPLICATION_NAME = "dbplan"
CONNECT_TIMEOUT_SECONDS = 10
BACKEND_PID = "SELECT pg_catalog.pg_backend_pid()"
# Class 08 (connection exception) and 57P01-57P03 (terminated by an administrator or a
# shutdown): the session is gone, and with it any transaction it had open.
CONNECTION_LOST_SQLSTATES = ("08", "57P01", "57P02", "57P03")


def connection_bound(server: Server, parallel: int | None = None) -> int:
    """How many connections a fleet's inspection or apply opens to ``server`` at once:
    ``--parallel N`` (the command line wins, as for every other option), else the plan
    file's ``servers.X.parallel``, else ``DEFAULT_PARALLEL_PER_SERVER``."""
    return max(1, parallel or server.parallel or DEFAULT_PARALLEL_PER_SERVER)


def server_url(server: Server) -> str:
    """The admin URL of a server, starting the embedded one if it is not running."""
    if server.url:
        return server.url
    assert server.embedded is not None  # config guarantees one of the two
    from ..server.embedded import EmbeddedServer

    return EmbeddedServer(server.embedded.data_dir, server.embedded.port).ensure_running()


def connect(
    server: Server,
    url: str,
    database: str | None = None,
    *,
    wait_seconds: float = 0.0,
    on_retry: Callable[[str], None] | None = None,
) -> psycopg.Connection:
    """Connect to ``database`` (default: the server's maintenance database).

    With ``wait_seconds`` the connection is retried with backoff while the server is not
    accepting connections yet (containers that start the database and dbplan together),
    until that many seconds have passed; a server that answers and refuses (a wrong
    password, a database that does not exist) is not retried.
    """
    import psycopg

    dbname = database or maintenance_database(server, url)
    deadline = time.monotonic() + wait_seconds
    delay = 0.2
    while True:
        try:
            return _connect_with_known_keys(url, dbname)
        except psycopg.OperationalError as err:
            reason = _first_line(str(err), url)
            where = f"server '{server.name}' (database '{dbname}', {describe(server)})"
            if refused_by_server(reason):
                raise ConnectionFailed(
                    f"{where} refused the connection: {reason}",
                    server=server.name,
                    hint=_embedded_password_hint(server, url, reason) or _refusal_hint(reason, database),
                ) from None
            remaining = deadline - time.monotonic()
            if remaining > 0:
                if on_retry:
                    on_retry(f"server '{server.name}' is not reachable yet ({reason}); retrying")
                time.sleep(min(delay, remaining))  # the last pause ends at the deadline, then one more try
                delay = min(delay * 2, 5.0)
                continue
            raise ConnectionFailed(
                f"cannot connect to {where}: {reason}",
                server=server.name,
                hint="check that the server is running and the url is right"
                + (f" (retried for {wait_seconds:g} s)" if wait_seconds else "; --wait SECONDS retries while it starts"),
            ) from None
        except psycopg.Error as err:
            raise ConnectionFailed(
                f"cannot connect to server '{server.name}': {_first_line(str(err), url)}", server=server.name
            ) from None


def _connect_with_known_keys(url: str, dbname: str) -> psycopg.Connection:
    """Connect with the SCRAM keys learned for ``url``, if any (see :mod:`.scram`); keys
    that the server no longer takes (a new password) are forgotten and the password is
    used, in the same call."""
    import psycopg

    keys = _SCRAM_KEYS.usable(url)
    if keys is None:
        conn = _libpq_connect(url, dbname)
        _SCRAM_KEYS.saw_login(url, conn)
        return conn
    try:
        return _libpq_connect(url, dbname, keys.as_parameters())
    except psycopg.OperationalError as err:
        if not any(sign in str(err) for sign in KEYS_REFUSED):
            raise
        _SCRAM_KEYS.forget(url)
        return _libpq_connect(url, dbname)


def _libpq_connect(url: str, dbname: str, keys: dict[str, str] | None = None) -> psycopg.Connection:
    import psycopg

    extra: dict[str, Any] = dict(keys or {})  # libpq parameters, not psycopg's own
    return psycopg.connect(
        url,
        dbname=dbname,
        autocommit=True,
        prepare_threshold=None,
        application_name=APPLICATION_NAME,
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        # The session's own default, whatever PGCLIENTENCODING says: a RESET ALL
        # between migrations then returns to what the parser read the files as.
        client_encoding="UTF8",
        **extra,
    )


# What libpq says when the server does not take the keys: the server's refusal, or a
# server signature that the server key does not verify.
KEYS_REFUSED = ("password authentication failed", "SCRAM", "server signature")


class _KeysPerServer:
    """The SCRAM keys of each server url, learned at its second connection: a command
    that connects once pays nothing, a fleet pays one exchange per server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the dictionaries
        self._learning: dict[str, threading.Lock] = {}  # one per url: a slow server delays only its own
        self._first_login: dict[str, tuple[scram.Endpoint, str]] = {}
        self._keys: dict[str, scram.Keys | None] = {}  # None: not to be learned, use the password

    def usable(self, url: str) -> scram.Keys | None:
        if url in self._keys:
            return self._keys[url]
        with self._lock:
            if url not in self._first_login:
                return None  # no login yet to learn from
            learning = self._learning.setdefault(url, threading.Lock())
        with learning:  # the other connections to this server wait for the keys
            if url not in self._keys:
                endpoint, password = self._first_login[url]
                self._keys[url] = scram.keys_for(endpoint, password)
            return self._keys[url]

    def saw_login(self, url: str, conn: psycopg.Connection) -> None:
        """Remember where and with which password ``conn`` logged in, for the next one."""
        if url in self._keys or url in self._first_login or not conn.pgconn.used_password:
            return
        info = conn.info
        if not scram.libpq_takes_keys() or not info.password:
            self._keys[url] = None
            return
        endpoint = scram.Endpoint(
            host=info.hostaddr or info.host,
            port=info.port,
            user=info.user,
            database=info.dbname,
            ssl=bool(conn.pgconn.ssl_in_use),
        )
        with self._lock:
            self._first_login.setdefault(url, (endpoint, info.password))

    def forget(self, url: str) -> None:
        with self._lock:
            self._keys[url] = None

    def secrets(self) -> list[str]:
        return [value for keys in self._keys.values() if keys for value in (keys.client, keys.server)]


_SCRAM_KEYS = _KeysPerServer()


def _embedded_password_hint(server: Server, url: str, reason: str) -> str | None:
    """What to do when the embedded server refuses the password its file holds.

    That happens when the file and the data folder part (a data folder restored from a
    backup, a file copied from another one): a start without the file sets a new password.
    """
    if server.embedded is None or "password authentication failed" not in reason:
        return None
    from urllib.parse import parse_qs, urlsplit

    passfile = parse_qs(urlsplit(url).query).get("passfile", ["the password file"])[0]
    return (
        f"the embedded server's password is kept in {passfile}; if it no longer matches the "
        "data folder's, run `dbplan server stop`, delete that file and run the command again: "
        "the next start sets a new password"
    )


def maintenance_database(server: Server, url: str) -> str:
    """The database dbplan connects to for server-wide work (reading roles and databases,
    creating them, their lock): ``maintenance_database`` when the plan file sets it, else
    the database the url names, else ``postgres``."""
    if server.maintenance_database:
        return server.maintenance_database
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        named = conninfo_to_dict(url).get("dbname")  # libpq's own reading of the url
    except psycopg.Error:
        named = None  # connecting reports what is wrong with the url
    return str(named) if named else DEFAULT_MAINTENANCE_DATABASE


# libpq gives no SQLSTATE for a connection that failed, so a server's refusal is told from
# a server that cannot be reached by its message: "FATAL:" means it answered. Only these
# answers change by waiting.
NOT_READY_YET = (
    "the database system is starting up",
    "the database system is not yet accepting connections",
    "the database system is in recovery mode",
    "the database system is shutting down",
    "sorry, too many clients already",
    "remaining connection slots are reserved",
)


def refused_by_server(reason: str) -> bool:
    """Whether the server answered and said no for a reason that waiting does not change
    (or asked for a password that the url does not hold: libpq's "no password supplied")."""
    answered = "FATAL:" in reason or "no password supplied" in reason
    return answered and not any(state in reason for state in NOT_READY_YET)


def _refusal_hint(reason: str, database: str | None) -> str:
    if "password" in reason:
        return "check the password of the url's user (in the url, PGPASSWORD or ~/.pgpass); retrying would not help"
    if "database" in reason and "does not exist" in reason and database is None:
        return (
            "dbplan connects to the database the url names (or maintenance_database, if the server sets it) "
            "for server-wide work: name one that exists, such as postgres"
        )
    return "check the url's user and the server's pg_hba.conf; retrying would not help"


def describe(server: Server) -> str:
    """The server as output may show it: host(s) and port(s), never the rest of its url."""
    if server.url:
        return conninfo.describe(server.url)
    assert server.embedded is not None
    return f"embedded, data in {server.embedded.data_dir}"


def _first_line(message: str, url: str) -> str:
    # A connection error names the host and port; the password is taken out anyway, in
    # case a libpq or a server message ever quotes it.
    line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    password = conninfo.password(url)
    if password:
        from urllib.parse import quote

        for spelling in (password, quote(password, safe=""), quote(password)):
            line = line.replace(spelling, "***")
    for key in _SCRAM_KEYS.secrets():
        line = line.replace(key, "***")
    return line


# How dbplan's parser reads a migration file; the server must read it alike, or a COMMIT
# could hide from the parser in what it takes for a string (standard_conforming_strings
# off reads backslashes in '...' as escapes; some client encodings hide a quote in a
# multibyte character).
PARSER_READING = (("standard_conforming_strings", "on"), ("client_encoding", "UTF8"))


def read_as_parser(conn: psycopg.Connection) -> None:
    """Make the session read the next query as dbplan's parser read the file, whatever the
    server's, the database's or an earlier migration's setting. The server reports both
    settings whenever they change, so this costs a query only when one is off."""
    if all(conn.info.parameter_status(name) == value for name, value in PARSER_READING):
        return
    conn.execute(b"SET standard_conforming_strings = on; SET client_encoding = 'UTF8'")


def behind_pooler(conn: psycopg.Connection) -> bool:
    """Whether ``conn`` reaches PostgreSQL through a pooler rather than its own backend.

    PostgreSQL tells a client its backend's pid at connection time; a pooler (PgBouncer,
    Odyssey, pgcat) makes up its own, since the client has no backend of its own to cancel.
    A pool in session mode looks the same from here, and is treated alike: safe, if slower.
    """
    # Asked once per connection: the executor and the lock both ask, and a fleet pays every
    # round trip once per database. What answers a connection does not change in its life.
    known = _BEHIND_POOLER.get(conn)
    if known is None:
        row = conn.execute(BACKEND_PID).fetchone()
        known = _BEHIND_POOLER[conn] = row is None or row[0] != conn.info.backend_pid
    return known


_BEHIND_POOLER: weakref.WeakKeyDictionary[psycopg.Connection, bool] = weakref.WeakKeyDictionary()


def try_lock_unless_pooled(conn: psycopg.Connection, key: int) -> bool | None:
    """``behind_pooler`` and a first try of the session advisory lock on ``key``, in one
    round trip (a fleet asks both of every database): None when ``conn`` is behind a
    pooler, and then no lock was taken (it would stay on a pooled backend, blocking every
    client of the pool); else whether the lock was taken."""
    row = conn.execute(
        # Every name with its schema: a migration may have put a schema of its own, with a
        # pg_try_advisory_lock() that takes nothing, before pg_catalog (see facts.py).
        "SELECT pg_catalog.pg_backend_pid(), CASE WHEN pg_catalog.pg_backend_pid() OPERATOR(pg_catalog.=) "
        "%s::pg_catalog.int4 THEN pg_catalog.pg_try_advisory_lock(%s::pg_catalog.int8) END",
        (conn.info.backend_pid, key),
    ).fetchone()
    pooled = _BEHIND_POOLER[conn] = row is None or row[0] != conn.info.backend_pid
    return None if pooled else bool(row and row[1])


def connection_lost(conn: psycopg.Connection, err: BaseException) -> bool:
    """Whether ``err`` means the server session went away (terminated, restarted, network)."""
    import psycopg

    if conn.closed or conn.broken:
        return True
    sqlstate = err.diag.sqlstate if isinstance(err, psycopg.Error) else None
    return bool(sqlstate and sqlstate.startswith(CONNECTION_LOST_SQLSTATES))

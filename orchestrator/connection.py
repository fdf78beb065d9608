"""Connections to the estate's servers, shared by inspection and execution.

Every connection is autocommit (dbplan opens its transactions explicitly, so a migration
and its bookkeeping always travel together), names itself ``dbplan`` in
``pg_stat_activity``, and never prepares statements (PgBouncer in transaction mode cannot
keep them). Errors name the server and never its password.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import ConnectionFailed
from .model import Server, redact_url

if TYPE_CHECKING:
    import psycopg

APPLICATION_NAME = "dbplan"
CONNECT_TIMEOUT_SECONDS = 10


def server_url(server: Server) -> str:
    """The admin URL of a server, starting the embedded one if it is not running."""
    if server.url:
        return server.url
    assert server.embedded is not None  # config guarantees one of the two
    from .embedded import EmbeddedServer

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
    accepting connections yet (containers that start the database and dbplan together).
    """
    import psycopg

    dbname = database or server.maintenance_database
    deadline = time.monotonic() + wait_seconds
    delay = 0.2
    while True:
        try:
            return psycopg.connect(
                url,
                dbname=dbname,
                autocommit=True,
                prepare_threshold=None,
                application_name=APPLICATION_NAME,
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
            )
        except psycopg.OperationalError as err:
            reason = _first_line(str(err), url)
            if time.monotonic() + delay < deadline:
                if on_retry:
                    on_retry(f"server '{server.name}' is not reachable yet ({reason}); retrying")
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            raise ConnectionFailed(
                f"cannot connect to server '{server.name}' (database '{dbname}', {describe(server)}): {reason}",
                server=server.name,
                hint="check that the server is running and the url is right"
                + ("" if wait_seconds else "; --wait SECONDS retries while it starts"),
            ) from None
        except psycopg.Error as err:
            raise ConnectionFailed(
                f"cannot connect to server '{server.name}': {_first_line(str(err), url)}", server=server.name
            ) from None


def describe(server: Server) -> str:
    if server.url:
        return redact_url(server.url)
    assert server.embedded is not None
    return f"embedded, data in {server.embedded.data_dir}"


def _first_line(message: str, url: str) -> str:
    # libpq messages can quote the conninfo; make sure no password slips through.
    from .model import url_password

    line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    password = url_password(url)
    return line.replace(password, "***") if password else line

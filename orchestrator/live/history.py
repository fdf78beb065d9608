"""The history table of each service, as ``dbplan history`` shows it: what ran, when, how
long it took, who ran it and why. Read-only, like every other fact."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from ..estate.model import Estate, Service
from .connection import connect, server_url
from .facts import LiveState, unreadable

if TYPE_CHECKING:
    import psycopg

# The newest events first, so that a LIMIT keeps the latest; shown oldest first.
HISTORY_EVENTS = (
    "SELECT id, version, title, event, applied_at, duration_ms, applied_by, reason, checksum "
    "FROM {history} ORDER BY id DESC LIMIT {limit}"
)


@dataclass(frozen=True)
class HistoryEvent:
    id: int
    version: int
    title: str | None
    event: str  # apply | revert | force | baseline | accept
    applied_at: datetime
    duration_ms: int | None
    applied_by: str | None
    reason: str | None
    checksum: str | None


@dataclass(frozen=True)
class ServiceHistory:
    service: str
    database: str
    server: str
    table: str | None  # schema.table of the history, None when it does not exist (yet)
    events: tuple[HistoryEvent, ...]  # oldest first
    more: bool = False  # older events were left out by the limit


def read_history(estate: Estate, live: LiveState, *, limit: int | None = None) -> list[ServiceHistory]:
    """Each service's history events (the latest ``limit`` of them; None: all)."""
    histories = []
    for service in estate.services.values():
        facts = live.services[service.name]
        server = estate.server_of_service(service)
        if not facts.history_exists or facts.schema is None:
            histories.append(ServiceHistory(service.name, service.database, server.name, None, ()))
            continue
        with connect(server, server_url(server), service.database) as conn:
            events, more = _events(conn, service, facts.schema, limit, server.name)
        table = f"{facts.schema}.{service.history_table}"
        histories.append(ServiceHistory(service.name, service.database, server.name, table, events, more))
    return histories


def _events(
    conn: psycopg.Connection, service: Service, schema: str, limit: int | None, server_name: str
) -> tuple[tuple[HistoryEvent, ...], bool]:
    import psycopg
    from psycopg import sql

    query = sql.SQL(HISTORY_EVENTS).format(
        history=sql.Identifier(schema, service.history_table),
        limit=sql.Literal(limit + 1) if limit is not None else sql.SQL("ALL"),
    )
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            rows = conn.execute(query).fetchall()
    except psycopg.Error as err:
        raise unreadable(service, "history", err, server_name) from err
    more = limit is not None and len(rows) > limit
    kept = rows[:limit] if limit is not None else rows
    return tuple(HistoryEvent(*row) for row in reversed(kept)), more

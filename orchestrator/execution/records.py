"""The writer of ``dbplan force``, ``dbplan baseline`` and ``dbplan accept``: history rows
(and schema_migrations) recorded on a person's word, never a migration run.

Each takes the migrations lock that apply takes (waiting out loud), reads the service
again under it, and writes only if nothing changed since the person looked: what they
decided from is then still true. What to write is decided by ``planning.records``.
"""

from __future__ import annotations

from collections.abc import Callable

from psycopg import sql

from ..errors import DbplanError
from ..estate.model import Estate, Service
from ..live.connection import connect, server_url
from ..live.facts import ServiceFacts, claimed_schemas, read_server, read_service
from ..live.locks import LockWait, advisory_lock, migrations_lock_key
from ..migrations.scan import MigrationSet
from ..planning.records import Recording
from . import bookkeeping
from .guard import GUARD_MOVED_SQLSTATE, expect_version, guard_refusal

# Decides what to record from the service's facts (raises DbplanError to refuse).
Decide = Callable[[Service, MigrationSet, ServiceFacts], Recording]


def find_service(estate: Estate, service_name: str) -> Service:
    from ..estate.load import suggest

    service = estate.services.get(service_name)
    if service is None:
        match = suggest(service_name, estate.services)
        raise DbplanError(
            f"unknown service '{service_name}'" + (f"; did you mean '{match}'?" if match else ""),
            hint=f"services: {_listed(list(estate.services))}",
        )
    return service


def _listed(names: list[str], limit: int = 10) -> str:
    """A fleet has thousands of services: name a few, count the rest."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def record(
    estate: Estate,
    migration_sets: dict[str, MigrationSet],
    service: Service,
    decide: Decide,
    *,
    command: str,
    lock_wait: float,
    on_wait: Callable[[str], None] | None = None,
    while_unchanged: bool = True,
) -> Recording:
    """Decide from the live facts, then write the decision under the migrations lock
    (``on_wait`` hears that it waits for it): only if the service is still as it was
    (``while_unchanged``), or else decided again from the facts read under the lock, for
    a decision about one version that another run's work elsewhere does not change."""
    import psycopg

    server = estate.server_of_service(service)
    _require_database(estate, service)
    migration_set = migration_sets[service.name]
    owner = estate.databases[service.database].owner
    with connect(server, server_url(server), service.database) as conn:
        seen = read_service(conn, service, owner, server=server.name, claimed=claimed_schemas(estate, service))
        version = decide(service, migration_set, seen).version  # a refusal needs no wait for the lock
        assert seen.schema is not None
        tables = bookkeeping.Tables(seen.schema, service.table, service.history_table)
        key = migrations_lock_key(service.database, seen.schema, service.table)
        what = f"the migrations of service '{service.name}'"
        with advisory_lock(LockWait(conn, key, what, wait_seconds=lock_wait, on_wait=on_wait)):
            # A run that held the lock may have moved the service on meanwhile (it was in a
            # no-transaction migration, say): what the person saw is no longer true, and
            # recording their word now could make the next apply run migrations again.
            now = read_service(conn, service, owner, server=server.name, schema=seen.schema)
            if while_unchanged and _state(now) != _state(seen):
                raise _moved_on(command, version, service.name, seen, now)
            recording = decide(service, migration_set, now)
            statements = (
                bookkeeping.create_tables(tables, create_schema=service.schema is not None)
                # The lock may have been released by a migration; the bookkeeping checks for itself.
                + expect_version(tables, now.version, dirty=now.dirty)
                + _statements(tables, recording)
            )
            try:
                with conn.transaction():
                    conn.execute(statements.as_string(conn).encode())
            except psycopg.Error as err:
                if guard_refusal(err) != GUARD_MOVED_SQLSTATE:
                    raise
                later = read_service(conn, service, owner, server=server.name, schema=seen.schema)
                raise _moved_on(command, version, service.name, seen, later) from None
    return recording


def _statements(tables: bookkeeping.Tables, recording: Recording) -> sql.Composed:
    statements = sql.Composed([])
    for row in recording.rows:
        statements += bookkeeping.record_event(
            tables,
            version=row.version,
            title=row.title,
            checksum=row.checksum,
            event=row.event,
            reason=row.reason,
            duration_ms=None,  # nothing ran: history shows no duration rather than 0 ms
        )
    if recording.sets_version:
        statements += bookkeeping.set_version(tables, recording.version_after, False)
    return statements


def _require_database(estate: Estate, service: Service) -> None:
    """These commands record where an existing database stands; they create nothing."""
    server = estate.server_of_service(service)
    with connect(server, server_url(server)) as conn:
        databases = read_server(conn, server).databases
    if service.database not in databases:
        raise DbplanError(
            f"database '{service.database}' of service '{service.name}' does not exist on server '{server.name}': "
            "there is nothing to record yet",
            service=service.name,
            server=server.name,
            hint="create it with 'dbplan apply' (which also runs the migrations), or by hand first",
        )


def _state(facts: ServiceFacts) -> tuple[int | None, bool, int | None]:
    """What a person who saw ``facts`` saw: the version, the dirty flag, and (through the
    number of history rows) whether anyone wrote since."""
    return (facts.version, facts.dirty, facts.history_count)


def _moved_on(command: str, version: int, service: str, seen: ServiceFacts, now: ServiceFacts) -> DbplanError:
    return DbplanError(
        f"the migrations of service '{service}' changed while {command} waited for the lock: they were "
        f"{_describe(seen)}, now they are {_describe(now)}; version {version} was not recorded",
        service=service,
        hint=f"run 'dbplan status' to see where the service stands now, then {command} again if it is still needed",
    )


def _describe(facts: ServiceFacts) -> str:
    if facts.version is None:
        state = "at no version"
    else:
        state = f"at version {facts.version}" + (" (dirty)" if facts.dirty else "")
    events = facts.history_count or 0
    return f"{state}, {events} history event{'s' if events != 1 else ''}"

"""``dbplan force``: the one writer besides the executor, and it writes bookkeeping only.

After a no-transaction migration failed part-way, a person repairs the database by hand
and records which version it is now at. The history keeps who did it, when and why.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import DbplanError
from ..estate.model import Estate
from ..live.connection import connect, server_url
from ..live.facts import ServiceFacts, claimed_schemas, read_service
from ..live.locks import LockWait, advisory_lock, migrations_lock_key
from ..migrations.scan import MigrationSet
from . import bookkeeping
from .guard import GUARD_MOVED_SQLSTATE, expect_version
from .migration_run import sqlstate_of


def force_version(
    estate: Estate,
    migration_sets: dict[str, MigrationSet],
    service_name: str,
    version: int,
    *,
    reason: str | None,
    lock_wait: float,
    on_wait: Callable[[str], None] | None = None,
) -> None:
    """Record ``version`` as the service's current version, not dirty, under the
    migrations lock (``on_wait`` hears that it waits for it), and only if the service is
    still as it was when force started."""
    from ..estate.load import suggest

    service = estate.services.get(service_name)
    if service is None:
        match = suggest(service_name, estate.services)
        raise DbplanError(
            f"unknown service '{service_name}'" + (f"; did you mean '{match}'?" if match else ""),
            hint=f"services: {', '.join(estate.services)}",
        )
    by_version = migration_sets[service.name].by_version()
    if version != 0 and version not in by_version:
        known = ", ".join(str(v) for v in sorted(by_version)) or "none"
        raise DbplanError(
            f"service '{service.name}' has no migration with version {version}",
            service=service.name,
            hint=f"versions in {service.migrations_display}: {known}; 0 means 'no migration applied'",
        )
    import psycopg

    server = estate.server_of_service(service)
    owner = estate.databases[service.database].owner
    with connect(server, server_url(server), service.database) as conn:
        seen = read_service(conn, service, owner, claimed=claimed_schemas(estate, service))
        assert seen.schema is not None
        tables = bookkeeping.Tables(seen.schema, service.table, service.history_table)
        key = migrations_lock_key(service.database, seen.schema, service.table)
        what = f"the migrations of service '{service.name}'"
        with advisory_lock(LockWait(conn, key, what, wait_seconds=lock_wait, on_wait=on_wait)):
            # A run that held the lock may have moved the service on meanwhile (it was in a
            # no-transaction migration, say): what the person saw is no longer true, and
            # recording their version now would make the next apply run migrations again.
            now = read_service(conn, service, owner, schema=seen.schema)
            if _state(now) != _state(seen):
                raise _moved_on(service.name, version, seen, now)
            migration = by_version.get(version)
            statements = (
                bookkeeping.create_tables(tables, create_schema=service.schema is not None)
                # The lock may have been released by a migration; the bookkeeping checks for itself.
                + expect_version(tables, now.version, dirty=now.dirty)
                + bookkeeping.record_event(
                    tables,
                    version=version,
                    title=migration.title if migration else None,
                    checksum=migration.up.checksum if migration else None,
                    event="force",
                    reason=reason,
                    duration_ms=0,
                )
                + bookkeeping.set_version(tables, version or None, False)
            )
            try:
                with conn.transaction():
                    conn.execute(statements.as_string(conn).encode())
            except psycopg.Error as err:
                if sqlstate_of(err) != GUARD_MOVED_SQLSTATE:
                    raise
                raise _moved_on(service.name, version, seen, read_service(conn, service, owner, schema=seen.schema)) from None


def _state(facts: ServiceFacts) -> tuple[int | None, bool, int | None]:
    """What a person who saw ``facts`` saw: the version, the dirty flag, and (through the
    number of history rows) whether anyone wrote since."""
    return (facts.version, facts.dirty, facts.history_count)


def _moved_on(service: str, version: int, seen: ServiceFacts, now: ServiceFacts) -> DbplanError:
    return DbplanError(
        f"the migrations of service '{service}' changed while force waited for the lock: they were "
        f"{_describe(seen)}, now they are {_describe(now)}; version {version} was not recorded",
        service=service,
        hint="run 'dbplan status' to see where the service stands now, then force again if it is still needed",
    )


def _describe(facts: ServiceFacts) -> str:
    if facts.version is None:
        state = "at no version"
    else:
        state = f"at version {facts.version}" + (" (dirty)" if facts.dirty else "")
    events = facts.history_count or 0
    return f"{state}, {events} history event{'s' if events != 1 else ''}"

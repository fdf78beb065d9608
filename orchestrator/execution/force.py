"""``dbplan force``: the one writer besides the executor, and it writes bookkeeping only.

After a no-transaction migration failed part-way, a person repairs the database by hand
and records which version it is now at. The history keeps who did it, when and why.
"""

from __future__ import annotations

from ..errors import DbplanError
from ..estate.model import Estate
from ..live.connection import connect, server_url
from ..live.facts import claimed_schemas, read_service
from ..live.locks import LockWait, advisory_lock, migrations_lock_key
from ..migrations.scan import MigrationSet
from . import bookkeeping


def force_version(
    estate: Estate,
    migration_sets: dict[str, MigrationSet],
    service_name: str,
    version: int,
    *,
    reason: str | None,
    lock_wait: float,
) -> None:
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
    server = estate.server_of_service(service)
    owner = estate.databases[service.database].owner
    with connect(server, server_url(server), service.database) as conn:
        facts = read_service(conn, service, owner, claimed=claimed_schemas(estate, service))
        assert facts.schema is not None
        tables = bookkeeping.Tables(facts.schema, service.table, service.history_table)
        key = migrations_lock_key(service.database, facts.schema, service.table)
        with advisory_lock(LockWait(conn, key, f"the migrations of service '{service.name}'", wait_seconds=lock_wait)):
            migration = by_version.get(version)
            statements = (
                bookkeeping.create_tables(tables, create_schema=service.schema is not None)
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
            with conn.transaction():
                conn.execute(statements.as_string(conn).encode())

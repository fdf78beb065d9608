"""``dbplan adopt``: take dbmate's or Flyway's bookkeeping over without running anything.

It writes dbplan's tables only (one 'adopt' history row per version the other tool
applied, and schema_migrations at the highest), in one transaction under the migrations
lock. The other tool's table is read, never written: the team can go back to that tool.
"""

from __future__ import annotations

from psycopg import sql

from ..errors import DbplanError
from ..estate.model import Estate
from ..live.connection import connect, server_url
from ..live.facts import claimed_schemas, read_service
from ..live.locks import LockWait, advisory_lock, migrations_lock_key
from ..migrations.scan import MigrationSet
from ..planning.adoption import Takeover, takeover
from . import bookkeeping
from .records import find_service


def adopt_service(
    estate: Estate, migration_sets: dict[str, MigrationSet], service_name: str, *, lock_wait: float
) -> Takeover:
    """Record what dbmate or Flyway applied as applied by dbplan; refuse (nothing changed)
    a database without such bookkeeping, one dbplan keeps already, or one whose rows do not
    match the files."""
    service = find_service(estate, service_name)
    server = estate.server_of_service(service)
    owner = estate.databases[service.database].owner
    if service.database not in _databases(estate, service.database):
        raise DbplanError(f"database '{service.database}' of service '{service.name}' does not exist", service=service.name)
    with connect(server, server_url(server), service.database) as conn:
        seen = read_service(conn, service, owner, server=server.name, claimed=claimed_schemas(estate, service))
        assert seen.schema is not None
        if seen.history_exists:
            raise DbplanError(
                f"service '{service.name}' already keeps dbplan's bookkeeping in {seen.schema}.{service.history_table}: "
                "there is nothing to adopt",
                service=service.name,
            )
        foreign = seen.foreign
        if foreign is None:
            raise DbplanError(
                f"cannot adopt service '{service.name}': database '{service.database}' holds no dbmate table "
                f"({seen.schema}.schema_migrations with a text version) and no {seen.schema}.flyway_schema_history",
                service=service.name,
                hint="check the database the service names; a golang-migrate database needs no adopt "
                "(dbplan apply takes it over as it is)",
            )
        if foreign.tool == "dbmate" and foreign.table == service.table:
            raise DbplanError(
                f"cannot adopt service '{service.name}': its migrations table '{service.table}' is dbmate's own, and "
                "dbplan's bookkeeping in it would stop dbmate from reading it",
                place=service.place,
                service=service.name,
                hint=f"set 'table: dbplan_migrations' on service '{service.name}' in the plan file, then adopt again",
            )
        taken = takeover(service, migration_sets[service.name], foreign)
        tables = bookkeeping.Tables(seen.schema, service.table, service.history_table)
        key = migrations_lock_key(service.database, seen.schema, service.table)
        what = f"the migrations of service '{service.name}'"
        with advisory_lock(LockWait(conn, key, what, wait_seconds=lock_wait)):
            now = read_service(conn, service, owner, server=server.name, schema=seen.schema)
            if now.history_exists or now.foreign != foreign:
                raise DbplanError(
                    f"the bookkeeping of service '{service.name}' changed while adopt waited for the lock; nothing "
                    "was recorded",
                    service=service.name,
                    hint="run 'dbplan plan' to see where it stands now",
                )
            with conn.transaction():
                conn.execute(_statements(tables, service.schema is not None, taken).as_string(conn).encode())
    return taken


def _statements(tables: bookkeeping.Tables, create_schema: bool, taken: Takeover) -> sql.Composed:
    reason = f"adopted from {taken.tool} ({taken.source}): applied before dbplan kept history"
    statements = bookkeeping.create_tables(tables, create_schema=create_schema)
    if taken.baseline is not None:  # first: the planner lets a later event override it
        statements += bookkeeping.record_event(
            tables, version=taken.baseline, title=None, checksum=None, event="baseline",
            reason=f"adopted from {taken.tool} ({taken.source}): its baseline", duration_ms=0,
        )  # fmt: skip
    for migration in taken.applied:
        statements += bookkeeping.record_event(
            tables, version=migration.version, title=migration.title, checksum=migration.up.checksum,
            event="adopt", reason=reason, duration_ms=0,
        )  # fmt: skip
    for repeatable in taken.repeatables:  # the version only says where the service stood
        statements += bookkeeping.record_event(
            tables, version=taken.version or 0, title=repeatable.description, checksum=repeatable.file.checksum,
            event="adopt_repeatable", reason=f"adopted from {taken.tool} ({taken.source}): its checksum matched",
            duration_ms=0,
        )  # fmt: skip
    return statements + bookkeeping.set_version(tables, taken.version, False)


def _databases(estate: Estate, name: str) -> frozenset[str]:
    from ..live.facts import read_server

    server = estate.servers[estate.databases[name].server]
    with connect(server, server_url(server)) as conn:
        return read_server(conn, server).databases


def hand_back(estate: Estate, migration_sets: dict[str, MigrationSet], service_name: str, *, lock_wait: float) -> list[str]:
    """Make dbmate's table list exactly the versions dbplan has applied, so that the team
    can go back to dbmate without it running anything again; returns them as written."""
    from ..live.facts import DBMATE_TABLE, read_foreign
    from ..planning.planner import applied_versions

    service = find_service(estate, service_name)
    server = estate.server_of_service(service)
    owner = estate.databases[service.database].owner
    migration_set = migration_sets[service.name]
    with connect(server, server_url(server), service.database) as conn:
        seen = read_service(conn, service, owner, server=server.name, claimed=claimed_schemas(estate, service))
        assert seen.schema is not None
        with conn.transaction():
            foreign = read_foreign(conn, seen.schema)
        if not seen.history_exists or foreign is None or foreign.tool != "dbmate" or service.table == DBMATE_TABLE:
            raise DbplanError(
                f"cannot hand service '{service.name}' back to dbmate: database '{service.database}' needs both "
                f"dbplan's bookkeeping ({seen.schema}.{service.history_table}) and dbmate's "
                f"({seen.schema}.{DBMATE_TABLE}), as 'dbplan adopt' leaves them",
                service=service.name,
            )
        key = migrations_lock_key(service.database, seen.schema, service.table)
        with advisory_lock(LockWait(conn, key, f"the migrations of service '{service.name}'", wait_seconds=lock_wait)):
            now = read_service(conn, service, owner, server=server.name, schema=seen.schema)
            if now.dirty:
                raise DbplanError(f"service '{service.name}' is dirty: fix it before handing it back", service=service.name)
            by_version = migration_set.by_version()
            written = [
                by_version[v].written_version if v in by_version else str(v)
                for v in applied_versions(now, migration_set)
            ]
            table = sql.Identifier(seen.schema, DBMATE_TABLE)
            kept = {int(v) for v in written}
            with conn.transaction():
                for version in foreign.dbmate_versions:  # reverted under dbplan: not applied for dbmate either
                    if not version.isdigit() or int(version) not in kept:
                        conn.execute(sql.SQL("DELETE FROM {} WHERE version = %s").format(table), (version,))
                present = {int(v) for v in foreign.dbmate_versions if v.isdigit()}
                for version in written:
                    if int(version) not in present:
                        conn.execute(sql.SQL("INSERT INTO {} (version) VALUES (%s)").format(table), (version,))
    return written

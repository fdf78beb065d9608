"""Read the live servers into a frozen snapshot.

Each server is read once (its databases and roles) and each existing database once (the
bookkeeping tables of every service in it). Databases that do not exist are not connected
to. All queries are named constants and run read-only; nothing here writes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from ..errors import ConfigError, ConnectionFailed
from ..estate.model import Estate, Server, Service
from .connection import connect, connection_bound, server_url
from .locks import lock_holder, migrations_lock_key

if TYPE_CHECKING:
    import psycopg

SERVER_FACTS = """
SELECT current_setting('server_version') AS version,
       (SELECT array_agg(datname::text) FROM pg_database) AS databases,
       (SELECT array_agg(rolname::text) FROM pg_roles) AS roles,
       (SELECT json_object_agg(datname, pg_get_userbyid(datdba)) FROM pg_database) AS database_owners,
       inet_server_addr()::text AS address,
       current_setting('port') AS port
"""
# pg_control_system() is restricted to privileged roles on some servers; its absence only
# weakens a saved plan's server identity check to the server's address.
SYSTEM_IDENTIFIER = "SELECT system_identifier::text FROM pg_control_system()"
CURRENT_SCHEMA = "SELECT coalesce(current_schema(), 'public')"
TABLE_EXISTS = "SELECT to_regclass(quote_ident(%s) || '.' || quote_ident(%s)) IS NOT NULL"
ROLE_EXISTS = "SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = %s)"
# Every schema that holds a table of this name, and whether the history table is beside it.
TABLE_LOCATIONS = """
SELECT n.nspname::text,
       EXISTS (SELECT FROM pg_class h WHERE h.relnamespace = n.oid AND h.relname = %s AND h.relkind IN ('r', 'p'))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = %s AND c.relkind IN ('r', 'p')
  AND n.nspname !~ '^pg_(toast|temp_)'
ORDER BY 1
"""
INVALID_INDEXES = """
SELECT format('%I.%I', n.nspname, c.relname)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE NOT i.indisvalid ORDER BY 1
"""


@dataclass(frozen=True)
class HistoryEntry:
    """The latest event recorded for one version."""

    version: int
    event: str  # apply | revert | force | baseline | accept
    checksum: str | None
    title: str | None
    id: int = 0  # order of events: a later force overrides every earlier event


@dataclass(frozen=True)
class ServiceFacts:
    service: str
    database_exists: bool
    schema: str | None = None  # where the migrations table is (or will be)
    table_exists: bool = False
    history_exists: bool = False
    version: int | None = None  # schema_migrations.version; None when no row
    dirty: bool = False
    history: tuple[HistoryEntry, ...] = ()
    last_force: HistoryEntry | None = None
    invalid_indexes: tuple[str, ...] = ()
    # Every dbplan event appends a history row, so with the version this tells whether
    # anyone wrote since: the executor's guard behind a connection pooler compares it.
    history_count: int | None = None  # None: no history table
    # Set when the service is dirty while another session holds its migrations lock: a
    # run is applying a no-transaction migration right now; it did not fail (yet).
    dirty_in_progress: str | None = None  # who holds the lock

    def history_by_version(self) -> dict[int, HistoryEntry]:
        return {entry.version: entry for entry in self.history}


@dataclass(frozen=True)
class ServerFacts:
    server: str
    version: str
    system_identifier: str | None
    address: str | None
    databases: frozenset[str]
    roles: frozenset[str]
    database_owners: Mapping[str, str] = field(default_factory=dict)  # database -> owning role


@dataclass(frozen=True)
class LiveState:
    servers: dict[str, ServerFacts]
    services: dict[str, ServiceFacts]


def inspect(
    estate: Estate,
    *,
    wait_seconds: float = 0.0,
    on_retry: Callable[[str], None] | None = None,
    parallel: int | None = None,
) -> LiveState:
    """Read every server and every existing database the plan file names.

    The servers are read side by side, and the databases of each server through at most
    ``connection_bound(server, parallel)`` connections at once. The result is the one a
    sequential read gives (same order, same first error), so the plan does not depend on
    which connection answered first.
    """
    estate.require_secrets()
    listed = list(estate.servers.values())
    reads = run_all(
        [partial(_inspect_server, estate, server, wait_seconds, on_retry, parallel) for server in listed],
        workers=len(listed),
    )
    servers: dict[str, ServerFacts] = {}
    services: dict[str, ServiceFacts] = {}
    for server, (server_facts, service_facts) in zip(listed, reads):
        servers[server.name] = server_facts
        services.update(service_facts)
    return LiveState(servers=servers, services=services)


def _inspect_server(
    estate: Estate,
    server: Server,
    wait_seconds: float,
    on_retry: Callable[[str], None] | None,
    parallel: int | None,
) -> tuple[ServerFacts, dict[str, ServiceFacts]]:
    url = server_url(server)
    with connect(server, url, wait_seconds=wait_seconds, on_retry=on_retry) as conn:
        server_facts = read_server(conn, server)
    grouped = _services_by_database(estate, server)
    existing = [database for database in grouped if database in server_facts.databases]
    reads = run_all(
        [partial(_inspect_database, estate, server, url, database, grouped[database]) for database in existing],
        workers=connection_bound(server, parallel),
    )
    read = dict(zip(existing, reads))
    services: dict[str, ServiceFacts] = {}
    for database, members in grouped.items():  # the order a sequential read gives
        for service in members:
            services[service.name] = (
                read[database][service.name] if database in read else ServiceFacts(service.name, database_exists=False)
            )
    return server_facts, services


def _inspect_database(
    estate: Estate, server: Server, url: str, database: str, members: list[Service]
) -> dict[str, ServiceFacts]:
    owner = estate.databases[database].owner
    with connect(server, url, database) as conn:
        found = {
            service.name: read_service(conn, service, owner, claimed=claimed_schemas(estate, service, members))
            for service in members
        }
    _refuse_shared_bookkeeping(members, {name: facts.schema for name, facts in found.items()})
    return found


T = TypeVar("T")


def run_all(tasks: Sequence[Callable[[], T]], *, workers: int) -> list[T]:
    """Run ``tasks`` on up to ``workers`` threads (each task opens its own connection:
    psycopg connections are not shared between threads); their results in task order.

    The first failure, in task order, is raised once the tasks already started are done;
    tasks not started yet are dropped. Since tasks start in order, that is the error a
    sequential loop would have raised. One task, or one worker, runs in this thread.
    """
    if len(tasks) <= 1 or workers <= 1:
        return [task() for task in tasks]
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    with ThreadPoolExecutor(max_workers=min(workers, len(tasks)), thread_name_prefix="dbplan-read") as pool:
        futures = [pool.submit(task) for task in tasks]
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:
            future.cancel()  # only those not started yet
    for future in futures:
        if not future.cancelled() and future.exception() is not None:
            raise future.exception()  # type: ignore[misc]
    return [future.result() for future in futures]


def claimed_schemas(estate: Estate, service: Service, members: Sequence[Service] | None = None) -> frozenset[str]:
    """The schemas where other services of the same database name their own table of
    this name (``schema:``): a table found there is theirs, not this service's.

    ``members``: the services of that database, when the caller has them (a fleet of
    thousands of services would otherwise scan them all once per service)."""
    return frozenset(
        other.schema
        for other in (estate.services.values() if members is None else members)
        if other.name != service.name and other.database == service.database
        and other.schema is not None and other.table == service.table
    )  # fmt: skip


def locate_apart(
    conn: psycopg.Connection,
    estate: Estate,
    service: Service,
    owner: str | None,
    members: Sequence[Service] | None = None,
) -> str:
    """``locate_schema`` for the executor, which may have created the database a moment
    ago (so ``inspect`` could not look): also refuses a table another service of the
    database resolves to. ``members``: the services of that database, if known."""
    if members is None:
        members = [other for other in estate.services.values() if other.database == service.database]
    members = list(members)
    schemas = {other.name: locate_schema(conn, other, owner, claimed_schemas(estate, other, members)) for other in members}
    _refuse_shared_bookkeeping(members, schemas)
    return schemas[service.name]


def _refuse_shared_bookkeeping(members: list[Service], schemas: Mapping[str, str | None]) -> None:
    """Two services whose bookkeeping is one table would each read the other's versions
    as their own: one of them would never run its migrations."""
    owners: dict[tuple[str, str], Service] = {}
    for service in members:
        schema = schemas[service.name]
        assert schema is not None
        for table in (service.table, service.history_table):
            other = owners.setdefault((schema, table), service)
            if other is not service:
                raise ConfigError(
                    f"services '{other.name}' and '{service.name}' would share the bookkeeping table {schema}.{table} "
                    f"in database '{service.database}' ("
                    + " and ".join(_how_located(s) for s in (other, service))
                    + ")",
                    place=service.place,
                    service=service.name,
                    hint=f"give one of them a schema or table of its own (services.{service.name}.schema or .table)",
                )


def _how_located(service: Service) -> str:
    if service.schema is not None:
        return f"'{service.name}' names schema '{service.schema}'"
    return f"'{service.name}' uses the default, which is that schema here"


def _services_by_database(estate: Estate, server: Server) -> dict[str, list[Service]]:
    grouped: dict[str, list[Service]] = {}
    for service in estate.services.values():
        if estate.databases[service.database].server == server.name:
            grouped.setdefault(service.database, []).append(service)
    return grouped


def read_server(conn: psycopg.Connection, server: Server) -> ServerFacts:
    import psycopg

    try:
        row = conn.execute(SERVER_FACTS).fetchone()
        assert row is not None
        version, databases, roles, database_owners, address, port = row
        try:
            identifier_row = conn.execute(SYSTEM_IDENTIFIER).fetchone()
            identifier = identifier_row[0] if identifier_row else None
        except psycopg.errors.InsufficientPrivilege:
            identifier = None
    except psycopg.Error as err:
        raise ConnectionFailed(f"cannot read server '{server.name}': {err}", server=server.name) from err
    return ServerFacts(
        server=server.name,
        version=version,
        system_identifier=identifier,
        address=f"{address or 'local'}:{port}",
        databases=frozenset(databases or ()),
        roles=frozenset(roles or ()),
        database_owners=dict(database_owners or {}),
    )


def read_service(
    conn: psycopg.Connection,
    service: Service,
    owner: str | None,
    *,
    schema: str | None = None,
    claimed: frozenset[str] = frozenset(),
) -> ServiceFacts:
    """Read one service's bookkeeping through an open connection to its database: in
    ``schema`` if given (the executor's, fixed for its run), else where ``locate_schema``
    finds it.

    The executor calls this too, under the lock, to re-plan against fresh facts.
    """
    import psycopg

    try:
        with conn.transaction():
            # One snapshot for every query: the executor trusts these facts as one state.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            schema = schema or locate_schema(conn, service, owner, claimed)
            table_exists = _table_exists(conn, schema, service.table)
            history_exists = _table_exists(conn, schema, service.history_table)
            version, dirty = _current_version(conn, schema, service.table) if table_exists else (None, False)
            history, last_force = _history(conn, schema, service.history_table) if history_exists else ((), None)
            history_count = _count_rows(conn, schema, service.history_table) if history_exists else None
            in_progress = lock_holder(conn, migrations_lock_key(service.database, schema, service.table)) if dirty else None
            invalid = tuple(row[0] for row in conn.execute(INVALID_INDEXES))
    except psycopg.Error as err:
        raise unreadable(service, "migrations", err) from err
    return ServiceFacts(
        service=service.name,
        database_exists=True,
        schema=schema,
        table_exists=table_exists,
        history_exists=history_exists,
        version=version,
        dirty=dirty,
        history=history,
        last_force=last_force,
        invalid_indexes=invalid,
        history_count=history_count,
        dirty_in_progress=in_progress,
    )


def locate_schema(conn: psycopg.Connection, service: Service, owner: str | None, claimed: frozenset[str]) -> str:
    """Where the service's migrations table is, or will be created (in a transaction).

    The plan file's ``schema`` if it names one. Otherwise the table is looked for where it
    is, in every schema: working the default out again on every run (the owner's
    ``current_schema()``) let a migration move it (``CREATE SCHEMA`` named like the owner
    under the default ``search_path "$user", public``, or ``ALTER ROLE ... SET
    search_path``), and the next run started again from none. Only a table that does
    not exist yet goes to the owner's ``current_schema()``, as golang-migrate's does.
    One with the history table beside it is dbplan's; several candidates, none of them
    in the current schema, are an error rather than a guess.
    """
    if service.schema is not None:
        return service.schema
    rows = conn.execute(TABLE_LOCATIONS, (service.history_table, service.table)).fetchall()
    found = [(schema, with_history) for schema, with_history in rows if schema not in claimed]
    if not found:
        return resolve_schema(conn, owner)
    candidates = [schema for schema, with_history in found if with_history] or [schema for schema, _ in found]
    if len(candidates) == 1:
        return candidates[0]
    current = resolve_schema(conn, owner)
    if current in candidates:
        return current
    raise ConfigError(
        f"service '{service.name}' has a migrations table '{service.table}' in several schemas of database "
        f"'{service.database}' ({', '.join(candidates)}), none of them the current schema '{current}'",
        place=service.place,
        service=service.name,
        hint=f"say which one is the service's with services.{service.name}.schema in the plan file",
    )


def unreadable(service: Service, what: str, err: Exception) -> ConnectionFailed:
    """A service's bookkeeping could not be read: the server's message, where it was read."""
    return ConnectionFailed(
        f"cannot read the {what} of service '{service.name}' in database '{service.database}': {str(err).strip()}",
        service=service.name,
    )


def resolve_schema(conn: psycopg.Connection, owner: str | None) -> str:
    """The schema golang-migrate would use: current_schema() of the role migrations run as."""
    from psycopg import sql

    role_row = conn.execute(ROLE_EXISTS, (owner,)).fetchone() if owner else None
    if owner and role_row and role_row[0]:
        conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(owner)))
        row = conn.execute(CURRENT_SCHEMA).fetchone()
        conn.execute("RESET ROLE")
    else:
        row = conn.execute(CURRENT_SCHEMA).fetchone()
    return row[0] if row else "public"


def _table_exists(conn: psycopg.Connection, schema: str, table: str) -> bool:
    row = conn.execute(TABLE_EXISTS, (schema, table)).fetchone()
    return bool(row and row[0])


def _count_rows(conn: psycopg.Connection, schema: str, table: str) -> int:
    from psycopg import sql

    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))).fetchone()
    return int(row[0]) if row else 0


def _current_version(conn: psycopg.Connection, schema: str, table: str) -> tuple[int | None, bool]:
    from psycopg import sql

    query = sql.SQL("SELECT version, dirty FROM {}.{} ORDER BY version DESC LIMIT 1").format(
        sql.Identifier(schema), sql.Identifier(table)
    )
    row = conn.execute(query).fetchone()
    if row is None:
        return None, False
    version = row[0]
    # golang-migrate writes -1 for "no version" in some drivers.
    return (None if version is None or version < 0 else int(version)), bool(row[1])


def _history(
    conn: psycopg.Connection, schema: str, table: str
) -> tuple[tuple[HistoryEntry, ...], HistoryEntry | None]:
    """The latest event of every version, and the latest force or baseline.

    A force (or the baseline written when dbplan adopts a golang-migrate database) says
    "exactly the versions up to here are applied" and overrides older events.
    """
    from psycopg import sql

    table_id = sql.Identifier(schema, table)
    latest = sql.SQL(
        "SELECT DISTINCT ON (version) version, event, checksum, title, id FROM {} ORDER BY version, id DESC"
    ).format(table_id)
    last_force = sql.SQL(
        "SELECT version, event, checksum, title, id FROM {} WHERE event IN ('force', 'baseline') "
        "ORDER BY id DESC LIMIT 1"
    ).format(table_id)
    entries = tuple(HistoryEntry(int(v), e, c, t, int(i)) for v, e, c, t, i in conn.execute(latest))
    force_row = conn.execute(last_force).fetchone()
    force = None
    if force_row is not None:
        version, event, checksum, title, event_id = force_row
        force = HistoryEntry(int(version), event, checksum, title, int(event_id))
    return entries, force


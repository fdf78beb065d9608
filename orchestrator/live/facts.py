"""Read the live servers into a frozen snapshot.

Each server is read once (its databases and roles) and each existing database once (the
bookkeeping tables of every service in it). Databases that do not exist are not connected
to. All queries are named constants and run read-only; nothing here writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, TypeVar

from ..errors import ConfigError, ConnectionFailed
from ..estate.model import Estate, Server, Service
from .connection import connect, connection_bound, server_url
from .failure import Failure, parse_reason
from .locks import lock_holder, migrations_lock_key

if TYPE_CHECKING:
    import psycopg

SERVER_FACTS = """
SELECT current_setting('server_version') AS version,
       (SELECT array_agg(datname::text) FROM pg_database) AS databases,
       (SELECT array_agg(rolname::text) FROM pg_roles) AS roles,
       (SELECT json_object_agg(datname, pg_get_userbyid(datdba)) FROM pg_database) AS database_owners,
       inet_server_addr()::text AS address,
       current_setting('port') AS port,
       (SELECT json_object_agg(r.rolname, json_build_object(
            'login', r.rolcanlogin,
            'connection_limit', r.rolconnlimit,
            'member_of', ARRAY(SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                               WHERE m.member = r.oid ORDER BY 1)))
        FROM pg_roles r) AS role_attributes,
       current_user::text AS connected_as,
       (SELECT rolname::text FROM pg_roles WHERE oid = 10) AS bootstrap_superuser,
       current_database()::text AS maintenance_database
"""
# Only a superuser reads pg_authid (pg_roles shows '********'). Only the roles the plan
# file gives a password are read, and the verifiers never leave ``read_server``.
STORED_PASSWORDS = "SELECT rolname::text, rolpassword FROM pg_authid WHERE rolname = ANY(%s)"
# pg_control_system() is restricted to privileged roles on some servers; its absence only
# weakens a saved plan's server identity check to the server's address.
SYSTEM_IDENTIFIER = "SELECT system_identifier::text FROM pg_control_system()"
# The queries that find and read the bookkeeping name every catalog, function, operator
# and type with its schema (pg_catalog.): a migration can put a schema of its own before
# pg_catalog in the database's search_path (ALTER DATABASE ... SET search_path = x,
# pg_catalog) and create there a pg_class, a to_regclass() or an = of its own. Every later
# session resolves unqualified names there first, and a bookkeeping table hidden that way
# would be created again, every migration applied twice. (Keywords such as coalesce, CASE
# and integer are not looked up; ORDER BY takes the type's own ordering.)
CURRENT_SCHEMA = "SELECT coalesce(pg_catalog.current_schema(), 'public')"
_REGCLASS = "pg_catalog.to_regclass(pg_catalog.format('%%I.%%I', %s::pg_catalog.text, %s::pg_catalog.text))"
TABLE_EXISTS = "SELECT " + _REGCLASS + " IS NOT NULL"


def _exist(count: int) -> str:
    """Select-list items saying whether each of ``count`` (schema, table) pairs is there."""
    return ", ".join([_REGCLASS + " IS NOT NULL"] * count)


def _pairs(schema: str, tables: Iterable[str]) -> list[str]:
    """The parameters of ``_exist``: the schema beside each table."""
    return [part for table in tables for part in (schema, table)]

ROLE_EXISTS = "SELECT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) %s::pg_catalog.name)"
# Every relation called like the migrations table or its history, in any schema: which
# schema is the service's is worked out from these rows (``_locate``). Plain comparisons
# only: a fresh session pays for every operator, function and catalog a query touches
# (the regular expression and the EXISTS this once had made it several times dearer, once
# per database of a fleet), and no join: the schema's name comes through regnamespace,
# quoted as needed (``_unquoted``).
TABLE_LOCATIONS = """
SELECT c.relnamespace::pg_catalog.regnamespace::pg_catalog.text, c.relname::pg_catalog.text,
       c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::pg_catalog."char"[])
FROM pg_catalog.pg_class c
WHERE c.relname OPERATOR(pg_catalog.=) ANY (ARRAY[%s, %s]::pg_catalog.name[])
"""
# Almost every database has no invalid index: the one-catalog probe says so for less
# than the query that names them.
_ANY_INVALID = "EXISTS (SELECT FROM pg_catalog.pg_index WHERE NOT indisvalid)"
ANY_INVALID_INDEX = "SELECT FROM pg_catalog.pg_index WHERE NOT indisvalid LIMIT 1"
INVALID_INDEXES = """
SELECT pg_catalog.format('%I.%I', n.nspname, c.relname)
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) i.indexrelid
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
WHERE NOT i.indisvalid ORDER BY 1
"""
# The size of the tables (and the tables of the indexes) that pending files name: one query
# per database, whatever the number of files. reltuples is the planner's estimate (-1:
# never analyzed).
# Read from the catalog only, never pg_total_relation_size or pg_partition_tree: those
# lock the table (ACCESS SHARE), so a plan would wait behind any session holding it
# ACCESS EXCLUSIVE, such as a running migration. relpages, like reltuples, is the estimate
# of the last VACUUM or ANALYZE.
# A fleet reads TABLE_STATS in every database, and a fresh session pays for every join,
# operator and function a query names: the columns come back raw and are worked into
# TableStats in Python (``_table_stats``), and the schemas' names come through
# regnamespace (a cache lookup, quoted as needed) rather than joins to pg_namespace. With
# the same done to TABLE_LOCATIONS, a fresh session's three reads of a plan (where the
# bookkeeping is, what it holds, these sizes) went from 9.1 to 7.2 ms on the bench machine.
# Only when one of the tables is partitioned is TABLE_STATS_PARTITIONED read as well,
# which counts the partitions (one level: a recursive walk made the query several times
# dearer to plan). Every name is pg_catalog's: a migration's search_path cannot shadow them.
_STATS_SELECT = """
SELECT c.relnamespace::pg_catalog.regnamespace::pg_catalog.text, c.relname::pg_catalog.text, c.relkind,
       t.relnamespace::pg_catalog.regnamespace::pg_catalog.text, pg_catalog.quote_ident(t.relname), t.relkind,
       {sizes}, {columns}, pg_catalog.current_setting('block_size')
FROM pg_catalog.pg_class c
LEFT JOIN pg_catalog.pg_index i ON i.indexrelid OPERATOR(pg_catalog.=) c.oid
JOIN pg_catalog.pg_class t ON t.oid OPERATOR(pg_catalog.=) coalesce(i.indrelid, c.oid)
WHERE c.relname OPERATOR(pg_catalog.=) ANY (%s::pg_catalog.name[])
  AND c.relkind OPERATOR(pg_catalog.=) ANY ('{{r,p,m,i,I}}'::pg_catalog."char"[])
"""
# The same when no name is an index (most pending files name tables only, or an index
# they create, which is not there yet): each relation is its own table, without the join
# to pg_index and back to pg_class that finds an index's table, which cost a fresh session
# 0.7 ms of the statement's 1.9. A name that turns out to be an index is read again with
# _STATS_SELECT (``read_table_stats``).
_STATS_DIRECT_SELECT = """
SELECT t.relnamespace::pg_catalog.regnamespace::pg_catalog.text, t.relname::pg_catalog.text, t.relkind,
       t.relnamespace::pg_catalog.regnamespace::pg_catalog.text, pg_catalog.quote_ident(t.relname), t.relkind,
       {sizes}, {columns}, pg_catalog.current_setting('block_size')
FROM pg_catalog.pg_class t
WHERE t.relname OPERATOR(pg_catalog.=) ANY (%s::pg_catalog.name[])
  AND t.relkind OPERATOR(pg_catalog.=) ANY ('{{r,p,m,i,I}}'::pg_catalog."char"[])
"""
# Rows, then the pages of the table, of its TOAST table and of its indexes.
_SIZES = """t.reltuples, t.relpages,
       (SELECT x.relpages FROM pg_catalog.pg_class x WHERE x.oid OPERATOR(pg_catalog.=) t.reltoastrelid),
       (SELECT pg_catalog.sum(x.relpages) FROM pg_catalog.pg_index pi
        JOIN pg_catalog.pg_class x ON x.oid OPERATOR(pg_catalog.=) pi.indexrelid
        WHERE pi.indrelid OPERATOR(pg_catalog.=) t.oid)"""
# The same for a partitioned table: the rows and pages of its partitions (with their TOAST
# tables and indexes) in the first two, nothing in the other two.
_SIZES_PARTITIONED = """CASE WHEN t.relkind OPERATOR(pg_catalog.=) 'p'
            THEN (SELECT pg_catalog.sum(l.reltuples) FILTER (WHERE l.reltuples OPERATOR(pg_catalog.>=) 0)
                  FROM pg_catalog.pg_inherits h JOIN pg_catalog.pg_class l ON l.oid OPERATOR(pg_catalog.=) h.inhrelid
                  WHERE h.inhparent OPERATOR(pg_catalog.=) t.oid)
            ELSE t.reltuples END,
       (SELECT pg_catalog.sum(l.relpages::pg_catalog.int8 OPERATOR(pg_catalog.+) coalesce(toast.relpages, 0)
                   OPERATOR(pg_catalog.+) coalesce((SELECT pg_catalog.sum(ix.relpages) FROM pg_catalog.pg_index pi
                               JOIN pg_catalog.pg_class ix ON ix.oid OPERATOR(pg_catalog.=) pi.indexrelid
                               WHERE pi.indrelid OPERATOR(pg_catalog.=) l.oid), 0))
        FROM pg_catalog.pg_class l
        LEFT JOIN pg_catalog.pg_class toast ON toast.oid OPERATOR(pg_catalog.=) l.reltoastrelid
        WHERE l.oid OPERATOR(pg_catalog.=) t.oid
           OR (t.relkind OPERATOR(pg_catalog.=) 'p' AND l.oid OPERATOR(pg_catalog.=) ANY (
               SELECT inhrelid FROM pg_catalog.pg_inherits WHERE inhparent OPERATOR(pg_catalog.=) t.oid))),
       NULL::pg_catalog.int4, NULL::pg_catalog.int8"""
_COLUMNS = """(SELECT pg_catalog.json_object_agg(a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod))
        FROM pg_catalog.pg_attribute a
        WHERE a.attrelid OPERATOR(pg_catalog.=) t.oid AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped)"""
# The column types cost a fresh session a sixth of the plan's reads: a pending file that
# changes none (most) does without them. COLUMN_TYPES among a version's names asks for
# them; no relation has that name (identifiers hold no NUL).
_NO_COLUMNS = "NULL::pg_catalog.json"
# Per (whether an index's table must be found, whether the column types are wanted).
TABLE_STATS = {
    (True, True): _STATS_SELECT.format(sizes=_SIZES, columns=_COLUMNS),
    (True, False): _STATS_SELECT.format(sizes=_SIZES, columns=_NO_COLUMNS),
    (False, True): _STATS_DIRECT_SELECT.format(sizes=_SIZES, columns=_COLUMNS),
    (False, False): _STATS_DIRECT_SELECT.format(sizes=_SIZES, columns=_NO_COLUMNS),
}
COLUMN_TYPES = "\x00column types"
TABLE_STATS_PARTITIONED = _STATS_SELECT.format(sizes=_SIZES_PARTITIONED, columns=_COLUMNS)


@dataclass(frozen=True)
class TableStats:
    """A live table (or index) a pending file names, with the size of its table."""

    schema: str
    name: str  # the relation the file names: a table, or an index
    is_index: bool
    table: str  # schema.table it is or belongs to, quoted where needed
    rows: int | None  # estimated (pg_class.reltuples); None: never analyzed
    bytes: int  # estimated from pg_class.relpages: with indexes and TOAST (0: never vacuumed or analyzed)
    columns: Mapping[str, str] = field(default_factory=dict, compare=False)  # name -> format_type


# The shape of a table called like a migrations table: golang-migrate's (and dbplan's) has
# version bigint and dirty boolean; dbmate's, of the same default name, version varchar only.
VERSION_COLUMN = """
SELECT pg_catalog.format_type(a.atttypid, a.atttypmod),
       EXISTS (SELECT FROM pg_catalog.pg_attribute d
               WHERE d.attrelid OPERATOR(pg_catalog.=) a.attrelid
                 AND d.attname OPERATOR(pg_catalog.=) 'dirty'::pg_catalog.name AND NOT d.attisdropped)
FROM pg_catalog.pg_attribute a
WHERE a.attrelid OPERATOR(pg_catalog.=) """ + _REGCLASS + """
  AND a.attname OPERATOR(pg_catalog.=) 'version'::pg_catalog.name AND NOT a.attisdropped
"""
DBMATE_TABLE = "schema_migrations"
FLYWAY_TABLE = "flyway_schema_history"
FLYWAY_ROWS = (
    "SELECT installed_rank, version, description, type, script, checksum, success FROM {} ORDER BY installed_rank"
)


@dataclass(frozen=True)
class FlywayRow:
    installed_rank: int
    version: str | None  # None for a repeatable migration
    description: str | None
    type: str  # SQL, UNDO_SQL, BASELINE, SCHEMA, DELETE, JDBC, ...
    script: str | None
    checksum: int | None
    success: bool


@dataclass(frozen=True)
class ForeignBookkeeping:
    """Another tool's bookkeeping, found where dbplan's is not (yet): what ``dbplan adopt``
    takes over."""

    tool: str  # dbmate | flyway
    schema: str
    table: str
    dbmate_versions: tuple[str, ...] = ()  # dbmate: one row per applied version, as written
    flyway_rows: tuple[FlywayRow, ...] = ()

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def applied_count(self) -> int:
        if self.tool == "dbmate":
            return len(self.dbmate_versions)
        return sum(1 for row in self.flyway_rows if row.success and row.version is not None and row.type != "SCHEMA")


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
    failure: Failure | None = None  # where the migration it is dirty at failed (a history fail row)
    # dbmate's or Flyway's bookkeeping, looked for only while dbplan has none of its own.
    foreign: ForeignBookkeeping | None = None
    # Live size of the tables the service's files name (inspect's ``relations``); read
    # for ``plan`` only: the executor's re-check does not lint.
    tables: tuple[TableStats, ...] = ()
    # Repeatable files (Flyway's R__): description -> the checksum last recorded for it.
    repeatables: Mapping[str, str | None] = field(default_factory=dict)

    def history_by_version(self) -> dict[int, HistoryEntry]:
        return {entry.version: entry for entry in self.history}


@dataclass(frozen=True)
class LiveRole:
    """The attributes of a live role that the plan file can declare."""

    login: bool
    connection_limit: int
    member_of: frozenset[str]


@dataclass(frozen=True)
class ServerFacts:
    server: str
    version: str
    system_identifier: str | None
    address: str | None
    databases: frozenset[str]
    roles: frozenset[str]
    database_owners: Mapping[str, str] = field(default_factory=dict)  # database -> owning role
    role_attributes: Mapping[str, LiveRole] = field(default_factory=dict)  # every role read
    connected_as: str | None = None
    bootstrap_superuser: str | None = None
    maintenance_database: str | None = None
    # Whether each existing role the plan file gives a password has that password (its
    # stored verifier recomputed); None: pg_authid could not be read, nothing is known.
    # Only booleans: neither a password nor a verifier is kept here.
    passwords_match: Mapping[str, bool] | None = field(default_factory=dict)


@dataclass(frozen=True)
class LiveState:
    servers: dict[str, ServerFacts]
    services: dict[str, ServiceFacts]


def inspect(
    estate: Estate,
    *,
    wait_seconds: float = 0.0,
    on_retry: Callable[[str], None] | None = None,
    relations: Mapping[str, Mapping[int, Iterable[str]]] | None = None,
    parallel: int | None = None,
) -> LiveState:
    """Read every server and every existing database the plan file names.

    The servers are read side by side, and the databases of each server through at most
    ``connection_bound(server, parallel)`` connections at once. The result is the one a
    sequential read gives (same order, same first error), so the plan does not depend on
    which connection answered first.

    ``relations``: per service, the table and index names its migration files name; their
    live size goes into the service's facts (``tables``), read in one query per database.
    """
    estate.require_secrets()
    listed = list(estate.servers.values())
    reads = run_all(
        [partial(_inspect_server, estate, server, wait_seconds, on_retry, parallel, relations) for server in listed],
        workers=len(listed),
    )
    servers: dict[str, ServerFacts] = {}
    services: dict[str, ServiceFacts] = {}
    for server, (server_facts, service_facts) in zip(listed, reads):
        servers[server.name] = server_facts
        services.update(service_facts)
    return LiveState(servers=servers, services=services)


def inspect_servers(
    estate: Estate, *, wait_seconds: float = 0.0, on_retry: Callable[[str], None] | None = None
) -> LiveState:
    """Read every server (one session each), none of its databases: what a saved plan
    applied in one pass checks before the first change (its databases are checked one by
    one, under their locks)."""
    estate.require_secrets()
    listed = list(estate.servers.values())
    reads = run_all(
        [partial(_read_server_of, estate, server, server_url(server), wait_seconds, on_retry) for server in listed],
        workers=len(listed),
    )
    return LiveState(servers={server.name: facts for server, facts in zip(listed, reads)}, services={})


def _read_server_of(
    estate: Estate, server: Server, url: str, wait_seconds: float, on_retry: Callable[[str], None] | None
) -> ServerFacts:
    with connect(server, url, wait_seconds=wait_seconds, on_retry=on_retry) as conn:
        return read_server(conn, server, declared_passwords(estate, server.name))


def _inspect_server(
    estate: Estate,
    server: Server,
    wait_seconds: float,
    on_retry: Callable[[str], None] | None,
    parallel: int | None,
    relations: Mapping[str, Mapping[int, Iterable[str]]] | None,
) -> tuple[ServerFacts, dict[str, ServiceFacts]]:
    url = server_url(server)
    server_facts = _read_server_of(estate, server, url, wait_seconds, on_retry)
    grouped = _services_by_database(estate, server)
    existing = [database for database in grouped if database in server_facts.databases]
    reads = run_all(
        [partial(_inspect_database, estate, server, url, database, grouped[database], relations) for database in existing],
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
    estate: Estate,
    server: Server,
    url: str,
    database: str,
    members: list[Service],
    relations: Mapping[str, Mapping[int, Iterable[str]]] | None,
) -> dict[str, ServiceFacts]:
    owner = estate.databases[database].owner
    with connect(server, url, database) as conn:
        found = {
            service.name: read_service(conn, service, owner, claimed=_claimed_among(members, service), server=server.name)
            for service in members
        }
        if relations:
            _add_table_stats(conn, members, relations, found, server.name)
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


def _add_table_stats(
    conn: psycopg.Connection,
    members: list[Service],
    relations: Mapping[str, Mapping[int, Iterable[str]]],
    services: dict[str, ServiceFacts],
    server: str,
) -> None:
    wanted = {
        service.name: frozenset().union(*_names_still_to_run(service, services[service.name], relations))
        for service in members
    }
    names = sorted(frozenset().union(*wanted.values()) - {COLUMN_TYPES})
    if not names:
        return  # nothing pending here: a fleet's up-to-date databases cost no query
    columns = any(COLUMN_TYPES in pending for pending in wanted.values())
    stats = read_table_stats(conn, names, members[0], server, columns=columns)
    for service in members:
        mine = tuple(stat for stat in stats if stat.name in wanted[service.name])
        services[service.name] = replace(services[service.name], tables=mine)


def _names_still_to_run(
    service: Service, facts: ServiceFacts, relations: Mapping[str, Mapping[int, Iterable[str]]]
) -> list[Iterable[str]]:
    """The relations of the versions the plan may run: above the current version, or
    below it without a history row (out of order); all of them when the service is new,
    dirty or pinned to a target, which may revert."""
    by_version = relations.get(service.name, {})
    if facts.version is None or facts.dirty or service.target is not None:
        return list(by_version.values())
    recorded = facts.history_by_version() if facts.history_exists else None
    return [
        names
        for version, names in by_version.items()
        if version > facts.version or (recorded is not None and version not in recorded)
    ]


def read_table_stats(
    conn: psycopg.Connection, names: list[str], service: Service, server: str | None = None, *, columns: bool = True
) -> tuple[TableStats, ...]:
    """The live size of every table or index called one of ``names``, in any schema, and
    with ``columns`` the types of their columns."""
    import psycopg

    try:
        # One catalog query: no transaction of its own (three round trips more per database).
        rows = conn.execute(TABLE_STATS[(False, columns)], (names,)).fetchall()
        if any(row[_KIND] in _INDEX_KINDS for row in rows):  # an index: find its table
            rows = conn.execute(TABLE_STATS[(True, columns)], (names,)).fetchall()
        if any(row[_TABLE_KIND] == "p" for row in rows):
            rows = conn.execute(TABLE_STATS_PARTITIONED, (names,)).fetchall()
    except psycopg.Error as err:
        raise unreadable(service, "table sizes", err, server) from err
    found = (stats for stats in map(_table_stats, rows) if _a_user_schema(stats.schema))
    return tuple(sorted(found, key=lambda stats: (stats.schema, stats.name)))


_KIND, _TABLE_KIND = 2, 5  # the columns of the relation's relkind and its table's in a row of TABLE_STATS
_INDEX_KINDS = ("i", "I")


def _table_stats(row: tuple) -> TableStats:
    """A row of TABLE_STATS (names as regnamespace and quote_ident print them, raw sizes)."""
    schema, name, kind, table_schema, table_name, _, rows, pages, toast_pages, index_pages, columns, block = row
    return TableStats(
        _unquoted(schema),
        name,
        kind in _INDEX_KINDS,
        f"{table_schema}.{table_name}",
        None if rows is None or rows < 0 else int(rows),
        (int(pages or 0) + int(toast_pages or 0) + int(index_pages or 0)) * int(block),
        dict(columns or {}),
    )


def _a_user_schema(schema: str) -> bool:
    """Not one of PostgreSQL's own (pg_catalog, pg_toast, a session's pg_temp_N...)."""
    return not schema.startswith("pg_") and schema != "information_schema"


def _unquoted(identifier: str) -> str:
    """The name an identifier printed by PostgreSQL (regnamespace, quote_ident) stands for:
    quoted only where needed, with inner double quotes doubled."""
    if len(identifier) >= 2 and identifier.startswith('"') and identifier.endswith('"'):
        return identifier[1:-1].replace('""', '"')
    return identifier


def claimed_schemas(estate: Estate, service: Service, members: Sequence[Service] | None = None) -> frozenset[str]:
    """The schemas where other services of the same database name their own table of
    this name (``schema:``): a table found there is theirs, not this service's.
    ``members``: the services of that database, when the caller has them."""
    return _claimed_among(services_of_database(estate, service.database) if members is None else members, service)


_by_database: tuple[object, dict[str, list[Service]]] | None = None


def services_of_database(estate: Estate, database: str) -> list[Service]:
    """The services of one database, from an index built once per estate: a fleet's
    executor asks for each of its thousands of databases."""
    global _by_database
    cached = _by_database
    if cached is None or cached[0] is not estate.services:
        index: dict[str, list[Service]] = {}
        for service in estate.services.values():
            index.setdefault(service.database, []).append(service)
        cached = _by_database = (estate.services, index)  # one tuple: threads see the old one or the new one
    return cached[1].get(database, [])


def _claimed_among(services: Iterable[Service], service: Service) -> frozenset[str]:
    # inspect passes the services of one database: a fleet's thousands are not each
    # compared with every other.
    return frozenset(
        other.schema
        for other in services
        if other.name != service.name and other.database == service.database
        and other.schema is not None and other.table == service.table
    )  # fmt: skip


# Databases a discovered set may take: not templates, not ones that refuse connections.
DISCOVER_DATABASES = """
SELECT datname::text FROM pg_database
WHERE datname LIKE %s AND NOT datistemplate AND datallowconn AND datname <> %s
ORDER BY 1
"""


def discover(
    estate: Estate, *, wait_seconds: float = 0.0, on_retry: Callable[[str], None] | None = None
) -> dict[str, list[tuple[str, str]]]:
    """The members of every discovered set: per server, one connection and one query per
    set for the databases whose names match its pattern. Read only, like all of this."""
    import psycopg

    estate.require_secrets()
    found: dict[str, list[tuple[str, str]]] = {key: [] for key, spec in estate.sets.items() if spec.discovery}
    for server in estate.servers.values():
        wanted = {key: spec.discovery for key, spec in estate.sets.items() if spec.discovery and server.name in spec.discovery.servers}
        if not wanted:
            continue
        url = server_url(server)
        with connect(server, url, wait_seconds=wait_seconds, on_retry=on_retry) as conn:
            maintenance = conn.info.dbname
            for key, discovery in wanted.items():
                try:
                    rows = conn.execute(DISCOVER_DATABASES, (discovery.like, maintenance)).fetchall()
                except psycopg.Error as err:
                    raise ConnectionFailed(f"cannot list the databases of server '{server.name}': {err}", server=server.name) from err
                found[key] += [(server.name, row[0]) for row in rows]
    return found


def locate_apart(
    conn: psycopg.Connection,
    estate: Estate,
    service: Service,
    owner: str | None,
    members: Sequence[Service] | None = None,
) -> tuple[str, tuple[bool, bool] | None]:
    """``locate_schema`` for the executor, which may have created the database a moment
    ago (so ``inspect`` could not look): also refuses a table another service of the
    database resolves to. ``members``: the services of that database, if known. With the
    schema, whether the service's two tables were there (``read_service``'s ``present``)."""
    if members is None:
        members = services_of_database(estate, service.database)
    members = list(members)
    found = {other.name: _locate(conn, other, owner, claimed_schemas(estate, other, members)) for other in members}
    _refuse_shared_bookkeeping(members, {name: schema for name, (schema, _) in found.items()})
    return found[service.name]


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


def declared_passwords(estate: Estate, server: str) -> dict[str, str]:
    """role -> password, for the roles of ``server`` the plan file gives a password."""
    return {role.name: role.password for role in estate.roles.values() if role.server == server and role.password}


def read_server(conn: psycopg.Connection, server: Server, passwords: Mapping[str, str] | None = None) -> ServerFacts:
    """One query for what the server holds; with ``passwords`` (role -> declared
    password) a second one compares the stored verifiers, where pg_authid is readable."""
    import psycopg

    try:
        row = conn.execute(SERVER_FACTS).fetchone()
        assert row is not None
        version, databases, roles, database_owners, address, port, attributes, connected_as, bootstrap, maintenance = row
        try:
            identifier_row = conn.execute(SYSTEM_IDENTIFIER).fetchone()
            identifier = identifier_row[0] if identifier_row else None
        except psycopg.errors.InsufficientPrivilege:
            identifier = None
        matches = _passwords_match(conn, passwords or {})
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
        role_attributes={
            name: LiveRole(bool(a["login"]), int(a["connection_limit"]), frozenset(a["member_of"] or ()))
            for name, a in (attributes or {}).items()
        },
        connected_as=connected_as,
        bootstrap_superuser=bootstrap,
        maintenance_database=maintenance,
        passwords_match=matches,
    )


DATABASE_OWNERS = "SELECT datname::text, pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = ANY(%s)"


def read_database_owners(conn: psycopg.Connection, server: Server, databases: list[str]) -> dict[str, str]:
    """Which of ``databases`` exist on the server, with their owners: what creating one
    database needs to know, in a query that does not grow with the server's databases."""
    import psycopg

    try:
        return {name: owner for name, owner in conn.execute(DATABASE_OWNERS, (databases,))}
    except psycopg.Error as err:
        raise ConnectionFailed(f"cannot read server '{server.name}': {err}", server=server.name) from err


def _passwords_match(conn: psycopg.Connection, passwords: Mapping[str, str]) -> dict[str, bool] | None:
    """Recompute each stored verifier with its own salt and iterations and the declared
    password. None when the connecting role may not read pg_authid."""
    import psycopg

    from ..server.credentials import verifier_matches

    if not passwords:
        return {}
    try:
        rows = conn.execute(STORED_PASSWORDS, (list(passwords),)).fetchall()
    except psycopg.errors.InsufficientPrivilege:
        return None
    return {name: verifier_matches(stored, passwords[name], name) for name, stored in rows}


def read_service(
    conn: psycopg.Connection,
    service: Service,
    owner: str | None,
    *,
    schema: str | None = None,
    present: tuple[bool, bool] | None = None,
    claimed: frozenset[str] = frozenset(),
    server: str | None = None,  # named in an error
) -> ServiceFacts:
    """Read one service's bookkeeping through an open connection to its database: in
    ``schema`` if given (the executor's, fixed for its run), else where ``locate_schema``
    finds it. ``present``: whether the migrations table and its history table are there,
    if the caller's ``locate_schema`` just saw.

    The executor calls this too, under the lock, to re-plan against fresh facts.
    """
    import psycopg

    try:
        if schema is None:
            schema, present = _locate(conn, service, owner, claimed)
        if present is None or present == (False, False):  # one table seen: the snapshot reads it all
            present, nothing_yet = _probe(conn, service, schema)
            if nothing_yet:
                return _facts(service, schema, (False, False), None, False, None, invalid=())
        if present == (True, True):
            # The common case (a clean database dbplan migrated before) in one statement,
            # a snapshot of its own: a fleet pays every round trip once per database.
            read = _read_at_once(conn, service, schema)
            if read is not None:
                return read
        return _read_in_snapshot(conn, service, schema, present)
    except psycopg.Error as err:
        raise unreadable(service, "migrations", err, server) from err


# Version, dirty flag, every history row and whether any index is invalid, in one statement.
AT_ONCE = """
SELECT m.version, m.dirty, h.rows, """ + _ANY_INVALID + """
FROM (SELECT) AS one
LEFT JOIN LATERAL (SELECT version, dirty FROM {migrations} ORDER BY version DESC LIMIT 1) AS m ON true
CROSS JOIN LATERAL (
  SELECT pg_catalog.json_agg(pg_catalog.json_build_array(version, event, checksum, title, id) ORDER BY id) AS rows
  FROM {history}
) AS h
"""


# Whether the service's two tables are in its schema, whether dbmate's or Flyway's are, and
# whether any index is invalid, in one statement: a new database of a fleet (or one whose
# bookkeeping the lock was taken to create) has none of them, and then nothing else is read.
PROBE = "SELECT " + _exist(4) + ", " + _ANY_INVALID


def _probe(conn: psycopg.Connection, service: Service, schema: str) -> tuple[tuple[bool, bool], bool]:
    """Whether the two tables are there, and whether the database holds nothing to read
    beyond that: no table of the service, of dbmate or Flyway, and no invalid index."""
    names = (service.table, service.history_table, DBMATE_TABLE, FLYWAY_TABLE)
    row = conn.execute(PROBE, _pairs(schema, names)).fetchone()
    assert row is not None  # no FROM: always one row
    return (bool(row[0]), bool(row[1])), not any(row)


def _read_at_once(conn: psycopg.Connection, service: Service, schema: str) -> ServiceFacts | None:
    """The facts of a service whose two tables exist, in one statement; None when it is
    dirty or an index is invalid, whose details take the reads of ``_read_in_snapshot``."""
    from psycopg import sql

    query = sql.SQL(AT_ONCE).format(
        migrations=sql.Identifier(schema, service.table), history=sql.Identifier(schema, service.history_table)
    )
    row = conn.execute(query).fetchone()
    assert row is not None  # FROM (SELECT): always one row
    version, dirty, rows, any_invalid = row
    if dirty or any_invalid:
        return None
    recorded = [(v, event, checksum, title, int(event_id)) for v, event, checksum, title, event_id in rows or ()]
    return _facts(service, schema, (True, True), _plain_version(version), False, recorded, invalid=())


def _read_in_snapshot(
    conn: psycopg.Connection, service: Service, schema: str, present: tuple[bool, bool] | None
) -> ServiceFacts:
    """Every fact, one query each, in one snapshot: the executor trusts them as one state.
    ``present``: whether the two tables are there, if the catalog read that located them
    just said (None: looked up here)."""
    with _snapshot(conn):
        table_exists, history_exists = present or _tables_exist(conn, schema, service.table, service.history_table)
        foreign = None if history_exists else read_foreign(conn, schema)
        if foreign is not None and foreign.tool == "dbmate" and foreign.table == service.table:
            table_exists = False  # dbmate's table, not golang-migrate's: it holds no dirty flag to read
        version, dirty = _current_version(conn, schema, service.table) if table_exists else (None, False)
        recorded = _read_history(conn, schema, service.history_table) if history_exists else None
        failure = _failure(conn, schema, service.history_table, version) if dirty and history_exists else None
        in_progress = lock_holder(conn, migrations_lock_key(service.database, schema, service.table)) if dirty else None
        invalid = _invalid_indexes(conn)
    return _facts(
        service, schema, (table_exists, history_exists), version, dirty, recorded, invalid=invalid,
        failure=failure, in_progress=in_progress, foreign=foreign,
    )  # fmt: skip


def _facts(
    service: Service,
    schema: str,
    present: tuple[bool, bool],
    version: int | None,
    dirty: bool,
    recorded: list[HistoryRow] | None,
    *,
    invalid: tuple[str, ...],
    failure: Failure | None = None,
    in_progress: str | None = None,
    foreign: ForeignBookkeeping | None = None,
) -> ServiceFacts:
    history, last_force, repeatables = _summarise_history(recorded or [])
    return ServiceFacts(
        service=service.name,
        database_exists=True,
        schema=schema,
        table_exists=present[0],
        history_exists=present[1],
        version=version,
        dirty=dirty,
        history=history,
        last_force=last_force,
        invalid_indexes=invalid,
        history_count=None if recorded is None else len(recorded),
        dirty_in_progress=in_progress,
        failure=failure,
        foreign=foreign,
        repeatables=repeatables,
    )


def _invalid_indexes(conn: psycopg.Connection) -> tuple[str, ...]:
    """Every index a failed CREATE INDEX CONCURRENTLY (or REINDEX) left invalid, by name."""
    if conn.execute(ANY_INVALID_INDEX).fetchone() is None:
        return ()
    return tuple(row[0] for row in conn.execute(INVALID_INDEXES))


FAILURE_REASON = (
    "SELECT reason FROM {} WHERE event OPERATOR(pg_catalog.=) 'fail' AND version OPERATOR(pg_catalog.=) %s "
    "ORDER BY id DESC LIMIT 1"
)


def _failure(conn: psycopg.Connection, schema: str, table: str, version: int | None) -> Failure | None:
    """Where the migration a service is dirty at failed, if the executor recorded it."""
    from psycopg import sql

    query = sql.SQL(FAILURE_REASON).format(sql.Identifier(schema, table))
    row = conn.execute(query, (version,)).fetchone()
    return parse_reason(row[0]) if row else None


def read_foreign(conn: psycopg.Connection, schema: str) -> ForeignBookkeeping | None:
    """dbmate's ``schema_migrations`` (a text version, no dirty flag) or Flyway's
    ``flyway_schema_history`` in ``schema``; None when neither is there."""
    from psycopg import sql

    shape = conn.execute(VERSION_COLUMN, (schema, DBMATE_TABLE)).fetchone()
    if shape is not None and not shape[1] and shape[0].startswith(("character varying", "text", "character(")):
        query = sql.SQL("SELECT version::pg_catalog.text FROM {} ORDER BY version").format(sql.Identifier(schema, DBMATE_TABLE))
        versions = tuple(row[0] for row in conn.execute(query))
        return ForeignBookkeeping("dbmate", schema, DBMATE_TABLE, dbmate_versions=versions)
    if _table_exists(conn, schema, FLYWAY_TABLE):
        query = sql.SQL(FLYWAY_ROWS).format(sql.Identifier(schema, FLYWAY_TABLE))
        rows = tuple(FlywayRow(*row) for row in conn.execute(query))
        return ForeignBookkeeping("flyway", schema, FLYWAY_TABLE, flyway_rows=rows)
    return None


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
    return _locate(conn, service, owner, claimed)[0]


def _locate(
    conn: psycopg.Connection, service: Service, owner: str | None, claimed: frozenset[str]
) -> tuple[str, tuple[bool, bool] | None]:
    """``locate_schema``, and whether the migrations table and its history table are in
    that schema, which the catalog read that found it already says (None: not read)."""
    if service.schema is not None:
        return service.schema, None
    found: dict[str, set[str]] = {}  # schema -> the names there, of any kind of relation
    tables: dict[str, set[str]] = {}  # schema -> the names there that are tables
    for quoted, name, is_table in conn.execute(TABLE_LOCATIONS, (service.history_table, service.table)):
        schema = _unquoted(quoted)
        if schema.startswith(("pg_toast", "pg_temp_")):
            continue
        found.setdefault(schema, set()).add(name)
        if is_table:
            tables.setdefault(schema, set()).add(name)
    candidates = sorted(schema for schema, names in tables.items() if service.table in names and schema not in claimed)
    if not candidates:
        schema = resolve_schema(conn, owner)
        return schema, _present(found, schema, service)
    candidates = [schema for schema in candidates if service.history_table in tables[schema]] or candidates
    if len(candidates) == 1:
        return candidates[0], _present(found, candidates[0], service)
    current = resolve_schema(conn, owner)
    if current in candidates:
        return current, _present(found, current, service)
    raise ConfigError(
        f"service '{service.name}' has a migrations table '{service.table}' in several schemas of database "
        f"'{service.database}' ({', '.join(candidates)}), none of them the current schema '{current}'",
        place=service.place,
        service=service.name,
        hint=f"say which one is the service's with services.{service.name}.schema in the plan file",
    )


def _present(found: Mapping[str, set[str]], schema: str, service: Service) -> tuple[bool, bool]:
    """Whether the migrations table and its history table are in ``schema`` (as any kind of
    relation, as ``to_regclass`` finds them)."""
    names = found.get(schema, set())
    return service.table in names, service.history_table in names


def unreadable(service: Service, what: str, err: Exception, server: str | None = None) -> ConnectionFailed:
    """A service's bookkeeping could not be read: the server's message, where it was read."""
    on = f" on server '{server}'" if server else ""
    return ConnectionFailed(
        f"cannot read the {what} of service '{service.name}' in database '{service.database}'{on}: {str(err).strip()}",
        service=service.name,
        server=server,
    )


def resolve_schema(conn: psycopg.Connection, owner: str | None) -> str:
    """The schema golang-migrate would use: current_schema() of the role migrations run as."""
    from psycopg import sql

    role_row = conn.execute(ROLE_EXISTS, (owner,)).fetchone() if owner else None
    if owner and role_row and role_row[0]:
        with _in_a_transaction(conn):  # SET LOCAL: the role goes back however this ends
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(owner)))
            row = conn.execute(CURRENT_SCHEMA).fetchone()
            conn.execute("RESET ROLE")
    else:
        row = conn.execute(CURRENT_SCHEMA).fetchone()
    return row[0] if row else "public"


@contextmanager
def _in_a_transaction(conn: psycopg.Connection) -> Iterator[None]:
    """The transaction ``conn`` is in, or one of its own when it is in none (the executor
    locates a table outside any, to spare a fleet two round trips per database)."""
    from psycopg.pq import TransactionStatus

    if conn.info.transaction_status == TransactionStatus.IDLE:
        with conn.transaction():
            yield
    else:
        yield


@contextmanager
def _snapshot(conn: psycopg.Connection) -> Iterator[None]:
    """A REPEATABLE READ, READ ONLY transaction opened in one statement (BEGIN ISOLATION
    LEVEL ...): a fleet reads thousands of databases, each round trip counts. The
    connection's own settings are put back for whatever it runs next."""
    from psycopg import IsolationLevel

    saved = conn.isolation_level, conn.read_only
    conn.isolation_level, conn.read_only = IsolationLevel.REPEATABLE_READ, True
    try:
        with conn.transaction():
            yield
    finally:
        conn.isolation_level, conn.read_only = saved


def _tables_exist(conn: psycopg.Connection, schema: str, *tables: str) -> tuple[bool, ...]:
    row = conn.execute("SELECT " + _exist(len(tables)), _pairs(schema, tables)).fetchone()
    return tuple(bool(found) for found in row) if row else (False,) * len(tables)


def _table_exists(conn: psycopg.Connection, schema: str, table: str) -> bool:
    row = conn.execute(TABLE_EXISTS, (schema, table)).fetchone()
    return bool(row and row[0])


def _current_version(conn: psycopg.Connection, schema: str, table: str) -> tuple[int | None, bool]:
    from psycopg import sql

    query = sql.SQL("SELECT version, dirty FROM {}.{} ORDER BY version DESC LIMIT 1").format(
        sql.Identifier(schema), sql.Identifier(table)
    )
    row = conn.execute(query).fetchone()
    if row is None:
        return None, False
    return _plain_version(row[0]), bool(row[1])


def _plain_version(version: int | None) -> int | None:
    """golang-migrate writes -1 for "no version" in some drivers."""
    return None if version is None or version < 0 else int(version)


REPEATABLE_EVENTS = ("repeat", "adopt_repeatable")  # a repeatable ran; adopt took over Flyway's record of it
# A force (or the baseline written when dbplan adopts a golang-migrate database) says
# "exactly the versions up to here are applied" and overrides older events.
FORCE_EVENTS = ("force", "baseline")
# A fail row records a failure, it is no version's state (live/failure.py); a repeatable's
# rows only say which version the service was at when it ran.
NOT_A_VERSION_STATE = ("fail", *REPEATABLE_EVENTS)
HISTORY_ROWS = "SELECT version, event, checksum, title, id FROM {} ORDER BY id"


HistoryRow = tuple[int | None, str, str | None, str | None, int]  # version, event, checksum, title, id


def _read_history(conn: psycopg.Connection, schema: str, table: str) -> list[HistoryRow]:
    """Every event of the history table, oldest first: one plain query (a fleet reads it in
    every database; the summaries are cheaper in Python than as four queries)."""
    from psycopg import sql

    query = sql.SQL(HISTORY_ROWS).format(sql.Identifier(schema, table))
    return [(version, event, checksum, title, int(event_id)) for version, event, checksum, title, event_id in conn.execute(query)]


def _summarise_history(
    rows: Iterable[HistoryRow],
) -> tuple[tuple[HistoryEntry, ...], HistoryEntry | None, dict[str, str | None]]:
    """From the events oldest first: the latest event of every version (by version), the
    latest force or baseline, and the checksum last recorded for each repeatable file, by
    its description (title)."""
    latest: dict[int, HistoryEntry] = {}
    force: HistoryEntry | None = None
    repeatables: dict[str, str | None] = {}
    for version, event, checksum, title, event_id in rows:
        if event in REPEATABLE_EVENTS and title is not None:
            repeatables[title] = checksum
        if event in NOT_A_VERSION_STATE or version is None:
            continue
        entry = HistoryEntry(int(version), event, checksum, title, event_id)
        latest[version] = entry
        if event in FORCE_EVENTS:
            force = entry
    return tuple(latest[version] for version in sorted(latest)), force, repeatables

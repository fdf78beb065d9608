"""``dbplan plan --verify``: run the pending migrations on a copy of the live schema first.

For each database with pending work, its live schema (structure only, never data) and its
bookkeeping rows are copied with pg_dump into a throwaway database of an embedded server of
the live server's major version when one is installed (the newest otherwise), and the
service's plan runs there through the executor exactly as ``apply`` would. The result is a
dry run that really ran: success, or the failure with file, line, message and SQLSTATE, and
the schema change of each service, before anything touched the real server.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import DbplanError
from ..estate import graph
from ..estate.model import Database, Estate, Role, Server, Service
from ..execution.executor import execute
from ..live.connection import connect, server_url
from ..live.facts import LiveState, inspect, read_database_owners
from ..migrations.scan import MigrationSet
from ..planning.plan import Plan
from ..planning.planner import make_plan
from ..server.pgbinaries import PgBinaries, list_binaries, pg_env
from . import catalog
from .scratch import scratch_server

# Roles of the live server, so that owners and grants in the copy mean what they mean there.
LIVE_ROLES = "SELECT rolname FROM pg_roles WHERE rolname !~ '^pg_' ORDER BY 1"


@dataclass(frozen=True)
class SchemaChange:
    change: str  # added | dropped | changed
    kind: str  # table, column, index, ...
    name: str
    before: str | None = None
    after: str | None = None


@dataclass(frozen=True)
class ServiceVerification:
    service: str
    database: str
    ok: bool
    error: str | None = None  # the failure, as apply would report it (file:line, SQLSTATE)
    sqlstate: str | None = None
    changes: tuple[SchemaChange, ...] = ()
    # How many databases this copy stands for: 1, or the databases of a set that start
    # from the same point (the same actions), of which only the first is copied.
    stands_for: int = 1


@dataclass(frozen=True)
class Verification:
    live_major: dict[str, int]  # server -> major version of the live server
    copy_major: dict[str, int]  # server -> major version the copy ran on
    services: tuple[ServiceVerification, ...] = ()

    @property
    def ok(self) -> bool:
        return all(service.ok for service in self.services)


@dataclass
class _Copy:
    scratch: Server
    binaries: PgBinaries
    name: str
    created_roles: list[str] = field(default_factory=list)


def verify(
    estate: Estate,
    migration_sets: dict[str, MigrationSet],
    service_order: tuple[str, ...],
    live: LiveState,
    plan: Plan,
    *,
    scratch_url: str | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> Verification:
    """Run each database's pending migrations on a throwaway copy of its live schema, on
    an embedded server (or on the server of ``scratch_url``, where throwaway databases may
    be made)."""
    pending = [name for name in service_order if plan.actions_of(name)]
    by_database: dict[str, list[Service]] = {}
    for name in pending:
        service = estate.services[name]
        by_database.setdefault(service.database, []).append(service)
    stands_for = _one_copy_per_starting_point(estate, plan, live, by_database)
    live_major: dict[str, int] = {}
    copy_major: dict[str, int] = {}
    results: list[ServiceVerification] = []
    for database, count in stands_for.items():
        services = by_database[database]
        server = estate.servers[estate.databases[database].server]
        major = live_major.setdefault(server.name, _live_major(server))
        binaries = _binaries_for(major)
        scratch = scratch_server(estate, binaries=binaries, scratch_url=scratch_url)
        copy_major[server.name] = _major(scratch)
        if on_notice:
            also = f", for {count} databases of its set" if count > 1 else ""
            on_notice(
                f"verifying {', '.join(s.name for s in services)} on a copy of database '{database}'{also} "
                f"(PostgreSQL {copy_major[server.name]})"
            )
        verified = _verify_database(scratch, estate, server, database, services, migration_sets, live, binaries)
        results += [replace(result, stands_for=count) for result in verified]
    return Verification(live_major, copy_major, tuple(results))


def _one_copy_per_starting_point(
    estate: Estate, plan: Plan, live: LiveState, by_database: dict[str, list[Service]]
) -> dict[str, int]:
    """The databases to copy, each with the number of databases it stands for.

    A set's databases run the same files: those that start from the same point (the same
    pending actions, versions included, in a database that exists or is still to be
    created alike) would run the same statements on the same schema,
    so the first of them is copied for all; a database of the set that is behind or ahead
    gets a copy of its own. A fleet of 500 costs one copy, not 500.
    """
    first_of: dict[tuple[object, ...], str] = {}
    stands_for: dict[str, int] = {}
    for database, services in by_database.items():
        fleet = estate.databases[database].fleet
        if fleet is None:
            stands_for[database] = 1
            continue
        exists = live.services[services[0].name].database_exists
        start = (fleet, exists, *(_action_key(action) for service in services for action in plan.actions_of(service.name)))
        first = first_of.setdefault(start, database)
        stands_for[first] = stands_for.get(first, 0) + 1
    return stands_for


def _action_key(action: object) -> tuple[object, ...]:
    """An action as it would run in any database of its set: without the names of the
    service instance and database it belongs to."""
    return (type(action).__name__, *(getattr(action, key, None) for key in ("version", "version_after", "checksum")))


def _live_major(server: Server) -> int:
    return _major(server)


def _major(server: Server) -> int:
    with connect(server, server_url(server)) as conn:
        row = conn.execute("SELECT current_setting('server_version_num')::int / 10000").fetchone()
    return int(row[0]) if row else 0


def _binaries_for(major: int) -> PgBinaries:
    """The live server's major when installed, else the newest (pg_dump reads older servers)."""
    installed = sorted(list_binaries(), key=lambda b: b.major)
    for binaries in installed:
        if binaries.major == major:
            return binaries
    newer = [binaries for binaries in installed if binaries.major > major]
    if not newer:
        have = ", ".join(str(b.major) for b in installed) or "none"
        raise DbplanError(
            f"cannot verify on a copy: the live server runs PostgreSQL {major}, and the installed "
            f"PostgreSQL binaries are older ({have}); pg_dump cannot read a newer server",
            hint=f"install PostgreSQL {major} server binaries, or set DBPLAN_PG_BINDIR to them",
        )
    return newer[-1]


def _verify_database(
    scratch: Server,
    estate: Estate,
    server: Server,
    database: str,
    services: list[Service],
    migration_sets: dict[str, MigrationSet],
    live: LiveState,
    binaries: PgBinaries,
) -> list[ServiceVerification]:
    copy = _Copy(scratch, binaries, _copy_name(database))
    try:
        try:
            _copy_schema(copy, estate, server, database, services, live)
        except DbplanError as err:
            return [ServiceVerification(s.name, database, False, f"cannot copy the live schema: {err.message}") for s in services]
        return [_run_service(copy, estate, service, migration_sets[service.name]) for service in services]
    finally:
        _drop(copy)


def _copy_name(database: str) -> str:
    suffix = f"_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    return "dbplan_verify_" + database.encode("utf-8")[: 63 - 14 - len(suffix)].decode("utf-8", "ignore") + suffix


def _copy_schema(
    copy: _Copy, estate: Estate, server: Server, database: str, services: list[Service], live: LiveState
) -> None:
    """Create the copy: the live roles (by name, without login), the schema, the bookkeeping rows."""
    from psycopg import sql

    live_url = server_url(server)
    with connect(server, live_url) as conn:
        roles = [row[0] for row in conn.execute(LIVE_ROLES)]
        live_owner = read_database_owners(conn, server, [database]).get(database)
    # The copy has the live database's owner, who owns public (pg_database_owner) there too;
    # a database still to be created gets the owner the plan file names, as it will live.
    owner = live_owner or estate.databases[database].owner
    if owner and owner not in roles:
        roles.append(owner)
    with connect(copy.scratch, copy.scratch.url or "") as conn:
        existing = {row[0] for row in conn.execute(LIVE_ROLES)}
        for role in roles:
            if role not in existing:
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
                copy.created_roles.append(role)
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(copy.name))
            + (sql.SQL(" OWNER {}").format(sql.Identifier(owner)) if owner else sql.SQL(""))
        )
    if not live.services[services[0].name].database_exists:
        return  # to be created by the plan: its copy starts empty, as it will
    bookkeeping = [
        f"{live.services[s.name].schema}.{table}"
        for s in services
        if live.services[s.name].schema
        for table in (s.table, s.history_table)
        if live.services[s.name].table_exists
    ]
    _pipe(copy, server, live_url, database, ["--schema-only"])
    if bookkeeping:
        _pipe(copy, server, live_url, database, ["--data-only", *[f"--table={_quoted(t)}" for t in bookkeeping]])


def _quoted(qualified: str) -> str:
    schema, table = qualified.split(".", 1)
    return '"' + schema.replace('"', '""') + '"."' + table.replace('"', '""') + '"'


def _pipe(copy: _Copy, server: Server, live_url: str, database: str, what: list[str]) -> None:
    """pg_dump from the live server into pg_restore on the copy; passwords travel in the
    environment of the two programs, never on a command line another user could read."""
    dump_target, dump_env = _client_target(live_url, database)
    restore_target, restore_env = _client_target(copy.scratch.url or "", copy.name)
    bindir = copy.binaries.bindir
    dump = subprocess.Popen(
        [str(bindir / "pg_dump"), "--format=custom", "--no-subscriptions", "--no-publications", *what, "--dbname", dump_target],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**pg_env(), **dump_env},
    )
    restore = subprocess.run(
        [str(bindir / "pg_restore"), "--exit-on-error", "--single-transaction", "--dbname", restore_target],
        stdin=dump.stdout,
        capture_output=True,
        env={**pg_env(), **restore_env},
    )
    if dump.stdout:
        dump.stdout.close()
    dump_error = dump.stderr.read().decode("utf-8", "replace") if dump.stderr else ""
    if dump.wait() != 0:
        raise DbplanError(f"pg_dump of database '{database}' on server '{server.name}' failed: {_first_line(dump_error)}")
    if restore.returncode != 0:
        raise DbplanError(f"pg_restore into the copy failed: {_first_line(restore.stderr.decode('utf-8', 'replace'))}")


def _client_target(url: str, database: str) -> tuple[str, dict[str, str]]:
    """A conninfo string without the password, and the environment that carries it."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = {key: str(value) for key, value in conninfo_to_dict(url).items() if value is not None}
    password = params.pop("password", None)
    params["dbname"] = database
    params.setdefault("application_name", "dbplan")
    return make_conninfo(**params), ({"PGPASSWORD": password} if password else {})


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


def _run_service(copy: _Copy, estate: Estate, service: Service, migration_set: MigrationSet) -> ServiceVerification:
    """The service's plan on the copy, exactly as apply runs it; what changed in its schema."""
    owner = estate.databases[service.database].owner
    part = replace(
        estate,
        servers={copy.scratch.name: copy.scratch},
        roles={owner: Role(owner, copy.scratch.name)} if owner else {},
        databases={copy.name: Database(copy.name, copy.scratch.name, owner)},
        services={service.name: replace(service, database=copy.name, depends_on=())},
    )
    excluded: list[str] = []
    try:
        copy_live = inspect(part)
        schema = copy_live.services[service.name].schema
        excluded = [f"{schema}.{t}" for t in (service.table, service.history_table)] if schema else []
        before = _snapshot(copy, excluded)
        plan = make_plan(part, graph.build(part), {service.name: migration_set}, copy_live)
        if plan.blocked:
            return ServiceVerification(service.name, service.database, False, plan.blockers[0].message)
        result = execute(plan, part, {service.name: migration_set})
    except DbplanError as err:
        return ServiceVerification(service.name, service.database, False, err.message)
    changes = tuple(SchemaChange(*difference) for difference in catalog.differences(before, _snapshot(copy, excluded)))
    if result.error is not None:
        return ServiceVerification(
            service.name, service.database, False, result.error.message, getattr(result.error, "sqlstate", None), changes
        )
    return ServiceVerification(service.name, service.database, True, changes=changes)


def _snapshot(copy: _Copy, excluded: list[str]) -> catalog.Snapshot:
    with connect(copy.scratch, copy.scratch.url or "", copy.name) as conn:
        return catalog.snapshot(conn, excluded_tables=excluded)


def _drop(copy: _Copy) -> None:
    import psycopg
    from psycopg import sql

    try:
        with connect(copy.scratch, copy.scratch.url or "") as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(copy.name)))
            for role in copy.created_roles:
                try:
                    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
                except psycopg.Error:
                    pass  # it owns something in another copy under way; that run drops it
    except (psycopg.Error, DbplanError):
        pass

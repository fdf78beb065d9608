"""``dbplan test``: every migration applied, reverted and applied again on a throwaway database.

Each database of the plan file gets a throwaway twin on a scratch embedded server. Its services
are built from zero in dependency order, one migration at a time, through the planner and
the executor exactly as ``apply`` would run them (run modes, settings, owner role,
bookkeeping). After each up, its down file runs and the schema must be what it was before
the up, compared object by object from the catalog; then the up must apply again.
The twin is dropped afterwards, whatever happened.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import DbplanError
from ..estate import graph
from ..estate.model import Database, Estate, Role, Server, Service
from ..execution.executor import execute
from ..live.connection import connect
from ..live.facts import inspect
from ..migrations.scan import Migration, MigrationSet
from ..planning.plan import CreateRole
from ..planning.planner import make_plan
from . import catalog
from .scratch import scratch_server

OK, FAILED, NO_DOWN, NOT_RUN = "ok", "failed", "no-down", "not-run"


@dataclass(frozen=True)
class MigrationCheck:
    version: int
    title: str
    status: str  # ok | failed | no-down | not-run
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServiceCheck:
    service: str
    database: str
    checks: tuple[MigrationCheck, ...]


@dataclass(frozen=True)
class RoundTripReport:
    server_version: str
    services: tuple[ServiceCheck, ...]
    require_down: bool = False
    duration_ms: int = 0

    def count(self, status: str) -> int:
        return sum(1 for service in self.services for check in service.checks if check.status == status)

    @property
    def ok(self) -> bool:
        return self.count(FAILED) == 0 and not (self.require_down and self.count(NO_DOWN))


@dataclass
class _Twin:
    """The throwaway database standing in for one database of the plan file."""

    server: Server
    name: str
    owner: str | None
    created_roles: list[str] = field(default_factory=list)
    services_done: list[tuple[Service, MigrationSet]] = field(default_factory=list)  # at their latest
    stopping: threading.Event = field(default_factory=threading.Event)  # the run ends: touch nothing more


def round_trip_estate(
    estate: Estate,
    migration_sets: dict[str, MigrationSet],
    service_order: tuple[str, ...],
    *,
    require_down: bool = False,
    scratch_url: str | None = None,
    on_check: Callable[[str, MigrationCheck], None] | None = None,
) -> RoundTripReport:
    """Test every migration of the services in ``service_order`` on the embedded scratch
    server (or on the server of ``scratch_url``, where throwaway databases may be made).

    Each database's twin is tested in a thread of its own (they share nothing); the
    services of one database run in dependency order in its twin.
    """
    from concurrent.futures import ThreadPoolExecutor

    started = time.monotonic()
    server = scratch_server(estate, scratch_url=scratch_url)
    with connect(server, server.url or "") as conn:
        version_row = conn.execute("SELECT current_setting('server_version')").fetchone()
    groups = _services_by_database(estate, service_order)
    stopping = threading.Event()
    twins = {
        database: _Twin(server, _twin_name(database), estate.databases[database].owner, stopping=stopping)
        for database in groups
    }
    pool = ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_TWINS, len(groups) or 1), thread_name_prefix="dbplan-test")
    try:
        futures = {
            database: pool.submit(_test_database, twins[database], estate, services, migration_sets, on_check)
            for database, services in groups.items()
        }
        by_service = {check.service: check for future in futures.values() for check in future.result()}
    finally:
        # Also after Ctrl-C: no twin starts another step, FORCE ends what still runs on one,
        # and once every thread has seen that, the twins are dropped again in case one of
        # them was made in between.
        stopping.set()
        _drop_all(server, list(twins.values()))
        pool.shutdown(wait=True, cancel_futures=True)
        _drop_all(server, list(twins.values()))
    return RoundTripReport(
        server_version=version_row[0] if version_row else "unknown",
        services=tuple(by_service[name] for name in service_order if name in by_service),
        require_down=require_down,
        duration_ms=int((time.monotonic() - started) * 1000),
    )


MAX_PARALLEL_TWINS = 4  # databases tested at once; the scratch server does the work


def _test_database(
    twin: _Twin,
    estate: Estate,
    services: list[Service],
    migration_sets: dict[str, MigrationSet],
    on_check: Callable[[str, MigrationCheck], None] | None,
) -> list[ServiceCheck]:
    results = []
    for service in services:
        checks = _test_service(twin, estate, service, migration_sets[service.name], on_check)
        results.append(ServiceCheck(service.name, service.database, checks))
        twin.services_done.append((service, migration_sets[service.name]))
    return results


def _services_by_database(estate: Estate, order: tuple[str, ...]) -> dict[str, list[Service]]:
    """The services to test, by database. A set's databases all run the same files: only
    its first database is tested (with every service over the set there), so a fleet of
    500 costs one twin, not 500."""
    tested_set_database: dict[str, str] = {}
    grouped: dict[str, list[Service]] = {}
    for name in order:
        service = estate.services[name]
        fleet = estate.databases[service.database].fleet
        if fleet is not None and tested_set_database.setdefault(fleet, service.database) != service.database:
            continue
        grouped.setdefault(service.database, []).append(service)
    return grouped


def _twin_name(database: str) -> str:
    # Unique per run, so that two runs (or a run and a developer's own database) never meet;
    # within PostgreSQL's 63 bytes whatever the original name.
    suffix = f"_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    return "dbplan_test_" + database.encode("utf-8")[: 63 - 12 - len(suffix)].decode("utf-8", "ignore") + suffix


def _test_service(
    twin: _Twin,
    estate: Estate,
    service: Service,
    migration_set: MigrationSet,
    on_check: Callable[[str, MigrationCheck], None] | None,
) -> tuple[MigrationCheck, ...]:
    checks: list[MigrationCheck] = []
    # Version 0 first: the twin and its owner role exist before the first snapshot, so that
    # "before the first up" is an empty database, not no database.
    error = _step(twin, estate, service, migration_set, 0)
    previous, stuck = 0, error
    for migration in migration_set.migrations:
        if stuck:
            check = MigrationCheck(migration.version, migration.title, NOT_RUN, (f"not run: {stuck}",))
        else:
            check, at_version = _round_trip(twin, estate, service, migration_set, migration, previous)
            if not at_version and check.problems[0].startswith("down of"):
                # The down left the twin unfit for the up; a fresh twin up to this version
                # lets the later migrations still be tested.
                at_version = _rebuild(twin, estate, service, migration_set, migration.version) is None
            if not at_version:
                stuck = f"version {migration.version} could not be applied"
        checks.append(check)
        if on_check:
            on_check(service.name, check)
        previous = migration.version
    return tuple(checks)


def _round_trip(
    twin: _Twin, estate: Estate, service: Service, migration_set: MigrationSet, migration: Migration, previous: int
) -> tuple[MigrationCheck, bool]:
    """Up, then down (the schema must be as before), then up again; and whether the twin
    ended at the migration's version, so that the next one can be tested."""

    def result(status: str, *problems: str) -> MigrationCheck:
        return MigrationCheck(migration.version, migration.title, status, problems)

    before = _snapshot(twin, service)
    error = _step(twin, estate, service, migration_set, migration.version)
    if error:
        return result(FAILED, f"up of {migration.version} fails: {error}"), False
    if migration.down is None:
        return result(NO_DOWN, f"{migration.version} has no down file"), True
    error = _step(twin, estate, service, migration_set, previous)
    if error:
        return result(FAILED, f"down of {migration.version} fails: {error}"), True  # rolled back: still at it
    after_down = _snapshot(twin, service)
    problems = [_describe(migration.version, *difference) for difference in catalog.differences(before, after_down)]
    error = _step(twin, estate, service, migration_set, migration.version)
    if error:
        problems.append(f"up of {migration.version} does not apply again after its down: {error}")
    return (result(FAILED, *problems) if problems else result(OK)), not error


def _rebuild(twin: _Twin, estate: Estate, service: Service, migration_set: MigrationSet, target: int) -> str | None:
    """Drop the twin and bring a fresh one up to ``target`` (every service before this one
    in the twin again at its latest first); the error, if any."""
    _drop_database(twin)
    for earlier in twin.services_done:
        error = _step(twin, estate, earlier[0], earlier[1], earlier[1].latest or 0)
        if error:
            return error
    return _step(twin, estate, service, migration_set, target)


def _describe(version: int, change: str, kind: str, name: str, before: str | None, after: str | None) -> str:
    if change == "added":
        shown = f" ({after})" if kind.startswith("grants") else ""  # which grants, not only that there are some
        return f"down of {version} leaves {kind} {name}{shown}"
    if change == "dropped":
        return f"down of {version} drops {kind} {name}, which was there before the up"
    return f"down of {version} changes {kind} {name}: {before} -> {after}"


def _step(twin: _Twin, estate: Estate, service: Service, migration_set: MigrationSet, target: int) -> str | None:
    """Bring the twin's service to ``target`` through planner and executor; the error, if any."""
    if twin.stopping.is_set():
        return "the test was stopped"
    part = _twin_estate(twin, estate, service, target)
    sets = {service.name: migration_set}
    try:
        live = inspect(part)
        plan = make_plan(part, graph.build(part), sets, live)
        if plan.blocked:
            return plan.blockers[0].message
        result = execute(plan, part, sets)
    except DbplanError as err:
        return err.message
    twin.created_roles += [
        outcome.action.role
        for outcome in result.outcomes
        if outcome.status == "done" and isinstance(outcome.action, CreateRole)
    ]
    return result.error.message if result.error else None


def _twin_estate(twin: _Twin, estate: Estate, service: Service, target: int) -> Estate:
    server = twin.server
    roles = {twin.owner: Role(twin.owner, server.name)} if twin.owner else {}
    return replace(
        estate,
        servers={server.name: server},
        roles=roles,
        databases={twin.name: Database(twin.name, server.name, twin.owner)},
        services={service.name: replace(service, database=twin.name, target=target, depends_on=())},
    )


def _snapshot(twin: _Twin, service: Service) -> catalog.Snapshot:
    with connect(twin.server, twin.server.url or "", twin.name) as conn:
        schema_row = conn.execute(
            "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relname = %s",
            (service.history_table,),
        ).fetchall()
        schemas = [row[0] for row in schema_row]
        excluded = [f"{schema}.{table}" for schema in schemas for table in (service.table, service.history_table)]
        return catalog.snapshot(conn, excluded_tables=excluded, excluded_schemas=[service.schema] if service.schema else [])


def _drop_all(server: Server, twins: list[_Twin]) -> None:
    """Drop the twins, then the roles the test created for them (a role two twins share is
    dropped once neither needs it); never raise over a test's result."""
    for twin in twins:
        _drop_database(twin)
    roles = dict.fromkeys(role for twin in twins for role in twin.created_roles)
    import psycopg
    from psycopg import sql

    try:
        with connect(server, server.url or "") as conn:
            for role in roles:
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    except (psycopg.Error, DbplanError):
        pass  # the scratch server went away: its throwaway objects go with its data folder


def _drop_database(twin: _Twin) -> None:
    import psycopg
    from psycopg import sql

    try:
        with connect(twin.server, twin.server.url or "") as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(twin.name)))
    except (psycopg.Error, DbplanError):
        pass  # the scratch server went away: its throwaway databases go with its data folder

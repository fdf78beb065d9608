"""The planner, a pure function of (estate, graph, migrations, live state).

It never talks to a server, so every rule here is tested with small in-memory estates.
The executor calls ``plan_service`` again under its lock to check that what it is about
to do is still what was shown.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from ..estate.graph import EstateGraph
from ..estate.model import FIRST_STRATEGY_MAJOR, Estate, Role, Service
from ..live.facts import (
    LiveRole,
    LiveState,
    ServerFacts,
    ServiceFacts,
    TableStats,
    services_of_database,
)
from ..migrations.lint import new_tables_after
from ..migrations.scan import (
    TRANSACTIONAL_MODES,
    Migration,
    MigrationFile,
    MigrationSet,
    RunMode,
    run_mode_of,
)
from ..server.pgbinaries import major_of
from .plan import (
    Action,
    AlterDatabaseOwner,
    AlterRole,
    ApplyMigration,
    ApplyRepeatable,
    Blocker,
    CreateDatabase,
    CreateRole,
    Drift,
    MigrationAction,
    Plan,
    RevertMigration,
    ServicePlan,
    Unmanaged,
    Warning,
)

APPLIED_EVENTS = frozenset({"apply", "force", "baseline", "accept", "adopt"})


@dataclass(frozen=True)
class ServiceOutcome:
    """What the planner decided for one service."""

    summary: ServicePlan
    reverts: tuple[RevertMigration, ...]
    applies: tuple[ApplyMigration, ...]
    warnings: tuple[Warning, ...]
    blockers: tuple[Blocker, ...]
    repeats: tuple[ApplyRepeatable, ...] = ()  # after the applies, as Flyway runs them

    @property
    def actions(self) -> tuple[MigrationAction, ...]:
        return self.reverts + self.applies + self.repeats


def make_plan(
    estate: Estate, graph: EstateGraph, migration_sets: dict[str, MigrationSet], live: LiveState
) -> Plan:
    """Compute every change needed to bring the live servers to what the plan file says."""
    actions: list[Action] = []
    # Roles first, with their logins and memberships as declared, then the databases they
    # own, then migrations (run as those owners).
    actions += _missing_roles(estate, live)
    foreign_databases = {estate.services[name].database for name in estate.foreign}
    actions += _role_changes(estate, live)
    creations = [a for a in _missing_databases(estate, live) if a.database not in foreign_databases]
    actions += creations
    owner_changes = [a for a in _owner_changes(estate, live) if a.database not in foreign_databases]
    actions += owner_changes
    outcomes = {
        name: plan_service(estate.services[name], estate, migration_sets[name], live.services[name])
        for name in graph.service_order
    }
    for name in estate.foreign:
        outcomes[name] = _read_only(outcomes[name], estate, live)
    # Reverts run dependents first; applies run prerequisites first.
    for name in reversed(graph.service_order):
        actions += outcomes[name].reverts
    for name in graph.service_order:
        actions += outcomes[name].applies + outcomes[name].repeats
    in_file_order = [outcomes[name] for name in estate.services]
    return Plan(
        actions=tuple(actions),
        services=tuple(outcome.summary for outcome in in_file_order),
        warnings=tuple(_owner_change_warnings(owner_changes, estate, live))
        + tuple(_undeclared_membership_warnings(estate, live))
        + tuple(warning for outcome in in_file_order for warning in outcome.warnings),
        blockers=tuple(_moved_databases(estate, live))
        + tuple(_unavailable_strategies(creations, estate, live))
        + tuple(blocker for outcome in in_file_order for blocker in outcome.blockers),
        environment=estate.environment,
        unmanaged=_unmanaged(estate, live),
        notices=tuple(_unchecked_password_notices(estate, live)) + tuple(_file_copy_notices(creations, estate)),
    )


def _read_only(outcome: ServiceOutcome, estate: Estate, live: LiveState) -> ServiceOutcome:
    """A service another --shard part applies: this part changes nothing in it and waits,
    blocked, while it has work left."""
    service = estate.services[outcome.summary.service]
    database = estate.databases[service.database]
    missing = database.name not in live.servers[database.server].databases
    work = len(outcome.actions) + len(outcome.summary.pending) + len(outcome.blockers)
    if not missing and not work:
        return replace(outcome, warnings=())
    index, count = estate.shard or (1, 1)
    state = f"database '{database.name}' does not exist yet" if missing else f"{work} change(s) are left"
    blocker = Blocker(
        f"service '{service.name}' is applied by shard 1/{count}, and the services of shard {index}/{count} "
        f"depend on it: {state}",
        service=service.name,
        hint=f"apply shard 1/{count} first; this shard can run as soon as it has",
    )
    return ServiceOutcome(outcome.summary, (), (), (), (blocker,))


def _moved_databases(estate: Estate, live: LiveState) -> list[Blocker]:
    """A set's database that is missing on the server the set places it on but exists on
    another of the set's servers: the servers listed changed (spread moves a few names
    when one is added). Creating an empty twin would split the tenant in two."""
    found = []
    servers_of: dict[str, set[str]] = {}
    for database in estate.databases.values():
        if database.fleet is not None:
            servers_of.setdefault(database.fleet, set()).add(database.server)
    for database in estate.databases.values():
        if database.fleet is None or database.name in live.servers[database.server].databases:
            continue
        elsewhere = [
            name
            for name in sorted(servers_of[database.fleet] - {database.server})
            if name in live.servers and database.name in live.servers[name].databases
        ]
        if elsewhere:
            found.append(
                Blocker(
                    f"database '{database.name}' of set '{database.fleet}' is placed on server '{database.server}', "
                    f"but it exists on server '{elsewhere[0]}'",
                    hint=f"keep it where it is: list it under per_server.{elsewhere[0]} (or move it yourself first)",
                )
            )
    return found


def _discovered(estate: Estate, fleet: str | None) -> bool:
    spec = estate.sets.get(fleet) if fleet is not None else None
    return spec is not None and spec.discovery is not None


def _missing_roles(estate: Estate, live: LiveState) -> list[CreateRole]:
    return [
        CreateRole(role.server, role.name, login=bool(role.login), with_password=role.password is not None)
        for role in estate.roles.values()
        if role.name not in live.servers[role.server].roles
    ]


# A role that does not exist yet is compared as CREATE ROLE leaves it.
def _as_created(role: Role) -> LiveRole:
    return LiveRole(login=bool(role.login), connection_limit=-1, member_of=frozenset())


def _role_changes(estate: Estate, live: LiveState) -> list[AlterRole]:
    """Declared attributes that the live role (or the role as it will be created) lacks.
    Roles whose attributes were not read (nothing known) are not compared."""
    changes = []
    for role in estate.roles.values():
        facts = live.servers[role.server]
        exists = role.name in facts.roles
        current = facts.role_attributes.get(role.name) if exists else _as_created(role)
        if current is None:
            continue
        change = AlterRole(
            role.server,
            role.name,
            login=(current.login, role.login) if role.login is not None and current.login != role.login else None,
            connection_limit=(current.connection_limit, role.connection_limit)
            if role.connection_limit is not None and current.connection_limit != role.connection_limit
            else None,
            grant=tuple(other for other in role.member_of or () if other not in current.member_of),
            password=exists and role.password is not None and (facts.passwords_match or {}).get(role.name) is False,
        )
        if change.changes():
            changes.append(change)
    return changes


def _undeclared_membership_warnings(estate: Estate, live: LiveState) -> list[Warning]:
    """Where the file lists a role's memberships, the others it has are shown, not revoked:
    revoking could cut a running service off, and it may be granted on purpose by hand."""
    warnings = []
    for role in estate.roles.values():
        current = live.servers[role.server].role_attributes.get(role.name)
        if role.member_of is None or current is None:
            continue
        for other in sorted(current.member_of - set(role.member_of)):
            warnings.append(
                Warning(
                    f"role {role.name} is also a member of {other}, which its member_of does not list; "
                    f"dbplan never revokes: add it to member_of, or revoke it by hand (REVOKE {other} FROM {role.name})",
                    rule="undeclared-membership",
                )
            )
    return warnings


def _unchecked_password_notices(estate: Estate, live: LiveState) -> list[str]:
    """Once per server where declared passwords of existing roles could not be compared."""
    notices = []
    for name, facts in live.servers.items():
        if facts.passwords_match is not None:
            continue
        unchecked = [r.name for r in estate.roles.values() if r.server == name and r.password and r.name in facts.roles]
        if unchecked:
            notices.append(
                f"server {name}: password{'s' if len(unchecked) > 1 else ''} of {', '.join(unchecked)} not checked "
                f"(reading stored passwords needs a superuser; {facts.connected_as or 'the connecting role'} is not one); "
                "a changed password is not applied"
            )
    return notices


# Never listed as unmanaged: what every server has, and what dbplan itself connects to.
TEMPLATE_DATABASES = frozenset({"template0", "template1", "postgres"})


def _unmanaged(estate: Estate, live: LiveState) -> tuple[Unmanaged, ...]:
    """Roles and databases of each declared server that the plan file does not name."""
    found = []
    for name, facts in live.servers.items():
        roles = sorted(set(facts.role_attributes) - _managed_or_system_roles(estate, name, facts))
        skipped_databases = TEMPLATE_DATABASES | {facts.maintenance_database or "postgres"}
        declared = {d.name for d in estate.databases.values() if d.server == name}
        databases = sorted(facts.databases - declared - skipped_databases)
        if roles or databases:
            found.append(Unmanaged(name, tuple(roles), tuple(databases)))
    return tuple(found)


def _managed_or_system_roles(estate: Estate, server: str, facts: ServerFacts) -> set[str]:
    declared = {role.name for role in estate.roles.values() if role.server == server}
    system = {role for role in facts.role_attributes if role.startswith("pg_")}
    dbplan_itself = {role for role in (facts.connected_as, facts.bootstrap_superuser) if role is not None}
    return declared | system | dbplan_itself


def _file_copy_notices(creations: list[CreateDatabase], estate: Estate) -> list[str]:
    """Once per server whose databases are created file by file: the checkpoints are a
    cost the server's other sessions feel, and a reviewer should see it coming."""
    counts = Counter(action.server for action in creations if estate.servers[action.server].create_strategy == "file_copy")
    return [
        f"server {server}: {count} database{'s' if count != 1 else ''} to create, copied file by file (create_strategy: file_copy), "
        "each forcing two checkpoints"
        for server, count in counts.items()
    ]


def _unavailable_strategies(creations: list[CreateDatabase], estate: Estate, live: LiveState) -> list[Blocker]:
    """wal_log asked of a server older than PostgreSQL 15, which would refuse the STRATEGY."""
    blockers = []
    for server in sorted({action.server for action in creations}):
        major = major_of(live.servers[server].version)
        if estate.servers[server].create_strategy == "wal_log" and 0 < major < FIRST_STRATEGY_MAJOR:
            blockers.append(Blocker(
                f"server {server} runs PostgreSQL {major}, which creates databases only by copying files: "
                "create_strategy wal_log needs PostgreSQL 15 or later",
                hint=f"remove create_strategy from server '{server}', or set it to file_copy",
            ))  # fmt: skip
    return blockers


def _missing_databases(estate: Estate, live: LiveState) -> list[CreateDatabase]:
    return [
        CreateDatabase(database.server, database.name, database.owner)
        for database in estate.databases.values()
        if database.name not in live.servers[database.server].databases
        and not _discovered(estate, database.fleet)  # a discovered set's databases are never created
    ]


def _owner_changes(estate: Estate, live: LiveState) -> list[AlterDatabaseOwner]:
    """Existing databases owned by another role than the plan file declares. Migrations run
    as the declared owner, so the database, and the bookkeeping tables in it, go to it."""
    changes = []
    for database in estate.databases.values():
        owners = live.servers[database.server].database_owners
        if database.owner is None or database.name not in owners or owners[database.name] == database.owner:
            continue
        changes.append(
            AlterDatabaseOwner(
                database.server,
                database.name,
                database.owner,
                owners[database.name],
                _bookkeeping_tables(estate, live, database.name),
            )
        )
    return changes


def _bookkeeping_tables(estate: Estate, live: LiveState, database: str) -> tuple[str, ...]:
    tables: list[str] = []
    for service in services_of_database(estate, database):
        facts = live.services[service.name]
        if service.database != database or facts.schema is None:
            continue
        tables += [f"{facts.schema}.{service.table}"] if facts.table_exists else []
        tables += [f"{facts.schema}.{service.history_table}"] if facts.history_exists else []
    return tuple(tables)


def _owner_change_warnings(changes: list[AlterDatabaseOwner], estate: Estate, live: LiveState) -> list[Warning]:
    """What handing a database over does not do: objects earlier migrations made stay with
    the role that made them, and a later migration that alters one of them fails."""
    return [
        Warning(
            f"database {change.database} goes from owner {change.previous_owner} to {change.owner}, with its "
            f"bookkeeping tables; what earlier migrations created stays owned by {change.previous_owner}, so a "
            f"migration that alters it fails until it is handed over too (REASSIGN OWNED BY or ALTER ... OWNER TO)",
            rule="owner-change",
        )
        for change in changes
        if any(live.services[s.name].version is not None for s in services_of_database(estate, change.database))
    ]


def plan_service(
    service: Service, estate: Estate, migration_set: MigrationSet, facts: ServiceFacts, *, lint: bool = True
) -> ServiceOutcome:
    """Decide what to revert and apply for one service. ``lint=False`` leaves out the lint
    findings, which only a reviewer reads: the executor's re-check under its lock compares
    actions and blockers."""
    by_version = migration_set.by_version()
    applied = _applied(facts, by_version)
    current = max(applied, default=None)
    latest = migration_set.latest
    # Without an explicit target the service moves to its latest file, and never down.
    target = service.target if service.target is not None else max((v for v in (latest, current) if v is not None), default=None)
    drift = _drift(applied, by_version)
    warnings: list[Warning] = _drift_warnings(service, drift) + _missingfile_warnings(service, applied, by_version)
    blockers: list[Blocker] = _unreachable_target_blockers(service, by_version, applied)
    if facts.dirty:
        blockers.append(_dirty_blocker(service, facts, by_version, applied))
    if facts.foreign is not None and not facts.table_exists:
        blockers.append(_foreign_blocker(service, facts))

    pending = [
        m for m in migration_set.migrations if m.version not in applied and (target is None or m.version <= target)
    ]
    out_of_order = tuple(m.version for m in pending if current is not None and m.version < current)
    if not service.allow_out_of_order:
        blockers += _out_of_order_blockers(service, out_of_order, by_version, current)

    # Only an explicit target reverts: an applied version above the last file (deleted, or a
    # golang-migrate database ahead of this checkout) is warned about, never undone.
    reverts = _reverts(service, applied, by_version, service.target, blockers)
    remaining = sorted(set(applied) - {r.version for r in reverts})
    applies = _applies(service, pending, max(remaining, default=None))
    # Tables an earlier pending file creates (however) are new and empty when a later one
    # alters them: no lock or rewrite warning on them.
    new_tables: tuple[str, ...] = ()
    for migration in pending:
        found = file_warnings(service, migration, blockers, lint=lint, new_tables=new_tables, facts=facts)
        blockers += large_table_blockers(service, migration.version, found)
        warnings += found
        new_tables = new_tables_after(migration.up.script, new_tables, existing_tables(facts))
    for revert in reverts:  # a revert drops what its up file made: the reviewer sees that too
        down = by_version[revert.version].down
        found = lint_warnings(service, down, lint=lint, facts=facts) if down is not None else []
        blockers += large_table_blockers(service, revert.version, found)
        warnings += found

    version_at_end = applies[-1].version_after if applies else max(remaining, default=None)
    repeats = _repeats(service, migration_set, facts, version_at_end)
    for repeatable in migration_set.repeatables:  # a reviewer reads a repeatable that runs as any file
        if any(repeat.title == repeatable.description for repeat in repeats):
            blockers += _file_blockers(service, None, repeatable.file, RunMode.TRANSACTION)
            warnings += lint_warnings(service, repeatable.file, lint=lint, new_tables=new_tables, facts=facts)

    summary = ServicePlan(
        service=service.name,
        database=service.database,
        server=estate.databases[service.database].server,
        current=current,
        target=target,
        latest=latest,
        dirty=facts.dirty,
        pending=tuple(m.version for m in pending),
        reverts=tuple(r.version for r in reverts),
        drift=drift,
        out_of_order=out_of_order,
        invalid_indexes=facts.invalid_indexes,
        dirty_version=facts.version if facts.dirty else None,
        bookkeeping=f"{facts.schema}.{service.table}" if facts.schema else None,
        fleet=service.fleet,
        stage=estate.databases[service.database].stage if service.fleet else None,
        failure=facts.failure if facts.dirty else None,
    )
    summary = replace(summary, repeatables=tuple(repeat.title for repeat in repeats))
    if blockers:
        return ServiceOutcome(summary, (), (), tuple(warnings), tuple(blockers))
    return ServiceOutcome(summary, reverts, applies, tuple(warnings), (), repeats)


def _repeats(
    service: Service, migration_set: MigrationSet, facts: ServiceFacts, version: int | None
) -> tuple[ApplyRepeatable, ...]:
    """The repeatable files to run: those never recorded, and those whose checksum differs
    from the one last recorded; in the order of their descriptions."""
    return tuple(
        ApplyRepeatable(
            service=service.name,
            database=service.database,
            version=version,
            title=repeatable.description,
            file=repeatable.file.display,
            checksum=repeatable.file.checksum,
            previous_checksum=facts.repeatables.get(repeatable.description),
            run_mode=run_mode_of(repeatable.file.script),
        )
        for repeatable in migration_set.repeatables
        if facts.repeatables.get(repeatable.description) != repeatable.file.checksum
    )


def _foreign_blocker(service: Service, facts: ServiceFacts) -> Blocker:
    """Another tool's bookkeeping and none of dbplan's: applying would run every file again,
    on a database where they ran already. Blocked until ``dbplan adopt`` takes it over, a
    step a person takes on purpose (it writes bookkeeping, and it checks the files)."""
    foreign = facts.foreign
    assert foreign is not None
    count = foreign.applied_count
    tool = "Flyway" if foreign.tool == "flyway" else "dbmate"
    hint = f"run 'dbplan adopt {service.name}': it records them as applied without running them"
    if foreign.tool == "dbmate" and foreign.table == service.table:
        hint = (
            f"dbmate's table keeps its name so that dbmate can still read it: first give service '{service.name}' "
            f"a table of its own (table: dbplan_migrations), then {hint}"
        )
    return Blocker(
        f"found {tool} bookkeeping in {foreign.qualified} of database '{service.database}': "
        f"{count} version{'s' if count != 1 else ''} applied; run `dbplan adopt {service.name}`",
        service=service.name,
        hint=hint,
    )


def _drift_warnings(service: Service, drift: tuple[Drift, ...]) -> list[Warning]:
    return [
        Warning(
            f"version {d.version} was changed after it was applied (recorded sha256 {d.recorded_checksum[:12]}, "
            f"file {d.file_checksum[:12] if d.file_checksum else 'missing'})",
            service=service.name,
            file=d.file,
            rule="drift",
        )
        for d in drift
    ]


def _missingfile_warnings(
    service: Service, applied: dict[int, str | None], by_version: dict[int, Migration]
) -> list[Warning]:
    return [
        Warning(
            f"version {version} is applied but has no file in {service.migrations_display}",
            service=service.name,
            rule="missing-file",
        )
        for version in sorted(applied)
        if version not in by_version and (service.target is None or version <= service.target)
    ]


def _unreachable_target_blockers(
    service: Service, by_version: dict[int, Migration], applied: dict[int, str | None]
) -> list[Blocker]:
    """A target must be a version the service can stand at: one with a file, one already
    applied (its file may be gone), or 0 (nothing applied). Any other number would be
    shown as reached and leave the service below it, at the last file under it."""
    target = service.target
    if target is None or target == 0 or target in by_version or target in applied:
        return []
    below = max((v for v in by_version if v < target), default=None)
    above = min((v for v in by_version if v > target), default=None)
    if not by_version:
        where = f"{service.migrations_display} has no migration files"
    elif above is None:
        where = f"the newest file in {service.migrations_display} is version {below}"
    elif below is None:
        where = f"the oldest file in {service.migrations_display} is version {above}"
    else:
        where = f"the files nearest it are versions {below} and {above}"
    return [
        Blocker(
            f"target {target} of service '{service.name}' names no migration: {where}",
            service=service.name,
            version=target,
            hint=f"set the service's target to a version that has a file, or add the file of version {target}",
        )
    ]


def _out_of_order_blockers(
    service: Service, out_of_order: tuple[int, ...], by_version: dict[int, Migration], current: int | None
) -> list[Blocker]:
    return [
        Blocker(
            f"{by_version[version].up.display} (version {version}) was never applied, but version "
            f"{current} already is: it is out of order",
            service=service.name,
            version=version,
            file=by_version[version].up.display,
            hint="renumber the file above the current version, or set allow_out_of_order: true "
            f"on service '{service.name}' to apply it anyway",
        )
        for version in out_of_order
    ]


def _applied(facts: ServiceFacts, by_version: dict[int, Migration]) -> dict[int, str | None]:
    """Applied versions and the checksum recorded for each (None: drift unknown).

    A version's state is its latest history event, except that a later force (or
    baseline) to version F overrides older events: after it, the versions up to F are
    applied. A version with no history at all, at or below schema_migrations.version,
    counts as applied when it is at or below the last force/baseline, or above every
    version dbplan recorded (golang-migrate applied it: adoption, or a cutover where both
    tools run). Below dbplan's highest recorded version it was never applied: it came in
    late, out of order.
    """
    history = facts.history_by_version()
    cut = facts.last_force
    applied: dict[int, str | None] = {}
    for version, entry in history.items():
        if cut is not None and entry.id < cut.id:
            if version <= cut.version:
                applied[version] = entry.checksum if entry.event in APPLIED_EVENTS else None
        elif entry.event in APPLIED_EVENTS:
            applied[version] = entry.checksum
    if facts.version is None:
        return applied
    # The dirty version was recorded before it ran and did not finish: not applied.
    ceiling = facts.version - 1 if facts.dirty else facts.version
    highest_recorded = max(history, default=None)
    for version in by_version:
        if version > ceiling or version in history:
            continue
        if highest_recorded is None or version > highest_recorded or (cut is not None and version <= cut.version):
            applied[version] = None
    if not facts.dirty and facts.version not in history:
        applied.setdefault(facts.version, None)  # the recorded current version; its file may be gone
    return applied


def _drift(applied: dict[int, str | None], by_version: dict[int, Migration]) -> tuple[Drift, ...]:
    return tuple(
        Drift(version, by_version[version].up.display, recorded, by_version[version].up.checksum)
        for version, recorded in sorted(applied.items())
        if recorded is not None and version in by_version and by_version[version].up.checksum != recorded
    )


def _dirty_blocker(
    service: Service, facts: ServiceFacts, by_version: dict[int, Migration], applied: dict[int, str | None]
) -> Blocker:
    version = facts.version
    migration = by_version.get(version) if version is not None else None
    previous = max((v for v in applied if version is None or v < version), default=0)
    file = migration.up.display if migration else None
    if facts.dirty_in_progress:
        return Blocker(
            f"service '{service.name}' is being migrated right now: {file or 'a migration'} (version {version}) "
            f"runs outside a transaction in another session ({facts.dirty_in_progress})",
            service=service.name,
            version=version,
            file=file,
            hint="wait for that run to finish; 'dbplan apply' waits for it by itself",
        )
    left_behind = ""
    if facts.invalid_indexes:
        left_behind = f"; invalid indexes left behind: {', '.join(facts.invalid_indexes)}"
    return Blocker(
        f"service '{service.name}' is dirty at version {version}: "
        f"{migration.up.display if migration else 'a migration'} ran outside a transaction and failed "
        f"part-way{_failure_phrase(facts)}{left_behind}",
        service=service.name,
        version=version,
        file=migration.up.display if migration else None,
        hint=f"fix the database by hand, then run 'dbplan force {service.name} {version}' if the migration's "
        f"changes are now complete, or 'dbplan force {service.name} {previous}' to run it again",
    )


def _failure_phrase(facts: ServiceFacts) -> str:
    """`` at line 3 with SQLSTATE 23505 (message); 2 of its 4 statements had run and stay done``"""
    failure = facts.failure
    if failure is None:
        return ""
    where = f" at line {failure.line}" if failure.line else ""
    state = f" with SQLSTATE {failure.sqlstate}" if failure.sqlstate else ""
    return f"{where}{state} ({failure.message}); {failure.done} of its {failure.total} statements had run and stay done"


def _reverts(
    service: Service,
    applied: dict[int, str | None],
    by_version: dict[int, Migration],
    target: int | None,
    blockers: list[Blocker],
) -> tuple[RevertMigration, ...]:
    if target is None:
        return ()
    doomed = sorted((version for version in applied if version > target), reverse=True)
    reverts: list[RevertMigration] = []
    remaining = sorted(set(applied) - set(doomed))
    for index, version in enumerate(doomed):
        migration = by_version.get(version)
        if migration is None or migration.down is None:
            down_name = migration.up.path.name.replace(".up.sql", ".down.sql") if migration else f"{version}_TITLE.down.sql"
            blockers.append(
                Blocker(
                    f"cannot revert version {version} of service '{service.name}' to reach target {target}: "
                    f"{'no migration file' if migration is None else 'no down file'}",
                    service=service.name,
                    version=version,
                    file=migration.up.display if migration else None,
                    hint=f"add {down_name}, or raise the service's target",
                )
            )
            continue
        run_mode = run_mode_of(migration.down.script)
        blockers += _file_blockers(service, migration.version, migration.down, run_mode)
        after = doomed[index + 1 :] + remaining
        reverts.append(
            RevertMigration(
                service=service.name,
                database=service.database,
                version=version,
                title=migration.title,
                file=migration.down.display,
                checksum=migration.down.checksum,
                run_mode=run_mode,
                version_after=max(after, default=None),
            )
        )
    return tuple(reverts)


def _applies(service: Service, pending: list[Migration], base: int | None) -> tuple[ApplyMigration, ...]:
    applies: list[ApplyMigration] = []
    high = base
    for migration in pending:  # ascending: out-of-order files run in version order too
        high = migration.version if high is None else max(high, migration.version)
        applies.append(
            ApplyMigration(
                service=service.name,
                database=service.database,
                version=migration.version,
                title=migration.title,
                file=migration.up.display,
                checksum=migration.up.checksum,
                run_mode=migration.run_mode,
                version_after=high,
            )
        )
    return tuple(applies)


def file_warnings(
    service: Service,
    migration: Migration,
    blockers: list[Blocker],
    *,
    lint: bool,
    new_tables: tuple[str, ...] = (),
    facts: ServiceFacts | None = None,
) -> list[Warning]:
    """The warnings of a pending up file (``dbplan lint`` shows the same); its blockers go to
    ``blockers``. ``new_tables``: tables earlier pending files create; ``facts``: the live
    state, whose table sizes go into the lint warnings (None: not known, as in ``dbplan lint``)."""
    script = migration.up.script
    file = migration.up.display
    warnings: list[Warning] = []
    silenced = script.allowed_rules | service.lint_allow
    if not script.parsed and not migration.transactional:
        warnings.append(
            Warning(
                f"could not parse the SQL ({script.parse_error}); it runs as one string outside a transaction, "
                "with the service marked dirty until it has succeeded",
                service=service.name,
                file=file,
                rule="parse-error",
            )
        )
    mode_notes = {
        RunMode.WRAPPED: "manages its own transaction (BEGIN ... COMMIT): dbplan runs its statements in "
        "dbplan's transaction instead, together with the bookkeeping",
        RunMode.OWN_TRANSACTIONS: "holds several transaction blocks: it runs statement by statement as "
        "written, and a failure part-way leaves the service dirty",
    }
    if migration.run_mode in mode_notes and "own-transaction" not in silenced:
        warnings.append(Warning(mode_notes[migration.run_mode], service=service.name, file=file, rule="own-transaction"))
    if migration.down is None and "missing-down" not in silenced:
        warnings.append(
            Warning("has no down file: it cannot be reverted", service=service.name, file=file, rule="missing-down")
        )
    blockers += _file_blockers(service, migration.version, migration.up, migration.run_mode)
    return warnings + lint_warnings(service, migration.up, lint=lint, new_tables=new_tables, facts=facts)


def lint_warnings(
    service: Service,
    file: MigrationFile,
    *,
    lint: bool,
    new_tables: tuple[str, ...] = (),
    facts: ServiceFacts | None = None,
) -> list[Warning]:
    """The lint findings of a file as warnings, each with the live size of its table when
    ``facts`` has it; those of severity ``error`` are blockers instead."""
    from ..migrations.lint import lint as lint_script

    if not lint:
        return []
    tables = facts.tables if facts is not None else ()
    findings = lint_script(
        file.script,
        new_tables=new_tables,
        existing_tables=existing_tables(facts),
        column_types={f"{t.schema}.{t.name}": t.columns for t in tables if not t.is_index},
        allow=service.lint_allow,
    )
    warnings = []
    for finding in findings:
        if finding.severity == "error":  # reported as a blocker when it matters
            continue
        stats = _stats_of(finding.table, tables, facts.schema if facts is not None else None)
        message = finding.message + (f" Live: {size_phrase(stats)}." if stats else "")
        warnings.append(
            Warning(
                message,
                service=service.name,
                file=file.display,
                line=finding.line,
                rule=finding.rule,
                statement=finding.statement,
                severity=finding.severity,
                lock=finding.lock,
                table=stats.table if stats else finding.table,
                rows=stats.rows if stats else None,
                bytes=stats.bytes if stats else None,
            )
        )
    return warnings


def existing_tables(facts: ServiceFacts | None) -> tuple[str, ...]:
    """The live tables (not indexes) among those the files name, as ``schema.table``."""
    if facts is None:
        return ()
    return tuple(f"{t.schema}.{t.name}" for t in facts.tables if not t.is_index)


def _stats_of(name: str | None, tables: tuple[TableStats, ...], schema: str | None) -> TableStats | None:
    """The live table a finding names (``orders``, ``sales.orders``, an index): with an
    unqualified name in several schemas, the service's schema, then public, then the largest."""
    if not name or not tables:
        return None
    wanted_schema, _, relation = name.rpartition(".")
    matches = [t for t in tables if t.name == relation and (not wanted_schema or t.schema == wanted_schema)]
    if not matches:
        return None
    return max(matches, key=lambda t: (t.schema == schema, t.schema == "public", t.bytes))


def size_phrase(stats: TableStats) -> str:
    """``orders: ~1.2M rows, 840 MB``."""
    rows = "rows not counted yet (never analyzed)" if stats.rows is None else f"~{_rounded(stats.rows)} rows"
    return f"{stats.table}: {rows}, {pretty_bytes(stats.bytes)}"


def _rounded(count: int) -> str:
    for size, suffix in ((10**9, " billion"), (10**6, "M"), (10**3, "k")):
        if count >= size:
            value = count / size
            return f"{value:.1f}".removesuffix(".0") + suffix if value < 100 else f"{value:.0f}{suffix}"
    return str(count)


def pretty_bytes(size: int) -> str:
    """As PostgreSQL's pg_size_pretty: a unit up once the number reaches 10240 of this one."""
    value = float(size)
    for unit in ("bytes", "kB", "MB", "GB"):
        if abs(value) < 10 * 1024:
            return f"{value:.0f} {unit}"
        value /= 1024
    return f"{value:.0f} TB"


def large_table_blockers(service: Service, version: int, warnings: list[Warning]) -> list[Blocker]:
    """A lock or rewrite warning on a live table above the service's
    ``lint.block_on_tables_larger_than`` stops the plan."""
    limit = service.lint_block_over
    if limit is None:
        return []
    return [
        Blocker(
            f"{warning.file}:{warning.line}: {warning.statement} takes {warning.lock} on {warning.table} "
            f"({pretty_bytes(warning.bytes or 0)}, "
            + ("rows unknown" if warning.rows is None else f"~{_rounded(warning.rows)} rows")
            + f"), larger than lint.block_on_tables_larger_than ({limit.text}) of service '{service.name}'",
            service=service.name,
            version=version,
            file=warning.file,
            hint=f"make the change without the long lock ({warning.rule}: see its warning), or run it on purpose "
            f"with '-- dbplan:allow {warning.rule}' in the file, or raise the limit",
        )
        for warning in warnings
        if warning.severity == "locking" and warning.lock and limit.exceeded_by(warning.rows, warning.bytes)
    ]


def _file_blockers(service: Service, version: int | None, file: MigrationFile, run_mode: str) -> list[Blocker]:
    """What in a file stops the plan (``refusals``): each names the file and line."""
    from ..migrations.refusals import refusals

    return [
        Blocker(
            f"{file.display}:{refusal.line}: {refusal.message}" if refusal.line else f"{file.display}: {refusal.message}",
            service=service.name,
            version=version,
            file=file.display,
            hint=refusal.hint,
        )
        for refusal in refusals(file.script, transactional=run_mode in TRANSACTIONAL_MODES)
    ]


def applied_versions(facts: ServiceFacts, migration_set: MigrationSet) -> dict[int, str | None]:
    """The versions the planner counts as applied, with the checksum recorded for each
    (None: unknown), ascending, for the commands that record a person's word about them
    (``dbplan baseline``, ``dbplan accept``) and ``dbplan handback``, which writes them into
    dbmate's table: they must see the service as plan does."""
    return dict(sorted(_applied(facts, migration_set.by_version()).items()))

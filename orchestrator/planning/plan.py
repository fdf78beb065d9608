"""The Plan: an immutable value listing exactly what ``apply`` will do, in order.

Actions compare by value, so tests can write ``assert plan.actions == (CreateDatabase(...),)``
and the executor can check, under its lock, that a fresh plan is what was shown. Nothing
here holds a secret: a role's password stays in the estate and is read only when the
role is created.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..live.failure import Failure


@dataclass(frozen=True)
class CreateRole:
    server: str
    role: str
    login: bool = False
    with_password: bool = False
    kind: str = field(default="create_role", init=False)


@dataclass(frozen=True)
class AlterRole:
    """Bring an existing (or just created) role to what the plan file declares. Each
    change holds (live, declared); None: that attribute already matches or is not
    declared. Memberships are only ever granted, never revoked. ``password`` says only
    that the stored verifier does not match the declared password: never either one."""

    server: str
    role: str
    login: tuple[bool, bool] | None = None
    connection_limit: tuple[int, int] | None = None
    grant: tuple[str, ...] = ()  # roles it is made a member of (GRANT x TO role)
    password: bool = False
    kind: str = field(default="alter_role", init=False)

    def changes(self) -> list[str]:
        """The changes in words: ``login true -> false``, ``password changed``."""
        words: list[str] = []
        if self.login is not None:
            words.append(f"login {str(self.login[0]).lower()} -> {str(self.login[1]).lower()}")
        if self.connection_limit is not None:
            words.append(f"connection limit {self.connection_limit[0]} -> {self.connection_limit[1]}")
        if self.grant:
            words.append(f"grant membership in {', '.join(self.grant)}")
        if self.password:
            words.append("password changed")
        return words


@dataclass(frozen=True)
class CreateDatabase:
    server: str
    database: str
    owner: str | None = None
    kind: str = field(default="create_database", init=False)


@dataclass(frozen=True)
class AlterDatabaseOwner:
    """Hand an existing database whose owner is not the one the plan file declares to that
    owner, with the bookkeeping tables in it, so that migrations run as the owner (SET
    ROLE) can write them; one transaction in the database itself."""

    server: str
    database: str
    owner: str
    previous_owner: str
    bookkeeping_tables: tuple[str, ...] = ()  # "schema.table" of the services' tables that exist
    kind: str = field(default="alter_database_owner", init=False)


@dataclass(frozen=True)
class ApplyMigration:
    service: str
    database: str
    version: int
    title: str
    file: str
    checksum: str
    run_mode: str
    version_after: int  # what schema_migrations.version holds once this has run
    kind: str = field(default="apply_migration", init=False)

    @property
    def transactional(self) -> bool:
        from ..migrations.scan import TRANSACTIONAL_MODES

        return self.run_mode in TRANSACTIONAL_MODES


@dataclass(frozen=True)
class RevertMigration:
    service: str
    database: str
    version: int
    title: str
    file: str  # the down file
    checksum: str
    run_mode: str
    version_after: int | None  # None: no version left, the row is removed
    kind: str = field(default="revert_migration", init=False)

    @property
    def transactional(self) -> bool:
        from ..migrations.scan import TRANSACTIONAL_MODES

        return self.run_mode in TRANSACTIONAL_MODES


@dataclass(frozen=True)
class ApplyRepeatable:
    """Run a repeatable file (Flyway's ``R__description.sql``) again, after the service's
    versioned migrations: its checksum differs from the one last recorded, or none was.
    ``version`` is the service's version when it runs, which it leaves as it is."""

    service: str
    database: str
    version: int | None  # schema_migrations.version when it runs (None: no version yet)
    title: str  # the file's description: what its history rows are kept by
    file: str
    checksum: str
    previous_checksum: str | None  # None: it never ran
    run_mode: str = "transaction"
    kind: str = field(default="apply_repeatable", init=False)

    @property
    def version_after(self) -> int | None:
        return self.version

    @property
    def transactional(self) -> bool:
        return True  # the scan refuses a repeatable marked no-transaction


Action = CreateRole | AlterRole | CreateDatabase | AlterDatabaseOwner | ApplyMigration | RevertMigration | ApplyRepeatable
ServerAction = CreateRole | AlterRole | CreateDatabase | AlterDatabaseOwner  # run on the server, under its lock
MigrationAction = ApplyMigration | RevertMigration | ApplyRepeatable


def action_phrase(action: Action) -> str:
    """The action as the middle of a sentence: "applying version 3 of service 'app'"."""
    if isinstance(action, CreateRole):
        return f"creating role '{action.role}'"
    if isinstance(action, AlterRole):
        return f"altering role '{action.role}'"
    if isinstance(action, CreateDatabase):
        return f"creating database '{action.database}'"
    if isinstance(action, AlterDatabaseOwner):
        return f"handing database '{action.database}' to owner '{action.owner}'"
    if isinstance(action, ApplyRepeatable):
        return f"running repeatable '{action.title}' of service '{action.service}'"
    verb = "applying" if isinstance(action, ApplyMigration) else "reverting"
    return f"{verb} version {action.version} of service '{action.service}'"


@dataclass(frozen=True)
class Drift:
    version: int
    file: str
    recorded_checksum: str
    file_checksum: str | None  # None: the file is gone


@dataclass(frozen=True)
class Warning:
    message: str
    service: str | None = None
    file: str | None = None
    line: int | None = None
    rule: str | None = None
    statement: str | None = None
    severity: str | None = None  # lint findings: destructive | locking
    lock: str | None = None  # the lock the statement takes: ACCESS EXCLUSIVE, SHARE, ...
    table: str | None = None  # the live table it takes it on (schema.table), when found
    rows: int | None = None  # that table's estimated rows (pg_class.reltuples)
    bytes: int | None = None  # and its size (pg_total_relation_size)


@dataclass(frozen=True)
class Blocker:
    """Why the plan cannot be applied as it is; ``apply`` refuses while any exists."""

    message: str
    service: str | None = None
    version: int | None = None
    file: str | None = None
    hint: str | None = None


@dataclass(frozen=True)
class ServicePlan:
    service: str
    database: str
    server: str
    current: int | None
    target: int | None
    latest: int | None
    dirty: bool
    pending: tuple[int, ...]
    reverts: tuple[int, ...]
    drift: tuple[Drift, ...]
    out_of_order: tuple[int, ...] = ()
    invalid_indexes: tuple[str, ...] = ()
    dirty_version: int | None = None  # the version that failed part-way; current is the one before
    bookkeeping: str | None = None  # schema.table of the migrations table; None: its database is not there yet
    fleet: str | None = None  # the service definition over a set this instance came from
    stage: int | None = None  # its database's roll-out stage within the set (0: canary)
    failure: Failure | None = None  # dirty: where its migration failed, when the history recorded it
    repeatables: tuple[str, ...] = ()  # descriptions of the repeatable files that will run


@dataclass(frozen=True)
class Unmanaged:
    """Roles and databases on a declared server that the plan file does not mention
    (PostgreSQL's own, the connecting role and the maintenance databases left out).
    Only listed: dbplan never drops anything."""

    server: str
    roles: tuple[str, ...] = ()
    databases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    services: tuple[ServicePlan, ...]
    warnings: tuple[Warning, ...] = ()
    blockers: tuple[Blocker, ...] = ()
    environment: str | None = None  # the plan file's environment it was made for (--env)
    unmanaged: tuple[Unmanaged, ...] = ()  # one per server with anything unmanaged
    # What the plan could not check and says once (not warnings: nothing is wrong, and
    # ``--fail-on warnings`` must not fail for them): passwords without pg_authid access.
    notices: tuple[str, ...] = ()

    @property
    def changes(self) -> bool:
        return bool(self.actions)

    @property
    def blocked(self) -> bool:
        return bool(self.blockers)

    def summary(self) -> dict[str, int]:
        counts = {"create_roles": 0, "alter_roles": 0, "create_databases": 0, "change_owners": 0, "apply": 0, "revert": 0}
        key = {
            "create_role": "create_roles",
            "alter_role": "alter_roles",
            "create_database": "create_databases",
            "alter_database_owner": "change_owners",
            "apply_migration": "apply",
            "revert_migration": "revert",
        }
        for action in self.actions:
            if action.kind == "apply_repeatable":  # only when there are some: the shape stays as it was
                counts["repeat"] = counts.get("repeat", 0) + 1
            else:
                counts[key[action.kind]] += 1
        return counts

    def actions_of(self, service: str) -> tuple[MigrationAction, ...]:
        return self._actions_by_service.get(service, ())

    @cached_property
    def _actions_by_service(self) -> dict[str, tuple[MigrationAction, ...]]:
        """Built once: renderers ask per service, and a fleet has thousands of them."""
        grouped: dict[str, list[MigrationAction]] = {}
        for action in self.actions:
            if isinstance(action, (ApplyMigration, RevertMigration, ApplyRepeatable)):
                grouped.setdefault(action.service, []).append(action)
        return {service: tuple(actions) for service, actions in grouped.items()}

    def service(self, name: str) -> ServicePlan:
        return next(service for service in self.services if service.service == name)

    def failures_under(self, fail_on: frozenset[str]) -> tuple[str, ...]:
        """What ``plan --fail-on`` turns into a failure: drift, warnings (see FAIL_ON)."""
        found: list[str] = []
        if "drift" in fail_on:
            for service in self.services:
                if service.drift:
                    versions = ", ".join(str(drift.version) for drift in service.drift)
                    found.append(f"service '{service.service}' has drift: applied files changed or gone ({versions})")
        if "warnings" in fail_on and self.warnings:
            count = len(self.warnings)
            found.append(f"the plan has {count} warning{'s' if count != 1 else ''}")
        return tuple(found)


FAIL_ON = ("drift", "warnings")  # what a CI job may ask ``plan`` to fail on


def action_to_dict(action: Action) -> dict[str, Any]:
    """The JSON shape of an action (DESIGN.md); field order follows the dataclass."""
    data: dict[str, Any] = {"kind": action.kind}
    for name in action.__dataclass_fields__:
        if name != "kind":
            data[name] = getattr(action, name)
    if isinstance(action, (ApplyMigration, RevertMigration, ApplyRepeatable)):
        data["transactional"] = action.transactional
    return data


ACTION_TYPES: dict[str, type[Action]] = {
    "create_role": CreateRole,
    "alter_role": AlterRole,
    "create_database": CreateDatabase,
    "alter_database_owner": AlterDatabaseOwner,
    "apply_migration": ApplyMigration,
    "revert_migration": RevertMigration,
    "apply_repeatable": ApplyRepeatable,
}


def action_from_dict(data: dict[str, Any]) -> Action:
    cls = ACTION_TYPES[data["kind"]]
    fields = {spec.name for spec in dataclasses.fields(cls) if spec.init}
    values: dict[str, Any] = {
        name: tuple(value) if isinstance(value, list) else value for name, value in data.items() if name in fields
    }
    return cls(**values)  # JSON lists back to the tuples that compare by value


FORMAT_VERSION = 1  # of the JSON plan, status and result (DESIGN.md)


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        **({"environment": plan.environment} if plan.environment else {}),
        "changes": plan.changes,
        "blocked": plan.blocked,
        "summary": plan.summary(),
        "actions": [action_to_dict(action) for action in plan.actions],
        "services": [service_to_dict(service) for service in plan.services],
        **({"fleets": fleets} if (fleets := fleets_to_dict(plan)) else {}),
        "warnings": [without_nones(vars(warning)) for warning in plan.warnings],
        "blockers": [without_nones(vars(blocker)) for blocker in plan.blockers],
        "unmanaged": unmanaged_to_dict(plan.unmanaged),
        "notices": list(plan.notices),
    }


def unmanaged_to_dict(unmanaged: tuple[Unmanaged, ...]) -> dict[str, list[dict[str, str]]]:
    """``{"roles": [{"server", "name"}], "databases": [...]}``: one list per kind over all servers."""
    return {
        "roles": [{"server": entry.server, "name": role} for entry in unmanaged for role in entry.roles],
        "databases": [{"server": entry.server, "name": database} for entry in unmanaged for database in entry.databases],
    }


def fleets_to_dict(plan: Plan) -> dict[str, Any]:
    """Per service over a set: how many databases, on which servers, in which stages."""
    fleets: dict[str, Any] = {}
    for service in plan.services:
        if service.fleet is None:
            continue
        entry = fleets.setdefault(service.fleet, {"databases": 0, "servers": [], "stages": {}})
        entry["databases"] += 1
        if service.server not in entry["servers"]:
            entry["servers"].append(service.server)
        stage = str(service.stage or 0)
        entry["stages"][stage] = entry["stages"].get(stage, 0) + 1
    for entry in fleets.values():
        entry["servers"].sort()
    return fleets


def service_to_dict(service: ServicePlan) -> dict[str, Any]:
    return {
        "service": service.service,
        "database": service.database,
        "server": service.server,
        "current": service.current,
        "target": service.target,
        "latest": service.latest,
        "dirty": service.dirty,
        "dirty_version": service.dirty_version,
        "pending": list(service.pending),
        "reverts": list(service.reverts),
        "out_of_order": list(service.out_of_order),
        "drift": [vars(drift) for drift in service.drift],
        "invalid_indexes": list(service.invalid_indexes),
        "bookkeeping": service.bookkeeping,
        **({"fleet": service.fleet, "stage": service.stage} if service.fleet else {}),
        **({"failure": vars(service.failure)} if service.failure else {}),
        **({"repeatables": list(service.repeatables)} if service.repeatables else {}),
    }


def without_nones(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if value is not None}

"""What ``dbplan baseline`` and ``dbplan accept`` would record, decided from the files
and the live facts alone (pure, like the planner), or why they refuse.

Both write history rows on a person's word: a baseline says that a database made by hand
already holds every migration up to a version; an accept says that an applied file was
edited on purpose. The executor's writer (``execution.records``) takes the lock, reads
the facts again, asks these functions again and writes what they return.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DbplanError
from ..estate.model import Service
from ..live.facts import ServiceFacts
from ..migrations.scan import Migration, MigrationSet
from .planner import applied_versions

# The row the executor writes when it first adopts a golang-migrate database: versions up
# to schema_migrations.version were applied before dbplan kept history.
ADOPTION_REASON = "adopted: versions up to here were applied before dbplan kept history"


@dataclass(frozen=True)
class HistoryRow:
    """One history row to append."""

    version: int
    title: str | None
    checksum: str | None
    event: str  # force | baseline | accept
    reason: str | None


@dataclass(frozen=True)
class Recording:
    """What a command records for one service, and what it tells the person."""

    command: str  # force | baseline | accept
    service: str
    version: int  # the version the command was given
    rows: tuple[HistoryRow, ...]
    sets_version: bool  # whether schema_migrations is rewritten
    version_after: int | None  # schema_migrations afterwards (None: no row)
    message: str


def plan_baseline(
    service: Service, migration_set: MigrationSet, facts: ServiceFacts, version: int, reason: str | None
) -> Recording:
    """Every migration up to ``version`` counts as applied: one 'baseline' row per file
    not applied yet, with its checksum (so drift is known from then on), and
    schema_migrations at ``version``. Versions already applied keep their rows: a
    baseline must not hide drift of a file dbplan ran itself."""
    migration = _file_of(service, migration_set, version, "baseline")
    _refuse_dirty(service, facts, "baseline")
    if service.target is not None and version > service.target:
        raise DbplanError(
            f"cannot baseline service '{service.name}' at version {version}: its target is {service.target}, "
            "so the next apply would revert what the baseline counts as applied",
            place=service.place,
            service=service.name,
            version=version,
            hint=f"raise services.{service.name}.target to {version} or more, or baseline at {service.target}",
        )
    applied = applied_versions(facts, migration_set)
    current = max(applied, default=None)
    if current is not None and current >= version:
        raise _not_a_baseline(service, version, current)
    rows = _adoption_rows(facts) + tuple(
        HistoryRow(m.version, m.title, m.up.checksum, "baseline", reason)
        for m in migration_set.migrations
        if m.version <= version and m.version not in applied
    )
    counted = len(rows) - len(_adoption_rows(facts))
    since = f"from version {current}" if current is not None else "from no version"
    return Recording(
        command="baseline",
        service=service.name,
        version=version,
        rows=rows,
        sets_version=True,
        version_after=version,
        message=f"service '{service.name}' is now recorded at version {version} ({since}): "
        f"{counted} migration{'s' if counted != 1 else ''} up to {migration.up.display} counted as applied, "
        "not run",
    )


def plan_accept(
    service: Service, migration_set: MigrationSet, facts: ServiceFacts, version: int, reason: str | None
) -> Recording:
    """The file's checksum as it is now becomes the recorded one: one 'accept' row, beside
    the older rows, which stay. A version whose checksum was never recorded (applied by
    golang-migrate before dbplan kept history) gets its first one."""
    if not (reason or "").strip():
        raise DbplanError(
            "accept needs a reason: the history keeps why an applied file was changed",
            service=service.name,
            version=version,
            hint=f"dbplan accept {service.name} {version} --reason 'comment fixed'",
        )
    migration = _file_of(service, migration_set, version, "accept")
    _refuse_dirty(service, facts, "accept")
    applied = applied_versions(facts, migration_set)
    if version not in applied:
        raise DbplanError(
            f"version {version} of service '{service.name}' ({migration.up.display}) is not applied: "
            "there is nothing to accept",
            place=service.place,
            service=service.name,
            version=version,
            hint="'dbplan apply' runs it; accept is for a file changed after it was applied",
        )
    recorded = applied[version]
    checksum = migration.up.checksum
    if recorded == checksum:
        raise DbplanError(
            f"version {version} of service '{service.name}' has no drift: {migration.up.display} is as it was "
            "recorded, there is nothing to accept",
            service=service.name,
            version=version,
            hint="'dbplan plan' lists drift as warnings",
        )
    if recorded is None:
        message = (
            f"version {version} of service '{service.name}' had no recorded checksum (applied before dbplan kept "
            f"history); recorded the checksum of {migration.up.display} ({checksum[:12]}): a later edit shows as drift"
        )
    else:
        message = (
            f"accepted the edit of {migration.up.display} (version {version} of service '{service.name}'): "
            f"recorded sha256 {recorded[:12]} is now {checksum[:12]}; the history keeps both"
        )
    return Recording(
        command="accept",
        service=service.name,
        version=version,
        rows=_adoption_rows(facts) + (HistoryRow(version, migration.title, checksum, "accept", reason),),
        sets_version=False,
        version_after=facts.version,
        message=message,
    )


def _adoption_rows(facts: ServiceFacts) -> tuple[HistoryRow, ...]:
    """The executor's adoption baseline, where the history begins with this command: the
    versions golang-migrate applied stay applied beside the rows written now (without
    it, an accept of version 1 would make the versions above it look out of order)."""
    if facts.history_exists or facts.version is None:
        return ()
    return (HistoryRow(facts.version, None, None, "baseline", ADOPTION_REASON),)


def _file_of(service: Service, migration_set: MigrationSet, version: int, command: str) -> Migration:
    migration = migration_set.by_version().get(version)
    if migration is not None:
        return migration
    versions = sorted(migration_set.by_version())
    nearest = min(versions, key=lambda known: (abs(known - version), known), default=None)
    suggestion = f"did you mean {nearest}? " if nearest is not None else ""
    known = ", ".join(str(v) for v in versions) or "none"
    raise DbplanError(
        f"service '{service.name}' has no migration with version {version} in {service.migrations_display}",
        place=service.migrations_place,
        service=service.name,
        version=version,
        hint=f"{suggestion}{command} takes the version of a file on disk; versions there: {known}",
    )


def _refuse_dirty(service: Service, facts: ServiceFacts, command: str) -> None:
    if facts.dirty:
        raise DbplanError(
            f"service '{service.name}' is dirty at version {facts.version}: {command} records nothing on a "
            "migration that failed part-way",
            service=service.name,
            version=facts.version,
            hint=f"repair the database by hand and clear it with 'dbplan force {service.name} VERSION' first",
        )


def _not_a_baseline(service: Service, version: int, current: int) -> DbplanError:
    if current == version:
        return DbplanError(
            f"service '{service.name}' is already at version {version}: there is nothing to baseline",
            service=service.name,
            version=version,
            hint="'dbplan plan' shows what is pending",
        )
    return DbplanError(
        f"service '{service.name}' is at version {current}, above {version}: a baseline only counts the versions "
        "of a database made by hand as applied, it never takes any back",
        service=service.name,
        version=version,
        hint=f"to record a lower version after repairing the database by hand: 'dbplan force {service.name} {version}'",
    )

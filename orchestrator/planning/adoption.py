"""What ``dbplan adopt`` takes over from dbmate's or Flyway's bookkeeping: a pure function of
the other tool's rows and the migration folder, which refuses (a located error) a database
that is not what it claims to be. Nothing here talks to a server."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DbplanError, MigrationFileError, Place
from ..estate.model import Service
from ..live.facts import FlywayRow, ForeignBookkeeping
from ..migrations.formats import flyway_checksum, flyway_version_number
from ..migrations.scan import Migration, MigrationSet, Repeatable


@dataclass(frozen=True)
class Takeover:
    tool: str
    source: str  # schema.table the versions were read from
    applied: tuple[Migration, ...]  # ascending: recorded as 'adopt' events
    baseline: int | None = None  # Flyway's baseline: every version up to it counts as applied
    skipped: tuple[str, ...] = ()  # what was not taken over, and why (repeatable rows)
    # Flyway's repeatables whose file still gives the checksum Flyway last recorded: their
    # sha256 is recorded, so they do not run again until they change.
    repeatables: tuple[Repeatable, ...] = ()

    @property
    def version(self) -> int | None:
        """Where schema_migrations stands afterwards."""
        return max([m.version for m in self.applied] + ([self.baseline] if self.baseline else []), default=None)


def takeover(service: Service, migrations: MigrationSet, foreign: ForeignBookkeeping) -> Takeover:
    if foreign.tool == "dbmate":
        return _dbmate(service, migrations, foreign)
    return _flyway(service, migrations, foreign)


def _dbmate(service: Service, migrations: MigrationSet, foreign: ForeignBookkeeping) -> Takeover:
    by_version = migrations.by_version()
    applied: list[Migration] = []
    for written in foreign.dbmate_versions:
        if not written.isdigit():
            raise _refused(service, foreign, f"it records version '{written}', which is not a number dbmate writes")
        migration = by_version.get(int(written))
        if migration is None:
            raise _refused(
                service, foreign, f"it records version {written} as applied, but {service.migrations_display} "
                "has no file of that version"
            )  # fmt: skip
        applied.append(migration)
    return Takeover("dbmate", foreign.qualified, tuple(sorted(applied, key=lambda m: m.version)))


def _flyway(service: Service, migrations: MigrationSet, foreign: ForeignBookkeeping) -> Takeover:
    """Flyway's rows in the order it installed them: versioned rows apply, undo rows
    revert, a baseline counts everything up to it, repeatable rows are left out."""
    by_version = migrations.by_version()
    applied: dict[int, Migration] = {}
    baseline: int | None = None
    skipped: list[str] = []
    mismatches: list[str] = []
    last_repeatable_rows: dict[str, FlywayRow] = {}
    for row in foreign.flyway_rows:
        if row.type == "SCHEMA":
            continue
        if not row.success:
            raise _refused(
                service, foreign, f"installed_rank {row.installed_rank} (version {row.version}, {row.script}) failed "
                "(success = false)", hint="repair the database and the row first ('flyway repair' removes failed rows)"
            )  # fmt: skip
        if row.version is None:
            if row.type in ("SQL", "JDBC", "SPRING_JDBC", "SCRIPT") and row.script:
                last_repeatable_rows[row.script.rsplit("/", 1)[-1]] = row  # Flyway compares the latest run
            else:
                skipped.append(f"{row.type} row {row.script} (installed_rank {row.installed_rank})")
            continue
        version = _version_of(service, foreign, row)
        if row.type == "BASELINE":
            baseline = max(version, baseline or 0)
            continue
        if row.type in ("UNDO_SQL", "DELETE"):
            applied.pop(version, None)
            continue
        migration = by_version.get(version)
        if migration is None:
            raise _refused(
                service, foreign, f"installed_rank {row.installed_rank} records version {row.version} ({row.script}) "
                f"as applied, but {service.migrations_display} has no V file of that version"
            )  # fmt: skip
        computed = flyway_checksum(migration.up.text)
        if row.checksum is not None and row.checksum != computed:
            mismatches.append(
                f"{migration.up.display}: Flyway recorded checksum {row.checksum}, the file now gives {computed}"
            )
        applied[version] = migration
    if mismatches:
        raise MigrationFileError(
            f"cannot adopt service '{service.name}': {len(mismatches)} applied file"
            f"{'s' if len(mismatches) != 1 else ''} changed since Flyway ran them: " + "; ".join(mismatches),
            place=Place(mismatches[0].split(":", 1)[0]),
            hint="restore the files as they were applied (git log shows them), then adopt again; nothing was changed",
        )
    ordered = tuple(sorted(applied.values(), key=lambda m: m.version))
    repeatables = _unchanged_repeatables(migrations, last_repeatable_rows, skipped)
    return Takeover("flyway", foreign.qualified, ordered, baseline, tuple(skipped), repeatables)


def _unchanged_repeatables(
    migrations: MigrationSet, last_rows: dict[str, FlywayRow], skipped: list[str]
) -> tuple[Repeatable, ...]:
    """The repeatable files whose Flyway CRC32 is the one Flyway recorded when it last ran
    them. The others are left unrecorded, so that dbplan runs them again (as Flyway would
    have); a row without a file is only reported."""
    by_name = {repeatable.file.path.name: repeatable for repeatable in migrations.repeatables}
    unchanged: list[Repeatable] = []
    for name, row in last_rows.items():
        repeatable = by_name.get(name)
        if repeatable is None:
            skipped.append(f"repeatable {row.script} (installed_rank {row.installed_rank}): no such file, nothing to run")
        elif row.checksum is None or row.checksum != flyway_checksum(repeatable.file.text):
            skipped.append(
                f"repeatable {repeatable.file.display} changed since Flyway last ran it "
                f"(installed_rank {row.installed_rank}): 'dbplan apply' runs it again"
            )
        else:
            unchanged.append(repeatable)
    return tuple(sorted(unchanged, key=lambda r: r.description))


def _version_of(service: Service, foreign: ForeignBookkeeping, row: FlywayRow) -> int:
    assert row.version is not None
    try:
        return flyway_version_number(row.version)
    except MigrationFileError as err:
        raise _refused(service, foreign, f"installed_rank {row.installed_rank}: {err.message}", hint=err.hint) from None


def _refused(service: Service, foreign: ForeignBookkeeping, why: str, *, hint: str | None = None) -> DbplanError:
    return DbplanError(
        f"cannot adopt service '{service.name}' from {foreign.qualified} in database '{service.database}': {why}",
        service=service.name,
        hint=hint or "check that the plan file names the right database and folder; nothing was changed",
    )

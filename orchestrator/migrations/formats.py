"""Migration folders written for dbmate or Flyway, read as they are (``format:``).

dbmate: one file per version, ``{version}_{name}.sql``, with a ``-- migrate:up`` section
and an optional ``-- migrate:down`` section; ``-- migrate:up transaction:false`` runs the
up section outside a transaction. The version is the file name's leading digits.

Flyway: ``V{version}__{description}.sql`` up files and ``U{version}__{description}.sql``
undo files (the down). A version is dot- or underscore-separated integers (``1``, ``1.1``,
``2_1``), ordered part by part, with trailing zero parts insignificant, as Flyway orders
them. dbplan's bookkeeping keeps an integer, so a version maps to
``major * 1_000_000 + minor * 1_000 + patch``: at most three parts, minor and patch below
1000. Repeatable files, ``R__{description}.sql``, have no version: they run after the
versioned migrations, in the order of their descriptions, the first time and whenever
their checksum changes (``Repeatable``); each in one transaction with its history row.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import replace
from pathlib import Path

from ..errors import MigrationFileError, Place
from ..estate.model import FORMAT_DBMATE, Service
from .scan import (
    MAX_VERSION,
    TRANSACTIONAL_MODES,
    Migration,
    MigrationFile,
    MigrationSet,
    Repeatable,
    _check_folder,
    _check_printable,
    _display,
    _is_folder,
    _read_file,
    run_mode_of,
)
from .sqlscript import NO_TRANSACTION_MARKER

DBMATE_NAME = re.compile(r"^(?P<version>[0-9]+)(?P<rest>.*)\.sql$")
# dbmate's own markers: a line "-- migrate:up" (spaces allowed after --), options after it.
DBMATE_UP = re.compile(r"^--\s*migrate:up(?:\s+(?P<options>.*))?$")
DBMATE_DOWN = re.compile(r"^--\s*migrate:down(?:\s+(?P<options>.*))?$")

FLYWAY_NAME = re.compile(r"^(?P<kind>[VU])(?P<version>[^_]+(?:_[^_]+)*?)__(?P<description>.+)\.sql$")
FLYWAY_REPEATABLE = re.compile(r"^R__(?P<description>.+)\.sql$")
FLYWAY_VERSION = re.compile(r"^[0-9]+(?:[._][0-9]+)*$")
FLYWAY_PART_LIMIT = 1000  # minor and patch parts: three decimal digits each
FLYWAY_MAX_PARTS = 3


def scan_foreign_format(service: Service, root: Path) -> MigrationSet:
    folder = service.migrations_dir
    _check_folder(service, folder, root)
    folder_display = _display(folder, root)
    prefix = "" if folder_display in (".", "") else folder_display + "/"
    with os.scandir(folder) as scanned:
        entries = sorted((entry for entry in scanned if entry.name.endswith(".sql")), key=lambda entry: entry.name)
    entries = [entry for entry in entries if not entry.name.startswith(".") and not _is_folder(entry)]
    for entry in entries:
        _check_printable(entry.name, prefix)
    repeatables: list[Repeatable] = []
    if service.format == FORMAT_DBMATE:
        migrations = _dbmate_migrations(entries, folder, root, prefix)
    else:
        repeatables = _flyway_repeatables(entries, folder, root, prefix)
        named = {repeatable.file.path.name for repeatable in repeatables}
        migrations = _flyway_migrations([entry for entry in entries if entry.name not in named], folder, root, prefix)
    return MigrationSet(
        service.name,
        folder,
        tuple(sorted(migrations, key=lambda m: m.version)),
        tuple(sorted(repeatables, key=lambda r: r.description)),
    )


# -- dbmate ------------------------------------------------------------------------------


def _dbmate_migrations(entries: list[os.DirEntry[str]], folder: Path, root: Path, prefix: str) -> list[Migration]:
    found: dict[int, Migration] = {}
    for entry in entries:
        display = prefix + entry.name
        match = DBMATE_NAME.match(entry.name)
        if match is None:
            raise MigrationFileError(
                f"cannot read the dbmate migration file name '{entry.name}'",
                place=Place(display),
                hint="dbmate names migrations {version}_{name}.sql, for example 20240101120000_create_users.sql",
            )
        version = _checked_version(int(match["version"]), match["version"], display)
        if version in found:
            raise MigrationFileError(
                f"two files for version {version}: {found[version].up.path.name} and {entry.name}",
                place=Place(display),
                hint="every version needs exactly one file",
            )
        whole = _read_file(folder / entry.name, root, display, entry)
        up, down = split_dbmate(whole)
        title = match["rest"].lstrip("_") or match["version"]
        found[version] = Migration(version, title, up, down, match["version"])
    return list(found.values())


def split_dbmate(whole: MigrationFile) -> tuple[MigrationFile, MigrationFile | None]:
    """The up and down sections of a dbmate file, each as a file of its own (same path and
    checksum) whose text keeps the section on its own line numbers, so that lint and
    refusals point at the line in the real file."""
    lines = whole.text.splitlines(keepends=True)
    up_at = down_at = None
    up_options = down_options = ""
    for number, line in enumerate(lines):
        stripped = line.rstrip()
        if up_at is None and (up_marker := DBMATE_UP.match(stripped)):
            up_at, up_options = number, up_marker["options"] or ""
        elif down_at is None and (down_marker := DBMATE_DOWN.match(stripped)):
            down_at, down_options = number, down_marker["options"] or ""
    if up_at is None:
        raise MigrationFileError(
            f"{whole.path.name} has no '-- migrate:up' line",
            place=Place(whole.display),
            hint="a dbmate migration starts with '-- migrate:up' and may end with a '-- migrate:down' section",
        )
    if down_at is not None and down_at < up_at:
        raise MigrationFileError(
            f"{whole.path.name}: '-- migrate:down' comes before '-- migrate:up'",
            place=Place(whole.display, down_at + 1),
            hint="put the up section first, as dbmate requires",
        )
    for number, line in enumerate(lines[:up_at]):
        if line.strip() and not line.lstrip().startswith("--"):
            raise MigrationFileError(
                f"{whole.path.name}:{number + 1}: a statement before '-- migrate:up' belongs to no section",
                place=Place(whole.display, number + 1),
                hint="move it into the up or the down section",
            )
    up_end = down_at if down_at is not None else len(lines)
    up = _section(whole, lines, up_at, up_end, up_options)
    if down_at is None:
        return up, None
    down = _section(whole, lines, down_at, len(lines), down_options)
    return up, (down if _has_statements(lines[down_at + 1 :]) else None)


def _section(whole: MigrationFile, lines: list[str], marker: int, end: int, options: str) -> MigrationFile:
    no_transaction = "transaction:false" in options.split()
    # Line `marker` (0-based) is the section's marker: its own lines follow at their numbers.
    head = (NO_TRANSACTION_MARKER if no_transaction else "") + "\n" * (marker + 1)
    return replace(whole, text=head + "".join(lines[marker + 1 : end]))


def _has_statements(lines: list[str]) -> bool:
    """dbmate runs an empty down section as a no-op; dbplan treats it as no down at all."""
    return any(line.strip() and not line.lstrip().startswith("--") for line in lines)


# -- Flyway ------------------------------------------------------------------------------


def _flyway_migrations(entries: list[os.DirEntry[str]], folder: Path, root: Path, prefix: str) -> list[Migration]:
    ups: dict[int, tuple[str, str, MigrationFile]] = {}
    downs: dict[int, MigrationFile] = {}
    for entry in entries:
        display = prefix + entry.name
        match = FLYWAY_NAME.match(entry.name)
        if match is None:
            raise MigrationFileError(
                f"cannot read the Flyway migration file name '{entry.name}'",
                place=Place(display),
                hint="Flyway names migrations V{version}__{description}.sql (U... for the undo), "
                "for example V1__init.sql or V1.1__add_prices.sql",
            )
        version = flyway_version_number(match["version"], display)
        path = folder / entry.name
        target: dict[int, object] = ups if match["kind"] == "V" else downs  # type: ignore[assignment]
        if version in target:
            raise MigrationFileError(
                f"two {match['kind']} files for version {match['version']} (dbplan version {version}): {entry.name}",
                place=Place(display),
                hint="versions 1.0 and 1 are the same version to Flyway, and to dbplan",
            )
        file = _read_file(path, root, display, entry)
        if match["kind"] == "V":
            ups[version] = (match["version"], match["description"], file)
        else:
            downs[version] = file
    for version, down in downs.items():
        if version not in ups:
            raise MigrationFileError(
                f"undo file without a versioned file for version {version}",
                place=Place(down.display),
                hint=f"add the matching V file or remove {down.path.name}",
            )
    return [
        Migration(version, description, up, downs.get(version), written)
        for version, (written, description, up) in ups.items()
    ]


def _flyway_repeatables(entries: list[os.DirEntry[str]], folder: Path, root: Path, prefix: str) -> list[Repeatable]:
    found: list[Repeatable] = []
    for entry in entries:
        match = FLYWAY_REPEATABLE.match(entry.name)
        if match is None:
            continue
        display = prefix + entry.name
        file = _read_file(folder / entry.name, root, display, entry)
        if run_mode_of(file.script) not in TRANSACTIONAL_MODES:
            # Run again and again outside a transaction, a failure would leave it half done
            # with no version to mark dirty: the service's state could not say so.
            raise MigrationFileError(
                f"{entry.name} is a repeatable migration that runs outside one transaction "
                "(marked no-transaction, or several BEGIN/COMMIT blocks), which dbplan refuses",
                place=Place(display),
                hint="a repeatable runs in one transaction with its history row: remove the "
                f"'{NO_TRANSACTION_MARKER.strip()}' line or the extra transactions, or move the statements into a V file",
            )
        found.append(Repeatable(match["description"], file))
    return found


def flyway_version_number(written: str, display: str | None = None) -> int:
    """Flyway's version as dbplan's integer: ``1`` → 1000000, ``1.1`` and ``1_1`` → 1001000,
    ``2.0.3`` → 2000003. The order of the integers is Flyway's order of the versions."""
    place = Place(display) if display else Place()
    hint = (
        "dbplan maps a Flyway version MAJOR.MINOR.PATCH to MAJOR*1000000 + MINOR*1000 + PATCH: use at most "
        "three numeric parts, MINOR and PATCH below 1000"
    )
    if not FLYWAY_VERSION.match(written):
        raise MigrationFileError(f"cannot order the Flyway version '{written}'", place=place, hint=hint)
    parts = [int(part) for part in written.replace("_", ".").split(".")]
    while len(parts) > 1 and parts[-1] == 0:  # 1.0 is 1, as in Flyway
        parts.pop()
    if len(parts) > FLYWAY_MAX_PARTS or any(part >= FLYWAY_PART_LIMIT for part in parts[1:]):
        raise MigrationFileError(f"cannot map the Flyway version '{written}' to a dbplan version", place=place, hint=hint)
    parts += [0] * (FLYWAY_MAX_PARTS - len(parts))
    number = parts[0] * FLYWAY_PART_LIMIT**2 + parts[1] * FLYWAY_PART_LIMIT + parts[2]
    if number == 0:
        raise MigrationFileError(f"Flyway version '{written}' is 0, which dbplan reads as no version", place=place, hint=hint)
    return _checked_version(number, written, display or "")


def flyway_checksum(text: str) -> int:
    """The checksum Flyway records for a SQL file: CRC32 of the UTF-8 bytes of its lines
    without their line endings (it reads them with readLine, the BOM dropped), as a signed
    32-bit integer. Line endings and empty lines therefore do not change it."""
    value = zlib.crc32(text.lstrip("\ufeff").replace("\r", "").replace("\n", "").encode("utf-8"))
    return value - 2**32 if value >= 2**31 else value


def _checked_version(version: int, written: str, display: str) -> int:
    if version > MAX_VERSION:
        raise MigrationFileError(f"version {written} does not fit in a bigint", place=Place(display))
    return version

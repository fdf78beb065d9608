"""The embedded server's files in its data folder, read and written by dbplan.

* ``postmaster.pid``: PostgreSQL's own, read to learn the running server's pid, port and
  status; removed with the socket lock files when stale;
* ``dbplan-port``: the port the server last started on;
* ``dbplan.conf``: dbplan's settings, included from ``postgresql.conf`` and rewritten at
  every start (``pg_hba.conf`` and ``pg_ident.conf``, and the password file beside the
  data folder: module :mod:`.credentials`);
* ``postgres.log``: the server's log, rotated before a start and tailed for errors.

The server's life cycle that uses them is in :mod:`.embedded`. Only the standard library
is imported at module level: the CLI imports this module on every run.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import EmbeddedServerError
from .runas import Account, safe_write

PORT_FILE = "dbplan-port"
CONF_FILE = "dbplan.conf"
LOG_FILE = "postgres.log"
LOG_ROTATE_BYTES = 10 * 1024 * 1024


# --------------------------------------------------------------------------------------
# postmaster.pid
# --------------------------------------------------------------------------------------


class PidFile:
    """postmaster.pid: line 1 pid, line 4 port, line 8 status ("starting", "ready", ...)."""

    __slots__ = ("pid", "port", "status")

    def __init__(self, pid: int, port: int | None, status: str) -> None:
        self.pid, self.port, self.status = pid, port, status


def read_pid_file(data_dir: Path) -> PidFile | None:
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        pid = abs(int(lines[0]))
    except (OSError, ValueError, IndexError):
        return None
    port = None
    if len(lines) > 3 and lines[3].strip().isdigit():
        port = int(lines[3])
    status = lines[7].strip() if len(lines) > 7 else ""
    return PidFile(pid=pid, port=port, status=status)


def remove_stale_files(data_dir: Path) -> None:
    """Remove a stale postmaster.pid and socket lock files (no server runs here)."""
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


# --------------------------------------------------------------------------------------
# dbplan-port
# --------------------------------------------------------------------------------------


def stored_port(data_dir: Path) -> int | None:
    try:
        value = int((data_dir / PORT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return value if 1024 <= value <= 65535 else None


def store_port(data_dir: Path, port: int, account: Account | None) -> None:
    safe_write(data_dir / PORT_FILE, f"{port}\n", account)


# --------------------------------------------------------------------------------------
# dbplan.conf
# --------------------------------------------------------------------------------------


def include_settings(data_dir: Path) -> None:
    """Make a new cluster's ``postgresql.conf`` read ``dbplan.conf``."""
    with open(data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
        conf.write(
            f"\n# dbplan: listen address, port, socket and durability settings\n"
            f"include_if_exists = '{CONF_FILE}'\n"
        )


def socket_dir(data_dir: Path) -> str:
    folder = str(data_dir)
    too_long = len(folder.encode()) + len("/.s.PGSQL.65535.lock") > 100
    if too_long or "," in folder or '"' in folder:
        return ""  # TCP only; the URL never uses the socket
    return folder


def write_settings(data_dir: Path, port: int, account: Account | None, *, durable: bool) -> None:
    lines = [
        "# Written by dbplan at every start of the embedded server. To override a",
        "# setting, use ALTER SYSTEM (postgresql.auto.conf is read after this file).",
        "listen_addresses = '127.0.0.1'",
        f"port = {port}",
        f"unix_socket_directories = {conf_quote(socket_dir(data_dir))}",
        "unix_socket_permissions = 0700  # and the folder is private: see pg_hba.conf",
        "password_encryption = 'scram-sha-256'  # what pg_hba.conf asks of TCP clients",
        "max_connections = 100",
    ]
    if not durable:
        lines += [
            "# throwaway server (durable=False): faster, loses data on a machine crash",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
        ]
    safe_write(data_dir / CONF_FILE, "\n".join(lines) + "\n", account)


def conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


# --------------------------------------------------------------------------------------
# postgres.log
# --------------------------------------------------------------------------------------


def tail(log: Path, offset: int, lines: int = 15) -> str:
    try:
        with open(log, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def rotate(log: Path) -> None:
    """Move a log over LOG_ROTATE_BYTES to ``<log>.1`` (replacing the previous one)."""
    try:
        if log.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(log, log.with_name(log.name + ".1"))
    except OSError:
        pass

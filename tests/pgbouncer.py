"""A throwaway PgBouncer in transaction pooling mode in front of a test cluster.

Debian's ``pgbouncer`` package (CI's .ci/run installs it). It listens on a free port below
Linux's ephemeral range, trusts every user listed in its auth file, and sends each
database name on to the cluster (``* =``), so databases dbplan creates are reachable
through it at once. As root it runs as the account the test clusters run as. It logs in
to the cluster with the password of the cluster's URL, kept in its auth file (mode 0600).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pgcluster import embedded_password

PGBOUNCER_CANDIDATES = ("pgbouncer", "/usr/sbin/pgbouncer")


def find_pgbouncer() -> str | None:
    for candidate in PGBOUNCER_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def _free_port() -> int:
    for _ in range(200):
        port = random.randrange(15000, 20000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 15000 and 20000")


def _account() -> tuple[int, int] | None:
    """uid and gid to run as when root (PgBouncer refuses root)."""
    if os.geteuid() != 0:
        return None
    import pwd

    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    raise RuntimeError("running as root, and no 'postgres' or 'nobody' account to run pgbouncer as")


class PgBouncer:
    def __init__(self, binary: str, server_url: str, pool_mode: str = "transaction") -> None:
        server = urlsplit(server_url)
        self.user = server.username or "postgres"
        self.port = _free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="dbplan-pgbouncer-"))
        config = self.folder / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"* = host={server.hostname} port={server.port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.folder / 'users.txt'}\n"
            f"pool_mode = {pool_mode}\n"
            "default_pool_size = 20\n"
            "max_client_conn = 500\n"
            f"logfile = {self.folder / 'pgbouncer.log'}\n"
            f"pidfile = {self.folder / 'pgbouncer.pid'}\n"
        )
        # Clients are trusted; PgBouncer logs in to the cluster with the password here.
        password = server.password or embedded_password(server_url) or ""
        (self.folder / "users.txt").write_text(f'"{self.user}" "{password}"\n')
        account = _account()
        for path in (config, self.folder / "users.txt"):
            os.chmod(path, 0o600)
        if account is not None:
            for path in (self.folder, config, self.folder / "users.txt"):
                os.chown(path, *account)
        self.process = subprocess.Popen(
            [binary, str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            user=account[0] if account else None,
            group=account[1] if account else None,
        )
        self.url = urlunsplit(server._replace(netloc=f"{self.user}@127.0.0.1:{self.port}"))
        self._wait_until_listening()

    def _wait_until_listening(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {self.process.stderr.read().decode() if self.process.stderr else ''}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("pgbouncer did not start listening within 15 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.folder, ignore_errors=True)

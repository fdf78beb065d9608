"""Helpers for tests that run dbplan as real processes: races, signals, crashes, poolers.

``Estate`` (estate.py) drives the CLI in-process; these start ``python -m orchestrator``
as separate processes, each with its own connections, locks and signal handlers, and
check the bookkeeping afterwards the way a suspicious operator would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
from estate import Estate


@dataclass
class Finished:
    code: int
    out: str
    err: str


class Running:
    """A dbplan process whose output is read as it comes, so a test can wait for a line."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.pid = process.pid
        self._out: list[str] = []
        self._err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(process.stdout, self._out), daemon=True),
            threading.Thread(target=self._read, args=(process.stderr, self._err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: object, lines: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.append(line)

    @property
    def err(self) -> str:
        return "".join(self._err)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        """Wait until the process has written ``text`` to stderr."""
        wait_until(lambda: text in self.err or self.process.poll() is not None, timeout, repr(text))
        for reader in self._readers if self.process.poll() is not None else ():
            reader.join(5)
        assert text in self.err, f"the process ended without saying {text!r}:\n{self.err}"

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def finish(self, timeout: float = 120) -> Finished:
        self.process.wait(timeout)
        for reader in self._readers:
            reader.join(10)
        return Finished(self.process.returncode, "".join(self._out), "".join(self._err))


def start_dbplan(plan_file: Path, *args: str, env: dict[str, str] | None = None) -> Running:
    """Start ``dbplan ARGS -f PLAN_FILE`` as its own process (output captured)."""
    return Running(
        subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *args, "-f", str(plan_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NO_COLOR": "1", **(env or {})},
        )
    )


def finish(process: Running, timeout: float = 120) -> Finished:
    return process.finish(timeout)


def run_dbplan(plan_file: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Finished:
    return start_dbplan(plan_file, *args, env=env).finish(timeout)


def wait_until(condition: Callable[[], object], timeout: float = 20, what: str = "condition") -> object:
    """Poll ``condition`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def dbplan_backends(url: str, query_like: str = "%", *, waiting_for_lock: bool = False) -> list[tuple[int, str, str]]:
    """(pid, state, query) of dbplan's sessions whose (last) query matches; with
    ``waiting_for_lock``, only those blocked on a lock right now."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, state, query FROM pg_stat_activity WHERE application_name = 'dbplan' AND query LIKE %s"
            " AND (NOT %s OR wait_event_type = 'Lock')",
            (query_like, waiting_for_lock),
        ).fetchall()
    return [(int(pid), str(state), str(query)) for pid, state, query in rows]


class TableGate:
    """A table the test locks ACCESS EXCLUSIVE: a migration that reads it waits until ``open()``."""

    def __init__(self, url: str, database: str, table: str) -> None:
        self.conn = psycopg.connect(url, dbname=database, autocommit=True)
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id int)")
        self.conn.execute("BEGIN")
        self.conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")

    def open(self) -> None:
        if not self.conn.closed:
            self.conn.execute("COMMIT")
            self.conn.close()


# ---------------------------------------------------------------------------
# A two-service estate with many migrations, nothing created yet


def race_estate(estate: Estate, migrations: int = 20, sleep: float = 0.0) -> dict[str, int]:
    """Services 'orders' and 'billing' (billing depends on orders), each with ``migrations``
    files that fail if run twice (CREATE TABLE without IF NOT EXISTS); roles with passwords
    and databases owned by them, none of which exist yet. Returns the latest version per service.
    """
    estate.add_role("orders_svc", password="orders-pw-1")
    estate.add_role("billing_svc", password="billing-pw-2")
    estate.add_database("orders", owner="orders_svc")
    estate.add_database("billing", owner="billing_svc")
    estate.add_service("orders", "orders")
    estate.add_service("billing", "billing", depends_on=["orders"])
    for service in ("orders", "billing"):
        for version in range(1, migrations + 1):
            pause = f"SELECT pg_sleep({sleep});\n" if sleep else ""
            estate.write(
                service,
                f"{version:04d}_step_{version}.up.sql",
                f"CREATE TABLE {service}_t{version} (id int PRIMARY KEY);\n{pause}"
                f"INSERT INTO {service}_t{version} VALUES ({version});\n",
            )
    return {"orders": migrations, "billing": migrations}


def assert_applied_exactly_once(estate: Estate, database: str, service: str, versions: Sequence[int]) -> None:
    """Every version recorded applied exactly once, its table there once, the service clean at the top."""
    rows = estate.query(
        database,
        "SELECT version, count(*) FROM dbplan_history WHERE event = 'apply' GROUP BY version ORDER BY version",
    )
    assert rows == [(version, 1) for version in versions], f"{service}: history {rows}"
    assert estate.query(database, "SELECT version, dirty FROM schema_migrations") == [(max(versions), False)]
    tables = estate.tables(database)
    missing = [v for v in versions if f"{service}_t{v}" not in tables]
    assert not missing, f"{service}: tables of versions {missing} are missing"
    counts = estate.query(
        database, " UNION ALL ".join(f"SELECT count(*) FROM {service}_t{v}" for v in versions)
    )
    assert all(count == (1,) for count in counts), f"{service}: some migration ran twice: {counts}"


class ForkServer:
    """dbplan runs forked from one warm interpreter (forkserver.py): real processes, no start-up cost."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("forkserver.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
        assert self._reply() == {"ready": True}

    def _reply(self) -> dict[str, object]:
        import json

        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the fork server is gone")
        return json.loads(line)  # type: ignore[no-any-return]

    def run(self, plan_file: Path, *args: str, env: dict[str, str] | None = None) -> Finished:
        import json

        assert self.process.stdin is not None
        self.count += 1
        out, err = self.folder / f"run{self.count}.out", self.folder / f"run{self.count}.err"
        request = {"args": [*args, "-f", str(plan_file)], "env": env or {}, "out": str(out), "err": str(err)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        status = self._reply()["status"]
        assert isinstance(status, int)
        return Finished(status, out.read_text(), err.read_text())

    def close(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait(10)

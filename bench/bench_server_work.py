#!/usr/bin/env python3
"""Benchmark: the server's work per migration, counted in instructions, for dbplan, the
psql floor and dbmate applying the same generated migrations.

Run by hand (never part of the test suite); needs valgrind:

    python bench/bench_server_work.py                    # 200 migrations, psql, dbmate, dbplan
    python bench/bench_server_work.py --count 1000 --dbplan /tmp/dbplan-venv/bin/dbplan

Wall time on a small shared machine drifts by tens of percent from one minute to the
next, and so does CPU time; the number of instructions a backend executes does not. So
this starts a PostgreSQL server under valgrind's cachegrind (``--cache-sim=no``: a count
of instructions, nothing else), lets each tool apply the N migrations of
``bench_apply.generate`` to a fresh database, and adds up the instructions of every
backend that served the tool: the ones whose connection the server logged while the tool
ran (``log_connections``). Creating the database and the CHECKPOINT before each run go
through connections outside that window.

The result says how much work each tool's statements give the server beyond the
migrations' own (the psql floor sends nothing else): bookkeeping, settings, the reads
of inspection and its extra connections. It says nothing of round trips or of the
client's own time: ``bench_apply.py`` measures those, as wall time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_apply import Cluster, Runner, find_program, generate, run  # noqa: E402

TOOLS = ("psql", "dbmate", "dbplan")
_AUTHORIZED = re.compile(r"^(\d+) .*connection authorized: .*database=(\S+)")


@dataclass
class Counted:
    tool: str
    backends: int
    instructions: int


class CountingServer:
    """A PostgreSQL server run under cachegrind, one output file per backend."""

    def __init__(self, workdir: Path, prefer: str | None) -> None:
        from orchestrator.server.pgbinaries import find_binaries
        from orchestrator.server.runas import reachable_bindir, run_as_account

        self.account = run_as_account()  # PostgreSQL refuses to run as root
        binaries = find_binaries(prefer)
        self.source = f"PostgreSQL {binaries.version} ({binaries.source})"
        self.bindir = reachable_bindir(binaries, self.account) if self.account else binaries.bindir
        self.home = workdir / "server"
        self.home.mkdir(mode=0o755)
        self.data = self.home / "data"
        self.counts = self.home / "counts"
        self.counts.mkdir()
        self.log = self.home / "server.log"
        if self.account:
            for path in (self.home, self.counts):
                os.chown(path, self.account.uid, self.account.gid)
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def _as_account(self) -> dict[str, object]:
        if not self.account:
            return {}
        return {"user": self.account.uid, "group": self.account.gid, "extra_groups": []}

    def start(self) -> str:
        subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"],
            check=True, capture_output=True, cwd="/", **self._as_account(),  # type: ignore[arg-type]
        )  # fmt: skip
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={self.counts}/cg.%p",
                 str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.home),
                 "-c", "listen_addresses=127.0.0.1", "-c", "log_connections=on", "-c", "log_line_prefix=%p ",
                 "-c", "autovacuum=off"],
                stdout=log, stderr=subprocess.STDOUT, cwd="/", **self._as_account(),  # type: ignore[arg-type]
            )  # fmt: skip
        url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        deadline = time.monotonic() + 120
        while subprocess.run([find_program("psql"), "-X", "-q", "-d", url, "-c", "SELECT 1"],
                             capture_output=True).returncode != 0:  # fmt: skip
            if time.monotonic() > deadline or self.process.poll() is not None:
                sys.exit(f"bench: the server under valgrind did not start; see {self.log}")
            time.sleep(0.5)
        return url

    def log_size(self) -> int:
        return self.log.stat().st_size

    def backends_since(self, offset: int) -> list[int]:
        """The backends whose connection was logged after ``offset`` of the log."""
        with open(self.log, "rb") as log:
            log.seek(offset)
            lines = log.read().decode(errors="replace").splitlines()
        return [int(match[1]) for line in lines if (match := _AUTHORIZED.match(line))]

    def instructions(self, pid: int, timeout: float = 120) -> int:
        """A backend's instruction count, once it has exited and cachegrind wrote it."""
        path = self.counts / f"cg.{pid}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                for line in path.read_text().splitlines():
                    if line.startswith("summary:"):
                        return int(line.split()[1])
            time.sleep(0.2)
        sys.exit(f"bench: no instruction count for backend {pid} in {path}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: PostgreSQL's smart shutdown
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def count(server: CountingServer, runner: Runner, cluster: Cluster, tool: str) -> Counted:
    database = f"work_{tool}"
    cluster.fresh_database(database)
    offset = server.log_size()
    run(runner.command(tool, database), env=runner.env, cwd=runner.workdir, log=runner.logs / f"{database}.log")
    backends = server.backends_since(offset)
    tables = cluster.table_count(database)
    if tables != runner.migrations.count:
        sys.exit(f"bench: {tool} left {tables} tables, expected {runner.migrations.count}; see {runner.logs}")
    return Counted(tool, len(backends), sum(server.instructions(pid) for pid in backends))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="migrations to apply (default 200)")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, from psql,psql_bk,dbmate,dbplan")
    parser.add_argument("--dbplan", help="the dbplan executable (default: the one beside this Python)")
    parser.add_argument("--pg", choices=("wheel", "system"), help="which PostgreSQL binaries (default: as dbplan finds them)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (per-backend counts, logs)")
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("bench: valgrind is needed (apt-get install valgrind)")
    tools = [tool.strip() for tool in args.tools.split(",") if tool.strip()]

    workdir = Path(tempfile.mkdtemp(prefix="dbplan-serverwork-"))
    os.chmod(workdir, 0o755)  # the server's account reaches its folder through it
    server = CountingServer(workdir, args.pg)
    try:
        url = server.start()
        cluster = Cluster(url=url, psql=find_program("psql"), server=None)
        migrations = generate(workdir, args.count)
        runner = Runner(cluster, migrations, workdir, dbplan=args.dbplan)
        print(f"server: {server.source} under cachegrind, on port {server.port}; "
              f"{args.count} migrations; work folder {workdir}")  # fmt: skip
        results = []
        for tool in tools:
            counted = count(server, runner, cluster, tool)
            results.append(counted)
            print(f"  {tool:8s} {counted.backends} backend(s), {counted.instructions / 1e6:9.1f} M instructions", flush=True)
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    floor = next((r for r in results if r.tool == "psql"), None)
    print(f"\nserver instructions per migration ({args.count} migrations; every backend that served the tool,")
    print("its start and the tool's reads included; the psql floor runs the migrations and nothing else)")
    print(f"{'tool':8s} {'backends':>8s} {'M instr/migration':>18s} {'vs floor':>9s} {'extra per migration':>20s}")
    for r in results:
        per = r.instructions / args.count
        ratio = f"{r.instructions / floor.instructions:8.3f}x" if floor else ""
        extra = f"{(r.instructions - floor.instructions) / args.count / 1e3:+15.0f} K" if floor else ""
        print(f"{r.tool:8s} {r.backends:8d} {per / 1e6:18.3f} {ratio:>9s} {extra:>20s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

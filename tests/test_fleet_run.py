"""Fleets (issue #12): many databases on two servers, run in parallel, failing well.

Until the plan file has sets, each test writes its databases and services out one by one
(``fleet_estate``); stages, which the loader does not read yet, are set on the loaded
``Estate`` with ``dataclasses.replace`` and run through the library.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from estate import Estate
from processes import finish, start_dbplan

from orchestrator import api

MIGRATIONS = {
    # IF NOT EXISTS: a test may put a database there first, with rows that break rule 2.
    "1_create_items.up.sql": "CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, qty int NOT NULL);\n",
    "1_create_items.down.sql": "DROP TABLE items;\n",
    # Fails where a row breaks the rule: the failure depends on the data of one database.
    "2_positive_qty.up.sql": "-- a rule the data must follow\nALTER TABLE items ADD CONSTRAINT qty_positive CHECK (qty > 0);\n",
    "2_positive_qty.down.sql": "ALTER TABLE items DROP CONSTRAINT qty_positive;\n",
    "3_add_note.up.sql": "ALTER TABLE items ADD COLUMN note text;\n",
    "3_add_note.down.sql": "ALTER TABLE items DROP COLUMN note;\n",
}


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    return Estate(tmp_path, pg_url, dbname_prefix, capsys)


def fleet_estate(estate: Estate, url2: str, count: int, *, parallel: int | None = None) -> list[tuple[str, str]]:
    """``count`` tenant databases spread over servers 'main' and 'second', one service
    each, all served by one migrations folder. Returns (server, database) per tenant."""
    folder = estate.root / "migrations" / "tenant"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in MIGRATIONS.items():
        (folder / name).write_text(text, encoding="utf-8")
    estate.document["servers"]["second"] = {"url": url2}
    if parallel is not None:
        for server in estate.document["servers"].values():
            server["parallel"] = parallel
    tenants = []
    for n in range(1, count + 1):
        server = "main" if n % 2 else "second"
        database = estate.name(f"t{n}")
        estate.document.setdefault("databases", {})[database] = {"server": server}
        estate.document.setdefault("services", {})[f"t{n}"] = {"database": database, "migrations": "migrations/tenant"}
        tenants.append((server, database))
    estate.save()
    return tenants


def query(url: str, database: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url, dbname=database, autocommit=True) as conn:
        return conn.execute(sql).fetchall()  # type: ignore[arg-type]


def urls(estate: Estate, url2: str) -> dict[str, str]:
    return {"main": estate.url, "second": url2}


def with_bad_row(url: str, database: str) -> None:
    """Create ``database`` ahead of dbplan, with a row that migration 2's rule refuses."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')  # type: ignore[arg-type]
    with psycopg.connect(url, dbname=database, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, qty int NOT NULL)")
        conn.execute("INSERT INTO items VALUES (1, -5)")


def applied(url: str, database: str) -> list[tuple[object, ...]]:
    return query(url, database, "SELECT version, count(*) FROM dbplan_history WHERE event = 'apply' GROUP BY 1 ORDER BY 1")


def test_parallel_inspection_reads_what_a_sequential_one_reads(estate: Estate, pg_url2: str) -> None:
    fleet_estate(estate, pg_url2, 12)
    assert estate.dbplan("apply", "--yes", "--only", "t1,t2,t3,t4").code == 0  # some exist, some do not
    checked = api.validate(estate.plan_file)
    from orchestrator.live.facts import inspect

    sequential = inspect(checked.estate, parallel=1)
    parallel = inspect(checked.estate, parallel=8)
    assert parallel == sequential
    assert list(parallel.services) == list(sequential.services)  # the same order, so the same plan
    assert sum(facts.database_exists for facts in parallel.services.values()) == 4


def test_a_fleet_is_created_and_migrated_with_one_line_per_database(estate: Estate, pg_url2: str) -> None:
    tenants = fleet_estate(estate, pg_url2, 12, parallel=3)
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    lines = re.findall(r"^\[(\d+)/(\d+) databases\] database (\S+) on (\w+): done", run.err, re.MULTILINE)
    assert sorted(database for _, _, database, _ in lines) == sorted(database for _, database in tenants)
    assert {total for _, total, _, _ in lines} == {"12"}
    assert not re.search(r"^\[\d+/\d+\] apply", run.err, re.MULTILINE), "a fleet reports databases, not migrations"
    assert "Apply complete: 48 done." in run.out  # 12 databases and 36 migrations
    for server, database in tenants:
        assert applied(urls(estate, pg_url2)[server], database) == [(1, 1), (2, 1), (3, 1)]


def test_each_new_database_is_migrated_before_the_next_is_created(estate: Estate, pg_url2: str) -> None:
    """A migration that fails everywhere stops a new fleet after its first database on each
    server, not after creating all of them: the rest are not created."""
    tenants = fleet_estate(estate, pg_url2, 12, parallel=1)
    (estate.root / "migrations" / "tenant" / "2_positive_qty.up.sql").write_text("SELECT 1/0;\n", encoding="utf-8")
    run = estate.dbplan("apply", "--yes")
    assert run.code == 1, run.output
    assert "division by zero (SQLSTATE 22012)" in run.out, run.out

    def exists(server: str, database: str) -> bool:
        found = query(urls(estate, pg_url2)[server], "postgres", f"SELECT 1 FROM pg_database WHERE datname = '{database}'")
        return bool(found)

    # The first database of each server was created (side by side); its service came next,
    # before the creation of the second, and its failure stopped the run.
    assert [database for server, database in tenants if exists(server, database)] == [db for _, db in tenants[:2]]
    not_run = re.search(r"^  \d+ not started: the run stopped at the first failure: (.*)$", run.out, re.MULTILINE)
    assert not_run, run.out
    listed = set(not_run.group(1).split(", "))
    assert {database for _, database in tenants[2:]} <= listed, run.out
    # The first failure applied version 1 and failed at 2. The other server's first service
    # failed the same way, or, when that failure came while its database was still being
    # created, never started: then its service is listed as not started, nothing applied.
    histories = {}
    for service, (server, database) in zip(("t1", "t2"), tenants[:2]):
        url = urls(estate, pg_url2)[server]
        has_history = query(url, database, "SELECT to_regclass('dbplan_history') IS NOT NULL")[0][0]
        histories[service] = applied(url, database) if has_history else []
    assert [(1, 1)] in histories.values(), histories
    for service, history in histories.items():
        assert history == [(1, 1)] or (history == [] and service in listed), (histories, run.out)


def test_a_creation_in_flight_at_the_first_failure_finishes_and_its_service_is_listed(estate: Estate, pg_url2: str) -> None:
    """The first failure stops new work and lets what is in flight finish: a database whose
    creation was still running (here: waiting for template1, which a session holds) is
    created, its migrations do not start, and the end of the run says so; the next run
    migrates it."""
    tenants = fleet_estate(estate, pg_url2, 12, parallel=1)  # 10 or more: a line per database
    failing = estate.root / "migrations" / "tenant" / "2_positive_qty.up.sql"
    rule = failing.read_text(encoding="utf-8")
    failing.write_text("SELECT 1/0;\n", encoding="utf-8")
    (first_server, first), (second_server, second) = tenants[:2]
    assert (first_server, second_server) == ("main", "second")
    with psycopg.connect(estate.url, dbname="template1", autocommit=True):  # CREATE DATABASE waits on main
        process = start_dbplan(estate.plan_file, "apply", "--yes")
        process.wait_for("the template database is in use by another session; retrying")
        process.wait_for(f"database {second} on second: FAILED")
    run = process.finish()
    assert run.code == 1, run.out + run.err
    assert "Apply failed: 3 done, 1 failed, 21 not run." in run.out, run.out  # t2 created and at 1, t1 created
    assert query(estate.url, first, "SELECT to_regclass('dbplan_history') IS NULL")[0] == (True,), "nothing was applied"
    not_run = re.search(r"^  \d+ not started: the run stopped at the first failure: (.*)$", run.out, re.MULTILINE)
    assert not_run and "t1" in not_run.group(1).split(", "), run.out  # its service, by name
    for server, database in tenants[2:]:
        assert not query(urls(estate, pg_url2)[server], "postgres", f"SELECT 1 FROM pg_database WHERE datname = '{database}'")

    failing.write_text(rule, encoding="utf-8")
    resumed = estate.dbplan("apply", "--yes")
    assert resumed.code == 0, resumed.output
    for server, database in tenants:
        assert applied(urls(estate, pg_url2)[server], database) == [(1, 1), (2, 1), (3, 1)], database


def test_first_failure_stops_new_work_then_keep_going_then_resume(estate: Estate, pg_url2: str) -> None:
    tenants = fleet_estate(estate, pg_url2, 12, parallel=2)
    server3, database3 = tenants[2]
    url3 = urls(estate, pg_url2)[server3]
    with_bad_row(url3, database3)

    stopped = estate.dbplan("apply", "--yes", "--format", "json")
    assert stopped.code == 1
    import json

    result = json.loads(stopped.out)
    assert [(f["database"], f["service"], f["location"], f["sqlstate"]) for f in result["failures"]] == [
        (database3, "t3", "migrations/tenant/2_positive_qty.up.sql:2", "23514")
    ]
    assert result["not_run"], "the first failure stops new work"
    assert all(item["reason"].startswith("not started") for item in result["not_run"])

    going = estate.dbplan("apply", "--yes", "--keep-going")
    assert going.code == 1
    assert "Failed:" in going.out and database3 in going.out
    assert "2_positive_qty.up.sql:2" in going.out and "SQLSTATE 23514" in going.out
    for server, database in tenants:
        expected = [(1, 1)] if database == database3 else [(1, 1), (2, 1), (3, 1)]
        assert applied(urls(estate, pg_url2)[server], database) == expected, database

    with psycopg.connect(url3, dbname=database3, autocommit=True) as conn:
        conn.execute("UPDATE items SET qty = 5")
    resumed = estate.dbplan("apply", "--yes")
    assert resumed.code == 0, resumed.output
    assert "Apply complete: 2 done." in resumed.out, resumed.out  # only what was left, nothing twice
    assert applied(url3, database3) == [(1, 1), (2, 1), (3, 1)]


def test_dependents_of_a_failed_service_are_listed_as_not_run(estate: Estate, pg_url2: str) -> None:
    tenants = fleet_estate(estate, pg_url2, 10)
    estate.document["services"]["t2"]["depends_on"] = ["t1"]
    broken = estate.root / "migrations" / "broken"
    broken.mkdir()
    (broken / "1_fail.up.sql").write_text("SELECT 1/0;\n", encoding="utf-8")
    estate.document["services"]["t1"]["migrations"] = "migrations/broken"
    estate.save()
    run = estate.dbplan("apply", "--yes", "--keep-going")
    assert run.code == 1
    assert "division by zero (SQLSTATE 22012)" in run.out
    assert re.search(r"1 service 't1' \(database '\S+_t1' on server 'main'\) failed: t2", run.out), run.out
    server, database = tenants[1]
    assert query(urls(estate, pg_url2)[server], database, "SELECT to_regclass('items') IS NOT NULL") == [(False,)]
    for server, database in tenants[2:]:
        assert applied(urls(estate, pg_url2)[server], database) == [(1, 1), (2, 1), (3, 1)]


def test_a_failed_canary_stage_stops_its_fleet_even_with_keep_going(estate: Estate, pg_url2: str) -> None:
    tenants = fleet_estate(estate, pg_url2, 10)
    other = estate.root / "migrations" / "other"
    other.mkdir()
    (other / "1_t.up.sql").write_text("CREATE TABLE other_t (id int);\n", encoding="utf-8")
    estate.document["databases"][estate.name("other")] = {"server": "main"}
    estate.document["services"]["other"] = {"database": estate.name("other"), "migrations": "migrations/other"}
    estate.save()
    canary = tenants[0][1]
    with_bad_row(estate.url, canary)

    planned = api.plan(estate.plan_file)
    databases = {
        name: replace(database, fleet="tenant", stage=0 if name == canary else 1)
        if name != estate.name("other") else database
        for name, database in planned.estate.databases.items()
    }  # fmt: skip
    planned = replace(planned, estate=replace(planned.estate, databases=databases))
    result = api.apply(planned, keep_going=True)
    assert not result.ok
    assert [failure.database for failure in result.failures] == [canary]
    reasons = {item.database: item.reason for item in result.not_run}
    for _, database in tenants[1:]:
        assert reasons[database] == "stage 0 of fleet 'tenant' did not succeed", database
    for server, database in tenants[1:]:
        exists = query(urls(estate, pg_url2)[server], "postgres", f"SELECT count(*) FROM pg_database WHERE datname = '{database}'")
        assert exists == [(0,)], "not even created: stage 1 never started"
    assert query(estate.url, estate.name("other"), "SELECT to_regclass('other_t') IS NOT NULL") == [(True,)]

    with psycopg.connect(estate.url, dbname=canary, autocommit=True) as conn:
        conn.execute("UPDATE items SET qty = 1")
    planned = api.plan(estate.plan_file)
    planned = replace(planned, estate=replace(planned.estate, databases={**planned.estate.databases, **databases}))
    assert api.apply(planned).ok
    for server, database in tenants:
        assert applied(urls(estate, pg_url2)[server], database) == [(1, 1), (2, 1), (3, 1)]


@pytest.mark.parametrize("strategy", [None, "file_copy"])
def test_two_applies_at_once_on_twenty_databases_apply_each_version_once(estate: Estate, pg_url2: str, strategy: str | None) -> None:
    """Also with file_copy, whose CREATE DATABASE waits on checkpoints: the two runs race
    for each creation for longer, and still create each database once."""
    tenants = fleet_estate(estate, pg_url2, 20, parallel=4)
    if strategy:
        for server in estate.document["servers"].values():
            server["create_strategy"] = strategy
        estate.save()
    runs = [finish(process) for process in [start_dbplan(estate.plan_file, "apply", "--yes") for _ in range(2)]]
    for run in runs:
        assert run.code == 0, run.err
    for server, database in tenants:
        assert applied(urls(estate, pg_url2)[server], database) == [(1, 1), (2, 1), (3, 1)], database
        assert query(urls(estate, pg_url2)[server], database, "SELECT version, dirty FROM schema_migrations") == [
            (3, False)
        ]
    done = sum(int(n) for run in runs for n in re.findall(r"Apply complete: (\d+) done", run.out))
    assert done == 20 + 60, "each database created once and each migration applied once, by one of the two"


def test_the_live_display_shows_done_failing_in_flight_and_the_slowest() -> None:
    from rich.console import Console

    from orchestrator.execution.fleet import Unit
    from orchestrator.execution.progress import Outcome
    from orchestrator.planning.plan import ApplyMigration
    from orchestrator.render.fleet_progress import FleetLive

    now = [100.0]
    file = io.StringIO()
    live = FleetLive(Console(file=file, force_terminal=True, width=120), clock=lambda: now[0])
    units = [Unit(i, "service", "main", [], f"t{i}", f"t{i}") for i in range(3)]
    live.fleet_started(units)
    actions = [ApplyMigration(f"t{i}", f"t{i}", 4, "backfill", "4_backfill.up.sql", "x", "transaction", 4) for i in range(3)]
    live.action_started(actions[0], 1, 3)
    now[0] += 2.0
    live.action_started(actions[1], 2, 3)
    live.action_started(actions[2], 3, 3)
    now[0] += 1.5
    live.action_finished(Outcome(actions[2], "failed", 10, "boom"), 1, 3)
    live.unit_finished(units[2], "failed")
    shown = live.render()
    text = io.StringIO()
    Console(file=text, width=120).print(shown)
    screen = text.getvalue()
    assert "0/3 databases done" in screen and "1 failing" in screen and "2 in flight" in screen
    assert "elapsed 3.5 s" in screen
    assert "slowest now: t0 — apply 4 backfill for 3.5 s" in screen
    assert re.search(r"t1\s+main\s+apply 4 backfill\s+1.5 s", screen)
    live.stop()
    assert "FAILED" in file.getvalue() and "\x1b[" in file.getvalue()  # drawn for a terminal


def test_ctrl_c_in_a_fleet_rolls_back_what_runs_and_starts_nothing_new(estate: Estate, pg_url2: str) -> None:
    import signal

    from processes import dbplan_backends, wait_until

    tenants = fleet_estate(estate, pg_url2, 12, parallel=2)
    estate.write("tenant", "3_add_note.up.sql", "SELECT pg_sleep(30);\nALTER TABLE items ADD COLUMN note text;\n")
    process = start_dbplan(estate.plan_file, "apply", "--yes")
    wait_until(lambda: dbplan_backends(estate.url, "%pg_sleep%") and dbplan_backends(pg_url2, "%pg_sleep%"), 60,
               "migrations in flight on both servers")  # fmt: skip
    process.signal(signal.SIGINT)
    run = finish(process, 60)
    assert run.code == 128 + signal.SIGINT, run.err
    assert re.search(r"received SIGINT: cancelling versions 2 to 3 of service 't\d+'; it is rolled back", run.err), run.err
    assert re.search(r"databases\] database \S+ on \w+: cancelled", run.err), run.err
    assert "Apply stopped on request" in run.out
    assert "stopped on request" in run.out  # the databases that never started are listed
    for server, database in tenants:
        rows = query(urls(estate, pg_url2)[server], "postgres", f"SELECT 1 FROM pg_database WHERE datname = '{database}'")
        if rows:
            versions = [v for v, in query(urls(estate, pg_url2)[server], database,
                                         "SELECT version FROM dbplan_history WHERE event = 'apply'")] \
                if query(urls(estate, pg_url2)[server], database, "SELECT to_regclass('dbplan_history') IS NOT NULL") == [(True,)] else []  # fmt: skip
            assert 3 not in versions, "the migration in flight was rolled back"

    estate.write("tenant", "3_add_note.up.sql", "ALTER TABLE items ADD COLUMN note text;\n")
    resumed = estate.dbplan("apply", "--yes")
    assert resumed.code == 0, resumed.output
    for server, database in tenants:
        assert applied(urls(estate, pg_url2)[server], database) == [(1, 1), (2, 1), (3, 1)], database


def test_a_server_parallel_below_one_is_a_located_error(estate: Estate, pg_url2: str) -> None:
    fleet_estate(estate, pg_url2, 2)
    estate.document["servers"]["second"]["parallel"] = 0
    estate.save()
    run = estate.dbplan("validate")
    assert run.code == 1
    assert re.search(r"dbplan\.yaml:\d+.*servers\.second\.parallel", run.err), run.err
    assert "unknown key" not in run.err and "0" in run.err


def test_a_set_with_a_failed_canary_in_the_plan_file_stops_the_rest_of_the_set(estate: Estate, pg_url2: str) -> None:
    # End to end: the set's `canary:` key (the loader) gates the roll-out (the scheduler).
    folder = estate.root / "migrations" / "tenant"
    folder.mkdir(parents=True)
    for name, text in MIGRATIONS.items():
        (folder / name).write_text(text, encoding="utf-8")
    names = {"main": [estate.name(f"c{n}") for n in (1, 3, 5)], "second": [estate.name(f"c{n}") for n in (2, 4, 6)]}
    canary = names["main"][0]
    estate.document["servers"]["second"] = {"url": pg_url2}
    estate.document["databases"] = {"tenants": {"set": {"per_server": names, "canary": [canary]}}}
    estate.document["services"] = {"tenant": {"database": "tenants", "migrations": "migrations/tenant"}}
    estate.save()
    with_bad_row(estate.url, canary)

    run = estate.dbplan("apply", "--yes", "--keep-going")
    assert run.code == 1, run.output
    assert "qty_positive" in run.output and canary in run.output
    for server, members in names.items():
        for database in members:
            if database != canary:
                exists = query(urls(estate, pg_url2)[server], "postgres", f"SELECT count(*) FROM pg_database WHERE datname = '{database}'")
                assert exists == [(0,)], f"{database}: the rest of the set started although its canary failed"

    with psycopg.connect(estate.url, dbname=canary, autocommit=True) as conn:
        conn.execute("UPDATE items SET qty = 1")
    assert estate.dbplan("apply", "--yes").code == 0
    for server, members in names.items():
        for database in members:
            assert applied(urls(estate, pg_url2)[server], database) == [(1, 1), (2, 1), (3, 1)]


# ---------------------------------------------------------------------------
# How databases are created


def wal_and_checkpoints(url: str) -> tuple[int, int]:
    """The server's write-ahead log position (bytes) and its count of requested checkpoints."""
    (version,) = query(url, "postgres", "SELECT current_setting('server_version_num')::int")[0]
    # PostgreSQL 17 moved the checkpointer's counters out of pg_stat_bgwriter.
    requested = "(SELECT num_requested FROM pg_stat_checkpointer)" if int(version) >= 170000 else \
        "(SELECT checkpoints_req FROM pg_stat_bgwriter)"  # type: ignore[call-overload]  # fmt: skip
    row = query(url, "postgres", f"SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint, {requested}")[0]
    return int(row[0]), int(row[1])  # type: ignore[call-overload]


def test_create_strategy_file_copy_copies_files_on_its_server_and_the_plan_says_so(estate: Estate, pg_url2: str) -> None:
    """file_copy on 'main' only: main's databases are copied file by file (checkpoints, next
    to no WAL), second's page by page through the WAL, the server's default."""
    tenants = fleet_estate(estate, pg_url2, 6)
    estate.document["servers"]["main"]["create_strategy"] = "file_copy"
    estate.save()
    planned = estate.dbplan("plan")
    assert planned.code == 0, planned.output
    assert "server main: 3 databases to create, copied file by file (create_strategy: file_copy), " \
           "each forcing two checkpoints" in planned.out, planned.out  # fmt: skip
    assert "server second:" not in planned.out
    markdown = estate.dbplan("plan", "--format", "markdown").out
    notes = markdown.index("**Notes**")
    assert "server main: 3 databases to create, copied file by file" in markdown[notes:], markdown
    assert markdown[:notes].count("<details>") == markdown[:notes].count("</details>"), "a note is not folded away"
    as_json = estate.dbplan("plan", "--format", "json")
    assert any("copied file by file" in notice for notice in json.loads(as_json.out)["notices"]), as_json.out

    before = {name: wal_and_checkpoints(url) for name, url in urls(estate, pg_url2).items()}
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    after = {name: wal_and_checkpoints(url) for name, url in urls(estate, pg_url2).items()}
    wal = {name: after[name][0] - before[name][0] for name in before}
    assert after["main"][1] - before["main"][1] >= 2, "FILE_COPY forces checkpoints"
    # A page-by-page copy of template1 writes its every page (4 to 8 MB) to the WAL; a file
    # copy, one record per directory.
    assert wal["second"] > 3 * 2_000_000, wal
    assert wal["main"] < wal["second"] / 10, wal
    for server, database in tenants:
        assert applied(urls(estate, pg_url2)[server], database) == [(1, 1), (2, 1), (3, 1)]
    again = estate.dbplan("plan")
    assert "copied file by file" not in again.out, "nothing left to create, nothing to say"


def test_an_unknown_create_strategy_is_a_located_error_and_nothing_is_created(estate: Estate, pg_url2: str) -> None:
    tenants = fleet_estate(estate, pg_url2, 2)
    estate.document["servers"]["second"]["create_strategy"] = "copy"
    estate.save()
    run = estate.dbplan("apply", "--yes")
    assert run.code == 1, run.output
    assert re.search(r"dbplan\.yaml:\d+.*servers\.second\.create_strategy", run.err), run.err
    assert "wal_log" in run.err and "file_copy" in run.err, run.err
    for server, database in tenants:
        assert not query(urls(estate, pg_url2)[server], "postgres", f"SELECT 1 FROM pg_database WHERE datname = '{database}'")

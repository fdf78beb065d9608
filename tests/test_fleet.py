"""Fleets (issue #12): sets of databases declared once, read at a glance, saved and sharded.

The set's databases carry the test's prefix, so conftest drops them afterwards. Most tests
use two real clusters (pg_url, pg_url2) and a dozen databases; the 10,000-database plan is
built in memory, like tests/test_planner.py, since the planner never talks to a server.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from estate import Estate

from orchestrator.errors import ConfigError
from orchestrator.estate import graph
from orchestrator.estate.load import load
from orchestrator.live.facts import LiveState, ServerFacts, ServiceFacts
from orchestrator.migrations import scan as migrations
from orchestrator.planning import savedplan
from orchestrator.planning.planner import make_plan
from orchestrator.render import text
from orchestrator.render.fleet import render_markdown_plan

COUNT = 12


def fleet(estate: Estate, url2: str, set_spec: dict[str, Any] | None = None, **service: Any) -> Estate:
    """A set of COUNT databases named PREFIX_tN, spread over servers main and second, served
    by service tenant (one migration)."""
    estate.add_server("second", url2)
    spec = set_spec or {"range": {"pattern": estate.name("t{n}"), "from": 1, "to": COUNT}, "servers": ["main", "second"]}
    estate.document.setdefault("databases", {})["tenants"] = {"set": spec}
    estate.document.setdefault("services", {})["tenant"] = {"database": "tenants", "migrations": "migrations/tenant", **service}
    estate.write("tenant", "000001_init.up.sql", "CREATE TABLE account (id int);\n")
    estate.save()
    return estate


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    estate = Estate(tmp_path / "repo", pg_url, dbname_prefix, capsys)
    estate.root.mkdir()
    return estate


def server_of(url: str, url2: str, database: str) -> str | None:
    for name, server_url in (("main", url), ("second", url2)):
        with psycopg.connect(server_url, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone():
                return name
    return None


def tables_in(url: str, database: str) -> set[str]:
    with psycopg.connect(url, dbname=database, autocommit=True) as conn:
        return {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


# ---------------------------------------------------------------------------
# Declaring a set


def test_a_range_spread_over_two_servers_expands_to_databases_and_instances(estate: Estate, pg_url2: str) -> None:
    fleet(estate, pg_url2)
    loaded = load(estate.plan_file)
    names = [estate.name(f"t{n}") for n in range(1, COUNT + 1)]
    assert list(loaded.databases) == names
    assert {database.fleet for database in loaded.databases.values()} == {"tenants"}
    assert list(loaded.services) == [f"tenant[{name}]" for name in names]
    placed = {database.server for database in loaded.databases.values()}
    assert placed == {"main", "second"}  # a dozen names land on both servers
    again = fleet(Estate(estate.root, estate.url, estate.prefix, estate.capsys), pg_url2)  # same file, same spread
    assert {n: d.server for n, d in load(again.plan_file).databases.items()} == {n: d.server for n, d in loaded.databases.items()}


def test_the_spread_of_a_name_does_not_depend_on_the_other_names(estate: Estate, pg_url2: str) -> None:
    fleet(estate, pg_url2)
    before = {name: database.server for name, database in load(estate.plan_file).databases.items()}
    estate.document["databases"]["tenants"]["set"]["range"]["to"] = COUNT + 5
    estate.document["databases"]["tenants"]["set"]["range"]["from"] = 0
    estate.save()
    after = {name: database.server for name, database in load(estate.plan_file).databases.items()}
    assert {name: after[name] for name in before} == before


def test_per_server_names_and_ranges_canaries_and_a_role_on_both_servers(estate: Estate, pg_url2: str) -> None:
    owner = estate.add_role("tenant_svc")
    estate.document["roles"][owner]["server"] = ["main", "second"]
    fleet(
        estate,
        pg_url2,
        {
            "per_server": {
                "main": [estate.name("acme"), estate.name("globex")],
                "second": {"range": {"pattern": estate.name("t{n}"), "from": 1, "to": 3, "width": 3}},
            },
            "canary": [estate.name("globex")],
        },
    )
    estate.document["databases"]["tenants"]["owner"] = owner
    estate.save()
    loaded = load(estate.plan_file)
    assert [(d.name, d.server, d.stage) for d in loaded.databases.values()] == [
        (estate.name("acme"), "main", 1),
        (estate.name("globex"), "main", 0),
        (estate.name("t001"), "second", 1),
        (estate.name("t002"), "second", 1),
        (estate.name("t003"), "second", 1),
    ]
    assert {(role.name, role.server) for role in loaded.roles.values()} == {(owner, "main"), (owner, "second")}


def test_dependencies_pair_by_database_and_fan_in_from_a_plain_service(estate: Estate, pg_url2: str) -> None:
    fleet(estate, pg_url2)
    estate.add_database("core")
    estate.add_service("core", "core")
    estate.add_service("report", "core", depends_on=["tenant"], table="report_migrations")
    estate.document["services"]["tenant_extra"] = {
        "database": "tenants", "migrations": "migrations/tenant", "table": "extra", "depends_on": ["tenant", "core"],
    }  # fmt: skip
    estate.save()
    loaded = load(estate.plan_file)
    first = estate.name("t1")
    assert loaded.services[f"tenant_extra[{first}]"].depends_on == (f"tenant[{first}]", "core")
    assert len(loaded.services["report"].depends_on) == COUNT
    edges = graph.build(loaded).edges
    assert len([edge for edge in edges if edge[0][0] == "service"]) == 3 * COUNT  # linear, not COUNT x COUNT


@pytest.mark.parametrize(
    "change, message, path",
    [
        (lambda s, e: s["range"].update({"from": 9, "to": 2}), "range from 9 to 2 is empty", "range.from"),
        (lambda s, e: s["range"].update(pattern="tenant"), "must hold {n} once", "range.pattern"),
        (lambda s, e: s.update(servers=["main", "nowhere"]), "unknown server 'nowhere'", "servers[1]"),
        (lambda s, e: s.update(canary=[e.name("t99")]), "is not a database of set 'tenants'", "canary[0]"),
        (lambda s, e: s.update(canary="150%"), "canary percentage 150% is out of range", "canary"),
        (lambda s, e: s.update(canary=COUNT + 1), f"more than the {COUNT} databases", "canary"),
        (
            lambda s, e: (s.pop("range"), s.pop("servers"), s.update(per_server={"main": [e.name("x")], "second": [e.name("x")]})),
            "is listed on server 'main' and on server 'second'",
            "per_server.second",
        ),
        (lambda s, e: s.update(per_server={"main": ["a"]}), "needs names and/or range", ""),
    ],
    ids=["empty-range", "pattern", "unknown-server", "canary-name", "percentage", "canary-count", "twice", "two-forms"],
)
def test_mistakes_inside_a_set_name_file_line_and_key(estate: Estate, pg_url2: str, change, message: str, path: str) -> None:  # type: ignore[no-untyped-def]
    fleet(estate, pg_url2)
    change(estate.document["databases"]["tenants"]["set"], estate)
    estate.save()
    with pytest.raises(ConfigError) as caught:
        load(estate.plan_file)
    assert message in caught.value.message
    place = caught.value.place
    assert place is not None and place.file == str(estate.plan_file) and place.line is not None
    assert place.path == "databases.tenants.set" + (f".{path}" if path else "")
    run = estate.dbplan("plan")
    assert run.code == 1 and f"{estate.plan_file}:{place.line}" in run.err
    assert server_of(estate.url, pg_url2, estate.name("t1")) is None  # nothing was created anywhere


# ---------------------------------------------------------------------------
# Apply and read the plan


def test_apply_creates_and_migrates_every_database_and_the_plan_reads_at_a_glance(estate: Estate, pg_url2: str) -> None:
    fleet(estate, pg_url2, {"range": {"pattern": estate.name("t{n}"), "from": 1, "to": COUNT}, "servers": ["main", "second"], "canary": 2})
    loaded = load(estate.plan_file)
    first = estate.dbplan("plan")
    assert first.code == 0, first.output
    assert f"{COUNT} databases to create" in first.out
    assert "stage 1: 2 canaries" in first.out and f"stage 2: {COUNT - 2} databases" in first.out
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    urls = {"main": estate.url, "second": pg_url2}
    for name, database in loaded.databases.items():
        assert server_of(estate.url, pg_url2, name) == database.server
        assert "account" in tables_in(urls[database.server], name)

    estate.write("tenant", "000002_add_index.up.sql", "CREATE INDEX account_id ON account (id);\n")
    behind = estate.name("t3")
    with psycopg.connect(urls[loaded.databases[behind].server], dbname=behind, autocommit=True) as conn:
        conn.execute("UPDATE schema_migrations SET version = 2")  # as if another tool had gone ahead
    run = estate.dbplan("plan")
    assert run.code == 0, run.output
    servers = len({d.server for d in loaded.databases.values()})
    assert f"service tenant: {COUNT} databases on {servers} servers: {COUNT - 1} at 1 -> 2 (+ 2 add_index); 1 at 2, up to date" in run.out
    assert "~ ahead: 1 database" in run.out and f"{behind} ({loaded.databases[behind].server}) at 2" in run.out
    assert run.out.count("service ") == 1  # one summary, not a section per database
    as_json = json.loads(estate.dbplan("plan", "--format", "json").out)
    assert len([a for a in as_json["actions"] if a["kind"] == "apply_migration"]) == COUNT - 1
    assert {s["fleet"] for s in as_json["services"]} == {"tenant"}
    assert as_json["fleets"]["tenant"]["databases"] == COUNT
    assert as_json["fleets"]["tenant"]["stages"] == {"0": 2, "1": COUNT - 2}

    only = json.loads(estate.dbplan("plan", "--format", "json", "--only", f"tenant[{estate.name('t1')}]").out)
    assert [s["service"] for s in only["services"]] == [f"tenant[{estate.name('t1')}]"]
    every = json.loads(estate.dbplan("plan", "--format", "json", "--only", "tenant").out)
    assert len(every["services"]) == COUNT


def test_a_discovered_set_migrates_the_matching_databases_and_creates_none(estate: Estate, pg_url2: str) -> None:
    pattern = estate.name("d") + "\\_%"
    fleet(estate, pg_url2, {"discover": pattern, "servers": ["main", "second"]})
    run = estate.dbplan("plan")
    assert run.code == 0, run.output
    assert "matches no database" in run.err
    made = {estate.name("d_a"): estate.url, estate.name("d_b"): estate.url, estate.name("d_c"): pg_url2}
    for name, url in [*made.items(), (estate.name("dx_other"), estate.url)]:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    assert "create database" not in run.out
    for name, url in made.items():
        assert "account" in tables_in(url, name)
    assert "account" not in tables_in(estate.url, estate.name("dx_other"))
    assert "3 databases on 2 servers: 3 at 1, up to date" in estate.dbplan("plan").out


# ---------------------------------------------------------------------------
# Shards and saved plans


def services_of(run_out: str) -> set[str]:
    return {service["service"] for service in json.loads(run_out)["services"]}


def test_shards_partition_the_fleet_and_each_applies_on_its_own(estate: Estate, pg_url2: str) -> None:
    fleet(estate, pg_url2)
    estate.add_database("core")
    estate.add_service("core", "core")
    whole = services_of(estate.dbplan("plan", "--format", "json").out)
    parts = [services_of(estate.dbplan("plan", "--format", "json", "--shard", f"{i}/3").out) for i in (1, 2, 3)]
    assert set().union(*parts) == whole
    assert sum(len(part) for part in parts) == len(whole)  # disjoint
    assert "core" in parts[0] and all(part for part in parts)
    for index in (3, 1, 2):  # in any order: each part is complete
        path = estate.root.parent / f"shard{index}.json"
        run = estate.dbplan("plan", "--shard", f"{index}/3", "--out", str(path))
        assert run.code == 0, run.output
        assert json.loads(path.read_text())["selection"]["shard"] == [index, 3]
        run = estate.dbplan("apply", str(path), "--yes")
        assert run.code == 0, run.output
    assert "No changes" in estate.dbplan("plan").out
    wrong = estate.dbplan("apply", str(estate.root.parent / "shard1.json"), "--yes", "--shard", "2/3")
    assert wrong.code == 1 and "made for shard 1/3" in wrong.err


def test_a_shard_whose_set_depends_on_a_plain_service_waits_for_shard_1(estate: Estate, pg_url2: str) -> None:
    fleet(estate, pg_url2, depends_on=["core"])
    estate.add_database("core")
    estate.add_service("core", "core")
    estate.write("core", "000001_init.up.sql", "CREATE TABLE plan (id int);\n")
    mine = services_of(estate.dbplan("plan", "--format", "json", "--shard", "2/2").out) - {"core"}
    early = estate.dbplan("apply", "--yes", "--shard", "2/2")
    assert early.code == 1
    assert "service 'core' is applied by shard 1/2, and the services of shard 2/2 depend on it" in early.out
    assert not estate.database_exists("core")
    assert all(server_of(estate.url, pg_url2, name[len("tenant["):-1]) is None for name in mine)  # nothing ran
    assert estate.dbplan("apply", "--yes", "--shard", "1/2").code == 0
    late = estate.dbplan("apply", "--yes", "--shard", "2/2")
    assert late.code == 0, late.output
    assert "No changes" in estate.dbplan("plan").out


def test_a_plain_service_over_every_shard_is_refused(estate: Estate, pg_url2: str) -> None:
    fleet(estate, pg_url2)
    estate.add_database("core")
    estate.add_service("report", "core", depends_on=["tenant"])
    run = estate.dbplan("plan", "--shard", "1/2")
    assert run.code == 1
    assert "service 'report' depends on service 'tenant', which is served over a set" in run.err


def test_a_kubernetes_index_picks_the_shard(estate: Estate, pg_url2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet(estate, pg_url2)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    by_index = services_of(estate.dbplan("plan", "--format", "json", "--shards", "3").out)
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    assert by_index == services_of(estate.dbplan("plan", "--format", "json", "--shard", "2/3").out)
    monkeypatch.setenv("DBPLAN_SHARD", "2/3")
    assert by_index == services_of(estate.dbplan("plan", "--format", "json").out)
    monkeypatch.setenv("DBPLAN_SHARD", "4/3")
    bad = estate.dbplan("plan")
    assert bad.code == 1 and "there is no part 4 of 3" in bad.err


def saved_with_two(estate: Estate, pg_url2: str) -> Path:
    """The set migrated to 1, then a plan saved that applies 000002 everywhere."""
    fleet(estate, pg_url2)
    assert estate.dbplan("apply", "--yes").code == 0
    estate.write("tenant", "000002_two.up.sql", "CREATE TABLE two (id int);\n")
    path = estate.root.parent / "plan.json"
    assert estate.dbplan("plan", "--out", str(path)).code == 0
    return path


def test_a_saved_fleet_plan_refuses_naming_the_databases_that_changed(estate: Estate, pg_url2: str) -> None:
    path = saved_with_two(estate, pg_url2)
    saved = json.loads(path.read_text())
    assert list(saved["fingerprint"]["migrations"]) == ["tenant"]  # one entry for the whole set
    changed = [estate.name(f"t{n}") for n in (2, 5)]
    for name in changed:
        assert estate.dbplan("apply", "--yes", "--only", f"tenant[{name}]").code == 0
    run = estate.dbplan("apply", str(path), "--yes")
    assert run.code == 1
    assert f"service 'tenant': 2 databases changed since: {', '.join(changed)}" in run.err
    untouched = estate.name("t1")
    urls = {"main": estate.url, "second": pg_url2}
    assert "two" not in tables_in(urls[load(estate.plan_file).databases[untouched].server], untouched)


# ---------------------------------------------------------------------------
# A saved plan applied in one pass (apply --one-pass)


def urls_by_database(estate: Estate, url2: str) -> dict[str, str]:
    urls = {"main": estate.url, "second": url2}
    return {name: urls[database.server] for name, database in load(estate.plan_file).databases.items()}


def versions_applied(url: str, database: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, dbname=database, autocommit=True) as conn:
        return conn.execute(
            "SELECT version, count(*) FROM dbplan_history WHERE event = 'apply' GROUP BY 1 ORDER BY 1"
        ).fetchall()


def sessions_of(url: str, url2: str, databases: list[str]) -> dict[str, int]:
    """pg_stat_database.sessions of each database: how many sessions it has had so far."""
    found: dict[str, int] = {}
    for server_url in (url, url2):
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_force_next_flush()")
            rows = conn.execute("SELECT datname, sessions FROM pg_stat_database WHERE datname = ANY(%s)", (databases,))
            found.update({name: int(count) for name, count in rows})
    return found


def test_one_pass_applies_the_saved_plan_in_one_session_per_database(estate: Estate, pg_url2: str) -> None:
    path = saved_with_two(estate, pg_url2)
    names = [estate.name(f"t{n}") for n in range(1, COUNT + 1)]
    urls = urls_by_database(estate, pg_url2)
    time.sleep(0.6)  # the plan's sessions are counted once they have ended
    before = sessions_of(estate.url, pg_url2, names)
    run = estate.dbplan("apply", "--one-pass", str(path), "--yes")
    assert run.code == 0, run.output
    assert "Plan: 12 migrations to apply." in run.out
    assert "One pass: each of the 12 databases is checked against the saved plan" in run.out
    assert "Apply complete: 12 done." in run.out
    time.sleep(0.6)
    after = sessions_of(estate.url, pg_url2, names)
    assert {name: after[name] - before[name] for name in names} == {name: 1 for name in names}
    for name in names:
        assert versions_applied(urls[name], name) == [(1, 1), (2, 1)], name
    assert "No changes" in estate.dbplan("plan").out


def test_one_pass_refuses_each_database_that_changed_and_leaves_it_as_it_was(estate: Estate, pg_url2: str) -> None:
    path = saved_with_two(estate, pg_url2)
    urls = urls_by_database(estate, pg_url2)
    moved, dirty = estate.name("t2"), estate.name("t5")
    estate.write("tenant", "000003_three.up.sql", "CREATE TABLE three (id int);\n")
    assert estate.dbplan("apply", "--yes", "--only", f"tenant[{moved}]").code == 0  # 2 and 3, since the plan
    (estate.root / "migrations" / "tenant" / "000003_three.up.sql").unlink()
    with psycopg.connect(urls[dirty], dbname=dirty, autocommit=True) as conn:
        conn.execute("UPDATE schema_migrations SET dirty = true")

    run = estate.dbplan("apply", "--one-pass", str(path), "--yes", "--keep-going")
    assert run.code == 1
    assert "Apply complete" not in run.out
    assert "Failed:" in run.out
    for name, change in ((moved, "version 1 -> 3, its history differs"), (dirty, "version 1 -> 1, now dirty")):
        assert re.search(
            rf"the bookkeeping of service 'tenant\[{name}\]' in database '{name}' on server '\w+' changed since the "
            rf"plan was saved \({change}: another apply ran\?\); nothing was changed in it",
            run.out.replace("\n  ", " "),
        ), run.out
    assert "three" in tables_in(urls[moved], moved) and versions_applied(urls[moved], moved) == [(1, 1), (2, 1), (3, 1)]
    assert "two" not in tables_in(urls[dirty], dirty)
    with psycopg.connect(urls[dirty], dbname=dirty, autocommit=True) as conn:
        assert conn.execute("SELECT version, dirty FROM schema_migrations").fetchall() == [(1, True)]
    for name in urls:
        if name not in (moved, dirty):
            assert versions_applied(urls[name], name) == [(1, 1), (2, 1)], name


def test_one_pass_goes_on_where_a_failure_left_it_when_run_again(estate: Estate, pg_url2: str) -> None:
    path = saved_with_two(estate, pg_url2)
    urls = urls_by_database(estate, pg_url2)
    broken = estate.name("t3")
    with psycopg.connect(urls[broken], dbname=broken, autocommit=True) as conn:
        conn.execute("CREATE TABLE two (id int)")  # migration 2 fails here
    failed = estate.dbplan("apply", "--one-pass", str(path), "--yes", "--keep-going")
    assert failed.code == 1
    assert 'relation "two" already exists (SQLSTATE 42P07)' in failed.out
    with psycopg.connect(urls[broken], dbname=broken, autocommit=True) as conn:
        conn.execute("DROP TABLE two")
    again = estate.dbplan("apply", "--one-pass", str(path), "--yes")
    assert again.code == 0, again.output
    assert "Apply complete: 1 done, 11 skipped (already done by another run)." in again.out, again.out
    for name in urls:
        assert versions_applied(urls[name], name) == [(1, 1), (2, 1)], name


def test_one_pass_refuses_the_whole_plan_when_a_file_changed_and_changes_nothing(estate: Estate, pg_url2: str) -> None:
    path = saved_with_two(estate, pg_url2)
    urls = urls_by_database(estate, pg_url2)
    estate.write("tenant", "000002_two.up.sql", "CREATE TABLE two (id bigint);\n")
    run = estate.dbplan("apply", "--one-pass", str(path), "--yes")
    assert run.code == 1
    assert "the saved plan no longer matches; nothing was changed" in run.err
    assert "service 'tenant': migration 2 was edited" in run.err
    assert all("two" not in tables_in(url, name) for name, url in urls.items())


def test_one_pass_creates_the_databases_a_saved_plan_creates(estate: Estate, pg_url2: str) -> None:
    fleet(estate, pg_url2)
    path = estate.root.parent / "plan.json"
    assert estate.dbplan("plan", "--out", str(path)).code == 0
    run = estate.dbplan("apply", "--one-pass", str(path), "--yes", "--format", "json")
    assert run.code == 0, run.output
    result = json.loads(run.out)
    assert result["ok"] is True
    for name, url in urls_by_database(estate, pg_url2).items():
        assert tables_in(url, name) >= {"account", "schema_migrations", "dbplan_history"}, name


def test_one_pass_refuses_a_database_whose_history_alone_changed(estate: Estate, pg_url2: str) -> None:
    path = saved_with_two(estate, pg_url2)
    urls = urls_by_database(estate, pg_url2)
    forced = estate.name("t4")
    assert estate.dbplan("force", f"tenant[{forced}]", "1").code == 0  # same version, one more history row
    run = estate.dbplan("apply", "--one-pass", str(path), "--yes", "--keep-going")
    assert run.code == 1
    assert "(version 1 -> 1, its history differs: another apply ran?)" in run.out.replace("\n  ", " "), run.out
    assert "two" not in tables_in(urls[forced], forced)
    assert all("two" in tables_in(url, name) for name, url in urls.items() if name != forced)


def test_one_pass_refuses_a_saved_plan_edited_to_name_what_the_file_does_not(estate: Estate, pg_url2: str) -> None:
    path = saved_with_two(estate, pg_url2)
    saved = json.loads(path.read_text())
    saved["actions"][0]["service"] = "tenant[nowhere]"
    path.write_text(json.dumps(saved))
    run = estate.dbplan("apply", "--one-pass", str(path), "--yes")
    assert run.code == 1
    assert "internal error" not in run.output
    assert "the saved plan names service 'tenant[nowhere]', which the plan file does not declare; nothing was changed" in run.err
    assert all("two" not in tables_in(url, name) for name, url in urls_by_database(estate, pg_url2).items())


@pytest.mark.parametrize("one_pass", [False, True], ids=["checked-first", "one-pass"])
def test_a_plan_saved_before_the_fingerprint_held_the_tables_location_still_applies(
    estate: Estate, pg_url2: str, one_pass: bool
) -> None:
    path = saved_with_two(estate, pg_url2)
    saved = json.loads(path.read_text())
    for entry in saved["fingerprint"]["services"].values():
        del entry["schema"], entry["tables"]
    path.write_text(json.dumps(saved))
    run = estate.dbplan("apply", *(["--one-pass"] if one_pass else []), str(path), "--yes")
    assert run.code == 0, run.output
    assert all("two" in tables_in(url, name) for name, url in urls_by_database(estate, pg_url2).items())


def test_one_pass_needs_a_saved_plan(estate: Estate, pg_url2: str) -> None:
    fleet(estate, pg_url2)
    run = estate.dbplan("apply", "--one-pass", "--yes")
    assert run.code == 1
    assert "--one-pass applies a saved plan" in run.err
    assert "dbplan plan --out FILE" in run.err
    assert not estate.database_exists("t1")


def test_two_one_pass_applies_of_one_saved_plan_apply_each_migration_once(estate: Estate, pg_url2: str) -> None:
    from processes import finish, start_dbplan

    path = saved_with_two(estate, pg_url2)
    runs = [finish(p) for p in [start_dbplan(estate.plan_file, "apply", "--one-pass", str(path), "--yes") for _ in range(2)]]
    for run in runs:
        assert run.code == 0, run.err  # a database the other run did is where the plan ends: skipped
    urls = urls_by_database(estate, pg_url2)
    for name, url in urls.items():
        assert versions_applied(url, name) == [(1, 1), (2, 1)], name
    done = sum(int(n) for run in runs for n in re.findall(r"Apply complete: (\d+) done", run.out))
    assert done == COUNT, [run.out for run in runs]


# ---------------------------------------------------------------------------
# 10,000 databases, in memory


def synthetic(tmp_path: Path, count: int) -> tuple[Any, Any, Any, LiveState]:
    folder = tmp_path / "migrations" / "tenant"
    folder.mkdir(parents=True)
    for version, title in ((1, "init"), (2, "add_index")):
        (folder / f"{version:06d}_{title}.up.sql").write_text(f"CREATE TABLE t{version} (id int);\n")
    (tmp_path / "dbplan.yaml").write_text(
        "version: 1\n"
        "servers:\n  pg1: {url: 'postgresql://localhost:1/postgres'}\n  pg2: {url: 'postgresql://localhost:2/postgres'}\n"
        f"databases:\n  tenants:\n    set:\n      range: {{pattern: 'tenant_{{n}}', from: 1, to: {count}}}\n"
        "      servers: [pg1, pg2]\n      canary: '1%'\n"
        "services:\n  tenant: {database: tenants, migrations: migrations/tenant}\n"
    )
    estate = load(tmp_path / "dbplan.yaml")
    names = frozenset(estate.databases) | {"postgres"}
    live = LiveState(
        servers={s: ServerFacts(s, "16", "1", f"{s}:5432", names, frozenset({"postgres"})) for s in ("pg1", "pg2")},
        services={
            name: ServiceFacts(
                name, True, schema="public", table_exists=True, version=1 if index % 97 else 2, dirty=index == 5
            )
            for index, name in enumerate(estate.services)
        },
    )
    return estate, graph.build(estate), migrations.scan(estate), live


def test_the_markdown_of_10000_databases_fits_a_pull_request_comment(tmp_path: Path) -> None:
    estate, estate_graph, migration_sets, live = synthetic(tmp_path, 10_000)
    plan = make_plan(estate, estate_graph, migration_sets, live)
    shown = render_markdown_plan(plan, sql_for=lambda file: "CREATE TABLE t (id int);", graph=estate_graph)
    assert len(shown) < 65_536
    assert "10000 databases on 2 servers" in shown
    assert "stage 1: 100 canaries" in shown
    assert "**dirty** (1)" in shown and "**ahead** (" in shown
    as_text = text.render_plan(plan)
    assert len(as_text) < 65_536 and "tenant_6 (" in as_text  # the dirty one (index 5) is named


def test_the_fingerprint_of_2000_databases_is_cheap(tmp_path: Path) -> None:
    estate, _, migration_sets, live = synthetic(tmp_path, 2_000)
    started = time.perf_counter()
    printed = savedplan.fingerprint(estate, migration_sets, live)
    elapsed = time.perf_counter() - started
    print(f"fingerprint of 2,000 databases: {elapsed * 1000:.1f} ms, {len(json.dumps(printed))} bytes")
    assert list(printed["migrations"]) == ["tenant"]
    changed = json.loads(json.dumps(printed))
    for name in list(changed["services"])[:8]:
        changed["services"][name]["version"] = 7
    found = savedplan.differences(printed, changed)
    assert len(found) == 1 and "8 databases changed since" in found[0] and "and 3 more" in found[0]


def test_a_database_the_spread_would_move_blocks_instead_of_getting_an_empty_twin(estate: Estate, pg_url2: str) -> None:
    fleet(estate, pg_url2, {"range": {"pattern": estate.name("t{n}"), "from": 1, "to": COUNT}, "servers": ["main"]})
    assert estate.dbplan("apply", "--yes").code == 0
    estate.document["databases"]["tenants"]["set"]["servers"] = ["main", "second"]  # a server added
    estate.save()
    moved = [d.name for d in load(estate.plan_file).databases.values() if d.server == "second"]
    assert moved
    run = estate.dbplan("apply", "--yes")
    assert run.code == 1
    assert f"database '{moved[0]}' of set 'tenants' is placed on server 'second', but it exists on server 'main'" in run.out
    assert all(server_of(estate.url, pg_url2, name) == "main" for name in moved)  # no twin was created


def test_history_and_force_take_one_database_of_a_set(estate: Estate, pg_url2: str) -> None:
    fleet(estate, pg_url2)
    assert estate.dbplan("apply", "--yes").code == 0
    one = f"tenant[{estate.name('t4')}]"
    run = estate.dbplan("history", one)
    assert run.code == 0, run.output
    assert one in run.out and f"tenant[{estate.name('t5')}]" not in run.out
    assert estate.dbplan("force", one, "0", "--reason", "test").code == 0
    status = json.loads(estate.dbplan("status", "--format", "json").out)
    assert [s["current"] for s in status["services"] if s["service"] == one] == [0]
    every = estate.dbplan("history", "tenant")
    assert every.out.count("tenant[") >= COUNT


def test_status_shows_a_set_in_one_row_per_state_and_its_dirty_databases_by_name(estate: Estate, pg_url2: str) -> None:
    fleet(estate, pg_url2, {"range": {"pattern": estate.name("t{n}"), "from": 1, "to": COUNT}, "servers": ["main"]})
    assert estate.dbplan("apply", "--yes").code == 0
    estate.write("tenant", "000002_note.up.sql", "ALTER TABLE account ADD COLUMN note text;\n")
    dirty = estate.name("t3")
    with psycopg.connect(estate.url, dbname=dirty, autocommit=True) as conn:
        conn.execute("UPDATE schema_migrations SET dirty = true")

    run = estate.dbplan("status")
    rows = [line.split() for line in run.out.splitlines()]

    assert ["tenant", f"{COUNT - 1}", "of", f"{COUNT}", "databases", "1", "2", "1", "no", "-", "public.schema_migrations"] in rows
    assert [f"tenant[{dirty}]", dirty, "1", "2", "1", "yes", "-", "public.schema_migrations"] in rows
    assert len([row for row in rows if row and row[0].startswith("tenant")]) == 2, run.out
    every = json.loads(estate.dbplan("status", "--format", "json").out)["services"]
    assert len(every) == COUNT, "JSON still lists every database"


def test_new_adds_to_the_one_folder_of_a_service_over_a_set(estate: Estate, pg_url2: str) -> None:
    fleet(estate, pg_url2)
    run = estate.dbplan("new", "tenant", "add plan")
    assert run.code == 0, run.output
    assert (estate.root / "migrations" / "tenant" / "000002_add_plan.up.sql").exists()
    assert "1 service, 2 migrations" in estate.dbplan("validate").out


def test_an_environment_may_change_a_servers_parallel(estate: Estate, pg_url2: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet(estate, pg_url2)
    estate.document["environments"] = {"production": {"servers": {"second": {"parallel": 3}}}}
    estate.save()
    assert load(estate.plan_file).servers["second"].parallel is None
    monkeypatch.setenv("DBPLAN_ENV", "production")
    assert load(estate.plan_file).servers["second"].parallel == 3


def test_an_environment_may_copy_its_servers_new_databases_file_by_file(estate: Estate, pg_url2: str) -> None:
    """The README's overlay table lets an environment set create_strategy: the plan made
    for it says so, the plan without it does not."""
    fleet(estate, pg_url2)
    estate.document["environments"] = {"bootstrap": {"servers": {"second": {"create_strategy": "file_copy"}}}}
    estate.save()
    plain = estate.dbplan("plan")
    assert plain.code == 0, plain.output
    assert "copied file by file" not in plain.out
    bootstrap = estate.dbplan("--env", "bootstrap", "plan")
    assert bootstrap.code == 0, bootstrap.output
    on_second = sum(1 for name, database in load(estate.plan_file).databases.items() if database.server == "second")
    assert f"note: server second: {on_second} databases to create, copied file by file" in bootstrap.out, bootstrap.out
    assert "server main:" not in bootstrap.out


def test_a_discovered_name_on_two_servers_is_refused_and_nothing_runs(estate: Estate, pg_url2: str) -> None:
    fleet(estate, pg_url2, {"discover": estate.name("e") + "\\_%", "servers": ["main", "second"], "canary": 1})
    twin = estate.name("e_twin")
    for url in (estate.url, pg_url2):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{twin}"')
    run = estate.dbplan("apply", "--yes")
    assert run.code == 1
    assert f"database '{twin}' of discovered set 'tenants' is on server 'main' and on server 'second'" in run.err
    assert f"{estate.plan_file}:" in run.err
    for url in (estate.url, pg_url2):
        assert "account" not in tables_in(url, twin)


def test_a_dirty_database_of_a_set_is_named_with_what_to_do(estate: Estate, pg_url2: str) -> None:
    fleet(estate, pg_url2)
    assert estate.dbplan("apply", "--yes").code == 0
    estate.write("tenant", "000002_two.up.sql", "CREATE TABLE two (id int);\n")
    dirty = estate.name("t6")
    server = load(estate.plan_file).databases[dirty].server
    with psycopg.connect({"main": estate.url, "second": pg_url2}[server], dbname=dirty, autocommit=True) as conn:
        conn.execute("UPDATE schema_migrations SET version = 2, dirty = true")
    run = estate.dbplan("plan")
    assert run.code == 1
    assert f"{COUNT - 1} at 1 -> 2 (+ 2 two); 1 at 1, blocked" in run.out
    assert f"! dirty: 1 database\n      {dirty} ({server}) at 2" in run.out
    assert f"hint: fix the database by hand, then run 'dbplan force tenant[{dirty}] 2'" in run.out
    assert "Plan blocked: 1 problem must be fixed before apply." in run.out

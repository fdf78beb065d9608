"""The core promises of dbplan, end to end against a real PostgreSQL (issue: the core).

Each test drives the command line in-process and checks what a user would see: exit
codes, output, and what is in the database afterwards.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from estate import EXAMPLE_ACTIONS, REPO, Estate, example_estate, example_latest, example_migration_count


@pytest.fixture
def estate(tmp_path: Path, pg_any_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    """An estate on each PostgreSQL major at hand (the machine's and the wheel's)."""
    return Estate(tmp_path, pg_any_url, dbname_prefix, capsys)


def test_repository_example_validates_offline(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.cli import main

    monkeypatch.delenv("DATABASE_URL", raising=False)
    code = main(["validate", "-f", str(REPO / "dbplan.yaml")])
    out = capsys.readouterr().out
    assert code == 0
    assert "valid" in out and "2 services" in out


def test_plan_on_empty_server_lists_databases_then_migrations_in_dependency_order(estate: Estate) -> None:
    example_estate(estate)
    run = estate.dbplan("plan")
    assert run.code == 0, run.output
    lines = run.out.splitlines()

    def first_line(pattern: str) -> int:
        return next(i for i, line in enumerate(lines) if re.search(pattern, line))

    create_products = first_line(rf"\+ create database {estate.name('products')}")
    create_inventory = first_line(rf"\+ create database {estate.name('inventory')}")
    product_1 = first_line(r"\+ 1 init_schema")
    product_3 = first_line(r"\+ 3 product_search")
    inventory_1 = first_line(r"\+ 1 create_warehouses")
    assert create_products < create_inventory < product_1 < product_3 < inventory_1
    assert f"Plan: 2 roles to create, 2 databases to create, {example_migration_count()} migrations to apply." in run.out
    assert not estate.database_exists("products"), "plan must not change anything"


def test_apply_then_nothing_to_do_and_status_at_latest(estate: Estate) -> None:
    example_estate(estate)
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    assert f"Apply complete: {EXAMPLE_ACTIONS + example_migration_count()} done." in run.out
    assert {"products", "categories", "prices", "schema_migrations", "dbplan_history"} <= estate.tables("products")
    assert estate.query("products", "select version, dirty from schema_migrations") == [(example_latest("product"), False)]
    owner = estate.query("products", "select tableowner from pg_tables where tablename = 'products'")
    assert owner == [(estate.name("product_svc"),)], "migrations run as the database owner"

    again = estate.dbplan("plan", "--detailed-exitcode")
    assert again.code == 0, again.output
    assert "No changes." in again.out

    status = estate.dbplan("status")
    assert status.code == 0
    rows = {line.split()[0]: line.split() for line in status.out.splitlines()[1:] if line.strip()}
    for service in ("product", "inventory"):
        latest = str(example_latest(service))
        assert rows[service][2:6] == [latest, latest, "0", "no"]


def test_new_migration_is_exactly_one_pending_change(estate: Estate) -> None:
    example_estate(estate)
    assert estate.dbplan("apply", "--yes").code == 0
    estate.write("inventory", "000004_add_reorder_level.up.sql", "ALTER TABLE stock_levels ADD COLUMN reorder_level integer;")
    estate.write("inventory", "000004_add_reorder_level.down.sql", "ALTER TABLE stock_levels DROP COLUMN reorder_level;")

    run = estate.dbplan("plan", "--format", "json", "--detailed-exitcode")
    assert run.code == 2
    import json

    plan = json.loads(run.out)
    assert plan["summary"] == {"create_roles": 0, "alter_roles": 0, "create_databases": 0, "change_owners": 0, "apply": 1, "revert": 0}
    assert [(a["service"], a["version"]) for a in plan["actions"]] == [("inventory", 4)]

    assert estate.dbplan("apply", "--yes").code == 0
    columns = estate.query("inventory", "select column_name from information_schema.columns where table_name = 'stock_levels'")
    assert ("reorder_level",) in columns


def test_editing_an_applied_migration_shows_drift(estate: Estate) -> None:
    example_estate(estate)
    assert estate.dbplan("apply", "--yes").code == 0
    path = estate.root / "migrations" / "product" / "000002_add_prices.up.sql"
    path.write_text(path.read_text() + "\n-- edited after the fact\n")

    plan = estate.dbplan("plan")
    assert plan.code == 0
    assert "~ 2 changed after it was applied" in plan.out
    assert "000002_add_prices.up.sql" in plan.out
    status = estate.dbplan("status")
    product = next(line for line in status.out.splitlines() if line.startswith("product "))
    assert product.split()[6] == "2"  # the DRIFT column


def test_sql_error_stops_apply_names_file_line_and_sqlstate_and_leaves_no_trace(estate: Estate) -> None:
    estate.add_app()
    estate.write("app", "1_first.up.sql", "CREATE TABLE first (id int);")
    estate.write("app", "2_broken.up.sql", "CREATE TABLE half (id int);\n\nINSERT INTO half VALUES (1);\nINSERT INTO missing_table VALUES (1);\n")
    estate.write("app", "3_after.up.sql", "CREATE TABLE after (id int);")

    run = estate.dbplan("apply", "--yes")
    assert run.code == 1
    assert "2_broken.up.sql:4" in run.err
    assert 'relation "missing_table" does not exist' in run.err
    assert "42P01" in run.err
    tables = estate.tables("app")
    assert "first" in tables
    assert "half" not in tables and "after" not in tables
    assert estate.query("app", "select version, dirty from schema_migrations") == [(1, False)]
    assert estate.query("app", "select count(*) from dbplan_history where version = 2") == [(0,)]


def test_error_without_position_is_located_by_replay(estate: Estate) -> None:
    estate.add_app()
    estate.write(
        "app",
        "1_dupes.up.sql",
        "CREATE TABLE t (id int PRIMARY KEY);\nINSERT INTO t VALUES (1);\n\n\nINSERT INTO t VALUES (1);\n",
    )
    run = estate.dbplan("apply", "--yes")
    assert run.code == 1
    assert "1_dupes.up.sql:5" in run.err
    assert "23505" in run.err
    assert "t" not in estate.tables("app")


def test_failed_no_transaction_migration_leaves_dirty_until_forced(estate: Estate) -> None:
    estate.add_app()
    estate.write("app", "1_table.up.sql", "CREATE TABLE items (id int, sku text);\nINSERT INTO items VALUES (1, 'a'), (2, 'a');")
    estate.write(
        "app",
        "2_unique_sku.up.sql",
        "-- dbplan:no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY items_sku_idx ON items (sku);\n",
    )
    estate.write("app", "3_more.up.sql", "CREATE TABLE more (id int);")

    failed = estate.dbplan("apply", "--yes")
    assert failed.code == 1
    assert "2_unique_sku.up.sql:2" in failed.err
    assert "dirty" in failed.err
    assert estate.query("app", "select version, dirty from schema_migrations") == [(2, True)]

    plan = estate.dbplan("plan")
    assert plan.code == 1
    assert "dirty at version 2" in plan.out
    assert "invalid indexes left behind: public.items_sku_idx" in plan.out
    status = estate.dbplan("status")
    assert re.search(r"^app\s+\S+\s+\S+\s+3\s+\d+\s+yes", status.out, re.M), status.out

    refused = estate.dbplan("apply", "--yes")
    assert refused.code == 1
    assert "dbplan force app" in refused.output
    assert "more" not in estate.tables("app")

    # A person fixes the data and finishes the index by hand, then records it.
    estate.execute("app", "DROP INDEX items_sku_idx; UPDATE items SET sku = 'b' WHERE id = 2; CREATE UNIQUE INDEX items_sku_idx ON items (sku);")
    forced = estate.dbplan("force", "app", "2", "--reason", "index rebuilt by hand")
    assert forced.code == 0, forced.output
    # the failure's own row (where it failed, for the plan), then the force that cleared it
    assert estate.query("app", "select event, reason from dbplan_history where version = 2 order by id") == [
        (
            "fail",
            'failed at migrations/app/2_unique_sku.up.sql:2 after 0 of 1 statements, SQLSTATE 23505: could not create unique index "items_sku_idx"',
        ),
        ("force", "index rebuilt by hand"),
    ]
    # who forced it and when, too
    from orchestrator.execution.bookkeeping import applied_by

    assert estate.query(
        "app", "select applied_by, applied_at > now() - interval '1 minute' from dbplan_history where event = 'force'"
    ) == [(applied_by(), True)]

    resumed = estate.dbplan("apply", "--yes")
    assert resumed.code == 0, resumed.output
    assert "more" in estate.tables("app")
    assert estate.query("app", "select version, dirty from schema_migrations") == [(3, False)]


def test_golang_migrate_database_is_adopted(estate: Estate) -> None:
    estate.add_database("legacy")
    estate.add_service("legacy", "legacy")
    for version in range(1, 6):
        estate.write("legacy", f"{version:06d}_step{version}.up.sql", f"CREATE TABLE step{version} (id int);")
    assert estate.dbplan("apply", "--yes").code == 0  # creates the database and applies 1..5
    # Make it look like golang-migrate managed it up to version 3 and dbplan never ran.
    estate.execute("legacy", "DROP TABLE dbplan_history, step4, step5; UPDATE schema_migrations SET version = 3")

    run = estate.dbplan("plan", "--format", "json")
    import json

    plan = json.loads(run.out)
    assert [a["version"] for a in plan["actions"]] == [4, 5]
    assert plan["services"][0]["current"] == 3
    assert plan["services"][0]["drift"] == []

    assert estate.dbplan("apply", "--yes").code == 0
    assert estate.query("legacy", "select version, event from dbplan_history order by id") == [
        (3, "baseline"), (4, "apply"), (5, "apply")
    ]
    after = estate.dbplan("plan", "--detailed-exitcode")
    assert after.code == 0, after.output  # 1..3 stay adopted, not "out of order"

    estate.execute("legacy", "UPDATE schema_migrations SET dirty = true, version = 5")
    dirty = estate.dbplan("plan")
    assert dirty.code == 1
    assert "dirty at version 5" in dirty.out


def test_out_of_order_file_is_refused_unless_allowed(estate: Estate) -> None:
    folder = estate.add_app()
    estate.write("app", "1_a.up.sql", "CREATE TABLE a (id int);")
    estate.write("app", "3_c.up.sql", "CREATE TABLE c (id int);")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.write("app", "2_b_from_old_branch.up.sql", "CREATE TABLE b (id int);")

    refused = estate.dbplan("plan")
    assert refused.code == 1
    assert "2_b_from_old_branch.up.sql" in refused.out and "out of order" in refused.out
    assert estate.dbplan("apply", "--yes").code == 1
    assert "b" not in estate.tables("app")

    estate.document["services"]["app"]["allow_out_of_order"] = True
    estate.save()
    assert folder.exists()
    applied = estate.dbplan("apply", "--yes")
    assert applied.code == 0, applied.output
    assert "b" in estate.tables("app")
    assert estate.query("app", "select version from schema_migrations") == [(3,)]


def test_messy_real_world_files_all_apply(estate: Estate) -> None:
    estate.add_database("messy")
    estate.add_service("messy", "messy")
    estate.write("messy", "0001_wrapped.up.sql", "BEGIN;\nCREATE TABLE wrapped (id int);\nCOMMIT;\n")
    estate.write("messy", "000002_end_instead_of_commit.up.sql", "BEGIN;\nCREATE TABLE ended (id int);\nEND;\n")
    estate.write("messy", "03_empty.up.sql", "")
    estate.write("messy", "00004_comments_only.up.sql", "-- nothing to do yet\n/* really */\n")
    estate.write("messy", "10_sparse_extension.up.sql", "CREATE EXTENSION IF NOT EXISTS citext;\nCREATE TABLE people (email citext);")
    estate.write("messy", "00034_add_column_to_bookkeeping.up.sql", "ALTER TABLE schema_migrations ADD COLUMN note text DEFAULT 'x';")
    estate.write(
        "messy",
        "000035_function_with_semicolons.up.sql",
        "CREATE FUNCTION semi() RETURNS text LANGUAGE plpgsql AS $body$\nBEGIN\n  RETURN 'a;b';\nEND;\n$body$;\n"
        "CREATE FUNCTION atomic_add(a int, b int) RETURNS int LANGUAGE sql\nBEGIN ATOMIC\n  SELECT a + b;\nEND;\n",
    )
    estate.write("messy", "36_drop_that_column.up.sql", "ALTER TABLE schema_migrations DROP COLUMN note;")

    plan = estate.dbplan("plan")
    assert plan.code == 0, plan.output
    assert "own-transaction-folded" in plan.out  # how the BEGIN/COMMIT files will run is shown

    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    assert {"wrapped", "ended", "people"} <= estate.tables("messy")
    assert estate.query("messy", "select version, dirty from schema_migrations") == [(36, False)]
    events = estate.query("messy", "select version from dbplan_history where event = 'apply' order by version")
    assert [row[0] for row in events] == [1, 2, 3, 4, 10, 34, 35, 36]
    assert estate.query("messy", "select semi(), atomic_add(2, 3)") == [("a;b", 5)]


def test_wrapped_file_failure_rolls_back_everything_including_bookkeeping(estate: Estate) -> None:
    estate.add_app()
    estate.write("app", "1_wrapped.up.sql", "BEGIN;\nCREATE TABLE w (id int);\nSELECT 1/0;\nCOMMIT;\n")
    run = estate.dbplan("apply", "--yes")
    assert run.code == 1
    assert "1_wrapped.up.sql:3" in run.err
    assert "w" not in estate.tables("app")
    assert estate.query("app", "select count(*) from schema_migrations") == [(0,)]


def test_revert_to_target_uses_down_files(estate: Estate) -> None:
    estate.add_app()
    for version in (1, 2, 3):
        estate.write("app", f"{version}_t{version}.up.sql", f"CREATE TABLE t{version} (id int);")
        estate.write("app", f"{version}_t{version}.down.sql", f"DROP TABLE t{version};")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.document["services"]["app"]["target"] = 1
    estate.save()
    plan = estate.dbplan("plan")
    assert "- 3 t3" in plan.out and "- 2 t2" in plan.out
    assert plan.out.index("- 3 t3") < plan.out.index("- 2 t2")
    assert estate.dbplan("apply", "--yes").code == 0
    assert {"t1"} == estate.tables("app") - {"schema_migrations", "dbplan_history"}
    assert estate.query("app", "select version from schema_migrations") == [(1,)]

    estate.document["services"]["app"]["target"] = 0  # down to nothing: golang-migrate keeps no row then
    estate.save()
    assert estate.dbplan("apply", "--yes").code == 0
    assert estate.tables("app") == {"schema_migrations", "dbplan_history"}
    assert estate.query("app", "select version from schema_migrations") == []
    reverts = "select version from dbplan_history where event = 'revert' order by id"
    assert estate.query("app", reverts) == [(3,), (2,), (1,)]


def test_two_servers_in_one_plan(tmp_path: Path, pg_url: str, pg_url2: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    estate.add_server("replica_region", pg_url2)
    estate.add_database("eu", server="main")
    estate.add_database("us", server="replica_region")
    estate.add_service("eu", "eu")
    estate.add_service("us", "us", depends_on=["eu"])
    estate.write("eu", "1_t.up.sql", "CREATE TABLE eu_t (id int);")
    estate.write("us", "1_t.up.sql", "CREATE TABLE us_t (id int);")
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    import psycopg

    with psycopg.connect(pg_url2, dbname=estate.name("us")) as conn:
        assert conn.execute("select count(*) from us_t").fetchone() == (0,)
    assert "eu_t" in estate.tables("eu")


def test_warnings_name_file_line_statement_and_can_be_silenced(estate: Estate) -> None:
    import json

    estate.add_app()
    estate.write("app", "1_t.up.sql", "CREATE TABLE t (id int, old text);\nCREATE TABLE u (id int);")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.write("app", "2_cleanup.up.sql", "-- tidy up\nALTER TABLE t DROP COLUMN old;\nTRUNCATE u;\n")

    def rules() -> list[tuple[str, str, int, str]]:
        plan = json.loads(estate.dbplan("plan", "--format", "json").out)
        return [(w["rule"], w["file"], w.get("line"), w.get("statement")) for w in plan["warnings"] if w["rule"] != "missing-down"]

    assert rules() == [
        ("drop-column", "migrations/app/2_cleanup.up.sql", 2, "ALTER TABLE t DROP COLUMN old"),
        ("truncate", "migrations/app/2_cleanup.up.sql", 3, "TRUNCATE u"),
    ]
    estate.document["services"]["app"]["lint"] = {"allow": ["truncate"]}
    estate.save()
    assert [r[0] for r in rules()] == ["drop-column"]
    estate.write("app", "2_cleanup.up.sql", "-- dbplan:allow drop-column (nothing reads it since v2.3)\nALTER TABLE t DROP COLUMN old;\nTRUNCATE u;\n")
    assert rules() == []


def test_a_wrapped_file_keeps_the_options_of_its_own_begin(estate: Estate) -> None:
    estate.add_app()
    estate.write(
        "app",
        "1_serializable.up.sql",
        "BEGIN ISOLATION LEVEL SERIALIZABLE;\nCREATE TABLE seen AS SELECT current_setting('transaction_isolation') AS level;\nCOMMIT;\n",
    )
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    assert estate.query("app", "select level from seen") == [("serializable",)]
    assert estate.query("app", "select version, dirty from schema_migrations") == [(1, False)]

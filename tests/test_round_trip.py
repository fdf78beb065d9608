"""``dbplan test``: each migration's up, down and up again on a throwaway database, the
schema compared object by object; the real servers are never touched."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from estate import Estate, databases_named_like
from processes import start_dbplan


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    estate.add_role("owner")
    estate.add_database("app", owner="owner")
    estate.add_service("app", "app")
    return estate


def twins(url: str) -> list[str]:
    return databases_named_like(url, "dbplan\\_test\\_%")


def round_trip(estate: Estate, *args: str):  # noqa: ANN201 - CliRun
    return estate.dbplan("test", "--scratch-url", estate.url, *args)


def write_pair(estate: Estate, version: int, up: str, down: str | None) -> None:
    estate.write("app", f"{version}_step{version}.up.sql", up)
    if down is not None:
        estate.write("app", f"{version}_step{version}.down.sql", down)


def orders_table(estate: Estate) -> None:
    write_pair(
        estate,
        1,
        "CREATE TABLE orders (id bigint PRIMARY KEY, total numeric(10,2) NOT NULL DEFAULT 0);\n"
        "CREATE INDEX orders_total_idx ON orders (total);\n",
        "DROP TABLE orders;\n",
    )


def test_clean_round_trips_pass_and_leave_no_trace(estate: Estate) -> None:
    orders_table(estate)
    write_pair(estate, 2, "ALTER TABLE orders ADD COLUMN note text;\n", "ALTER TABLE orders DROP COLUMN note;\n")

    run = round_trip(estate)

    assert run.code == 0, run.output
    assert "service app  (database " + estate.name("app") + "): 2 of 2 migrations round-trip cleanly" in run.out
    assert "every down file restores the schema" in run.out
    assert not estate.database_exists("app"), "the plan file's own database was not touched"
    assert twins(estate.url) == []


def test_a_down_that_leaves_a_column_behind_is_named(estate: Estate) -> None:
    orders_table(estate)
    write_pair(estate, 2, "ALTER TABLE orders ADD COLUMN note text;\n", "SELECT 1;\n")

    run = round_trip(estate)

    assert run.code == 1
    assert "down of 2 leaves column orders.note" in run.out
    assert "✗ app 2 step2" in run.out
    assert twins(estate.url) == []


def test_a_down_that_drops_what_the_up_did_not_create_is_named(estate: Estate) -> None:
    orders_table(estate)
    write_pair(
        estate,
        2,
        "CREATE INDEX orders_id_total_idx ON orders (id, total);\n",
        "DROP INDEX orders_id_total_idx;\nDROP INDEX orders_total_idx;\n",
    )

    run = round_trip(estate)

    assert run.code == 1
    assert "down of 2 drops index orders_total_idx, which was there before the up" in run.out
    assert "orders_id_total_idx" not in run.out


def test_a_down_that_changes_a_column_says_from_what_to_what(estate: Estate) -> None:
    orders_table(estate)
    write_pair(
        estate,
        2,
        "ALTER TABLE orders ALTER COLUMN total TYPE numeric(12,2);\n",
        "ALTER TABLE orders ALTER COLUMN total TYPE numeric;\n",
    )

    run = round_trip(estate)

    assert run.code == 1
    assert "down of 2 changes column orders.total: numeric(10,2) not null default 0 -> numeric not null default 0" in run.out


@pytest.mark.parametrize(
    ("up", "down", "expected"),
    [
        ("CREATE TYPE mood AS ENUM ('sad', 'ok');\n", "SELECT 1;\n", "leaves type mood"),
        ("CREATE SCHEMA reporting;\n", "SELECT 1;\n", "leaves schema reporting"),
        ("CREATE VIEW big AS SELECT * FROM orders WHERE total > 100;\n", "SELECT 1;\n", "leaves view big"),
        ("CREATE FUNCTION twice(int) RETURNS int LANGUAGE sql AS 'SELECT $1 * 2';\n", "SELECT 1;\n", "leaves function twice(integer)"),
        ("CREATE SEQUENCE ticket_seq;\n", "SELECT 1;\n", "leaves sequence ticket_seq"),
        ("ALTER TABLE orders ADD CONSTRAINT positive CHECK (total >= 0);\n", "SELECT 1;\n", "leaves constraint orders.positive"),
        (
            "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';\n"
            "CREATE TRIGGER touch BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION touch();\n",
            "DROP FUNCTION touch() CASCADE;\nCREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';\n",
            "leaves function touch()",
        ),
        ("GRANT SELECT ON orders TO PUBLIC;\n", "SELECT 1;\n", "leaves grants on table orders ({"),
        ("ALTER TABLE orders ALTER COLUMN total DROP DEFAULT;\n", "SELECT 1;\n", "changes column orders.total"),
    ],
    ids=["enum", "schema", "view", "function", "sequence", "check", "trigger-function", "grant", "default"],
)
def test_every_kind_of_object_left_behind_is_found(estate: Estate, up: str, down: str, expected: str) -> None:
    orders_table(estate)
    write_pair(estate, 2, up, down)

    run = round_trip(estate)

    assert run.code == 1, run.output
    assert f"down of 2 {expected}" in run.out


def test_a_missing_down_is_reported_and_fails_only_when_required(estate: Estate) -> None:
    orders_table(estate)
    write_pair(estate, 2, "ALTER TABLE orders ADD COLUMN note text;\n", None)
    write_pair(estate, 3, "CREATE TABLE other (id int);\n", "DROP TABLE other;\n")

    relaxed = round_trip(estate)
    strict = round_trip(estate, "--require-down")

    assert relaxed.code == 0, relaxed.output
    assert "- app 2 step2: 2 has no down file" in relaxed.out
    assert "1 migration without a down file" in relaxed.out
    assert "2 of 3 migrations round-trip cleanly" in relaxed.out, "the one after it is still tested"
    assert strict.code == 1
    assert "(required)" in strict.out


def test_an_up_that_fails_names_file_line_and_sqlstate_and_stops_the_service(estate: Estate) -> None:
    orders_table(estate)
    write_pair(estate, 2, "SELECT 1;\nINSERT INTO missing_table VALUES (1);\n", "SELECT 1;\n")
    write_pair(estate, 3, "CREATE TABLE other (id int);\n", "DROP TABLE other;\n")

    run = round_trip(estate, "--format", "json")

    assert run.code == 1
    report = json.loads(run.out)
    (service,) = report["services"]
    statuses = [(m["version"], m["status"]) for m in service["migrations"]]
    assert statuses == [(1, "ok"), (2, "failed"), (3, "not-run")]
    (problem,) = service["migrations"][1]["problems"]
    assert problem.startswith("up of 2 fails: ")
    assert "migrations/app/2_step2.up.sql:2" in problem and "SQLSTATE 42P01" in problem
    assert report["ok"] is False
    assert report["summary"] == {"ok": 1, "failed": 1, "no-down": 0, "not-run": 1}
    assert report["server_version"]
    assert twins(estate.url) == []


def test_services_sharing_a_database_are_tested_in_dependency_order(estate: Estate) -> None:
    orders_table(estate)
    estate.add_service("billing", "app", table="billing_migrations", depends_on=["app"])
    estate.write("billing", "1_invoices.up.sql", "CREATE TABLE invoices (order_id bigint REFERENCES orders);\n")
    estate.write("billing", "1_invoices.down.sql", "DROP TABLE invoices;\n")

    run = round_trip(estate)

    assert run.code == 0, run.output
    assert run.out.index("service app ") < run.out.index("service billing ")


def test_ctrl_c_drops_the_throwaway_database(estate: Estate) -> None:
    orders_table(estate)
    write_pair(estate, 2, "SELECT pg_sleep(30);\n", "SELECT 1;\n")

    process = start_dbplan(estate.plan_file, "test", "--scratch-url", estate.url)
    process.wait_for("✓ app 1 step1")
    assert len(twins(estate.url)) == 1
    process.signal(signal.SIGINT)
    finished = process.finish(60)

    assert finished.code == 130, finished.err
    assert "Traceback" not in finished.err
    assert twins(estate.url) == []


def test_migrations_after_a_bad_down_are_still_tested(estate: Estate) -> None:
    orders_table(estate)
    write_pair(estate, 2, "ALTER TABLE orders ADD COLUMN note text;\n", "SELECT 1;\n")  # up cannot run twice
    write_pair(estate, 3, "CREATE INDEX orders_id_idx ON orders (id, total);\n", "DROP INDEX orders_total_idx;\n")

    run = round_trip(estate, "--format", "json")

    (service,) = json.loads(run.out)["services"]
    by_version = {m["version"]: m for m in service["migrations"]}
    assert by_version[2]["problems"][0] == "down of 2 leaves column orders.note"
    assert "does not apply again after its down" in by_version[2]["problems"][1]
    assert by_version[3]["status"] == "failed", "version 3 was tested on a fresh twin"
    assert by_version[3]["problems"][:2] == [
        "down of 3 leaves index orders_id_idx",
        "down of 3 drops index orders_total_idx, which was there before the up",
    ]
    assert twins(estate.url) == []


def test_a_set_of_databases_is_tested_once_not_once_per_database(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    names = [estate.name(f"tenant{n}") for n in range(1, 6)]
    estate.document["databases"] = {"tenants": {"set": {"names": names, "servers": ["main"]}}}
    estate.document["services"] = {"tenant": {"database": "tenants", "migrations": "migrations/tenant"}}
    estate.save()
    folder = estate.root / "migrations" / "tenant"
    folder.mkdir(parents=True)
    (folder / "1_items.up.sql").write_text("CREATE TABLE items (id int, note text);\n")
    (folder / "1_items.down.sql").write_text("ALTER TABLE items DROP COLUMN note;\n")  # leaves the table behind

    run = estate.dbplan("test", "--scratch-url", estate.url, "--format", "json")

    assert run.code == 1, run.output
    services = json.loads(run.out)["services"]
    assert [service["service"] for service in services] == [f"tenant[{names[0]}]"], "one database of the set is tested"
    assert "items" in run.out
    assert twins(estate.url) == []

"""``dbplan plan --verify``: the pending migrations run first on a throwaway copy of the live
schema (structure and bookkeeping, never data); the live database is never changed."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from estate import Estate, databases_named_like


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    estate.add_role("owner")
    estate.add_database("app", owner="owner")
    estate.add_service("app", "app")
    estate.write("app", "1_orders.up.sql", "CREATE TABLE orders (id bigint PRIMARY KEY, total numeric NOT NULL);\n")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.execute("app", "INSERT INTO orders VALUES (1, -5), (2, 10)")
    return estate


def copies(url: str) -> list[str]:
    return databases_named_like(url, "dbplan\\_verify\\_%")


def verify(estate: Estate, *args: str):  # noqa: ANN201 - CliRun
    return estate.dbplan("plan", "--verify", "--scratch-url", estate.url, *args)


def live_state(estate: Estate) -> tuple[object, ...]:
    return (
        estate.query("app", "SELECT version, dirty FROM schema_migrations"),
        sorted(estate.tables("app")),
        estate.query("app", "SELECT count(*) FROM dbplan_history"),
    )


def test_a_migration_that_fails_only_on_the_live_schema_fails_the_plan(estate: Estate) -> None:
    estate.execute("app", "CREATE TABLE audit (id int)")  # made by hand on the live database
    estate.write("app", "2_audit.up.sql", "SELECT 1;\nCREATE TABLE audit (id bigint, at timestamptz);\n")
    before = live_state(estate)

    run = verify(estate)

    assert run.code == 1, run.output
    assert "✗ app: cannot apply version 2 of service 'app': migrations/app/2_audit.up.sql:2:" in run.out
    assert 'relation "audit" already exists (SQLSTATE 42P07)' in run.out
    assert "nothing was changed on the live servers" in run.out
    assert live_state(estate) == before
    assert copies(estate.url) == []


def test_a_migration_that_runs_shows_the_schema_change_and_changes_nothing_live(estate: Estate) -> None:
    estate.write(
        "app",
        "2_note.up.sql",
        "ALTER TABLE orders ADD COLUMN note text;\nALTER TABLE orders ALTER COLUMN total TYPE numeric(12,2);\n"
        "CREATE INDEX orders_note_idx ON orders (note);\nDROP TABLE IF EXISTS nothing_here;\n",
    )
    before = live_state(estate)

    run = verify(estate)

    assert run.code == 0, run.output
    assert "✓ app: the pending migrations ran; 2 added, 1 changed" in run.out
    assert "+ column orders.note" in run.out
    assert "+ index orders_note_idx" in run.out
    assert "~ column orders.total: numeric not null -> numeric(12,2) not null" in run.out
    assert "Verify: every pending migration ran on the copy." in run.out
    assert live_state(estate) == before, "the live database is exactly as it was"
    assert copies(estate.url) == []


def test_only_the_structure_is_copied_never_the_data(estate: Estate) -> None:
    # The live rows break this constraint; the copy has no rows, so it passes there. That is
    # the promise (no data leaves the live server) and its limit, which the README states.
    estate.write("app", "2_positive.up.sql", "ALTER TABLE orders ADD CONSTRAINT positive CHECK (total > 0);\n")

    run = verify(estate, "--format", "json")

    assert run.code == 0, run.output
    verification = json.loads(run.out)["verification"]
    (service,) = verification["services"]
    assert service["ok"] is True
    assert service["changes"] == [
        {"change": "added", "kind": "constraint", "name": "orders.positive", "before": None, "after": "CHECK ((total > (0)::numeric))"}
    ]
    assert estate.query("app", "SELECT count(*) FROM orders") == [(2,)]


def test_the_bookkeeping_is_copied_so_only_pending_files_run(estate: Estate) -> None:
    # Version 1 is applied live; if the copy ran it again, CREATE TABLE orders would fail.
    estate.write("app", "2_more.up.sql", "CREATE TABLE more (id int);\n")

    run = verify(estate, "--format", "markdown")

    assert run.code == 0, run.output
    assert "### Dry run on a copy of the live schema" in run.out
    assert "<summary>✅ <b>app</b>: the pending migrations ran; 2 added</summary>" in run.out
    assert "+ table more" in run.out


def test_nothing_pending_means_nothing_to_run(estate: Estate) -> None:
    run = verify(estate)

    assert run.code == 0, run.output
    assert "Verify: nothing pending, nothing to run on a copy." in run.out


def test_without_a_scratch_url_the_copy_runs_on_an_embedded_server_of_the_live_major(
    tmp_path: Path, pg_any_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator.server.embedded import EmbeddedServer

    estate = Estate(tmp_path, pg_any_url, dbname_prefix, capsys)
    estate.add_role("owner")  # neither the role nor the database exists live yet
    estate.add_database("app", owner="owner")
    estate.add_service("app", "app")
    estate.write("app", "1_orders.up.sql", "CREATE TABLE orders (id int);\n")
    with psycopg.connect(pg_any_url) as conn:
        live_major = int(conn.execute("SHOW server_version_num").fetchone()[0]) // 10000
    try:
        run = estate.dbplan("plan", "--verify")

        assert run.code == 0, run.output
        assert f"server 'main': PostgreSQL {live_major} (the live server's own)" in run.out
        assert "+ table orders" in run.out
        assert not estate.database_exists("app"), "the database to create is created only on the copy"
        status = estate.dbplan("server", "status")
        assert f"server scratch-pg{live_major}: running" in status.out, status.output
        stopped = estate.dbplan("server", "stop")
        assert f"server scratch-pg{live_major}: stopped" in stopped.out, stopped.output
        with psycopg.connect(pg_any_url) as conn:
            assert conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (estate.name("owner"),)).fetchone() is None
    finally:
        data = tmp_path / ".dbplan" / f"scratch-pg{live_major}"
        if data.exists():
            EmbeddedServer(data).destroy()


def test_a_set_is_verified_once_per_starting_point_not_once_per_database(
    tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three tenants at version 1 run the same file on the same schema: one copy stands for
    them. A fourth, added to the set since, starts from nothing: it gets a copy of its own."""
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    names = [estate.name(f"tenant{n}") for n in range(1, 5)]
    estate.document["databases"] = {"tenants": {"set": {"names": names[:3], "servers": ["main"]}}}
    estate.document["services"] = {"tenant": {"database": "tenants", "migrations": "migrations/tenant"}}
    estate.save()
    estate.write("tenant", "1_items.up.sql", "CREATE TABLE items (id int);\n")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.document["databases"]["tenants"]["set"]["names"] = names
    estate.save()
    estate.write("tenant", "2_note.up.sql", "ALTER TABLE items ADD COLUMN note text;\n")

    run = estate.dbplan("plan", "--verify", "--scratch-url", estate.url, "--format", "json")
    text = estate.dbplan("plan", "--verify", "--scratch-url", estate.url)

    assert run.code == 0, run.output
    verified = json.loads(run.out)["verification"]["services"]
    assert [(s["service"], s["stands_for"], s["ok"]) for s in verified] == [
        (f"tenant[{names[0]}]", 3, True),
        (f"tenant[{names[3]}]", 1, True),
    ]
    assert f"✓ tenant[{names[0]}] (and 2 more databases of its set starting from the same version)" in text.out
    assert "+ column items.note" in text.out
    with psycopg.connect(estate.url) as conn:
        created = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (names[3],)).fetchone()
    assert created is None, "the plan created nothing"
    assert copies(estate.url) == []

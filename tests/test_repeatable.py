"""Flyway's repeatable migrations (R__description.sql): run after the versioned ones, the
first time and whenever their checksum changes, each in one transaction with its history row."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from estate import Estate

from orchestrator.estate.graph import build as build_graph
from orchestrator.estate.model import FORMAT_FLYWAY, Database, Server, Service
from orchestrator.estate.model import Estate as EstateModel
from orchestrator.execution.fleet import units_of
from orchestrator.live.facts import HistoryEntry, LiveState, ServerFacts, ServiceFacts
from orchestrator.migrations.scan import MigrationSet
from orchestrator.migrations.scan import scan as scan_migrations
from orchestrator.planning.plan import (
    ApplyRepeatable,
    Plan,
    action_from_dict,
    action_to_dict,
)
from orchestrator.planning.planner import make_plan

V1 = "CREATE TABLE accounts (id int PRIMARY KEY, name text);\n"
V2 = "ALTER TABLE accounts ADD COLUMN email text;\n"
VIEWS = "CREATE OR REPLACE VIEW account_names AS SELECT id, name FROM accounts;\n"
VIEWS_EDITED = "CREATE OR REPLACE VIEW account_names AS SELECT id, name, email FROM accounts;\n"


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    return Estate(tmp_path, pg_url, dbname_prefix, capsys)


def flyway_app(estate: Estate) -> Path:
    estate.add_database("app")
    folder = estate.add_service("app", "app", format="flyway")
    estate.write("app", "V1__accounts.sql", V1)
    estate.write("app", "V2__email.sql", V2)
    estate.write("app", "R__views.sql", VIEWS)
    return folder


def history(estate: Estate) -> list[tuple[object, ...]]:
    return estate.query("app", "SELECT version, event, title FROM dbplan_history ORDER BY id")


def view_columns(estate: Estate) -> list[str]:
    rows = estate.query(
        "app",
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'account_names' ORDER BY ordinal_position",
    )
    return [row[0] for row in rows]


def test_apply_runs_the_repeatable_after_the_versions_and_then_plans_nothing(estate: Estate) -> None:
    flyway_app(estate)

    plan = estate.dbplan("plan")
    applied = estate.dbplan("apply", "--yes")
    after = estate.dbplan("plan")

    assert plan.code == 0, plan.output
    assert "+ R__views.sql new repeatable: will run" in plan.out
    assert "1 repeatable migration to run" in plan.out
    assert applied.code == 0, applied.output
    assert history(estate) == [(1000000, "apply", "accounts"), (2000000, "apply", "email"), (2000000, "repeat", "views")]
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(2000000, False)]
    assert view_columns(estate) == ["id", "name"]
    assert after.code == 0, after.output
    assert "No changes" in after.out


def test_an_edited_repeatable_is_planned_and_run_again(estate: Estate) -> None:
    folder = flyway_app(estate)
    assert estate.dbplan("apply", "--yes").code == 0
    (folder / "R__views.sql").write_text(VIEWS_EDITED, encoding="utf-8")

    plan = estate.dbplan("plan")
    as_json = estate.dbplan("plan", "--format", "json")
    markdown = estate.dbplan("plan", "--format", "markdown")
    status = estate.dbplan("status")
    applied = estate.dbplan("apply", "--yes")

    assert "~ R__views.sql changed: will run again" in plan.out
    assert "0 +1 R__" in status.out, status.out
    assert json.loads(as_json.out)["services"][0]["repeatables"] == ["views"]
    (action,) = json.loads(as_json.out)["actions"]
    assert action["kind"] == "apply_repeatable" and action["title"] == "views" and action["version"] == 2000000
    assert action["previous_checksum"] is not None and action["previous_checksum"] != action["checksum"]
    assert "| run again | repeatable | `R__views.sql` | yes |" in markdown.out
    assert "SELECT id, name, email FROM accounts" in markdown.out  # the SQL a reviewer reads
    assert applied.code == 0, applied.output
    assert [row for row in history(estate) if row[1] == "repeat"] == [(2000000, "repeat", "views")] * 2
    checksums = estate.query("app", "SELECT checksum FROM dbplan_history WHERE event = 'repeat' ORDER BY id")
    assert checksums[0] != checksums[1]
    assert view_columns(estate) == ["id", "name", "email"]
    assert "No changes" in estate.dbplan("plan").out


def test_a_failing_repeatable_leaves_nothing_and_fails(estate: Estate) -> None:
    folder = flyway_app(estate)
    assert estate.dbplan("apply", "--yes").code == 0
    (folder / "R__views.sql").write_text(
        "CREATE OR REPLACE VIEW account_names AS SELECT id, name, email FROM accounts;\n"
        "CREATE VIEW broken AS SELECT no_such_column FROM accounts;\n",
        encoding="utf-8",
    )

    applied = estate.dbplan("apply", "--yes")

    assert applied.code == 1, applied.output
    assert "R__views.sql" in applied.output and "no_such_column" in applied.output
    assert "cannot run repeatable 'views' of service 'app'" in applied.err
    assert view_columns(estate) == ["id", "name"]  # the first statement was rolled back too
    assert [row for row in history(estate) if row[1] == "repeat"] == [(2000000, "repeat", "views")]
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(2000000, False)]
    assert "~ R__views.sql changed: will run again" in estate.dbplan("plan").out


def test_repeatables_run_in_order_of_description_after_new_versions(estate: Estate) -> None:
    folder = flyway_app(estate)
    estate.write("app", "R__a_first.sql", "CREATE TABLE ran (what text);\n")
    estate.write("app", "R__b_second.sql", "INSERT INTO ran VALUES ('b');\n")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.write("app", "V3__more.sql", "ALTER TABLE accounts ADD COLUMN phone text;\n")
    (folder / "R__b_second.sql").write_text("INSERT INTO ran VALUES ('b again');\n", encoding="utf-8")

    applied = estate.dbplan("apply", "--yes")

    assert applied.code == 0, applied.output
    assert [row[2] for row in history(estate)][:5] == ["accounts", "email", "a_first", "b_second", "views"]
    assert history(estate)[5:] == [(3000000, "apply", "more"), (3000000, "repeat", "b_second")]
    assert estate.query("app", "SELECT what FROM ran") == [("b",), ("b again",)]


def test_a_saved_plan_with_a_repeatable_applies(estate: Estate, tmp_path: Path) -> None:
    flyway_app(estate)
    saved = tmp_path / "plan.json"

    planned = estate.dbplan("plan", "--out", str(saved))
    applied = estate.dbplan("apply", str(saved), "--yes")

    assert planned.code == 0, planned.output
    assert applied.code == 0, applied.output
    assert history(estate)[-1] == (2000000, "repeat", "views")


def test_a_no_transaction_repeatable_is_a_located_error(estate: Estate) -> None:
    flyway_app(estate)
    estate.write("app", "R__index.sql", "-- dbplan:no-transaction\nCREATE INDEX CONCURRENTLY a_name ON accounts (name);\n")

    run = estate.dbplan("validate")

    assert run.code != 0
    assert "migrations/app/R__index.sql" in run.err and "outside one transaction" in run.err
    assert not estate.database_exists("app")


# -- the planner, pure: no server ------------------------------------------------------------


def pure_world(root: Path) -> tuple[EstateModel, dict[str, MigrationSet]]:
    folder = root / "migrations" / "app"
    folder.mkdir(parents=True)
    for name, text in {"V1__accounts.sql": V1, "V2__email.sql": V2, "R__views.sql": VIEWS}.items():
        (folder / name).write_text(text, encoding="utf-8")
    service = Service("app", "app", folder, "migrations/app", format=FORMAT_FLYWAY)
    estate = EstateModel(
        file=root / "dbplan.yaml",
        root=root,
        servers={"main": Server("main", "postgresql://postgres@localhost/postgres", embedded=None)},
        roles={},
        databases={"app": Database("app", "main")},
        services={"app": service},
    )
    return estate, scan_migrations(estate)


def pure_plan(estate: EstateModel, sets: dict[str, MigrationSet], facts: ServiceFacts) -> Plan:
    server = ServerFacts("main", "15.4", None, "127.0.0.1:5432", frozenset({"postgres", "app"}), frozenset({"postgres"}))
    return make_plan(estate, build_graph(estate), sets, LiveState({"main": server}, {"app": facts}))


def at_version_2(sets: dict[str, MigrationSet], **changes: object) -> ServiceFacts:
    migrations = sets["app"].migrations
    history = tuple(HistoryEntry(m.version, "apply", m.up.checksum, m.title, i) for i, m in enumerate(migrations, 1))
    facts = ServiceFacts("app", True, "public", True, True, 2000000, history=history, history_count=3)
    return replace(facts, **changes)  # type: ignore[arg-type]


def test_a_repeatable_recorded_with_its_checksum_is_not_planned(tmp_path: Path) -> None:
    estate, sets = pure_world(tmp_path)
    checksum = sets["app"].repeatables[0].file.checksum

    unchanged = pure_plan(estate, sets, at_version_2(sets, repeatables={"views": checksum}))
    changed = pure_plan(estate, sets, at_version_2(sets, repeatables={"views": "0" * 64}))

    assert unchanged.actions == ()
    assert changed.actions == (
        ApplyRepeatable("app", "app", 2000000, "views", "migrations/app/R__views.sql", checksum, "0" * 64),
    )
    assert changed.summary()["repeat"] == 1


def test_a_blocked_service_runs_no_repeatable(tmp_path: Path) -> None:
    estate, sets = pure_world(tmp_path)

    dirty = pure_plan(estate, sets, at_version_2(sets, dirty=True))

    assert dirty.blocked
    assert not any(isinstance(action, ApplyRepeatable) for action in dirty.actions)


def test_repeatables_follow_the_services_new_versions_and_round_trip_through_json(tmp_path: Path) -> None:
    estate, sets = pure_world(tmp_path)

    plan = pure_plan(estate, sets, ServiceFacts("app", True, "public"))

    kinds = [action.kind for action in plan.actions]
    assert kinds == ["apply_migration", "apply_migration", "apply_repeatable"]
    repeat = plan.actions[-1]
    assert isinstance(repeat, ApplyRepeatable) and repeat.version == 2000000 and repeat.previous_checksum is None
    assert tuple(action_from_dict(json.loads(json.dumps(action_to_dict(a)))) for a in plan.actions) == plan.actions
    (unit,) = [unit for unit in units_of(plan, estate) if unit.service == "app"]  # one lock for all three
    assert unit.actions == list(plan.actions)


def test_a_repeatable_to_run_is_linted_and_refused_as_any_file(tmp_path: Path) -> None:
    estate, _ = pure_world(tmp_path)
    folder = tmp_path / "migrations" / "app"
    (folder / "R__cleanup.sql").write_text("DROP TABLE accounts;\n", encoding="utf-8")
    (folder / "R__index.sql").write_text("CREATE INDEX CONCURRENTLY a_name ON accounts (name);\n", encoding="utf-8")
    sets = scan_migrations(estate)

    plan = pure_plan(estate, sets, at_version_2(sets))

    assert plan.blocked
    assert any(b.file == "migrations/app/R__index.sql" and "CONCURRENTLY" in b.message for b in plan.blockers)
    assert any(w.file == "migrations/app/R__cleanup.sql" and w.severity == "destructive" for w in plan.warnings)


def test_dbplan_lint_reads_the_repeatable_files_too(estate: Estate) -> None:
    flyway_app(estate)
    estate.write("app", "R__cleanup.sql", "SELECT 1;\nDROP TABLE accounts;\n")

    run = estate.dbplan("lint")

    assert run.code == 1, run.output
    assert "migrations/app/R__cleanup.sql:2: drop-table (destructive)" in run.out, run.out
    assert "4 files linted" in run.out

"""Bad input gets a clear error that names the place, exit code 1, and changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from estate import Estate


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    estate.add_database("app")
    estate.add_database("other")
    estate.add_service("app", "app")
    estate.add_service("other", "other", depends_on=["app"])
    estate.write("app", "1_one.up.sql", "CREATE TABLE one (id int);")
    estate.write("other", "1_one.up.sql", "CREATE TABLE one (id int);")
    return estate


def _text(estate: Estate, text: str) -> None:
    estate.plan_file.write_text(text)


def _edit(estate: Estate, old: str, new: str) -> None:
    text = estate.plan_file.read_text()
    assert old in text, f"{old!r} not in plan file"
    estate.plan_file.write_text(text.replace(old, new, 1))


CASES: dict[str, tuple[Callable[[Estate], object], list[str]]] = {
    "missing plan file": (lambda e: e.plan_file.unlink(), ["dbplan.yaml not found"]),
    "invalid yaml": (lambda e: _edit(e, "services:", "services: [\n"), ["invalid YAML", "dbplan.yaml:"]),
    "wrong type": (lambda e: _edit(e, "version: 1", "version: one"), ["version", "dbplan.yaml:1:"]),
    "unknown key": (lambda e: _edit(e, "  app:\n    database", "  app:\n    databse: x\n    database"), ["unknown key 'databse'", "did you mean 'database'?"]),
    "unknown database": (
        lambda e: _edit(e, f"database: {e.prefix}_other", f"database: {e.prefix}_othre"),
        ["unknown database", "did you mean"],
    ),
    "cycle": (lambda e: (e.document["services"]["app"].update(depends_on=["other"]), e.save()), ["cycle", "app -> other -> app"]),
    "missing folder": (lambda e: (e.document["services"]["app"].update(migrations="migrations/nope"), e.save()), ["migrations/nope", "does not exist", "services.app.migrations"]),
    "malformed file name": (lambda e: e.write("app", "one.up.sql", "select 1"), ["cannot read the migration file name 'one.up.sql'"]),
    "duplicate versions": (lambda e: e.write("app", "001_again.up.sql", "select 1"), ["two up files for version 1"]),
    # An unset url or password waits for a command that connects: test_lifecycle.py.
    "unset variable": (lambda e: (e.document["services"]["app"].update(migrations="${NO_SUCH_VARIABLE_X}"), e.save()), ["NO_SUCH_VARIABLE_X is not set", "services.app.migrations"]),
}


@pytest.mark.parametrize("case", list(CASES), ids=[c.replace(" ", "-") for c in CASES])
@pytest.mark.parametrize("command", ["validate", "plan", "apply"])
def test_bad_input_is_named_and_changes_nothing(estate: Estate, case: str, command: str) -> None:
    break_it, expected = CASES[case]
    break_it(estate)
    run = estate.dbplan(command, *(["--yes"] if command == "apply" else []))
    assert run.code == 1, run.output
    assert run.err.startswith("error: ")
    for fragment in expected:
        assert fragment in run.err, f"{fragment!r} not in {run.err!r}"
    assert "Traceback" not in run.output
    assert not estate.database_exists("app")


def test_unreachable_server_names_the_server_never_the_password(estate: Estate) -> None:
    estate.document["servers"]["main"]["url"] = "postgresql://admin:hunter2-secret@127.0.0.1:1/postgres"
    estate.save()
    run = estate.dbplan("plan")
    assert run.code == 1
    assert "cannot connect to server 'main'" in run.err
    assert "hunter2-secret" not in run.output
    assert "(database 'postgres', host 127.0.0.1, port 1)" in run.err


@pytest.mark.parametrize("command", ["plan", "apply"])
def test_a_target_above_the_newest_file_blocks_the_plan_and_changes_nothing(estate: Estate, command: str) -> None:
    estate.document["services"]["app"]["target"] = 7
    estate.save()
    run = estate.dbplan(command, *(["--yes"] if command == "apply" else []))
    assert run.code == 1, run.output
    assert "target 7 of service 'app' names no migration: the newest file in migrations/app is version 1" in run.output
    assert "Plan blocked: 1 problem must be fixed before apply." in run.out
    assert not estate.database_exists("app")

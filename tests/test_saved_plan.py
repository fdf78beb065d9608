"""Saved plans: `dbplan apply plan.json` runs exactly what was reviewed, or nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from estate import Estate


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    estate = Estate(tmp_path / "repo", pg_url, dbname_prefix, capsys)
    estate.root.mkdir()
    estate.add_app()
    estate.write("app", "1_one.up.sql", "CREATE TABLE one (id int);")
    estate.write("app", "2_two.up.sql", "CREATE TABLE two (id int);")
    return estate


def save_plan(estate: Estate) -> Path:
    path = estate.root.parent / "plan.json"
    run = estate.dbplan("plan", "--out", str(path))
    assert run.code == 0, run.output
    return path


def test_saved_plan_applies_exactly_its_actions(estate: Estate) -> None:
    path = save_plan(estate)
    saved = json.loads(path.read_text())
    assert [a["kind"] for a in saved["actions"]] == ["create_database", "apply_migration", "apply_migration"]
    run = estate.dbplan("apply", str(path), "--yes")
    assert run.code == 0, run.output
    assert {"one", "two"} <= estate.tables("app")


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda e: e.write("app", "3_three.up.sql", "CREATE TABLE three (id int);"), "new migration 3"),
        (lambda e: e.write("app", "2_two.up.sql", "CREATE TABLE two (id bigint);"), "migration 2 was edited"),
        (lambda e: (e.document["services"]["app"].update(target=1), e.save()), "the plan file changed"),
    ],
    ids=["new-migration", "edited-file", "plan-file"],
)
def test_saved_plan_refuses_changed_inputs_and_changes_nothing(estate: Estate, change, expected: str) -> None:  # type: ignore[no-untyped-def]
    path = save_plan(estate)
    change(estate)
    run = estate.dbplan("apply", str(path), "--yes")
    assert run.code == 1
    assert expected in run.err
    assert "nothing was changed" in run.err
    assert not estate.database_exists("app")


def test_saved_plan_refuses_after_a_concurrent_apply(estate: Estate) -> None:
    assert estate.dbplan("apply", "--yes").code == 0  # the database exists now
    estate.write("app", "3_three.up.sql", "CREATE TABLE three (id int);")
    path = save_plan(estate)
    assert estate.dbplan("apply", "--yes").code == 0  # someone else applied meanwhile
    run = estate.dbplan("apply", str(path), "--yes")
    assert run.code == 1
    assert "service 'app' changed in its database since (version 2 -> 3)" in run.err


def test_saved_plan_refuses_a_different_server(
    tmp_path: Path, pg_url: str, pg_url2: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    estate.document["servers"]["main"]["url"] = "${TARGET_URL}"
    estate.add_app()
    estate.write("app", "1_one.up.sql", "CREATE TABLE one (id int);")
    monkeypatch.setenv("TARGET_URL", pg_url)  # "staging"
    path = tmp_path / "plan.json"
    assert estate.dbplan("plan", "--out", str(path)).code == 0
    monkeypatch.setenv("TARGET_URL", pg_url2)  # "production"
    run = estate.dbplan("apply", str(path), "--yes")
    assert run.code == 1
    assert "server 'main' is a different server than the plan was made against" in run.err


def test_a_saved_plan_holds_no_secret(
    tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    estate.add_role("svc", password="role-secret-3141")
    estate.add_database("app", owner="svc")
    estate.add_service("app", "app")
    estate.write("app", "1_one.up.sql", "CREATE TABLE one (id int);")
    path = tmp_path / "plan.json"
    run = estate.dbplan("plan", "--out", str(path))
    assert run.code == 0
    assert "role-secret-3141" not in path.read_text()
    assert "role-secret-3141" not in run.output
    assert json.loads(path.read_text())["actions"][0] == {
        "kind": "create_role", "server": "main", "role": estate.name("svc"), "login": True, "with_password": True
    }


def test_not_a_saved_plan_is_a_clear_error(estate: Estate) -> None:
    bogus = estate.root / "bogus.json"
    bogus.write_text('{"hello": 1}')
    run = estate.dbplan("apply", str(bogus), "--yes")
    assert run.code == 1
    assert "is not a saved dbplan plan" in run.err



@pytest.mark.parametrize(
    "where, reason",
    [
        ("missing/plan.json", "No such file or directory"),
        (".", "Is a directory"),
        ("dbplan.yaml/plan.json", "Not a directory"),
    ],
)
def test_a_plan_that_cannot_be_saved_is_a_clear_error(estate: Estate, where: str, reason: str) -> None:
    run = estate.dbplan("plan", "--out", str(estate.root / where))
    assert run.code == 1
    assert f"cannot save the plan to {estate.root / where}: {reason}" in run.err
    assert "hint: --out takes the path of a file" in run.err
    assert "internal error" not in run.output and "Traceback" not in run.output

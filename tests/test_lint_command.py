"""`dbplan lint`: every rule that needs no server, on migration files, with no server and no
secrets; the exit code follows --fail-on; the pre-commit hook runs it (tested with pre-commit)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from estate import REPO

# url and password from variables that are not set: lint must not need them.
PLAN: dict[str, Any] = {
    "version": 1,
    "servers": {"main": {"url": "${LINT_TEST_UNSET_URL}"}},
    "roles": {"app_svc": {"server": "main", "login": True, "password": "${LINT_TEST_UNSET_PASSWORD}"}},
    "databases": {"app": {"server": "main", "owner": "app_svc"}, "billing": {"server": "main"}},
    "services": {
        "app": {"database": "app", "migrations": "db/app"},
        "billing": {"database": "billing", "migrations": "db/billing", "lint": {"allow": ["drop-column"]}},
    },
}

CLEAN_UP = "CREATE TABLE accounts (id bigint PRIMARY KEY, name text NOT NULL);\n"
CLEAN_DOWN = "DROP TABLE accounts;\n"


def make_repo(root: Path, files: dict[str, str] | None = None) -> Path:
    """A plan file with two services (app, billing) and a clean first migration in each."""
    for var in ("LINT_TEST_UNSET_URL", "LINT_TEST_UNSET_PASSWORD"):
        assert var not in os.environ
    (root / "dbplan.yaml").write_text(yaml.safe_dump(PLAN, sort_keys=False))
    for service in ("app", "billing"):
        folder = root / "db" / service
        folder.mkdir(parents=True)
        (folder / "000001_init.up.sql").write_text(CLEAN_UP)
        (folder / "000001_init.down.sql").write_text(CLEAN_DOWN)
    for name, text in (files or {}).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def lint(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DBPLAN_ENV")}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "lint", *args], cwd=root, capture_output=True, text=True, env=env, check=False
    )


def lint_json(root: Path, *args: str) -> tuple[int, dict[str, Any]]:
    run = lint(root, "--format", "json", *args)
    return run.returncode, json.loads(run.stdout)


DROP_COLUMN = "ALTER TABLE accounts ADD COLUMN note text;\n\nALTER TABLE accounts DROP COLUMN name;\n"


def test_a_destructive_up_file_fails_with_file_line_rule_and_statement(tmp_path: Path) -> None:
    root = make_repo(tmp_path, {"db/app/000002_drop_name.up.sql": DROP_COLUMN, "db/app/000002_drop_name.down.sql": ""})
    run = lint(root)
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    at = lines.index(
        "db/app/000002_drop_name.up.sql:3: drop-column (destructive): DROP COLUMN deletes accounts.name and its "
        "data for good; deploy code that no longer reads or writes it before this migration runs."
    )
    assert lines[at + 1] == "    ALTER TABLE accounts DROP COLUMN name"
    assert lines[-1] == "6 files linted: 1 destructive, 2 notice; 1 at or above locking"
    assert run.stderr == ""


def test_unset_url_and_password_variables_do_not_matter(tmp_path: Path) -> None:
    root = make_repo(tmp_path)
    run = lint(root)
    assert (run.returncode, run.stderr) == (0, ""), run.stdout + run.stderr
    assert run.stdout.splitlines()[-1] == "4 files linted: 2 notice; none at or above locking"
    # The same file stops a command that connects, before it connects.
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    plan = subprocess.run(
        [sys.executable, "-m", "orchestrator", "plan"], cwd=root, capture_output=True, text=True, env=env, check=False
    )
    assert plan.returncode == 1 and "LINT_TEST_UNSET_URL" in plan.stderr


def test_the_clean_example_of_the_repository_passes(tmp_path: Path) -> None:
    shutil.copy(REPO / "dbplan.yaml", tmp_path / "dbplan.yaml")
    shutil.copytree(REPO / "migrations", tmp_path / "migrations")
    run = lint(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    # Its down files drop what their up files made: shown as notices, not failures.
    assert "migrations/product/000001_init_schema.down.sql:1: drop-table (notice): when reverted: DROP TABLE" in run.stdout
    assert run.stdout.splitlines()[-1] == "14 files linted: 7 notice; none at or above locking"


def test_fail_on_chooses_the_level(tmp_path: Path) -> None:
    index = "CREATE INDEX accounts_name ON accounts (name);\n"
    root = make_repo(tmp_path, {"db/app/000002_index.up.sql": index, "db/app/000002_index.down.sql": "DROP INDEX accounts_name;\n"})
    assert lint(root).returncode == 1  # default: locking and above
    assert lint(root, "--fail-on", "destructive").returncode == 0
    assert lint(root, "--fail-on", "error").returncode == 0
    (root / "db/app/000002_index.down.sql").unlink()
    assert lint(root, "--fail-on", "destructive").returncode == 0
    notice = lint(root, "--fail-on", "notice")
    assert notice.returncode == 1
    assert "db/app/000002_index.up.sql: missing-down (notice): has no down file: it cannot be reverted" in notice.stdout
    never = lint(root, "--fail-on", "never")
    assert never.returncode == 0
    assert "create-index-not-concurrently (locking)" in never.stdout
    assert never.stdout.splitlines()[-1] == "5 files linted: 1 locking, 3 notice"
    bad = lint(root, "--fail-on", "loud")
    assert bad.returncode == 1 and "loud" in bad.stderr


@pytest.mark.parametrize(
    ("sql", "rule", "line"),
    [
        ("SELECT 1;\nCOPY accounts TO STDOUT;\n", "copy-to-stdout", 2),
        ("SELECT 1;\nSET standard_conforming_strings = off;\n", "reading-setting", 2),
        ("-- dbplan:allow drop-colum\nSELECT 1;\n", "unknown-rule", 1),
        ("CREATE TABLE t (id int);\nCREATE TABLE (;\n", "parse-error", 2),
        ("CREATE INDEX CONCURRENTLY accounts_name ON accounts (name);\n", "non-transactional-statement", 1),
    ],
)
def test_what_plan_would_block_is_an_error_whatever_the_level(tmp_path: Path, sql: str, rule: str, line: int) -> None:
    root = make_repo(tmp_path, {"db/app/000002_bad.up.sql": sql, "db/app/000002_bad.down.sql": ""})
    code, report = lint_json(root, "--fail-on", "error")
    assert code == 1
    errors = [f for f in report["findings"] if f["severity"] == "error"]
    assert [(f["file"], f["line"], f["rule"]) for f in errors] == [("db/app/000002_bad.up.sql", line, rule)]
    assert errors[0]["hint"] and errors[0]["fails"] is True
    assert lint(root, "--fail-on", "never").returncode == 0


def test_json_is_one_object_with_every_finding(tmp_path: Path) -> None:
    root = make_repo(tmp_path, {"db/app/000002_drop_name.up.sql": DROP_COLUMN})
    code, report = lint_json(root)
    assert code == 1
    assert report["ok"] is False and report["fail_on"] == "locking"
    assert report["summary"] == {"error": 0, "destructive": 1, "locking": 0, "notice": 3}
    assert len(report["files"]) == 5
    drop = next(f for f in report["findings"] if f["rule"] == "drop-column")
    assert drop == {
        "file": "db/app/000002_drop_name.up.sql",
        "line": 3,
        "rule": "drop-column",
        "severity": "destructive",
        "lock": "ACCESS EXCLUSIVE",
        "message": drop["message"],
        "statement": "ALTER TABLE accounts DROP COLUMN name",
        "hint": None,
        "service": "app",
        "fails": True,
    }
    assert drop["message"].startswith("DROP COLUMN deletes accounts.name")
    assert {f["rule"] for f in report["findings"] if f["severity"] == "notice"} == {"drop-table", "missing-down"}
    code, clean = lint_json(root, "db/billing/000001_init.up.sql")
    assert (code, clean["ok"], clean["findings"], clean["files"]) == (0, True, [], ["db/billing/000001_init.up.sql"])


def test_only_the_files_named_each_with_its_services_rules(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            "db/app/000002_drop_name.up.sql": DROP_COLUMN,
            "db/billing/000002_drop_name.up.sql": DROP_COLUMN,  # billing allows drop-column
            "scripts/cleanup.sql": "DROP TABLE accounts;\n",  # in no migration folder: ignored
        },
    )
    code, report = lint_json(root, "db/billing/000002_drop_name.up.sql", "scripts/cleanup.sql", "README.md")
    assert report["files"] == ["db/billing/000002_drop_name.up.sql"]
    assert code == 0 and [f["rule"] for f in report["findings"]] == ["missing-down"]
    code, report = lint_json(root, str(root / "db/app/000002_drop_name.up.sql"), "db/billing/000002_drop_name.up.sql")
    assert code == 1
    assert [(f["service"], f["rule"]) for f in report["findings"]] == [
        ("app", "missing-down"),
        ("app", "drop-column"),
        ("billing", "missing-down"),
    ]
    code, report = lint_json(root, "scripts/cleanup.sql")
    assert (code, report["files"]) == (0, [])


def test_an_allow_comment_silences_a_rule(tmp_path: Path) -> None:
    allowed = "-- dbplan:allow drop-column\n" + DROP_COLUMN
    root = make_repo(tmp_path, {"db/app/000002_drop_name.up.sql": allowed, "db/app/000002_drop_name.down.sql": ""})
    run = lint(root)
    assert run.returncode == 0, run.stdout
    assert "drop-column" not in run.stdout


def test_names_and_sql_from_files_are_escaped(tmp_path: Path) -> None:
    evil = 'ALTER TABLE "acc\x1b[2Jounts" DROP COLUMN "na\u202eme";\n'
    root = make_repo(tmp_path, {"db/app/000002_evil.up.sql": evil, "db/app/000002_evil.down.sql": ""})
    run = lint(root)
    assert run.returncode == 1
    assert "\x1b" not in run.stdout and "\u202e" not in run.stdout
    assert "acc\\x1b[2Jounts.na\\u202eme" in run.stdout
    code, report = lint_json(root)
    drop = next(f for f in report["findings"] if f["rule"] == "drop-column")
    assert code == 1
    assert "\x1b" not in drop["message"] + drop["statement"] and "\\x1b" in drop["statement"]


def test_a_bad_plan_file_or_migration_name_is_an_error(tmp_path: Path) -> None:
    root = make_repo(tmp_path, {"db/app/2_no_direction.sql": "SELECT 1;\n"})
    run = lint(root)
    assert run.returncode == 1
    assert "cannot read the migration file name '2_no_direction.sql'" in run.stderr
    missing = lint(tmp_path / "db")
    assert missing.returncode == 1 and "dbplan.yaml" in missing.stderr


def git(root: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}  # fmt: skip
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True, env=env).stdout


def test_since_lints_only_what_changed_since_a_revision(tmp_path: Path) -> None:
    root = make_repo(tmp_path, {"db/app/000002_old.up.sql": "TRUNCATE accounts;\n", "db/app/000002_old.down.sql": ""})
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-qm", "start")
    assert lint(root).returncode == 1  # the committed TRUNCATE
    (root / "db/billing/000002_new.up.sql").write_text(DROP_COLUMN)  # untracked
    (root / "db/billing/000001_init.up.sql").write_text(CLEAN_UP + "-- changed\n")  # modified
    code, report = lint_json(root, "--since", "HEAD")
    assert report["files"] == ["db/billing/000001_init.up.sql", "db/billing/000002_new.up.sql"]
    assert code == 0  # billing allows drop-column; only missing-down is left
    bad = lint(root, "--since", "no-such-revision")
    assert bad.returncode == 1 and "git" in bad.stderr and "no-such-revision" in bad.stderr


def test_lint_without_a_server_is_fast(tmp_path: Path) -> None:
    shutil.copy(REPO / "dbplan.yaml", tmp_path / "dbplan.yaml")
    shutil.copytree(REPO / "migrations", tmp_path / "migrations")
    started = time.monotonic()
    assert lint(tmp_path).returncode == 0
    assert time.monotonic() - started < 5


def test_the_repository_ships_the_pre_commit_hook() -> None:
    hooks = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    (hook,) = [h for h in hooks if h["id"] == "dbplan-lint"]
    assert hook["entry"] == "dbplan lint" and hook["language"] == "python" and hook["pass_filenames"] is True
    import re

    assert re.search(hook["files"], "db/app/000001_init.up.sql") and not re.search(hook["files"], "README.md")


def _pre_commit() -> str | None:
    found = shutil.which("pre-commit") or shutil.which("pre-commit", path=str(Path(sys.executable).parent))
    return found


@pytest.mark.skipif(_pre_commit() is None, reason="pre-commit is not installed (pip install pre-commit)")
def test_the_pre_commit_hook_fails_on_a_risky_file_and_passes_on_a_clean_one(tmp_path: Path) -> None:
    """pre-commit builds its own virtualenv and pip-installs dbplan from this checkout
    (try-repo takes uncommitted changes too), then runs the hook on the repository's files."""
    pre_commit = _pre_commit()
    assert pre_commit is not None
    (tmp_path / "project").mkdir()
    project = make_repo(tmp_path / "project")
    git(project, "init", "-q")
    git(project, "add", ".")
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path / "cache")}
    env.pop("PYTHONPATH", None)  # the hook must run the dbplan pre-commit installed, not this checkout

    def run_hook() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [pre_commit, "try-repo", str(REPO), "dbplan-lint", "--all-files", "--color", "never"],
            cwd=project, capture_output=True, text=True, env=env, timeout=600, check=False,
        )  # fmt: skip

    clean = run_hook()
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "dbplan lint" in clean.stdout and "Passed" in clean.stdout
    (project / "db/app/000002_drop_name.up.sql").write_text(DROP_COLUMN)
    (project / "db/app/000002_drop_name.down.sql").write_text("")
    git(project, "add", ".")
    risky = run_hook()
    assert risky.returncode == 1, risky.stdout + risky.stderr
    assert "Failed" in risky.stdout
    assert "db/app/000002_drop_name.up.sql:3: drop-column (destructive)" in risky.stdout


def test_a_table_an_earlier_named_file_creates_is_new(tmp_path: Path) -> None:
    root = make_repo(
        tmp_path,
        {
            "db/app/000002_audit.up.sql": "CREATE TABLE IF NOT EXISTS audit (id bigint, note varchar(20));\n",
            "db/app/000002_audit.down.sql": "DROP TABLE audit;\n",
            "db/app/000003_audit_index.up.sql": "CREATE INDEX audit_note ON audit (note);\n",
            "db/app/000003_audit_index.down.sql": "DROP INDEX CONCURRENTLY audit_note;\n",
        },
    )
    both = ("db/app/000002_audit.up.sql", "db/app/000003_audit_index.up.sql")
    code, report = lint_json(root, *both)
    assert code == 0 and [f["rule"] for f in report["findings"]] == []
    # Named alone, or with no selection (every earlier file applied long ago): audit may be full.
    for args in (both[1:], ()):
        code, report = lint_json(root, *args)
        index = [f for f in report["findings"] if f["rule"] == "create-index-not-concurrently"]
        assert code == 1 and [(f["lock"], f["line"]) for f in index] == [("SHARE", 1)]

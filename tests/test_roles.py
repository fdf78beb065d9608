"""Roles kept true (issue #13 item 5): login, connection limit, memberships and passwords
as the plan file declares them, planned, applied and clean afterwards; a password that
cannot be checked without a superuser; what the file does not mention listed, never
dropped; bad role declarations refused where they are written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from estate import Estate
from psycopg import sql


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    return Estate(tmp_path, pg_url, dbname_prefix, capsys)


def admin_sql(estate: Estate, statement: str, *names: str) -> None:
    """Run ``statement`` on the server as the test's superuser; ``{}`` are identifiers."""
    with psycopg.connect(estate.url, autocommit=True) as conn:
        conn.execute(sql.SQL(statement).format(*(sql.Identifier(name) for name in names)))  # type: ignore[arg-type]


def role_row(estate: Estate, role: str) -> tuple[Any, ...]:
    """(login, connection limit, sorted memberships) of a live role."""
    with psycopg.connect(estate.url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT rolcanlogin, rolconnlimit, ARRAY(SELECT g.rolname::text FROM pg_auth_members m "
            "JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid ORDER BY 1) FROM pg_roles r WHERE rolname = %s",
            (role,),
        ).fetchone()
    assert row is not None, f"role {role} does not exist"
    return row[0], row[1], list(row[2])


def can_log_in(estate: Estate, role: str, password: str) -> bool:
    try:
        with psycopg.connect(estate.url, user=role, password=password, dbname="postgres", connect_timeout=5):
            return True
    except psycopg.OperationalError:
        return False


def plan_json(estate: Estate) -> dict[str, Any]:
    run = estate.dbplan("plan", "--format", "json")
    assert run.code == 0, run.output
    return json.loads(run.out)


def test_each_role_difference_is_planned_applied_and_then_clean(estate: Estate) -> None:
    app, readers, legacy = estate.name("app"), estate.name("readers"), estate.name("legacy")
    admin_sql(estate, "CREATE ROLE {} NOLOGIN CONNECTION LIMIT 5", app)
    admin_sql(estate, "CREATE ROLE {}", legacy)
    admin_sql(estate, "GRANT {} TO {}", legacy, app)
    estate.add_role("readers", login=False)
    estate.add_role("app", password="first-Pw-1")
    estate.document["roles"][app].update(connection_limit=10, member_of=[readers])
    estate.add_database("appdb", owner="app")
    estate.save()

    plan = plan_json(estate)

    kinds = [(action["kind"], action.get("role") or action.get("database")) for action in plan["actions"]]
    assert kinds == [("create_role", readers), ("alter_role", app), ("create_database", estate.name("appdb"))]
    alter = plan["actions"][1]
    assert alter["login"] == [False, True]
    assert alter["connection_limit"] == [5, 10]
    assert alter["grant"] == [readers]
    assert alter["password"] is True  # made by hand without one
    assert plan["summary"]["alter_roles"] == 1
    warnings = [w["message"] for w in plan["warnings"] if w.get("rule") == "undeclared-membership"]
    assert len(warnings) == 1 and legacy in warnings[0] and "never revokes" in warnings[0]
    text = estate.dbplan("plan").out
    assert f"~ alter role {app}: login false -> true, connection limit 5 -> 10, grant membership in {readers}, password changed" in text

    run = estate.dbplan("apply", "--yes")

    assert run.code == 0, run.output
    assert role_row(estate, app) == (True, 10, sorted([readers, legacy]))  # legacy is left alone
    assert can_log_in(estate, app, "first-Pw-1")
    after = plan_json(estate)
    assert after["changes"] is False, after["actions"]
    assert estate.dbplan("plan", "--detailed-exitcode").code == 0


def test_a_new_role_gets_its_memberships_and_limit_after_it_is_created(estate: Estate) -> None:
    owner, reader = estate.name("owner"), estate.name("reader")
    estate.add_role("owner", login=False)
    estate.add_role("reader")
    estate.document["roles"][reader].update(connection_limit=3, member_of=[owner, "pg_read_all_stats"])
    estate.save()

    run = estate.dbplan("apply", "--yes")

    assert run.code == 0, run.output
    assert role_row(estate, reader) == (True, 3, sorted([owner, "pg_read_all_stats"]))
    assert plan_json(estate)["changes"] is False


def test_login_taken_away_and_limit_back_to_unlimited(estate: Estate) -> None:
    role = estate.name("batch")
    admin_sql(estate, "CREATE ROLE {} LOGIN CONNECTION LIMIT 7", role)
    estate.add_role("batch", login=False)
    estate.document["roles"][role]["connection_limit"] = -1
    estate.save()

    assert estate.dbplan("plan", "--detailed-exitcode").code == 2
    run = estate.dbplan("apply", "--yes")

    assert run.code == 0, run.output
    assert role_row(estate, role)[:2] == (False, -1)
    assert plan_json(estate)["changes"] is False


def test_attributes_the_file_does_not_write_are_left_alone(estate: Estate) -> None:
    role = estate.name("dba_made")
    admin_sql(estate, "CREATE ROLE {} LOGIN CONNECTION LIMIT 4", role)
    estate.document.setdefault("roles", {})[role] = {"server": "main"}  # no login, limit or member_of
    estate.save()

    plan = plan_json(estate)

    assert plan["changes"] is False, plan["actions"]
    assert role_row(estate, role)[:2] == (True, 4)


def test_a_changed_password_is_detected_and_applied_without_showing_it(estate: Estate, tmp_path: Path) -> None:
    role = estate.name("svc")
    estate.add_role("svc", password="old-Pw-alpha")
    assert estate.dbplan("apply", "--yes").code == 0
    assert plan_json(estate)["changes"] is False  # the verifier recomputed with its salt matches
    estate.document["roles"][role]["password"] = "new-Pw-bravo"
    estate.save()

    outputs = [estate.dbplan("plan").out, estate.dbplan("plan", "--format", "markdown").out]
    plan = plan_json(estate)
    saved = tmp_path / "saved.json"
    assert estate.dbplan("plan", "--out", str(saved)).code == 0
    run = estate.dbplan("apply", str(saved), "--yes")
    outputs += [json.dumps(plan), saved.read_text(), run.output]

    assert run.code == 0, run.output
    assert [a for a in plan["actions"] if a["kind"] == "alter_role"] == [
        {"kind": "alter_role", "server": "main", "role": role, "login": None, "connection_limit": None, "grant": [], "password": True}
    ]
    assert "password changed" in outputs[0]
    for output in outputs:
        assert "old-Pw-alpha" not in output and "new-Pw-bravo" not in output and "SCRAM-SHA-256$" not in output
    assert can_log_in(estate, role, "new-Pw-bravo")
    assert not can_log_in(estate, role, "old-Pw-alpha")
    assert plan_json(estate)["changes"] is False


def test_a_non_ascii_password_is_compared_as_libpq_hashes_it(estate: Estate) -> None:
    role = estate.name("intl")
    estate.add_role("intl", password="pässwörd-Ⅸ-ﬁ")  # NFKC changes the last two
    assert estate.dbplan("apply", "--yes").code == 0

    assert plan_json(estate)["changes"] is False
    assert can_log_in(estate, role, "pässwörd-Ⅸ-ﬁ")


def without_superuser(estate: Estate) -> str:
    """Point the plan file at an administrator with CREATEROLE and CREATEDB, no superuser."""
    admin = estate.name("admin")
    with psycopg.connect(estate.url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN CREATEROLE CREATEDB PASSWORD {}").format(
                sql.Identifier(admin), sql.Literal("admin-Pw-9")
            )
        )
    parts = urlsplit(estate.url)
    estate.document["servers"]["main"]["url"] = f"postgresql://{admin}:admin-Pw-9@{parts.hostname}:{parts.port}/postgres"
    estate.save()
    return admin


def test_without_a_superuser_passwords_are_not_checked_and_a_notice_says_so(estate: Estate) -> None:
    first, second = estate.name("one"), estate.name("two")
    without_superuser(estate)  # creates the roles, so it may alter them (PostgreSQL 16 asks that)
    estate.add_role("one", password="one-Pw")
    estate.add_role("two", password="two-Pw")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.document["roles"][first]["password"] = "one-Pw-changed"
    estate.document["roles"][second]["login"] = False
    estate.save()

    plan = plan_json(estate)
    text = estate.dbplan("plan").out

    assert [(a["kind"], a["role"], a["password"]) for a in plan["actions"]] == [("alter_role", second, False)]
    assert len(plan["notices"]) == 1
    assert f"passwords of {first}, {second} not checked" in plan["notices"][0]
    assert text.count("not checked") == 1
    assert plan["warnings"] == []  # nothing is wrong: --fail-on warnings must not fail for it
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    assert role_row(estate, second)[0] is False  # CREATEROLE is enough to alter
    assert can_log_in(estate, first, "one-Pw")  # the changed password was not applied


def test_roles_and_databases_the_file_does_not_mention_are_listed_never_dropped(estate: Estate) -> None:
    stray_role, stray_db = estate.name("stray_role"), estate.name("stray_db")
    admin_sql(estate, "CREATE ROLE {}", stray_role)
    admin_sql(estate, "CREATE DATABASE {}", stray_db)
    estate.add_role("kept")
    estate.add_database("kept_db")

    plan = plan_json(estate)
    text = estate.dbplan("plan").out
    markdown = estate.dbplan("plan", "--format", "markdown").out
    run = estate.dbplan("apply", "--yes")

    roles = {entry["name"] for entry in plan["unmanaged"]["roles"]}
    databases = {entry["name"] for entry in plan["unmanaged"]["databases"]}
    assert {"server": "main", "name": stray_role} in plan["unmanaged"]["roles"]
    assert stray_db in databases
    assert estate.name("kept") not in roles and estate.name("kept_db") not in databases
    assert not any(role.startswith("pg_") for role in roles)
    assert not {"postgres", "template0", "template1"} & (roles | databases)  # the connecting role, maintenance db
    assert "Unmanaged (not in the plan file; listed, never dropped):" in text
    assert "Not managed by this plan file" in markdown
    assert run.code == 0, run.output
    with psycopg.connect(estate.url, autocommit=True) as conn:
        assert conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (stray_role,)).fetchone()
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (stray_db,)).fetchone()


@pytest.mark.parametrize(
    ("member_of", "message", "blamed"),
    [
        (["{readers}x"], "unknown role '{readers}x'; did you mean '{readers}'?", "app"),
        (["{app}"], "role '{app}' is listed as a member of itself", "app"),
        (["{readers}"], "roles are members of each other in a circle: '{readers}' -> '{app}' -> '{readers}'", "readers"),
    ],
    ids=["unknown", "itself", "circle"],
)
def test_bad_memberships_are_located_and_change_nothing(
    estate: Estate, member_of: list[str], message: str, blamed: str
) -> None:
    names = {"app": estate.name("app"), "readers": estate.name("readers")}
    estate.add_role("readers", login=False)
    estate.add_role("app")
    estate.document["roles"][names["readers"]]["member_of"] = [names["app"]] if "circle" in message else []
    estate.document["roles"][names["app"]]["member_of"] = [entry.format(**names) for entry in member_of]
    estate.save()

    run = estate.dbplan("apply", "--yes")

    assert run.code == 1
    assert message.format(**names) in run.output
    entry = "{readers}x" if "unknown" in message else ("{app}" if blamed == "readers" else member_of[0])
    blamed_line = line_of(estate, f"- {entry.format(**names)}", after=f"{names[blamed]}:")
    assert f"dbplan.yaml:{blamed_line}:" in run.output
    assert f"(roles.{names[blamed]}.member_of[0])" in run.output or f"roles.{names[blamed]}.member_of" in run.output
    with psycopg.connect(estate.url, autocommit=True) as conn:
        assert conn.execute("SELECT 1 FROM pg_roles WHERE rolname = ANY(%s)", (list(names.values()),)).fetchone() is None


def line_of(estate: Estate, text: str, *, after: str) -> int:
    """The line of the plan file holding ``text``, the first one below the line holding ``after``."""
    lines = estate.plan_file.read_text().splitlines()
    start = next(index for index, line in enumerate(lines) if line.strip() == after)
    return next(index for index, line in enumerate(lines[start:], start + 1) if text in line)


def test_the_readme_roles_example_is_valid(tmp_path: Path) -> None:
    from orchestrator import api

    section = (Path(__file__).resolve().parent.parent / "README.md").read_text().split("### Roles", 1)[1]
    roles = section.split("```yaml", 1)[1].split("```", 1)[0]
    (tmp_path / "dbplan.yaml").write_text("version: 1\nservers:\n  main:\n    url: postgresql://db/postgres\n" + roles)

    checked = api.validate(tmp_path / "dbplan.yaml", environ={"PRODUCT_DB_PASSWORD": "x"})

    role = checked.estate.roles["product_svc"]
    assert (role.login, role.connection_limit, role.member_of) == (True, 20, ("readers", "pg_read_all_stats"))


def test_only_one_service_brings_its_owners_memberships_and_lists_nothing_as_unmanaged(estate: Estate) -> None:
    owner, readers = estate.name("shop_owner"), estate.name("shop_readers")
    estate.add_role("shop_readers", login=False)
    estate.add_role("shop_owner")
    estate.document["roles"][owner]["member_of"] = [readers]
    estate.add_database("shop", owner="shop_owner")
    estate.add_service("shop", "shop")
    estate.add_database("other")
    estate.add_service("other", "other")
    estate.write("shop", "1_init.up.sql", "CREATE TABLE items (id int);\n")

    plan = json.loads(estate.dbplan("plan", "--only", "shop", "--format", "json").out)
    run = estate.dbplan("apply", "--only", "shop", "--yes")

    assert plan["unmanaged"] == {"roles": [], "databases": []}, "the rest of the file is not unmanaged"
    assert run.code == 0, run.output
    assert role_row(estate, owner)[2] == [readers]


def test_a_password_stored_as_an_old_md5_hash_is_compared_too(estate: Estate) -> None:
    role = estate.name("old_md5")
    with psycopg.connect(estate.url, autocommit=True) as conn:
        conn.execute("SET password_encryption = 'md5'")
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'md5-era-Pw'").format(sql.Identifier(role)))
        stored = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,)).fetchone()
    assert stored is not None and str(stored[0]).startswith("md5")
    estate.add_role("old_md5", password="md5-era-Pw")

    assert plan_json(estate)["changes"] is False  # the same password: not reset
    estate.document["roles"][role]["password"] = "scram-era-Pw"
    estate.save()
    assert [a["password"] for a in plan_json(estate)["actions"]] == [True]

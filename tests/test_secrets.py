"""No secret ever appears in any output (DESIGN: "passwords and URLs with credentials are
redacted everywhere").

One estate holds three secrets: a server URL password from the environment, a role
password written in the plan file, and a role password from the environment. Every
command is run in every output format, through success and failure, and all that was
printed or saved is searched for them.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql
from estate import CliRun, Estate
from processes import run_dbplan

SERVER_PASSWORD = "srv-Pw-7Hq2xZ"
ROLE_PASSWORD_IN_FILE = "role-Pw-Literal-93kd"
ROLE_PASSWORD_FROM_ENV = "role-Pw-Env-41mq"
SECRETS = (SERVER_PASSWORD, ROLE_PASSWORD_IN_FILE, ROLE_PASSWORD_FROM_ENV)


@pytest.fixture
def estate(
    tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Estate:
    parts = urlsplit(pg_url)
    monkeypatch.setenv("DBPLAN_TEST_PASSWORD", SERVER_PASSWORD)
    monkeypatch.setenv("DBPLAN_TEST_PORT", str(parts.port))
    monkeypatch.setenv("DBPLAN_TEST_ROLE_PASSWORD", ROLE_PASSWORD_FROM_ENV)
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    # The server checks the password: an administrator of this test's own that has it.
    admin = estate.name("admin")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(sql.Identifier(admin), sql.Literal(SERVER_PASSWORD))
        )
    url = f"postgresql://{admin}:${{DBPLAN_TEST_PASSWORD}}@{parts.hostname}:${{DBPLAN_TEST_PORT}}/postgres"
    estate.document["servers"]["main"]["url"] = url
    estate.add_role("shop_svc", password=ROLE_PASSWORD_IN_FILE)
    estate.add_role("report_svc", password="${DBPLAN_TEST_ROLE_PASSWORD}")
    estate.add_database("shop", owner="shop_svc")
    estate.add_service("shop", "shop")
    estate.write("shop", "1_items.up.sql", "CREATE TABLE items (id int);")
    estate.write("shop", "2_index.up.sql", "-- dbplan:no-transaction\nCREATE INDEX CONCURRENTLY items_id_idx ON items (id);\n")
    return estate


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # free again once closed: nothing listens there


def test_no_secret_in_any_output_or_saved_plan(estate: Estate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs: list[tuple[str, str]] = []

    def dbplan(*args: str, expect: int | None = 0) -> CliRun:
        run = estate.dbplan(*args)
        outputs.append((" ".join(args), run.output))
        if expect is not None:
            assert run.code == expect, f"{args}: {run.output}"
        return run

    dbplan("validate")
    for format in ("text", "json", "markdown"):
        dbplan("plan", "--format", format)
    dbplan("plan", "--detailed-exitcode", expect=2)
    saved = tmp_path / "saved-plan.json"
    dbplan("plan", "--out", str(saved))
    outputs.append(("saved plan", saved.read_text()))
    dbplan("graph")
    dbplan("graph", "--format", "dot")
    dbplan("apply", str(saved), "--yes")
    with psycopg.connect(estate.url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT rolname, rolpassword IS NOT NULL FROM pg_authid WHERE rolname IN (%s, %s) ORDER BY 1",
            (estate.name("report_svc"), estate.name("shop_svc")),
        ).fetchall()
    assert rows == [(estate.name("report_svc"), True), (estate.name("shop_svc"), True)], "the secrets were used"

    for format in ("text", "json"):
        dbplan("status", "--format", format)
    estate.write("shop", "3_broken.up.sql", "CREATE TABLE broken (id int REFERENCES nowhere);")
    dbplan("apply", "--yes", expect=1)
    dbplan("apply", "--yes", "--format", "json", expect=1)
    estate.write("shop", "3_broken.up.sql", "CREATE TABLE fixed (id int);")
    real_process = run_dbplan(estate.plan_file, "apply", "--yes")  # progress lines, as CI logs them
    assert real_process.code == 0, real_process.err
    outputs.append(("apply (process)", real_process.out + real_process.err))
    dbplan("force", "shop", "3", "--reason", "checked")
    dbplan("force", "nosuchservice", "3", expect=1)

    monkeypatch.setenv("DBPLAN_TEST_PORT", str(_closed_port()))
    for args in (("plan",), ("plan", "--format", "json", "--wait", "0.5"), ("apply", "--yes"), ("status",), ("force", "shop", "3")):
        run = dbplan(*args, expect=1)
        assert "cannot connect to server 'main'" in run.err
    conninfo = f"host=127.0.0.1 port={_closed_port()} user=postgres password=${{DBPLAN_TEST_PASSWORD}} dbname=postgres"
    estate.document["servers"]["main"]["url"] = conninfo
    estate.save()
    run = dbplan("plan", expect=1)
    assert "password=***" in run.err

    assert len(outputs) > 20
    for command, text in outputs:
        for secret in SECRETS:
            assert secret not in text, f"'{command}' printed a secret:\n{text}"


def test_saved_plan_keeps_no_secret_but_records_that_a_password_is_set(estate: Estate, tmp_path: Path) -> None:
    saved = tmp_path / "plan.json"
    assert estate.dbplan("plan", "--out", str(saved)).code == 0
    text = saved.read_text()
    for secret in SECRETS:
        assert secret not in text
    document = json.loads(text)
    roles = [action for action in document["actions"] if action["kind"] == "create_role"]
    assert {role["role"]: role["with_password"] for role in roles} == {
        estate.name("shop_svc"): True,
        estate.name("report_svc"): True,
    }

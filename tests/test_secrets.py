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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql
from estate import CliRun, Estate
from processes import dbplan_backends, run_dbplan, start_dbplan, wait_until

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
        _assert_no_password_piece(outputs)
        assert "cannot connect to server 'main'" in run.err
    conninfo = f"host=127.0.0.1 port={_closed_port()} user=postgres password=${{DBPLAN_TEST_PASSWORD}} dbname=postgres"
    estate.document["servers"]["main"]["url"] = conninfo
    estate.save()
    run = dbplan("plan", expect=1)
    assert "host 127.0.0.1, port" in run.err

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


# ---------------------------------------------------------------------------
# Role passwords never travel in clear (the server log, pg_stat_activity)

# Spellings a naive quoting or hashing step could mangle: a quote and a backslash, a
# password that looks like an MD5 hash (the server would store it as one if sent as it
# is), and one that is not ASCII (SASLprep normalises it on both sides).
ROLE_PASSWORDS = {
    "quoted": "it's a \"pass\" \\ 9Xq",
    "md5like": "md5" + "0123456789abcdef" * 2,
    "unicode": "päss-wörd-Ω-7",
}


def _shows(text: str, password: str) -> bool:
    """Whether ``text`` holds ``password`` as it is, or as an SQL literal spells it."""
    doubled_quotes = password.replace("'", "''")
    return any(spelling in text for spelling in (password, doubled_quotes, doubled_quotes.replace("\\", "\\\\")))


def _server_log(conn: psycopg.Connection) -> Path:
    """The test cluster's log (the embedded server writes it to <data>/postgres.log)."""
    log = Path(str(conn.execute("SHOW data_directory").fetchone()[0])) / "postgres.log"  # type: ignore[index]
    if not log.is_file():
        pytest.skip("the server's log is not readable here (DBPLAN_TEST_URL?)")
    return log


@contextmanager
def _password_auth_for(conn: psycopg.Connection, roles: list[str]) -> Iterator[None]:
    """pg_hba lines (first match wins) that make these roles log in with SCRAM over TCP."""
    hba = Path(str(conn.execute("SHOW hba_file").fetchone()[0]))  # type: ignore[index]
    original = hba.read_text()
    hba.write_text(f"host all {','.join(roles)} 127.0.0.1/32 scram-sha-256\n" + original)
    conn.execute("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        hba.write_text(original)
        conn.execute("SELECT pg_reload_conf()")


# The test servers ask for a password over TCP (the embedded server's own rule).
ADMIN_PASSWORD = sql.Literal("admin-pw-for-the-test")


def _admin_estate(estate: Estate, admin: str, pg_url: str) -> None:
    parts = urlsplit(pg_url)
    estate.document["servers"]["main"]["url"] = (
        f"postgresql://{admin}:admin-pw-for-the-test@{parts.hostname}:{parts.port}/postgres"
    )
    for short, password in ROLE_PASSWORDS.items():
        estate.add_role(short, password=password)
    estate.save()


def _create_logging_admin(conn: psycopg.Connection, admin: str) -> None:
    """A superuser of the test's own, every statement of whose sessions the server logs."""
    conn.execute(sql.SQL("CREATE ROLE {} SUPERUSER LOGIN PASSWORD {}").format(sql.Identifier(admin), ADMIN_PASSWORD))
    conn.execute(sql.SQL("ALTER ROLE {} SET log_statement = 'all'").format(sql.Identifier(admin)))


def _log_in(pg_url: str, role: str, password: str) -> str:
    parts = urlsplit(pg_url)
    with psycopg.connect(
        host=parts.hostname, port=parts.port, user=role, password=password, dbname="postgres", connect_timeout=10
    ) as conn:
        return str(conn.execute("SELECT current_user").fetchone()[0])  # type: ignore[index]


def test_role_passwords_reach_neither_the_log_nor_pg_stat_activity(
    tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    admin = estate.name("admin")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        _create_logging_admin(conn, admin)
        log = _server_log(conn)
        log_start = log.stat().st_size
        _admin_estate(estate, admin, pg_url)
        # A role of the same name created and not yet committed holds dbplan's CREATE ROLE
        # back, so its text can be read in pg_stat_activity while it waits.
        blocker = psycopg.connect(pg_url)
        blocker.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(estate.name("quoted"))))
        running = start_dbplan(estate.plan_file, "apply", "--yes")
        waiting = wait_until(lambda: dbplan_backends(pg_url, "%CREATE ROLE%", waiting_for_lock=True), 60, "CREATE ROLE")
        blocker.rollback()
        blocker.close()
        finished = running.finish()
        assert finished.code == 0, finished.err

        seen_text = log.read_bytes()[log_start:].decode("utf-8", "replace")
        assert "CREATE ROLE" in seen_text, "log_statement = 'all' logged the statements"
        assert "SCRAM-SHA-256$" in waiting[0][2], "the statement waiting was the one with the password"
        for password in ROLE_PASSWORDS.values():
            for where, text in (("server log", seen_text), ("pg_stat_activity", str(waiting[0][2]))):
                assert not _shows(text, password), f"the {where} shows a password"

        roles = [estate.name(short) for short in ROLE_PASSWORDS]
        with _password_auth_for(conn, roles):
            for short, password in ROLE_PASSWORDS.items():
                assert _log_in(pg_url, estate.name(short), password) == estate.name(short)
                with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                    _log_in(pg_url, estate.name(short), password + "x")


def test_a_failing_create_role_logs_no_password(
    tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """At default settings the server logs every failing statement (log_min_error_statement)."""
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    admin = estate.name("admin")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOCREATEROLE PASSWORD {}").format(sql.Identifier(admin), ADMIN_PASSWORD))
        log = _server_log(conn)
        log_start = log.stat().st_size
        _admin_estate(estate, admin, pg_url)
        run = estate.dbplan("apply", "--yes")
        assert run.code == 1
        assert "permission denied to create role" in run.err
        logged = log.read_bytes()[log_start:].decode("utf-8", "replace")
    assert "STATEMENT:  CREATE ROLE" in logged, "the failing statement was logged"
    for password in ROLE_PASSWORDS.values():
        assert not _shows(logged, password)
        assert not _shows(run.output, password)


# ---------------------------------------------------------------------------
# A server's url is shown by host and port only, however its password is spelled

LEFT, RIGHT = "Left7q", "Right9z"  # the halves of each password: neither may be shown

# (id, url) with {host}, {port} and {port2} to fill in: libpq reads each as meant.
READABLE_URLS = [
    ("percent-encoded", "postgresql://{user}:Left7q%40%2F%3FRight9z@{host}:{port}/postgres"),
    ("query-parameter", "postgresql://{user}@{host}:{port}/postgres?password=Left7q-Right9z"),
    ("query-parameter-first", "postgresql://{host}:{port}/postgres?password=Left7q-Right9z&user={user}"),
    ("unencoded-hash", "postgresql://{user}:Left7q#Right9z@{host}:{port}/postgres"),
    ("unencoded-question-mark", "postgresql://{user}:Left7q?Right9z@{host}:{port}/postgres"),
    ("unencoded-colon", "postgresql://{user}:Left7q:Right9z@{host}:{port}/postgres"),
    ("multi-host", "postgresql://{user}:Left7q-Right9z@{host}:{port},{host}:{port2}/postgres"),
    ("keyword-spaces", "host={host} port={port} user={user} password = Left7q-Right9z"),
    ("keyword-quoted-space", "host={host} port={port} user={user} password='Left7q Right9z'"),
    ("keyword-quoted-quote", r"host={host} port={port} password='Left7q\' Right9z' user={user}"),
    ("keyword-multi-host", "host={host},{host} port={port},{port2} user={user} password=Left7q-Right9z"),
]
# libpq cannot read these, or reads part of the password as the host, port or database.
MISREAD_URLS = [
    ("unencoded-slash", "postgresql://{user}:Left7q/Right9z@{host}:{port}/postgres"),
    ("unencoded-slash-digits", "postgresql://{user}:1234/Left7qRight9z@{host}:{port}/postgres"),
    ("unencoded-at", "postgresql://{user}:Left7q@Right9z@{host}:{port}/postgres"),
    ("unencoded-space", "postgresql://{user}:Left7q Right9z@{host}:{port}/postgres"),
    ("bad-percent", "postgresql://{user}:Left7q%zzRight9z@{host}:{port}/postgres"),
    ("unterminated-quote", "host={host} port={port} password='Left7q Right9z"),
    ("keyword-without-value", "host={host} port={port} Left7q Right9z"),
]


def _assert_no_password_piece(outputs: list[tuple[str, str]]) -> None:
    for command, text in outputs:
        for piece in (LEFT, RIGHT, "1234/"):
            assert piece not in text, f"'{command}' printed part of the password:\n{text}"


@pytest.mark.parametrize("url", [url for _, url in READABLE_URLS], ids=[name for name, _ in READABLE_URLS])
def test_a_password_in_any_spelling_is_never_shown(
    url: str, tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    estate.add_app()
    estate.write("app", "1_items.up.sql", "CREATE TABLE items (id int);")
    live = urlsplit(pg_url)
    outputs: list[tuple[str, str]] = []

    def dbplan(*args: str, expect: int) -> CliRun:
        run = estate.dbplan(*args)
        outputs.append((" ".join(args), run.output))
        assert run.code == expect, f"{args}: {run.output}"
        return run

    # Reachable: an administrator of this test's own whose password is the one libpq reads
    # from this spelling (the test servers check passwords over TCP).
    from psycopg.conninfo import conninfo_to_dict

    admin = estate.name("admin")
    reachable = url.format(host=live.hostname, port=live.port, port2=_closed_port(), user=admin)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} SUPERUSER LOGIN PASSWORD {}").format(
                sql.Identifier(admin), sql.Literal(conninfo_to_dict(reachable)["password"])
            )
        )
    estate.document["servers"]["main"]["url"] = reachable
    estate.save()
    dbplan("validate", expect=0)
    dbplan("plan", "--format", "json", "--out", str(tmp_path / "plan.json"), expect=0)
    outputs.append(("saved plan", (tmp_path / "plan.json").read_text()))
    dbplan("status", "--format", "json", expect=0)

    closed = _closed_port()
    estate.document["servers"]["main"]["url"] = url.format(host="127.0.0.1", port=closed, port2=_closed_port(), user=admin)
    estate.save()
    for args in (("plan",), ("--debug", "plan", "--format", "json"), ("status",), ("apply", "--yes"), ("force", "app", "1")):
        run = dbplan(*args, expect=1)
        _assert_no_password_piece(outputs)
        assert "cannot connect to server 'main'" in run.err
        assert "127.0.0.1, port" in run.err and str(closed) in run.err, "the error names the host and port"
        assert "Traceback" not in run.output and "internal error" not in run.output
    _assert_no_password_piece(outputs)


@pytest.mark.parametrize("url", [url for _, url in MISREAD_URLS], ids=[name for name, _ in MISREAD_URLS])
def test_a_url_libpq_would_misread_is_refused_offline_without_showing_it(
    url: str, tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    estate.add_app()
    estate.document["servers"]["main"]["url"] = url.format(host="127.0.0.1", port=_closed_port(), user="admin")
    estate.save()
    outputs = []
    for args in (("validate",), ("--debug", "plan"), ("apply", "--yes")):
        run = estate.dbplan(*args)
        outputs.append((" ".join(args), run.output))
        _assert_no_password_piece(outputs)
        assert run.code == 1, run.output
        assert "dbplan.yaml:" in run.err and "(servers.main.url): the url of server 'main' cannot be used" in run.err
        assert "Traceback" not in run.output
    _assert_no_password_piece(outputs)
    assert not estate.database_exists("app")


# ---------------------------------------------------------------------------
# What can be checked offline is refused before anything is created

NOT_UTF8 = "ab" + b"\xff".decode("utf-8", "surrogateescape")  # how Python reads such bytes


@pytest.mark.parametrize(
    ("role", "password", "environ", "message"),
    [
        ("{prefix}_second", "x\0y", {}, "holds a NUL character"),
        ("pg_{prefix}", None, {}, "is reserved by PostgreSQL"),
        ("public", None, {}, "role name 'public' is reserved"),
        ("none", "pw", {}, "role name 'none' is reserved"),
        ("{prefix}_second", "${PW}", {"PW": "null"}, "reads in YAML as nothing, not as text"),
        ("{prefix}_second", "${PW}", {"PW": "~"}, "reads in YAML as nothing, not as text"),
        ("{prefix}_second", "${PW}", {"PW": "0012345"}, "reads in YAML as a number, not as text"),
        ("{prefix}_second", "${PW}", {"PW": "2031-02-30"}, "not shown: it is secret"),
        ("{prefix}_second", "${PW}", {"PW": NOT_UTF8}, "environment variable PW is not valid UTF-8"),
        ("{prefix}_second", "${PW:-${PW2}", {}, "unterminated '${' in value"),
    ],
    ids=["nul-password", "pg-prefix", "public", "none", "env-null", "env-tilde", "env-number", "env-bad-date",
         "env-not-utf8", "nested-unterminated"],
)
def test_validate_refuses_what_postgresql_would_and_apply_creates_nothing(
    role: str,
    password: str | None,
    environ: dict[str, str],
    message: str,
    tmp_path: Path,
    pg_url: str,
    dbname_prefix: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    first = estate.add_role("first", password="first-Pw-1")
    spec: dict[str, object] = {"server": "main", "login": True}
    if password is not None:
        spec["password"] = password
    estate.document["roles"][role.format(prefix=dbname_prefix)] = spec
    estate.add_database("app", owner="first")
    estate.save()
    for command in (("validate",), ("apply", "--yes")):
        run = estate.dbplan(*command)
        assert run.code == 1, run.output
        assert message in run.err and "dbplan.yaml:" in run.err
        assert "Traceback" not in run.output and "internal error" not in run.output
        for value in [*environ.values(), "x\0y"]:
            assert value.strip("~") == "" or value not in run.output, "the message shows the secret"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        created = conn.execute("SELECT rolname FROM pg_roles WHERE rolname = %s", (first,)).fetchall()
    assert created == [], "apply created a role before it found the problem"
    assert not estate.database_exists("app")


def test_nested_defaults_and_dollars_become_the_role_password(
    tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBPLAN_TEST_INNER", "inner-Pw-5t")
    monkeypatch.delenv("DBPLAN_TEST_UNSET", raising=False)
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    nested = estate.add_role("nested", password="${DBPLAN_TEST_UNSET:-${DBPLAN_TEST_INNER}}")
    dollar = estate.add_role("dollar", password="${DBPLAN_TEST_UNSET:-pa$$word-${DBPLAN_TEST_UNSET:-x}}")
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    with psycopg.connect(pg_url, autocommit=True) as conn, _password_auth_for(conn, [nested, dollar]):
        assert _log_in(pg_url, nested, "inner-Pw-5t") == nested
        assert _log_in(pg_url, dollar, "pa$word-x") == dollar
        for role, wrong in ((nested, "${DBPLAN_TEST_INNER}}"), (dollar, "pa$$word-${DBPLAN_TEST_UNSET:-x}")):
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                _log_in(pg_url, role, wrong)


def test_a_changed_password_reaches_no_output_saved_plan_nor_log(
    tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The alter_role of a changed password: detected by recomputing the stored verifier
    (also for the awkward spellings, so an unchanged one plans nothing), shown only as
    "password changed", and sent as a verifier."""
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    admin = estate.name("admin")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        _create_logging_admin(conn, admin)
        log = _server_log(conn)
        _admin_estate(estate, admin, pg_url)
        assert estate.dbplan("apply", "--yes").code == 0
        assert json.loads(estate.dbplan("plan", "--format", "json").out)["changes"] is False, "unchanged passwords match"
        changed = {short: password + "-2" for short, password in ROLE_PASSWORDS.items()}
        for short, password in changed.items():
            estate.document["roles"][estate.name(short)]["password"] = password
        estate.save()
        log_start = log.stat().st_size

        saved = tmp_path / "saved.json"
        runs = [estate.dbplan("plan", "--format", format) for format in ("text", "json", "markdown")]
        runs.append(estate.dbplan("plan", "--out", str(saved)))
        runs.append(estate.dbplan("apply", str(saved), "--yes"))
        logged = log.read_bytes()[log_start:].decode("utf-8", "replace")
        roles = [estate.name(short) for short in ROLE_PASSWORDS]
        with _password_auth_for(conn, roles):
            for short, old_password in ROLE_PASSWORDS.items():
                assert _log_in(pg_url, estate.name(short), changed[short]) == estate.name(short)
                with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                    _log_in(pg_url, estate.name(short), old_password)

    assert runs[-1].code == 0, runs[-1].output
    alters = [a for a in json.loads(runs[1].out)["actions"] if a["kind"] == "alter_role"]
    assert sorted(a["role"] for a in alters) == sorted(roles) and all(a["password"] for a in alters)
    assert "ALTER ROLE" in logged, "log_statement = 'all' logged the statements"
    outputs = [run.output for run in runs] + [saved.read_text()]
    for password in [*ROLE_PASSWORDS.values(), *changed.values()]:
        assert not _shows(logged, password), "the server log shows a password"
        for output in outputs:
            assert not _shows(output, password), output
    for output in outputs:
        assert "SCRAM-SHA-256$" not in output, "a verifier was printed"
    assert json.loads(estate.dbplan("plan", "--format", "json").out)["changes"] is False

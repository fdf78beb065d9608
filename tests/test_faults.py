"""Faults as a user meets them at the command line: signals, lost connections, early Ctrl-C.

Every fault ends in a message that names the server and what was done, and an exit code
the README lists; never in "internal error" or a Python traceback.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from estate import Estate
from processes import dbplan_backends, start_dbplan, wait_until


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    estate.add_app()
    estate.write("app", "1_first.up.sql", "CREATE TABLE first (id int);")
    assert estate.dbplan("apply", "--yes").code == 0
    return estate


@pytest.mark.parametrize("format", ["text", "json"])
@pytest.mark.parametrize(
    "slow, signals",
    [
        ("CREATE TABLE second (id int);\nSELECT pg_sleep(30);\n", [signal.SIGTERM]),  # rolled back
        ("-- dbplan:no-transaction\nCREATE TABLE second (id int);\nSELECT pg_sleep(30);\n", [signal.SIGINT] * 2),
    ],
    ids=["transaction", "no-transaction"],
)
def test_a_migration_stopped_by_a_signal_is_reported_cancelled_not_failed(
    estate: Estate, slow: str, signals: list[signal.Signals], format: str
) -> None:
    estate.write("app", "2_slow.up.sql", slow)
    process = start_dbplan(estate.plan_file, "apply", "--yes", "--format", format)
    wait_until(lambda: dbplan_backends(estate.url, "%pg_sleep(30)%"), what="the slow migration")
    for number in signals:
        process.signal(number)
        process.wait_for(f"received {number.name}")
    run = process.finish(timeout=30)
    assert run.code == 128 + signals[-1]
    assert "[1/1] apply app 2 slow: cancelled" in run.err
    assert "FAILED" not in run.err
    if format == "json":
        result = json.loads(run.out)
        assert result["summary"] == {"done": 0, "skipped": 0, "failed": 0, "cancelled": 1}
        assert [o["status"] for o in result["outcomes"]] == ["cancelled"]
    else:
        assert "Apply stopped on request after 0 done." in run.out


# ---------------------------------------------------------------------------
# Connecting: --wait, refusals, the maintenance database


@pytest.mark.parametrize("option", ["--wait", "--lock-wait"])
@pytest.mark.parametrize("value", ["nan", "-1", "inf", "-inf"])
def test_a_wait_that_would_never_end_or_is_negative_is_a_usage_error(estate: Estate, option: str, value: str) -> None:
    estate.write("app", "2_second.up.sql", "CREATE TABLE second (id int);")
    run = estate.dbplan("apply", "--yes", option, value)
    assert run.code == 1
    assert f"Invalid value for '{option}': {value} is not a number of seconds: give 0 or more" in run.err
    assert "second" not in estate.tables("app")


def test_wait_retries_for_the_whole_time_it_was_given(estate: Estate) -> None:
    import time

    estate.document["servers"]["main"]["url"] = "postgresql://postgres@127.0.0.1:1/postgres"  # nothing listens
    estate.save()
    started = time.monotonic()
    run = estate.dbplan("plan", "--wait", "3")
    elapsed = time.monotonic() - started
    assert run.code == 1
    assert 2.9 <= elapsed < 6, f"gave up after {elapsed:.1f} s of --wait 3"
    assert "server 'main' is not reachable yet" in run.err
    assert "cannot connect to server 'main'" in run.err and "retried for 3 s" in run.err


@pytest.fixture(scope="module")
def password_server() -> Iterator[str]:
    """A server of its own that checks passwords (the shared ones trust every local user)."""
    import os
    import shutil
    import tempfile

    import psycopg

    from orchestrator.server.embedded import EmbeddedServer

    root = Path(tempfile.mkdtemp(prefix="dbplan-pw-"))
    os.chmod(root, 0o755)  # reachable by the account PostgreSQL runs as under root
    server = EmbeddedServer(root / "data", durable=False)
    url = server.ensure_running()
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER ROLE postgres PASSWORD 'right-pw-2718'")
            hba = conn.execute("SHOW hba_file").fetchone()[0]
            Path(hba).write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
            conn.execute("SELECT pg_reload_conf()")
        yield url
    finally:
        server.destroy()
        shutil.rmtree(root, ignore_errors=True)


def _with_user(url: str, userinfo: str, database: str = "postgres") -> str:
    host = url.split("@", 1)[1].split("/", 1)[0]
    query = "?" + url.split("?", 1)[1] if "?" in url else ""  # the test server's password file
    return f"postgresql://{userinfo}@{host}/{database}{query}"


@pytest.mark.parametrize(
    "how, said, hint",
    [
        ("wrong password", "password authentication failed", "check the password"),
        ("no password", "password", "check the password"),
        ("unknown user", "password authentication failed", "check the password"),
    ],
)
def test_a_refused_password_fails_at_once_and_is_not_called_unreachable(
    estate: Estate, password_server: str, how: str, said: str, hint: str
) -> None:
    import time

    userinfo = {"wrong password": "postgres:wrong-pw-1414", "no password": "postgres", "unknown user": "nobody:x-pw-99"}[how]
    estate.document["servers"]["main"]["url"] = _with_user(password_server, userinfo)
    estate.save()
    started = time.monotonic()
    run = estate.dbplan("plan", "--wait", "30")
    assert run.code == 1
    assert time.monotonic() - started < 10, "a refusal was retried"
    assert "refused the connection" in run.err and said in run.err
    assert f"hint: {hint}" in run.err
    assert "not reachable yet" not in run.err and "check that the server is running" not in run.err
    assert "wrong-pw-1414" not in run.output and "x-pw-99" not in run.output
    assert "internal error" not in run.output


def test_the_right_password_connects(estate: Estate, password_server: str) -> None:
    estate.document["servers"]["main"]["url"] = _with_user(password_server, "postgres:right-pw-2718")
    estate.save()
    run = estate.dbplan("plan")
    assert run.code == 0, run.output


def test_a_role_that_may_not_log_in_is_refused_at_once(estate: Estate) -> None:
    role = estate.name("nologin")
    # With a password: the test servers ask for one over TCP before they look at LOGIN.
    estate.execute("app", f'CREATE ROLE "{role}" NOLOGIN PASSWORD \'nologin-pw\'')
    estate.document["servers"]["main"]["url"] = _with_user(estate.url, f"{role}:nologin-pw")
    estate.save()
    run = estate.dbplan("plan", "--wait", "30")
    assert run.code == 1
    assert f'role "{role}" is not permitted to log in' in run.err and "refused the connection" in run.err
    assert "not reachable yet" not in run.err


def test_the_database_a_url_names_is_the_maintenance_database(estate: Estate) -> None:
    estate.document["servers"]["main"]["url"] = _with_user(estate.url, "postgres", estate.name("nowhere"))
    estate.save()
    missing = estate.dbplan("plan", "--wait", "30")
    assert missing.code == 1
    assert f"server 'main' (database '{estate.name('nowhere')}'," in missing.err
    assert f'database "{estate.name("nowhere")}" does not exist' in missing.err
    assert "for server-wide work: name one that exists" in missing.err
    assert "not reachable yet" not in missing.err

    estate.document["servers"]["main"]["url"] = _with_user(estate.url, "postgres", estate.name("app"))  # exists
    estate.save()
    assert estate.dbplan("plan").code == 0

    # maintenance_database, when set, wins over the url's database.
    estate.document["servers"]["main"]["url"] = _with_user(estate.url, "postgres", estate.name("nowhere"))
    estate.document["servers"]["main"]["maintenance_database"] = "postgres"
    estate.save()
    chosen = estate.dbplan("plan")
    assert chosen.code == 0, chosen.output


# ---------------------------------------------------------------------------
# Sessions that go away, and signals that come early (issue 11, item 28)


def _terminate_dbplan_sessions(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'dbplan'"
        ).fetchall()
    return len(rows)


def test_a_session_lost_while_waiting_for_the_lock_is_said_so_and_the_next_run_resumes(estate: Estate) -> None:
    import psycopg

    from orchestrator.live.locks import migrations_lock_key

    estate.write("app", "2_second.up.sql", "CREATE TABLE second (id int);")
    key = migrations_lock_key(estate.name("app"), "public", "schema_migrations")
    with psycopg.connect(estate.url, dbname=estate.name("app"), autocommit=True, application_name="blocker") as blocker:
        blocker.execute("SELECT pg_advisory_lock(%s::bigint)", (key,))
        process = start_dbplan(estate.plan_file, "apply", "--yes")
        process.wait_for("waiting for the lock on the migrations of service 'app'")
        assert _terminate_dbplan_sessions(estate.url) >= 1
        run = process.finish(timeout=30)
    assert run.code == 1
    assert "internal error" not in run.err and "Traceback" not in run.err
    assert (
        "error: lost the connection to server 'main' while waiting for the lock on the migrations of service 'app'"
    ) in run.err
    assert "nothing of it had started" in run.err
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(1, False)]
    assert estate.dbplan("apply", "--yes").code == 0
    assert "second" in estate.tables("app")


# Run as `python -m orchestrator` runs it (the module is __main__), with SIGTERM delivered
# where Python ignores what a handler raises: in a weakref callback, as importlib's are,
# while jsonschema loads for the plan file.
SWALLOWED_STOP = """
import os, runpy, signal, sys, weakref

class _StopWhileLoading:
    def find_spec(self, name, path=None, target=None):
        if name == "jsonschema" and self in sys.meta_path:
            sys.meta_path.remove(self)
            class Thing: pass
            thing = Thing()
            ref = weakref.ref(thing, lambda _: os.kill(os.getpid(), signal.SIGTERM))
            del thing  # the callback runs now, and Python prints and drops what the handler raised
            del ref
        return None

sys.meta_path.insert(0, _StopWhileLoading())
sys.argv = ["dbplan", *sys.argv[1:]]
runpy.run_module("orchestrator", run_name="__main__", alter_sys=True)
"""


def test_a_stop_swallowed_while_loading_still_stops_python_m_orchestrator(estate: Estate) -> None:
    import subprocess
    import sys

    estate.write("app", "2_second.up.sql", "CREATE TABLE second (id int);\n")
    run = subprocess.run(
        [sys.executable, "-c", SWALLOWED_STOP, "apply", "--yes", "-f", str(estate.plan_file)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "Exception ignored" in run.stderr, run.stderr  # the stop was swallowed on its way
    assert run.returncode == 128 + signal.SIGTERM, run.stdout + run.stderr
    assert "SIGTERM" in run.stdout + run.stderr
    assert "second" not in estate.tables("app")
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(1, False)]


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_in_the_first_moments_ends_in_a_sentence_not_a_traceback(estate: Estate, number: signal.Signals) -> None:
    import time

    estate.write("app", "2_second.up.sql", "CREATE TABLE second (id int);\nSELECT pg_sleep(3);\n")  # outlasts each run
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1, 0.15, 0.25, 0.4):
        process = start_dbplan(estate.plan_file, "apply", "--yes")
        time.sleep(delay)
        process.signal(number)
        run = process.finish(timeout=30)
        if "Traceback" in run.err and "orchestrator" not in run.err:
            continue  # the interpreter's own start (site, runpy), before the first line of dbplan runs
        # Killed before Python took the signal over (-N), or stopped by dbplan (128 + N).
        assert run.code in (-number, 128 + number), f"after {delay} s: exit {run.code}\n{run.err}"
        assert "Traceback" not in run.err and "internal error" not in run.err, f"after {delay} s:\n{run.err}"
        if delay >= 0.25:  # dbplan's code runs by then: it, not the signal's default, ends the process
            assert run.code == 128 + number, f"after {delay} s: exit {run.code}"
        if run.code == 128 + number:
            assert number.name in run.err and ("nothing" in run.err or "stopped" in run.err), run.err
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(1, False)]


@pytest.mark.parametrize("command", [("apply", "--yes"), ("plan",)], ids=["apply", "plan"])
def test_a_stop_that_a_library_swallowed_is_still_honoured(estate: Estate, command: tuple[str, ...]) -> None:
    """The early handler records the signal before it raises: when what it raised is lost
    on the way (a library that catches Exception while Python wraps the stop in one, as
    3.11 does in __set_name__), the command still stops, and apply changes nothing."""
    import subprocess
    import sys

    estate.write("app", "2_second.up.sql", "CREATE TABLE second (id int);\n")
    child = (
        "import sys, orchestrator.__main__ as entry\n"
        "entry.RECEIVED.append(15)  # taken, and its Stopped swallowed on the way\n"
        "from orchestrator.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", child, *command, "-f", str(estate.plan_file)], capture_output=True, text=True, timeout=60
    )

    assert run.returncode == 143, run.stdout + run.stderr
    assert "SIGTERM" in run.stderr and "Traceback" not in run.stderr
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(1, False)]
    assert "second" not in estate.tables("app")


def test_sessions_terminated_at_random_moments_never_end_in_an_internal_error(
    tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import random
    import time

    from processes import assert_applied_exactly_once, race_estate

    from pgcluster import drop_databases_with_prefix

    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    latest = race_estate(estate, migrations=12, sleep=0.01)
    rng = random.Random(11)
    endings: list[int] = []
    for _ in range(10):
        # Two runs at once, so that one of them is often waiting for the other's lock.
        processes = [start_dbplan(estate.plan_file, "apply", "--yes") for _ in range(2)]
        # From the first session on (planning, creating roles and databases, waiting, migrating), at a random moment.
        wait_until(
            lambda: dbplan_backends(estate.url) or all(p.process.poll() is not None for p in processes), what="a session"
        )
        time.sleep(rng.uniform(0, 0.5))
        _terminate_dbplan_sessions(estate.url)
        for process in processes:
            run = process.finish(timeout=60)
            endings.append(run.code)
            assert run.code in (0, 1), run.err
            assert "internal error" not in run.err and "Traceback" not in run.err, run.err
            if run.code == 1:
                assert "error: " in run.err and "server 'main'" in run.err, run.err
        final = estate.dbplan("apply", "--yes")  # picks up where the cut run stopped
        assert final.code == 0, final.output
        for service in ("orders", "billing"):
            assert_applied_exactly_once(estate, service, service, range(1, latest[service] + 1))
        drop_databases_with_prefix(estate.url, dbname_prefix)  # the next round starts from nothing
    assert endings.count(1) >= 3, f"too few rounds were cut short: {endings}"

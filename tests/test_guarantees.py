"""Guarantees no migration can break (issue 11): nothing applied twice, the bookkeeping
found where it is, each migration from the same session state.

The session advisory lock, ``current_schema()`` and the session's settings are all things
a migration can change; these tests change them from inside migrations, the way a real
project (or an attacker with a migration file) would, and check what a user notices: exit
codes, output, and what is in the database afterwards.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from estate import Estate
from processes import (
    Finished,
    TableGate,
    dbplan_backends,
    finish,
    start_dbplan,
    wait_until,
)

LATEST = 8


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    return Estate(tmp_path, pg_url, dbname_prefix, capsys)


# --------------------------------------------------------------------------- item 2: the lock


def _logging_estate(estate: Estate, dropper: str, *, no_transaction: bool, gated_begin: str = "") -> None:
    """Service 'app': 1 creates a log, 2 releases the session lock (``dropper``), 3 waits for
    the test's gate, every migration from 2 on writes its version into the log: a version
    applied twice shows up as two rows, since an INSERT never conflicts."""
    from orchestrator.live.locks import migrations_lock_key

    key = migrations_lock_key(estate.name("app"), "public", "schema_migrations")
    header = "-- dbplan:no-transaction\n" if no_transaction else ""
    estate.write("app", "1_log.up.sql", "CREATE TABLE applied_log (version int NOT NULL);\n")
    estate.write(
        "app", "2_drop_lock.up.sql", header + dropper.format(key=key) + "\nINSERT INTO applied_log VALUES (2);\n"
    )
    gated = "SELECT count(*) FROM gate;\nINSERT INTO applied_log VALUES (3);\n"
    if gated_begin:  # the file wraps itself in a transaction of its own kind
        gated = f"{gated_begin};\n{gated}COMMIT;\n"
    estate.write("app", "3_gated.up.sql", gated)
    for version in range(4, LATEST + 1):
        estate.write(
            "app", f"{version}_step.up.sql", f"SELECT pg_sleep(0.05);\nINSERT INTO applied_log VALUES ({version});\n"
        )


LOCK_DROPPERS = [
    pytest.param("SELECT pg_advisory_unlock_all();", False, "", id="unlock-all-in-a-transaction"),
    pytest.param("SELECT pg_advisory_unlock({key}::bigint);", False, "", id="unlock-the-key-in-a-transaction"),
    pytest.param("DISCARD ALL;", True, "", id="discard-all-outside-a-transaction"),
    pytest.param("SELECT pg_advisory_unlock_all();", True, "", id="unlock-all-outside-a-transaction"),
    # a transaction that keeps the snapshot of its first query, taken before the wait
    pytest.param(
        "SELECT pg_advisory_unlock_all();", False, "BEGIN ISOLATION LEVEL REPEATABLE READ", id="repeatable-read-file"
    ),
]


def _two_runs(estate: Estate, *how: str) -> tuple[Finished, Finished]:
    """Start an apply, wait until it is in migration 3 (behind the gate), start a second
    one and wait until it waits for a lock or ends; then open the gate and let both end.
    The second run gets the lock the first one lost, or waits for it where dbplan took it
    again; either way it must not get past the first one's migration 3."""
    gate = TableGate(estate.url, estate.name("app"), "public.gate")
    try:
        first = start_dbplan(estate.plan_file, "apply", "--yes", *how)
        # Any lock wait: the first run is the only one so far (and a long migration 2 pushes
        # the "FROM gate" of 3 past the first kilobyte of the query pg_stat_activity shows).
        wait_until(lambda: dbplan_backends(estate.url, waiting_for_lock=True), what="migration 3")
        second = start_dbplan(estate.plan_file, "apply", "--yes", *how)
        wait_until(
            lambda: "waiting for the lock" in second.err
            or len(dbplan_backends(estate.url, waiting_for_lock=True)) >= 2
            or second.process.poll() is not None,
            timeout=30,
            what="the second run to wait or end",
        )
    finally:
        gate.open()
    return finish(first), finish(second)


def _assert_each_version_applied_once(estate: Estate) -> None:
    """In the log, the history and schema_migrations of public, wherever a migration put
    the search_path."""
    log = estate.query("app", "SELECT version, count(*) FROM public.applied_log GROUP BY version ORDER BY version")
    assert log == [(version, 1) for version in range(2, LATEST + 1)], "a migration ran twice"
    history = estate.query(
        "app",
        "SELECT version, count(*) FROM public.dbplan_history WHERE event = 'apply' GROUP BY version ORDER BY version",
    )
    assert history == [(version, 1) for version in range(1, LATEST + 1)]
    assert estate.query("app", "SELECT version, dirty FROM public.schema_migrations") == [(LATEST, False)]


def _assert_second_one_pass_applied_nothing(second: Finished) -> None:
    """The second run found the bookkeeping moved on since the plan was saved: refused, or
    (having waited for the first to finish) at the plan's end, with nothing left to do."""
    assert second.code == 0 or "changed since the plan was saved" in second.out + second.err, second.err
    assert not re.findall(r"apply app \d+ \w+: done", second.err), second.err


@pytest.mark.parametrize(("dropper", "no_transaction", "gated_begin"), LOCK_DROPPERS)
def test_a_migration_that_releases_the_lock_lets_no_second_run_apply_anything_twice(
    estate: Estate, dropper: str, no_transaction: bool, gated_begin: str
) -> None:
    estate.add_app()
    assert estate.dbplan("apply", "--yes").code == 0  # the database, nothing in it
    _logging_estate(estate, dropper, no_transaction=no_transaction, gated_begin=gated_begin)
    runs = _two_runs(estate)

    for run in runs:
        assert run.code == 0, run.err
    _assert_each_version_applied_once(estate)
    done = [re.findall(r"apply app (\d+) \w+: done", run.err) for run in runs]
    assert sorted(int(v) for versions in done for v in versions) == list(range(1, LATEST + 1)), done


@pytest.mark.parametrize(("dropper", "no_transaction", "gated_begin"), LOCK_DROPPERS)
def test_a_migration_that_releases_the_lock_lets_no_second_one_pass_run_apply_anything_twice(
    estate: Estate, dropper: str, no_transaction: bool, gated_begin: str
) -> None:
    """The same, with the reviewed saved plan applied in one pass by both runs: the lock is
    taken together with the pooler check, and left to the session's end to release."""
    estate.add_app()
    assert estate.dbplan("apply", "--yes").code == 0
    _logging_estate(estate, dropper, no_transaction=no_transaction, gated_begin=gated_begin)
    saved = estate.root / "plan.json"
    assert estate.dbplan("plan", "--out", str(saved)).code == 0
    first, second = _two_runs(estate, "--one-pass", str(saved))

    assert first.code == 0, first.err
    _assert_second_one_pass_applied_nothing(second)
    _assert_each_version_applied_once(estate)


# A migration that puts a schema of its own before pg_catalog in the database's search_path,
# then releases the lock: every later session of the database (the second run's) resolves
# unqualified names there first. What dbplan's guarantees rest on must not be among them.
_SHADOW_PATHS = [
    pytest.param(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET search_path = shadow, pg_catalog, public', "
        "current_database()); END $$;\n",
        id="for-the-database",
    ),
    # The role's setting in this database wins over the database's.
    pytest.param(
        "DO $$ BEGIN EXECUTE format('ALTER ROLE CURRENT_USER IN DATABASE %I SET search_path = shadow, pg_catalog, "
        "public', current_database()); END $$;\n",
        id="for-the-role-in-the-database",
    ),
]
SHADOWS = [
    pytest.param(
        "CREATE VIEW shadow.pg_class AS SELECT * FROM pg_catalog.pg_class WHERE false;\n"
        "CREATE VIEW shadow.pg_namespace AS SELECT * FROM pg_catalog.pg_namespace WHERE false;\n",
        id="catalogs-that-hide-the-bookkeeping",
    ),
    pytest.param(
        "CREATE FUNCTION shadow.same(bigint, integer) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true';\n"
        "CREATE FUNCTION shadow.same(bigint, bigint) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true';\n"
        "CREATE FUNCTION shadow.same(boolean, boolean) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true';\n"
        "CREATE OPERATOR shadow.= (LEFTARG = bigint, RIGHTARG = integer, FUNCTION = shadow.same);\n"
        "CREATE OPERATOR shadow.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = shadow.same);\n"
        "CREATE OPERATOR shadow.= (LEFTARG = boolean, RIGHTARG = boolean, FUNCTION = shadow.same);\n"
        "CREATE FUNCTION shadow.cat(text, bigint) RETURNS text LANGUAGE sql IMMUTABLE AS $f$SELECT '1'$f$;\n"
        "CREATE OPERATOR shadow.|| (LEFTARG = text, RIGHTARG = bigint, FUNCTION = shadow.cat);\n",
        id="operators-that-say-every-version-matches",
    ),
    pytest.param(
        "CREATE FUNCTION shadow.pg_try_advisory_lock(bigint) RETURNS boolean LANGUAGE sql AS 'SELECT true';\n"
        "CREATE FUNCTION shadow.pg_try_advisory_xact_lock(bigint) RETURNS boolean LANGUAGE sql AS 'SELECT true';\n"
        "CREATE FUNCTION shadow.to_regclass(text) RETURNS regclass LANGUAGE sql AS 'SELECT NULL::regclass';\n"
        "CREATE FUNCTION shadow.current_schema() RETURNS name LANGUAGE sql AS $f$SELECT 'shadow'::name$f$;\n",
        id="functions-that-say-the-lock-is-free-and-no-table-exists",
    ),
]


@pytest.mark.parametrize("one_pass", [False, True], ids=["plan-and-apply", "one-pass"])
@pytest.mark.parametrize("shadow", SHADOWS)
@pytest.mark.parametrize("path", _SHADOW_PATHS)
def test_a_migration_that_shadows_the_catalog_lets_no_second_run_apply_anything_twice(
    estate: Estate, path: str, shadow: str, one_pass: bool
) -> None:
    estate.add_app()
    assert estate.dbplan("apply", "--yes").code == 0
    dropper = "CREATE SCHEMA shadow;\n" + shadow + path + "SELECT pg_advisory_unlock_all();"
    _logging_estate(estate, dropper, no_transaction=False)
    saved = estate.root / "plan.json"
    assert estate.dbplan("plan", "--out", str(saved)).code == 0
    first, second = _two_runs(estate, *(["--one-pass", str(saved)] if one_pass else []))

    assert first.code == 0, first.err
    if one_pass:
        _assert_second_one_pass_applied_nothing(second)
    else:
        assert second.code == 0, second.err
    _assert_each_version_applied_once(estate)
    assert estate.query("app", "SELECT to_regclass('shadow.schema_migrations') IS NULL") == [(True,)]
    again = estate.dbplan("plan", "--format", "json")
    assert again.code == 0, again.output
    (service,) = json.loads(again.out)["services"]
    assert (service["current"], service["pending"], service["bookkeeping"]) == (LATEST, [], "public.schema_migrations")


# --------------------------------------------------------------------------- item 1: where the bookkeeping is

MOVERS = [
    pytest.param("CREATE SCHEMA AUTHORIZATION CURRENT_USER;", id="schema-named-like-the-role"),
    pytest.param(
        "CREATE SCHEMA elsewhere;\n"
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET search_path = elsewhere, public', current_database()); END $$;",
        id="database-search-path",
    ),
]


@pytest.mark.parametrize("owner", [True, False], ids=["owner-role", "no-owner"])
@pytest.mark.parametrize("mover", MOVERS)
def test_the_bookkeeping_is_found_where_it_is_whatever_a_migration_does_to_schemas(
    estate: Estate, mover: str, owner: bool
) -> None:
    if owner:
        estate.add_role("svc")
    estate.add_database("app", owner="svc" if owner else None)
    estate.add_service("app", "app")
    estate.write("app", "1_move.up.sql", mover + "\nCREATE TABLE public.first (id int);\n")
    assert estate.dbplan("apply", "--yes").code == 0
    estate.write("app", "2_second.up.sql", "CREATE TABLE public.second (id int);\n")

    planned = estate.dbplan("plan", "--format", "json")
    assert planned.code == 0, planned.output
    (service,) = json.loads(planned.out)["services"]
    assert (service["current"], service["pending"], service["bookkeeping"]) == (1, [2], "public.schema_migrations")
    text = estate.dbplan("plan")
    assert "at 1 -> 2" in text.out and "bookkeeping in public.schema_migrations" in text.out, text.out

    applied = estate.dbplan("apply", "--yes")
    assert applied.code == 0, applied.output  # version 1 again would fail: its schema exists
    assert "Apply complete: 1 done." in applied.out
    assert estate.query("app", "SELECT version, count(*) FROM dbplan_history GROUP BY version ORDER BY 1") == [(1, 1), (2, 1)]
    status = estate.dbplan("status")
    assert status.code == 0
    assert re.search(r"^app\s+\S+\s+2\s+2\s+0\s+no\s+-\s+public\.schema_migrations$", status.out, re.M), status.out
    assert estate.dbplan("plan", "--detailed-exitcode").code == 0


@pytest.mark.parametrize(
    "explicit",
    [
        pytest.param({"schema": "public"}, id="schema-public-and-the-default"),
        pytest.param({"schema": "public", "table": "dbplan"}, id="history-tables-collide"),
    ],
)
def test_two_services_on_one_bookkeeping_table_are_a_located_error(estate: Estate, explicit: dict[str, str]) -> None:
    estate.add_database("shared")
    estate.add_service("first", "shared", **explicit)
    estate.add_service("second", "shared")
    estate.write("first", "1_a.up.sql", "CREATE TABLE a (id int);\n")
    estate.write("second", "1_b.up.sql", "CREATE TABLE b (id int);\n")
    assert estate.dbplan("apply", "--yes").code == 1  # the database is missing: it is created, then refused
    for command in ("plan", "status", "apply"):
        run = estate.dbplan(command, *(["--yes"] if command == "apply" else []))
        assert run.code == 1, (command, run.output)
        assert "services 'first' and 'second' would share the bookkeeping table public." in run.err, run.err
        assert re.search(r"dbplan\.yaml:\d+:\d+", run.err), run.err  # where in the plan file
        assert "hint: give one of them a schema or table of its own" in run.err
    assert not {"a", "b"} & estate.tables("shared"), "neither service's migrations ran"


# --------------------------------------------------------------------------- item 3: force during an apply


@pytest.mark.parametrize("no_transaction", [True, False], ids=["in-a-no-transaction-migration", "in-a-transaction"])
def test_force_during_an_apply_waits_says_so_and_refuses_what_is_no_longer_true(
    estate: Estate, no_transaction: bool
) -> None:
    estate.add_app()
    estate.write("app", "1_log.up.sql", "CREATE TABLE applied_log (version int NOT NULL);\n")
    assert estate.dbplan("apply", "--yes").code == 0
    header = "-- dbplan:no-transaction\n" if no_transaction else ""
    estate.write("app", "2_gated.up.sql", header + "SELECT count(*) FROM gate;\nINSERT INTO applied_log VALUES (2);\n")
    estate.write("app", "3_after.up.sql", "INSERT INTO applied_log VALUES (3);\n")
    gate = TableGate(estate.url, estate.name("app"), "gate")
    try:
        apply = start_dbplan(estate.plan_file, "apply", "--yes")
        wait_until(lambda: dbplan_backends(estate.url, "%FROM gate%", waiting_for_lock=True), what="migration 2")
        # What a person sees now: dirty at 2 (or at 1); they force 1, "run 2 again".
        force = start_dbplan(estate.plan_file, "force", "app", "1", "--reason", "run 2 again")
        force.wait_for("waiting for the lock on the migrations of service 'app'")
    finally:
        gate.open()
    applied, forced = finish(apply), finish(force)

    assert applied.code == 0, applied.err
    assert forced.code == 1, forced.err
    assert "changed while force waited for the lock" in forced.err, forced.err
    assert "version 1 was not recorded" in forced.err
    assert "now they are at version 3" in forced.err
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(3, False)]
    assert estate.query("app", "SELECT count(*) FROM dbplan_history WHERE event = 'force'") == [(0,)]
    again = estate.dbplan("apply", "--yes")
    assert again.code == 0 and "No changes." in again.out, again.output
    assert estate.query("app", "SELECT version FROM applied_log ORDER BY 1") == [(2,), (3,)]


def test_force_records_when_nothing_changed_while_it_waited(estate: Estate) -> None:
    from orchestrator.live.locks import migrations_lock_key

    estate.add_app()
    estate.write("app", "1_broken.up.sql", "-- dbplan:no-transaction\nCREATE TABLE t (id int);\nSELECT missing;\n")
    assert estate.dbplan("apply", "--yes").code == 1  # dirty at 1
    key = migrations_lock_key(estate.name("app"), "public", "schema_migrations")
    import psycopg

    with psycopg.connect(estate.url, dbname=estate.name("app"), autocommit=True, application_name="holder") as holder:
        holder.execute("SELECT pg_advisory_lock(%s::bigint)", (key,))
        force = start_dbplan(estate.plan_file, "force", "app", "1", "--reason", "fixed by hand")
        force.wait_for("waiting for the lock on the migrations of service 'app', held by 'holder'")
    forced = finish(force)
    assert forced.code == 0, forced.err
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(1, False)]


# --------------------------------------------------------------------------- item 27: the same session state

SESSION_CHANGES = [
    pytest.param("SET search_path = other, public;", "current_schema()", id="set-search-path"),
    pytest.param("SELECT set_config('search_path', 'other', false);", "current_schema()", id="set-config-search-path"),
    pytest.param("SET check_function_bodies = false;", "current_setting('check_function_bodies')", id="check-function-bodies"),
    # (standard_conforming_strings itself may not be changed by a migration: test_parser_view)
    pytest.param("SET datestyle = 'SQL, DMY';", "current_setting('datestyle')", id="datestyle"),
    pytest.param("SET ROLE {other};", "current_user", id="set-role"),
    pytest.param("SET SESSION AUTHORIZATION {other};", "session_user", id="session-authorization"),
    pytest.param("SET search_path = other, public;\nDEALLOCATE ALL;", "current_schema()", id="set-then-deallocate"),
    pytest.param("-- dbplan:no-transaction\nSET search_path = other, public;", "current_schema()", id="outside-a-transaction"),
]


@pytest.mark.parametrize(("change", "probe"), SESSION_CHANGES)
def test_each_migration_starts_from_the_same_session_state(estate: Estate, change: str, probe: str) -> None:
    other = estate.add_role("other")
    estate.add_app()
    estate.write("app", "1_probe.up.sql", "CREATE SCHEMA other;\nCREATE TABLE public.probe (version int, value text);\n")
    assert estate.dbplan("apply", "--yes").code == 0
    fresh = estate.query("app", f"SELECT {probe}")[0][0]  # what a migration sees in a fresh session
    estate.execute("app", f"GRANT ALL ON SCHEMA public TO {other}; GRANT ALL ON public.probe TO {other}")
    estate.write("app", "2_change.up.sql", change.format(other=other) + "\n")
    for version in (3, 4, 5):
        estate.write(
            "app", f"{version}_probe.up.sql",
            f"INSERT INTO public.probe VALUES ({version}, {probe});\nCREATE TABLE t{version} (id int);\n",
        )  # fmt: skip
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    assert estate.query("app", "SELECT version, value FROM public.probe ORDER BY 1") == [(3, fresh), (4, fresh), (5, fresh)]
    assert {"t3", "t4", "t5"} <= estate.tables("app"), "the tables went where a fresh session puts them"


# --------------------------------------------------------------------------- item 26: a trigger on schema_migrations

VERSION_LOG = """\
CREATE TABLE version_log (id serial PRIMARY KEY, version bigint, dirty boolean);
CREATE FUNCTION log_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO version_log (version, dirty) VALUES (NEW.version, NEW.dirty);
  RETURN NEW;
END $$;
CREATE TRIGGER log_version AFTER INSERT ON schema_migrations FOR EACH ROW EXECUTE FUNCTION log_version();
"""


def test_a_trigger_on_schema_migrations_sees_an_insert_per_version_as_under_golang_migrate(estate: Estate) -> None:
    estate.add_app()
    estate.write("app", "1_trigger.up.sql", VERSION_LOG)
    for version in (2, 3, 5, 6):  # 2 and 3 in one batch, 5 and 6 in another
        estate.write("app", f"{version}_t.up.sql", f"CREATE TABLE t{version} (id int);\n")
    estate.write("app", "4_index.up.sql", "-- dbplan:no-transaction\nCREATE INDEX CONCURRENTLY t3_id ON t3 (id);\n")
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    # golang-migrate: one INSERT per version; around a no-transaction one, dirty then clean.
    assert estate.query("app", "SELECT version, dirty FROM version_log ORDER BY id") == [
        (1, False), (2, False), (3, False), (4, True), (4, False), (5, False), (6, False),
    ]  # fmt: skip
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(6, False)]


def test_while_a_no_transaction_migration_runs_on_after_releasing_the_lock_others_see_it_in_progress(
    estate: Estate,
) -> None:
    estate.add_app()
    assert estate.dbplan("apply", "--yes").code == 0
    estate.write("app", "1_index.up.sql", "-- dbplan:no-transaction\nDISCARD ALL;\nSELECT count(*) FROM gate;\n")
    gate = TableGate(estate.url, estate.name("app"), "gate")
    try:
        first = start_dbplan(estate.plan_file, "apply", "--yes")
        wait_until(lambda: dbplan_backends(estate.url, "%FROM gate%", waiting_for_lock=True), what="migration 1")
        second = start_dbplan(estate.plan_file, "apply", "--yes")
        second.wait_for("service 'app' is dirty at version 1 because another run is applying it right now")
        force = start_dbplan(estate.plan_file, "force", "app", "0")
        force.wait_for("waiting for the lock on the migrations of service 'app'")
    finally:
        gate.open()
    runs = [finish(first), finish(second), finish(force)]
    # One assertion per run: a list of three stderr texts is cut short in the report.
    assert runs[0].code == 0, runs[0].err
    assert runs[1].code == 0, runs[1].err
    assert runs[2].code == 1, runs[2].err
    assert "changed while force waited for the lock" in runs[2].err
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(1, False)]

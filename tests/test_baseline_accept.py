"""``dbplan baseline`` (a database made by hand counts as migrated up to a version) and
``dbplan accept`` (an applied file edited on purpose): what they record, what plan sees
afterwards, each refusal changing nothing, and both under the lock apply takes."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from estate import Estate
from processes import TableGate, dbplan_backends, finish, start_dbplan, wait_until


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    return Estate(tmp_path, pg_url, dbname_prefix, capsys)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def three_files(estate: Estate) -> list[Path]:
    estate.add_app()
    return [
        estate.write("app", "1_users.up.sql", "CREATE TABLE users (id int);\n"),
        estate.write("app", "2_orders.up.sql", "CREATE TABLE orders (id int);\n"),
        estate.write("app", "3_prices.up.sql", "CREATE TABLE prices (id int);\n"),
    ]


def made_by_hand(estate: Estate) -> None:
    """The database and the schema of files 1 and 2, made without any migration tool."""
    with __import__("psycopg").connect(estate.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{estate.name("app")}"')
    estate.execute("app", "CREATE TABLE users (id int); CREATE TABLE orders (id int);")


def history(estate: Estate) -> list[tuple[object, ...]]:
    return estate.query("app", "SELECT version, event, checksum, reason FROM dbplan_history ORDER BY id")


def bookkeeping(estate: Estate) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """schema_migrations and the history, or what stands for them when they are absent."""
    tables = estate.tables("app")
    migrations = estate.query("app", "SELECT version, dirty FROM schema_migrations") if "schema_migrations" in tables else []
    return migrations, (history(estate) if "dbplan_history" in tables else [])


# --------------------------------------------------------------------------- baseline


def test_baseline_counts_a_hand_made_database_as_migrated_and_apply_runs_only_the_rest(estate: Estate) -> None:
    from orchestrator.execution.bookkeeping import applied_by

    files = three_files(estate)
    made_by_hand(estate)

    run = estate.dbplan("baseline", "app", "2", "--reason", "schema made by hand in 2019")

    assert run.code == 0, run.output
    assert run.out == (
        "service 'app' is now recorded at version 2 (from no version): 2 migrations up to "
        "migrations/app/2_orders.up.sql counted as applied, not run.\n"
    )
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(2, False)]
    assert history(estate) == [
        (1, "baseline", sha(files[0]), "schema made by hand in 2019"),
        (2, "baseline", sha(files[1]), "schema made by hand in 2019"),
    ]
    assert estate.query("app", "SELECT DISTINCT applied_by FROM dbplan_history") == [(applied_by(),)]
    plan = json.loads(estate.dbplan("plan", "--format", "json").out)
    assert [a["version"] for a in plan["actions"]] == [3]
    assert plan["services"][0]["current"] == 2 and plan["services"][0]["drift"] == []

    applied = estate.dbplan("apply", "--yes")
    assert applied.code == 0, applied.output
    assert estate.tables("app") >= {"users", "orders", "prices"}
    # The checksums are known from the baseline on: an edit of a baselined file is drift.
    files[0].write_text("CREATE TABLE users (id int);  -- edited\n")
    assert "version 1 was changed after it was applied" in estate.dbplan("plan").out


def test_baseline_above_what_dbplan_applied_records_only_the_rest(estate: Estate) -> None:
    files = three_files(estate)
    files[1].rename(files[1].with_suffix(".later"))
    files[2].rename(files[2].with_suffix(".later"))
    assert estate.dbplan("apply", "--yes").code == 0  # dbplan applies 1
    for file in files[1:]:
        file.with_suffix(".later").rename(file)
    estate.execute("app", "CREATE TABLE orders (id int); CREATE TABLE prices (id int);")  # 2 and 3 by hand

    run = estate.dbplan("baseline", "app", "3")

    assert run.code == 0, run.output
    assert "(from version 1): 2 migrations up to migrations/app/3_prices.up.sql" in run.out
    assert [row[:2] for row in history(estate)] == [(1, "apply"), (2, "baseline"), (3, "baseline")]
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(3, False)]
    assert estate.dbplan("plan", "--detailed-exitcode").code == 0


def test_baseline_of_a_golang_migrate_database_keeps_what_it_applied(estate: Estate) -> None:
    three_files(estate)
    estate.write("app", "4_stock.up.sql", "CREATE TABLE stock (id int);\n")
    made_by_hand(estate)
    # golang-migrate applied 1 and 2 (no history); 3 was made by hand.
    estate.execute("app", "CREATE TABLE schema_migrations (version bigint PRIMARY KEY, dirty boolean NOT NULL);"
                   "INSERT INTO schema_migrations VALUES (2, false); CREATE TABLE prices (id int);")  # fmt: skip

    run = estate.dbplan("baseline", "app", "3", "--reason", "prices by hand")

    assert run.code == 0, run.output
    assert [row[:2] for row in history(estate)] == [(2, "baseline"), (3, "baseline")]
    assert history(estate)[0][3].startswith("adopted:")
    plan = json.loads(estate.dbplan("plan", "--format", "json").out)
    assert [a["version"] for a in plan["actions"]] == [4], "1 and 2 stay applied, not out of order"
    assert plan["services"][0]["current"] == 3


def test_baseline_refuses_a_version_without_a_file_and_changes_nothing(estate: Estate) -> None:
    three_files(estate)
    made_by_hand(estate)

    run = estate.dbplan("baseline", "app", "4")

    assert run.code == 1
    assert "service 'app' has no migration with version 4 in migrations/app" in run.err
    assert re.search(r"dbplan\.yaml:\d+:\d+", run.err), run.err  # where the service's folder is named
    assert "did you mean 3?" in run.err and "versions there: 1, 2, 3" in run.err
    assert estate.tables("app") == {"users", "orders"}, "no bookkeeping created"


@pytest.mark.parametrize(
    ("setup", "version", "message"),
    [
        ("UPDATE schema_migrations SET version = 3, dirty = true", 3, "is dirty at version 3"),
        ("SELECT", 2, "is already at version 2: there is nothing to baseline"),
        ("SELECT", 1, "is at version 2, above 1: a baseline only counts"),
    ],
    ids=["dirty", "at-the-version", "above-the-version"],
)
def test_baseline_refuses_and_changes_nothing(estate: Estate, setup: str, version: int, message: str) -> None:
    files = three_files(estate)
    files[2].rename(files[2].with_suffix(".later"))
    assert estate.dbplan("apply", "--yes").code == 0
    files[2].with_suffix(".later").rename(files[2])
    estate.execute("app", setup)
    before = bookkeeping(estate)

    run = estate.dbplan("baseline", "app", str(version))

    assert run.code == 1, run.output
    assert message in run.err
    assert bookkeeping(estate) == before


def test_baseline_refuses_a_database_that_does_not_exist(estate: Estate) -> None:
    three_files(estate)
    run = estate.dbplan("baseline", "app", "2")
    assert run.code == 1
    assert f"database '{estate.name('app')}' of service 'app' does not exist on server 'main'" in run.err
    assert not estate.database_exists("app")


def test_baseline_refuses_a_version_above_the_target(estate: Estate) -> None:
    three_files(estate)
    estate.document["services"]["app"]["target"] = 1
    estate.save()
    made_by_hand(estate)
    run = estate.dbplan("baseline", "app", "2")
    assert run.code == 1
    assert "its target is 1, so the next apply would revert" in run.err
    assert estate.tables("app") == {"users", "orders"}


def test_baseline_as_json_says_what_it_recorded_or_why_not(estate: Estate) -> None:
    files = three_files(estate)
    made_by_hand(estate)

    done = estate.dbplan("baseline", "app", "2", "--format", "json")
    refused = estate.dbplan("baseline", "app", "2", "--format", "json")

    assert done.code == 0, done.output
    result = json.loads(done.out)
    assert result["ok"] is True and result["command"] == "baseline"
    assert (result["service"], result["version"], result["version_after"]) == ("app", 2, 2)
    assert result["recorded"] == [
        {"version": 1, "title": "users", "checksum": sha(files[0]), "event": "baseline", "reason": None},
        {"version": 2, "title": "orders", "checksum": sha(files[1]), "event": "baseline", "reason": None},
    ]
    assert refused.code == 1
    refusal = json.loads(refused.out)
    assert refusal["ok"] is False and refusal["recorded"] == []
    assert "already at version 2" in refusal["error"]["message"]


# --------------------------------------------------------------------------- accept


def test_accept_records_the_edit_beside_the_old_checksum_and_drift_goes_away(estate: Estate) -> None:
    files = three_files(estate)
    assert estate.dbplan("apply", "--yes").code == 0
    old = sha(files[0])
    files[0].write_text("CREATE TABLE IF NOT EXISTS users (id int);\n")
    assert estate.dbplan("plan", "--fail-on", "drift").code == 1

    run = estate.dbplan("accept", "app", "1", "--reason", "made idempotent")

    assert run.code == 0, run.output
    assert run.out == (
        f"accepted the edit of migrations/app/1_users.up.sql (version 1 of service 'app'): recorded sha256 "
        f"{old[:12]} is now {sha(files[0])[:12]}; the history keeps both.\n"
    )
    rows = estate.query("app", "SELECT version, event, checksum, reason FROM dbplan_history WHERE version = 1 ORDER BY id")
    assert rows == [(1, "apply", old, None), (1, "accept", sha(files[0]), "made idempotent")]
    clean = estate.dbplan("plan", "--fail-on", "drift", "--detailed-exitcode")
    assert clean.code == 0, clean.output
    assert "changed after it was applied" not in clean.out
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(3, False)]

    files[0].write_text("CREATE TABLE IF NOT EXISTS users (id int);  -- again\n")
    again = estate.dbplan("plan", "--fail-on", "drift")
    assert again.code == 1 and "service 'app' has drift: applied files changed or gone (1)" in again.err


def test_accept_gives_a_golang_migrate_version_its_first_checksum(estate: Estate) -> None:
    files = three_files(estate)
    made_by_hand(estate)
    estate.execute("app", "CREATE TABLE schema_migrations (version bigint PRIMARY KEY, dirty boolean NOT NULL);"
                   "INSERT INTO schema_migrations VALUES (2, false);")  # fmt: skip

    run = estate.dbplan("accept", "app", "1", "--reason", "checked against production")

    assert run.code == 0, run.output
    assert "had no recorded checksum (applied before dbplan kept history)" in run.out
    assert [row[:3] for row in history(estate)] == [(2, "baseline", None), (1, "accept", sha(files[0]))]
    plan = json.loads(estate.dbplan("plan", "--format", "json").out)
    assert [a["version"] for a in plan["actions"]] == [3], "1 and 2 stay applied"
    files[0].write_text("CREATE TABLE users (id bigint);\n")
    files[1].write_text("CREATE TABLE orders (id bigint);\n")
    drift = json.loads(estate.dbplan("plan", "--format", "json").out)["services"][0]["drift"]
    assert [d["version"] for d in drift] == [1], "1 is known from now on; 2 is still unknown"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["3", "--reason", "x"], "version 3 of service 'app' (migrations/app/3_prices.up.sql) is not applied"),
        (["2", "--reason", "x"], "version 2 of service 'app' has no drift"),
        (["7", "--reason", "x"], "service 'app' has no migration with version 7"),
        (["1", "--reason", " "], "accept needs a reason"),
        (["1"], "Missing option '--reason'"),
        (["1", "--reason", "x", "--file-typo"], "No such option"),
    ],
    ids=["not-applied", "no-drift", "no-file", "blank-reason", "no-reason", "usage"],
)
def test_accept_refuses_and_changes_nothing(estate: Estate, args: list[str], message: str) -> None:
    files = three_files(estate)
    files[2].rename(files[2].with_suffix(".later"))
    assert estate.dbplan("apply", "--yes").code == 0
    files[2].with_suffix(".later").rename(files[2])
    files[0].write_text("CREATE TABLE users (id int);  -- edited\n")
    before = bookkeeping(estate)

    run = estate.dbplan("accept", "app", *args)

    assert run.code == 1, run.output
    assert message in run.err, run.err
    assert bookkeeping(estate) == before


def test_accept_refuses_a_dirty_service(estate: Estate) -> None:
    files = three_files(estate)
    assert estate.dbplan("apply", "--yes").code == 0
    files[0].write_text("CREATE TABLE users (id int);  -- edited\n")
    estate.execute("app", "UPDATE schema_migrations SET dirty = true")
    before = bookkeeping(estate)
    run = estate.dbplan("accept", "app", "1", "--reason", "x")
    assert run.code == 1 and "is dirty at version 3" in run.err
    assert bookkeeping(estate) == before


def test_accept_as_json_is_shaped_like_force_and_baseline(estate: Estate) -> None:
    files = three_files(estate)
    assert estate.dbplan("apply", "--yes").code == 0
    files[1].write_text("CREATE TABLE orders (id int);  -- edited\n")

    accepted = json.loads(estate.dbplan("accept", "app", "2", "--reason", "comment", "--format", "json").out)
    forced = json.loads(estate.dbplan("force", "app", "3", "--format", "json").out)

    assert accepted.keys() == forced.keys()
    assert accepted["recorded"] == [
        {"version": 2, "title": "orders", "checksum": sha(files[1]), "event": "accept", "reason": "comment"}
    ]
    assert accepted["version_after"] == 3 and accepted["ok"] is True
    assert forced["recorded"][0]["event"] == "force" and forced["version_after"] == 3


def test_history_shows_baseline_and_accept_events(estate: Estate) -> None:
    files = three_files(estate)
    made_by_hand(estate)
    baselined = sha(files[0])
    assert estate.dbplan("baseline", "app", "2", "--reason", "by hand").code == 0
    files[0].write_text("CREATE TABLE users (id int);  -- comment fixed\n")
    assert estate.dbplan("accept", "app", "1", "--reason", "comment fixed").code == 0

    text = estate.dbplan("history", "app")
    as_json = json.loads(estate.dbplan("history", "app", "--format", "json").out)

    assert text.code == 0, text.output
    events = [line.split()[:4] for line in text.out.splitlines()[2:]]
    assert events == [["1", "1", "baseline", "users"], ["2", "2", "baseline", "orders"], ["3", "1", "accept", "users"]]
    # Nothing ran: no duration; the checksum column shows what the accept changed.
    accepted = rf"accept\s+users\s+\S+ \S+\s+-\s+\S+\s+{sha(files[0])[:12]}\s+comment fixed$"
    assert re.search(accepted, text.out, re.MULTILINE), text.out
    assert re.search(rf"^  1\s+1\s+baseline .*{baselined[:12]}\s+by hand$", text.out, re.MULTILINE), text.out
    events_json = as_json["services"][0]["events"]
    assert [(e["event"], e["reason"], e["checksum"]) for e in events_json] == [
        ("baseline", "by hand", baselined),  # the checksum of the file as it was then: history keeps both
        ("baseline", "by hand", sha(files[1])),
        ("accept", "comment fixed", sha(files[0])),
    ]


# --------------------------------------------------------------------------- under the lock


def test_accept_during_an_apply_waits_for_the_lock_then_records(estate: Estate) -> None:
    files = three_files(estate)
    files[2].rename(files[2].with_suffix(".later"))
    assert estate.dbplan("apply", "--yes").code == 0
    files[2].with_suffix(".later").unlink()
    estate.write("app", "3_gated.up.sql", "SELECT count(*) FROM gate;\nCREATE TABLE prices (id int);\n")
    files[0].write_text("CREATE TABLE users (id int);  -- edited\n")
    gate = TableGate(estate.url, estate.name("app"), "gate")
    try:
        apply = start_dbplan(estate.plan_file, "apply", "--yes")
        wait_until(lambda: dbplan_backends(estate.url, "%FROM gate%", waiting_for_lock=True), what="migration 3")
        accept = start_dbplan(estate.plan_file, "accept", "app", "1", "--reason", "comment")
        accept.wait_for("waiting for the lock on the migrations of service 'app'")
        assert estate.query("app", "SELECT count(*) FROM dbplan_history WHERE event = 'accept'") == [(0,)]
    finally:
        gate.open()
    applied, accepted = finish(apply), finish(accept)

    assert applied.code == 0, applied.err
    assert accepted.code == 0, accepted.err
    assert [row[:2] for row in history(estate)] == [(1, "apply"), (2, "apply"), (3, "apply"), (1, "accept")]
    assert estate.query("app", "SELECT version, dirty FROM schema_migrations") == [(3, False)]
    assert estate.dbplan("plan", "--fail-on", "drift", "--detailed-exitcode").code == 0


def test_baseline_during_an_apply_waits_then_refuses_what_is_no_longer_true(estate: Estate) -> None:
    files = three_files(estate)
    files[2].unlink()
    estate.write("app", "3_gated.up.sql", "SELECT count(*) FROM gate;\nCREATE TABLE prices (id int);\n")
    made_by_hand(estate)
    estate.execute("app", "DROP TABLE users, orders")
    gate = TableGate(estate.url, estate.name("app"), "gate")
    try:
        apply = start_dbplan(estate.plan_file, "apply", "--yes")
        wait_until(lambda: dbplan_backends(estate.url, "%FROM gate%", waiting_for_lock=True), what="migration 3")
        baseline = start_dbplan(estate.plan_file, "baseline", "app", "3")
        baseline.wait_for("waiting for the lock on the migrations of service 'app'")
    finally:
        gate.open()
    applied, refused = finish(apply), finish(baseline)

    assert applied.code == 0, applied.err
    assert refused.code == 1, refused.err
    assert "changed while baseline waited for the lock" in refused.err
    assert "version 3 was not recorded" in refused.err
    assert [row[:2] for row in history(estate)] == [(1, "apply"), (2, "apply"), (3, "apply")]

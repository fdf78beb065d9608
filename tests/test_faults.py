"""Faults as a user meets them at the command line: signals, lost connections, early Ctrl-C.

Every fault ends in a message that names the server and what was done, and an exit code
the README lists; never in "internal error" or a Python traceback.
"""

from __future__ import annotations

import json
import signal
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

"""The offline cost of a fleet's plan, per stage, for sets of 2,000 and 10,000 databases.

No server: the live state is built in memory (as tests/test_fleet.py does), so what is
measured is dbplan's own work between reading the servers and printing: loading and
expanding the set, the graph, scanning the folder, the planner, the saved plan's
fingerprint and file, and the text and Markdown renderings.

    python bench/bench_fleet_plan.py                  # 2,000 and 10,000 databases
    python bench/bench_fleet_plan.py --sizes 500,2000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.estate import graph
from orchestrator.estate.load import load
from orchestrator.live.facts import LiveState, ServerFacts, ServiceFacts
from orchestrator.migrations import scan
from orchestrator.planning import savedplan
from orchestrator.planning.planner import make_plan
from orchestrator.render import text
from orchestrator.render.fleet import render_markdown_plan

MIGRATIONS = 5


def write_estate(root: Path, count: int) -> Path:
    folder = root / "migrations" / "tenant"
    folder.mkdir(parents=True)
    for version in range(1, MIGRATIONS + 2):  # the last one is pending
        (folder / f"{version:06d}_step_{version}.up.sql").write_text(f"CREATE TABLE t{version} (id bigint);\n")
        (folder / f"{version:06d}_step_{version}.down.sql").write_text(f"DROP TABLE t{version};\n")
    plan_file = root / "dbplan.yaml"
    plan_file.write_text(
        "version: 1\n"
        "servers:\n  pg1: {url: 'postgresql://localhost:1/postgres'}\n  pg2: {url: 'postgresql://localhost:2/postgres'}\n"
        f"databases:\n  tenants:\n    set:\n      range: {{pattern: 'tenant_{{n}}', from: 1, to: {count}}}\n"
        "      servers: [pg1, pg2]\n      canary: '1%'\n"
        "services:\n  tenant: {database: tenants, migrations: migrations/tenant}\n"
    )
    return plan_file


def live_state(estate: Any) -> LiveState:
    names = frozenset(estate.databases) | {"postgres"}
    return LiveState(
        servers={s: ServerFacts(s, "16", "1", f"{s}:5432", names, frozenset({"postgres"})) for s in ("pg1", "pg2")},
        services={
            name: ServiceFacts(name, True, schema="public", table_exists=True, history_exists=False, version=MIGRATIONS)
            for name in estate.services
        },
    )


def timed(label: str, results: dict[str, float], work: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    value = work()
    results[label] = (time.perf_counter() - started) * 1000
    return value


def run(count: int, *, trace: bool = False) -> dict[str, Any]:
    """One pass; with ``trace`` memory is traced (which slows every step several times, so
    the times of that pass are not reported)."""
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        plan_file = write_estate(root, count)
        if trace:
            tracemalloc.start()
        estate = timed("load+expand", results, lambda: load(plan_file))
        estate_graph = timed("graph", results, lambda: graph.build(estate))
        migration_sets = timed("scan", results, lambda: scan.scan(estate))
        live = live_state(estate)
        plan = timed("plan", results, lambda: make_plan(estate, estate_graph, migration_sets, live))
        printed = timed("fingerprint", results, lambda: savedplan.fingerprint(estate, migration_sets, live))
        timed("save", results, lambda: savedplan.save(root / "plan.json", plan, printed))
        shown = timed("text", results, lambda: text.render_plan(plan))
        markdown = timed("markdown", results, lambda: render_markdown_plan(plan))
        _, peak = tracemalloc.get_traced_memory() if trace else (0, 0)
        tracemalloc.stop()
        size = (root / "plan.json").stat().st_size
    return {
        "databases": count,
        "ms": {label: round(value, 1) for label, value in results.items()},
        "total_ms": round(sum(results.values()), 1),
        "us_per_database": round(sum(results.values()) * 1000 / count, 1),
        "peak_traced_mb": round(peak / 1e6, 1),
        "saved_plan_bytes": size,
        "text_chars": len(shown),
        "markdown_chars": len(markdown),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,10000", help="comma-separated set sizes")
    args = parser.parse_args()
    for size in (int(part) for part in args.sizes.split(",")):
        timings = run(size)
        timings["peak_traced_mb"] = run(size, trace=True)["peak_traced_mb"]
        print(json.dumps(timings))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark: what the fleet scheduler itself costs, without a database.

Run by hand (never part of the test suite):

    python bench/bench_scheduler.py                  # 500, 2,000 and 10,000 databases
    python bench/bench_scheduler.py --sizes 50000

Per size N: the units of a new fleet (N creations and N services, each service after its
database's creation, on two servers with 8 connections each) run through
``fleet.run_units`` with work that returns at once, so the time is the scheduling alone.
It must grow with N, not with N squared (README, "Sizing 10,000 databases").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.execution.fleet import DATABASE, SERVICE, Unit, run_units


def new_fleet(count: int) -> list[Unit]:
    units = [Unit(n, DATABASE, f"s{n % 2}", [], f"d{n}") for n in range(count)]
    units += [Unit(count + n, SERVICE, f"s{n % 2}", [], f"d{n}", "tenant", after={n}) for n in range(count)]
    return units


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="500,2000,10000", help="comma-separated database counts")
    options = parser.parse_args()
    for count in (int(size) for size in options.sizes.split(",")):
        units = new_fleet(count)
        started = time.perf_counter()
        schedule = run_units(units, {"s0": 8, "s1": 8}, lambda unit: None, keep_going=False, stop_requested=lambda: False)
        seconds = time.perf_counter() - started
        assert not schedule.failures and not schedule.not_run
        print(f"{count} databases ({len(units)} units): {seconds:.2f} s, {1e6 * seconds / len(units):.0f} us per unit")
    return 0


if __name__ == "__main__":
    sys.exit(main())

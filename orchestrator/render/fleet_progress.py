"""Progress of a fleet's apply: per database, not per migration.

``FleetTracker`` follows the executor's callbacks (the ``Progress`` protocol, plus
``fleet_started`` and ``unit_finished``) and knows, per database, what is done, what
runs now and since when. ``FleetLines`` writes one line per database finished (for logs
and CI, where stderr is not a terminal); ``FleetLive`` draws a live summary with rich on
a terminal: databases done, failing, in flight, the current migration of each one in
flight, elapsed time, and the slowest right now.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..execution.fleet import ROLES, Unit
from ..planning.plan import Action, ApplyMigration, ApplyRepeatable, RevertMigration

if TYPE_CHECKING:
    from ..execution.progress import Outcome

# Below this many databases in a run (and no set), apply reports every action as it
# always did; from here on, one line per database.
FLEET_FROM_DATABASES = 10
SHOWN_IN_FLIGHT = 8  # rows of the live display's in-flight table


def is_fleet(units: list[Unit]) -> bool:
    databases = {unit.database for unit in units if unit.kind != ROLES}
    return len(databases) >= FLEET_FROM_DATABASES or any(unit.fleet for unit in units)


@dataclass
class _Database:
    name: str
    server: str
    units_left: int = 0
    done: int = 0  # actions done
    skipped: int = 0
    failed: bool = False
    cancelled: bool = False  # stopped on request: rolled back, not a failure of its SQL
    not_run: bool = False
    current: str | None = None  # what runs now
    current_since: float = 0.0
    started: float | None = None
    duration_ms: int = 0
    errors: list[str] = field(default_factory=list)


class FleetTracker:
    """What each database of the run is doing; the base of both displays."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.began = clock()
        self.databases: dict[str, _Database] = {}
        self.finished: list[_Database] = []

    # -- the executor's callbacks --------------------------------------------------------

    def fleet_started(self, units: list[Unit]) -> None:
        for unit in units:
            key = self._key(unit)
            entry = self.databases.setdefault(key, _Database(key, unit.server))
            entry.units_left += 1

    def action_started(self, action: Action, index: int, total: int) -> None:
        entry = self.databases.get(self._key_of_action(action))
        if entry is None:
            return
        now = self.clock()
        entry.started = entry.started if entry.started is not None else now
        entry.current, entry.current_since = _what(action), now

    def action_finished(self, outcome: Outcome, index: int, total: int) -> None:
        entry = self.databases.get(self._key_of_action(outcome.action))
        if entry is None:
            return
        entry.current = None
        if outcome.status == "done":
            entry.done += 1
            entry.duration_ms += outcome.duration_ms
        elif outcome.status == "skipped":
            entry.skipped += 1
        elif outcome.status == "cancelled":
            entry.cancelled = True
        else:
            entry.failed = True

    def unit_finished(self, unit: Unit, status: str) -> None:
        entry = self.databases[self._key(unit)]
        entry.units_left -= 1
        if status == "failed" and not entry.cancelled:
            entry.failed = True
        elif status == "skipped":
            entry.not_run = True
        if entry.units_left == 0:
            entry.current = None
            self.finished.append(entry)
            self.database_finished(entry)

    def notice(self, message: str) -> None:
        pass

    def database_finished(self, entry: _Database) -> None:
        """A display's hook: every unit of ``entry`` is over."""

    # -- reading -------------------------------------------------------------------------

    def in_flight(self) -> list[_Database]:
        """Databases with something running, the longest-running first."""
        running = [entry for entry in self.databases.values() if entry.current is not None]
        return sorted(running, key=lambda entry: entry.current_since)

    def counts(self) -> tuple[int, int, int, int]:
        """Databases done, failing (failed or not run), in flight, and in all."""
        done = sum(1 for entry in self.finished if not entry.failed and not entry.not_run)
        failing = sum(1 for entry in self.databases.values() if entry.failed or entry.not_run or entry.cancelled)
        return done, failing, len(self.in_flight()), len(self.databases)

    @staticmethod
    def _key(unit: Unit) -> str:
        return unit.database if unit.database is not None else f"roles on {unit.server}"

    @staticmethod
    def _key_of_action(action: Action) -> str:
        database = getattr(action, "database", None)
        return database if database is not None else f"roles on {action.server}"  # type: ignore[union-attr]


def _what(action: Action) -> str:
    if isinstance(action, ApplyRepeatable):
        return f"run repeatable {action.title}"
    if isinstance(action, (ApplyMigration, RevertMigration)):
        verb = "apply" if isinstance(action, ApplyMigration) else "revert"
        return f"{verb} {action.version} {action.title}"
    return type(action).__name__.replace("Create", "create ").replace("AlterDatabaseOwner", "change owner").lower()


def database_line(entry: _Database, index: int, total: int) -> str:
    """One finished database, as the plain display writes it."""
    if entry.failed:
        status = "FAILED"
    elif entry.cancelled:
        status = "cancelled (rolled back)"
    elif entry.not_run:
        status = "skipped (see the table at the end)"
    else:
        status = "done"
    counts = f"{entry.done} {'action' if entry.done == 1 else 'actions'} in {entry.duration_ms} ms"
    if entry.skipped:
        counts += f", {entry.skipped} already done by another run"
    where = entry.name if entry.name.startswith("roles on ") else f"database {entry.name} on {entry.server}"
    return f"[{index}/{total} databases] {where}: {status} ({counts})"


class FleetLines(FleetTracker):
    """One line per database finished, through ``write``."""

    def __init__(self, write: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self.write = write

    def database_finished(self, entry: _Database) -> None:
        self.write(database_line(entry, len(self.finished), len(self.databases)))

    def notice(self, message: str) -> None:
        self.write(message)


class FleetLive(FleetTracker):
    """A live summary on a terminal (rich), redrawn a few times a second."""

    def __init__(self, console: Any, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self.console = console
        self.live: Any = None

    def fleet_started(self, units: list[Unit]) -> None:
        from rich.live import Live

        super().fleet_started(units)
        self.live = Live(console=self.console, get_renderable=self.render, refresh_per_second=4, transient=False)
        self.live.start()

    def database_finished(self, entry: _Database) -> None:
        if entry.failed:  # a failure stays on screen above the live summary
            self.console.print(f"[red]FAILED[/red] database {entry.name} on {entry.server}", highlight=False)

    def notice(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False)

    def stop(self) -> None:
        if self.live is not None:
            self.live.refresh()
            self.live.stop()
            self.live = None

    def render(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        now = self.clock()
        done, failing, in_flight, total = self.counts()
        summary = Text.assemble(
            (f"{done}/{total} databases done", "green"), "  ",
            (f"{failing} failing", "red" if failing else ""), "  ",
            f"{in_flight} in flight", "  ",
            f"elapsed {now - self.began:.1f} s",
        )  # fmt: skip
        running = self.in_flight()
        parts: list[Any] = [summary]
        if running:
            slowest = running[0]
            parts.append(
                Text(f"slowest now: {slowest.name} — {slowest.current} for {now - slowest.current_since:.1f} s", "yellow")
            )
            table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
            for column in ("database", "server", "running", "for"):
                table.add_column(column)
            for entry in running[:SHOWN_IN_FLIGHT]:
                table.add_row(entry.name, entry.server, entry.current or "", f"{now - entry.current_since:.1f} s")
            parts.append(table)
            if len(running) > SHOWN_IN_FLIGHT:
                parts.append(Text(f"... and {len(running) - SHOWN_IN_FLIGHT} more in flight"))
        return Group(*parts)

"""Running a plan's work in parallel: units, their order, and the failure policy.

A plan is cut into units, each the work of one lock: the roles of a server (under the
server's lock), the creation (or owner change) of one database (under that database's
lock on the maintenance database), the migrations of one service (under its migrations
lock). A unit starts when

* every unit it comes after succeeded: a service's database was created, the services
  it depends on were migrated (for reverts: those depending on it were reverted);
* every unit of its fleet in a lower stage succeeded (canaries first);
* its server has a connection to spare (``connection_bound``).

Ready units start in plan order, except that a service whose database was just created
goes before the creation of the next database (``_Scheduler._queue``): a run with a bound
of one creates and migrates one database after another.

Failure policy: by default the first failure stops new work; what is in flight finishes.
With ``keep_going`` everything that does not depend on a failed unit still runs; a
failed stage of a fleet stops the later stages of that fleet in both cases (a canary
exists to stop the roll-out). Whatever did not run is listed, with why.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import DbplanError
from ..estate.model import Estate
from ..planning.plan import (
    Action,
    AlterDatabaseOwner,
    AlterRole,
    CreateDatabase,
    CreateRole,
    Plan,
)

ROLES, DATABASE, SERVICE = "roles", "database", "service"


@dataclass
class Unit:
    """The work of one lock; ``after``: the units that must succeed before it starts."""

    index: int
    kind: str  # roles | database | service
    server: str
    actions: list[Action]
    database: str | None = None
    service: str | None = None
    fleet: str | None = None
    stage: int = 0
    after: set[int] = field(default_factory=set)

    @property
    def where(self) -> str:
        if self.kind == ROLES:
            return f"roles on server '{self.server}'"
        if self.kind == DATABASE:
            return f"database '{self.database}' on server '{self.server}'"
        return f"service '{self.service}' (database '{self.database}' on server '{self.server}')"


@dataclass(frozen=True)
class NotRun:
    """A unit that did not start, and why."""

    server: str
    database: str | None
    service: str | None
    reason: str


@dataclass(frozen=True)
class Failure:
    """A unit that failed: where, and the error."""

    server: str
    database: str | None
    service: str | None
    error: DbplanError


def units_of(plan: Plan, estate: Estate) -> list[Unit]:
    """Cut the plan into units and say which must come before which."""
    units: list[Unit] = []
    roles_unit: dict[str, Unit] = {}
    database_unit: dict[str, Unit] = {}
    last_of_service: dict[str, Unit] = {}
    for action in plan.actions:
        if isinstance(action, (CreateRole, AlterRole)):  # one server's roles, under its lock
            unit = roles_unit.get(action.server)
            if unit is None:
                unit = roles_unit[action.server] = _new(units, ROLES, action.server)
            unit.actions.append(action)
        elif isinstance(action, (CreateDatabase, AlterDatabaseOwner)):
            unit = database_unit.get(action.database)
            if unit is None:
                unit = database_unit[action.database] = _new(units, DATABASE, action.server, estate, action.database)
            unit.actions.append(action)
        else:
            unit = last_of_service.get(action.service)
            if unit is None or unit is not units[-1]:  # a service's consecutive actions share one lock
                database = estate.databases[action.database]
                unit = _new(units, SERVICE, database.server, estate, action.database, action.service)
                if action.service in last_of_service:
                    unit.after.add(last_of_service[action.service].index)
                last_of_service[action.service] = unit
            unit.actions.append(action)
    related = _related_services(estate)
    units_by_service: dict[str, list[Unit]] = {}
    for unit in units:
        if unit.kind == ROLES:
            continue
        if unit.server in roles_unit:  # an owner may be one of the roles created first
            unit.after.add(roles_unit[unit.server].index)
        if unit.kind == SERVICE:
            assert unit.service is not None and unit.database is not None
            if unit.database in database_unit:
                unit.after.add(database_unit[unit.database].index)
            for other in related.get(unit.service, ()):
                unit.after.update(earlier.index for earlier in units_by_service.get(other, ()))
            units_by_service.setdefault(unit.service, []).append(unit)
    return units


def _new(
    units: list[Unit], kind: str, server: str, estate: Estate | None = None, database: str | None = None,
    service: str | None = None,
) -> Unit:  # fmt: skip
    declared = estate.databases.get(database) if estate is not None and database is not None else None
    unit = Unit(
        len(units), kind, server, [], database, service,
        fleet=declared.fleet if declared else None, stage=declared.stage if declared else 0,
    )  # fmt: skip
    units.append(unit)
    return unit


def _related_services(estate: Estate) -> dict[str, set[str]]:
    """Per service, every service it depends on or that depends on it, however
    indirectly: their migrations keep the plan's order (applies after prerequisites,
    reverts before them). Services without dependencies (a fleet's) relate to nothing."""
    prerequisites = {name: set(service.depends_on) for name, service in estate.services.items() if service.depends_on}
    if not prerequisites:
        return {}
    ancestors: dict[str, set[str]] = {}

    def ancestors_of(name: str) -> set[str]:
        if name not in ancestors:
            ancestors[name] = set()  # the graph has no cycles (checked when it was built)
            for dependency in prerequisites.get(name, ()):
                ancestors[name] |= {dependency} | ancestors_of(dependency)
        return ancestors[name]

    related: dict[str, set[str]] = {}
    for name in prerequisites:
        for ancestor in ancestors_of(name):
            related.setdefault(name, set()).add(ancestor)
            related.setdefault(ancestor, set()).add(name)
    return related


@dataclass
class Schedule:
    """What became of the units: in the order they failed, and those that never ran."""

    failures: list[Failure] = field(default_factory=list)
    not_run: list[NotRun] = field(default_factory=list)


PENDING, RUNNING, DONE, FAILED, SKIPPED = "pending", "running", "done", "failed", "skipped"


def run_units(
    units: list[Unit],
    bounds: dict[str, int],
    work: Callable[[Unit], DbplanError | None],
    *,
    keep_going: bool,
    stop_requested: Callable[[], bool],
    on_finished: Callable[[Unit, str], None] | None = None,
) -> Schedule:
    """Run every unit through ``work`` (which returns the unit's error, or None) as the
    module docstring says; at most ``bounds[server]`` of one server's units at once."""
    scheduler = _Scheduler(units, bounds, keep_going, stop_requested, on_finished)
    if len(units) == 1:  # one unit: in this thread, as a single-database run always was
        (unit,) = units
        scheduler.started(unit)
        scheduler.record(unit, work(unit))
    else:
        scheduler.run_on_threads(work)
    return scheduler.outcome()


class _Scheduler:
    """The bookkeeping of ``run_units``: every unit's state, and what may start now.

    Kept as counters and queues, not scans: a fleet's run holds a unit per database and
    per service, and looking through all of them after each finished unit made scheduling
    grow with the square of the fleet (4,000 units: 16 million looks)."""

    def __init__(
        self,
        units: list[Unit],
        bounds: dict[str, int],
        keep_going: bool,
        stop_requested: Callable[[], bool],
        on_finished: Callable[[Unit, str], None] | None,
    ) -> None:
        self.units, self.bounds, self.keep_going = units, bounds, keep_going
        self.stop_requested, self.on_finished = stop_requested, on_finished
        self.schedule = Schedule()
        self.state = {unit.index: PENDING for unit in units}
        self.reasons: dict[int, str] = {}
        self.in_flight = dict.fromkeys(bounds, 0)
        # Per unit, how many of the units it comes after are not done, and who waits on it.
        self.unmet = {unit.index: len(unit.after) for unit in units}
        self.dependents: dict[int, list[int]] = {}
        for unit in units:
            for index in unit.after:
                self.dependents.setdefault(index, []).append(unit.index)
        # Per server, the units that may start as far as the units before them go.
        self.queues: dict[str, list[tuple[int, int]]] = {server: [] for server in bounds}
        # Units that can no longer run (one they come after failed or was skipped, or a
        # lower stage of their fleet failed), to be dropped with their reason.
        self.doomed: list[int] = []
        # Per fleet with several stages: its stages in order, and per stage how many of
        # its units are not done yet and whether one failed.
        stages: dict[str, set[int]] = {}
        for unit in units:
            if unit.fleet is not None:
                stages.setdefault(unit.fleet, set()).add(unit.stage)
        self.stages = {fleet: sorted(found) for fleet, found in stages.items() if len(found) > 1}
        self.unfinished: dict[tuple[str, int], int] = {}
        self.broken: set[tuple[str, int]] = set()
        self.of_fleet: dict[str, list[Unit]] = {}
        self.parked: dict[str, list[Unit]] = {}  # ready but for a lower stage of their fleet
        for unit in units:
            if unit.fleet in self.stages:
                key = (unit.fleet, unit.stage)
                self.unfinished[key] = self.unfinished.get(key, 0) + 1
                self.of_fleet.setdefault(unit.fleet, []).append(unit)
        for unit in units:
            if not unit.after:
                self._queue(unit)

    # -- what may start ------------------------------------------------------------------

    def stopping(self) -> bool:
        return self.stop_requested() or (bool(self.schedule.failures) and not self.keep_going)

    def _queue(self, unit: Unit) -> None:
        """Ready as far as the units before it go. Plan order, but a database's service
        goes before the creation of the next database: a fleet's databases are created and
        migrated one after another, not all created first (a broken migration shows after
        one database, and creating, which waits on the disk, overlaps migrating, which
        waits on the CPU)."""
        heapq.heappush(self.queues[unit.server], (0 if unit.kind == SERVICE else 1, unit.index))

    def ready(self) -> list[Unit]:
        """Units that may start now, in the order ``_queue`` says; drops those that never can."""
        self._drop_doomed()
        startable: list[Unit] = []
        for server, queue in self.queues.items():
            free = self.bounds[server] - self.in_flight[server]
            while free > 0 and queue:
                unit = self.units[heapq.heappop(queue)[1]]
                if self.state[unit.index] != PENDING:
                    continue  # dropped meanwhile
                if not self._lower_stages_done(unit):
                    self.parked.setdefault(unit.fleet or "", []).append(unit)
                    continue
                startable.append(unit)
                free -= 1
        return startable

    def _drop_doomed(self) -> None:
        """Skip, in plan order, the units that can no longer run, and so those after them."""
        while self.doomed:
            unit = self.units[heapq.heappop(self.doomed)]
            if self.state[unit.index] != PENDING:
                continue
            why_not = self._blocked_by(unit)
            assert why_not is not None
            self.reasons[unit.index] = why_not
            self._finish(unit, SKIPPED)

    def _lower_stages_done(self, unit: Unit) -> bool:
        if unit.fleet not in self.stages:
            return True
        return all(self.unfinished[(unit.fleet, stage)] == 0 for stage in self.stages[unit.fleet] if stage < unit.stage)

    def _blocked_by(self, unit: Unit) -> str | None:
        """Why ``unit`` can no longer run (a unit it comes after, or a lower stage of its
        fleet, failed or was skipped), or None."""
        if unit.fleet in self.stages:  # first: the reason shared by the whole rest of the fleet
            for stage in self.stages[unit.fleet]:
                if stage >= unit.stage:
                    break
                if (unit.fleet, stage) in self.broken:
                    return f"stage {stage} of fleet '{unit.fleet}' did not succeed"
        for index in sorted(unit.after):
            if self.state[index] in (FAILED, SKIPPED):
                other = self.units[index]
                return f"{other.where} {'failed' if self.state[index] == FAILED else 'did not run'}"
        return None

    # -- what happened -------------------------------------------------------------------

    def started(self, unit: Unit) -> None:
        self.in_flight[unit.server] += 1
        self.state[unit.index] = RUNNING

    def record(self, unit: Unit, error: DbplanError | None) -> None:
        self.in_flight[unit.server] -= 1
        if error is not None:
            self.schedule.failures.append(Failure(unit.server, unit.database, unit.service, error))
        self._finish(unit, DONE if error is None else FAILED)

    def _finish(self, unit: Unit, status: str) -> None:
        self.state[unit.index] = status
        for index in self.dependents.get(unit.index, ()):
            if status != DONE:
                heapq.heappush(self.doomed, index)
            else:
                self.unmet[index] -= 1
                if self.unmet[index] == 0:
                    self._queue(self.units[index])
        if unit.fleet in self.stages:
            key = (unit.fleet, unit.stage)
            if status == DONE:
                self.unfinished[key] -= 1
                if self.unfinished[key] == 0:  # the next stage may start
                    for parked in self.parked.pop(unit.fleet, []):
                        self._queue(parked)
            elif key not in self.broken:
                self.broken.add(key)
                for other in self.of_fleet[unit.fleet]:
                    if other.stage > unit.stage:
                        heapq.heappush(self.doomed, other.index)
        if self.on_finished is not None:
            self.on_finished(unit, status)

    def outcome(self) -> Schedule:
        for unit in self.units:
            if self.state[unit.index] == SKIPPED:
                reason = self.reasons[unit.index]
            elif self.state[unit.index] == PENDING:
                reason = "stopped on request" if self.stop_requested() else "not started: the run stopped at the first failure"
            else:
                continue
            self.schedule.not_run.append(NotRun(unit.server, unit.database, unit.service, reason))
        return self.schedule

    def run_on_threads(self, work: Callable[[Unit], DbplanError | None]) -> None:
        from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

        workers = max(1, min(len(self.units), sum(self.bounds.values())))
        running: dict[Future[DbplanError | None], Unit] = {}
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dbplan-apply") as pool:
            while True:
                if not self.stopping():
                    for unit in self.ready():
                        self.started(unit)
                        running[pool.submit(work, unit)] = unit
                if not running:
                    return
                # A timeout, so that a stop request (a signal) is seen while nothing finishes.
                done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    self.record(running.pop(future), future.result())

"""dbplan's library API: what the command line calls, and what a Python program may call.

Each function runs the pipeline up to the stage it needs and returns values; none prints.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DbplanError, MigrationFileError
from .estate import graph
from .estate import load as plan_file
from .estate.graph import EstateGraph
from .estate.model import Estate
from .live.facts import LiveState, inspect
from .live.locks import DEFAULT_LOCK_WAIT_SECONDS
from .migrations import scan as migration_folders
from .migrations.scan import MigrationSet
from .planning.plan import Plan
from .planning.planner import make_plan

if TYPE_CHECKING:
    from .execution.progress import Cancellation, Progress, Result
    from .server.embedded import EmbeddedServer


@dataclass(frozen=True)
class Checked:
    """A plan file that passed every offline check."""

    estate: Estate
    graph: EstateGraph
    migration_sets: dict[str, MigrationSet]


@dataclass(frozen=True)
class Planned(Checked):
    live: LiveState
    plan: Plan


def validate(file: str | os.PathLike[str] = plan_file.DEFAULT_PLAN_FILE, environ: Mapping[str, str] | None = None) -> Checked:
    """Check the plan file and the migration folders, without any server."""
    estate = plan_file.load(file, environ)
    return Checked(estate, graph.build(estate), migration_folders.scan(estate))


# How often a plan blocked by another run's no-transaction migration is made again.
RUN_IN_PROGRESS_POLL_SECONDS = 0.5


def plan(
    file: str | os.PathLike[str] = plan_file.DEFAULT_PLAN_FILE,
    *,
    environ: Mapping[str, str] | None = None,
    wait_seconds: float = 0.0,
    on_notice: Callable[[str], None] | None = None,
    wait_for_runs: float = 0.0,
) -> Planned:
    """Read the live servers and compute what would change.

    With ``wait_for_runs``, a plan blocked by a service that is dirty only because another
    run is applying a no-transaction migration right now (it holds the service's lock) is
    made again once that run is done, waiting up to that many seconds.
    """
    import time

    checked = validate(file, environ)
    planned = _plan_checked(checked, wait_seconds, on_notice)
    deadline = time.monotonic() + wait_for_runs
    announced: set[str] = set()
    while planned.plan.blocked and time.monotonic() < deadline:
        running = {name: facts for name, facts in planned.live.services.items() if facts.dirty_in_progress}
        if not running:
            break
        for name, facts in running.items():
            if on_notice and name not in announced:
                on_notice(
                    f"service '{name}' is dirty at version {facts.version} because another run is applying it "
                    f"right now ({facts.dirty_in_progress} holds its lock); waiting for that run to finish"
                )
        announced |= running.keys()
        time.sleep(RUN_IN_PROGRESS_POLL_SECONDS)
        planned = _plan_checked(checked, 0.0, on_notice)
    return planned


def _plan_checked(checked: Checked, wait_seconds: float, on_notice: Callable[[str], None] | None) -> Planned:
    live = inspect(checked.estate, wait_seconds=wait_seconds, on_retry=on_notice)
    return Planned(
        checked.estate,
        checked.graph,
        checked.migration_sets,
        live,
        make_plan(checked.estate, checked.graph, checked.migration_sets, live),
    )


def apply(
    planned: Planned,
    *,
    progress: Progress | None = None,
    lock_wait: float = DEFAULT_LOCK_WAIT_SECONDS,
    cancellation: Cancellation | None = None,
) -> Result:
    """Execute a plan computed by ``plan``; re-checked under the lock before anything runs.

    ``cancellation.request(...)`` (from a signal handler, say) stops it between migrations.
    """
    from .execution.executor import execute  # the writer is loaded only by commands that write

    return execute(
        planned.plan,
        planned.estate,
        planned.migration_sets,
        progress=progress,
        lock_wait=lock_wait,
        cancellation=cancellation,
    )


def save_plan(planned: Planned, path: str | os.PathLike[str]) -> None:
    """Write the plan with a fingerprint of everything it was computed from."""
    from .planning import savedplan

    savedplan.save(Path(path), planned.plan, savedplan.fingerprint(planned.estate, planned.migration_sets, planned.live))


def plan_saved(
    file: str | os.PathLike[str],
    saved_path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    wait_seconds: float = 0.0,
    on_notice: Callable[[str], None] | None = None,
) -> Planned:
    """Re-plan and check the result against a saved plan; refuse (PlanChanged) if anything differs."""
    from .planning import savedplan

    saved = savedplan.load(Path(saved_path))
    planned = plan(file, environ=environ, wait_seconds=wait_seconds, on_notice=on_notice)
    now = savedplan.fingerprint(planned.estate, planned.migration_sets, planned.live)
    savedplan.check(saved, planned.plan, now)
    return planned


def force(
    file: str | os.PathLike[str],
    service_name: str,
    version: int,
    *,
    reason: str | None = None,
    environ: Mapping[str, str] | None = None,
    lock_wait: float = DEFAULT_LOCK_WAIT_SECONDS,
    on_notice: Callable[[str], None] | None = None,
) -> None:
    """Record VERSION as the service's current version and clear its dirty flag; refuses
    if the service changed while it waited for the migrations lock."""
    from .execution.force import force_version

    checked = validate(file, environ)
    force_version(
        checked.estate, checked.migration_sets, service_name, version, reason=reason, lock_wait=lock_wait,
        on_wait=on_notice,
    )  # fmt: skip


def new_migration(
    file: str | os.PathLike[str], service_name: str, title: str, environ: Mapping[str, str] | None = None
) -> tuple[Path, Path]:
    """Create the next up/down pair of a service; return their paths."""
    import re

    estate = plan_file.load(file, environ)
    service = estate.services.get(service_name)
    if service is None:
        raise DbplanError(
            f"unknown service '{service_name}'{_did_you_mean(service_name, estate.services)}",
            hint=f"services: {', '.join(estate.services)}",
        )
    slug = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")
    if not slug:
        raise DbplanError(f"title '{title}' has no letters or digits to name a file with")
    folder = service.migrations_dir
    folder.mkdir(parents=True, exist_ok=True)
    existing = migration_folders.scan_service(service, estate.root)
    latest = existing.latest or 0
    width = max((len(m.up.path.name.split("_", 1)[0]) for m in existing.migrations), default=6)
    version = str(latest + 1).zfill(width)
    up = folder / f"{version}_{slug}.up.sql"
    down = folder / f"{version}_{slug}.down.sql"
    if up.exists() or down.exists():
        raise MigrationFileError(f"{up.name} already exists")
    up.write_text(f"-- {title}\n", encoding="utf-8")
    down.write_text(f"-- revert: {title}\n", encoding="utf-8")
    return up, down


def embedded_servers(
    file: str | os.PathLike[str], server_name: str | None = None, environ: Mapping[str, str] | None = None
) -> list[tuple[str, EmbeddedServer]]:
    """The embedded servers a plan file declares (those without a url), by name."""
    from .server.embedded import EmbeddedServer

    estate = plan_file.load(file, environ)
    if server_name is not None and server_name not in estate.servers:
        raise DbplanError(
            f"unknown server '{server_name}'{_did_you_mean(server_name, estate.servers)}",
            hint=f"servers: {', '.join(estate.servers)}",
        )
    found = [
        (server.name, EmbeddedServer(server.embedded.data_dir, server.embedded.port))
        for server in estate.servers.values()
        if server.embedded is not None and server_name in (None, server.name)
    ]
    if not found:
        which = f"server '{server_name}' is" if server_name else "no server is"
        raise DbplanError(
            f"{which} embedded in {file}: servers with a url are managed elsewhere",
            hint="an embedded server has 'embedded: true' and an empty or absent url",
        )
    return found


def _did_you_mean(word: str, choices: Mapping[str, object]) -> str:
    match = plan_file.suggest(word, choices)
    return f"; did you mean '{match}'?" if match else ""

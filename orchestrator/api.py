"""dbplan's library API: what the command line calls, and what a Python program may call.

Each function runs the pipeline up to the stage it needs and returns values; none prints.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DbplanError, MigrationFileError, PlanBlocked
from .estate import graph
from .estate import load as plan_file
from .estate.graph import EstateGraph
from .estate.model import Estate
from .estate.select import select_services
from .live.facts import LiveState, inspect
from .live.locks import DEFAULT_LOCK_WAIT_SECONDS
from .migrations import scan as migration_folders
from .migrations.numbering import next_version
from .migrations.scan import MigrationSet
from .planning.plan import Plan
from .planning.planner import make_plan

if TYPE_CHECKING:
    from .execution.progress import Cancellation, Progress, Result
    from .live.history import ServiceHistory
    from .planning.offline_lint import LintReport
    from .verification.dryrun import Verification
    from .verification.roundtrip import MigrationCheck, RoundTripReport
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
    verification: Verification | None = None  # plan --verify: the dry run on a copy


@dataclass(frozen=True)
class Selection:
    """Which services a command is about: all of them, or a few and (by default) what they
    depend on (``--only``, ``--no-deps``)."""

    only: tuple[str, ...] = ()  # empty: every service
    with_dependencies: bool = True

    def to_dict(self) -> dict[str, object] | None:
        return {"only": list(self.only), "dependencies": self.with_dependencies} if self.only else None

    @classmethod
    def from_dict(cls, data: object) -> Selection:
        if not isinstance(data, dict):
            return cls()
        return cls(tuple(str(name) for name in data.get("only", ())), bool(data.get("dependencies", True)))


EVERY_SERVICE = Selection()


def validate(
    file: str | os.PathLike[str] = plan_file.DEFAULT_PLAN_FILE,
    environ: Mapping[str, str] | None = None,
    selection: Selection = EVERY_SERVICE,
) -> Checked:
    """Check the plan file and the migration folders (those selected), without any server."""
    estate = plan_file.load(file, environ)
    if selection.only:
        estate = select_services(estate, selection.only, with_dependencies=selection.with_dependencies)
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
    selection: Selection = EVERY_SERVICE,
    parallel: int | None = None,
) -> Planned:
    """Read the live servers and compute what would change.

    With ``wait_for_runs``, a plan blocked by a service that is dirty only because another
    run is applying a no-transaction migration right now (it holds the service's lock) is
    made again once that run is done, waiting up to that many seconds.
    """
    import time

    _check_seconds("wait_seconds", wait_seconds)
    _check_seconds("wait_for_runs", wait_for_runs)
    checked = validate(file, environ, selection)
    planned = _plan_checked(checked, wait_seconds, on_notice, parallel)
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
        planned = _plan_checked(checked, 0.0, on_notice, parallel)
    return planned


def verify(
    planned: Planned, *, scratch_url: str | None = None, on_notice: Callable[[str], None] | None = None
) -> Planned:
    """The plan with its dry run: each database's pending migrations run first on a
    throwaway copy of its live schema (structure and bookkeeping, never data) on an
    embedded server of the live server's major version, exactly as ``apply`` would."""
    from .verification.dryrun import verify as dry_run

    verification = dry_run(
        planned.estate,
        planned.migration_sets,
        planned.graph.service_order,
        planned.live,
        planned.plan,
        scratch_url=scratch_url,
        on_notice=on_notice,
    )
    return replace(planned, verification=verification)


def _plan_checked(
    checked: Checked, wait_seconds: float, on_notice: Callable[[str], None] | None, parallel: int | None = None
) -> Planned:
    live = inspect(checked.estate, wait_seconds=wait_seconds, on_retry=on_notice, parallel=parallel)
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
    parallel: int | None = None,
    keep_going: bool = False,
) -> Result:
    """Execute a plan computed by ``plan``; re-checked under the lock before anything runs.

    ``cancellation.request(...)`` (from a signal handler, say) stops it between migrations.
    Independent work runs side by side, ``parallel`` connections per server at most (None:
    each server's ``parallel``, else 8). The first failure stops new work, unless
    ``keep_going``: then all that does not depend on a failure runs (``Result.failures``,
    ``Result.not_run``).
    """
    from .execution.executor import execute  # the writer is loaded only by commands that write

    _check_seconds("lock_wait", lock_wait)

    return execute(
        planned.plan,
        planned.estate,
        planned.migration_sets,
        progress=progress,
        lock_wait=lock_wait,
        cancellation=cancellation,
        parallel=parallel,
        keep_going=keep_going,
    )


def save_plan(planned: Planned, path: str | os.PathLike[str], selection: Selection = EVERY_SERVICE) -> None:
    """Write the plan with a fingerprint of everything it was computed from (and the
    selection it was made for, so that applying it plans the same services again)."""
    from .planning import savedplan

    savedplan.save(
        Path(path),
        planned.plan,
        savedplan.fingerprint(planned.estate, planned.migration_sets, planned.live),
        selection=selection.to_dict(),
    )


def plan_saved(
    file: str | os.PathLike[str],
    saved_path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    wait_seconds: float = 0.0,
    on_notice: Callable[[str], None] | None = None,
    parallel: int | None = None,
) -> Planned:
    """Re-plan and check the result against a saved plan; refuse (PlanChanged) if anything differs."""
    from .planning import savedplan

    saved = savedplan.load(Path(saved_path))
    savedplan.check_environment(saved, plan_file.selected_environment(environ))
    selection = Selection.from_dict(saved.get("selection"))
    planned = plan(
        file, environ=environ, wait_seconds=wait_seconds, on_notice=on_notice, selection=selection, parallel=parallel
    )
    now = savedplan.fingerprint(planned.estate, planned.migration_sets, planned.live)
    savedplan.check(saved, planned.plan, now)
    return planned


def migrate(
    service: str,
    file: str | os.PathLike[str] = plan_file.DEFAULT_PLAN_FILE,
    *,
    with_dependencies: bool = True,
    environ: Mapping[str, str] | None = None,
    wait_seconds: float = 0.0,
    lock_wait: float = DEFAULT_LOCK_WAIT_SECONDS,
    progress: Progress | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> Result:
    """Bring one service's database up to date: what a service calls at start-up.

    Creates the service's database and owner role if missing, then applies its pending
    migrations and, unless ``with_dependencies`` is false, those of the services it
    depends on first. Replicas starting together are safe: one applies, the others wait
    for its lock (up to ``lock_wait`` seconds) and then find nothing left to do.
    ``wait_seconds`` retries connecting while the server starts. Raises ``DbplanError``
    (``PlanBlocked`` for a dirty service, say) instead of returning a failed result.
    """
    selection = Selection((service,), with_dependencies)
    planned = plan(
        file,
        environ=environ,
        wait_seconds=wait_seconds,
        on_notice=on_notice,
        wait_for_runs=lock_wait,
        selection=selection,
    )
    if planned.plan.blocked:
        first = planned.plan.blockers[0]
        raise PlanBlocked(first.message, service=first.service, version=first.version, hint=first.hint)
    result = apply(planned, progress=progress, lock_wait=lock_wait)
    if result.error is not None:
        raise result.error
    return result


def round_trip(
    file: str | os.PathLike[str] = plan_file.DEFAULT_PLAN_FILE,
    *,
    selection: Selection = EVERY_SERVICE,
    require_down: bool = False,
    scratch_url: str | None = None,
    environ: Mapping[str, str] | None = None,
    on_check: Callable[[str, MigrationCheck], None] | None = None,
) -> RoundTripReport:
    """Apply, revert and re-apply every migration on throwaway databases of the embedded
    server, and check that each down file puts the schema back as it was before its up."""
    from .verification.roundtrip import round_trip_estate

    checked = validate(file, environ, selection)
    return round_trip_estate(
        checked.estate,
        checked.migration_sets,
        checked.graph.service_order,
        require_down=require_down,
        scratch_url=scratch_url,
        on_check=on_check,
    )


def lint(
    file: str | os.PathLike[str] = plan_file.DEFAULT_PLAN_FILE,
    *,
    paths: Sequence[str | os.PathLike[str]] | None = None,
    since: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> LintReport:
    """Lint migration files with every rule that needs no server: all of them, or only
    ``paths`` and (``since``) those changed since a git revision. No secret is needed."""
    from .planning.offline_lint import lint_estate

    checked = validate(file, environ)
    wanted: list[str | os.PathLike[str]] | None = None if paths is None else list(paths)
    if since is not None:
        wanted = (wanted or []) + _changed_since(checked.estate.root, since)
    return lint_estate(checked.estate, checked.migration_sets, wanted)


def _changed_since(root: Path, revision: str) -> list[str | os.PathLike[str]]:
    """Files added or changed since ``revision`` (committed or not), and untracked ones."""
    import subprocess

    def git(*args: str) -> list[str]:
        try:
            run = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        except OSError as err:
            raise DbplanError(f"--since needs git: {err.strerror}") from err
        if run.returncode != 0:
            raise DbplanError(
                f"git {' '.join(args[:1])} failed: {run.stderr.strip() or 'exit ' + str(run.returncode)}",
                hint="give a revision git knows (a branch, a tag, a commit), in the plan file's repository",
            )
        return [name for name in run.stdout.split("\0") if name]

    if revision.startswith("-"):  # git would read an option
        raise DbplanError(f"--since takes a git revision, not {revision!r}")
    top = Path(git("rev-parse", "--show-toplevel")[0].strip())
    changed = git("diff", "--name-only", "--no-renames", "--diff-filter=d", "-z", revision, "--")
    changed += git("ls-files", "--others", "--exclude-standard", "--full-name", "-z")
    return [top / name for name in changed]  # both name files from the top of the repository


def history(
    file: str | os.PathLike[str] = plan_file.DEFAULT_PLAN_FILE,
    *,
    selection: Selection = EVERY_SERVICE,
    limit: int | None = None,
    environ: Mapping[str, str] | None = None,
    wait_seconds: float = 0.0,
    on_notice: Callable[[str], None] | None = None,
) -> list[ServiceHistory]:
    """Each selected service's history: what ran, when, how long, by whom and why.

    ``limit`` keeps the latest events of each service (None: every one).
    """
    from .live.history import read_history

    checked = validate(file, environ, selection)
    live = inspect(checked.estate, wait_seconds=wait_seconds, on_retry=on_notice)
    return read_history(checked.estate, live, limit=limit)


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
    checked.estate.require_secrets()
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
    version = next_version([m.up.path.name.split("_", 1)[0] for m in existing.migrations])
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
    """The embedded servers a plan file declares (those without a url), and those
    ``test`` and ``plan --verify`` started beside it (``scratch-pg18``, ...), by name."""
    from .server.embedded import EmbeddedServer

    estate = plan_file.load(file, environ)
    if server_name is not None and server_name not in estate.servers and not server_name.startswith("scratch-pg"):
        raise DbplanError(
            f"unknown server '{server_name}'{_did_you_mean(server_name, estate.servers)}",
            hint=f"servers: {', '.join(estate.servers)}",
        )
    found = [
        (server.name, EmbeddedServer(server.embedded.data_dir, server.embedded.port))
        for server in estate.servers.values()
        if server.embedded is not None and server_name in (None, server.name)
    ]
    if server_name is None or server_name.startswith("scratch-pg"):
        from .verification.scratch import scratch_servers

        found += [(name, server) for name, server in scratch_servers(estate) if server_name in (None, name)]
    if not found:
        which = f"server '{server_name}' is" if server_name else "no server is"
        raise DbplanError(
            f"{which} embedded in {file}: servers with a url are managed elsewhere",
            hint="an embedded server has 'embedded: true' and an empty or absent url",
        )
    return found


def _check_seconds(name: str, value: float) -> None:
    """A wait must end: ``nan`` compares false with every deadline and would wait forever."""
    import math

    if not math.isfinite(value) or value < 0:
        raise DbplanError(f"{name} must be a finite number of seconds, 0 or more, not {value!r}")


def _did_you_mean(word: str, choices: Mapping[str, object]) -> str:
    match = plan_file.suggest(word, choices)
    return f"; did you mean '{match}'?" if match else ""

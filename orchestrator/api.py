"""dbplan's library API: what the command line calls, and what a Python program may call.

Each function runs the pipeline up to the stage it needs and returns values; none prints.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DbplanError, MigrationFileError, PlanBlocked
from .estate import graph
from .estate import load as plan_file
from .estate.graph import EstateGraph
from .estate.model import Estate
from .estate.select import select_services, select_shard
from .live.facts import LiveState, inspect
from .live.locks import DEFAULT_LOCK_WAIT_SECONDS
from .migrations import scan as migration_folders
from .migrations.numbering import next_version
from .migrations.scan import MigrationFile, MigrationSet
from .planning.plan import Plan
from .planning.planner import make_plan

if TYPE_CHECKING:
    from .execution.progress import Cancellation, Progress, Result
    from .live.history import ServiceHistory
    from .planning.adoption import Takeover
    from .planning.offline_lint import LintReport
    from .planning.records import Recording
    from .server.embedded import EmbeddedServer
    from .verification.dryrun import Verification
    from .verification.roundtrip import MigrationCheck, RoundTripReport


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
    # apply --one-pass: per service, the state its saved plan was made from, which the
    # executor checks in the session that locks it (None: the plan was just made).
    expected: Mapping[str, dict[str, object]] | None = None


@dataclass(frozen=True)
class Selection:
    """Which services a command is about: all of them, or a few and (by default) what they
    depend on (``--only``, ``--no-deps``)."""

    only: tuple[str, ...] = ()  # empty: every service
    with_dependencies: bool = True
    shard: tuple[int, int] | None = None  # --shard I/N: part I (from 1) of N

    def to_dict(self) -> dict[str, object] | None:
        if not self.only and self.shard is None:
            return None
        data: dict[str, object] = {"only": list(self.only), "dependencies": self.with_dependencies}
        if self.shard is not None:
            data["shard"] = list(self.shard)
        return data

    @classmethod
    def from_dict(cls, data: object) -> Selection:
        if not isinstance(data, dict):
            return cls()
        shard = data.get("shard")
        return cls(
            tuple(str(name) for name in data.get("only", ())),
            bool(data.get("dependencies", True)),
            (int(shard[0]), int(shard[1])) if isinstance(shard, list) and len(shard) == 2 else None,
        )


EVERY_SERVICE = Selection()


def validate(
    file: str | os.PathLike[str] = plan_file.DEFAULT_PLAN_FILE,
    environ: Mapping[str, str] | None = None,
    selection: Selection = EVERY_SERVICE,
) -> Checked:
    """Check the plan file and the migration folders (those selected), without any server.
    A discovered set has no databases yet here: its members are read by ``plan``."""
    return _checked(plan_file.load(file, environ), selection)


def _checked(estate: Estate, selection: Selection) -> Checked:
    if selection.only:
        estate = select_services(estate, selection.only, with_dependencies=selection.with_dependencies)
    if selection.shard is not None:
        estate = select_shard(estate, *selection.shard)
    return Checked(estate, graph.build(estate), migration_folders.scan(estate))


def _connected_checked(
    file: str | os.PathLike[str], environ: Mapping[str, str] | None, on_notice: Callable[[str], None] | None
) -> Checked:
    """The whole estate, discovered sets read and secrets required: what force, baseline
    and accept need before they take a service's lock (an instance of a discovered set is
    a service they may name)."""
    estate = plan_file.load(file, environ)
    estate.require_secrets()
    return _checked(_discovered(estate, 0.0, on_notice), EVERY_SERVICE)


def _discovered(
    estate: Estate, wait_seconds: float, on_notice: Callable[[str], None] | None
) -> Estate:
    """The estate with its discovered sets' members read from their servers."""
    if estate.discovered:
        return estate
    from .estate.fleet import with_discovered
    from .live.facts import discover

    if any(spec.discovery is not None for spec in estate.sets.values()):
        estate.require_secrets()  # discovery connects: an unset url is named, not tried
    found = discover(estate, wait_seconds=wait_seconds, on_retry=on_notice)
    for key, members in found.items():
        spec = estate.sets[key].discovery
        if not members and on_notice is not None and spec is not None:
            on_notice(f"discovered set '{key}' matches no database on {', '.join(spec.servers)} (pattern '{spec.like}')")
    return with_discovered(estate, found)


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
    estate = _discovered(plan_file.load(file, environ), wait_seconds, on_notice)
    checked = _checked(estate, selection)
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
    if selection.only:  # the rest of the file is left out on purpose: it is not unmanaged
        planned = replace(planned, plan=replace(planned.plan, unmanaged=()))
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
    live = inspect(
        checked.estate,
        wait_seconds=wait_seconds,
        on_retry=on_notice,
        relations=_relations_named(checked.migration_sets),
        parallel=parallel,
    )
    return Planned(
        checked.estate,
        checked.graph,
        checked.migration_sets,
        live,
        make_plan(checked.estate, checked.graph, checked.migration_sets, live),
    )


def _relations_named(migration_sets: Mapping[str, MigrationSet]) -> dict[str, dict[int, frozenset[str]]]:
    """Per service and version, every table or index its migration files name: inspection
    reads the live size of those of the versions still to run, for the warnings (one query
    per database, not one per file, and none where nothing is pending)."""
    from .live.facts import COLUMN_TYPES
    from .migrations.lint import changes_a_column_type, relations_named

    def named(files: list[MigrationFile]) -> frozenset[str]:
        found = frozenset().union(*(relations_named(f.script) for f in files))
        return found | {COLUMN_TYPES} if any(changes_a_column_type(f.script) for f in files) else found

    # A set's instances share one folder's migrations: walk its files once, not once per database.
    by_folder: dict[int, dict[int, frozenset[str]]] = {}
    for migrations in migration_sets.values():
        if id(migrations.migrations) not in by_folder:
            by_folder[id(migrations.migrations)] = {
                m.version: named([f for f in (m.up, m.down) if f is not None]) for m in migrations.migrations
            }
    return {name: by_folder[id(migrations.migrations)] for name, migrations in migration_sets.items()}


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
    from .execution.executor import (
        execute,  # the writer is loaded only by commands that write
    )

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
        expected=planned.expected,
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
    shard: tuple[int, int] | None = None,
    parallel: int | None = None,
    one_pass: bool = False,
) -> Planned:
    """Re-plan and check the result against a saved plan; refuse (PlanChanged) if anything
    differs. ``shard``: the part this run was asked for (--shard), which must be the saved
    one's. ``one_pass`` (``apply --one-pass``): check all but the databases here, each
    database in the session that migrates it (``_one_pass``)."""
    from .planning import savedplan

    saved, selection = _load_saved(saved_path, environ, shard)
    if one_pass:
        return _one_pass(file, saved, selection, environ, wait_seconds, on_notice)
    planned = plan(
        file, environ=environ, wait_seconds=wait_seconds, on_notice=on_notice, selection=selection, parallel=parallel
    )
    now = savedplan.fingerprint(planned.estate, planned.migration_sets, planned.live)
    savedplan.check(saved, planned.plan, now)
    return planned


def _one_pass(
    file: str | os.PathLike[str],
    saved: dict[str, Any],
    selection: Selection,
    environ: Mapping[str, str] | None,
    wait_seconds: float,
    on_notice: Callable[[str], None] | None,
) -> Planned:
    """A saved plan to apply in one pass: one session per database, not two.

    The plan file, the migration files and every server (identity, roles, databases) are
    checked here, and anything changed refuses the whole plan before any change. Each
    database's bookkeeping is checked later, in the session that locks and migrates it:
    a database that changed since the plan was saved is refused on its own, as a failure
    of the run, after the databases before it were migrated.
    """
    from .live.facts import inspect_servers
    from .planning import savedplan

    checked = _checked(_discovered(plan_file.load(file, environ), wait_seconds, on_notice), selection)
    live = inspect_servers(checked.estate, wait_seconds=wait_seconds, on_retry=on_notice)
    savedplan.check_all_but_databases(saved, savedplan.fingerprint(checked.estate, checked.migration_sets, live))
    actions = savedplan.actions_to_apply(saved, checked.estate)
    return Planned(
        checked.estate,
        checked.graph,
        checked.migration_sets,
        live,
        Plan(actions=actions, services=(), environment=checked.estate.environment),
        expected=saved["fingerprint"].get("services", {}),
    )


def _load_saved(
    saved_path: str | os.PathLike[str], environ: Mapping[str, str] | None, shard: tuple[int, int] | None
) -> tuple[dict[str, Any], Selection]:
    """The saved plan and the services it was made for, refused if it was made for another
    environment or another shard than this run's."""
    from .errors import PlanChanged
    from .planning import savedplan

    saved = savedplan.load(Path(saved_path))
    savedplan.check_environment(saved, plan_file.selected_environment(environ))
    selection = Selection.from_dict(saved.get("selection"))
    if shard is not None and selection.shard != shard:
        made_for = f"shard {selection.shard[0]}/{selection.shard[1]}" if selection.shard else "the whole plan"
        raise PlanChanged(
            f"the saved plan was made for {made_for}; this run is for shard {shard[0]}/{shard[1]}; nothing was changed",
            hint="apply each shard's own saved plan",
        )
    return saved, selection


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

    checked = _checked(_discovered(plan_file.load(file, environ), wait_seconds, on_notice), selection)
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
) -> Recording:
    """Record VERSION as the service's current version and clear its dirty flag; refuses
    if the service changed while it waited for the migrations lock."""
    from .execution.force import force_version

    checked = _connected_checked(file, environ, on_notice)
    return force_version(
        checked.estate, checked.migration_sets, service_name, version, reason=reason, lock_wait=lock_wait,
        on_wait=on_notice,
    )  # fmt: skip


def baseline(
    file: str | os.PathLike[str],
    service_name: str,
    version: int,
    *,
    reason: str | None = None,
    environ: Mapping[str, str] | None = None,
    lock_wait: float = DEFAULT_LOCK_WAIT_SECONDS,
    on_notice: Callable[[str], None] | None = None,
) -> Recording:
    """Count every migration of the service up to VERSION as applied, without running any:
    for a database made by hand. Refuses a dirty service, one already at VERSION or above,
    and a VERSION with no file; the database must exist."""
    from .execution.baseline import baseline_version

    checked = _connected_checked(file, environ, on_notice)
    return baseline_version(
        checked.estate, checked.migration_sets, service_name, version, reason=reason, lock_wait=lock_wait,
        on_wait=on_notice,
    )  # fmt: skip


def accept(
    file: str | os.PathLike[str],
    service_name: str,
    version: int,
    *,
    reason: str,
    environ: Mapping[str, str] | None = None,
    lock_wait: float = DEFAULT_LOCK_WAIT_SECONDS,
    on_notice: Callable[[str], None] | None = None,
) -> Recording:
    """Record the checksum of an applied file that was edited on purpose, beside the old
    one, so that its drift warning goes away. Refuses a version that is not applied or
    has no drift, and an empty reason."""
    from .execution.baseline import accept_checksum

    checked = _connected_checked(file, environ, on_notice)
    return accept_checksum(
        checked.estate, checked.migration_sets, service_name, version, reason=reason, lock_wait=lock_wait,
        on_wait=on_notice,
    )  # fmt: skip


def adopt(
    file: str | os.PathLike[str],
    service_name: str,
    *,
    environ: Mapping[str, str] | None = None,
    lock_wait: float = DEFAULT_LOCK_WAIT_SECONDS,
) -> Takeover:
    """Take a service's dbmate or Flyway bookkeeping over: what that tool applied is recorded
    as applied, nothing is run, and the other tool's table is left as it was."""
    from .execution.adopt import adopt_service

    checked = _connected_checked(file, environ, None)
    return adopt_service(checked.estate, checked.migration_sets, service_name, lock_wait=lock_wait)


def hand_back(
    file: str | os.PathLike[str],
    service_name: str,
    *,
    environ: Mapping[str, str] | None = None,
    lock_wait: float = DEFAULT_LOCK_WAIT_SECONDS,
) -> list[str]:
    """Write the versions dbplan applied into dbmate's table of an adopted service, so that
    dbmate can take over again without running any of them."""
    from .execution.adopt import hand_back

    checked = _connected_checked(file, environ, None)
    return hand_back(checked.estate, checked.migration_sets, service_name, lock_wait=lock_wait)


# Where each tool keeps its migrations by default, looked at in this order by ``init``.
_KNOWN_FOLDERS = ("db/migrations", "db/migration", "src/main/resources/db/migration", "sql", "migrations")


def init(folder: str | os.PathLike[str] = ".", service: str = "app") -> tuple[Path, str, str]:
    """Write a starter ``dbplan.yaml`` in ``folder`` for one service; return its path, the
    migration folder it names and that folder's format. An existing golang-migrate, dbmate
    or Flyway folder is used as it is; else ``migrations/SERVICE`` gets a first pair."""
    root = Path(folder)
    plan_path = root / plan_file.DEFAULT_PLAN_FILE
    if plan_path.exists():
        raise DbplanError(f"{plan_path} already exists; dbplan init writes a new one only", hint="edit it instead")
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", service):
        raise DbplanError(f"service name '{service}' must be lowercase letters, digits and _")
    migrations, format = _existing_folder(root)
    if migrations is None:
        migrations, format = f"migrations/{service}", "golang-migrate"
        (root / migrations).mkdir(parents=True, exist_ok=True)
        (root / migrations / "000001_init.up.sql").write_text("-- the first migration of " + service + "\n")
        (root / migrations / "000001_init.down.sql").write_text("-- revert: the first migration\n")
    lines = [
        "# Written by dbplan init. DATABASE_URL unset: an embedded server in .dbplan/postgres.",
        "version: 1",
        "servers:",
        "  main:",
        "    url: ${DATABASE_URL:-}",
        "    embedded: true",
        "databases:",
        f"  {service}:",
        "    server: main",
        "services:",
        f"  {service}:",
        f"    database: {service}",
        f"    migrations: {migrations}",
    ]
    if format != "golang-migrate":
        lines.append(f"    format: {format}")
    if format == "dbmate":  # dbmate's own table is schema_migrations: dbplan keeps its bookkeeping apart
        lines.append("    table: dbplan_migrations")
    plan_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return plan_path, migrations, format


def _existing_folder(root: Path) -> tuple[str | None, str]:
    for candidate in _KNOWN_FOLDERS:
        folder = root / candidate
        if not folder.is_dir():
            continue
        names = sorted(path.name for path in folder.glob("*.sql"))
        if any(name.endswith(".up.sql") for name in names):
            return candidate, "golang-migrate"
        if any(re.match(r"^(V[0-9]|R__)", name) for name in names):
            return candidate, "flyway"
        if any("-- migrate:up" in (folder / name).read_text(errors="replace") for name in names):
            return candidate, "dbmate"
    return None, "golang-migrate"


def new_migration(
    file: str | os.PathLike[str], service_name: str, title: str, environ: Mapping[str, str] | None = None
) -> tuple[Path, Path]:
    """Create the next up/down pair of a service in its folder's format; return their paths
    (for dbmate the one file, twice)."""
    import re

    estate = plan_file.load(file, environ)
    service = estate.services.get(service_name)
    if service is None and estate.blueprint is not None:  # a service over a set: its one folder
        service = estate.blueprint.services.get(service_name)
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
    if service.format == "flyway":  # the next major version: V3 after V2.1
        major = max((m.version // 1_000_000 for m in existing.migrations), default=0) + 1
        up, down = folder / f"V{major}__{slug}.sql", folder / f"U{major}__{slug}.sql"
    else:
        version = next_version([m.written_version for m in existing.migrations])
        up = folder / (f"{version}_{slug}.sql" if service.format == "dbmate" else f"{version}_{slug}.up.sql")
        down = up if service.format == "dbmate" else folder / f"{version}_{slug}.down.sql"
    if up.exists() or down.exists():
        raise MigrationFileError(f"{up.name} already exists")
    if service.format == "dbmate":  # one file, dbmate's two sections
        up.write_text(f"-- migrate:up\n-- {title}\n\n-- migrate:down\n-- revert: {title}\n", encoding="utf-8")
        return up, up
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

"""The command line: parse arguments, call the library, render, pick the exit code.

Exit codes: 0 success; 1 any error (including usage errors, which click reports as 2);
``plan --detailed-exitcode``: 0 no changes, 2 changes pending, 1 error. So a CI script
can trust that 2 never means anything else.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from . import api
from .errors import DbplanError, signal_number_behind
from .planning.offline_lint import DEFAULT_FAIL_ON as DEFAULT_LINT_FAIL_ON
from .planning.offline_lint import LEVELS as LINT_LEVELS
from .planning.plan import (
    FAIL_ON,
    Action,
    AlterDatabaseOwner,
    AlterRole,
    ApplyMigration,
    ApplyRepeatable,
    CreateDatabase,
    CreateRole,
    Plan,
    RevertMigration,
)

if TYPE_CHECKING:
    from .execution.progress import Cancellation, Outcome

app = typer.Typer(
    help="Plan and apply PostgreSQL databases and migrations from one reviewed file, dbplan.yaml.",
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every subcommand
    # Tracebacks with local variables would print connection strings and passwords.
    pretty_exceptions_show_locals=False,
    pretty_exceptions_enable=False,
)
server_app = typer.Typer(help="Manage the embedded PostgreSQL server of the plan file.", no_args_is_help=True)
app.add_typer(server_app, name="server")

_state: dict[str, Any] = {"debug": False}

FileOption = Annotated[
    Path, typer.Option("--file", "-f", help="Plan file.", show_default=True)
]
DEFAULT_FILE = Path("dbplan.yaml")


def _seconds(value: float) -> float:
    """A duration option: a finite number of seconds, 0 or more (``nan`` would wait forever)."""
    import math

    if not math.isfinite(value) or value < 0:
        raise typer.BadParameter(f"{value:g} is not a number of seconds: give 0 or more, such as 30 or 2.5")
    return value


WaitOption = Annotated[
    float,
    typer.Option("--wait", help="Retry connecting for this many seconds (servers still starting).", callback=_seconds),
]
LockWaitOption = Annotated[
    float, typer.Option("--lock-wait", help="Seconds to wait for another run's lock.", callback=_seconds)
]
OnlyOption = Annotated[
    list[str] | None,
    typer.Option("--only", help="Only this service and the services it depends on (repeat, or separate with commas)."),
]
NoDepsOption = Annotated[bool, typer.Option("--no-deps", help="With --only: not the services it depends on.")]
ShardOption = Annotated[
    str | None,
    typer.Option(
        "--shard",
        envvar="DBPLAN_SHARD",
        show_envvar=True,
        help="Only part I of N (I/N, from 1/N to N/N): the sets' databases split by a stable hash of their names; "
        "everything else is in part 1.",
    ),
]
ShardsOption = Annotated[
    int | None,
    typer.Option(
        "--shards",
        min=1,
        help="Split into N parts and take part JOB_COMPLETION_INDEX + 1 (a Kubernetes Indexed Job's index, from 0).",
    ),
]
ParallelOption = Annotated[
    int | None,
    typer.Option(
        "--parallel",
        min=1,
        help="At most this many connections per server at once (default: the server's 'parallel', else 8).",
    ),
]
ScratchUrlOption = Annotated[
    str | None,
    typer.Option(
        "--scratch-url",
        envvar="DBPLAN_SCRATCH_URL",
        show_envvar=True,
        help="Admin URL of a server for throwaway databases (default: an embedded server).",
    ),
]


def _selection(
    only: list[str] | None, no_deps: bool, shard: str | None = None, shards: int | None = None
) -> api.Selection:
    names = tuple(name.strip() for value in only or () for name in value.split(",") if name.strip())
    if no_deps and not names:
        _fail(DbplanError("--no-deps goes with --only SERVICE", hint="name the service: --only SERVICE --no-deps"))
    part = _shard(shard, shards)
    if part is not None and names:
        _fail(DbplanError("--shard splits the whole plan; it does not go with --only"))
    return api.Selection(names, with_dependencies=not no_deps, shard=part)


def _shard(shard: str | None, shards: int | None) -> tuple[int, int] | None:
    """``--shard I/N``, or ``--shards N`` with the index of a Kubernetes Indexed Job."""
    if shard is not None and shards is not None:
        _fail(DbplanError("give --shard I/N or --shards N, not both"))
    if shards is not None:
        index = os.environ.get("JOB_COMPLETION_INDEX", "")
        if not index.isdigit():
            _fail(
                DbplanError(
                    f"--shards needs JOB_COMPLETION_INDEX (0 to {shards - 1}) in the environment"
                    + (f", not {index!r}" if index else ""),
                    hint="a Kubernetes Indexed Job sets it; elsewhere pass --shard I/N",
                )
            )
        return _checked_shard(int(index) + 1, shards, f"JOB_COMPLETION_INDEX={index} with --shards {shards}")
    if shard is None or not shard.strip():
        return None
    index_text, _, count_text = shard.strip().partition("/")
    if not (index_text.isdigit() and count_text.isdigit()):
        _fail(DbplanError(f"--shard takes I/N such as 2/4, not {shard!r}", hint="DBPLAN_SHARD takes the same"))
    return _checked_shard(int(index_text), int(count_text), f"--shard {shard}")


def _checked_shard(index: int, count: int, given: str) -> tuple[int, int]:
    if not 1 <= index <= count:
        _fail(DbplanError(f"{given}: there is no part {index} of {count}", hint="parts go from 1/N to N/N"))
    return index, count


class PlanFormat(str, Enum):
    text = "text"
    json = "json"
    markdown = "markdown"


class OutputFormat(str, Enum):
    text = "text"
    json = "json"


LintLevel = Enum("LintLevel", {name: name for name in (*LINT_LEVELS, "never")}, type=str)  # type: ignore[misc]
FailOn = Enum("FailOn", {name: name for name in FAIL_ON}, type=str)  # type: ignore[misc]


def _show_version(value: bool) -> None:
    if value:
        from . import __version__

        _say(f"dbplan {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of internal errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print dbplan's version and exit.", callback=_show_version, is_eager=True)
    ] = False,
    env: Annotated[
        str | None,
        typer.Option("--env", help="Environment of the plan file to use (its 'environments:' overlay); DBPLAN_ENV too."),
    ] = None,
) -> None:
    _state["debug"] = debug
    if env is not None:
        # One process, one environment: every command reads it where the plan file is loaded.
        os.environ["DBPLAN_ENV"] = env


# ---------------------------------------------------------------------------
# Output helpers


def _use_color(stream: Any = None) -> bool:
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def _say(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _note(text: str) -> None:
    sys.stderr.write(text.rstrip("\n") + "\n")
    sys.stderr.flush()


def _fail(err: DbplanError, code: int = 1, *, plan: Plan | None = None) -> NoReturn:
    """Say what went wrong on stderr and exit; under ``apply --format json``, before
    anything ran, stdout gets the JSON result of an apply that did nothing, too."""
    prefix = "\033[31merror:\033[0m " if _use_color(sys.stderr) else "error: "
    _note(prefix + err.render())
    if _state.get("json_refusal"):
        _say_json_refusal(err, plan)
    raise typer.Exit(code)


def _say_json_refusal(err: DbplanError, plan: Plan | None = None) -> None:
    from .render import json as render_json

    _state["json_refusal"] = False  # one object, however the run ends
    _say(render_json.render_refusal(err, plan))


class _CliProgress:
    """Progress of apply on stderr, so stdout stays the report: one line per action, or,
    for a fleet (``fleet_progress.is_fleet``), one line per database finished, or a live
    summary when stderr is a terminal."""

    def __init__(self) -> None:
        self.started = 0.0
        self.fleet: Any = None  # a fleet_progress.FleetTracker once the run is a fleet's

    def fleet_started(self, units: list[Any]) -> None:
        from .render import fleet_progress

        if not fleet_progress.is_fleet(units):
            return
        if sys.stderr.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb":
            from rich.console import Console

            self.fleet = fleet_progress.FleetLive(Console(file=sys.stderr))
        else:
            self.fleet = fleet_progress.FleetLines(_note)
        self.fleet.fleet_started(units)

    def unit_finished(self, unit: Any, status: str) -> None:
        if self.fleet is not None:
            self.fleet.unit_finished(unit, status)

    def stop(self) -> None:
        if self.fleet is not None and hasattr(self.fleet, "stop"):
            self.fleet.stop()

    def action_started(self, action: Action, index: int, total: int) -> None:
        self.started = time.monotonic()
        if self.fleet is not None:
            self.fleet.action_started(action, index, total)

    def action_finished(self, outcome: Outcome, index: int, total: int) -> None:
        if self.fleet is not None:
            self.fleet.action_finished(outcome, index, total)
            return
        status = {"done": "done", "skipped": "skipped", "failed": "FAILED", "cancelled": "cancelled"}[outcome.status]
        timing = f" in {outcome.duration_ms} ms" if outcome.status == "done" else ""
        detail = f" ({outcome.detail})" if outcome.status == "skipped" and outcome.detail else ""
        _note(f"[{index}/{total}] {describe_action(outcome.action)}: {status}{timing}{detail}")

    def notice(self, message: str) -> None:
        if self.fleet is not None:
            self.fleet.notice(message)
            return
        _note(message)


def describe_action(action: Action) -> str:
    if isinstance(action, CreateRole):
        return f"create role {action.role} on {action.server}"
    if isinstance(action, AlterRole):
        return f"alter role {action.role} on {action.server} ({', '.join(action.changes())})"
    if isinstance(action, CreateDatabase):
        return f"create database {action.database} on {action.server}"
    if isinstance(action, AlterDatabaseOwner):
        return f"change owner of database {action.database} on {action.server} to {action.owner}"
    if isinstance(action, ApplyRepeatable):
        return f"run repeatable {action.service} {action.title}"
    verb = "apply" if isinstance(action, ApplyMigration) else "revert"
    assert isinstance(action, (ApplyMigration, RevertMigration))
    return f"{verb} {action.service} {action.version} {action.title}"


# ---------------------------------------------------------------------------
# Commands


@app.command()
def validate(file: FileOption = DEFAULT_FILE) -> None:
    """Check the plan file and migration folders offline; no server needed."""
    try:
        checked = api.validate(file)
    except DbplanError as err:
        _fail(err)
    from .render.text import plural

    # A service over a set counts once, with its folder: not once per database.
    definitions = {service.fleet or name: name for name, service in checked.estate.services.items()}
    count = sum(len(checked.migration_sets[name].migrations) for name in definitions.values())
    in_sets = sum(1 for database in checked.estate.databases.values() if database.fleet is not None)
    _say(
        f"{file}: valid ({plural(len(checked.estate.servers), 'server')}, "
        f"{plural(len(checked.estate.databases), 'database')}{f' ({in_sets} in sets)' if in_sets else ''}, "
        f"{plural(len(definitions), 'service')}, {plural(count, 'migration')})\n"
    )


@app.command()
def plan(
    file: FileOption = DEFAULT_FILE,
    format: Annotated[PlanFormat, typer.Option("--format", help="Output format.")] = PlanFormat.text,
    out: Annotated[Path | None, typer.Option("--out", help="Also save the plan as JSON to this file.")] = None,
    detailed_exitcode: Annotated[
        bool, typer.Option("--detailed-exitcode", help="Exit 2 when changes are pending, 0 when none.")
    ] = False,
    wait: WaitOption = 0.0,
    only: OnlyOption = None,
    no_deps: NoDepsOption = False,
    shard: ShardOption = None,
    shards: ShardsOption = None,
    fail_on: Annotated[
        list[FailOn] | None,
        typer.Option("--fail-on", help="Exit 1 when the plan has drift, or any warning (repeatable)."),
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Run the pending migrations first on a throwaway copy of the live schema.")
    ] = False,
    scratch_url: ScratchUrlOption = None,
    parallel: ParallelOption = None,
) -> None:
    """Read the live servers and print what would change."""
    selection = _selection(only, no_deps, shard, shards)
    try:
        planned = api.plan(file, wait_seconds=wait, on_notice=_note, selection=selection, parallel=parallel)
        if verify and not planned.plan.blocked:
            planned = api.verify(planned, scratch_url=scratch_url, on_notice=_note)
    except DbplanError as err:
        _fail(err)
    _say(_render_plan(planned, format))
    if out is not None:
        try:
            api.save_plan(planned, out, selection)
        except DbplanError as err:
            _fail(err)
        _note(f"plan saved to {out}; apply exactly this plan with 'dbplan apply {out}'")
    if planned.plan.blocked:
        raise typer.Exit(1)
    if planned.verification is not None and not planned.verification.ok:
        raise typer.Exit(1)
    failures = planned.plan.failures_under(frozenset(choice.value for choice in fail_on or ()))
    if failures:
        flags = " ".join(f"--fail-on {choice.value}" for choice in dict.fromkeys(fail_on or ()))
        _fail(DbplanError("; ".join(failures), hint=f"this fails because of {flags}; without it, it is only a warning"))
    if detailed_exitcode and planned.plan.changes:
        raise typer.Exit(2)


def _render_plan(planned: api.Planned, format: PlanFormat) -> str:
    plan_value = planned.plan
    verified = planned.verification
    if verified is not None:
        from .render import verification as render_verification
    if format is PlanFormat.json:
        from .render import json as render_json

        if verified is not None:
            return render_verification.render_json(plan_value, verified)
        return render_json.render_plan(plan_value)
    if format is PlanFormat.markdown:
        from .render.fleet import render_markdown_plan

        # The SQL shown is the text that was scanned and checksummed, not a second read.
        texts = {
            file.display: file.text
            for migration_set in planned.migration_sets.values()
            for migration in migration_set.migrations
            for file in (migration.up, migration.down)
            if file is not None
        }
        texts.update(
            (repeatable.file.display, repeatable.file.text)
            for migration_set in planned.migration_sets.values()
            for repeatable in migration_set.repeatables
        )
        shown = render_markdown_plan(plan_value, sql_for=texts.get, graph=planned.graph)
        return shown + (render_verification.render_markdown(verified) if verified is not None else "")
    from .render import text

    shown = text.render_plan(plan_value, color=_use_color())
    return shown + ("\n" + render_verification.render_text(verified, color=_use_color()) if verified is not None else "")


@app.command()
def apply(
    saved_plan: Annotated[
        Path | None, typer.Argument(help="A plan saved with 'dbplan plan --out'; refused if anything changed since.")
    ] = None,
    file: FileOption = DEFAULT_FILE,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Apply without asking.")] = False,
    format: Annotated[OutputFormat, typer.Option("--format", help="Output format of the result.")] = OutputFormat.text,
    lock_wait: LockWaitOption = 300.0,
    wait: WaitOption = 0.0,
    only: OnlyOption = None,
    no_deps: NoDepsOption = False,
    shard: ShardOption = None,
    shards: ShardsOption = None,
    parallel: ParallelOption = None,
    keep_going: Annotated[
        bool,
        typer.Option(
            "--keep-going",
            help="After a failure, go on with everything that does not depend on it (never past a failed stage).",
        ),
    ] = False,
    one_pass: Annotated[
        bool,
        typer.Option(
            "--one-pass",
            help="With a saved plan: check each database against it in the session that migrates it, "
            "not all of them first (one session per database instead of two; a database that changed "
            "since is refused on its own).",
        ),
    ] = False,
) -> None:
    """Show the plan, ask for confirmation on a terminal, and execute it."""
    from .render import text

    as_json = format is OutputFormat.json
    # From here on every way out prints one JSON object on stdout (see _fail).
    _state["json_refusal"] = as_json
    selection = _selection(only, no_deps, shard, shards)
    if saved_plan is not None and selection.only:
        _fail(DbplanError("a saved plan already says which services it applies; --only goes with 'dbplan plan --out'"))
    if one_pass and saved_plan is None:
        _fail(DbplanError("--one-pass applies a saved plan", hint="save one with 'dbplan plan --out FILE', review it, "
                          "then run 'dbplan apply --one-pass FILE'"))  # fmt: skip
    try:
        if saved_plan is None:
            planned = api.plan(
                file, wait_seconds=wait, on_notice=_note, wait_for_runs=lock_wait, selection=selection, parallel=parallel
            )
        else:
            planned = api.plan_saved(
                file, saved_plan, wait_seconds=wait, on_notice=_note, shard=selection.shard, parallel=parallel,
                one_pass=one_pass,
            )  # fmt: skip
    except DbplanError as err:
        _fail(err)
    if not as_json:
        _say(text.render_one_pass(planned.plan, color=_use_color()) if one_pass
             else text.render_plan(planned.plan, color=_use_color()))  # fmt: skip
    if planned.plan.blocked:
        _fail(DbplanError("the plan is blocked; nothing was changed", hint=planned.plan.blockers[0].hint), plan=planned.plan)
    if not planned.plan.changes:
        if as_json:
            from .execution.progress import Result
            from .render import json as render_json

            _say(render_json.render_result(Result(())))
        return
    if not yes:
        if not sys.stdin.isatty():
            _fail(DbplanError("refusing to apply without confirmation: input is not a terminal", hint="pass --yes"))
        # With JSON on stdout the question goes to stderr, where a person at the terminal sees it.
        if not typer.confirm("Apply these changes?", default=False, err=as_json):
            _fail(DbplanError("Nothing was changed.", hint="answer y to apply, or pass --yes"))
    from .execution.progress import Cancellation, Interrupted

    cancellation = Cancellation()
    _collect_garbage_from_here()  # a long run: its garbage must not pile up
    _state["phase"] = "applying"  # set before the handlers, so no stop can be told "nothing was changed"
    progress = _CliProgress()
    with _stop_on_signals(cancellation):
        try:
            result = api.apply(
                planned,
                progress=progress,
                lock_wait=lock_wait,
                cancellation=cancellation,
                parallel=parallel,
                keep_going=keep_going,
            )
        finally:
            progress.stop()
    _state["json_refusal"] = False  # the result below is the JSON object
    if as_json:
        from .render import json as render_json

        _say(render_json.render_result(result))
    else:
        _say(text.render_result(result, color=_use_color()))
    if isinstance(result.error, Interrupted):
        import signal

        number = signal.Signals.__members__.get(result.error.signal_name)
        # The shell's convention for "ended by signal N", as if dbplan had not caught it.
        _fail(result.error, code=128 + number.value if number else 1)
    if result.error is not None:
        _fail(result.error)


@contextmanager
def _stop_on_signals(cancellation: Cancellation) -> Iterator[None]:
    """While applying, SIGINT and SIGTERM ask the executor to stop cleanly instead of killing it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may install handlers; a library caller keeps its own
        return

    def request_stop(signum: int, frame: object) -> None:
        _note(cancellation.request(signal.Signals(signum).name))

    previous = {number: signal.signal(number, request_stop) for number in (signal.SIGINT, signal.SIGTERM)}
    taken_early = _signal_taken_early()
    if taken_early is not None:  # a stop that arrived before, and was lost on its way: honour it now
        request_stop(taken_early, None)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@app.command()
def status(
    file: FileOption = DEFAULT_FILE,
    format: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.text,
    wait: WaitOption = 0.0,
    only: OnlyOption = None,
    no_deps: NoDepsOption = False,
    shard: ShardOption = None,
    shards: ShardsOption = None,
) -> None:
    """Per service: database, current and latest version, pending, dirty, drift."""
    selection = _selection(only, no_deps, shard, shards)
    try:
        planned = api.plan(file, wait_seconds=wait, on_notice=_note, selection=selection)
    except DbplanError as err:
        _fail(err)
    if format is OutputFormat.json:
        from .render import json as render_json

        _say(render_json.render_status(planned.plan))
    else:
        from .render import text

        _say(text.render_status(planned.plan, color=_use_color()))


@app.command("test")
def test_command(
    file: FileOption = DEFAULT_FILE,
    format: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.text,
    require_down: Annotated[bool, typer.Option("--require-down", help="A migration without a down file fails.")] = False,
    scratch_url: ScratchUrlOption = None,
    only: OnlyOption = None,
    no_deps: NoDepsOption = False,
) -> None:
    """Apply, revert and re-apply every migration on a throwaway database of the embedded
    server; fail when a down file does not put the schema back."""
    from .render import text

    selection = _selection(only, no_deps)
    as_json = format is OutputFormat.json
    try:
        report = api.round_trip(
            file,
            selection=selection,
            require_down=require_down,
            scratch_url=scratch_url,
            on_check=None if as_json else lambda service, check: _note(text.round_trip_line(service, check)),
        )
    except DbplanError as err:
        _fail(err)
    if as_json:
        from .render import json as render_json

        _say(render_json.render_round_trips(report))
    else:
        _say(text.render_round_trips(report, color=_use_color()))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def lint(
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="Migration files to lint (default: every one); files outside the migration folders are ignored."),
    ] = None,
    file: FileOption = DEFAULT_FILE,
    format: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.text,
    fail_on: Annotated[
        LintLevel,
        typer.Option("--fail-on", help="Exit 1 on a finding of this severity or a more serious one (never: report only)."),
    ] = LintLevel[DEFAULT_LINT_FAIL_ON],
    since: Annotated[
        str | None, typer.Option("--since", help="Also lint the files changed since this git revision (with no FILES: only those).")
    ] = None,
) -> None:
    """Lint migration files with every rule that needs no server; no secrets needed."""
    try:
        report = api.lint(file, paths=files or ([] if since else None), since=since)
    except DbplanError as err:
        _fail(err)
    level = fail_on.value
    if format is OutputFormat.json:
        from .render import json as render_json

        _say(render_json.render_lint(report, level))
    else:
        from .render import text

        _say(text.render_lint(report, level, color=_use_color()))
    if report.at_or_above(level):
        raise typer.Exit(1)


@app.command()
def history(
    services: Annotated[list[str] | None, typer.Argument(help="Services to show (default: every one).")] = None,
    file: FileOption = DEFAULT_FILE,
    format: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.text,
    limit: Annotated[int, typer.Option("--limit", help="Latest events per service; 0 shows every one.", min=0)] = 50,
    wait: WaitOption = 0.0,
) -> None:
    """Show what ran, when, how long it took, by whom and why, from each service's history table."""
    selection = api.Selection(tuple(services or ()), with_dependencies=False)
    try:
        histories = api.history(file, selection=selection, limit=limit or None, wait_seconds=wait, on_notice=_note)
    except DbplanError as err:
        _fail(err)
    if format is OutputFormat.json:
        from .render import json as render_json

        _say(render_json.render_history(histories))
    else:
        from .render import text

        _say(text.render_history(histories, color=_use_color()))


VersionArgument = Annotated[int, typer.Argument(help="A version of a migration file of the service.", min=1)]
ReasonOption = Annotated[str | None, typer.Option("--reason", help="Why, for the history table.")]


@app.command()
def force(
    service: Annotated[str, typer.Argument(help="Service whose version to record.")],
    version: Annotated[int, typer.Argument(help="Version the database is at now (0: none).", min=0)],
    file: FileOption = DEFAULT_FILE,
    reason: ReasonOption = None,
    format: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.text,
    lock_wait: LockWaitOption = 300.0,
) -> None:
    """Clear a dirty state by recording VERSION as the service's current version."""
    _record("force", service, version, format, lambda: api.force(
        file, service, version, reason=reason, lock_wait=lock_wait, on_notice=_note
    ))  # fmt: skip


@app.command()
def baseline(
    service: Annotated[str, typer.Argument(help="Service of the database made by hand.")],
    version: VersionArgument,
    file: FileOption = DEFAULT_FILE,
    reason: ReasonOption = None,
    format: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.text,
    lock_wait: LockWaitOption = 300.0,
) -> None:
    """Count every migration up to VERSION as applied, running none: for a database made by hand."""
    _record("baseline", service, version, format, lambda: api.baseline(
        file, service, version, reason=reason, lock_wait=lock_wait, on_notice=_note
    ))  # fmt: skip


@app.command()
def accept(
    service: Annotated[str, typer.Argument(help="Service of the edited file.")],
    version: VersionArgument,
    reason: Annotated[str, typer.Option("--reason", help="Why the applied file was changed (required).")],
    file: FileOption = DEFAULT_FILE,
    format: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.text,
    lock_wait: LockWaitOption = 300.0,
) -> None:
    """Record the new checksum of an applied file edited on purpose, so its drift warning goes away."""
    _record("accept", service, version, format, lambda: api.accept(
        file, service, version, reason=reason, lock_wait=lock_wait, on_notice=_note
    ))  # fmt: skip


def _record(command: str, service: str, version: int, format: OutputFormat, run: Any) -> None:
    """Run one of the commands that record a person's word, and say what it recorded
    (as JSON too, where a refusal is an object with ``ok`` false and nothing recorded)."""
    as_json = format is OutputFormat.json
    try:
        recording = run()
    except DbplanError as err:
        if as_json:
            from .render import json as render_json

            _say(render_json.render_recording(command, service, version, None, err))
        _fail(err)
    if as_json:
        from .render import json as render_json

        _say(render_json.render_recording(command, service, version, recording))
    else:
        _say(recording.message + ("" if recording.message.endswith(".") else ".") + "\n")


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="Folder to write dbplan.yaml in.")] = Path("."),
    service: Annotated[str, typer.Option("--service", help="Name of the service (and its database).")] = "app",
) -> None:
    """Write a starter dbplan.yaml, for an existing golang-migrate, dbmate or Flyway folder if there is one."""
    try:
        plan_path, migrations, format = api.init(folder, service)
    except DbplanError as err:
        _fail(err)
    _say(f"wrote {plan_path}: service '{service}' reads {migrations} ({format} files).\n"
         f"next: dbplan plan -f {plan_path}\n")  # fmt: skip


@app.command()
def adopt(
    service: Annotated[str, typer.Argument(help="Service whose dbmate or Flyway bookkeeping to take over.")],
    file: FileOption = DEFAULT_FILE,
) -> None:
    """Record what dbmate or Flyway applied as applied, without running anything."""
    try:
        taken = api.adopt(file, service)
    except DbplanError as err:
        _fail(err)
    count = len(taken.applied)
    tool = "Flyway" if taken.tool == "flyway" else "dbmate"
    summary = (
        f"adopted service '{service}' from {tool} ({taken.source}): {count} version{'s' if count != 1 else ''} "
        f"recorded as applied, none run; now at version {taken.version or 0}."
    )
    lines = [summary]
    if taken.baseline is not None:
        lines.append(f"  Flyway's baseline: versions up to {taken.baseline} count as applied.")
    lines += [f"  repeatable {r.file.display}: unchanged since Flyway ran it, recorded" for r in taken.repeatables]
    lines += [f"  not taken over: {what}" for what in taken.skipped]
    lines.append(f"  {taken.source} was left as it was.")
    _say("\n".join(lines) + "\n")


@app.command()
def handback(
    service: Annotated[str, typer.Argument(help="Adopted dbmate service to hand back to dbmate.")],
    file: FileOption = DEFAULT_FILE,
) -> None:
    """Write what dbplan applied into dbmate's table, so that dbmate can take over again."""
    try:
        versions = api.hand_back(file, service)
    except DbplanError as err:
        _fail(err)
    _say(f"dbmate's table of service '{service}' now lists {len(versions)} applied versions"
         f"{': latest ' + versions[-1] if versions else ''}; dbmate runs none of them again.\n")  # fmt: skip


@app.command()
def new(
    service: Annotated[str, typer.Argument(help="Service to add a migration to.")],
    title: Annotated[str, typer.Argument(help="What the migration does, e.g. 'add prices'.")],
    file: FileOption = DEFAULT_FILE,
) -> None:
    """Create the next up/down migration pair of a service."""
    try:
        up, down = api.new_migration(file, service, title)
    except DbplanError as err:
        _fail(err)
    _say(f"created {up}\n" + (f"created {down}\n" if down != up else ""))


class GraphFormat(str, Enum):
    mermaid = "mermaid"
    dot = "dot"


@app.command()
def graph(
    file: FileOption = DEFAULT_FILE,
    format: Annotated[GraphFormat, typer.Option("--format", help="Output format.")] = GraphFormat.mermaid,
) -> None:
    """Print the dependency graph of servers, roles, databases and services, as Mermaid or DOT."""
    from .render import graph as render_graph

    try:
        checked = api.validate(file)
    except DbplanError as err:
        _fail(err)
    _say(render_graph.render(checked.graph, format.value))


ServerOption = Annotated[str | None, typer.Option("--server", help="Only this server (default: every embedded one).")]


def _server_command(file: Path, server: str | None, operation: str) -> None:
    try:
        for name, embedded in api.embedded_servers(file, server):
            state = getattr(embedded, operation)()
            _say(_describe_server(name, state))
    except DbplanError as err:
        _fail(err)


def _describe_server(name: str, state: Any) -> str:
    lines = [f"server {name}: {'running' if state.running else 'stopped'}"]
    if state.running:
        lines.append(f"  url:      {state.url}")
        lines.append(f"  pid:      {state.pid}")
        lines += _how_to_connect(state)
    lines.append(f"  port:     {state.port}")
    lines.append(f"  data:     {state.data_dir}")
    if state.version:
        lines.append(f"  version:  PostgreSQL {state.version}")
    if state.run_as:
        lines.append(f"  runs as:  {state.run_as} (PostgreSQL refuses to run as root)")
    if state.note:
        lines.append(f"  note:     {state.note}")
    return "\n".join(lines) + "\n"


def _how_to_connect(state: Any) -> list[str]:
    """psql command lines that work for the user who runs dbplan, and only for them."""
    import shlex

    lines = [f"  connect:  psql {shlex.quote(state.url)}"]
    if state.socket_dir is not None:
        lines.append(f"            psql -h {shlex.quote(str(state.socket_dir))} -p {state.port} -U postgres postgres")
    lines.append(f"  password: in {state.password_file} (mode 0600, yours only; other users cannot connect)")
    return lines


@server_app.command("start")
def server_start(file: FileOption = DEFAULT_FILE, server: ServerOption = None) -> None:
    """Start the embedded server(s); a running one is left as it is."""
    _server_command(file, server, "start")


@server_app.command("stop")
def server_stop(file: FileOption = DEFAULT_FILE, server: ServerOption = None) -> None:
    """Stop the embedded server(s)."""
    _server_command(file, server, "stop")


@server_app.command("status")
def server_status(file: FileOption = DEFAULT_FILE, server: ServerOption = None) -> None:
    """Show whether the embedded server(s) run, where, and as whom."""
    _server_command(file, server, "status")


# ---------------------------------------------------------------------------
# Entry point


def _usage_error() -> Any:
    # typer 0.2x carries its own copy of click; older releases use click itself.
    try:
        from typer._click.exceptions import UsageError
    except ImportError:
        from click.exceptions import UsageError  # type: ignore[assignment,no-redef]
    return UsageError


def run() -> NoReturn:
    """The ``dbplan`` console script and ``python -m orchestrator``: ``main``, then exit
    without tearing the interpreter down. Freeing every parse tree and module one by one
    only to exit costs 50 ms after planning 1,000 migrations; dbplan holds nothing that
    needs a finalizer by then (every connection is closed), so the output is flushed and
    the process ends."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a closed pipe (dbplan plan | head): nothing to add
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run the app, mapping usage errors to exit code 1 (tests call this in-process)."""
    with _no_cyclic_gc_while_planning(), _environment_restored():
        return _main(argv)


@contextmanager
def _environment_restored() -> Iterator[None]:
    """--env sets DBPLAN_ENV for the command; an in-process caller gets its own back."""
    before = os.environ.get("DBPLAN_ENV")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DBPLAN_ENV", None)
        else:
            os.environ["DBPLAN_ENV"] = before


@contextmanager
def _no_cyclic_gc_while_planning() -> Iterator[None]:
    """Loading and planning allocate tens of thousands of objects (parse trees, above all)
    and free almost none, so the cycle collector's passes over them find nothing: with
    1,000 migrations they cost a quarter of the time before the first one runs. Plain
    reference counting still frees what is dropped. Whatever state the collector was in
    is restored on the way out (tests run commands in-process)."""
    import gc

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if _state.pop("gc_frozen", False):
            gc.unfreeze()
        if was_enabled:
            gc.enable()
        else:
            gc.disable()


def _collect_garbage_from_here() -> None:
    """Before long work: the collector runs again, without walking what planning built."""
    import gc

    gc.freeze()
    _state["gc_frozen"] = True
    gc.enable()


def _main(argv: list[str] | None) -> int:
    _state["json_refusal"] = _asks_for_apply_json(sys.argv[1:] if argv is None else argv)
    _state["phase"] = "before"
    try:
        code = app(args=argv, prog_name="dbplan", standalone_mode=False)
    except _usage_error() as err:
        err.show()
        if _state["json_refusal"]:
            _say_json_refusal(DbplanError(f"usage: {err.format_message()}", hint="see 'dbplan apply -h'"))
        return 1
    except typer.Abort:
        _refuse("Aborted; nothing was changed.")
        return 1
    except typer.Exit as err:
        if isinstance(err.__cause__, KeyboardInterrupt):  # typer's silent Exit(130) for any stop
            return _stopped(err.__cause__)
        return err.exit_code
    except KeyboardInterrupt as stop:
        return _stopped(stop)
    except Exception as err:
        if signal_number_behind(err) is not None:  # a signal's stop, wrapped by Python on its way
            return _stopped(err)
        if _state["debug"]:
            raise
        _refuse("internal error: dbplan failed unexpectedly. Run again with --debug for the traceback, and report it.")
        return 1
    except BaseException as stop:
        if signal_number_behind(stop) is not None:  # __main__.Stopped: a signal outside apply's own handling
            return _stopped(stop)
        raise
    taken = _signal_taken_early()
    if taken is not None:  # the command went on past a stop that was lost on its way
        return _stopped(_SignalTaken(taken))
    return code if isinstance(code, int) else 0


class _SignalTaken(Exception):
    def __init__(self, signal_number: int) -> None:
        self.signal_number = signal_number
        super().__init__(signal_number)


def _signal_taken_early() -> int | None:
    """A SIGINT or SIGTERM that ``__main__``'s handler took (None in-process, where it has
    none): a library on the way may have swallowed what the handler raised."""
    main = sys.modules.get("orchestrator.__main__")
    return main.received_signal() if main is not None and hasattr(main, "received_signal") else None


def _stopped(stop: BaseException) -> int:
    """A Ctrl-C or SIGTERM outside apply's own handling: say what it interrupted; exit
    with the shell's code for it."""
    import signal

    number = signal_number_behind(stop) or signal.SIGINT
    _refuse(f"{signal.Signals(number).name}: {_what_was_done()}")
    return 128 + number


def _refuse(message: str) -> None:
    """The last word of a run that ended outside its own error handling: on stderr, and
    as the JSON result when ``apply --format json`` has not printed one yet."""
    _note(message)
    if _state.get("json_refusal"):
        _say_json_refusal(DbplanError(message))


def _what_was_done() -> str:
    """For a stop that arrived outside apply's signal handling: what it interrupted."""
    if _state.get("phase") == "applying":
        return "stopped as the run began or ended, outside its own handling; 'dbplan status' shows where each service stands"
    return "stopped before anything was changed (reading the plan file and the servers only reads)"


def _asks_for_apply_json(args: list[str]) -> bool:
    """Whether the command line is ``apply ... --format json``, read before click does, so
    that even a usage error of such a run answers with a JSON object."""
    if "apply" not in args:
        return False
    after = args[args.index("apply") + 1 :]
    return "--format=json" in after or any(a == "--format" and b == "json" for a, b in zip(after, after[1:]))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

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
from .errors import DbplanError
from .planning.plan import Action, ApplyMigration, CreateDatabase, CreateRole, RevertMigration

if TYPE_CHECKING:
    from .execution.progress import Cancellation, Outcome

app = typer.Typer(
    help="Plan and apply PostgreSQL databases and migrations from one reviewed file, dbplan.yaml.",
    add_completion=False,
    no_args_is_help=True,
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
WaitOption = Annotated[float, typer.Option("--wait", help="Retry connecting for this many seconds (servers still starting).")]


class PlanFormat(str, Enum):
    text = "text"
    json = "json"
    markdown = "markdown"


class OutputFormat(str, Enum):
    text = "text"
    json = "json"


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of internal errors.")] = False,
) -> None:
    _state["debug"] = debug


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


def _fail(err: DbplanError, code: int = 1) -> NoReturn:
    prefix = "\033[31merror:\033[0m " if _use_color(sys.stderr) else "error: "
    _note(prefix + err.render())
    raise typer.Exit(code)


class _CliProgress:
    """Progress of apply on stderr, one line per action, so stdout stays the report."""

    def __init__(self) -> None:
        self.started = 0.0

    def action_started(self, action: Action, index: int, total: int) -> None:
        self.started = time.monotonic()

    def action_finished(self, outcome: Outcome, index: int, total: int) -> None:
        status = {"done": "done", "skipped": "skipped", "failed": "FAILED"}[outcome.status]
        timing = f" in {outcome.duration_ms} ms" if outcome.status == "done" else ""
        detail = f" ({outcome.detail})" if outcome.status == "skipped" and outcome.detail else ""
        _note(f"[{index}/{total}] {describe_action(outcome.action)}: {status}{timing}{detail}")

    def notice(self, message: str) -> None:
        _note(message)


def describe_action(action: Action) -> str:
    if isinstance(action, CreateRole):
        return f"create role {action.role} on {action.server}"
    if isinstance(action, CreateDatabase):
        return f"create database {action.database} on {action.server}"
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

    count = sum(len(s.migrations) for s in checked.migration_sets.values())
    _say(
        f"{file}: valid ({plural(len(checked.estate.servers), 'server')}, "
        f"{plural(len(checked.estate.databases), 'database')}, {plural(len(checked.estate.services), 'service')}, "
        f"{plural(count, 'migration')})\n"
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
) -> None:
    """Read the live servers and print what would change."""
    try:
        planned = api.plan(file, wait_seconds=wait, on_notice=_note)
    except DbplanError as err:
        _fail(err)
    _say(_render_plan(planned, format))
    if out is not None:
        api.save_plan(planned, out)
        _note(f"plan saved to {out}; apply exactly this plan with 'dbplan apply {out}'")
    if planned.plan.blocked:
        raise typer.Exit(1)
    if detailed_exitcode and planned.plan.changes:
        raise typer.Exit(2)


def _render_plan(planned: api.Planned, format: PlanFormat) -> str:
    plan_value = planned.plan
    if format is PlanFormat.json:
        from .render import json as render_json

        return render_json.render_plan(plan_value)
    if format is PlanFormat.markdown:
        from .render import markdown

        # The SQL shown is the text that was scanned and checksummed, not a second read.
        texts = {
            file.display: file.text
            for migration_set in planned.migration_sets.values()
            for migration in migration_set.migrations
            for file in (migration.up, migration.down)
            if file is not None
        }
        return markdown.render_plan(plan_value, sql_for=texts.get, graph=planned.graph)
    from .render import text

    return text.render_plan(plan_value, color=_use_color())


@app.command()
def apply(
    saved_plan: Annotated[
        Path | None, typer.Argument(help="A plan saved with 'dbplan plan --out'; refused if anything changed since.")
    ] = None,
    file: FileOption = DEFAULT_FILE,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Apply without asking.")] = False,
    format: Annotated[OutputFormat, typer.Option("--format", help="Output format of the result.")] = OutputFormat.text,
    lock_wait: Annotated[float, typer.Option("--lock-wait", help="Seconds to wait for another run's lock.")] = 300.0,
    wait: WaitOption = 0.0,
) -> None:
    """Show the plan, ask for confirmation on a terminal, and execute it."""
    from .render import text

    try:
        if saved_plan is None:
            planned = api.plan(file, wait_seconds=wait, on_notice=_note, wait_for_runs=lock_wait)
        else:
            planned = api.plan_saved(file, saved_plan, wait_seconds=wait, on_notice=_note)
    except DbplanError as err:
        _fail(err)
    as_json = format is OutputFormat.json
    if not as_json:
        _say(text.render_plan(planned.plan, color=_use_color()))
    if planned.plan.blocked:
        _fail(DbplanError("the plan is blocked; nothing was changed", hint=planned.plan.blockers[0].hint))
    if not planned.plan.changes:
        if as_json:
            from .execution.progress import Result
            from .render import json as render_json

            _say(render_json.render_result(Result(())))
        return
    if not yes:
        if not sys.stdin.isatty():
            _fail(DbplanError("refusing to apply without confirmation: input is not a terminal", hint="pass --yes"))
        if not typer.confirm("Apply these changes?", default=False):
            _note("Nothing was changed.")
            raise typer.Exit(1)
    from .execution.progress import Cancellation, Interrupted

    cancellation = Cancellation()
    _collect_garbage_from_here()  # a long run: its garbage must not pile up
    with _stop_on_signals(cancellation):
        result = api.apply(planned, progress=_CliProgress(), lock_wait=lock_wait, cancellation=cancellation)
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
) -> None:
    """Per service: database, current and latest version, pending, dirty, drift."""
    try:
        planned = api.plan(file, wait_seconds=wait, on_notice=_note)
    except DbplanError as err:
        _fail(err)
    if format is OutputFormat.json:
        from .render import json as render_json

        _say(render_json.render_status(planned.plan))
    else:
        from .render import text

        _say(text.render_status(planned.plan, color=_use_color()))


@app.command()
def force(
    service: Annotated[str, typer.Argument(help="Service whose version to record.")],
    version: Annotated[int, typer.Argument(help="Version the database is at now (0: none).", min=0)],
    file: FileOption = DEFAULT_FILE,
    reason: Annotated[str | None, typer.Option("--reason", help="Why, for the history table.")] = None,
) -> None:
    """Clear a dirty state by recording VERSION as the service's current version."""
    try:
        api.force(file, service, version, reason=reason, on_notice=_note)
    except DbplanError as err:
        _fail(err)
    _say(f"service '{service}' is now recorded at version {version}, not dirty.\n")


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
    _say(f"created {up}\ncreated {down}\n")


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
    lines.append(f"  port:     {state.port}")
    lines.append(f"  data:     {state.data_dir}")
    if state.version:
        lines.append(f"  version:  PostgreSQL {state.version}")
    if state.run_as:
        lines.append(f"  runs as:  {state.run_as} (PostgreSQL refuses to run as root)")
    if state.note:
        lines.append(f"  note:     {state.note}")
    return "\n".join(lines) + "\n"


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
        from click.exceptions import UsageError  # type: ignore[assignment]
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
    with _no_cyclic_gc_while_planning():
        return _main(argv)


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
    try:
        code = app(args=argv, prog_name="dbplan", standalone_mode=False)
    except _usage_error() as err:
        err.show()
        return 1
    except typer.Abort:
        _note("Aborted; nothing was changed.")
        return 1
    except typer.Exit as err:
        return err.exit_code
    except KeyboardInterrupt:
        _note("Interrupted.")
        return 130
    except Exception:
        if _state["debug"]:
            raise
        _note("internal error: dbplan failed unexpectedly. Run again with --debug for the traceback, and report it.")
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The plan as GitHub-flavoured Markdown, made to be posted as a pull-request comment.

A summary, an overview table, then a section per server (roles and databases to create)
and per service with something to report (migrations to apply or revert, drift, a dirty
state, warnings), each pending migration's SQL folded in a ``<details>`` element. The
Mermaid dependency graph is included when there is more than one service.

It stays readable and postable at any size: each file's SQL is cut at
``max_sql_chars_per_file``, and the whole comment is kept under ``max_chars`` (GitHub
refuses comments over 65,536 characters) by leaving out SQL first, then the graph, then
table rows, then whole sections from the end; whatever was left out is said at the top. Every name from the plan file or a
file name is shown in a code span or escaped, so it cannot break the markup or mention
anyone. This module does no I/O: the caller passes ``sql_for`` to read migration files.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..estate.graph import EstateGraph, Node
from ..live.failure import Failure
from ..migrations.sqlscript import parse_script
from ..planning.plan import (
    AlterDatabaseOwner,
    AlterRole,
    ApplyMigration,
    ApplyRepeatable,
    CreateDatabase,
    CreateRole,
    MigrationAction,
    Plan,
    RevertMigration,
    ServicePlan,
    Warning,
)
from . import graph as render_graph
from . import risk
from .markdown_alerts import blockers_alert, warning_alerts
from .markup import alert as _alert
from .markup import code, code_block, html_code, md_text
from .markup import table as _table
from .text import (
    MAX_UNMANAGED_NAMES,
    change_phrases,
    difference_phrases,
    dirty_version,
    plural,
    service_blockers,
    version_label,
    version_ranges,
    versions_phrase,
)

MAX_COMMENT_CHARS = 60_000  # GitHub refuses comments over 65,536 characters
MAX_SQL_CHARS_PER_FILE = 8_000
FOLD_ROWS = 10  # a longer table folds into <details>, so the alerts and the next service stay in sight
COMMENT_MARKER = "<!-- dbplan plan -->"  # lets a CI job find and update its earlier comment

SqlReader = Callable[[str], "str | None"]
"""Returns the text of a migration file, given its path relative to the plan file's folder."""

_RUN_MODES = {
    "transaction": "yes",
    "own-transaction-folded": "yes (its own BEGIN/COMMIT folded into dbplan's)",
    "no-transaction": "**no**",
    "own-transactions": "**no**: its own transaction blocks",
}
_NOTICE_RESERVE = 800  # room kept for the "shortened" notice at the top
_NOTE_RESERVE = 100  # room kept per service for "SQL of N more migrations not shown"


@dataclass(frozen=True)
class Limits:
    """How much of the plan is listed; relaxed to stricter levels until the comment fits."""

    graph: bool
    rows: int | None  # rows of a service's table and items of a server's list; None: all
    items: int | None  # rules, places, drift and blockers listed in the alerts; None: all
    services: int | None  # rows of the overview table, the one line every service gets

    def cuts(self, *, graph_shown: bool, services: int) -> list[str]:
        """What this level leaves out, in the words of the notice at the top."""
        said = [] if self.graph or not graph_shown else ["the dependency graph is left out"]
        if self.rows is not None:
            said.append(f"tables are cut to {self.rows} rows" + (f" and lists to {self.items} items" if self.items else ""))
        if self.services is not None and services > self.services:
            said.append(f"the overview lists the first {self.services} services")
        return said


# Tables are cut first (the alerts above them are what a reviewer must see), then the
# graph, then the alerts' lists. Past the last level, service sections are left out from
# the end, whole.
LEVELS = (
    Limits(graph=True, rows=None, items=None, services=None),
    Limits(graph=True, rows=50, items=None, services=None),
    Limits(graph=False, rows=50, items=None, services=None),
    Limits(graph=False, rows=20, items=20, services=None),
    Limits(graph=False, rows=5, items=5, services=400),
)


def shorten_to_fit(
    build: Callable[[Limits], list[Block]], max_chars: int, levels: Sequence[Limits] = LEVELS
) -> tuple[list[Block], Limits]:
    """The document of the first level whose blocks (SQL left aside) fit in ``max_chars``,
    or of the last level. ``build`` makes the blocks for a level; a fleet's comment passes
    its own and reuses the levels and the notice (``Limits.cuts``)."""
    for limits in levels:
        blocks = build(limits)
        if _size(blocks) + _NOTICE_RESERVE <= max_chars:
            return blocks, limits
    return blocks, limits


@dataclass(frozen=True)
class _SqlSlot:
    """Where a migration's SQL goes once the size budget says whether it fits."""

    service: str
    action: MigrationAction


Block = str | _SqlSlot


def render_plan(
    plan: Plan,
    *,
    sql_for: SqlReader | None = None,
    graph: EstateGraph | None = None,
    max_chars: int = MAX_COMMENT_CHARS,
    max_sql_chars_per_file: int = MAX_SQL_CHARS_PER_FILE,
) -> str:
    """The plan as a Markdown pull-request comment of at most ``max_chars`` characters.

    The title and the summary line are always kept, even past a limit below ~1,000 characters.

    ``sql_for(file)`` returns the text of a migration file (``None``: unreadable); without
    it no SQL is shown. ``graph`` adds the Mermaid graph when there is more than one service.
    """
    blocks, limits = shorten_to_fit(lambda level: _document(plan, graph, level, sql_for=sql_for), max_chars)
    cuts = limits.cuts(graph_shown=graph is not None and len(plan.services) > 1, services=len(plan.services))
    if _size(blocks) + _NOTICE_RESERVE > max_chars:
        blocks, dropped = _cut_sections(blocks, max_chars - _NOTICE_RESERVE)
        cuts.append(f"{plural(dropped, 'section')} at the end left out")

    sql_blocks = _fill_sql(blocks, sql_for, max_chars, max_sql_chars_per_file) if sql_for is not None else {}
    text = _assemble(blocks, sql_blocks, cuts, max_chars, max_sql_chars_per_file)
    while len(text) > max_chars and len(blocks) > 2:  # reserves too small: give back SQL, then sections
        if sql_blocks:
            sql_blocks.pop(max(sql_blocks))
        else:
            blocks = blocks[:-1]
            if not any(cut.endswith("at the end left out") for cut in cuts):
                cuts.append("sections at the end left out")
        text = _assemble(blocks, sql_blocks, cuts, max_chars, max_sql_chars_per_file)
    return text


# ---------------------------------------------------------------------------
# Markdown building blocks


def _more(shown: int, total: int, one: str, many: str) -> list[str]:
    """``… and 3 more warnings not listed``: ``one`` and ``many`` are the noun's two forms."""
    if shown >= total:
        return []
    left = total - shown
    return [f"*… and {left} more {one if left == 1 else many} not listed, to keep this comment short.*\n"]


def _more_lines(shown: int, total: int, one: str, many: str) -> list[str]:
    """``_more`` as lines of an alert, after a blank line so that it does not join the list."""
    return ["", *(line.rstrip("\n") for line in _more(shown, total, one, many))] if shown < total else []


def _size(blocks: Sequence[Block]) -> int:
    """Characters the blocks take without SQL: a run of SQL slots may become one short note."""
    return sum(_block_size(blocks, index) for index in range(len(blocks)))


def _block_size(blocks: Sequence[Block], index: int) -> int:
    block = blocks[index]
    if isinstance(block, str):
        return len(block) + 1
    starts_run = index == 0 or not isinstance(blocks[index - 1], _SqlSlot)
    return _NOTE_RESERVE if starts_run else 0


# ---------------------------------------------------------------------------
# The document


def _document(plan: Plan, graph: EstateGraph | None, limits: Limits, *, sql_for: SqlReader | None) -> list[Block]:
    """Risk first: the summary, blockers, warnings by alert level; then the tables."""
    title = f"## dbplan plan: {plan.environment}" if plan.environment else "## dbplan plan"
    blocks: list[Block] = [f"{COMMENT_MARKER}\n{title}\n", _summary(plan)]
    if plan.blockers:
        blocks.append(blockers_alert(plan.blockers, limits.items))
        blocks += _dirty_alerts(plan, sql_for)
    blocks += warning_alerts(plan, limits.items)
    if plan.services:
        blocks += _overview(plan, limits)
    if limits.graph and graph is not None and len(plan.services) > 1:
        blocks.append(_graph(plan, graph))
    blocks += _servers(plan, limits)
    blocks += _notices(plan)
    for service in plan.services:
        blocks += _service(plan, service, limits, sql_for=sql_for)
    blocks += _unmanaged(plan, limits)
    return blocks


def _notices(plan: Plan) -> list[Block]:
    """What the plan says once and that is not wrong (so not a warning): not folded away
    with the unmanaged names, since a reviewer should read it."""
    if not plan.notices:
        return []
    return ["**Notes**\n\n" + "\n".join(f"- {md_text(notice)}" for notice in plan.notices) + "\n"]


def _unmanaged(plan: Plan, limits: Limits) -> list[Block]:
    """Roles and databases the plan file does not mention, folded: a shared server may
    hold hundreds, and they are never dropped, so they are context, not changes."""
    if not plan.unmanaged:
        return []
    items = []
    for entry in plan.unmanaged:
        for noun, names in (("role", entry.roles), ("database", entry.databases)):
            if names:
                shown = names[: min(limits.items or MAX_UNMANAGED_NAMES, MAX_UNMANAGED_NAMES)]
                more = f", … and {len(names) - len(shown)} more" if len(shown) < len(names) else ""
                listed = ", ".join(code(name) for name in shown)
                items.append(f"- server {code(entry.server)}: {plural(len(names), noun)}: {listed}{more}")
    return [
        "<details>\n<summary>Not managed by this plan file (listed, never dropped)</summary>\n\n"
        + "\n".join(items)
        + "\n\n</details>\n"
    ]


def _summary(plan: Plan) -> str:
    """What the plan does, then what it puts at risk, named from the warnings' rules."""
    parts = change_phrases(plan)
    lint = [w for w in plan.warnings if w.rule != "drift"]
    phrases = risk.risk_phrases(lint)
    drift = sum(len(service.drift) for service in plan.services)
    phrases += [plural(drift, "drifted migration")] if drift else []
    concern = f" **Risk:** {'; '.join(phrases)}." if phrases else ""
    concern += f" ({plural(len(lint), 'warning')}, listed first.)" if lint else ""
    if plan.blocked:
        planned = f" Otherwise planned: {', '.join(parts)}." if plan.changes else ""
        return f"⛔ **Blocked:** {plural(len(plan.blockers), 'problem')} must be fixed before apply.{planned}{concern}\n"
    differences = difference_phrases(plan)
    if not plan.changes and differences:
        return f"⚠️ **No changes to apply**, but the databases differ from the plan file: {', '.join(differences)}.{concern}\n"
    if not plan.changes:
        return f"✅ **No changes.** The databases match the plan file.{concern}\n"
    return f"**Plan:** {', '.join(parts)}.{concern}\n"


def _version_change(service: ServicePlan) -> str:
    if service.target is None or service.target == service.current:
        return version_label(service.current)
    return f"{version_label(service.current)} → {version_label(service.target)}"


def _service_notes(plan: Plan, service: ServicePlan) -> str:
    notes = []
    if service.dirty:
        notes.append(f"⛔ dirty at {version_label(dirty_version(plan, service))}")
    elif service_blockers(plan, service.service):
        notes.append("⛔ blocked")
    if service.drift:
        notes.append(f"⚠️ {plural(len(service.drift), 'migration')} drifted")
    lint = [w for w in plan.warnings if w.service == service.service and w.rule != "drift"]
    if lint:
        notes.append(f"⚠️ {plural(len(lint), 'warning')}")
    if not notes and not plan.actions_of(service.service):
        notes.append("up to date")
    return ", ".join(notes)


def _overview(plan: Plan, limits: Limits) -> list[str]:
    services = plan.services[: limits.services]
    several_servers = len({service.server for service in plan.services}) > 1
    header = ["Service", "Database"] + (["Server"] if several_servers else []) + ["Version", "Apply", "Revert", "Notes"]
    align = ["---", "---"] + (["---"] if several_servers else []) + ["---", "---:", "---:", "---"]
    rows = []
    for service in services:
        actions = plan.actions_of(service.service)
        applies = sum(not isinstance(action, RevertMigration) for action in actions)  # a repeatable runs too
        rows.append(
            [code(service.service, in_table=True), code(service.database, in_table=True)]
            + ([code(service.server, in_table=True)] if several_servers else [])
            + [_version_change(service), str(applies), str(len(actions) - applies), _service_notes(plan, service)]
        )
    table = [_table(header, align, rows)] if rows else []
    blocks = table + _more(len(services), len(plan.services), "service", "services")
    if len(plan.services) > FOLD_ROWS:
        return [fold(f"Overview of {plural(len(plan.services), 'service')}", "\n".join(blocks))]
    return blocks


def _graph(plan: Plan, graph: EstateGraph) -> str:
    notes: dict[Node, str] = {}
    for action in plan.actions:
        if isinstance(action, CreateRole):
            notes[("role", action.role)] = "new"
        elif isinstance(action, CreateDatabase):
            notes[("database", action.database)] = "new"
    for service in plan.services:
        actions = plan.actions_of(service.service)
        applies = sum(not isinstance(action, RevertMigration) for action in actions)  # a repeatable runs too
        parts = [f"+{applies}"] if applies else []
        parts += [f"-{len(actions) - applies}"] if len(actions) > applies else []
        parts += ["blocked"] if service_blockers(plan, service.service) else []
        if parts:
            notes[("service", service.service)] = " ".join(parts)
    diagram = render_graph.render_mermaid(graph, notes=notes)
    return (
        "<details>\n<summary>Dependency graph</summary>\n\n"
        f"{render_graph.ARROWS_NOTE}\n\n```mermaid\n{diagram}```\n\n</details>\n"
    )


def _handed_over(action: AlterDatabaseOwner) -> str:
    tables = ", ".join(code(table) for table in action.bookkeeping_tables)
    return f", with {tables}" if tables else ""


def _servers(plan: Plan, limits: Limits) -> list[str]:
    creations = [a for a in plan.actions if isinstance(a, (CreateRole, AlterRole, CreateDatabase, AlterDatabaseOwner))]
    blocks: list[str] = []
    for server in dict.fromkeys(action.server for action in creations):
        mine = [action for action in creations if action.server == server]
        shown = mine[: limits.rows]
        items = []
        for action in shown:
            if isinstance(action, CreateRole):
                detail = ("login" if action.login else "no login") + (", with password" if action.with_password else "")
                items.append(f"- **create role** {code(action.role)} ({detail})")
            elif isinstance(action, AlterRole):
                items.append(f"- **alter role** {code(action.role)}: {md_text(', '.join(action.changes()))}")
            elif isinstance(action, AlterDatabaseOwner):
                items.append(
                    f"- **change owner** of database {code(action.database)}: {code(action.previous_owner)} → "
                    f"{code(action.owner)}{_handed_over(action)}"
                )
            else:
                owner = f", owned by {code(action.owner)}" if action.owner else ""
                items.append(f"- **create database** {code(action.database)}{owner}")
        blocks.append(f"### Server {code(server)}\n")
        if items:
            blocks.append("\n".join(items) + "\n")
        blocks += _more(len(shown), len(mine), "role or database", "roles and databases")
    return blocks


def _service(plan: Plan, service: ServicePlan, limits: Limits, *, sql_for: SqlReader | None) -> list[Block]:
    actions = plan.actions_of(service.service)
    blockers = service_blockers(plan, service.service)
    warnings = [w for w in plan.warnings if w.service == service.service and w.rule != "drift"]
    if not (actions or blockers or warnings or service.drift or service.dirty or service.invalid_indexes):
        return []  # the overview table already says it is up to date
    folder = _common_folder(action.file for action in actions)
    facts = [f"Database {code(service.database)} on server {code(service.server)}", f"version {_version_change(service)}"]
    if service.latest is not None and service.target is not None and service.target < service.latest:
        facts.append(f"target {service.target} (the newest file is {service.latest})")
    if folder:
        facts.append(f"files in {code(folder)}")
    blocks: list[Block] = [f"### Service {code(service.service)}\n", " · ".join(facts) + "\n"]

    if service.dirty or blockers:
        blocks.append(_held_back(plan, service, actions))
    if service.invalid_indexes and not service.dirty:
        names = ", ".join(code(name) for name in service.invalid_indexes)
        blocks.append(_alert("WARNING", [f"**Invalid indexes** (left by a failed concurrent index build): {names}"]))
    if service.out_of_order and not blockers:
        blocks.append(f"Applied out of their version order (allowed): {version_ranges(service.out_of_order)}.\n")
    if actions:
        blocks += _migration_table(actions, folder, limits)
    if sql_for is not None:
        blocks += [_SqlSlot(service.service, action) for action in _warned_first(actions, warnings)]
    return blocks


def _warned_first(actions: Sequence[MigrationAction], warnings: Sequence[Warning]) -> list[MigrationAction]:
    """The SQL a reviewer must read first: files with warnings, then the rest, each in plan order."""
    warned = {warning.file for warning in warnings if risk.kind_of(warning) != risk.NOTE}
    return sorted(actions, key=lambda action: action.file not in warned)


def _common_folder(files: Iterable[str]) -> str | None:
    folders = {posixpath.dirname(file) for file in files}
    return folders.pop() if len(folders) == 1 else None


def _migration_table(actions: Sequence[MigrationAction], folder: str | None, limits: Limits) -> list[str]:
    shown = actions[: limits.rows]
    rows = [
        [
            _verb(action),
            "repeatable" if isinstance(action, ApplyRepeatable) else str(action.version),
            code(posixpath.basename(action.file) if folder else action.file, in_table=True),
            _RUN_MODES.get(action.run_mode, md_text(action.run_mode)),
        ]
        for action in shown
    ]
    blocks = [_table(["Action", "Version", "File", "In a transaction"], ["---", "---:", "---", "---"], rows)] if rows else []
    if len(shown) < len(actions):
        rest = [action.version for action in actions[len(shown) :] if not isinstance(action, ApplyRepeatable)]
        more = "more " if shown else ""
        left = plural(len(actions) - len(shown), f"{more}migration")
        blocks.append(f"*{left} ({versions_phrase(rest)}) not listed, to keep this comment short.*\n")
    if len(actions) > FOLD_ROWS:
        return [fold(f"{plural(len(actions), 'migration')}: {versions_phrase([a.version for a in actions if not isinstance(a, ApplyRepeatable)])}", "\n".join(blocks))]
    return blocks


def _verb(action: MigrationAction) -> str:
    if isinstance(action, ApplyRepeatable):
        return "run again" if action.previous_checksum else "run"
    return "apply" if isinstance(action, ApplyMigration) else "**revert**"


def fold(summary: str, body: str) -> str:
    """A ``<details>`` element: ``summary`` is HTML, ``body`` Markdown (blank lines around it)."""
    return f"<details>\n<summary>{summary}</summary>\n\n{body.rstrip()}\n\n</details>\n"


def _held_back(plan: Plan, service: ServicePlan, actions: Sequence[MigrationAction]) -> str:
    text = "**Blocked:** see the problems at the top."
    if service.dirty:
        text = (
            f"**Dirty at version {version_label(dirty_version(plan, service))}:** a migration that ran outside a "
            "transaction failed part-way. See the problems at the top."
        )
    waiting = service.pending or service.reverts
    if waiting and not actions:
        text += f" {plural(len(waiting), 'migration')} ({versions_phrase(waiting)}) will be planned once this is fixed."
    return _alert("CAUTION", [text])


def _dirty_title(service: ServicePlan) -> str:
    return f"**Service {code(service.service)} is dirty at version {version_label(service.dirty_version)}**"


def _dirty_alerts(plan: Plan, sql_for: SqlReader | None) -> list[str]:
    """Per dirty service whose failure the history recorded: where, why, and what had run,
    at the top beside the blockers, since the service can go nowhere until it is fixed."""
    return [
        _alert("CAUTION", [_dirty_title(service), "", *_failure_lines(service.failure, sql_for)])
        for service in plan.services
        if service.dirty and service.failure is not None
    ]


_RAN_SHOWN = 2_000  # characters of the statements that had run, quoted under a dirty service


def _failure_lines(failure: Failure, sql_for: SqlReader | None) -> list[str]:
    """Where it failed, with PostgreSQL's words, and the statements that had run (they stay done)."""
    where = code(f"{failure.file}:{failure.line}" if failure.line else failure.file)
    state = f" with SQLSTATE {code(failure.sqlstate)}" if failure.sqlstate else ""
    lines = [f"Failed at {where}{state}:", "", *code_block(failure.message, "text"), ""]
    lines.append(f"{failure.done} of its {plural(failure.total, 'statement')} had run before it, and stay done.")
    text = sql_for(failure.file) if sql_for is not None else None
    script = parse_script(text) if text is not None else None
    if script is None or not script.parsed or len(script.statements) != failure.total:
        return lines  # the file changed since: its statements no longer say what ran
    ran = ";\n".join(statement.sql for statement in script.statements[: failure.done])
    if ran:
        shown = ran if len(ran) <= _RAN_SHOWN else ran[:_RAN_SHOWN] + "\n-- … cut, to keep this comment short"
        lines += ["", "What had run:", "", *code_block(shown + ";", "sql")]
    failed = script.statements[failure.done].sql if failure.done < failure.total else None
    if failed is not None:
        lines += ["", "The statement that failed:", "", *code_block(failed[:_RAN_SHOWN] + ";", "sql")]
    return lines


# ---------------------------------------------------------------------------
# Fitting the comment into its size


def _cut_sections(blocks: list[Block], budget: int) -> tuple[list[Block], int]:
    """Keep blocks from the top while they fit, cutting only between sections (``###``)."""
    size = 0
    section_start = len(blocks)
    for index, block in enumerate(blocks):
        if isinstance(block, str) and block.startswith("### "):
            section_start = index
        size += _block_size(blocks, index)
        if size > budget:
            cut_at = min(section_start, index)
            dropped = sum(1 for rest in blocks[cut_at:] if isinstance(rest, str) and rest.startswith("### "))
            return list(blocks[:cut_at]), max(dropped, 1)
    return list(blocks), 0


def _fill_sql(blocks: Sequence[Block], sql_for: SqlReader, max_chars: int, per_file: int) -> dict[int, _Sql]:
    """The SQL details to show, by block index, in document order while the budget lasts."""
    slots = [(index, block) for index, block in enumerate(blocks) if isinstance(block, _SqlSlot)]
    budget = max_chars - _size(blocks) - _NOTICE_RESERVE
    shown: dict[int, _Sql] = {}
    for index, slot in slots:
        details = _sql_details(slot.action, sql_for(slot.action.file), per_file)
        if len(details.markdown) + 1 > budget:
            break  # in order, not smallest-first: a reader sees the first migrations of the plan
        shown[index] = details
        budget -= len(details.markdown) + 1
    return shown


@dataclass(frozen=True)
class _Sql:
    markdown: str
    cut: bool  # longer than the per-file limit


def _sql_details(action: MigrationAction, sql: str | None, per_file: int) -> _Sql:
    verb = "apply" if isinstance(action, ApplyMigration) else "revert"
    if isinstance(action, ApplyRepeatable):
        verb = "run repeatable"
    else:
        verb += f" {action.version}"
    name = html_code(posixpath.basename(action.file))
    if sql is None:
        return _Sql(f"*{verb}: the SQL of {code(action.file)} could not be read.*\n", cut=False)
    sql = sql.replace("\r\n", "\n").rstrip("\n")
    total_lines = sql.count("\n") + 1
    shown = sql
    if len(sql) > per_file:
        cut_at = sql.rfind("\n", 0, per_file)
        shown = sql[: cut_at if cut_at > 0 else per_file]
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", shown)), default=0) + 1)
    summary = f"{verb} {name} · {plural(total_lines, 'line')}"
    parts = [f"<details>\n<summary>{summary}</summary>\n\n{fence}sql\n{shown}\n{fence}\n"]
    cut = shown != sql
    if cut:
        lines_shown = shown.count("\n") + 1
        parts.append(
            f"\n*Cut: showing lines 1–{lines_shown} of {total_lines} ({len(shown):,} of {len(sql):,} characters); "
            f"read the whole file, {code(action.file)}, in the pull request.*\n"
        )
    parts.append("\n</details>\n")
    return _Sql("".join(parts), cut)


def _assemble(
    blocks: Sequence[Block], sql_blocks: dict[int, _Sql], cuts: list[str], max_chars: int, per_file: int
) -> str:
    out: list[str] = []
    omitted: dict[str, int] = {}
    for index, block in enumerate(blocks):
        if isinstance(block, str):
            out.append(block)
        elif index in sql_blocks:
            out.append(sql_blocks[index].markdown)
        else:
            omitted[block.service] = omitted.get(block.service, 0) + 1
            if index + 1 == len(blocks) or not isinstance(blocks[index + 1], _SqlSlot):
                count = omitted.pop(block.service)
                out.append(f"*SQL of {plural(count, 'more migration')} not shown, to keep this comment short.*\n")
    slots = sum(isinstance(block, _SqlSlot) for block in blocks)
    cut_files = sum(details.cut for details in sql_blocks.values())
    said = list(cuts)
    if cut_files:
        said.append(f"the SQL of {plural(cut_files, 'file')} is cut at {per_file:,} characters")
    if len(sql_blocks) < slots:
        said.append(f"the SQL of {slots - len(sql_blocks)} of {plural(slots, 'migration')} is not shown")
    if said:
        notice = f"Shortened to stay under {max_chars:,} characters: {'; '.join(said)}. The files are in this pull request."
        out.insert(2, _alert("NOTE", [notice]))
    return "\n".join(out)

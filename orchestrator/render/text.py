"""The plan, status and apply result for people at a terminal, in the style of ``terraform plan``.

``+`` creates or applies, ``-`` reverts, ``~`` drift, ``!`` blocked. Colour is the
caller's decision (a terminal, and no ``NO_COLOR``); this module only obeys it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..planning.plan import (
    AlterDatabaseOwner,
    AlterRole,
    ApplyMigration,
    ApplyRepeatable,
    Blocker,
    CreateDatabase,
    CreateRole,
    MigrationAction,
    Plan,
    ServicePlan,
)

_CODES = {"green": "32", "red": "31", "yellow": "33", "bold": "1", "dim": "2", "cyan": "36"}

if TYPE_CHECKING:
    from ..execution.progress import Result
    from ..live.history import ServiceHistory
    from ..planning.offline_lint import LintReport
    from ..verification.roundtrip import MigrationCheck, RoundTripReport


class Style:
    def __init__(self, color: bool) -> None:
        self.color = color

    def __call__(self, text: str, *styles: str) -> str:
        if not self.color or not styles:
            return text
        codes = ";".join(_CODES[style] for style in styles)
        return f"\033[{codes}m{text}\033[0m"


MAX_TITLE_WIDTH = 40  # a longer title does not push every file name of its service to the right


def version_label(version: int | None) -> str:
    return "none" if version is None else str(version)


def plural(count: int, noun: str) -> str:
    """``1 migration``, ``2 migrations``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def change_phrases(plan: Plan) -> list[str]:
    """``2 databases to create``, ``5 migrations to apply``, ...: the plan's summary in words."""
    counts = plan.summary()
    parts = []
    if counts["create_roles"]:
        parts.append(f"{plural(counts['create_roles'], 'role')} to create")
    if counts["alter_roles"]:
        parts.append(f"{plural(counts['alter_roles'], 'role')} to alter")
    if counts["create_databases"]:
        parts.append(f"{plural(counts['create_databases'], 'database')} to create")
    if counts["change_owners"]:
        parts.append(f"{plural(counts['change_owners'], 'database owner')} to change")
    if counts["apply"] or not (counts["revert"] or counts.get("repeat")):
        parts.append(f"{plural(counts['apply'], 'migration')} to apply")
    if counts["revert"]:
        parts.append(f"{plural(counts['revert'], 'migration')} to revert")
    if counts.get("repeat"):
        parts.append(f"{plural(counts['repeat'], 'repeatable migration')} to run")
    return parts


def version_ranges(versions: Iterable[int]) -> str:
    """Versions as short ranges: ``1-3, 5, 7-9``."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive versions
    for version in sorted(set(versions)):
        if runs and version == runs[-1][1] + 1:
            runs[-1][1] = version
        else:
            runs.append([version, version])
    return ", ".join(str(first) if first == last else f"{first}-{last}" for first, last in runs)


def versions_phrase(versions: Iterable[int]) -> str:
    """``version 4``, ``versions 1-3, 5``."""
    listed = sorted(set(versions))
    return f"{'version' if len(listed) == 1 else 'versions'} {version_ranges(listed)}"


def service_blockers(plan: Plan, service: str) -> tuple[Blocker, ...]:
    return tuple(blocker for blocker in plan.blockers if blocker.service == service)


def dirty_version(plan: Plan, service: ServicePlan) -> int | None:
    """The version a dirty service failed at (``current`` is the last one that finished)."""
    return service.dirty_version if service.dirty else None


def render_plan(plan: Plan, *, color: bool = False) -> str:
    from .fleet import split_fleets, text_section

    style = Style(color)
    # A service over a set gets one summary, not a section per database (issue #12).
    rest, fleets = split_fleets(plan)
    lines: list[str] = environment_line(plan, style)
    lines += _server_section(rest, style)
    for service in rest.services:
        lines += _service_section(rest, service, style)
    for fleet in fleets:
        lines += text_section(fleet, style)
    lines += _unmanaged(plan, style)
    lines += _notices(plan, style)
    lines += _warnings(rest, style)
    lines += _blockers(rest, style)
    lines.append(summary_line(plan, style))
    return "\n".join(lines) + "\n"


def render_one_pass(plan: Plan, *, color: bool = False) -> str:
    """What ``apply --one-pass`` says before it starts: the saved plan's counts (it was
    reviewed as a whole when it was saved) and how each database is checked."""
    style = Style(color)
    databases = {action.database for action in plan.actions if isinstance(action, MigrationAction)}
    lines = environment_line(plan, style)
    lines.append(summary_line(plan, style))
    lines.append(
        style(
            f"One pass: each of the {plural(len(databases), 'database')} is checked against the saved plan "
            "in the session that migrates it; one that changed since is refused on its own.",
            "dim",
        )
    )
    return "\n".join(lines) + "\n"


MAX_UNMANAGED_NAMES = 10  # a shared server may hold hundreds: the JSON lists them all


def _unmanaged(plan: Plan, style: Style) -> list[str]:
    """What the plan file does not mention: named (up to a few), never dropped."""
    if not plan.unmanaged:
        return []
    lines = [style("Unmanaged (not in the plan file; listed, never dropped):", "bold")]
    for entry in plan.unmanaged:
        for noun, names in (("role", entry.roles), ("database", entry.databases)):
            if names:
                lines.append(style(f"  server {entry.server}: {plural(len(names), noun)}: {folded_names(names)}", "dim"))
    return lines + [""]


def folded_names(names: tuple[str, ...], limit: int = MAX_UNMANAGED_NAMES) -> str:
    """``a, b, c`` or ``a, b, ... and 12 more (--format json lists all)``."""
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", ... and {len(names) - limit} more (--format json lists all)"


def _notices(plan: Plan, style: Style) -> list[str]:
    return [style(f"note: {notice}", "dim") for notice in plan.notices] + ([""] if plan.notices else [])


def summary_line(plan: Plan, style: Style | None = None) -> str:
    style = style or Style(False)
    differences = difference_phrases(plan)
    noted = f" {', '.join(differences).capitalize()}." if differences else ""
    if plan.blocked:
        return style(f"Plan blocked: {plural(len(plan.blockers), 'problem')} must be fixed before apply.{noted}", "red", "bold")
    if not plan.changes and differences:
        return style(f"No changes to apply, but the databases differ from the plan file: {', '.join(differences)}.", "yellow", "bold")
    if not plan.changes:
        return style("No changes. The databases match the plan file.", "green", "bold")
    return style("Plan: " + ", ".join(change_phrases(plan)) + "." + noted, "bold")


def difference_phrases(plan: Plan) -> list[str]:
    """What differs from the plan file without being an action: ``1 migration drifted``
    (changed after it was applied), ``1 applied version has no file``. A plan with any of
    these must not say that the databases match."""
    drift = sum(len(service.drift) for service in plan.services)
    missing = sum(1 for warning in plan.warnings if warning.rule == "missing-file")
    phrases = [f"{plural(drift, 'migration')} drifted"] if drift else []
    if missing:
        phrases.append(f"{plural(missing, 'applied version')} {'has' if missing == 1 else 'have'} no file")
    return phrases


def _server_section(plan: Plan, style: Style) -> list[str]:
    creations = [a for a in plan.actions if isinstance(a, (CreateRole, AlterRole, CreateDatabase, AlterDatabaseOwner))]
    lines: list[str] = []
    for server in dict.fromkeys(a.server for a in creations):
        lines.append(style(f"server {server}", "bold"))
        for action in creations:
            if action.server != server:
                continue
            if isinstance(action, CreateRole):
                detail = ", ".join(
                    part for part in ("login" if action.login else "nologin", "password" if action.with_password else "") if part
                )
                lines.append(style(f"  + create role {action.role} ({detail})", "green"))
            elif isinstance(action, AlterRole):
                lines.append(style(f"  ~ alter role {action.role}: {', '.join(action.changes())}", "yellow"))
            elif isinstance(action, AlterDatabaseOwner):
                tables = f", with {', '.join(action.bookkeeping_tables)}" if action.bookkeeping_tables else ""
                lines.append(
                    style(f"  ~ change owner of database {action.database}: {action.previous_owner} -> {action.owner}", "yellow")
                    + style(tables, "dim")
                )
            else:
                owner = f" (owner {action.owner})" if action.owner else ""
                lines.append(style(f"  + create database {action.database}{owner}", "green"))
        lines.append("")
    return lines


def _service_section(plan: Plan, service: ServicePlan, style: Style) -> list[str]:
    actions = plan.actions_of(service.service)
    state = f"at {version_label(service.current)}"
    if service.target is not None and service.target != service.current:
        state += f" -> {version_label(service.target)}"
    if service.dirty:
        state += ", DIRTY"
    header = style(f"service {service.service}", "bold") + style(
        f"  (database {service.database} on {service.server}, {state})", "dim"
    )
    lines = [header]
    if service.bookkeeping:
        lines.append(style(f"  bookkeeping in {service.bookkeeping}", "dim"))
    versioned = [a for a in actions if not isinstance(a, ApplyRepeatable)]
    width = max((len(str(v)) for v in [*(a.version for a in versioned), *(d.version for d in service.drift)]), default=1)
    title_width = min(max((len(a.title) for a in versioned), default=0), MAX_TITLE_WIDTH)
    for action in actions:
        if isinstance(action, ApplyRepeatable):
            lines.append(_repeatable_line(action, style))
            continue
        mode = "" if action.run_mode == "transaction" else f"  [{action.run_mode}]"
        sign, color = ("+", "green") if isinstance(action, ApplyMigration) else ("-", "red")
        lines.append(
            style(f"  {sign} {action.version:>{width}} {action.title:<{title_width}}", color)
            + style(f"  {action.file}{mode}", "dim")
        )
    for drift in service.drift:
        lines.append(
            style(f"  ~ {drift.version:>{width}} changed after it was applied", "yellow") + style(f"  {drift.file}", "dim")
        )
    if service.dirty:
        lines.append(style(f"  ! dirty at version {version_label(dirty_version(plan, service))}", "red"))
    waiting = service.pending or service.reverts  # what the planner held back for a blocked service
    held_back = bool(waiting) and not actions and bool(service_blockers(plan, service.service))
    if held_back:
        lines.append(
            style(
                f"  ! blocked: {plural(len(waiting), 'migration')} not planned ({versions_phrase(waiting)}) "
                "until the problems below are fixed",
                "red",
            )
        )
    if not actions and not service.drift and not service.dirty and not held_back:
        lines.append(style("  up to date", "dim"))
    lines.append("")
    return lines


def _repeatable_line(action: ApplyRepeatable, style: Style) -> str:
    """``~ R__views.sql changed: will run again``, or ``+ R__views.sql new: will run``."""
    name = action.file.rsplit("/", 1)[-1]
    if action.previous_checksum is None:
        return style(f"  + {name} new repeatable: will run", "green") + style(f"  {action.file}", "dim")
    return style(f"  ~ {name} changed: will run again", "yellow") + style(f"  {action.file}", "dim")


def _warnings(plan: Plan, style: Style) -> list[str]:
    if not plan.warnings:
        return []
    lines = [style("Warnings:", "yellow", "bold")]
    for warning in plan.warnings:
        place = warning.file or ""
        if warning.line:
            place += f":{warning.line}"
        rule = f" [{warning.rule}]" if warning.rule else ""
        where = f"{place}: " if place else (f"{warning.service}: " if warning.service else "")
        lines.append(style(f"  ~ {where}{warning.message}{rule}", "yellow"))
        if warning.statement:
            lines.append(style(f"      {warning.statement}", "dim"))
    lines.append("")
    return lines


def _blockers(plan: Plan, style: Style) -> list[str]:
    if not plan.blockers:
        return []
    lines = [style("Blocked:", "red", "bold")]
    for blocker in plan.blockers:
        lines.append(style(f"  ! {blocker.message}", "red"))
        if blocker.hint:
            lines.append(f"    hint: {blocker.hint}")
    lines.append("")
    return lines


def environment_line(plan: Plan, style: Style) -> list[str]:
    """The first line of every output made for an environment of the plan file."""
    return [style(f"Environment: {plan.environment}", "bold"), ""] if plan.environment else []


STATUS_HEADER = ("SERVICE", "DATABASE", "CURRENT", "LATEST", "PENDING", "DIRTY", "DRIFT", "BOOKKEEPING")


def render_status(plan: Plan, *, color: bool = False) -> str:
    style = Style(color)
    rows = [STATUS_HEADER, *_status_rows(plan)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(STATUS_HEADER))]
    lines = []
    for index, row in enumerate(rows):
        text = "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
        if index == 0:
            text = style(text, "bold")
        elif row[5] == "yes":
            text = style(text, "red")
        elif row[6] != "-":
            text = style(text, "yellow")
        lines.append(text)
    lines = environment_line(plan, style) + lines
    if any(service.fleet is not None for service in plan.services):
        lines.append("(a set's databases in the same state share a row; --format json lists every database)")
    lines += [""] + [
        style(f"! {blocker.message}", "red") for blocker in plan.blockers
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def _status_row(service: ServicePlan) -> tuple[str, ...]:
    return (
        service.service,
        service.database,
        version_label(service.current),
        version_label(service.latest),
        str(len(service.pending)) + (f" +{len(service.repeatables)} R__" if service.repeatables else ""),
        "yes" if service.dirty else "no",
        ", ".join(str(d.version) for d in service.drift) or "-",
        service.bookkeeping or "-",
    )


def _status_rows(plan: Plan) -> list[tuple[str, ...]]:
    """A row per service; a set's databases in the same state share one row (the set is
    read at a glance, issue #12), where those that are dirty or drifted keep their own."""
    fleets: dict[str, list[ServicePlan]] = {}
    for service in plan.services:
        if service.fleet is not None:
            fleets.setdefault(service.fleet, []).append(service)
    rows: list[tuple[str, ...]] = []
    for service in plan.services:
        if service.fleet is None:
            rows.append(_status_row(service))
        elif fleets[service.fleet][0] is service:
            rows += _fleet_status_rows(service.fleet, fleets[service.fleet])
    return rows


def _fleet_status_rows(fleet: str, members: list[ServicePlan]) -> list[tuple[str, ...]]:
    from collections import Counter

    from .fleet import LISTED

    states: Counter[tuple[str, ...]] = Counter()
    outliers: list[tuple[str, ...]] = []
    for member in members:
        row = _status_row(member)
        if member.dirty or member.drift:
            outliers.append(row)
        else:
            states[row[2:]] += 1
    def how_many(count: int) -> str:
        if len(states) > 1 or outliers:
            return f"{count} of {len(members)} databases"
        return f"{count} database{'s' if count > 1 else ''}"

    rows = [(fleet, how_many(count), *state) for state, count in states.most_common()]
    rows += outliers[:LISTED]
    if len(outliers) > LISTED:
        rows.append((fleet, f"and {len(outliers) - LISTED} more dirty or drifted", "", "", "", "", "", ""))
    return rows


def render_result(result: Result, *, color: bool = False) -> str:
    style = Style(color)
    done, skipped = result.count("done"), result.count("skipped")
    if result.ok:
        text = f"Apply complete: {done} done" + (f", {skipped} skipped (already done by another run)" if skipped else "") + "."
        return style(text, "green", "bold") + "\n"
    from ..execution.progress import Interrupted

    if isinstance(result.error, Interrupted):
        return style(f"Apply stopped on request after {done} done.", "yellow", "bold") + "\n" + render_failures(result)
    failed = len(result.failures)
    if failed > 1 or result.not_run:
        head = f"Apply failed: {done} done, {failed} failed, {len(result.not_run)} not run."
    else:
        head = f"Apply stopped: {done} done, then a failure."
    return style(head, "red", "bold") + "\n" + render_failures(result)


NOT_RUN_NAMES_SHOWN = 20  # per reason; --format json lists every one


def render_failures(result: Result) -> str:
    """The end of a run that did not do everything: a table of what failed, where and
    why, then what did not run, grouped by why."""
    lines: list[str] = []
    if result.failures:
        rows: list[tuple[str, ...]] = [("SERVER", "DATABASE", "SERVICE", "WHERE", "WHY")]
        for failure in result.failures:
            error = failure.error
            why = printable(getattr(error, "pg_message", None) or error.message.splitlines()[0])
            sqlstate = getattr(error, "sqlstate", None)
            if sqlstate and f"SQLSTATE {sqlstate}" not in why:
                why += f" (SQLSTATE {sqlstate})"
            where = getattr(error, "location", None) or (f"version {error.version}" if error.version else "-")
            rows.append((failure.server, failure.database or "-", failure.service or "-", where, why))
        lines += ["", "Failed:"] + _table(rows)
    if result.not_run:
        by_reason: dict[str, list[str]] = {}
        for item in result.not_run:
            by_reason.setdefault(item.reason, []).append(item.service or item.database or f"roles on {item.server}")
        lines += ["", f"Not run ({len(result.not_run)}):"]
        for reason, names in by_reason.items():
            shown = ", ".join(dict.fromkeys(names[:NOT_RUN_NAMES_SHOWN]))
            more = f" and {len(names) - NOT_RUN_NAMES_SHOWN} more" if len(names) > NOT_RUN_NAMES_SHOWN else ""
            lines.append(f"  {len(names)} {reason}: {shown}{more}")
    return "\n".join(lines) + "\n" if lines else ""


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def render_history(histories: list[ServiceHistory], *, color: bool = False) -> str:
    """Per service, its history events oldest first, as a table."""
    from datetime import timezone

    style = Style(color)
    lines: list[str] = []
    for history in histories:
        where = f"history in {history.table}" if history.table else "no history table yet"
        lines.append(style(f"service {history.service}", "bold") + f"  (database {history.database} on {history.server}; {where})")
        if not history.events:
            lines += ["  nothing recorded yet", ""]
            continue
        if history.more:
            lines.append("  ... older events left out (--limit 0 shows every one)")
        # The checksum shows what an accept changed (and what a baseline counted as applied).
        header = ("ID", "VERSION", "EVENT", "TITLE", "WHEN (UTC)", "DURATION", "BY", "SHA256", "REASON")
        rows = [header] + [
            (
                str(event.id),
                str(event.version),
                event.event,
                printable(event.title or "-"),
                f"{event.applied_at.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S}",
                f"{event.duration_ms} ms" if event.duration_ms is not None else "-",
                printable(event.applied_by or "-"),
                event.checksum[:12] if event.checksum else "-",
                printable(event.reason or "-"),
            )
            for event in history.events
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for index, row in enumerate(rows):
            text = "  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            lines.append(style(text, "bold") if index == 0 else text)
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def printable(text: str) -> str:
    """Text from a database, fit for a terminal: control characters shown escaped, so that
    a stored value cannot move the cursor or rewrite what a reviewer reads."""
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


ROUND_TRIP_MARKS = {"ok": "✓", "failed": "✗", "no-down": "-", "not-run": "·"}


def round_trip_line(service: str, check: MigrationCheck) -> str:
    """One migration's round trip, as the progress line and the report both show it."""
    mark = ROUND_TRIP_MARKS[check.status]
    head = f"{mark} {service} {check.version} {printable(check.title)}"
    if check.status == "ok":
        return head + ": up, down and up again leave the schema as it should be"
    return head + ": " + "; ".join(printable(problem) for problem in check.problems)


def render_round_trips(report: RoundTripReport, *, color: bool = False) -> str:
    style = Style(color)
    colors = {"ok": "green", "failed": "red", "no-down": "yellow", "not-run": "yellow"}
    lines = []
    for service in report.services:
        passed = sum(1 for check in service.checks if check.status == "ok")
        lines.append(
            style(f"service {service.service}", "bold")
            + f"  (database {service.database}): {passed} of {plural(len(service.checks), 'migration')} round-trip cleanly"
        )
        # The progress lines named every migration; the report keeps what needs a look.
        for check in service.checks:
            if check.status != "ok":
                lines.append("  " + style(round_trip_line(service.service, check), colors[check.status]))
        lines.append("")
    total = sum(len(service.checks) for service in report.services)
    failed, missing = report.count("failed"), report.count("no-down")
    parts = [f"{plural(total, 'migration')} of {plural(len(report.services), 'service')} on PostgreSQL {report.server_version}"]
    parts.append(f"{failed} failed" if failed else "every down file restores the schema")
    if missing:
        parts.append(f"{plural(missing, 'migration')} without a down file" + (" (required)" if report.require_down else ""))
    lines.append(style("Test: " + ", ".join(parts) + f" ({report.duration_ms} ms).", "green" if report.ok else "red"))
    return "\n".join(lines) + "\n"


_LINT_STYLES = {"error": ("red", "bold"), "destructive": ("red",), "locking": ("yellow",), "notice": ("dim",)}


def render_lint(report: LintReport, fail_on: str, *, color: bool = False) -> str:
    """``file:line: rule (severity): message``, the statement under it, then a count."""
    from ..planning.offline_lint import LEVELS

    style = Style(color)
    lines: list[str] = []
    for finding in report.findings:
        place = f"{finding.file}:{finding.line}" if finding.line else finding.file
        head = f"{printable(place)}: {finding.rule} ({finding.severity}): {printable(finding.message)}"
        lines.append(style(head, *_LINT_STYLES[finding.severity]))
        if finding.statement:
            lines.append(style(f"    {printable(finding.statement)}", "dim"))
        if finding.hint:
            lines.append(f"    hint: {printable(finding.hint)}")
    counts = [f"{report.count(level)} {level}" for level in reversed(LEVELS) if report.count(level)]
    summary = f"{plural(len(report.files), 'file')} linted: " + (", ".join(counts) if counts else "no findings")
    if fail_on in LEVELS:
        failing = len(report.at_or_above(fail_on))
        summary += f"; {failing} at or above {fail_on}" if failing else f"; none at or above {fail_on}"
    if lines:
        lines.append("")
    lines.append(style(summary, "bold"))
    return "\n".join(lines) + "\n"

"""The alerts at the top of the PR comment: what a reviewer must see before any table.

Blockers first (``> [!CAUTION]``), then data loss (``CAUTION``), locks and rewrites and
other risks (``WARNING``), drift (``WARNING``), then missing downs and notes (``NOTE``).
Warnings of one rule are one item: ``**create-index-not-concurrently** × 12`` with its
places, the first message, and the statements in one fenced ``sql`` block.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..planning.plan import Blocker, Drift, Plan, Warning
from . import risk
from .markup import alert, code, code_block, rich_text
from .text import plural

PLACES_SHOWN = 5  # places named on a repeated rule's line; the rest are counted

_TITLES = {
    risk.DATA_LOSS: "Data loss",
    risk.REWRITE: "Locks and rewrites",
    risk.LOCK: "Locks and rewrites",
    risk.RISK: "Other warnings",
    risk.NOTE: "Notes",
}
# A command in a hint or message, as the planner writes them: 'dbplan force orders 2'.
_COMMAND = re.compile(r"'(dbplan [^']+)'")


def commands_in(text: str) -> list[str]:
    return _COMMAND.findall(text)


def with_commands_as_code(text: str) -> str:
    """The text with each quoted ``'dbplan ...'`` command as a code span."""
    return rich_text(_COMMAND.sub(lambda match: f"`{match.group(1)}`", text))


def shell_block(commands: Sequence[str]) -> list[str]:
    return code_block("\n".join(dict.fromkeys(commands)), "shell") if commands else []


def blockers_alert(blockers: Sequence[Blocker], items: int | None) -> str:
    shown = blockers[:items]
    lines = ["**Apply refuses this plan until these are fixed:**", ""]
    for blocker in shown:
        lines.append(f"- {with_commands_as_code(blocker.message)}")
        if blocker.hint:
            lines.append(f"  - *Fix:* {with_commands_as_code(blocker.hint)}")
    commands = [command for blocker in shown for command in commands_in(blocker.hint or "")]
    if commands:
        lines += ["", "Once the database is fixed by hand, one of:", "", *shell_block(commands)]
    lines += _left_out(len(shown), len(blockers), "problem", "problems")
    return alert("CAUTION", lines)


def warning_alerts(plan: Plan, items: int | None) -> list[str]:
    """One alert per level, most serious first; drift is its own ``WARNING``."""
    lint = [warning for warning in plan.warnings if warning.rule != "drift"]
    several = len(plan.services) > 1
    by_title: dict[str, list[risk.RuleGroup]] = {}
    for group in risk.group_by_rule(lint):
        by_title.setdefault(_TITLES[group.kind], []).append(group)
    alerts = []
    for title, groups in by_title.items():
        warnings = [warning for group in groups for warning in group.warnings]
        phrases = risk.risk_phrases(warnings)
        head = f"**{title}: {plural(len(warnings), 'warning')}**" + (f" ({'; '.join(phrases)})" if phrases else "")
        lines = [head]
        for group in groups[:items]:
            lines += ["", *_group_lines(group, items, several=several)]
        lines += _left_out(min(len(groups), items or len(groups)), len(groups), "rule", "rules")
        alerts.append(alert(risk.ALERT_OF_KIND[groups[0].kind], lines))
    drifted = [(service.service, item) for service in plan.services for item in service.drift]
    if drifted:
        alerts.append(_drift_alert(drifted, items, several=several))
    return alerts


def _place(warning: Warning, *, several: bool) -> str:
    where = code(f"{warning.file}:{warning.line}" if warning.line else warning.file) if warning.file else ""
    if where or not warning.service:
        return where  # the file's folder names the service already
    return f"service {code(warning.service)}" if several else ""


def _group_lines(group: risk.RuleGroup, items: int | None, *, several: bool) -> list[str]:
    first = group.warnings[0]
    count = len(group.warnings)
    places = [_place(warning, several=several) for warning in group.warnings]
    places = [place for place in dict.fromkeys(places) if place]
    named = ", ".join(places[:PLACES_SHOWN]) + (f" and {len(places) - PLACES_SHOWN} more" if len(places) > PLACES_SHOWN else "")
    rule = f"**{rich_text(group.rule)}**"
    if count == 1:
        lines = [f"{rule}{' · ' + named if named else ''}", "", rich_text(first.message)]
    else:
        lines = [f"{rule} × {count}: {named}", "", f"The first: {rich_text(first.message)}"]
    quoted = [warning for warning in group.warnings if warning.statement]
    statements = quoted[:items]
    if statements:
        sql = "\n".join(
            (f"-- {warning.file}:{warning.line}\n" if count > 1 else "") + f"{warning.statement};" for warning in statements
        )
        lines += ["", *code_block(sql, "sql")]
        if len(statements) < len(quoted):
            lines += ["", f"*The other {len(quoted) - len(statements)} statements are not quoted, to keep this comment short.*"]
    return lines


def _drift_alert(drifted: Sequence[tuple[str, Drift]], items: int | None, *, several: bool) -> str:
    shown = drifted[:items]
    lines = [f"**Drift:** {plural(len(drifted), 'migration')} changed after being applied; the database ran the earlier text.", ""]
    for service, item in shown:
        where = f" of service {code(service)}" if several else ""
        now = f"file now {code(item.file_checksum[:12])}" if item.file_checksum else "the file is gone"
        lines.append(f"- version {item.version}{where}, {code(item.file)}: recorded sha256 {code(item.recorded_checksum[:12])}, {now}")
    lines += _left_out(len(shown), len(drifted), "drifted migration", "drifted migrations")
    return alert("WARNING", lines)


def _left_out(shown: int, total: int, one: str, many: str) -> list[str]:
    if shown >= total:
        return []
    left = total - shown
    return ["", f"*… and {left} more {one if left == 1 else many} not listed, to keep this comment short.*"]

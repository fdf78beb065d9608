"""The dry run of ``plan --verify`` in text, Markdown and JSON, shown after the plan."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..planning.plan import Plan, plan_to_dict
from .json import dumps
from .text import Style, printable

if TYPE_CHECKING:
    from ..verification.dryrun import SchemaChange, ServiceVerification, Verification

MARKS = {"added": "+", "dropped": "-", "changed": "~"}
MAX_CHANGES_SHOWN = 40  # per service in text; Markdown folds them all


def versions_line(verification: Verification) -> str:
    parts = []
    for server, live in verification.live_major.items():
        ran = verification.copy_major.get(server, live)
        same = "the live server's own" if ran == live else f"the live server runs {live}; none installed"
        parts.append(f"server '{server}': PostgreSQL {ran} ({same})")
    return "; ".join(parts)


def change_line(change: SchemaChange) -> str:
    line = f"{MARKS[change.change]} {change.kind} {printable(change.name)}"
    if change.change == "changed":
        line += f": {printable(change.before or '')} -> {printable(change.after or '')}"
    return line


def summary(service: ServiceVerification) -> str:
    counts = {kind: sum(1 for c in service.changes if c.change == kind) for kind in MARKS}
    words = [f"{counts[k]} {k}" for k in ("added", "changed", "dropped") if counts[k]]
    return ", ".join(words) or "no schema change"


def render_text(verification: Verification, *, color: bool = False) -> str:
    style = Style(color)
    if not verification.services:
        return "Verify: nothing pending, nothing to run on a copy.\n"
    lines = [style("Verified on a copy of the live schema", "bold") + f" ({versions_line(verification)}):"]
    for service in verification.services:
        name = service.service + stands_for(service)
        if service.ok:
            lines.append(style(f"  ✓ {name}: the pending migrations ran; {summary(service)}", "green"))
        else:
            lines.append(style(f"  ✗ {name}: {printable(service.error or 'failed')}", "red"))
        for change in service.changes[:MAX_CHANGES_SHOWN]:
            lines.append(f"      {change_line(change)}")
        if len(service.changes) > MAX_CHANGES_SHOWN:
            lines.append(f"      ... {len(service.changes) - MAX_CHANGES_SHOWN} more (--format json lists every one)")
    verdict = "Verify: every pending migration ran on the copy." if verification.ok else "Verify: FAILED on the copy; nothing was changed on the live servers."
    lines.append(style(verdict, "green" if verification.ok else "red"))
    return "\n".join(lines) + "\n"


def render_markdown(verification: Verification) -> str:
    if not verification.services:
        return ""
    lines = ["", "### Dry run on a copy of the live schema", "", versions_line(verification), ""]
    for service in verification.services:
        name = f"<b>{_html(service.service)}</b>{_html(stands_for(service))}"
        head = (
            f"✅ {name}: the pending migrations ran; {summary(service)}"
            if service.ok
            else f"❌ {name}: <code>{_html(service.error or 'failed')}</code>"
        )
        if not service.changes:
            lines += [head, ""]
            continue
        lines += ["<details>", f"<summary>{head}</summary>", "", "```diff"]
        lines += [change_line(change) for change in service.changes]
        lines += ["```", "", "</details>", ""]
    return "\n".join(lines) + "\n"


def stands_for(service: ServiceVerification) -> str:
    """For the copy of a set's database: how many databases of the set it answers for."""
    if service.stands_for <= 1:
        return ""
    others = service.stands_for - 1
    return f" (and {others} more database{'s' if others > 1 else ''} of its set starting from the same version)"


def _html(text: str) -> str:
    import html

    return html.escape(text.replace("\n", " "))


def to_dict(verification: Verification) -> dict[str, Any]:
    return {
        "ok": verification.ok,
        "servers": {
            server: {"live_major": major, "copy_major": verification.copy_major.get(server)}
            for server, major in verification.live_major.items()
        },
        "services": [
            {
                "service": s.service,
                "database": s.database,
                "ok": s.ok,
                "error": s.error,
                "sqlstate": s.sqlstate,
                "stands_for": s.stands_for,
                "changes": [vars(change) for change in s.changes],
            }
            for s in verification.services
        ],
    }


def render_json(plan: Plan, verification: Verification) -> str:
    return dumps({**plan_to_dict(plan), "verification": to_dict(verification)})

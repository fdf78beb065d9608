"""A set's services at a glance (issue #12): one summary per service over a set instead of
one section per database, in text and Markdown.

"tenant: 500 databases on 2 servers: 480 at 41, 20 at 41 -> 42 (+ 42 add_index)", the
stages, and the outliers listed by name: dirty, drift, blocked, behind and ahead of the
version most of the set is at. ``--format json`` is left alone: it lists every action.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from ..planning.plan import (
    ApplyMigration,
    ApplyRepeatable,
    Blocker,
    CreateDatabase,
    MigrationAction,
    Plan,
    RevertMigration,
    ServicePlan,
    Warning,
)

LISTED = 10  # outliers named per kind; the rest are counted

Styler = Callable[..., str]


@dataclass
class FleetSummary:
    fleet: str
    members: list[ServicePlan] = field(default_factory=list)
    actions: dict[str, list[MigrationAction]] = field(default_factory=dict)  # instance -> its actions
    blocked: dict[str, list[Blocker]] = field(default_factory=dict)
    creations: list[CreateDatabase] = field(default_factory=list)
    warnings: Counter[tuple[str | None, str, str | None]] = field(default_factory=Counter)  # (file, message, rule)

    @property
    def servers(self) -> list[str]:
        return sorted({member.server for member in self.members})

    @property
    def majority(self) -> int | None:
        """The version most of the set is at: the yardstick for behind and ahead."""
        counts = Counter(member.current for member in self.members)
        return counts.most_common(1)[0][0] if counts else None

    def groups(self) -> list[tuple[int, str]]:
        """(count, what) for each distinct state, the largest first."""
        counts: Counter[str] = Counter()
        for member in self.members:
            counts[self._state(member)] += 1
        return [(count, state) for state, count in counts.most_common()]

    def _state(self, member: ServicePlan) -> str:
        actions = self.actions.get(member.service, [])
        state = f"at {_version(member.current)}"
        if member.service in self.blocked:
            return state + ", blocked"
        if actions:
            state += f" -> {_version(member.target)} ("
            state += ", ".join(_short(a) for a in actions[:3])
            state += f", {len(actions) - 3} more)" if len(actions) > 3 else ")"
        else:
            state += ", up to date"
        return state

    def outliers(self) -> list[tuple[str, list[str]]]:
        majority = self.majority
        kinds: dict[str, list[str]] = {"dirty": [], "drift": [], "blocked": [], "behind": [], "ahead": []}
        for member in self.members:
            where = f"{member.database} ({member.server})"
            if member.dirty:
                kinds["dirty"].append(f"{where} at {_version(member.dirty_version)}")
            if member.drift:
                kinds["drift"].append(f"{where}: {', '.join(str(d.version) for d in member.drift)}")
            if member.service in self.blocked:
                kinds["blocked"].append(f"{where}: {self.blocked[member.service][0].message}")
            if _below(member.current, majority):
                kinds["behind"].append(f"{where} at {_version(member.current)}")
            if _below(majority, member.current):
                kinds["ahead"].append(f"{where} at {_version(member.current)}")
        return [(kind, found) for kind, found in kinds.items() if found]

    def stages(self) -> list[tuple[int, list[str]]]:
        by_stage: dict[int, list[str]] = {}
        for member in self.members:
            by_stage.setdefault(member.stage or 0, []).append(member.database)
        return sorted(by_stage.items())


def _below(one: int | None, other: int | None) -> bool:
    return other is not None and (one is None or one < other)


def _version(version: int | None) -> str:
    return "none" if version is None else str(version)


def split_fleets(plan: Plan) -> tuple[Plan, list[FleetSummary]]:
    """The plan without the instances of services over sets (and their databases'
    creation, warnings and blockers), and one summary per such service."""
    fleets: dict[str, FleetSummary] = {}
    instance_fleet: dict[str, str] = {}
    fleet_databases: dict[str, str] = {}
    for service in plan.services:
        if service.fleet is not None:
            summary = fleets.setdefault(service.fleet, FleetSummary(service.fleet))
            summary.members.append(service)
            instance_fleet[service.service] = service.fleet
            fleet_databases.setdefault(service.database, service.fleet)
    if not fleets:
        return plan, []
    actions = []
    for action in plan.actions:
        owner = getattr(action, "service", None)
        if isinstance(owner, str) and owner in instance_fleet and isinstance(action, (ApplyMigration, RevertMigration, ApplyRepeatable)):
            fleets[instance_fleet[owner]].actions.setdefault(owner, []).append(action)
        elif isinstance(action, CreateDatabase) and action.database in fleet_databases:
            fleets[fleet_databases[action.database]].creations.append(action)
        else:
            actions.append(action)
    warnings: list[Warning] = []
    for warning in plan.warnings:
        if warning.service in instance_fleet:
            fleets[instance_fleet[warning.service]].warnings[(warning.file, warning.message, warning.rule)] += 1
        else:
            warnings.append(warning)
    blockers: list[Blocker] = []
    for blocker in plan.blockers:
        if blocker.service in instance_fleet:
            fleets[instance_fleet[blocker.service]].blocked.setdefault(blocker.service, []).append(blocker)
        else:
            blockers.append(blocker)
    rest = replace(
        plan,
        actions=tuple(actions),
        services=tuple(s for s in plan.services if s.fleet is None),
        warnings=tuple(warnings),
        blockers=tuple(blockers),
    )
    return rest, list(fleets.values())


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _listed(items: Sequence[str]) -> list[str]:
    shown = list(items[:LISTED])
    return shown + ([f"and {len(items) - LISTED} more"] if len(items) > LISTED else [])


def headline(summary: FleetSummary) -> str:
    """``tenant: 500 databases on 2 servers: 480 at 41, up to date; 20 at 41 -> 42 (+ 42 add_index)``"""
    groups = "; ".join(f"{count} {state}" for count, state in summary.groups())
    servers = summary.servers
    return f"{summary.fleet}: {_plural(len(summary.members), 'database')} on {_plural(len(servers), 'server')}: {groups}"


def stage_line(summary: FleetSummary) -> str | None:
    stages = summary.stages()
    if len(stages) < 2:
        return None
    parts = []
    for number, databases in stages:
        if number == 0:
            names = ", ".join(databases[:LISTED]) + (f" and {len(databases) - LISTED} more" if len(databases) > LISTED else "")
            parts.append(f"stage {number + 1}: {_plural(len(databases), 'canary')}: {names}".replace("canarys", "canaries"))
        else:
            parts.append(f"stage {number + 1}: {_plural(len(databases), 'database')}")
    return "; ".join(parts)


def creation_line(summary: FleetSummary) -> str | None:
    if not summary.creations:
        return None
    per_server = Counter(action.server for action in summary.creations)
    where = ", ".join(f"{server} ({count})" for server, count in sorted(per_server.items()))
    return f"{_plural(len(summary.creations), 'database')} to create: {where}"


def text_section(summary: FleetSummary, style: Styler) -> list[str]:
    lines = [style(f"service {headline(summary)}", "bold")]
    for extra in (stage_line(summary), creation_line(summary)):
        if extra:
            lines.append(style(f"  {extra}", "dim"))
    for kind, found in summary.outliers():
        sign, color = ("~", "yellow") if kind in ("drift", "behind", "ahead") else ("!", "red")
        lines.append(style(f"  {sign} {kind}: {_plural(len(found), 'database')}", color))
        lines += [style(f"      {item}", color) for item in _listed(found)]
        if kind == "blocked":
            hint = next(iter(summary.blocked.values()))[0].hint
            lines += [f"    hint: {hint}"] if hint else []
    for (file, message, rule), count in list(summary.warnings.items())[:LISTED]:
        where = f"{file}: " if file else ""
        lines.append(style(f"  ~ {where}{message}{f' [{rule}]' if rule else ''} ({_plural(count, 'database')})", "yellow"))
    if len(summary.warnings) > LISTED:
        lines.append(style(f"  ~ and {len(summary.warnings) - LISTED} more warnings", "yellow"))
    lines.append("")
    return lines


def markdown_section(fleets: Sequence[FleetSummary]) -> str:
    """One short section per service over a set; its size does not grow with the set."""
    from .markdown import code

    lines = ["### Sets", ""]
    for summary in fleets:
        lines.append(f"**{code(summary.fleet)}**: {_plural(len(summary.members), 'database')} on "
                     f"{_plural(len(summary.servers), 'server')}")  # fmt: skip
        lines.append("")
        lines += [f"- {count} {code(state)}" for count, state in summary.groups()[:LISTED]]
        for extra in (stage_line(summary), creation_line(summary)):
            if extra:
                lines.append(f"- {extra}")
        for kind, found in summary.outliers():
            lines.append(f"- **{kind}** ({len(found)}): " + "; ".join(code(item) for item in _listed(found)))
        for (file, message, rule), count in list(summary.warnings.items())[:LISTED]:
            lines.append(f"- ⚠️ {code(file) + ': ' if file else ''}{message}{f' `{rule}`' if rule else ''} ({_plural(count, 'database')})")
        lines.append("")
    return "\n".join(lines) + "\n"


def render_markdown_plan(plan: Plan, **options: object) -> str:
    """``markdown.render_plan`` with each service over a set summarised in one section."""
    from . import markdown

    rest, fleets = split_fleets(plan)
    if not fleets:
        return markdown.render_plan(plan, **options)  # type: ignore[arg-type]
    section = markdown_section(fleets)
    limit = int(options.pop("max_chars", markdown.MAX_COMMENT_CHARS))  # type: ignore[call-overload]
    text = markdown.render_plan(rest, max_chars=limit - len(section) - len(markdown._summary(plan)), **options)  # type: ignore[arg-type]
    own = markdown._summary(rest)
    head, found, tail = text.partition(own)
    if not found:
        return markdown._summary(plan) + "\n" + section + text
    return head + markdown._summary(plan) + "\n" + section + tail


def _short(action: MigrationAction) -> str:
    """``+ 3 add_prices``, ``- 3 add_prices``, ``~ R__views``: an action in a fleet's line."""
    if isinstance(action, ApplyRepeatable):
        return f"~ R__{action.title}"
    return f"{'+' if isinstance(action, ApplyMigration) else '-'} {action.version} {action.title}"

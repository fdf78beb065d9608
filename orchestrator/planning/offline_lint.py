"""``dbplan lint``: what ``plan`` would say about migration files, with no server.

No live state means no "pending": every up and down file of every service is linted, or
only the files asked for. Each up file gets exactly the warnings and blockers the planner
gives a pending one (the same functions make them). A down file gets the blockers of a
planned revert, but its lint findings only as notices: a down file drops what its up
made by nature, and a hook that fails on every new pair gets switched off; ``plan``
warns at full severity when a revert is really planned. Rules that need live data
(drift, out-of-order files, a dirty service, an owner change) are not run. Pure: reads
an estate and its scanned migration sets.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..estate.model import Estate, Service
from ..migrations.lint import new_tables_after
from ..migrations.refusals import refusals
from ..migrations.scan import (
    TRANSACTIONAL_MODES,
    MigrationFile,
    MigrationSet,
    run_mode_of,
)
from .plan import Blocker
from .planner import file_warnings, lint_warnings

LEVELS = ("notice", "locking", "destructive", "error")
"""Severities from least to most serious: ``--fail-on LEVEL`` fails at it and above.

``error``: the plan would be blocked (the file cannot run as dbplan promises);
``destructive``: data is lost; ``locking``: a long lock or a rewrite of an existing
table; ``notice``: what a reviewer should know (no down file, its own transactions)."""

DEFAULT_FAIL_ON = "locking"


@dataclass(frozen=True)
class LintFinding:
    """One thing ``dbplan lint`` reports about a file."""

    file: str  # relative to the plan file's folder, as in the plan
    line: int | None
    rule: str
    severity: str  # one of LEVELS
    message: str
    service: str
    statement: str | None = None  # the statement on one line, escaped
    hint: str | None = None
    lock: str | None = None  # the lock the statement takes, for lock and rewrite findings


@dataclass(frozen=True)
class LintReport:
    files: tuple[str, ...]  # every file linted, in service then file order
    findings: tuple[LintFinding, ...]

    def at_or_above(self, level: str) -> tuple[LintFinding, ...]:
        """The findings of ``level`` or a more serious one (``never``: none)."""
        if level not in LEVELS:
            return ()
        floor = LEVELS.index(level)
        return tuple(f for f in self.findings if LEVELS.index(f.severity) >= floor)

    def count(self, severity: str) -> int:
        return sum(1 for finding in self.findings if finding.severity == severity)


def lint_estate(
    estate: Estate, migration_sets: dict[str, MigrationSet], only_files: Iterable[str | os.PathLike[str]] | None = None
) -> LintReport:
    """Lint every migration file of every service, or only ``only_files`` (paths as given on
    a command line, relative to the working folder). A file outside every service's
    migration folder, or not a migration there (a deleted one), is ignored."""
    wanted = None if only_files is None else {Path(os.path.realpath(path)) for path in only_files}
    files: list[str] = []
    findings: list[LintFinding] = []
    seen: set[tuple[str, frozenset[str]]] = set()  # a fleet's services share one folder: lint it once
    for name, service in estate.services.items():
        folder = Path(os.path.realpath(service.migrations_dir))
        # Files named (FILES, --since) stand for the pending ones: a table an earlier one creates is new.
        new_tables: tuple[str, ...] = ()
        for migration in migration_sets[name].migrations:
            for file in (migration.up, migration.down):
                if file is None or (wanted is not None and folder / file.path.name not in wanted):
                    continue
                if (file.display, service.lint_allow) in seen:
                    continue
                seen.add((file.display, service.lint_allow))
                if file.display not in files:
                    files.append(file.display)
                blockers: list[Blocker] = []
                up = file is migration.up
                if up:
                    warnings = file_warnings(service, migration, blockers, lint=True, new_tables=new_tables)
                    if wanted is not None:  # with no selection, earlier files count as applied long ago
                        new_tables = new_tables_after(file.script, new_tables)
                else:
                    warnings = lint_warnings(service, file, lint=True)
                findings += [
                    LintFinding(
                        file.display,
                        warning.line,
                        warning.rule or "warning",
                        (warning.severity or "notice") if up else "notice",
                        warning.message if up else "when reverted: " + warning.message,
                        service.name,
                        warning.statement,
                        lock=warning.lock,
                    )
                    for warning in warnings
                ]
                findings += _refusals(service, file)
        for repeatable in migration_sets[name].repeatables:  # Flyway's R__ files: they run too
            file = repeatable.file
            if (wanted is not None and folder / file.path.name not in wanted) or (file.display, service.lint_allow) in seen:
                continue
            seen.add((file.display, service.lint_allow))
            files.append(file.display)
            findings += [
                LintFinding(
                    file.display, warning.line, warning.rule or "warning", warning.severity or "notice",
                    warning.message, service.name, warning.statement, lock=warning.lock,
                )
                for warning in lint_warnings(service, file, lint=True)
            ]  # fmt: skip
            findings += _refusals(service, file)
    position = {file: index for index, file in enumerate(files)}
    return LintReport(tuple(files), tuple(sorted(findings, key=lambda f: (position[f.file], f.line or 0))))


def _refusals(service: Service, file: MigrationFile) -> list[LintFinding]:
    # As the planner's blockers, with the line and rule kept apart from the message.
    transactional = run_mode_of(file.script) in TRANSACTIONAL_MODES
    return [
        LintFinding(file.display, refusal.line, refusal.rule, "error", refusal.message, service.name, hint=refusal.hint)
        for refusal in refusals(file.script, transactional=transactional)
    ]

"""The machine-readable plan, status and apply result (DESIGN.md: "Machine-readable plan")."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..errors import DbplanError
from ..planning.plan import (
    FORMAT_VERSION,
    Plan,
    action_to_dict,
    plan_to_dict,
    service_to_dict,
    without_nones,
)

if TYPE_CHECKING:
    from ..execution.progress import Result
    from ..live.history import ServiceHistory
    from ..planning.offline_lint import LintReport
    from ..planning.records import Recording
    from ..verification.roundtrip import RoundTripReport


def render_plan(plan: Plan) -> str:
    return dumps(plan_to_dict(plan))


def render_status(plan: Plan) -> str:
    environment = {"environment": plan.environment} if plan.environment else {}
    return dumps({"format_version": FORMAT_VERSION, **environment, "services": [service_to_dict(s) for s in plan.services]})


def render_result(result: Result) -> str:
    return dumps(
        {
            "format_version": FORMAT_VERSION,
            "ok": result.ok,
            "summary": {status: result.count(status) for status in RESULT_STATUSES},
            "outcomes": [
                {**action_to_dict(o.action), "status": o.status, "duration_ms": o.duration_ms, "detail": o.detail}
                for o in result.outcomes
            ],
            "error": None if result.error is None else error_to_dict(result.error),
            "failures": [
                without_nones(
                    {
                        "server": failure.server,
                        "database": failure.database,
                        "service": failure.service,
                        "location": getattr(failure.error, "location", None),
                        "sqlstate": getattr(failure.error, "sqlstate", None),
                        **error_to_dict(failure.error),
                    }
                )
                for failure in result.failures
            ],
            "not_run": [without_nones(vars(item)) for item in result.not_run],
        }
    )


def render_refusal(error: DbplanError, plan: Plan | None = None) -> str:
    """The result of an apply that ended before anything ran (bad input, an unreachable
    server, a blocked plan, a saved plan that no longer matches, a usage error): the
    same shape as ``render_result``, with nothing done. ``plan``, when there is one, adds
    its blockers."""
    document: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "ok": False,
        "summary": dict.fromkeys(RESULT_STATUSES, 0),
        "outcomes": [],
        "error": error_to_dict(error),
        "failures": [],
        "not_run": [],
    }
    if plan is not None and plan.blocked:
        document["blockers"] = [without_nones(vars(blocker)) for blocker in plan.blockers]
    return dumps(document)


RESULT_STATUSES = ("done", "skipped", "failed", "cancelled")


def error_to_dict(error: DbplanError) -> dict[str, Any]:
    return without_nones(
        {
            "kind": type(error).__name__,
            "message": error.message,
            "hint": error.hint,
            "server": error.server,
            "service": error.service,
            "version": error.version,
            "sqlstate": getattr(error, "sqlstate", None),
        }
    )


def render_recording(
    command: str, service: str, version: int, recording: Recording | None, error: DbplanError | None = None
) -> str:
    """The result of ``force``, ``baseline`` or ``accept``: the history rows it wrote and
    the version it left, or (``ok`` false, nothing written) why it refused."""
    return dumps(
        {
            "format_version": FORMAT_VERSION,
            "ok": error is None,
            "command": command,
            "service": service,
            "version": version,
            "version_after": recording.version_after if recording else None,
            "recorded": [vars(row) for row in recording.rows] if recording else [],
            "message": recording.message if recording else None,
            "error": None if error is None else error_to_dict(error),
        }
    )


def render_history(histories: list[ServiceHistory]) -> str:
    return dumps(
        {
            "format_version": FORMAT_VERSION,
            "services": [
                {
                    "service": history.service,
                    "database": history.database,
                    "server": history.server,
                    "table": history.table,
                    "more": history.more,
                    "events": [{**vars(event), "applied_at": event.applied_at.isoformat()} for event in history.events],
                }
                for history in histories
            ],
        }
    )


def render_round_trips(report: RoundTripReport) -> str:
    return dumps(
        {
            "format_version": FORMAT_VERSION,
            "ok": report.ok,
            "server_version": report.server_version,
            "duration_ms": report.duration_ms,
            "summary": {status: report.count(status) for status in ("ok", "failed", "no-down", "not-run")},
            "services": [
                {
                    "service": service.service,
                    "database": service.database,
                    "migrations": [
                        {"version": c.version, "title": c.title, "status": c.status, "problems": list(c.problems)}
                        for c in service.checks
                    ],
                }
                for service in report.services
            ],
        }
    )


def render_lint(report: LintReport, fail_on: str) -> str:
    """One object: the files linted, a count per severity, and every finding."""
    from ..planning.offline_lint import LEVELS
    from .text import printable

    failing = set(report.at_or_above(fail_on))
    return dumps(
        {
            "format_version": FORMAT_VERSION,
            "ok": not failing,
            "fail_on": fail_on,
            "files": list(report.files),
            "summary": {level: report.count(level) for level in reversed(LEVELS)},
            "findings": [
                {
                    "file": finding.file,
                    "line": finding.line,
                    "rule": finding.rule,
                    "severity": finding.severity,
                    "lock": finding.lock,
                    "message": printable(finding.message),
                    "statement": None if finding.statement is None else printable(finding.statement),
                    "hint": finding.hint,
                    "service": finding.service,
                    "fails": finding in failing,
                }
                for finding in report.findings
            ],
        }
    )


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

"""The machine-readable plan, status and apply result (DESIGN.md: "Machine-readable plan")."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..planning.plan import FORMAT_VERSION, Plan, action_to_dict, plan_to_dict, service_to_dict, without_nones

if TYPE_CHECKING:
    from ..execution.progress import Result


def render_plan(plan: Plan) -> str:
    return dumps(plan_to_dict(plan))


def render_status(plan: Plan) -> str:
    return dumps({"format_version": FORMAT_VERSION, "services": [service_to_dict(s) for s in plan.services]})


def render_result(result: Result) -> str:
    error = result.error
    return dumps(
        {
            "format_version": FORMAT_VERSION,
            "ok": result.ok,
            "summary": {status: result.count(status) for status in ("done", "skipped", "failed", "cancelled")},
            "outcomes": [
                {**action_to_dict(o.action), "status": o.status, "duration_ms": o.duration_ms, "detail": o.detail}
                for o in result.outcomes
            ],
            "error": None
            if error is None
            else without_nones(
                {
                    "message": error.message,
                    "hint": error.hint,
                    "server": error.server,
                    "service": error.service,
                    "version": error.version,
                    "sqlstate": getattr(error, "sqlstate", None),
                }
            ),
        }
    )


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

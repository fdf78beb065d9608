"""The machine-readable plan, status and apply result (DESIGN.md: "Machine-readable plan")."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..plan import Plan, ServicePlan, action_to_dict

FORMAT_VERSION = 1

if TYPE_CHECKING:
    from ..executor import Result


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "changes": plan.changes,
        "blocked": plan.blocked,
        "summary": plan.summary(),
        "actions": [action_to_dict(action) for action in plan.actions],
        "services": [service_to_dict(service) for service in plan.services],
        "warnings": [_without_nones(vars(warning)) for warning in plan.warnings],
        "blockers": [_without_nones(vars(blocker)) for blocker in plan.blockers],
    }


def service_to_dict(service: ServicePlan) -> dict[str, Any]:
    return {
        "service": service.service,
        "database": service.database,
        "server": service.server,
        "current": service.current,
        "target": service.target,
        "latest": service.latest,
        "dirty": service.dirty,
        "dirty_version": service.dirty_version,
        "pending": list(service.pending),
        "reverts": list(service.reverts),
        "out_of_order": list(service.out_of_order),
        "drift": [vars(drift) for drift in service.drift],
        "invalid_indexes": list(service.invalid_indexes),
    }


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
            "summary": {status: result.count(status) for status in ("done", "skipped", "failed")},
            "outcomes": [
                {**action_to_dict(o.action), "status": o.status, "duration_ms": o.duration_ms, "detail": o.detail}
                for o in result.outcomes
            ],
            "error": None
            if error is None
            else _without_nones(
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


def _without_nones(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if value is not None}

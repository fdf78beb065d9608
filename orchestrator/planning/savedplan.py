"""Saved plans: what was reviewed is what runs.

``dbplan plan --out plan.json`` writes the plan with a fingerprint of everything it was
computed from: the plan file, every migration file's checksum, each server's identity,
and the live state of every role, database and service. ``dbplan apply plan.json``
computes the fingerprint again and refuses, changing nothing, when anything differs,
saying what. A saved plan holds no secret: connections come from the plan file, and
servers are identified by system identifier and address, never by URL.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import DbplanError, PlanChanged
from ..estate.model import Estate
from ..live.facts import LiveState, ServiceFacts
from ..migrations.scan import MigrationSet
from .plan import Action, Plan, action_from_dict, plan_to_dict

SAVED_PLAN_KIND = "dbplan-saved-plan"


def fingerprint(estate: Estate, migration_sets: dict[str, MigrationSet], live: LiveState) -> dict[str, Any]:
    """Everything a plan depends on, as plain JSON values (no secrets, no URLs)."""
    return {
        # The file as it was read and planned from, not as it may be on disk by now.
        "plan_file": estate.file_checksum,
        "servers": {
            name: {
                "system_identifier": facts.system_identifier,
                "address": facts.address,
                "roles": sorted(
                    role.name for role in estate.roles.values() if role.server == name and role.name in facts.roles
                ),
                "databases": sorted(
                    db for db in estate.databases if db in facts.databases and estate.databases[db].server == name
                ),
            }
            for name, facts in live.servers.items()
        },
        "migrations": _migrations(estate, migration_sets),
        "services": {name: service_fingerprint(estate, name, facts) for name, facts in live.services.items()},
    }


def service_fingerprint(estate: Estate, name: str, facts: ServiceFacts) -> dict[str, Any]:
    """What one service's part of a plan depends on: where its bookkeeping stands, and
    where its tables are (``schema``, and whether both ``tables`` exist there), which a
    plan applied in one pass uses instead of looking for them again."""
    return {
        "database_exists": facts.database_exists,
        "schema": facts.schema,
        "tables": facts.table_exists and facts.history_exists,
        "version": facts.version,
        "dirty": facts.dirty,
        "history": {str(e.version): [e.event, e.checksum, e.id] for e in facts.history},
        **_fleet_of(estate, name),
    }


def _migrations(estate: Estate, migration_sets: dict[str, MigrationSet]) -> dict[str, Any]:
    """Every migration file's checksums, once per folder a service definition names: the
    instances of a service over a set share theirs, so 2,000 databases cost one entry."""
    found: dict[str, Any] = {}
    for name, migration_set in migration_sets.items():
        service = estate.services.get(name)
        key = service.fleet if service is not None and service.fleet else name
        if key not in found:
            found[key] = {
                str(m.version): {"up": m.up.checksum, "down": m.down.checksum if m.down else None}
                for m in migration_set.migrations
            }
    return found


def _fleet_of(estate: Estate, name: str) -> dict[str, str]:
    service = estate.services.get(name)
    if service is None or service.fleet is None:
        return {}
    return {"fleet": service.fleet, "database": service.database}


def save(path: Path, plan: Plan, print_: dict[str, Any], *, selection: dict[str, Any] | None = None) -> None:
    document = {"kind": SAVED_PLAN_KIND, **plan_to_dict(plan), "fingerprint": print_}
    if selection is not None:
        document["selection"] = selection  # the services it was planned for (apply --only)
    try:
        path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as err:  # a missing folder, a directory, no permission, a full disk
        raise DbplanError(
            f"cannot save the plan to {path}: {err.strerror or err}",
            hint="--out takes the path of a file in a folder that exists and that you may write to",
        ) from err


def load(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DbplanError(f"saved plan {path} not found", hint="make one with 'dbplan plan --out FILE'") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DbplanError(f"cannot read saved plan {path}: {err}") from err
    if not isinstance(document, dict) or document.get("kind") != SAVED_PLAN_KIND or "fingerprint" not in document:
        raise DbplanError(
            f"{path} is not a saved dbplan plan", hint="make one with 'dbplan plan --out FILE'"
        )
    return document


REPLAN_HINT = "run 'dbplan plan --out FILE' again and review the new plan"


def check(saved: dict[str, Any], plan: Plan, now: dict[str, Any]) -> None:
    """Refuse when the plan's inputs or its actions differ from the saved ones."""
    check_environment(saved, plan.environment)
    changes = differences(saved["fingerprint"], now)
    if not changes and saved_actions(saved) != plan.actions:
        changes.append("the plan's actions differ from the saved ones")
    _refuse(changes)


def check_all_but_databases(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """For a saved plan applied in one pass: refuse, changing nothing, when the plan file, a
    migration file or a server (its identity, roles and databases) differs from the saved
    plan's. Each database's bookkeeping is checked later, by ``database_changed``, in the
    session that locks it."""
    if saved.get("blocked"):
        raise PlanChanged("the saved plan is blocked; nothing was changed", hint=REPLAN_HINT)
    _refuse(differences(saved["fingerprint"], now, services=False))


def _refuse(changes: list[str]) -> None:
    if changes:
        raise PlanChanged(
            "the saved plan no longer matches; nothing was changed:\n" + "\n".join(f"  - {c}" for c in changes),
            hint=REPLAN_HINT,
        )


def saved_actions(saved: dict[str, Any]) -> tuple[Action, ...]:
    try:
        return tuple(action_from_dict(action) for action in saved.get("actions", []))
    except (KeyError, TypeError) as err:
        raise DbplanError(f"the saved plan's actions cannot be read: {err}") from err


def actions_to_apply(saved: dict[str, Any], estate: Estate) -> tuple[Action, ...]:
    """The saved actions, for a plan applied without planning again (one pass). A saved plan
    whose fingerprint matches names only what the plan file declares; one edited by hand
    may not, and gets an error rather than a crash half-way."""
    actions = saved_actions(saved)
    for action in actions:
        for kind, known in (("service", estate.services), ("database", estate.databases)):
            name = getattr(action, kind, None)
            if name is not None and name not in known:
                raise DbplanError(
                    f"the saved plan names {kind} '{name}', which the plan file does not declare; nothing was changed",
                    hint=REPLAN_HINT,
                )
    return actions


def database_changed(expected: dict[str, Any] | None, now: dict[str, Any]) -> str | None:
    """How a service's bookkeeping differs from what the saved plan was made from (None:
    it does not). ``expected``: its entry in the saved fingerprint; a database the plan
    creates is expected to hold no bookkeeping yet."""
    if expected is None:
        return "it was not part of the saved plan"
    if not expected.get("database_exists"):  # created by this run, a moment ago: where is new
        expected = {**expected, "database_exists": True, "schema": now["schema"], "tables": now["tables"]}
    now = _as_saved(expected, now)
    if expected == now:
        return None
    return (
        f"version {_version(expected)} -> {_version(now)}{', now dirty' if now['dirty'] else ''}"
        f"{', its history differs' if expected.get('history') != now['history'] else ''}: another apply ran?"
    )


# What a service's fingerprint holds since a saved plan applied in one pass looks no table
# up again; a plan saved by a dbplan before it lacks them, and is compared without them.
LOCATION_KEYS = ("schema", "tables")


def _as_saved(saved: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, Any]:
    """``now`` without the location a plan saved before it was recorded does not hold."""
    if saved is None or all(key in saved for key in LOCATION_KEYS):
        return now
    return {key: value for key, value in now.items() if key not in LOCATION_KEYS or key in saved}


def _version(entry: dict[str, Any]) -> str:
    return "none" if entry.get("version") is None else str(entry["version"])


def saved_location(expected: dict[str, Any] | None) -> str | None:
    """The schema in which a saved plan found a service's two tables (None: they were not
    both there): where its lock and its reads are, without looking again."""
    if expected is None or not expected.get("database_exists") or expected.get("tables") is not True:
        return None
    schema = expected.get("schema")
    return schema if isinstance(schema, str) else None


def check_environment(saved: dict[str, Any], environment: str | None) -> None:
    """Refuse a plan saved for another environment, before connecting to this one's servers."""
    if saved.get("environment") != environment:
        raise PlanChanged(
            f"the saved plan was made for {_environment(saved.get('environment'))}; "
            f"this run is for {_environment(environment)}; nothing was changed",
            hint=f"apply it with --env {saved['environment']}" if saved.get("environment") else "apply it without --env",
        )


def _environment(name: str | None) -> str:
    return f"environment '{name}'" if name else "the plan file without an environment"


def differences(saved: dict[str, Any], now: dict[str, Any], *, services: bool = True) -> list[str]:
    found: list[str] = []
    if saved.get("plan_file") != now["plan_file"]:
        found.append("the plan file changed")
    found += _server_differences(saved.get("servers", {}), now["servers"])
    found += _migration_differences(saved.get("migrations", {}), now["migrations"])
    if services:
        found += _service_differences(saved.get("services", {}), now["services"])
    return found


def _server_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    found = []
    for name, current in now.items():
        before = saved.get(name)
        if before is None:
            found.append(f"server '{name}' was not part of the saved plan")
            continue
        if (before.get("system_identifier"), before.get("address")) != (
            current["system_identifier"],
            current["address"],
        ):
            found.append(
                f"server '{name}' is a different server than the plan was made against "
                f"(was {before.get('address')}, system {before.get('system_identifier')}; "
                f"now {current['address']}, system {current['system_identifier']})"
            )
        for what in ("roles", "databases"):
            appeared = sorted(set(current[what]) - set(before.get(what, [])))
            vanished = sorted(set(before.get(what, [])) - set(current[what]))
            if appeared:
                found.append(f"{what} created on server '{name}' since: {first_few(appeared)}")
            if vanished:
                found.append(f"{what} gone from server '{name}' since: {first_few(vanished)}")
    return found


def _migration_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    found = []
    for service, files in now.items():
        before = saved.get(service, {})
        for version in sorted(set(files) - set(before), key=int):
            found.append(f"service '{service}': new migration {version}")
        for version in sorted(set(before) - set(files), key=int):
            found.append(f"service '{service}': migration {version} was removed")
        for version in sorted(set(files) & set(before), key=int):
            if files[version] != before[version]:
                found.append(f"service '{service}': migration {version} was edited")
    return found


def _natural(name: str) -> list[Any]:
    """tenant_2 before tenant_10: the order a reader looks for them in."""
    return [int(part) if part.isdigit() else part for part in re.split(r"([0-9]+)", name)]


SHOWN_NAMES = 5  # a refusal over a fleet names the first few databases, then counts the rest


def first_few(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")


def _service_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    found = []
    fleets: dict[tuple[str, str], list[str]] = {}  # (fleet, what happened) -> databases
    for service, state in now.items():
        before = saved.get(service)
        state = _as_saved(before, state)
        if "fleet" in state and before != state:
            what = "not part of the saved plan" if before is None else "changed since"
            fleets.setdefault((state["fleet"], what), []).append(state["database"])
        elif before is None:
            found.append(f"service '{service}' was not part of the saved plan")
        elif before != state:
            found.append(
                f"service '{service}' changed in its database since (version {before.get('version')} -> "
                f"{state['version']}{', now dirty' if state['dirty'] else ''}): another apply ran?"
            )
    for (fleet, what), databases in fleets.items():
        found.append(
            f"service '{fleet}': {len(databases)} {'database' if len(databases) == 1 else 'databases'} {what}: "
            f"{first_few(sorted(databases, key=_natural))}" + ("; another apply ran?" if what.startswith("changed") else "")
        )
    return found

"""Part of an estate: one service (or a few) and what it needs, for ``apply --only``.

A service that migrates itself at start-up, or the init container in front of it, applies
its own migrations and those of the services it depends on, and nothing else. The part is
an ``Estate`` like the whole, so every later stage treats it the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from ..errors import DbplanError
from .load import suggest
from .model import Estate


def select_services(estate: Estate, names: Iterable[str], *, with_dependencies: bool = True) -> Estate:
    """The estate cut down to ``names`` (and, by default, the services they depend on).

    Kept: those services, their databases, the roles that own those databases, and the
    servers they live on. A ``depends_on`` that points outside the part is dropped, so that
    ``--no-deps`` really runs the one service alone.
    """
    wanted = list(dict.fromkeys(names))
    for name in wanted:
        if name not in estate.services:
            match = suggest(name, estate.services)
            raise DbplanError(
                f"unknown service '{name}'" + (f"; did you mean '{match}'?" if match else ""),
                hint=f"services: {', '.join(estate.services)}",
            )
    kept = _with_dependencies(estate, wanted) if with_dependencies else set(wanted)
    services = {
        name: replace(service, depends_on=tuple(d for d in service.depends_on if d in kept))
        for name, service in estate.services.items()
        if name in kept
    }
    databases = {
        name: database
        for name, database in estate.databases.items()
        if any(service.database == name for service in services.values())
    }
    owners = {database.owner for database in databases.values() if database.owner}
    roles = {name: role for name, role in estate.roles.items() if name in _with_memberships(estate, owners)}
    server_names = {database.server for database in databases.values()} | {role.server for role in roles.values()}
    servers = {name: server for name, server in estate.servers.items() if name in server_names}
    return replace(estate, servers=servers, roles=roles, databases=databases, services=services)


def _with_memberships(estate: Estate, names: set[str]) -> set[str]:
    """The roles and, through ``member_of``, every declared role they are granted: those
    must exist before the grant."""
    kept: set[str] = set()
    to_visit = list(names)
    while to_visit:
        name = to_visit.pop()
        if name not in kept and name in estate.roles:
            kept.add(name)
            to_visit.extend(estate.roles[name].member_of or ())
    return kept


def _with_dependencies(estate: Estate, names: list[str]) -> set[str]:
    kept: set[str] = set()
    to_visit = list(names)
    while to_visit:
        name = to_visit.pop()
        if name not in kept:
            kept.add(name)
            to_visit.extend(estate.services[name].depends_on)
    return kept

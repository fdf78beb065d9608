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
    wanted: list[str] = []
    fleets = {service.fleet for service in estate.services.values() if service.fleet}
    for name in dict.fromkeys(names):
        if name in estate.services:
            wanted.append(name)
        elif name in fleets or (estate.blueprint is not None and name in estate.blueprint.services):
            wanted += estate.fleet_instances(name)  # a service over a set: every instance of it
        else:
            choices = [*(s for s in estate.services if s not in fleets and not _is_instance(estate, s)), *sorted(fleets)]
            match = suggest(name, [*choices, *estate.services])
            raise DbplanError(
                f"unknown service '{name}'" + (f"; did you mean '{match}'?" if match else ""),
                hint=f"services: {', '.join(choices[:20])}" + (", ..." if len(choices) > 20 else "")
                + (f"; one database of a set: {estate.fleet_instances(min(fleets))[0]}" if fleets else ""),
            )
    kept = _with_dependencies(estate, wanted) if with_dependencies else set(wanted)
    services = {
        name: replace(service, depends_on=tuple(d for d in service.depends_on if d in kept))
        for name, service in estate.services.items()
        if name in kept
    }
    used = {service.database for service in services.values()}
    databases = {name: database for name, database in estate.databases.items() if name in used}
    owners = {(database.owner, database.server) for database in databases.values() if database.owner}
    kept_roles = _with_memberships(estate, owners)
    roles = {name: role for name, role in estate.roles.items() if (role.name, role.server) in kept_roles}
    server_names = {database.server for database in databases.values()} | {role.server for role in roles.values()}
    servers = {name: server for name, server in estate.servers.items() if name in server_names}
    return replace(estate, servers=servers, roles=roles, databases=databases, services=services)


def _with_memberships(estate: Estate, roles: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """The (role, server) pairs and, through ``member_of``, every declared role they are
    granted on the same server: those must exist before the grant."""
    declared = {(role.name, role.server): role for role in estate.roles.values()}
    kept: set[tuple[str, str]] = set()
    to_visit = list(roles)
    while to_visit:
        pair = to_visit.pop()
        if pair not in kept and pair in declared:
            kept.add(pair)
            to_visit.extend((other, pair[1]) for other in declared[pair].member_of or ())
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


def _is_instance(estate: Estate, name: str) -> bool:
    return estate.services[name].fleet is not None


def select_shard(estate: Estate, index: int, count: int) -> Estate:
    """Part ``index`` (from 1) of ``count``: the databases of sets split by a stable hash of
    their names, everything else (written-out databases, their services, every role) in
    part 1. Each part is a whole plan of its own. A set's service may depend on a service
    outside sets: that one is part 1's to apply, and another part only reads it (it is
    ``foreign`` there), so that part's plan is blocked until part 1 has applied it."""
    from .fleet import shard_of

    if not 1 <= index <= count:
        raise DbplanError(f"shard {index}/{count} does not exist: give I/N with 1 <= I <= N", hint="--shard 1/4 is the first of four")
    if count > 1:
        _refuse_fan_in(estate)
    databases = {
        name: database
        for name, database in estate.databases.items()
        if (shard_of(name, count) if database.fleet is not None else 1) == index
    }
    services = {name: service for name, service in estate.services.items() if service.database in databases}
    foreign = _with_dependencies(estate, [d for s in services.values() for d in s.depends_on if d not in services])
    for name in sorted(foreign, key=list(estate.services).index):
        services[name] = estate.services[name]
        database = estate.databases[services[name].database]
        databases.setdefault(database.name, database)
    services = {name: services[name] for name in estate.services if name in services}  # plan-file order
    databases = {name: databases[name] for name in estate.databases if name in databases}
    owners = {(database.owner, database.server) for database in databases.values() if database.owner}
    roles = {
        name: role for name, role in estate.roles.items() if index == 1 or (role.name, role.server) in owners
    }
    used = {database.server for database in databases.values()} | {role.server for role in roles.values()}
    servers = {name: server for name, server in estate.servers.items() if name in used or index == 1}
    return replace(
        estate,
        servers=servers,
        roles=roles,
        databases=databases,
        services=services,
        shard=(index, count),
        foreign=frozenset(foreign),
    )


def _refuse_fan_in(estate: Estate) -> None:
    """A service outside sets that depends on a set's service would wait for every part."""
    for service in estate.services.values():
        for dependency in service.depends_on:
            other = estate.services[dependency]
            if service.fleet is None and other.fleet is not None:
                raise DbplanError(
                    f"--shard cannot split this plan: service '{service.name}' depends on service '{other.fleet}', "
                    "which is served over a set, so part 1 would wait for every other part",
                    hint="drop that depends_on, or apply without --shard",
                )

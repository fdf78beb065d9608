"""Sets of databases (issue #12): one ``databases:`` entry that stands for many.

A set is expanded into ordinary ``Database`` entries, and each service over it into one
``Service`` per database, named ``service[database]``, so that the planner and the
executor handle a fleet as they handle any estate. Expansion is a pure function of the
blueprint (what the file says) and, for a discovered set, the members read from its
servers; ``load`` calls it for declared sets, ``api.plan`` again once discovered sets are
known.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

from ..errors import ConfigError
from .model import Blueprint, Database, DatabaseSet, Estate, Service

Member = tuple[str, str]  # (server, database)

CANARY_STAGE = 0
ROLLOUT_STAGE = 1


def instance_name(service: str, database: str) -> str:
    """``tenant[acme]``: the service ``tenant`` served on database ``acme``."""
    return f"{service}[{database}]"


def spread(names: Sequence[str], servers: Sequence[str]) -> list[Member]:
    """Place each name on one server by rendezvous hashing: a name's server depends only on
    the name and the list of servers, never on the order or number of names, so adding a
    tenant moves no other; adding a server moves only the names it wins (about 1/n of
    them), and the planner refuses to create one that already exists elsewhere."""
    return [(max(servers, key=lambda server: _weight(server, name)), name) for name in names]


def _weight(server: str, name: str) -> bytes:
    return hashlib.sha256(f"{server}\0{name}".encode()).digest()


def range_names(pattern: str, first: int, last: int, width: int | None) -> list[str]:
    """``tenant_{n}`` for n from ``first`` to ``last``, n zero-padded to ``width`` digits."""
    return [pattern.replace("{n}", str(n).zfill(width or 0)) for n in range(first, last + 1)]


def canaries(database_set: DatabaseSet, members: Sequence[Member]) -> set[str]:
    """The databases of stage 0: named, or the first of the set (a count, a percentage
    rounded up, so 5% of 10 databases is one canary, not none)."""
    canary = database_set.canary
    if canary is None or not members:
        return set()
    if isinstance(canary, tuple):
        return set(canary)
    count = canary if isinstance(canary, int) else math.ceil(len(members) * canary / 100)
    return {name for _, name in members[:count]}


def expand(blueprint: Blueprint, discovered: Mapping[str, Sequence[Member]] | None = None) -> tuple[
    dict[str, Database], dict[str, Service]
]:
    """The databases and services of the blueprint with every set expanded; a discovered
    set has the members in ``discovered`` (none before the servers were read)."""
    discovered = discovered or {}
    databases = dict(blueprint.databases)
    members_of: dict[str, list[Member]] = {}
    for key, database_set in blueprint.sets.items():
        members = list(database_set.members) if database_set.discovery is None else list(discovered.get(key, ()))
        stage_zero = canaries(database_set, members)
        members_of[key] = members
        for server, name in members:
            databases[name] = Database(
                name=name,
                server=server,
                owner=database_set.owner,
                place=database_set.place,
                fleet=key,
                stage=CANARY_STAGE if name in stage_zero else ROLLOUT_STAGE,
            )
    set_of = {name: spec.database for name, spec in blueprint.services.items() if spec.database in blueprint.sets}
    services: dict[str, Service] = {}
    for name, spec in blueprint.services.items():
        if name not in set_of:
            services[name] = replace(spec, depends_on=_dependencies(spec, None, set_of, members_of))
            continue
        for _, database in members_of[set_of[name]]:
            instance = instance_name(name, database)
            services[instance] = replace(
                spec,
                name=instance,
                database=database,
                fleet=name,
                depends_on=_dependencies(spec, database, set_of, members_of),
            )
    return databases, services


def _dependencies(
    spec: Service, database: str | None, set_of: Mapping[str, str], members_of: Mapping[str, list[Member]]
) -> tuple[str, ...]:
    """What one service (or one instance, on ``database``) depends on, among expanded
    services. Instances over the same set pair by database, so a fleet on a fleet adds one
    edge per database, not one per pair."""
    found: list[str] = []
    for dependency in spec.depends_on:
        if dependency not in set_of:
            found.append(dependency)
        elif database is not None and set_of[dependency] == set_of[spec.name]:
            found.append(instance_name(dependency, database))
        elif database is not None:
            raise ConfigError(
                f"service '{spec.name}' over set '{set_of[spec.name]}' depends on service '{dependency}' over "
                f"another set, '{set_of[dependency]}': every database would wait for every other",
                place=spec.place,
                hint="services over different sets cannot depend on each other; serve both from one set",
            )
        else:
            found += [instance_name(dependency, member) for _, member in members_of[set_of[dependency]]]
    return tuple(found)


def with_discovered(estate: Estate, discovered: Mapping[str, Sequence[Member]]) -> Estate:
    """The estate with its discovered sets' members (read by ``live.facts.discover``)."""
    if estate.blueprint is None:
        return replace(estate, discovered=True)
    known = set(estate.blueprint.databases) | {
        name for spec in estate.blueprint.sets.values() for _, name in spec.members
    }
    kept: dict[str, list[Member]] = {}
    seen: dict[str, str] = {}
    for key, members in discovered.items():
        for server, name in members:
            if name in known:  # declared on its own: that entry says what it is
                continue
            other = seen.setdefault(name, server)
            if other != server:
                raise ConfigError(
                    f"database '{name}' of discovered set '{key}' is on server '{other}' and on server '{server}'",
                    place=estate.blueprint.sets[key].place,
                    hint="a database name stands for one database: rename one of them, or declare them apart",
                )
            kept.setdefault(key, []).append((server, name))
    databases, services = expand(estate.blueprint, kept)
    return replace(estate, databases=databases, services=services, discovered=True)


def discovered_sets(estate: Estate) -> dict[str, DatabaseSet]:
    return {key: spec for key, spec in estate.sets.items() if spec.discovery is not None}


def shard_of(database: str, count: int) -> int:
    """The shard (from 1) a fleet's database belongs to: a stable hash of its name, so
    every machine computes the same split without talking to the others."""
    digest = hashlib.sha256(database.encode()).digest()
    return int.from_bytes(digest[:8], "big") % count + 1

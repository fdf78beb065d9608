"""``dbplan baseline`` and ``dbplan accept``: a person's word about what a database
already holds (made by hand up to a version; an applied file edited on purpose),
recorded in the history under the migrations lock. Nothing runs."""

from __future__ import annotations

from collections.abc import Callable

from ..estate.model import Estate, Service
from ..live.facts import ServiceFacts
from ..migrations.scan import MigrationSet
from ..planning.records import Recording, plan_accept, plan_baseline
from .records import find_service, record


def baseline_version(
    estate: Estate,
    migration_sets: dict[str, MigrationSet],
    service_name: str,
    version: int,
    *,
    reason: str | None,
    lock_wait: float,
    on_wait: Callable[[str], None] | None = None,
) -> Recording:
    """Count every migration up to ``version`` as applied (see ``plan_baseline``)."""
    service = find_service(estate, service_name)

    def decide(service: Service, migration_set: MigrationSet, facts: ServiceFacts) -> Recording:
        return plan_baseline(service, migration_set, facts, version, reason)

    return record(estate, migration_sets, service, decide, command="baseline", lock_wait=lock_wait, on_wait=on_wait)


def accept_checksum(
    estate: Estate,
    migration_sets: dict[str, MigrationSet],
    service_name: str,
    version: int,
    *,
    reason: str,
    lock_wait: float,
    on_wait: Callable[[str], None] | None = None,
) -> Recording:
    """Record the checksum of an applied, edited file as its own (see ``plan_accept``)."""
    service = find_service(estate, service_name)

    def decide(service: Service, migration_set: MigrationSet, facts: ServiceFacts) -> Recording:
        return plan_accept(service, migration_set, facts, version, reason)

    # Whether the file is applied with drift is asked again under the lock: an apply of
    # other versions meanwhile leaves what the person accepts as true as it was.
    return record(
        estate, migration_sets, service, decide, command="accept", lock_wait=lock_wait, on_wait=on_wait,
        while_unchanged=False,
    )  # fmt: skip

"""``dbplan force``: the one writer besides the executor, and it writes bookkeeping only.

After a no-transaction migration failed part-way, a person repairs the database by hand
and records which version it is now at. The history keeps who did it, when and why.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import DbplanError
from ..estate.model import Estate, Service
from ..live.facts import ServiceFacts
from ..migrations.scan import MigrationSet
from ..planning.records import HistoryRow, Recording
from .records import find_service, record


def force_version(
    estate: Estate,
    migration_sets: dict[str, MigrationSet],
    service_name: str,
    version: int,
    *,
    reason: str | None,
    lock_wait: float,
    on_wait: Callable[[str], None] | None = None,
) -> Recording:
    """Record ``version`` as the service's current version, not dirty, under the
    migrations lock (``on_wait`` hears that it waits for it), and only if the service is
    still as it was when force started."""
    service = find_service(estate, service_name)
    by_version = migration_sets[service.name].by_version()
    if version != 0 and version not in by_version:
        known = ", ".join(str(v) for v in sorted(by_version)) or "none"
        raise DbplanError(
            f"service '{service.name}' has no migration with version {version}",
            service=service.name,
            hint=f"versions in {service.migrations_display}: {known}; 0 means 'no migration applied'",
        )
    migration = by_version.get(version)

    def decide(service: Service, migration_set: MigrationSet, facts: ServiceFacts) -> Recording:
        row = HistoryRow(
            version, migration.title if migration else None, migration.up.checksum if migration else None, "force", reason
        )
        return Recording(
            command="force",
            service=service.name,
            version=version,
            rows=(row,),
            sets_version=True,
            version_after=version or None,
            message=f"service '{service.name}' is now recorded at version {version}, not dirty.",
        )

    return record(estate, migration_sets, service, decide, command="force", lock_wait=lock_wait, on_wait=on_wait)

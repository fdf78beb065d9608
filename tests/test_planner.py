"""planner.make_plan: a pure function of (estate, graph, migration sets, live state).

The estate and the live state are built in memory; migration files are written under
``tmp_path`` and scanned, so checksums and run modes are the real ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.estate import graph
from orchestrator.estate.model import Database, Estate, Role, Server, Service
from orchestrator.live.facts import HistoryEntry, LiveState, ServerFacts, ServiceFacts
from orchestrator.migrations import scan as migrations
from orchestrator.migrations.scan import MigrationSet, RunMode
from orchestrator.planning.plan import (
    AlterDatabaseOwner,
    ApplyMigration,
    CreateDatabase,
    CreateRole,
    Drift,
    Plan,
    RevertMigration,
    ServicePlan,
)
from orchestrator.planning.planner import make_plan

TX = RunMode.TRANSACTION

PRODUCT_FILES = {
    "000001_init_schema.up.sql": "CREATE TABLE product (id bigint PRIMARY KEY, name text NOT NULL);\n",
    "000001_init_schema.down.sql": "DROP TABLE product;\n",
    "000002_add_prices.up.sql": "CREATE TABLE price (product_id bigint, amount numeric);\n",
    "000002_add_prices.down.sql": "DROP TABLE price;\n",
    "000003_product_search.up.sql": "CREATE TABLE search_term (term text);\n",
    "000003_product_search.down.sql": "DROP TABLE search_term;\n",
}
INVENTORY_FILES = {
    "000001_create_warehouses.up.sql": "CREATE TABLE warehouse (id bigint PRIMARY KEY);\n",
    "000001_create_warehouses.down.sql": "DROP TABLE warehouse;\n",
    "000002_create_stock.up.sql": "CREATE TABLE stock (warehouse_id bigint, quantity int);\n",
    "000002_create_stock.down.sql": "DROP TABLE stock;\n",
}


class World:
    """The DESIGN.md estate: product and inventory on one server; inventory depends on product.

    inventory is written first in the file, so dependency order and file order differ.
    """

    def __init__(self, root: Path, **product_options: object) -> None:
        self.root = root
        self.write("product", PRODUCT_FILES)
        self.write("inventory", INVENTORY_FILES)
        product = Service(
            "product", "products", root / "migrations/product", "migrations/product", **product_options  # type: ignore[arg-type]
        )
        inventory = Service(
            "inventory", "inventory", root / "migrations/inventory", "migrations/inventory", depends_on=("product",)
        )
        self.estate = Estate(
            file=root / "dbplan.yaml",
            root=root,
            servers={"main": Server("main", "postgresql://postgres@localhost/postgres", embedded=None)},
            roles={"product_svc": Role("product_svc", "main", login=True, password="s3cret")},
            databases={
                "products": Database("products", "main", owner="product_svc"),
                "inventory": Database("inventory", "main"),
            },
            services={"inventory": inventory, "product": product},
        )

    def write(self, service: str, files: dict[str, str]) -> None:
        folder = self.root / "migrations" / service
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")

    def remove(self, service: str, name: str) -> None:
        (self.root / "migrations" / service / name).unlink()

    def checksum(self, service: str, name: str) -> str:
        return hashlib.sha256((self.root / "migrations" / service / name).read_bytes()).hexdigest()

    def migration_sets(self) -> dict[str, MigrationSet]:
        return migrations.scan(self.estate)

    def plan(
        self,
        product: ServiceFacts | None = None,
        inventory: ServiceFacts | None = None,
        *,
        databases: frozenset[str] = frozenset({"postgres", "products", "inventory"}),
        roles: frozenset[str] = frozenset({"postgres", "product_svc"}),
        owners: dict[str, str] | None = None,
        version: str = "16.4",
    ) -> Plan:
        owners = {"products": "product_svc", "inventory": "postgres"} if owners is None else owners
        live = LiveState(
            servers={"main": ServerFacts("main", version, "7000000000000000001", "127.0.0.1:5432", databases, roles, owners)},
            services={
                "product": product or ServiceFacts("product", database_exists="products" in databases),
                "inventory": inventory or ServiceFacts("inventory", database_exists="inventory" in databases),
            },
        )
        return make_plan(self.estate, graph.build(self.estate), self.migration_sets(), live)

    def apply(self, service: str, version: int, title: str, after: int) -> ApplyMigration:
        name = f"{version:06d}_{title}.up.sql"
        database = self.estate.services[service].database
        return ApplyMigration(
            service, database, version, title, f"migrations/{service}/{name}", self.checksum(service, name), TX, after
        )

    def revert(self, service: str, version: int, title: str, after: int | None) -> RevertMigration:
        name = f"{version:06d}_{title}.down.sql"
        database = self.estate.services[service].database
        return RevertMigration(
            service, database, version, title, f"migrations/{service}/{name}", self.checksum(service, name), TX, after
        )


def history(world: World, service: str, *versions: int, event: str = "apply", start_id: int = 1) -> tuple[HistoryEntry, ...]:
    """History rows for ``versions`` of ``service``, recorded with the files' current checksums."""
    folder = world.root / "migrations" / service
    entries = []
    for offset, version in enumerate(versions):
        (up,) = folder.glob(f"{version:06d}_*.up.sql")
        title = up.name[7:-7]
        entries.append(HistoryEntry(version, event, world.checksum(service, up.name), title, start_id + offset))
    return tuple(entries)


def applied(world: World, service: str, *versions: int) -> ServiceFacts:
    """A dbplan-managed service with ``versions`` applied in order."""
    return ServiceFacts(
        service,
        database_exists=True,
        schema="public",
        table_exists=True,
        history_exists=True,
        version=max(versions),
        history=history(world, service, *versions),
    )


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


# ---------------------------------------------------------------------------
# Fresh estate, partly applied, nothing to do


def test_fresh_estate_creates_roles_then_databases_then_migrations_in_dependency_order(world: World) -> None:
    plan = world.plan(databases=frozenset({"postgres"}), roles=frozenset({"postgres"}))
    assert plan.actions == (
        CreateRole("main", "product_svc", login=True, with_password=True),
        CreateDatabase("main", "products", "product_svc"),
        CreateDatabase("main", "inventory", None),
        world.apply("product", 1, "init_schema", 1),
        world.apply("product", 2, "add_prices", 2),
        world.apply("product", 3, "product_search", 3),
        world.apply("inventory", 1, "create_warehouses", 1),
        world.apply("inventory", 2, "create_stock", 2),
    )
    assert plan.changes and not plan.blocked
    assert plan.summary() == {"create_roles": 1, "alter_roles": 0, "create_databases": 2, "change_owners": 0, "apply": 5, "revert": 0}
    # Services are reported in file order, actions in dependency order.
    assert plan.services == (
        ServicePlan("inventory", "inventory", "main", None, 2, 2, False, (1, 2), (), ()),
        ServicePlan("product", "products", "main", None, 3, 3, False, (1, 2, 3), (), ()),
    )
    assert plan.warnings == ()


def test_existing_role_and_database_are_not_created_again(world: World) -> None:
    plan = world.plan(databases=frozenset({"postgres", "products"}))
    assert [action for action in plan.actions if not isinstance(action, ApplyMigration)] == [
        CreateDatabase("main", "inventory", None)
    ]


def test_partly_applied(world: World) -> None:
    plan = world.plan(applied(world, "product", 1, 2), applied(world, "inventory", 1))
    assert plan.actions == (
        world.apply("product", 3, "product_search", 3),
        world.apply("inventory", 2, "create_stock", 2),
    )
    assert plan.service("product").current == 2
    assert plan.service("product").pending == (3,)
    assert plan.service("inventory").pending == (2,)


@pytest.mark.parametrize("strategy", ["wal_log", "file_copy"])
def test_a_create_strategy_is_blocked_only_where_the_server_cannot_honour_it(world: World, strategy: str) -> None:
    """PostgreSQL 14 has no STRATEGY and always copies files: wal_log cannot be had there,
    file_copy is what it does anyway. Nothing to create, nothing to block."""
    world.estate = replace(world.estate, servers={"main": replace(world.estate.servers["main"], create_strategy=strategy)})
    missing = frozenset({"postgres", "inventory"})
    old = world.plan(databases=missing, version="14.11 (Debian 14.11-1.pgdg120+2)")
    blockers = [blocker.message for blocker in old.blockers]
    if strategy == "wal_log":
        assert blockers == ["server main runs PostgreSQL 14, which creates databases only by copying files: "
                            "create_strategy wal_log needs PostgreSQL 15 or later"]  # fmt: skip
        assert "set it to file_copy" in (old.blockers[0].hint or "")
    else:
        assert blockers == []
        assert old.notices == (
            "server main: 1 database to create, copied file by file (create_strategy: file_copy), each forcing two checkpoints",
        )
    assert not world.plan(databases=missing, version="15.2").blockers
    assert not world.plan(version="14.11").blockers  # both databases exist


def test_nothing_to_do(world: World) -> None:
    plan = world.plan(applied(world, "product", 1, 2, 3), applied(world, "inventory", 1, 2))
    assert plan.actions == ()
    assert not plan.changes and not plan.blocked
    assert (plan.warnings, plan.blockers) == ((), ())
    assert [(s.service, s.current, s.latest, s.pending, s.drift) for s in plan.services] == [
        ("inventory", 2, 2, (), ()),
        ("product", 3, 3, (), ()),
    ]


def test_a_new_file_is_pending_after_the_applied_ones(world: World) -> None:
    world.write("product", {"000004_discounts.up.sql": "CREATE TABLE discount (id int);\n"})
    plan = world.plan(applied(world, "product", 1, 2, 3), applied(world, "inventory", 1, 2))
    assert plan.actions == (world.apply("product", 4, "discounts", 4),)


# ---------------------------------------------------------------------------
# Drift and adoption


def test_drift_when_the_recorded_checksum_differs(world: World) -> None:
    product = applied(world, "product", 1, 2, 3)
    recorded = product.history[1].checksum
    world.write("product", {"000002_add_prices.up.sql": "CREATE TABLE price (product_id bigint, amount money);\n"})
    plan = world.plan(product, applied(world, "inventory", 1, 2))
    drift = Drift(2, "migrations/product/000002_add_prices.up.sql", recorded, world.checksum("product", "000002_add_prices.up.sql"))
    assert plan.service("product").drift == (drift,)
    assert [(w.rule, w.service, w.file) for w in plan.warnings] == [
        ("drift", "product", "migrations/product/000002_add_prices.up.sql")
    ]
    assert plan.warnings[0].message.startswith(f"version 2 was changed after it was applied (recorded sha256 {recorded[:12]}")
    # Drift alone is a warning: nothing to do, nothing blocked.
    assert plan.actions == () and not plan.blocked


def test_golang_migrate_database_is_adopted(world: World) -> None:
    world.write("product", {"000004_discounts.up.sql": "CREATE TABLE discount (id int);\n"})
    # golang-migrate left schema_migrations at 3 and no history at all.
    adopted = ServiceFacts("product", database_exists=True, schema="public", table_exists=True, version=3)
    plan = world.plan(adopted, applied(world, "inventory", 1, 2))
    assert plan.actions == (world.apply("product", 4, "discounts", 4),)
    summary = plan.service("product")
    assert (summary.current, summary.pending, summary.drift) == (3, (4,), ())  # drift unknown, not reported


def test_adopted_versions_are_not_drift_even_if_files_changed(world: World) -> None:
    world.write("product", {"000001_init_schema.up.sql": "-- rewritten after golang-migrate ran it\n"})
    adopted = ServiceFacts("product", database_exists=True, schema="public", table_exists=True, version=3)
    plan = world.plan(adopted, applied(world, "inventory", 1, 2))
    assert plan.service("product").drift == ()
    assert plan.actions == ()


# ---------------------------------------------------------------------------
# Blocked plans


def test_dirty_service_is_blocked_with_a_force_hint(world: World) -> None:
    dirty = replace(applied(world, "product", 1, 2), version=3, dirty=True, invalid_indexes=("public.search_idx",))
    plan = world.plan(dirty, applied(world, "inventory", 1))
    assert plan.blocked
    (blocker,) = plan.blockers
    assert (blocker.service, blocker.version, blocker.file) == (
        "product",
        3,
        "migrations/product/000003_product_search.up.sql",
    )
    assert blocker.message == (
        "service 'product' is dirty at version 3: migrations/product/000003_product_search.up.sql ran outside "
        "a transaction and failed part-way; invalid indexes left behind: public.search_idx"
    )
    assert "dbplan force product 3" in blocker.hint
    assert "dbplan force product 2" in blocker.hint  # the version before the dirty one
    # Nothing of the blocked service runs; the other service still does.
    assert plan.actions == (world.apply("inventory", 2, "create_stock", 2),)
    assert plan.service("product").dirty


def test_out_of_order_file_is_blocked_when_history_exists(world: World) -> None:
    """Nothing in the history says version 2 ran: it is never applied, and it is below 3."""
    world.remove("product", "000002_add_prices.up.sql")
    world.remove("product", "000002_add_prices.down.sql")
    product = applied(world, "product", 1, 3)
    world.write("product", {"000002_add_prices.up.sql": "CREATE TABLE price (product_id bigint);\n"})
    plan = world.plan(product, applied(world, "inventory", 1, 2))
    assert plan.service("product").out_of_order == (2,)
    (blocker,) = plan.blockers
    assert blocker.file == "migrations/product/000002_add_prices.up.sql"
    assert blocker.message == (
        "migrations/product/000002_add_prices.up.sql (version 2) was never applied, but version 3 already is: "
        "it is out of order"
    )
    assert "allow_out_of_order: true" in blocker.hint
    assert plan.actions == ()


def test_out_of_order_file_is_applied_in_version_order_when_allowed(tmp_path: Path) -> None:
    world = World(tmp_path, allow_out_of_order=True)
    world.remove("product", "000002_add_prices.up.sql")
    world.remove("product", "000002_add_prices.down.sql")
    product = applied(world, "product", 1, 3)
    world.write(
        "product",
        {
            "000002_add_prices.up.sql": "CREATE TABLE price (product_id bigint);\n",
            "000004_discounts.up.sql": "CREATE TABLE discount (id int);\n",
        },
    )
    plan = world.plan(product, applied(world, "inventory", 1, 2))
    assert not plan.blocked
    assert plan.actions == (
        world.apply("product", 2, "add_prices", 3),  # schema_migrations keeps the highest version
        world.apply("product", 4, "discounts", 4),
    )


def test_out_of_order_detection_with_history_missing_the_table_row(world: World) -> None:
    # What the planner does detect today: history says 1 and 3, schema_migrations has no row.
    product = replace(applied(world, "product", 1, 3), version=None)
    plan = world.plan(product, applied(world, "inventory", 1, 2))
    assert [blocker.version for blocker in plan.blockers] == [2]
    assert plan.blockers[0].file == "migrations/product/000002_add_prices.up.sql"


def test_concurrent_index_in_a_transactional_file_is_blocked(world: World) -> None:
    world.write("product", {"000004_search_index.up.sql": "CREATE INDEX CONCURRENTLY product_name ON product (name);\n"})
    plan = world.plan(applied(world, "product", 1, 2, 3), applied(world, "inventory", 1, 2))
    (blocker,) = plan.blockers
    assert (blocker.service, blocker.version, blocker.file) == (
        "product",
        4,
        "migrations/product/000004_search_index.up.sql",
    )
    assert blocker.message.startswith("migrations/product/000004_search_index.up.sql:1: CREATE INDEX CONCURRENTLY")
    assert blocker.hint == "put '-- dbplan:no-transaction' on the file's first line to run it outside a transaction"
    assert plan.actions == ()


def test_concurrent_index_with_the_marker_runs_outside_a_transaction(world: World) -> None:
    world.write(
        "product",
        {
            "000004_search_index.up.sql": "-- dbplan:no-transaction\n"
            "CREATE INDEX CONCURRENTLY product_name ON product (name);\n"
        },
    )
    plan = world.plan(applied(world, "product", 1, 2, 3), applied(world, "inventory", 1, 2))
    assert plan.blockers == ()
    (action,) = plan.actions
    assert (action.version, action.run_mode, action.transactional) == (4, RunMode.NO_TRANSACTION, False)


# ---------------------------------------------------------------------------
# Targets and reverts


def test_target_below_current_reverts_in_descending_order(tmp_path: Path) -> None:
    world = World(tmp_path, target=1)
    plan = world.plan(applied(world, "product", 1, 2, 3), applied(world, "inventory", 1, 2))
    assert plan.actions == (
        world.revert("product", 3, "product_search", 2),
        world.revert("product", 2, "add_prices", 1),
    )
    summary = plan.service("product")
    assert (summary.current, summary.target, summary.reverts, summary.pending) == (3, 1, (3, 2), ())
    assert plan.summary()["revert"] == 2


def test_target_zero_reverts_everything_and_removes_the_version(tmp_path: Path) -> None:
    world = World(tmp_path, target=0)
    plan = world.plan(applied(world, "product", 1, 2), applied(world, "inventory", 1, 2))
    assert plan.actions == (
        world.revert("product", 2, "add_prices", 1),
        world.revert("product", 1, "init_schema", None),
    )


def test_target_stops_pending_applies(tmp_path: Path) -> None:
    world = World(tmp_path, target=2)
    plan = world.plan(applied(world, "product", 1), applied(world, "inventory", 1, 2))
    assert plan.actions == (world.apply("product", 2, "add_prices", 2),)
    assert plan.service("product").pending == (2,)


def test_revert_without_a_down_file_is_blocked(tmp_path: Path) -> None:
    world = World(tmp_path, target=1)
    world.remove("product", "000002_add_prices.down.sql")
    plan = world.plan(applied(world, "product", 1, 2, 3), applied(world, "inventory", 1, 2))
    (blocker,) = plan.blockers
    assert (blocker.service, blocker.version, blocker.file) == (
        "product",
        2,
        "migrations/product/000002_add_prices.up.sql",
    )
    assert blocker.message == "cannot revert version 2 of service 'product' to reach target 1: no down file"
    assert "add_prices.down.sql" in blocker.hint and "raise the service's target" in blocker.hint
    assert plan.actions_of("product") == ()


def test_reverts_run_before_applies_and_dependents_revert_first(tmp_path: Path) -> None:
    world = World(tmp_path, target=2)
    world.estate.services["inventory"] = replace(world.estate.services["inventory"], target=1)
    world.write("inventory", {"000003_reorder.up.sql": "SELECT 1;\n", "000003_reorder.down.sql": "SELECT 1;\n"})
    plan = world.plan(applied(world, "product", 1, 2, 3), applied(world, "inventory", 1, 2))
    assert plan.actions == (
        world.revert("inventory", 2, "create_stock", 1),
        world.revert("product", 3, "product_search", 2),
    )


# ---------------------------------------------------------------------------
# force, warnings


def test_force_overrides_older_history(world: World) -> None:
    product = applied(world, "product", 1, 2, 3)
    force = HistoryEntry(1, "force", world.checksum("product", "000001_init_schema.up.sql"), "init_schema", 4)
    # inspect reports each version's latest event, and the latest force separately.
    forced = replace(product, version=1, history=(force,) + product.history[1:], last_force=force)
    plan = world.plan(forced, applied(world, "inventory", 1, 2))
    assert plan.actions == (
        world.apply("product", 2, "add_prices", 2),
        world.apply("product", 3, "product_search", 3),
    )
    assert plan.service("product").current == 1


def test_applies_after_a_force_count_again(world: World) -> None:
    product = applied(world, "product", 1, 2, 3)
    force = HistoryEntry(1, "force", None, "init_schema", 4)
    again = HistoryEntry(2, "apply", world.checksum("product", "000002_add_prices.up.sql"), "add_prices", 5)
    forced = replace(product, version=2, history=(force, again, product.history[2]), last_force=force)
    plan = world.plan(forced, applied(world, "inventory", 1, 2))
    assert plan.actions == (world.apply("product", 3, "product_search", 3),)


def test_files_without_down_files_are_warned_about(world: World) -> None:
    world.write("product", {"000004_discounts.up.sql": "CREATE TABLE discount (id int);\n"})
    plan = world.plan(applied(world, "product", 1, 2, 3), applied(world, "inventory", 1, 2))
    assert [(w.rule, w.service, w.file, w.message) for w in plan.warnings] == [
        ("missing-down", "product", "migrations/product/000004_discounts.up.sql", "has no down file: it cannot be reverted")
    ]
    assert not plan.blocked


def test_applied_version_without_a_file_is_warned_about(world: World) -> None:
    product = applied(world, "product", 1, 2, 3)
    world.remove("product", "000002_add_prices.up.sql")
    world.remove("product", "000002_add_prices.down.sql")
    plan = world.plan(product, applied(world, "inventory", 1, 2))
    assert [(w.rule, w.service, w.message) for w in plan.warnings] == [
        ("missing-file", "product", "version 2 is applied but has no file in migrations/product")
    ]
    assert (plan.actions, plan.blockers) == ((), ())


def test_applied_version_above_the_last_file_is_warned_about_not_reverted(world: World) -> None:
    product = applied(world, "product", 1, 2, 3)
    world.remove("product", "000003_product_search.up.sql")
    world.remove("product", "000003_product_search.down.sql")
    plan = world.plan(product, applied(world, "inventory", 1, 2))
    assert plan.blockers == ()
    assert [(w.rule, w.message) for w in plan.warnings] == [
        ("missing-file", "version 3 is applied but has no file in migrations/product")
    ]
    assert plan.actions == ()


def test_concurrent_statement_in_a_transactional_down_file_is_blocked(tmp_path: Path) -> None:
    world = World(tmp_path, target=3)
    world.write(
        "product",
        {
            "000004_name_index.up.sql": "-- dbplan:no-transaction\nCREATE INDEX CONCURRENTLY i ON product (name);\n",
            "000004_name_index.down.sql": "DROP INDEX CONCURRENTLY i;\n",
        },
    )
    plan = world.plan(applied(world, "product", 1, 2, 3, 4), applied(world, "inventory", 1, 2))
    assert [(b.version, b.file) for b in plan.blockers] == [(4, "migrations/product/000004_name_index.down.sql")]
    assert "-- dbplan:no-transaction" in plan.blockers[0].hint
    assert plan.actions == ()


@pytest.mark.parametrize(
    "target, where",
    [
        (7, "the newest file in migrations/product is version 3"),  # above every file
        (2, "the files nearest it are versions 1 and 3"),  # in a gap between files
    ],
)
def test_a_target_that_names_no_migration_is_blocked(tmp_path: Path, target: int, where: str) -> None:
    world = World(tmp_path, target=target)
    if target == 2:
        world.remove("product", "000002_add_prices.up.sql")
        world.remove("product", "000002_add_prices.down.sql")
    plan = world.plan(applied(world, "product", 1), applied(world, "inventory", 1, 2))
    (blocker,) = plan.blockers
    assert (blocker.service, blocker.version) == ("product", target)
    assert blocker.message == f"target {target} of service 'product' names no migration: {where}"
    assert "set the service's target to a version that has a file" in (blocker.hint or "")
    assert plan.actions_of("product") == ()


def test_a_target_at_an_applied_version_whose_file_is_gone_is_kept(world: World) -> None:
    world.estate.services["product"] = replace(world.estate.services["product"], target=3)
    product = applied(world, "product", 1, 2, 3)
    world.remove("product", "000003_product_search.up.sql")
    world.remove("product", "000003_product_search.down.sql")
    plan = world.plan(product, applied(world, "inventory", 1, 2))
    assert (plan.blockers, plan.actions) == ((), ())
# ---------------------------------------------------------------------------
# What the mutation benchmark (bench/mutate.py) found untested


@pytest.mark.parametrize("event", ["apply", "force", "baseline", "accept"])
def test_every_applied_event_counts_as_applied(world: World, event: str) -> None:
    product = applied(world, "product", 1, 2)
    latest = replace(product.history[1], event=event)
    facts = replace(product, history=(product.history[0], latest), last_force=latest if event != "apply" else None)
    plan = world.plan(facts, applied(world, "inventory", 1, 2))
    assert plan.actions == (world.apply("product", 3, "product_search", 3),)


def test_a_reverted_version_is_applied_again(world: World) -> None:
    product = applied(world, "product", 1, 2)
    reverted = replace(product.history[1], event="revert", id=3)
    plan = world.plan(replace(product, version=1, history=(product.history[0], reverted)), applied(world, "inventory", 1, 2))
    assert plan.actions == (world.apply("product", 2, "add_prices", 2), world.apply("product", 3, "product_search", 3))


def test_drift_below_a_force_is_still_reported(world: World) -> None:
    """A force to 2 keeps what older history says of the versions up to 2 (their checksums)."""
    product = applied(world, "product", 1, 2, 3)
    recorded = product.history[0].checksum
    world.write("product", {"000001_init_schema.up.sql": "CREATE TABLE product (id int);\n"})
    force = HistoryEntry(2, "force", None, "add_prices", 4)
    forced = replace(product, version=2, history=(product.history[0], force, product.history[2]), last_force=force)
    plan = world.plan(forced, applied(world, "inventory", 1, 2))
    assert [(d.version, d.recorded_checksum) for d in plan.service("product").drift] == [(1, recorded)]
    # Version 3 was applied before the force to 2: it runs again.
    assert plan.actions == (world.apply("product", 3, "product_search", 3),)


def test_a_version_reverted_before_a_force_above_it_counts_as_applied(world: World) -> None:
    product = applied(world, "product", 1, 2, 3)
    reverted = replace(product.history[0], event="revert", id=4)
    force = HistoryEntry(3, "force", None, "product_search", 5)
    forced = replace(product, version=3, history=(reverted, product.history[1], force), last_force=force)
    plan = world.plan(forced, applied(world, "inventory", 1, 2))
    assert plan.actions == ()
    assert plan.service("product").drift == ()  # what was forced has no checksum to compare


def test_a_missing_file_at_the_target_is_warned_about(tmp_path: Path) -> None:
    world = World(tmp_path, target=2)
    product = applied(world, "product", 1, 2)
    world.remove("product", "000002_add_prices.up.sql")
    world.remove("product", "000002_add_prices.down.sql")
    plan = world.plan(product, applied(world, "inventory", 1, 2))
    assert [(w.rule, w.message) for w in plan.warnings] == [
        ("missing-file", "version 2 is applied but has no file in migrations/product")
    ]


def test_a_run_in_progress_blocks_with_a_wait_hint(world: World) -> None:
    """dirty while another session holds the migrations lock: running, not failed."""
    running = replace(applied(world, "product", 1, 2), version=3, dirty=True, dirty_in_progress="pid 4242 on host ci")
    plan = world.plan(running, applied(world, "inventory", 1, 2))
    (blocker,) = plan.blockers
    assert blocker.message == (
        "service 'product' is being migrated right now: migrations/product/000003_product_search.up.sql "
        "(version 3) runs outside a transaction in another session (pid 4242 on host ci)"
    )
    assert (blocker.version, blocker.file) == (3, "migrations/product/000003_product_search.up.sql")
    assert blocker.hint == "wait for that run to finish; 'dbplan apply' waits for it by itself"
    assert "force" not in blocker.hint


def test_a_golang_migrate_database_left_dirty_at_its_first_version_hints_force_zero(world: World) -> None:
    """golang-migrate keeps no history: dirty at 1 means nothing before it ran."""
    dirty = ServiceFacts("product", database_exists=True, schema="public", table_exists=True, version=1, dirty=True)
    plan = world.plan(dirty, applied(world, "inventory", 1, 2))
    (blocker,) = plan.blockers
    assert blocker.message.startswith("service 'product' is dirty at version 1: migrations/product/000001_init_schema.up.sql")
    assert "'dbplan force product 1'" in blocker.hint
    assert "'dbplan force product 0' to run it again" in blocker.hint


def test_a_golang_migrate_database_left_dirty_hints_the_version_below(world: World) -> None:
    dirty = ServiceFacts("product", database_exists=True, schema="public", table_exists=True, version=3, dirty=True)
    plan = world.plan(dirty, applied(world, "inventory", 1, 2))
    (blocker,) = plan.blockers
    assert "'dbplan force product 2' to run it again" in blocker.hint
    assert plan.service("product").current == 2  # the dirty version did not finish
    assert plan.service("product").dirty_version == 3
    assert plan.service("inventory").dirty_version is None


def test_dirty_at_a_version_without_a_file(world: World) -> None:
    dirty = replace(applied(world, "product", 1, 2, 3), version=7, dirty=True)
    plan = world.plan(dirty, applied(world, "inventory", 1, 2))
    (blocker,) = plan.blockers
    assert blocker.message == "service 'product' is dirty at version 7: a migration ran outside a transaction and failed part-way"
    assert blocker.file is None
    assert "'dbplan force product 3' to run it again" in blocker.hint


def test_pending_files_are_linted_in_the_plan(world: World) -> None:
    world.write(
        "product",
        {
            "000004_drop_prices.up.sql": "DROP TABLE price;\n",
            "000004_drop_prices.down.sql": "CREATE TABLE price (product_id bigint);\n",
        },
    )
    plan = world.plan(applied(world, "product", 1, 2, 3), applied(world, "inventory", 1, 2))
    assert [(w.rule, w.file, w.line, w.statement, w.severity) for w in plan.warnings] == [
        ("drop-table", "migrations/product/000004_drop_prices.up.sql", 1, "DROP TABLE price", "destructive")
    ]
    assert not plan.blocked and len(plan.actions) == 1  # a warning, not a blocker


def test_lint_allow_of_the_service_silences_its_rule_only(tmp_path: Path) -> None:
    world = World(tmp_path, lint_allow=frozenset({"drop-table"}))
    world.write(
        "product",
        {
            "000004_cleanup.up.sql": "DROP TABLE price;\nTRUNCATE search_term;\n",
            "000004_cleanup.down.sql": "SELECT 1;\n",
        },
    )
    plan = world.plan(applied(world, "product", 1, 2, 3), applied(world, "inventory", 1, 2))
    assert [w.rule for w in plan.warnings] == ["truncate"]


def test_a_statement_refused_in_a_transaction_is_a_blocker_not_also_a_warning(world: World) -> None:
    world.write("product", {"000004_search_index.up.sql": "CREATE INDEX CONCURRENTLY product_name ON product (name);\n"})
    plan = world.plan(applied(world, "product", 1, 2, 3), applied(world, "inventory", 1, 2))
    assert [b.version for b in plan.blockers] == [4]
    assert [w.rule for w in plan.warnings] == ["missing-down"]


def test_a_file_the_parser_rejects_blocks_the_plan_with_its_line(world: World) -> None:
    # (issue 11, item 4: such a file is never sent inside dbplan's transaction unchecked)
    world.write("product", {"000004_odd.up.sql": "SELECT 1;\nCREATE TABEL discount (id int);\n", "000004_odd.down.sql": "SELECT 1;\n"})
    plan = world.plan(applied(world, "product", 1, 2, 3), applied(world, "inventory", 1, 2))
    (blocker,) = plan.blockers
    assert (blocker.service, blocker.version, blocker.file) == ("product", 4, "migrations/product/000004_odd.up.sql")
    assert blocker.message.startswith("migrations/product/000004_odd.up.sql:2: ")
    assert 'syntax error at or near "TABEL"' in blocker.message
    assert plan.actions == ()


@pytest.mark.parametrize(
    ("sql", "run_mode", "note"),
    [
        ("BEGIN;\nCREATE TABLE discount (id int);\nCOMMIT;\n", RunMode.WRAPPED, "manages its own transaction"),
        (
            "BEGIN;\nCREATE TABLE discount (id int);\nCOMMIT;\nBEGIN;\nCREATE TABLE coupon (id int);\nCOMMIT;\n",
            RunMode.OWN_TRANSACTIONS,
            "holds several transaction blocks",
        ),
        ("CREATE TABLE discount (id int);\nCOMMIT;\n", RunMode.OWN_TRANSACTIONS, "holds several transaction blocks"),
    ],
    ids=["wrapped", "two-blocks", "commit-mid-file"],
)
def test_a_file_with_its_own_transaction_control_says_how_it_runs(world: World, sql: str, run_mode: str, note: str) -> None:
    world.write("product", {"000004_own.up.sql": sql, "000004_own.down.sql": "SELECT 1;\n"})
    plan = world.plan(applied(world, "product", 1, 2, 3), applied(world, "inventory", 1, 2))
    (action,) = plan.actions
    assert (action.run_mode, action.transactional) == (run_mode, run_mode == RunMode.WRAPPED)
    (warning,) = plan.warnings
    assert (warning.rule, warning.file) == ("own-transaction", "migrations/product/000004_own.up.sql")
    assert warning.message.startswith(note)


def test_a_golang_migrate_database_ahead_of_the_checkout_is_warned_about_not_reverted(world: World) -> None:
    """schema_migrations says 5, the files end at 3, no history: 5 is applied, its file is elsewhere."""
    ahead = ServiceFacts("product", database_exists=True, schema="public", table_exists=True, version=5)
    plan = world.plan(ahead, applied(world, "inventory", 1, 2))
    summary = plan.service("product")
    assert (summary.current, summary.target, summary.pending) == (5, 5, ())
    assert [(w.rule, w.message) for w in plan.warnings] == [
        ("missing-file", "version 5 is applied but has no file in migrations/product")
    ]
    assert plan.actions == ()


def test_the_executor_recheck_sees_reverts_then_applies(tmp_path: Path) -> None:
    """plan_service(...).actions is what the executor compares under its lock."""
    from orchestrator.planning.planner import plan_service

    world = World(tmp_path, target=2)
    world.write("product", {"000004_more.up.sql": "SELECT 1;\n"})
    facts = applied(world, "product", 1, 2, 3)
    outcome = plan_service(world.estate.services["product"], world.estate, world.migration_sets()["product"], facts)
    assert outcome.actions == (world.revert("product", 3, "product_search", 2),)
    world.estate.services["product"] = replace(world.estate.services["product"], target=None)
    outcome = plan_service(world.estate.services["product"], world.estate, world.migration_sets()["product"], facts)
    assert [a.version for a in outcome.actions] == [4]


# -- the owner of a database that exists ------------------------------------------------


def test_a_database_owned_by_another_role_is_handed_to_the_declared_owner_with_its_bookkeeping(world: World) -> None:
    product = replace(applied(world, "product", 1, 2, 3), history_exists=False)
    inventory = applied(world, "inventory", 1, 2)  # another database: its tables stay out of it
    plan = world.plan(product, inventory, owners={"products": "postgres", "inventory": "postgres"})

    (change,) = [a for a in plan.actions if isinstance(a, AlterDatabaseOwner)]
    assert change == AlterDatabaseOwner("main", "products", "product_svc", "postgres", ("public.schema_migrations",))
    assert plan.actions.index(change) == 0, "before any migration runs as the new owner"
    (warning,) = [w for w in plan.warnings if w.rule == "owner-change"]
    assert "database products goes from owner postgres to product_svc" in warning.message


@pytest.mark.parametrize(
    ("product", "owners"),
    [
        (None, {"products": "product_svc", "inventory": "postgres"}),  # already the declared owner
        (None, {"inventory": "postgres"}),  # products does not exist yet: created with its owner
    ],
    ids=["same-owner", "missing-database"],
)
def test_no_owner_change_when_there_is_none_to_make(world: World, product: ServiceFacts | None, owners: dict[str, str]) -> None:
    databases = frozenset({"postgres", *owners})
    plan = world.plan(product, None, databases=databases, owners=owners)

    assert [a for a in plan.actions if isinstance(a, AlterDatabaseOwner)] == []
    assert [w for w in plan.warnings if w.rule == "owner-change"] == []


def test_a_database_without_a_declared_owner_keeps_the_one_it_has(world: World) -> None:
    plan = world.plan(None, applied(world, "inventory", 1, 2), owners={"products": "product_svc", "inventory": "someone"})

    assert [a for a in plan.actions if isinstance(a, AlterDatabaseOwner)] == []


def test_the_owner_change_warning_is_about_databases_with_applied_migrations_only(world: World) -> None:
    # products changes owner but has nothing applied yet; inventory (another database) has.
    fresh = ServiceFacts("product", database_exists=True)
    plan = world.plan(fresh, applied(world, "inventory", 1, 2), owners={"products": "postgres", "inventory": "postgres"})

    (change,) = [a for a in plan.actions if isinstance(a, AlterDatabaseOwner)]
    assert change.bookkeeping_tables == (), "no bookkeeping table exists in products yet"
    assert [w for w in plan.warnings if w.rule == "owner-change"] == []


def test_both_bookkeeping_tables_go_with_the_database(world: World) -> None:
    product = replace(applied(world, "product", 1), schema="svc")
    plan = world.plan(product, None, owners={"products": "postgres", "inventory": "postgres"})

    (change,) = [a for a in plan.actions if isinstance(a, AlterDatabaseOwner)]
    assert change.bookkeeping_tables == ("svc.schema_migrations", "svc.dbplan_history")


def test_a_no_transaction_file_the_parser_rejects_is_warned_about_not_blocked(world: World) -> None:
    world.write(
        "product",
        {"000004_odd.up.sql": "-- dbplan:no-transaction\nCREATE TABEL discount (id int);\n", "000004_odd.down.sql": "SELECT 1;\n"},
    )
    plan = world.plan(applied(world, "product", 1, 2, 3), applied(world, "inventory", 1, 2))

    assert plan.blockers == ()
    (warning,) = [w for w in plan.warnings if w.file == "migrations/product/000004_odd.up.sql"]
    assert warning.message.startswith("could not parse the SQL (")
    assert "it runs as one string outside a transaction" in warning.message
    assert [a.version for a in plan.actions] == [4]


def test_a_transactional_file_the_parser_rejects_gets_no_such_warning(world: World) -> None:
    world.write("product", {"000004_odd.up.sql": "CREATE TABEL discount (id int);\n", "000004_odd.down.sql": "SELECT 1;\n"})
    plan = world.plan(applied(world, "product", 1, 2, 3), applied(world, "inventory", 1, 2))

    assert len(plan.blockers) == 1
    assert not any(w.message.startswith("could not parse the SQL") for w in plan.warnings)

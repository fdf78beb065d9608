"""Fixed estates for the renderer tests, planned by the real pipeline without a server.

Each case writes a plan file and its migration files to a folder (always the same
relative layout, so every path in the output is stable), loads it with ``config.load``,
builds the graph and scans the migrations like ``dbplan plan`` does, and hands the
planner a ``LiveState`` written here instead of read from a server.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.api import Planned
from orchestrator.estate import graph
from orchestrator.estate import load as config
from orchestrator.estate.model import Estate
from orchestrator.live.facts import HistoryEntry, LiveState, ServerFacts, ServiceFacts
from orchestrator.migrations import scan as migrations
from orchestrator.migrations.scan import MigrationSet
from orchestrator.planning.plan import Plan
from orchestrator.planning.planner import make_plan

ROLE_PASSWORD = "hunter2-role-password"
URL_PASSWORD = "s3cret-url-password"


@dataclass(frozen=True)
class Case:
    name: str
    planned: Planned

    @property
    def plan(self) -> Plan:
        return self.planned.plan

    def sql_for(self, file: str) -> str | None:
        """What the CLI passes the Markdown renderer: the file read relative to the estate root."""
        path = self.planned.estate.root / file
        return path.read_text(encoding="utf-8") if path.is_file() else None


LiveFacts = Callable[[Estate, dict[str, MigrationSet]], LiveState]


def build(
    root: Path,
    name: str,
    document: dict[str, Any],
    files: Mapping[str, str],
    live: LiveFacts,
    environ: Mapping[str, str] | None = None,
) -> Case:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dbplan.yaml").write_text(yaml.safe_dump({"version": 1, **document}, sort_keys=False, allow_unicode=True), encoding="utf-8")
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for service in document.get("services", {}).values():
        (root / service["migrations"]).mkdir(parents=True, exist_ok=True)
    estate = config.load(root / "dbplan.yaml", environ or {})
    estate_graph = graph.build(estate)
    migration_sets = migrations.scan(estate)
    live_state = live(estate, migration_sets)
    plan = make_plan(estate, estate_graph, migration_sets, live_state)
    return Case(name, Planned(estate, estate_graph, migration_sets, live_state, plan))


# ---------------------------------------------------------------------------
# Live facts


def server_facts(estate: Estate, *, databases: tuple[str, ...] = (), roles: tuple[str, ...] = ()) -> dict[str, ServerFacts]:
    return {
        name: ServerFacts(
            server=name,
            version="16.4",
            system_identifier="7000000000000000000",
            address="10.0.0.1:5432",
            databases=frozenset({"postgres", *databases}),
            roles=frozenset({"postgres", *roles}),
        )
        for name in estate.servers
    }


def checksum(migration_sets: dict[str, MigrationSet], service: str, version: int) -> str:
    return migration_sets[service].by_version()[version].up.checksum


def applied_through(
    migration_sets: dict[str, MigrationSet],
    service: str,
    version: int,
    *,
    checksums: Mapping[int, str] | None = None,
    dirty: bool = False,
    invalid_indexes: tuple[str, ...] = (),
) -> ServiceFacts:
    """Facts of a service dbplan applied up to ``version`` (a history row per version)."""
    checksums = checksums or {}
    history = tuple(
        HistoryEntry(m.version, "apply", checksums.get(m.version, m.up.checksum), m.title, id=index + 1)
        for index, m in enumerate(migration_sets[service].migrations)
        if m.version < version or (m.version == version and not dirty)
    )
    return ServiceFacts(
        service=service,
        database_exists=True,
        schema="public",
        table_exists=True,
        history_exists=True,
        version=version,
        dirty=dirty,
        history=history,
        invalid_indexes=invalid_indexes,
    )


def fresh(estate: Estate, service: str) -> ServiceFacts:
    """A service whose database exists but was never migrated."""
    return ServiceFacts(service=service, database_exists=True, schema="public")


def everything_exists(estate: Estate) -> dict[str, ServerFacts]:
    return server_facts(estate, databases=tuple(estate.databases), roles=tuple(estate.roles))


# ---------------------------------------------------------------------------
# The example estate: a product and an inventory service


EXAMPLE = {
    "servers": {"main": {"url": "${DATABASE_URL}"}},
    "roles": {
        "product_svc": {"server": "main", "login": True, "password": "${PRODUCT_DB_PASSWORD}"},
        "inventory_svc": {"server": "main", "login": True},
    },
    "databases": {
        "products": {"server": "main", "owner": "product_svc"},
        "inventory": {"server": "main", "owner": "inventory_svc"},
    },
    "services": {
        "product": {"database": "products", "migrations": "migrations/product"},
        "inventory": {"database": "inventory", "migrations": "migrations/inventory", "depends_on": ["product"]},
    },
}
EXAMPLE_ENV = {
    "DATABASE_URL": f"postgresql://admin:{URL_PASSWORD}@db.example.com:5432/postgres",
    "PRODUCT_DB_PASSWORD": ROLE_PASSWORD,
}
EXAMPLE_FILES = {
    "migrations/product/000001_init_schema.up.sql": (
        "CREATE TABLE products (\n    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n"
        "    sku text NOT NULL UNIQUE,\n    name text NOT NULL\n);\n"
    ),
    "migrations/product/000001_init_schema.down.sql": "DROP TABLE products;\n",
    "migrations/product/000002_add_prices.up.sql": (
        "CREATE TABLE prices (\n    product_id bigint NOT NULL REFERENCES products (id),\n"
        "    amount_cents integer NOT NULL CHECK (amount_cents >= 0),\n    currency char(3) NOT NULL DEFAULT 'EUR'\n);\n"
    ),
    "migrations/product/000002_add_prices.down.sql": "DROP TABLE prices;\n",
    "migrations/product/000003_product_search.up.sql": (
        "-- dbplan:no-transaction\nCREATE INDEX CONCURRENTLY products_name_idx ON products (lower(name));\n"
    ),
    "migrations/product/000003_product_search.down.sql": (
        "-- dbplan:no-transaction\nDROP INDEX CONCURRENTLY products_name_idx;\n"
    ),
    "migrations/inventory/000001_create_warehouses.up.sql": (
        "CREATE TABLE warehouses (\n    id integer PRIMARY KEY,\n    city text NOT NULL\n);\n"
    ),
    "migrations/inventory/000001_create_warehouses.down.sql": "DROP TABLE warehouses;\n",
    "migrations/inventory/000002_create_stock.up.sql": (
        "CREATE TABLE stock_levels (\n    warehouse_id integer NOT NULL REFERENCES warehouses (id),\n"
        "    sku text NOT NULL,\n    quantity integer NOT NULL DEFAULT 0,\n    PRIMARY KEY (warehouse_id, sku)\n);\n"
    ),
    "migrations/inventory/000002_create_stock.down.sql": "DROP TABLE stock_levels;\n",
}


def new_estate(root: Path) -> Case:
    """Nothing exists yet: roles, databases and every migration to create."""
    return build(root, "new_estate", EXAMPLE, EXAMPLE_FILES, lambda estate, sets: LiveState(
        servers=server_facts(estate),
        services={name: ServiceFacts(name, database_exists=False) for name in estate.services},
    ), EXAMPLE_ENV)


def partly_applied(root: Path) -> Case:
    """product is at 1 (dbplan history), inventory at 1 (adopted from golang-migrate)."""
    def live(estate: Estate, sets: dict[str, MigrationSet]) -> LiveState:
        adopted = ServiceFacts("inventory", database_exists=True, schema="public", table_exists=True, version=1)
        return LiveState(
            servers=everything_exists(estate),
            services={"product": applied_through(sets, "product", 1), "inventory": adopted},
        )

    return build(root, "partly_applied", EXAMPLE, EXAMPLE_FILES, live, EXAMPLE_ENV)


def drifted(root: Path) -> Case:
    """Everything applied, but product's version 2 was edited afterwards; one new migration."""
    files = {
        **EXAMPLE_FILES,
        "migrations/product/000004_add_discontinued.up.sql": "ALTER TABLE products ADD COLUMN discontinued boolean NOT NULL DEFAULT false;\n",
        "migrations/product/000004_add_discontinued.down.sql": "ALTER TABLE products DROP COLUMN discontinued;\n",
    }

    def live(estate: Estate, sets: dict[str, MigrationSet]) -> LiveState:
        old = hashlib.sha256(b"-- the text version 2 had when it was applied\n").hexdigest()
        return LiveState(
            servers=everything_exists(estate),
            services={
                "product": applied_through(sets, "product", 3, checksums={2: old}),
                "inventory": applied_through(sets, "inventory", 2),
            },
        )

    return build(root, "drifted", EXAMPLE, files, live, EXAMPLE_ENV)


def up_to_date(root: Path) -> Case:
    def live(estate: Estate, sets: dict[str, MigrationSet]) -> LiveState:
        return LiveState(
            servers=everything_exists(estate),
            services={"product": applied_through(sets, "product", 3), "inventory": applied_through(sets, "inventory", 2)},
        )

    return build(root, "up_to_date", EXAMPLE, EXAMPLE_FILES, live, EXAMPLE_ENV)


# ---------------------------------------------------------------------------
# One service at a time


def _single(service: str, **options: Any) -> dict[str, Any]:
    return {
        "servers": {"main": {"url": "postgresql://postgres@127.0.0.1:5432/postgres"}},
        "databases": {service: {"server": "main"}},
        "services": {service: {"database": service, "migrations": f"migrations/{service}", **options}},
    }


def dirty(root: Path) -> Case:
    """A no-transaction migration failed part-way: dirty at 2, an invalid index left behind."""
    files = {
        "migrations/orders/000001_orders.up.sql": "CREATE TABLE orders (id bigint PRIMARY KEY, customer text);\n",
        "migrations/orders/000001_orders.down.sql": "DROP TABLE orders;\n",
        "migrations/orders/000002_unique_customer.up.sql": (
            "-- dbplan:no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY orders_customer_idx ON orders (customer);\n"
        ),
        "migrations/orders/000002_unique_customer.down.sql": "-- dbplan:no-transaction\nDROP INDEX CONCURRENTLY orders_customer_idx;\n",
        "migrations/orders/000003_order_lines.up.sql": "CREATE TABLE order_lines (order_id bigint REFERENCES orders (id), sku text);\n",
        "migrations/orders/000003_order_lines.down.sql": "DROP TABLE order_lines;\n",
    }

    def live(estate: Estate, sets: dict[str, MigrationSet]) -> LiveState:
        facts = applied_through(sets, "orders", 2, dirty=True, invalid_indexes=("public.orders_customer_idx",))
        return LiveState(servers=everything_exists(estate), services={"orders": facts})

    return build(root, "dirty", _single("orders"), files, live)


def destructive(root: Path) -> Case:
    """Pending migrations that lose data or lock tables: the lint warnings."""
    files = {
        "migrations/billing/000001_invoices.up.sql": (
            "CREATE TABLE invoices (id bigint PRIMARY KEY, customer text, total numeric, legacy_code text);\n"
            "CREATE TABLE invoice_archive (id bigint PRIMARY KEY);\n"
        ),
        "migrations/billing/000001_invoices.down.sql": "DROP TABLE invoice_archive, invoices;\n",
        "migrations/billing/000002_cleanup.up.sql": (
            "-- Remove what the old billing system left behind.\n"
            "DROP TABLE invoice_archive;\n"
            "ALTER TABLE invoices DROP COLUMN legacy_code;\n"
            "DELETE FROM invoices;\n"
        ),
        "migrations/billing/000003_tighten.up.sql": (
            "ALTER TABLE invoices ALTER COLUMN total TYPE numeric(12, 2);\n"
            "ALTER TABLE invoices ALTER COLUMN customer SET NOT NULL;\n"
            "CREATE INDEX invoices_customer_idx ON invoices (customer);\n"
        ),
        "migrations/billing/000003_tighten.down.sql": "DROP INDEX invoices_customer_idx;\n",
    }

    def live(estate: Estate, sets: dict[str, MigrationSet]) -> LiveState:
        return LiveState(servers=everything_exists(estate), services={"billing": applied_through(sets, "billing", 1)})

    return build(root, "destructive", _single("billing"), files, live)


def reverted(root: Path) -> Case:
    """The service's target is below what is applied: two reverts, newest first."""
    files = {}
    for version, table in ((1, "accounts"), (2, "sessions"), (3, "audit_log")):
        files[f"migrations/auth/{version:06d}_create_{table}.up.sql"] = f"CREATE TABLE {table} (id bigint PRIMARY KEY);\n"
        files[f"migrations/auth/{version:06d}_create_{table}.down.sql"] = f"DROP TABLE {table};\n"

    def live(estate: Estate, sets: dict[str, MigrationSet]) -> LiveState:
        return LiveState(servers=everything_exists(estate), services={"auth": applied_through(sets, "auth", 3)})

    return build(root, "reverted", _single("auth", target=1), files, live)


def many_pending(root: Path, count: int = 200) -> Case:
    """``count`` pending migrations of ~1 KB each, and one long file: the size limits."""
    files: dict[str, str] = {}
    for version in range(1, count + 1):
        columns = ",\n".join(f"    column_{n:02d} text NOT NULL DEFAULT 'value {n}'" for n in range(1, 21))
        files[f"migrations/ledger/{version:06d}_ledger_step_{version}.up.sql"] = (
            f"-- Step {version} of the ledger rebuild.\nCREATE TABLE ledger_{version} (\n"
            f"    id bigint PRIMARY KEY,\n{columns}\n);\n"
        )
        files[f"migrations/ledger/{version:06d}_ledger_step_{version}.down.sql"] = f"DROP TABLE ledger_{version};\n"
    long_body = "".join(f"INSERT INTO countries VALUES ({n}, 'country number {n}');\n" for n in range(1, 601))
    files["migrations/reference/000001_countries.up.sql"] = (
        "CREATE TABLE countries (id integer PRIMARY KEY, name text NOT NULL);\n" + long_body
    )
    document = {
        "servers": {"main": {"url": "postgresql://postgres@127.0.0.1:5432/postgres"}},
        "databases": {"ledger": {"server": "main"}, "reference": {"server": "main"}},
        "services": {
            "reference": {"database": "reference", "migrations": "migrations/reference"},
            "ledger": {"database": "ledger", "migrations": "migrations/ledger", "depends_on": ["reference"]},
        },
    }

    def live(estate: Estate, sets: dict[str, MigrationSet]) -> LiveState:
        return LiveState(
            servers=everything_exists(estate),
            services={name: fresh(estate, name) for name in estate.services},
        )

    return build(root, "many_pending", document, files, live)


def many_services(root: Path, count: int = 300) -> Case:
    """One database and service per tenant, each with two pending migrations, one without a down file."""
    files: dict[str, str] = {}
    for n in range(count):
        files[f"migrations/tenant_{n}/000001_init.up.sql"] = f"CREATE TABLE tenant_{n} (id bigint PRIMARY KEY);\n"
        files[f"migrations/tenant_{n}/000001_init.down.sql"] = f"DROP TABLE tenant_{n};\n"
        files[f"migrations/tenant_{n}/000002_seed.up.sql"] = f"INSERT INTO tenant_{n} VALUES (1);\n"
    document = {
        "servers": {"main": {"url": "postgresql://postgres@127.0.0.1:5432/postgres"}},
        "databases": {f"tenant_{n}": {"server": "main"} for n in range(count)},
        "services": {f"tenant_{n}": {"database": f"tenant_{n}", "migrations": f"migrations/tenant_{n}"} for n in range(count)},
    }

    def live(estate: Estate, sets: dict[str, MigrationSet]) -> LiveState:
        return LiveState(
            servers=server_facts(estate),
            services={name: ServiceFacts(name, database_exists=False) for name in estate.services},
        )

    return build(root, "many_services", document, files, live)


# Names that would break Markdown, Mermaid or DOT if printed as they are.
AWKWARD = {
    "server": 'db "one" #1',
    "role": "owner <b>x</b> & co",
    "database": "données | prod`s",
    "service": 'svc "quoted" [x]',
    "other": "@everyone end;",
}


def awkward_names(root: Path) -> Case:
    names = AWKWARD
    document = {
        "servers": {names["server"]: {"url": "postgresql://postgres@127.0.0.1:5432/postgres"}},
        "roles": {names["role"]: {"server": names["server"]}},
        "databases": {names["database"]: {"server": names["server"], "owner": names["role"]}},
        "services": {
            names["service"]: {"database": names["database"], "migrations": "migrations/first"},
            names["other"]: {
                "database": names["database"],
                "migrations": "migrations/second",
                "table": "other_migrations",
                "depends_on": [names["service"]],
            },
        },
    }
    files = {
        "migrations/first/000001_a|b `c` <d>.up.sql": "SELECT '```' AS fence, '</details>' AS tag;\n",
        "migrations/second/000001_init.up.sql": "CREATE TABLE t (id int);\n",
    }

    def live(estate: Estate, sets: dict[str, MigrationSet]) -> LiveState:
        return LiveState(
            servers=server_facts(estate),
            services={name: ServiceFacts(name, database_exists=False) for name in estate.services},
        )

    return build(root, "awkward_names", document, files, live)


CASES: dict[str, Callable[[Path], Case]] = {
    "new_estate": new_estate,
    "partly_applied": partly_applied,
    "drifted": drifted,
    "up_to_date": up_to_date,
    "dirty": dirty,
    "destructive": destructive,
    "reverted": reverted,
    "many_pending": many_pending,
    "awkward_names": awkward_names,
}

"""Warnings that know the table (issue 14, item 3): the lock a statement takes, the live
table's rows and size read during the plan's inspection, a threshold in the plan file
that blocks a lock on a large table, and no warnings on tables the pending files create."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from estate import Estate

ORDERS = "CREATE TABLE orders (id int PRIMARY KEY, note varchar(20), total int);\n"
REWRITE = "ALTER TABLE orders ALTER COLUMN total TYPE bigint;\n"


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    return Estate(tmp_path, pg_url, dbname_prefix, capsys)


def with_large_orders(estate: Estate, rows: int = 50_000, **options: object) -> Estate:
    """An applied table orders with ``rows`` rows, analyzed (reltuples set), and a pending
    migration that rewrites it."""
    estate.add_app(**options)
    estate.write("app", "000001_orders.up.sql", ORDERS)
    estate.write("app", "000001_orders.down.sql", "DROP TABLE orders;\n")
    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output
    estate.execute("app", f"INSERT INTO orders SELECT g, 'n' || g, g FROM generate_series(1, {rows}) g; ANALYZE orders")
    estate.write("app", "000002_bigger_totals.up.sql", REWRITE)
    estate.write("app", "000002_bigger_totals.down.sql", "ALTER TABLE orders ALTER COLUMN total TYPE int;\n")
    return estate


def lock_warnings(estate: Estate) -> list[dict[str, object]]:
    run = estate.dbplan("plan", "--format", "json")
    assert run.code == 0, run.output
    return [w for w in json.loads(run.out)["warnings"] if w.get("lock")]


def column_type(estate: Estate, column: str) -> str:
    rows = estate.query("app", "SELECT data_type FROM information_schema.columns WHERE table_name = 'orders' AND column_name = %s", (column,))
    return str(rows[0][0])


def test_a_rewrite_warning_names_the_lock_and_the_live_size(estate: Estate) -> None:
    with_large_orders(estate)
    size = estate.query("app", "SELECT pg_total_relation_size('orders')")[0][0]
    run = estate.dbplan("plan")
    assert run.code == 0, run.output
    assert "takes ACCESS EXCLUSIVE on orders" in run.out
    # The size is the catalog's estimate (read without locking the table): close to the
    # true size, which also counts the free-space and visibility maps.
    shown = re.search(r"Live: public\.orders: ~50k rows, (\d+) kB\.", run.out)
    assert shown is not None, run.out
    assert abs(int(shown.group(1)) * 1024 - size) <= size * 0.05

    (warning,) = lock_warnings(estate)
    assert (warning["rule"], warning["lock"], warning["table"], warning["rows"]) == (
        "alter-column-type", "ACCESS EXCLUSIVE", "public.orders", 50_000,
    )  # fmt: skip
    assert abs(int(warning["bytes"]) - size) <= size * 0.05
    markdown = estate.dbplan("plan", "--format", "markdown")
    assert "public.orders: \\~50k rows" in markdown.out  # ~ escaped: GitHub shows ~50k


@pytest.mark.parametrize(("limit", "blocked"), [("1MB", True), ("10000 rows", True), ("100000 rows", False), ("1GB", False)])
def test_the_threshold_turns_a_lock_on_a_large_table_into_a_blocker(estate: Estate, limit: str, blocked: bool) -> None:
    with_large_orders(estate, lint={"block_on_tables_larger_than": limit})
    run = estate.dbplan("plan")
    assert run.code == (1 if blocked else 0), run.output
    apply = estate.dbplan("apply", "--yes")
    if blocked:
        assert "migrations/app/000002_bigger_totals.up.sql:1: ALTER TABLE orders ALTER COLUMN total TYPE bigint takes " in run.output
        assert f"larger than lint.block_on_tables_larger_than ({limit}) of service 'app'" in run.output
        assert "-- dbplan:allow alter-column-type" in run.output
        assert apply.code != 0 and column_type(estate, "total") == "integer"
    else:
        assert apply.code == 0 and column_type(estate, "total") == "bigint"


def test_an_allowed_rule_is_not_blocked_by_the_threshold(estate: Estate) -> None:
    with_large_orders(estate, lint={"block_on_tables_larger_than": "1MB"})
    estate.write("app", "000002_bigger_totals.up.sql", "-- dbplan:allow alter-column-type\n" + REWRITE)
    assert estate.dbplan("plan").code == 0


@pytest.mark.parametrize("value", ["10 MiB", "large", "-5MB", 10])
def test_a_bad_threshold_is_a_located_error(estate: Estate, value: object) -> None:
    estate.add_app(lint={"block_on_tables_larger_than": value})
    run = estate.dbplan("validate")
    assert run.code != 0
    line = next(i for i, text in enumerate(estate.plan_file.read_text().splitlines(), 1) if "block_on_tables_larger_than" in text)
    assert f"dbplan.yaml:{line}" in run.err
    assert "block_on_tables_larger_than" in run.err or "10MB" in run.err


def test_tables_that_pending_files_create_get_no_lock_warnings(estate: Estate) -> None:
    estate.add_app()
    estate.write("app", "000001_orders.up.sql", "CREATE TABLE IF NOT EXISTS orders (id int, note varchar(20));\n")
    estate.write("app", "000002_index.up.sql", "CREATE INDEX orders_note ON orders (note);\nALTER TABLE orders ADD COLUMN n int NOT NULL;\n")
    estate.write("app", "000003_copy.up.sql", "CREATE TABLE archive AS SELECT * FROM orders;\nALTER TABLE orders ALTER COLUMN id TYPE bigint;\n")
    estate.write("app", "000004_more.up.sql", "ALTER TABLE archive ADD PRIMARY KEY (id);\nCREATE INDEX ON archive (note);\n")
    assert lock_warnings(estate) == []


def test_if_not_exists_of_a_live_table_creates_nothing_new(estate: Estate) -> None:
    with_large_orders(estate)
    estate.write("app", "000002_bigger_totals.up.sql", "CREATE TABLE IF NOT EXISTS orders (id int);\nCREATE INDEX orders_total ON orders (total);\n")
    (warning,) = lock_warnings(estate)
    assert (warning["rule"], warning["lock"], warning["rows"]) == ("create-index-not-concurrently", "SHARE", 50_000)


@pytest.mark.parametrize(
    ("change", "warned"),
    [
        ("ALTER COLUMN note TYPE varchar(40)", False),
        ("ALTER COLUMN note TYPE text", False),
        ("ALTER COLUMN note TYPE varchar", False),
        ("ALTER COLUMN note TYPE varchar(10)", True),
        ("ALTER COLUMN total TYPE bigint", True),
        ("ALTER COLUMN total TYPE text", True),
    ],
)
def test_widening_a_varchar_is_not_a_rewrite(estate: Estate, change: str, warned: bool) -> None:
    with_large_orders(estate, rows=100)
    estate.write("app", "000002_bigger_totals.up.sql", f"ALTER TABLE orders {change};\n")
    assert [w["rule"] for w in lock_warnings(estate)] == (["alter-column-type"] if warned else [])


def test_plan_reads_the_size_of_a_table_another_session_holds_locked_without_waiting(estate: Estate) -> None:
    # A running migration (or anyone) holding ACCESS EXCLUSIVE on the table must not stall
    # the plan that only wants its size: the size comes from the catalog, not the table.
    from processes import TableGate, run_dbplan

    with_large_orders(estate)
    gate = TableGate(estate.url, estate.name("app"), "orders")
    try:
        run = run_dbplan(estate.plan_file, "plan", "--format", "json", timeout=30)
    finally:
        gate.open()
    assert run.code == 0, run.output
    (warning,) = [w for w in json.loads(run.out)["warnings"] if w.get("lock")]
    assert warning["table"] == "public.orders" and warning["rows"] == 50_000


def test_a_partitioned_table_counts_the_rows_and_size_of_its_partitions(estate: Estate) -> None:
    estate.add_app()
    estate.write("app", "000001_events.up.sql", (
        "CREATE TABLE events (id int, at date NOT NULL) PARTITION BY RANGE (at);\n"
        "CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');\n"
        "CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');\n"
    ))  # fmt: skip
    assert estate.dbplan("apply", "--yes").code == 0
    estate.execute("app", (
        "INSERT INTO events SELECT g, date '2024-01-01' + (g % 700) FROM generate_series(1, 30000) g;"
        " ANALYZE events_2024, events_2025"
    ))  # fmt: skip
    estate.write("app", "000002_rewrite.up.sql", "ALTER TABLE events ALTER COLUMN id TYPE bigint;\n")
    estate.write("app", "000002_rewrite.down.sql", "ALTER TABLE events ALTER COLUMN id TYPE int;\n")
    size = sum(
        estate.query("app", f"SELECT pg_total_relation_size('{name}')")[0][0] for name in ("events_2024", "events_2025")
    )
    (warning,) = lock_warnings(estate)
    assert (warning["table"], warning["rows"]) == ("public.events", 30_000)
    assert abs(int(warning["bytes"]) - size) <= size * 0.1


TABLE = '"Sales ""EU"""."Order"'


def test_a_table_whose_schema_and_name_need_quotes_gets_its_live_size(estate: Estate) -> None:
    # The catalog reads print names quoted where needed (regnamespace, quote_ident): the
    # warning names the table as SQL writes it, and the schema is matched as it is named.
    estate.add_app()
    estate.write("app", "000001_orders.up.sql", f'CREATE SCHEMA "Sales ""EU""";\nCREATE TABLE {TABLE} (id int PRIMARY KEY, total int);\n')
    assert estate.dbplan("apply", "--yes").code == 0
    estate.execute("app", f"INSERT INTO {TABLE} SELECT g, g FROM generate_series(1, 20000) g; ANALYZE {TABLE}")
    estate.write("app", "000002_bigger.up.sql", f"ALTER TABLE {TABLE} ALTER COLUMN total TYPE bigint;\n")
    size = estate.query("app", "SELECT pg_total_relation_size(%s::regclass)", (TABLE,))[0][0]
    (warning,) = lock_warnings(estate)
    assert (warning["table"], warning["rows"]) == (TABLE, 20_000)
    assert abs(int(warning["bytes"]) - size) <= size * 0.05


def test_a_statement_on_an_existing_index_is_sized_by_the_index_table(estate: Estate) -> None:
    """The size read first takes each name for a table of its own; a name that is an index
    is read again through pg_index, so the warning names its table and that table's size."""
    with_large_orders(estate)
    estate.execute("app", "CREATE INDEX orders_note ON orders (note); ANALYZE orders")
    estate.write("app", "000002_bigger_totals.up.sql", "DROP INDEX orders_note;\n")
    size = estate.query("app", "SELECT pg_total_relation_size('orders')")[0][0]
    run = estate.dbplan("plan")
    assert run.code == 0, run.output
    shown = re.search(r"Live: public\.orders: ~50k rows, (\d+) kB\.", run.out)
    assert shown is not None, run.out
    assert abs(int(shown.group(1)) * 1024 - size) <= size * 0.05, (shown.group(1), size)

"""Names from the plan file are always quoted, never pasted into SQL."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from estate import Estate

HOSTILE = 'x"; DROP DATABASE postgres; --'


def test_hostile_names_are_created_literally_and_postgres_survives(
    tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    role = estate.add_role(HOSTILE, password="it's a \"secret\"; --")
    database = estate.add_database(HOSTILE, owner=HOSTILE)
    estate.add_service("app", HOSTILE, schema="s'; DROP SCHEMA public; --", table='t"x')
    estate.write("app", "1_one.up.sql", "CREATE TABLE one (id int);")

    run = estate.dbplan("apply", "--yes")
    assert run.code == 0, run.output

    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("select 1 from pg_database where datname = 'postgres'").fetchone() == (1,)
        assert conn.execute("select 1 from pg_roles where rolname = %s", (role,)).fetchone() == (1,)
        owner = conn.execute(
            "select pg_get_userbyid(datdba) from pg_database where datname = %s", (database,)
        ).fetchone()
    assert owner == (role,)
    with psycopg.connect(pg_url, dbname=database, autocommit=True) as conn:
        tables = set(conn.execute("select schemaname, tablename from pg_tables where schemaname <> 'pg_catalog' and schemaname <> 'information_schema'").fetchall())
        assert ("s'; DROP SCHEMA public; --", 't"x') in tables
        assert ("s'; DROP SCHEMA public; --", 't"x_history') in tables
        assert conn.execute("select 1 from pg_namespace where nspname = 'public'").fetchone() == (1,)

    again = estate.dbplan("plan", "--detailed-exitcode")
    assert again.code == 0, again.output


SCHEMA_NAMES = ["plain", "Mixed Case", 'quote"inside', '"leading', 'trailing"', '""', "select", "dot.ted", "ünï", "a;b--"]


def test_the_catalog_reads_give_back_every_schema_name_as_it_was_created(
    tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The locate and the size reads take a schema's name as regnamespace prints it (quoted
    # where needed) and unquote it: every name must come back as PostgreSQL holds it.
    from psycopg import sql

    from orchestrator.live import facts

    estate = Estate(tmp_path, pg_url, dbname_prefix, capsys)
    estate.add_app()
    assert estate.dbplan("apply", "--yes").code == 0  # the database
    with psycopg.connect(pg_url, dbname=estate.name("app"), autocommit=True) as conn:
        for schema in SCHEMA_NAMES:
            conn.execute(sql.SQL("CREATE SCHEMA {}; CREATE TABLE {} (id int); CREATE INDEX orders_id ON {} (id)").format(
                sql.Identifier(schema), sql.Identifier(schema, "orders"), sql.Identifier(schema, "orders")
            ))  # fmt: skip
        located = {facts._unquoted(row[0]) for row in conn.execute(facts.TABLE_LOCATIONS, ("orders", "orders"))}
        sized = {stats.schema for stats in facts.read_table_stats(conn, ["orders"], None)}  # type: ignore[arg-type]
        # An index's name takes the other form of the size read, which finds its table.
        by_index = facts.read_table_stats(conn, ["orders_id"], None)  # type: ignore[arg-type]
        as_sql_writes_it = {  # quoted only where needed, as the plan names a table
            schema: conn.execute("SELECT pg_catalog.quote_ident(%s) || '.orders'", (schema,)).fetchone()[0]  # type: ignore[index]
            for schema in SCHEMA_NAMES
        }
    assert located == sized == {stats.schema for stats in by_index} == set(SCHEMA_NAMES)
    assert all(stats.is_index and stats.table == as_sql_writes_it[stats.schema] for stats in by_index), by_index

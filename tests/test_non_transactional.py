"""Which statements PostgreSQL refuses inside a transaction block: the parser's answer
(``Statement.non_transactional``, which blocks a plan) checked against the server's own.

Each statement runs inside a transaction on a real server: SQLSTATE 25001
(active_sql_transaction) is PostgreSQL saying no. Any other outcome (success, or another
error such as a host that cannot be reached) means it would have run in dbplan's
transaction. Option values come in every spelling the server accepts, since the planner
must read them as the server does (``connect = 'FALSE'``, ``WITH (create_slot = 0)``).
"""

from __future__ import annotations

import psycopg
import pytest

from orchestrator.migrations.sqlscript import parse_script

SETUP = """
CREATE TABLE t (a int);
CREATE INDEX i ON t (a);
CREATE TABLE pt (a int) PARTITION BY LIST (a);
CREATE TABLE p1 PARTITION OF pt FOR VALUES IN (1);
CREATE TYPE mood AS ENUM ('ok');
"""
# A conninfo that fails at once when the server does try to connect.
SUBSCRIPTION = "CREATE SUBSCRIPTION s CONNECTION 'host=127.0.0.1 port=1 connect_timeout=1' PUBLICATION p WITH "

STATEMENTS = [
    "CREATE INDEX CONCURRENTLY i2 ON t (a)",
    "CREATE INDEX i3 ON t (a)",
    "DROP INDEX CONCURRENTLY i",
    "DROP INDEX i",
    "REINDEX INDEX CONCURRENTLY i",
    "REINDEX (CONCURRENTLY) TABLE t",
    "REINDEX (CONCURRENTLY true) TABLE t",
    "REINDEX (CONCURRENTLY 1) TABLE t",
    "REINDEX (CONCURRENTLY 'on') TABLE t",
    "REINDEX (CONCURRENTLY 'FALSE') TABLE t",
    "REINDEX (CONCURRENTLY off) TABLE t",
    "REINDEX (CONCURRENTLY 0) TABLE t",
    "REINDEX TABLE t",
    "REINDEX SCHEMA public",
    "VACUUM",
    "VACUUM t",
    "VACUUM (ANALYZE) t",
    "ANALYZE t",
    "CLUSTER",
    "CLUSTER t USING i",
    "DISCARD ALL",
    "DISCARD TEMP",
    "DISCARD PLANS",
    "ALTER SYSTEM SET work_mem = '64MB'",
    "CREATE DATABASE dbplan_never_created",
    "DROP DATABASE IF EXISTS dbplan_never_created",
    "ALTER DATABASE dbplan_never_created SET TABLESPACE pg_default",
    "CREATE TABLESPACE ts LOCATION '/nonexistent/dbplan'",
    "DROP TABLESPACE IF EXISTS ts",
    "COMMIT PREPARED 'x'",
    "ROLLBACK PREPARED 'x'",
    "ALTER TABLE pt DETACH PARTITION p1 CONCURRENTLY",
    "ALTER TABLE pt DETACH PARTITION p1",
    "ALTER TYPE mood ADD VALUE 'meh'",
    SUBSCRIPTION + "(connect = false)",
    SUBSCRIPTION + "(connect = 'FALSE')",
    SUBSCRIPTION + "(connect = 0)",
    SUBSCRIPTION + "(connect = OFF)",
    SUBSCRIPTION + "(connect = 'Off')",
    SUBSCRIPTION + "(connect = true)",
    SUBSCRIPTION + "(connect = 'TRUE')",
    SUBSCRIPTION + "(connect = 1)",
    SUBSCRIPTION + "(connect)",
    SUBSCRIPTION + "(create_slot = false)",
    SUBSCRIPTION + "(create_slot = 0)",
    SUBSCRIPTION + "(create_slot = 'off')",
    SUBSCRIPTION + "(create_slot = true)",
    SUBSCRIPTION + "(create_slot = 1)",
    SUBSCRIPTION + "(enabled = false)",
]


@pytest.fixture
def database(pg_any_url: str, dbname_prefix: str) -> str:
    name = f"{dbname_prefix}_nontx"
    with psycopg.connect(pg_any_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    with psycopg.connect(pg_any_url, dbname=name, autocommit=True) as conn:
        conn.execute(SETUP)  # type: ignore[arg-type]
    return name


def _refused_in_a_transaction(url: str, database: str, sql: str) -> bool:
    with psycopg.connect(url, dbname=database) as conn:  # not autocommit: a transaction is open
        try:
            conn.execute(sql)  # type: ignore[arg-type]
        except psycopg.errors.ActiveSqlTransaction:
            return True
        except psycopg.Error:
            return False  # refused for another reason: inside a transaction it would have run
        finally:
            conn.rollback()
    return False


def test_the_parser_knows_what_the_server_refuses_in_a_transaction(pg_any_url: str, database: str) -> None:
    disagreements = []
    for sql in STATEMENTS:
        (statement,) = parse_script(sql).statements
        server = _refused_in_a_transaction(pg_any_url, database, sql)
        if (statement.non_transactional is not None) != server:
            disagreements.append(f"{sql}: parser {statement.non_transactional!r}, server refuses: {server}")
    assert disagreements == []

"""The head of a migration's transaction behind a pooler, where no session lock holds.

Each transaction takes the transaction-level advisory lock on the migrations table's key
and checks that the bookkeeping is still what the plan was made from; a failed guard
raises one of two SQLSTATEs of dbplan's own, so they never mean anything else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from psycopg import sql

if TYPE_CHECKING:
    from ..live.facts import ServiceFacts
    from .bookkeeping import Tables

GUARD_BUSY_SQLSTATE = "DP001"  # another session holds the lock: roll back and try again
GUARD_MOVED_SQLSTATE = "DP002"  # the bookkeeping changed since it was read: re-read, re-plan


def transaction_guard(key: int, tables: Tables, facts: ServiceFacts) -> sql.Composed:
    """The head of a transaction that must run alone and only on the state ``facts`` saw.

    It takes the transaction-level lock on ``key`` (the key of the session lock, so it
    excludes golang-migrate and directly connected dbplan runs too), raising
    GUARD_BUSY_SQLSTATE when another session holds it, then compares the bookkeeping with
    ``facts`` and raises GUARD_MOVED_SQLSTATE when another run moved it on. Every dbplan
    event appends a history row, so (version, dirty, number of history rows) changes with
    every write. A failed guard rolls the transaction back before anything ran.
    """
    def regclass(table: str) -> sql.Composed:
        return sql.SQL("to_regclass(quote_ident({}) || '.' || quote_ident({}))").format(
            sql.Literal(tables.schema), sql.Literal(table)
        )

    return sql.SQL(
        "DO $dbplan_guard$\n"
        "DECLARE found_version bigint; found_dirty boolean; found_rows bigint;\n"
        "BEGIN\n"
        "  IF NOT pg_try_advisory_xact_lock({key}) THEN\n"
        "    RAISE EXCEPTION 'dbplan: the lock is held by another session' USING ERRCODE = {busy};\n"
        "  END IF;\n"
        "  IF {migrations} IS NOT NULL THEN\n"
        "    SELECT version, dirty INTO found_version, found_dirty FROM {migrations_id} ORDER BY version DESC LIMIT 1;\n"
        "  END IF;\n"
        "  IF {history} IS NOT NULL THEN\n"
        "    SELECT count(*) INTO found_rows FROM {history_id};\n"
        "  END IF;\n"
        "  IF ROW({migrations} IS NOT NULL, {history} IS NOT NULL,\n"
        "         CASE WHEN found_version >= 0 THEN found_version END, coalesce(found_dirty, false), found_rows)\n"
        "     IS DISTINCT FROM ROW({table_exists}, {history_exists}, {version}::bigint, {dirty}, {rows}::bigint) THEN\n"
        "    RAISE EXCEPTION 'dbplan: the migrations moved on since they were read' USING ERRCODE = {moved};\n"
        "  END IF;\n"
        "END\n"
        "$dbplan_guard$;\n"
    ).format(
        key=sql.Literal(key),
        busy=sql.Literal(GUARD_BUSY_SQLSTATE),
        moved=sql.Literal(GUARD_MOVED_SQLSTATE),
        migrations=regclass(tables.migrations),
        history=regclass(tables.history),
        migrations_id=tables.migrations_id,
        history_id=tables.history_id,
        table_exists=sql.Literal(facts.table_exists),
        history_exists=sql.Literal(facts.history_exists),
        version=sql.Literal(facts.version),
        dirty=sql.Literal(facts.dirty),
        rows=sql.Literal(facts.history_count),
    )

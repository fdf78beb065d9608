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


# --------------------------------------------------------------------------- compare and swap
#
# The session advisory lock keeps a second run out only while this session holds it, and
# a migration may do anything a session can: DISCARD ALL, pg_advisory_unlock_all(), ... So
# every transaction that writes the bookkeeping first locks the migrations table and checks
# that it still holds the (version, dirty) the run planned from. SHARE ROW EXCLUSIVE
# conflicts with itself and with every writer of the table, not with readers (plan, status
# and golang-migrate's version read go on). A second run that got in therefore waits for
# the first one's transaction, then finds the version moved and re-plans: it can never
# apply a migration again.
#
# It also puts the session back as dbplan connected it: a migration's SET (search_path,
# check_function_bodies, standard_conforming_strings, SET ROLE, SET SESSION AUTHORIZATION)
# outlives its transaction, and the next migration would run under it, so where a table
# ends up would depend on how many runs applied the folder. RESET ALL spares role and
# session authorization, hence their own RESETs. The mark of the migration's start (a
# setting too, see ``bookkeeping.MARK_START``) is kept.
_EXPECT_BODY = (
    "  mark := current_setting('dbplan.migration_started', true);\n"
    "  RESET SESSION AUTHORIZATION;\n"
    "  RESET ROLE;\n"
    "  RESET ALL;\n"
    "  PERFORM set_config('dbplan.migration_started', coalesce(mark, ''), false);\n"
    "  LOCK TABLE {migrations_id} IN SHARE ROW EXCLUSIVE MODE;\n"
    "  SELECT CASE WHEN version >= 0 THEN version END, dirty INTO found_version, found_dirty\n"
    "    FROM {migrations_id} ORDER BY version DESC LIMIT 1;\n"
    "  IF ROW(found_version, coalesce(found_dirty, false)) IS DISTINCT FROM ROW(expected_version, expected_dirty) THEN\n"
    "    RAISE EXCEPTION 'dbplan: the migrations moved on since they were read' USING ERRCODE = {moved};\n"
    "  END IF;\n"
)


def expect_version(tables: Tables, version: int | None, *, dirty: bool = False) -> sql.Composed:
    """The head of a transaction that may write the bookkeeping only if it still reads
    (``version``, ``dirty``): raises GUARD_MOVED_SQLSTATE otherwise (see ``_EXPECT_BODY``).

    A DO block, parsed and compiled each time: where it runs once per migration in a batch,
    ``ExpectFunction`` does the same for a fraction of the server's work.
    """
    return sql.SQL(
        "DO $dbplan_expect$\n"
        "DECLARE expected_version bigint := {version}; expected_dirty boolean := {dirty};\n"
        "  found_version bigint; found_dirty boolean; mark text;\n"
        "BEGIN\n" + _EXPECT_BODY + "END\n$dbplan_expect$;\n"
    ).format(
        version=sql.Literal(version),
        dirty=sql.Literal(dirty),
        migrations_id=tables.migrations_id,
        moved=sql.Literal(GUARD_MOVED_SQLSTATE),
    )


class ExpectFunction:
    """``expect_version`` as a function of the session (in ``pg_temp``, so no other session
    sees it and nothing is left in the database), created once per run of steps: PL/pgSQL
    compiles it once, and each call costs the server a few statements' worth."""

    def __init__(self, name: str) -> None:
        self.name = name  # unique to the run that created it

    def create(self, tables: Tables) -> sql.Composed:
        return sql.SQL(
            "CREATE FUNCTION pg_temp.{name}(expected_version bigint, expected_dirty boolean) RETURNS void\n"
            "LANGUAGE plpgsql AS $dbplan_expect$\n"
            "DECLARE found_version bigint; found_dirty boolean; mark text;\n"
            "BEGIN\n" + _EXPECT_BODY + "END\n$dbplan_expect$;\n"
        ).format(
            name=sql.Identifier(self.name),
            migrations_id=tables.migrations_id,
            moved=sql.Literal(GUARD_MOVED_SQLSTATE),
        )

    def call(self, version: int | None) -> sql.Composed:
        return sql.Composed(
            [sql.SQL("SELECT pg_temp."), sql.Identifier(self.name), sql.SQL("("), sql.Literal(version),
             sql.SQL("::bigint, false);\n")]
        )  # fmt: skip

    def drop(self) -> sql.Composed:
        return sql.SQL("DROP FUNCTION IF EXISTS pg_temp.{}(bigint, boolean);\n").format(sql.Identifier(self.name))

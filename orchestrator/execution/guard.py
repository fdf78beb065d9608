"""The head of a migration's transaction behind a pooler, where no session lock holds.

Each transaction takes the transaction-level advisory lock on the migrations table's key
and checks that the bookkeeping is still what the plan was made from; a failed guard
raises one of two SQLSTATEs of dbplan's own, so they never mean anything else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from psycopg import sql

from .bookkeeping import MARK

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

    # The block's own search_path is pg_catalog's alone (put back at its end, for the
    # migration): it starts in the database's, where a migration may have put a schema of
    # its own first, with functions and operators of its own (see ``_CHECK`` below). The two
    # statements that save and set it name their functions with their schema.
    return sql.SQL(
        "DO $dbplan_guard$\n"
        "DECLARE found_version bigint; found_dirty boolean; found_rows bigint; path pg_catalog.text;\n"
        "BEGIN\n"
        "  path := pg_catalog.current_setting('search_path');\n"
        "  PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);\n"
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
        "  PERFORM pg_catalog.set_config('search_path', path, true);\n"
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
# session authorization, hence their own RESETs. It also clears the mark of a migration's
# start (``bookkeeping.MARK_START``), which therefore comes after the check.
#
# Plain statements, not PL/pgSQL: a DO block cost a fresh session a millisecond of the
# server's time (loading and compiling PL/pgSQL), a function of the session a pg_temp
# schema; a fleet pays that once per database. Plain SQL cannot raise an error of its own,
# so a bookkeeping that moved on fails a cast of MOVED_MARKER, which no other statement
# produces (``guard_refusal`` recognises it by the marker, whatever the server's language).
MOVED_MARKER = "dbplan-guard: the migrations moved on since they were read, found version "
EXPECT_STATEMENTS = 5  # the statements of an expect head, for an error's statement count

# The check itself, which also marks the start of the migration (``bookkeeping.MARK_START``,
# cleared by the RESET ALL before it). A negative version is golang-migrate's "none", as no
# row is; greatest() skips the NULL of no row. The message's cast depends on the row read,
# so the planner cannot fold it.
# Its operators are named with their schema (OPERATOR(pg_catalog.=)): the check runs after
# RESET ALL, in the search_path a migration may have set for the database, and an = or a
# || of its own placed before pg_catalog could make every version match. Both sides of
# the || are text, which spares a fresh session weighing every || there is.
_CHECK = (
    "SELECT CASE WHEN greatest(m.found, -1) OPERATOR(pg_catalog.=) {version}\n"
    "  AND coalesce(m.dirty, false) OPERATOR(pg_catalog.=) {dirty} THEN NULL\n"
    "  ELSE ({moved} OPERATOR(pg_catalog.||) greatest(m.found, -1)::pg_catalog.text)::pg_catalog.int4 END AS dbplan_expect, "
    + MARK + "\n"
    "FROM (SELECT) AS one LEFT JOIN LATERAL\n"
    "  (SELECT version AS found, dirty FROM {migrations_id} ORDER BY version DESC LIMIT 1) AS m ON true"
)
_RESET_AND_LOCK = "RESET SESSION AUTHORIZATION; RESET ROLE; RESET ALL; LOCK TABLE {migrations_id} IN SHARE ROW EXCLUSIVE MODE;\n"


def expect_version(tables: Tables, version: int | None, *, dirty: bool = False) -> sql.Composed:
    """The head of a transaction that may write the bookkeeping only if it still reads
    (``version``, ``dirty``), failing with MOVED_MARKER in its message otherwise; it marks
    the start of what follows it."""
    return sql.SQL(_RESET_AND_LOCK + _CHECK + ";\n").format(
        migrations_id=tables.migrations_id,
        version=sql.Literal(-1 if version is None else version),
        dirty=sql.Literal(dirty),
        moved=sql.Literal(MOVED_MARKER),
    )


class ExpectStatement:
    """``expect_version`` with its check prepared in the session, once per run of steps: a
    batch's heads stay short, so that ``pg_stat_activity`` (the first kilobyte of a query
    at the default ``track_activity_query_size``) shows the migrations, not the checks, and
    the server plans the check once."""

    def __init__(self, name: str) -> None:
        self.name = name  # unique to the run that prepared it

    def prepare(self, tables: Tables) -> sql.Composed:
        return sql.SQL("PREPARE {name} (bigint, boolean) AS\n" + _CHECK + ";\n").format(
            name=sql.Identifier(self.name),
            migrations_id=tables.migrations_id,
            version=sql.SQL("$1"),
            dirty=sql.SQL("$2"),
            moved=sql.Literal(MOVED_MARKER),
        )

    def call(self, tables: Tables, version: int | None) -> sql.Composed:
        return sql.SQL(_RESET_AND_LOCK + "EXECUTE {name}({version}, false);\n").format(
            migrations_id=tables.migrations_id,
            name=sql.Identifier(self.name),
            version=sql.Literal(-1 if version is None else version),
        )

    def deallocate(self) -> sql.Composed:
        return sql.SQL("DEALLOCATE {};\n").format(sql.Identifier(self.name))


def guard_refusal(err: BaseException) -> str | None:
    """GUARD_BUSY_SQLSTATE or GUARD_MOVED_SQLSTATE when ``err`` is a guard's refusal (the
    pooler's guard raises them; ``expect_version`` fails a cast of MOVED_MARKER); else None."""
    diag = getattr(err, "diag", None)
    if diag is None:
        return None
    if diag.sqlstate in (GUARD_BUSY_SQLSTATE, GUARD_MOVED_SQLSTATE):
        return str(diag.sqlstate)
    if diag.sqlstate == INVALID_TEXT_REPRESENTATION and MOVED_MARKER in (diag.message_primary or ""):
        return GUARD_MOVED_SQLSTATE
    return None


INVALID_TEXT_REPRESENTATION = "22P02"

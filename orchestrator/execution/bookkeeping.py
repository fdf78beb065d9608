"""The SQL of dbplan's bookkeeping: golang-migrate's ``schema_migrations`` and the history.

Only SQL text is built here; the executor decides when it runs. Identifiers go through
``sql.Identifier`` and values through ``sql.Literal``, because the statements travel in
one multi-statement string together with a migration, which takes no bound parameters.
"""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass
from functools import cache

from psycopg import sql


@dataclass(frozen=True)
class Tables:
    schema: str
    migrations: str
    history: str

    @property
    def migrations_id(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.migrations)

    @property
    def history_id(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.history)


def create_tables(tables: Tables, *, create_schema: bool) -> sql.Composed:
    """Create what is missing; golang-migrate's table keeps golang-migrate's exact shape.

    The schema is created only when the plan file names one: CREATE SCHEMA checks the
    CREATE privilege on the database even when the schema exists. Types and functions are
    named with their schema: a migration of another service may have put a schema of its
    own first in the database's search_path (see ``live/facts.py``).
    """
    schema = sql.SQL("CREATE SCHEMA IF NOT EXISTS {};\n").format(sql.Identifier(tables.schema))
    return (schema if create_schema else sql.SQL("")) + sql.SQL(
        "CREATE TABLE IF NOT EXISTS {migrations} (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL);\n"
        "CREATE TABLE IF NOT EXISTS {history} (\n"
        "  id bigserial PRIMARY KEY,\n"
        "  version bigint NOT NULL,\n"
        "  title pg_catalog.text,\n"
        "  checksum pg_catalog.text,\n"
        "  event pg_catalog.text NOT NULL,\n"
        "  applied_at pg_catalog.timestamptz NOT NULL DEFAULT pg_catalog.now(),\n"
        "  duration_ms integer,\n"
        "  applied_by pg_catalog.text,\n"
        "  reason pg_catalog.text\n"
        ");\n"
    ).format(migrations=tables.migrations_id, history=tables.history_id)


def set_version(tables: Tables, version: int | None, dirty: bool) -> sql.Composed:
    """Make ``schema_migrations`` hold exactly one row: (version, dirty), or none.

    Written the way golang-migrate writes it, emptied then one row inserted, so that a
    project's own trigger on the table (an AFTER INSERT that keeps a log of versions, say)
    sees one INSERT per version under both tools. DELETE rather than golang-migrate's
    TRUNCATE: TRUNCATE takes an ACCESS EXCLUSIVE lock that would stop every reader of the
    table (plan, status) for the migration's whole transaction. The columns are named, so
    a project's migration may add a column of its own (with a default).
    """
    delete = sql.Composed([_DELETE_FROM, tables.migrations_id, _END])
    if version is None:
        return delete
    return delete + sql.Composed(
        [_INSERT_INTO, tables.migrations_id, _VERSION_DIRTY_VALUES, sql.Literal(version), _COMMA, sql.Literal(dirty),
         _CLOSE_END]
    )  # fmt: skip


_DELETE_FROM = sql.SQL("DELETE FROM ")
_END = sql.SQL(";\n")
_INSERT_INTO = sql.SQL("INSERT INTO ")
_VERSION_DIRTY_VALUES = sql.SQL(" (version, dirty) VALUES (")
_COMMA = sql.SQL(", ")
_CLOSE_END = sql.SQL(");\n")
_HISTORY_COLUMNS = sql.SQL(" (version, title, checksum, event, duration_ms, applied_by, reason) VALUES (")


def record_event(
    tables: Tables,
    *,
    version: int,
    title: str | None,
    checksum: str | None,
    event: str,
    duration_ms: int | None,
    reason: str | None = None,
) -> sql.Composed:
    """Append one history row (``duration_ms`` None: nothing ran, a person's word was recorded)."""
    values = sql.SQL(", ").join(
        [
            sql.Literal(version),
            sql.Literal(title),
            sql.Literal(checksum),
            sql.Literal(event),
            sql.Literal(duration_ms),
            sql.Literal(applied_by()),
            sql.Literal(reason),
        ]
    )
    return sql.Composed([_INSERT_INTO, tables.history_id, _HISTORY_COLUMNS, values, _CLOSE_END])


# A migration's own start and run time, measured by the server. Not now(): that is the
# time the query arrived, shared by every transaction of a batch. The start is a setting
# of the transaction (a setting is the cheapest thing a transaction can write): MARK_START,
# a statement of the migration's own after its guard, marks it.
# date_part, not extract: extract computes in numeric, which costs the server more.
# Every argument and operand has its exact type ('epoch'::text, 1000::float8): a fresh
# session (a fleet's) resolves an untyped one by weighing every candidate function or
# operator of that name, 0.4 ms of server time per database for the guard and the times.
MARK = (
    "pg_catalog.set_config('dbplan.migration_started', "
    "pg_catalog.date_part('epoch'::pg_catalog.text, pg_catalog.clock_timestamp())::pg_catalog.text, true)"
)
MARK_START = "SELECT " + MARK + ";\n"  # where no guard's check marks it (``guard.expect_version``)
# The file may RESET ALL: then the mark is gone, and the query's arrival has to do.
# Functions named with their schema, as in the guard: these run in the migration's
# search_path, and so are the operators. (NULLIF looks its = up there: a migration that
# shadows it can only make its own times wrong.)
_STARTED = (
    "coalesce(nullif(pg_catalog.current_setting('dbplan.migration_started', true), ''::pg_catalog.text)"
    "::pg_catalog.float8, pg_catalog.date_part('epoch'::pg_catalog.text, pg_catalog.now()))"
)
DONE_MARKER = "dbplan_migration_done_ms"
_DONE_COLUMNS = sql.SQL(" (version, title, checksum, event, applied_at, duration_ms, applied_by) VALUES (")
_DONE_TIMES = sql.SQL(
    f"pg_catalog.to_timestamp({_STARTED}), "
    f"((pg_catalog.date_part('epoch'::pg_catalog.text, pg_catalog.clock_timestamp()) OPERATOR(pg_catalog.-) "
    f"{_STARTED}) OPERATOR(pg_catalog.*) 1000::pg_catalog.float8)::pg_catalog.int4"
)
_RETURNING_DONE = sql.SQL(f") RETURNING duration_ms AS {DONE_MARKER};\n")


def record_migration(
    tables: Tables, *, version: int, title: str | None, checksum: str, event: str, version_after: int | None
) -> sql.Composed:
    """The bookkeeping of a migration, in its own transaction after it ran: its history
    row, timed from ``MARK_START`` at the head of the transaction, and ``schema_migrations``
    moved to ``version_after`` (``set_version``).

    The INSERT returns the duration in a column named ``DONE_MARKER``: the sign, in a
    stream of results, that the migration before it ran to its end. (Two plain statements:
    one statement with data-modifying CTEs for all of it took the server twice as long.)
    """
    history = [
        _INSERT_INTO, tables.history_id, _DONE_COLUMNS,
        sql.Literal(version), _COMMA, sql.Literal(title), _COMMA, sql.Literal(checksum), _COMMA,
        sql.Literal(event), _COMMA, _DONE_TIMES, _COMMA, sql.Literal(applied_by()), _RETURNING_DONE,
    ]  # fmt: skip
    return sql.Composed(history) + set_version(tables, version_after, False)


@dataclass(frozen=True)
class PreparedBookkeeping:
    """``record_migration`` as one prepared statement of a session.

    Prepared, the server parses and plans it once per run rather than once per migration,
    which halves what the bookkeeping costs it; and once planned, one statement with
    data-modifying CTEs costs it less than two (measured with cachegrind, bench/README.md).
    """

    name: str  # unique to the run that prepared it

    def prepare(self, tables: Tables) -> sql.Composed:
        """The statement; ``schema_migrations`` is written as ``set_version`` writes it.
        Both of its data-modifying CTEs see the table as it was, so the version inserted
        must differ from the one deleted (else a duplicate key): the caller runs
        ``record_migration`` instead for a migration that leaves the version as it was."""
        table = tables.migrations_id
        return sql.Composed([
            sql.SQL("PREPARE "), sql.Identifier(self.name),
            sql.SQL(" (bigint, text, text, text, text, bigint) AS\nWITH emptied AS (DELETE FROM "), table,
            sql.SQL(" RETURNING 1),\n  inserted AS (INSERT INTO "), table, _VERSION_DIRTY_VALUES,
            sql.SQL("$6, false))\n"),
            _INSERT_INTO, tables.history_id, _DONE_COLUMNS, sql.SQL("$1, $2, $3, $4, "), _DONE_TIMES,
            sql.SQL(", $5"), _RETURNING_DONE,
        ])  # fmt: skip

    def execute(self, *, version: int, title: str | None, checksum: str, event: str, version_after: int) -> sql.Composed:
        arguments = [version, title, checksum, event, applied_by(), version_after]
        return sql.Composed(
            [_EXECUTE, sql.Identifier(self.name), _OPEN, sql.SQL(", ").join(map(sql.Literal, arguments)), _CLOSE_END]
        )

    def deallocate(self) -> sql.Composed:
        return sql.Composed([sql.SQL("DEALLOCATE "), sql.Identifier(self.name), _END])


_EXECUTE = sql.SQL("EXECUTE ")
_OPEN = sql.SQL(" (")


@cache
def applied_by() -> str:
    """Who ran dbplan, for the history: the OS user and host, not the database role."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"

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
    CREATE privilege on the database even when the schema exists.
    """
    schema = sql.SQL("CREATE SCHEMA IF NOT EXISTS {};\n").format(sql.Identifier(tables.schema))
    return (schema if create_schema else sql.SQL("")) + sql.SQL(
        "CREATE TABLE IF NOT EXISTS {migrations} (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL);\n"
        "CREATE TABLE IF NOT EXISTS {history} (\n"
        "  id bigserial PRIMARY KEY,\n"
        "  version bigint NOT NULL,\n"
        "  title text,\n"
        "  checksum text,\n"
        "  event text NOT NULL,\n"
        "  applied_at timestamptz NOT NULL DEFAULT now(),\n"
        "  duration_ms integer,\n"
        "  applied_by text,\n"
        "  reason text\n"
        ");\n"
    ).format(migrations=tables.migrations_id, history=tables.history_id)


def set_version(tables: Tables, version: int | None, dirty: bool) -> sql.Composed:
    """Make ``schema_migrations`` hold exactly one row: (version, dirty), or none.

    UPDATE, else INSERT (one statement), rather than golang-migrate's TRUNCATE-then-INSERT,
    so that a project's own migration may add a column to the table (with a default)
    without breaking the bookkeeping of every later migration.
    """
    if version is None:
        return sql.Composed([_DELETE_FROM, tables.migrations_id, _END])
    return _move_version(tables, sql.Literal(version), sql.Literal(dirty))


def _move_version(tables: Tables, version: sql.Composable, dirty: sql.Composable) -> sql.Composed:
    # Built by joining pieces, not SQL.format: this runs once per migration, and parsing a
    # format string each time cost more than the statement takes on the server.
    table = tables.migrations_id
    return sql.Composed(
        [_WITH_MOVED, table, _SET_VERSION, version, _SET_DIRTY, dirty, _MOVED_INSERT,
         table, _VERSION_DIRTY_SELECT, version, _COMMA, dirty, _UNLESS_MOVED]
    )  # fmt: skip


_DELETE_FROM = sql.SQL("DELETE FROM ")
_SET_VERSION = sql.SQL(" SET version = ")
_SET_DIRTY = sql.SQL(", dirty = ")
_END = sql.SQL(";\n")
_INSERT_INTO = sql.SQL("INSERT INTO ")
_VERSION_DIRTY_SELECT = sql.SQL(" (version, dirty) SELECT ")
_COMMA = sql.SQL(", ")
_CLOSE_END = sql.SQL(");\n")
_WITH_MOVED = sql.SQL("WITH moved AS (UPDATE ")
_MOVED_INSERT = sql.SQL(" RETURNING 1)\nINSERT INTO ")
_UNLESS_MOVED = sql.SQL(" WHERE NOT EXISTS (SELECT FROM moved);\n")
_HISTORY_COLUMNS = sql.SQL(" (version, title, checksum, event, duration_ms, applied_by, reason) VALUES (")


def record_event(
    tables: Tables,
    *,
    version: int,
    title: str | None,
    checksum: str | None,
    event: str,
    duration_ms: int,
    reason: str | None = None,
) -> sql.Composed:
    """Append one history row."""
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
# time the query arrived, shared by every transaction of a batch. START_MARK is a
# set_config call for the SELECT at the head of the migration's transaction.
START_MARK = "set_config('dbplan.migration_started', extract(epoch FROM clock_timestamp())::text, true)"
# The file may RESET ALL: then the mark is gone, and the query's arrival has to do.
_STARTED = "coalesce(nullif(current_setting('dbplan.migration_started', true), '')::float8, extract(epoch FROM now()))"
DONE_MARKER = "dbplan_migration_done_ms"
_DONE_COLUMNS = sql.SQL(" (version, title, checksum, event, applied_at, duration_ms, applied_by) VALUES (")
_DONE_TIMES = sql.SQL(
    f"to_timestamp({_STARTED}), ((extract(epoch FROM clock_timestamp()) - {_STARTED}) * 1000)::integer"
)
_RETURNING_DONE = sql.SQL(f") RETURNING duration_ms AS {DONE_MARKER};\n")


def record_migration(
    tables: Tables, *, version: int, title: str | None, checksum: str, event: str, version_after: int | None
) -> sql.Composed:
    """The bookkeeping of a migration, in its own transaction after it ran: its history
    row, timed from ``START_MARK`` at the head of the transaction, and ``schema_migrations``
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
    """``record_migration`` as two prepared statements of a session: the server parses and
    plans them once, not once per migration (that halves what the bookkeeping costs it)."""

    record: str  # statement names, unique to the run that prepared them
    move: str

    def prepare(self, tables: Tables) -> sql.Composed:
        history = sql.Composed([
            _INSERT_INTO, tables.history_id, _DONE_COLUMNS,
            sql.SQL("$1, $2, $3, $4, "), _DONE_TIMES, sql.SQL(", $5"), _RETURNING_DONE,
        ])  # fmt: skip
        return (
            sql.SQL("PREPARE {} (bigint, text, text, text, text) AS ").format(sql.Identifier(self.record))
            + history
            + sql.SQL("PREPARE {} (bigint) AS ").format(sql.Identifier(self.move))
            + _move_version(tables, sql.SQL("$1"), sql.SQL("false"))
        )

    def execute(self, *, version: int, title: str | None, checksum: str, event: str, version_after: int) -> sql.Composed:
        arguments = sql.SQL(", ").join(
            [sql.Literal(version), sql.Literal(title), sql.Literal(checksum), sql.Literal(event), sql.Literal(applied_by())]
        )
        return sql.SQL("EXECUTE {} ({});\nEXECUTE {} ({});\n").format(
            sql.Identifier(self.record), arguments, sql.Identifier(self.move), sql.Literal(version_after)
        )

    def deallocate(self) -> sql.Composed:
        return sql.SQL("DEALLOCATE {}; DEALLOCATE {};").format(sql.Identifier(self.record), sql.Identifier(self.move))


@cache
def applied_by() -> str:
    """Who ran dbplan, for the history: the OS user and host, not the database role."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"

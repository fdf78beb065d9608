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

    UPDATE-then-INSERT rather than golang-migrate's TRUNCATE-then-INSERT, so that a
    project's own migration may add a column to the table (with a default) without
    breaking the bookkeeping of every later migration.
    """
    if version is None:
        return sql.SQL("DELETE FROM {table};\n").format(table=tables.migrations_id)
    return sql.SQL(
        "UPDATE {table} SET version = {version}, dirty = {dirty};\n"
        "INSERT INTO {table} (version, dirty) SELECT {version}, {dirty} WHERE NOT EXISTS (SELECT FROM {table});\n"
    ).format(table=tables.migrations_id, version=sql.Literal(version), dirty=sql.Literal(dirty))


def record_event(
    tables: Tables,
    *,
    version: int,
    title: str | None,
    checksum: str | None,
    event: str,
    reason: str | None = None,
    duration_ms: int | None = None,
) -> sql.Composed:
    """Append one history row. Without ``duration_ms`` it is measured by the server:
    the time since the transaction began, which is the migration's own run time when the
    row travels in the migration's transaction."""
    duration = (
        sql.Literal(duration_ms)
        if duration_ms is not None
        else sql.SQL("(extract(epoch FROM clock_timestamp() - now()) * 1000)::integer")
    )
    return sql.SQL(
        "INSERT INTO {history} (version, title, checksum, event, duration_ms, applied_by, reason) "
        "VALUES ({version}, {title}, {checksum}, {event}, {duration}, {by}, {reason});\n"
    ).format(
        history=tables.history_id,
        version=sql.Literal(version),
        title=sql.Literal(title),
        checksum=sql.Literal(checksum),
        event=sql.Literal(event),
        duration=duration,
        by=sql.Literal(applied_by()),
        reason=sql.Literal(reason),
    )


@cache
def applied_by() -> str:
    """Who ran dbplan, for the history: the OS user and host, not the database role."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"

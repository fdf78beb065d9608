"""dbplan's error hierarchy.

Every failure a user can cause or meet surfaces as a ``DbplanError`` with a message that
says what happened, where, and what to do next. Library errors (jsonschema, psycopg,
networkx, pglast) are caught at the stage that called the library and re-raised as one of
these with ``raise ... from err``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Place:
    """Where in an input file something is: file, 1-based line and column, document path."""

    file: str | None = None
    line: int | None = None
    column: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        location = self.file or ""
        if self.line is not None:
            location += f":{self.line}"
            if self.column is not None:
                location += f":{self.column}"
        if self.path:
            location = f"{location} ({self.path})" if location else self.path
        return location


class DbplanError(Exception):
    """Base of every error dbplan reports to a user.

    ``message`` is the whole sentence a user reads; the keyword fields are structured
    context for programs (JSON output, tests) and are never needed to understand it.
    """

    def __init__(
        self,
        message: str,
        *,
        place: Place | None = None,
        hint: str | None = None,
        server: str | None = None,
        service: str | None = None,
        version: int | None = None,
    ) -> None:
        self.message = message
        self.place = place
        self.hint = hint
        self.server = server
        self.service = service
        self.version = version
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.place}: {self.message}" if self.place and str(self.place) else self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class ConfigError(DbplanError):
    """The plan file is missing, malformed, or refers to things that do not exist."""


class UnsetVariable(ConfigError):
    """A ``${VAR}`` without a default whose variable is not set."""


class MigrationFileError(DbplanError):
    """A migration folder or file cannot be used as it is."""


class GraphError(ConfigError):
    """Dependencies between services, databases, roles and servers do not form a DAG."""


class ConnectionFailed(DbplanError):
    """A server could not be reached. The message names the server, never its password."""


class PlanBlocked(DbplanError):
    """The plan cannot be executed as it is (dirty service, out-of-order file, ...)."""


class PlanChanged(DbplanError):
    """The live state changed between showing a plan and executing it."""


class LockTimeout(DbplanError):
    """Another process held a lock for longer than dbplan was allowed to wait."""


class MigrationFailed(DbplanError):
    """A migration failed while being applied or reverted."""

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        pg_message: str | None = None,
        line: int | None = None,
        location: str | None = None,
        **kwargs: object,
    ) -> None:
        self.sqlstate = sqlstate
        self.pg_message = pg_message
        self.line = line  # of the file, where PostgreSQL refused it (None: not known)
        self.location = location  # file:line of the failing statement, when known
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class EmbeddedServerError(DbplanError):
    """The embedded PostgreSQL server could not be found, initialised, started or stopped."""



def signal_number_behind(err: BaseException | None) -> int | None:
    """The signal that stopped dbplan, if ``err`` is (or was caused by) the stop that
    ``__main__``'s handlers raise for SIGINT and SIGTERM outside apply's own handling.
    Python wraps what a handler raises in some places (a RuntimeError from
    ``__set_name__`` while a class is made, for one), so the chain is followed."""
    for _ in range(20):
        if err is None:
            return None
        number = getattr(err, "signal_number", None)
        if isinstance(number, int):
            return number
        err = err.__cause__ or err.__context__
    return None

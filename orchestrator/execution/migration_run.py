"""Running a migration: the executor's hands, and the words it uses when one fails.

A no-transaction migration runs here statement by statement with golang-migrate's dirty
flag around it; transactional ones run in ``batches``, which shares this module's
pieces: the ``Target`` a run writes to, the stop requests the executor hands in
(``RunControl``), and ``migration_failure``, which turns an error into a message that
names the file, the line and what to do next. The executor decides what runs.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

from ..errors import DbplanError, MigrationFailed
from ..estate.model import Server, Service
from ..live.connection import connection_lost, read_as_parser
from ..migrations.scan import Migration, MigrationFile
from ..migrations.sqlscript import Script, Statement, line_of_offset, printable
from ..planning.plan import ApplyRepeatable, MigrationAction, RevertMigration
from . import bookkeeping
from .guard import GUARD_BUSY_SQLSTATE, expect_version, guard_refusal

if TYPE_CHECKING:
    import psycopg

    from ..live.locks import LockWait
    from .progress import Cancellation

LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout ran out
QUERY_CANCELED = "57014"  # a cancel request, or statement_timeout

# Crash tests only (tests/test_crash.py): see checkpoint.
KILL_AT_ENV = "DBPLAN_TEST_KILL_AT"


class RunControl(Protocol):
    """What running a migration needs from the run: stop requests, and a place to say things."""

    @property
    def cancellation(self) -> Cancellation: ...
    def check_stop(self, where: str) -> None: ...
    def interrupted(self, what: str, *, hint: str | None = None, **context: object) -> DbplanError: ...
    def notice(self, message: str) -> None: ...


@dataclass(frozen=True)
class Target:
    """One service's migrations table, and the connection that writes to it."""

    conn: psycopg.Connection
    service: Service
    server: Server
    owner: str | None
    tables: bookkeeping.Tables
    lock: LockWait | None = None  # the session lock the run holds (None behind a pooler)

    @cached_property
    def transaction_settings(self) -> str:
        """What follows a migration's BEGIN: the service's timeouts and role, for this
        transaction only. SET LOCAL, not set_config(..., true) in a SELECT: counted with
        cachegrind, a SET LOCAL costs the server 18K instructions, SELECT 1 28K and a SELECT
        of set_config 50K. Composed once per service; the mark of the migration's start
        follows it (``bookkeeping.MARK_START``)."""
        from psycopg import sql

        return sql.Composed(
            [sql.SQL("SET LOCAL {} = {};\n").format(sql.SQL(name), sql.Literal(value)) for name, value in self._settings]
        ).as_string(self.conn)

    @property
    def settings_count(self) -> int:
        """How many statements ``transaction_settings`` is."""
        return len(self._settings)

    @cached_property
    def _settings(self) -> list[tuple[str, str]]:
        settings = [("lock_timeout", str(self.service.lock_timeout))]
        if self.service.statement_timeout is not None:
            settings.append(("statement_timeout", str(self.service.statement_timeout)))
        if self.owner:
            settings.append(("role", self.owner))
        return settings


    @cached_property
    def identity_restore(self) -> str:
        """Who the bookkeeping runs as after a migration that said SET ROLE or SET SESSION
        AUTHORIZATION: the role it ran as, again (SET SESSION AUTHORIZATION also resets
        the role)."""
        from psycopg import sql

        restore: sql.Composable = sql.SQL("SET LOCAL SESSION AUTHORIZATION DEFAULT;\n")
        if self.owner:
            restore += sql.SQL("SET LOCAL ROLE {};\n").format(sql.Identifier(self.owner))
        return restore.as_string(self.conn)


class GuardFailed(Exception):
    """Behind a pooler, the transaction's guard stopped it before anything ran."""

    def __init__(self, sqlstate: str) -> None:
        self.busy = sqlstate == GUARD_BUSY_SQLSTATE
        super().__init__(sqlstate)


def file_of(action: MigrationAction, migration: Migration) -> MigrationFile:
    """The file an action runs: the up file, or the down file of a revert."""
    file = migration.down if isinstance(action, RevertMigration) else migration.up
    assert file is not None, "the planner reverts only migrations that have a down file"
    return file


def event_of(action: MigrationAction) -> str:
    """The history's word for what an action does."""
    if isinstance(action, ApplyRepeatable):
        return "repeat"
    return "revert" if isinstance(action, RevertMigration) else "apply"


def run_outside_transaction(
    run: RunControl, target: Target, action: MigrationAction, migration: Migration, version_before: int | None
) -> None:
    """Run a no-transaction migration statement by statement, with the dirty flag set
    around the run (golang-migrate's way). Not retried on a lock timeout: the statements
    before the one that failed stay done.

    Nothing but the session lock keeps another run out of the statements, so it must still
    be held (a migration before may have released it) when the service is marked dirty,
    and again (this one may have) after each statement and before the version is recorded. Both writes also check
    the bookkeeping they expect (``expect_version``): marking it raises ``GuardFailed``
    when another run moved on meanwhile."""
    from psycopg import sql

    assert not isinstance(action, ApplyRepeatable), "a repeatable always runs in a transaction"
    file, event = file_of(action, migration), event_of(action)
    conn, owner, tables = target.conn, target.owner, target.tables
    started = time.monotonic()
    _hold_lock(target)
    execute_guarded(
        conn,
        (sql.SQL("BEGIN;\n") + expect_version(tables, version_before) + _set_role(owner, local=True)
         + bookkeeping.set_version(tables, action.version, True) + sql.SQL("COMMIT;")).as_string(conn).encode(),
    )  # fmt: skip
    checkpoint("marked_dirty")
    script = file.script
    # An unparsed file goes as one string, as it is.
    statements: tuple[Statement | None, ...] = script.statements if script.parsed else (None,)
    description = f"{file.display} (version {action.version})"
    try:
        with run.cancellation.running(conn, description, rolls_back=False):
            conn.execute((_timeouts(target.service, local=False) + _set_role(owner, local=False)).as_string(conn).encode())
            for ran, statement in enumerate(statements):
                try:
                    read_as_parser(conn)
                    if statement is None:
                        conn.execute(file.text.encode())
                    else:
                        run_statement(conn, statement)
                except Exception as err:
                    rollback_quietly(conn)
                    if sqlstate_of(err) == QUERY_CANCELED and run.cancellation.requested:
                        raise run.interrupted(
                            f"cancelled {file.display} part-way; it runs outside a transaction, so service "
                            f"'{action.service}' is now dirty at version {action.version}",
                            hint=f"check what it did, complete or undo it by hand, then 'dbplan force {action.service} "
                            f"VERSION' (VERSION {action.version} if its changes are complete)",
                            service=action.service,
                            version=action.version,
                        ) from err
                    failure = migration_failure(
                        conn, err, action, file, owner, target.server, statement=statement, dirty=True
                    )
                    _record_failure(target, action, file, failure, done=ran, total=len(statements))
                    raise failure from err
                checkpoint("statement")
                # At once, not only before recording: while the lock is gone, another run
                # sees the service dirty with no run applying it, and refuses it (or a
                # person forces it) as if this migration had failed.
                _hold_lock(target)
    finally:
        if not conn.closed and not conn.broken:
            conn.execute(_reset_session(target.service, owner))
    _hold_lock(target)
    done = (
        sql.SQL("BEGIN;\n")
        + expect_version(tables, action.version, dirty=True)
        + _set_role(owner, local=True)
        + bookkeeping.record_event(
            tables,
            version=action.version,
            title=action.title,
            checksum=file.checksum,
            event=event,
            duration_ms=ms_since(started),
        )
        + bookkeeping.set_version(tables, action.version_after, False)
        + sql.SQL("COMMIT;")
    )
    try:
        execute_guarded(conn, done.as_string(conn).encode())
    except GuardFailed:
        raise DbplanError(
            f"{file.display} (version {action.version} of service '{action.service}') ran to its end, but meanwhile "
            f"someone changed the bookkeeping it had marked dirty at version {action.version}; nothing was recorded "
            "for it",
            service=action.service,
            version=action.version,
            hint="see who did what in 'dbplan status' and the history table, then 'dbplan force "
            f"{action.service} VERSION' to record where the database stands",
        ) from None


def _hold_lock(target: Target) -> None:
    """Take the run's session lock again if a migration released it (see ``hold_again``)."""
    from ..live.locks import hold_again

    lock = target.lock
    if lock is not None and hold_again(lock) and lock.on_wait is not None:
        lock.on_wait(f"a migration released the lock on {lock.what}; dbplan took it again")


def run_statement(conn: psycopg.Connection, statement: Statement) -> None:
    """One statement of a file; a COPY ... FROM STDIN is fed the data the file holds."""
    if statement.copy_data is None:
        conn.execute(statement.sql.encode())
        return
    with conn.cursor() as cursor, cursor.copy(statement.sql.encode()) as copy:
        copy.write(statement.copy_data.encode())


def _set_role(owner: str | None, *, local: bool) -> psycopg.sql.Composable:
    from psycopg import sql

    if not owner:
        return sql.SQL("")
    return sql.SQL("SET LOCAL ROLE {};\n" if local else "SET ROLE {};\n").format(sql.Identifier(owner))


def _timeouts(service: Service, *, local: bool) -> psycopg.sql.Composable:
    """The service's lock_timeout and statement_timeout (ms), for the transaction or the session."""
    from psycopg import sql

    command = "SET LOCAL" if local else "SET"
    settings = sql.SQL(command + " lock_timeout = {};\n").format(sql.Literal(service.lock_timeout))
    if service.statement_timeout is not None:
        settings += sql.SQL(command + " statement_timeout = {};\n").format(sql.Literal(service.statement_timeout))
    return settings


def _reset_session(service: Service, owner: str | None) -> bytes:
    resets = ["RESET lock_timeout;"]
    if service.statement_timeout is not None:
        resets.append("RESET statement_timeout;")
    if owner:
        resets.append("RESET ROLE;")
    return " ".join(resets).encode()


def as_role(
    conn: psycopg.Connection, owner: str | None, statements: psycopg.sql.Composable, *, guard: psycopg.sql.Composable | None = None
) -> bytes:
    from psycopg import sql

    head = sql.SQL("BEGIN;\n") + (guard or sql.SQL(""))
    return (head + _set_role(owner, local=True) + statements + sql.SQL("COMMIT;")).as_string(conn).encode()


def execute_guarded(conn: psycopg.Connection, script: bytes) -> None:
    """Run a transaction that starts with a guard; a guard's refusal becomes ``GuardFailed``."""
    import psycopg

    try:
        conn.execute(script)
    except psycopg.Error as err:
        rollback_quietly(conn)
        refusal = guard_refusal(err)
        if refusal is not None:
            raise GuardFailed(refusal) from None
        raise


def rollback_quietly(conn: psycopg.Connection) -> None:
    import psycopg

    if conn.closed or conn.broken:
        return
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            pass  # the connection is going away; the server rolls back on its own


def _record_failure(
    target: Target, action: MigrationAction, file: MigrationFile, failure: MigrationFailed, *, done: int, total: int
) -> None:
    """A ``fail`` history row saying where the migration failed and what had already run, so
    that ``plan`` can tell a reviewer (live/failure.py). Best effort, in its own transaction,
    and only while the service is still dirty at this version: a broken connection or a run
    that moved on meanwhile leave the dirty flag to say it alone."""
    import psycopg
    from psycopg import sql

    from ..live.failure import FAIL_EVENT, Failure, reason_of

    conn = target.conn
    if conn.closed or conn.broken or isinstance(action, ApplyRepeatable):  # a repeatable leaves nothing dirty
        return
    reason = reason_of(
        Failure(file.display, failure.line, failure.sqlstate, failure.pg_message or failure.message, done, total)
    )
    record = (
        sql.SQL("BEGIN;\n")
        + expect_version(target.tables, action.version, dirty=True)
        + _set_role(target.owner, local=True)
        + bookkeeping.record_event(
            target.tables, version=action.version, title=action.title, checksum=file.checksum, event=FAIL_EVENT,
            duration_ms=0, reason=reason,
        )
        + sql.SQL("COMMIT;")
    )  # fmt: skip
    try:
        execute_guarded(conn, record.as_string(conn).encode())
    except (psycopg.Error, GuardFailed):
        rollback_quietly(conn)  # the failure itself is what the user must see


def migration_failure(
    conn: psycopg.Connection,
    err: Exception,
    action: MigrationAction,
    file: MigrationFile,
    owner: str | None,
    server: Server,
    *,
    offset: int = 0,
    statement: Statement | None = None,
    dirty: bool = False,
    attempts: int = 1,
    lock_timeout: int | None = None,
    statement_index: int | None = None,
) -> MigrationFailed:
    import psycopg

    verb = "revert" if isinstance(action, RevertMigration) else "apply"
    what = f"run repeatable '{action.title}'" if isinstance(action, ApplyRepeatable) else f"{verb} version {action.version}"
    if not isinstance(err, psycopg.Error):
        return MigrationFailed(f"{file.display}: cannot {what}: {err}", service=action.service, version=action.version)
    diag = err.diag
    sqlstate = diag.sqlstate
    message = printable(server_message(err))  # it may quote the file: "invalid input syntax: \"<ESC>...\""
    dirty_hint = (
        f"the migration ran outside a transaction, so service '{action.service}' is now dirty at version "
        f"{action.version}: fix the database by hand, then 'dbplan force {action.service} VERSION'"
    )
    if connection_lost(conn, err):
        return MigrationFailed(
            f"lost the connection to server '{server.name}' while running {file.display} "
            f"(service '{action.service}', version {action.version}): {message}",
            sqlstate=sqlstate,
            pg_message=message,
            location=file.display,
            service=action.service,
            server=server.name,
            version=action.version,
            hint=dirty_hint if dirty else _lost_connection_hint(server_said_why=sqlstate is not None),
        )
    # Replaying to find the failing line would wait for the same lock, or run as long again.
    replay = sqlstate not in (LOCK_NOT_AVAILABLE, QUERY_CANCELED)
    line = _failure_line(
        conn, file, diag.statement_position, offset, statement, owner, statement_index, replay=replay, context=diag.context
    )
    where = f"{file.display}:{line}" if line else file.display
    details = [f"{where}: {message}" + (f" (SQLSTATE {sqlstate})" if sqlstate else "")]
    if diag.message_detail:
        details.append(f"detail: {diag.message_detail}")
    if diag.message_hint:
        details.append(f"postgres hint: {diag.message_hint}")
    if sqlstate == LOCK_NOT_AVAILABLE and lock_timeout is not None:
        tries = f", {attempts} times" if attempts > 1 else ""
        details.append(
            f"it waited longer than the service's lock_timeout ({lock_timeout} ms) for a lock another session "
            f"holds{tries}; find the blocker in pg_stat_activity, or raise lock_timeout of service '{action.service}'"
        )
    if dirty:
        hint = dirty_hint
    elif sqlstate == LOCK_NOT_AVAILABLE:
        hint = "the migration was rolled back: nothing of it is left in the database; apply again once the lock is free"
    elif sqlstate == QUERY_CANCELED:
        hint = (
            "the migration was rolled back: nothing of it is left in the database; raise statement_timeout of "
            f"service '{action.service}', or make the migration faster"
        )
    else:
        hint = "the migration was rolled back: nothing of it is left in the database; fix the file and apply again"
    return MigrationFailed(
        f"cannot {what} of service '{action.service}': " + "\n  ".join(details),
        sqlstate=sqlstate,
        pg_message=message,
        line=line,
        location=where,
        hint=hint,
        service=action.service,
        version=action.version,
        server=server.name,
    )


def _lost_connection_hint(*, server_said_why: bool) -> str:
    if server_said_why:  # the server ended the session (terminated, shut down): it rolled back
        return (
            "the server rolled the migration back with the session: nothing of it is recorded or left; "
            "run 'dbplan apply' again once the server is back"
        )
    return (
        "the connection broke without a word from the server, which may still have finished the migration "
        "(with its bookkeeping, or not at all): 'dbplan status' shows where the service stands once the server "
        "is reachable, and 'dbplan apply' goes on from there"
    )


def _failure_line(
    conn: psycopg.Connection,
    file: MigrationFile,
    position: str | None,
    offset: int,
    statement: Statement | None,
    owner: str | None,
    statement_index: int | None = None,
    *,
    replay: bool = True,
    context: str | None = None,
) -> int | None:
    if statement is not None:
        data_line = _copy_data_line(statement, context)
        if data_line is not None:
            return data_line
        if position and position.isdigit():
            return statement.line + statement.sql[: int(position) - 1].count("\n")
        return statement.line
    if position and position.isdigit():
        index = int(position) - 1 - offset
        if 0 <= index <= len(file.text):
            return line_of_offset(file.text, index)
        return None
    inner = file.script.inner_statements
    if file.script.parsed and statement_index is not None and 0 <= statement_index < len(inner):
        return inner[statement_index].line  # counted from the results (batches.py)
    located = _replay_to_find_failure(conn, file.script, owner) if replay else None
    return located.line if located else None


def _copy_data_line(statement: Statement, context: str | None) -> int | None:
    """The file line of the row a COPY ... FROM STDIN failed on: PostgreSQL names the row
    in the error's context ("COPY t, line 2, column id: ...")."""
    if statement.copy_data_line is None:
        return None
    import re

    match = re.search(r"^COPY [^,]+, line ([0-9]+)", context or "", re.MULTILINE)
    return statement.copy_data_line + int(match.group(1)) - 1 if match else None


def _replay_to_find_failure(conn: psycopg.Connection, script: Script, owner: str | None) -> Statement | None:
    """Run the statements one by one in a transaction that is rolled back, to find the one that fails.

    Only used after a failure without an error position, so the fast path stays one round trip.
    """
    import psycopg

    if not script.parsed or conn.closed or conn.broken:
        return None
    try:
        read_as_parser(conn)
        conn.execute("BEGIN")
        if owner:
            conn.execute(_set_role(owner, local=True).as_string(conn).encode())
        for statement in script.inner_statements:
            try:
                run_statement(conn, statement)
            except psycopg.Error:
                return statement
        return None
    except psycopg.Error:
        return None
    finally:
        rollback_quietly(conn)


def server_message(err: Exception) -> str:
    """PostgreSQL's own words for an error. psycopg words a connection that broke while
    results came in as "consuming input failed: <the server's message>"."""
    diag = getattr(err, "diag", None)
    primary = diag.message_primary if diag is not None else None
    return primary or str(err).strip().splitlines()[0].removeprefix("consuming input failed: ")


def sqlstate_of(err: BaseException) -> str | None:
    diag = getattr(err, "diag", None)
    return diag.sqlstate if diag is not None else None


def sleep_unless_stopped(run: RunControl, seconds: float, where: str) -> None:
    """Sleep, but stop at once when a stop is requested."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        run.check_stop(where)
        time.sleep(min(left, 0.1))
    run.check_stop(where)


def checkpoint(event: str) -> None:
    """Crash tests: with ``DBPLAN_TEST_KILL_AT=event:n[:ms]`` dbplan kills itself with SIGKILL
    at the n-th ``event`` of the run, or ``ms`` milliseconds later (while the next query runs).

    Events: locked, create, created, prepared, migration, migrated, marked_dirty, statement.
    Unset, this is one dictionary lookup.
    """
    spec = os.environ.get(KILL_AT_ENV)
    if not spec or spec.split(":", 1)[0] != event:
        return
    _, nth, *delay = spec.split(":")
    _checkpoints_seen[event] = _checkpoints_seen.get(event, 0) + 1
    if _checkpoints_seen[event] != int(nth):
        return
    if delay:
        threading.Timer(int(delay[0]) / 1000, _kill_self).start()
    else:
        _kill_self()


_checkpoints_seen: dict[str, int] = {}


def _kill_self() -> None:
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)

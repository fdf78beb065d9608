"""Transactional migrations, several to a round trip, each in a transaction of its own.

A transactional migration travels as one string: BEGIN, the service's settings, the
file's text verbatim, its history row and ``schema_migrations`` update, COMMIT. The strings
of consecutive migrations travel together as one simple query, so the server runs them
back to back, instead of waiting a round trip and dbplan's own work between every two
(the next batch's text is built while the server runs this one). Each migration still
commits on its own. An error stops the rest of the query: what committed before it stays
committed and recorded, the failing one leaves nothing, and the ones after it never start.

A batch starts at one migration and doubles while batches finish quickly, up to
``MAX_BATCH_MIGRATIONS`` or ``MAX_BATCH_BYTES``; after a slow one it starts over at one,
so a long migration is reported the moment it ends. The progress of quick migrations
arrives a batch at a time; their durations are measured by the server and stay exact.

Only files the parser read join a batch, and only where the server reads them the same
way: ``standard_conforming_strings`` on, and PostgreSQL 13 or later, which applies
``statement_timeout`` to each statement of a multi-statement query rather than the whole.
Behind a pooler each migration goes alone, with its guard.

The bookkeeping is one statement prepared once per run of steps (``_prepared_bookkeeping``),
and so is the check at the head of each transaction: parsing and planning them for every
migration cost the server more than running them.
"""

from __future__ import annotations

import itertools
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

from ..errors import MigrationFailed
from ..live.connection import connection_lost, read_as_parser
from ..migrations.scan import MigrationFile
from ..planning.plan import MigrationAction, action_phrase
from . import bookkeeping
from .guard import EXPECT_STATEMENTS, ExpectStatement, expect_version, guard_refusal
from .migration_run import (
    LOCK_NOT_AVAILABLE,
    QUERY_CANCELED,
    GuardFailed,
    RunControl,
    Target,
    checkpoint,
    event_of,
    migration_failure,
    rollback_quietly,
    server_message,
    sleep_unless_stopped,
    sqlstate_of,
)

if TYPE_CHECKING:
    import psycopg
    from psycopg.pq.abc import PGresult

MAX_BATCH_MIGRATIONS = 64
MAX_BATCH_BYTES = 1 << 20  # the server keeps the parse trees of a whole query until it ends
QUICK_BATCH_SECONDS = 0.25  # a batch that took longer is followed by a batch of one
FIRST_BATCHING_SERVER = 130000  # PostgreSQL 13: statement_timeout per statement of a query
# A transactional migration that hit lock_timeout is rolled back whole, so trying again
# is safe: the blocker is often a short burst of traffic or a vacuum.
LOCK_TIMEOUT_RETRY_SECONDS = (1.0, 2.0, 4.0)


@dataclass(frozen=True)
class Step:
    """One transactional migration to run: the action and the file it runs."""

    action: MigrationAction
    file: MigrationFile
    # What schema_migrations holds when the step starts (the version after the step before,
    # or what the run read): its transaction refuses to run on anything else.
    version_before: int | None = None


class StepReport(Protocol):
    """What the executor hears of a run of steps."""

    def started(self, step: Step) -> None: ...
    def committed(self, step: Step, duration_ms: int) -> None: ...


def run_transactional(
    run: RunControl,
    target: Target,
    steps: Sequence[Step],
    report: StepReport,
    *,
    guard: psycopg.sql.Composable | None = None,
) -> None:
    """Run ``steps`` in order, each in its own transaction with its bookkeeping.

    Raises ``MigrationFailed`` (or the run's ``Interrupted``, or ``GuardFailed``) for the
    first step that fails; the steps before it are committed and reported.
    A step that hit ``lock_timeout`` is rolled back whole, so it is tried again.
    Without a ``guard`` (a pooler's), each transaction first checks that the bookkeeping
    holds the step's ``version_before`` (``guard.expect_version``): a session lock that a
    migration dropped cannot let a second run apply anything twice.
    """
    read_as_parser(target.conn)
    sizer = _BatchSizer(enabled=guard is None and _server_reads_batches(target.conn))
    # Behind a pooler (a guard) the next transaction may get another session: no session state.
    with _prepared_bookkeeping(target, enabled=guard is None and len(steps) > 1) as prepared:
        _run_steps(run, target, steps, report, sizer, _TransactionTexts(target, steps, guard, prepared))


def _run_steps(
    run: RunControl, target: Target, steps: Sequence[Step], report: StepReport, sizer: _BatchSizer, texts: _TransactionTexts
) -> None:
    attempts: dict[int, int] = {}
    position = 0
    while position < len(steps):
        run.check_stop(f"before {action_phrase(steps[position].action)}")
        chunk = sizer.chunk(steps, position)
        after = position + len(chunk)
        ahead = min(2 * len(chunk), MAX_BATCH_MIGRATIONS) if sizer.enabled else 0
        outcome = _run_batch(
            run, target, chunk, [texts.of(index) for index in range(position, after)], report,
            meanwhile=partial(texts.build, range(after, min(after + ahead, len(steps)))),
        )  # fmt: skip
        position += outcome.committed
        sizer.after(outcome)
        if outcome.error is None:
            continue
        if outcome.refused_at is not None:
            continue  # nothing ran; the sizer now runs the steps before the refused one first
        failed = steps[position]
        attempts[position] = attempts.get(position, 0) + 1
        delay = _retry_delay(target.conn, outcome.error, attempts[position])
        if delay is None:
            raise _failure(run, target, failed, outcome, attempts[position]) from outcome.error
        run.notice(
            f"{failed.file.display} (version {failed.action.version}) waited longer than lock_timeout "
            f"({target.service.lock_timeout} ms) for a lock another session holds; rolled back, "
            f"retrying in {delay:g} s (attempt {attempts[position] + 1} of {len(LOCK_TIMEOUT_RETRY_SECONDS) + 1})"
        )
        sleep_unless_stopped(
            run, delay, f"before retrying version {failed.action.version} of service '{failed.action.service}'"
        )


def _retry_delay(conn: psycopg.Connection, error: Exception, attempts: int) -> float | None:
    """How long to wait before trying a step again after a lock timeout; None: don't."""
    if sqlstate_of(error) != LOCK_NOT_AVAILABLE or connection_lost(conn, error):
        return None
    if attempts > len(LOCK_TIMEOUT_RETRY_SECONDS):
        return None
    return LOCK_TIMEOUT_RETRY_SECONDS[attempts - 1]


def _failure(run: RunControl, target: Target, failed: Step, outcome: _BatchOutcome, attempts: int) -> Exception:
    error = outcome.error
    assert error is not None
    sqlstate = sqlstate_of(error)
    if (refusal := guard_refusal(error)) is not None:
        return GuardFailed(refusal)
    action = failed.action
    if sqlstate == QUERY_CANCELED and run.cancellation.requested:
        return run.interrupted(
            f"cancelled {failed.file.display} (version {action.version} of service '{action.service}') while it "
            "ran; it was rolled back, nothing of it is left",
            service=action.service,
            version=action.version,
        )
    if outcome.unconfirmed_to is not None and connection_lost(target.conn, error):
        last = outcome.unconfirmed_to.version
        return MigrationFailed(
            f"lost the connection to server '{target.server.name}' while it ran versions {action.version} to {last} "
            f"of service '{action.service}' in one batch: {server_message(error)}",
            service=action.service,
            server=target.server.name,
            version=action.version,
            hint="each migration commits together with its bookkeeping, so the database is consistent, but the "
            "server may have finished some of the batch after the connection broke: 'dbplan status' shows where the "
            "service stands once the server is reachable, and 'dbplan apply' goes on from there",
        )
    return migration_failure(
        target.conn, error, action, failed.file, target.owner, target.server,
        offset=outcome.file_offset, attempts=attempts, lock_timeout=target.service.lock_timeout,
        statement_index=outcome.statement_index,
    )  # fmt: skip


# --------------------------------------------------------------------------- one batch


@dataclass(frozen=True)
class _BatchOutcome:
    committed: int  # how many steps of the batch committed, in order
    seconds: float
    error: Exception | None = None
    file_offset: int = 0  # where the failing step's file text starts in the query, for error positions
    # Which statement of the failing step's file failed, counted from the results: the
    # line of an error without a position (a lock or statement timeout), at no cost.
    statement_index: int | None = None
    # The server refused the whole query for the text of a later step than the first
    # uncommitted one (a syntax error, found before anything runs): its index in the batch.
    refused_at: int | None = None
    # The connection broke with several steps unconfirmed: the last of them (its action).
    unconfirmed_to: MigrationAction | None = None


def _run_batch(
    run: RunControl,
    target: Target,
    chunk: list[Step],
    texts: list[Transaction],
    report: StepReport,
    *,
    meanwhile: Callable[[], None],
) -> _BatchOutcome:
    """Send the batch and read its results; ``meanwhile`` runs once the query is on its
    way, while the server works (the next batch's texts are built then)."""
    import psycopg
    from psycopg import pq

    query, file_offsets, head_counts = _batch_query(texts)
    for _ in chunk:
        checkpoint("migration")
    committed, duration_ms = 0, None
    since_begin = 0  # results of the current transaction's statements after its BEGIN
    failed_after: int | None = None
    error: Exception | None = None
    unconfirmed_to: MigrationAction | None = None
    read_as_parser(target.conn)  # an earlier batch's migration may have changed how the server reads
    started = time.monotonic()
    report.started(chunk[0])
    with run.cancellation.running(target.conn, _describe_batch(chunk), rolls_back=True):
        try:
            for result in _results(target.conn, query.encode(), meanwhile):
                if result.status == pq.ExecStatus.FATAL_ERROR:
                    error = psycopg.errors.error_from_result(result, encoding=target.conn.info.encoding)
                    failed_after = since_begin
                    continue
                since_begin = 0 if result.command_status in _BEGIN_TAGS else since_begin + 1
                if duration_ms is None and _is_done_marker(result):
                    duration_ms = int(result.get_value(0, 0) or 0)
                elif duration_ms is not None and result.command_status == b"COMMIT":
                    report.committed(chunk[committed], duration_ms)
                    committed, duration_ms = committed + 1, None
                    if committed < len(chunk):
                        report.started(chunk[committed])
        except psycopg.Error as err:  # the connection, not the SQL: no result to read
            error = err
            if len(chunk) - committed > 1:
                unconfirmed_to = chunk[-1].action
    seconds = time.monotonic() - started
    if error is None:
        return _BatchOutcome(committed, seconds)
    rollback_quietly(target.conn)
    pointed_at = _step_at_position(error, file_offsets)
    failing = min(committed, len(chunk) - 1)
    return _BatchOutcome(
        committed,
        seconds,
        error,
        file_offset=file_offsets[failing],
        statement_index=None if failed_after is None else failed_after - head_counts[failing],
        refused_at=pointed_at if pointed_at is not None and pointed_at > committed else None,
        unconfirmed_to=unconfirmed_to,
    )


def _batch_query(texts: list[Transaction]) -> tuple[str, list[int], list[int]]:
    """The query of a batch, where each step's file text starts in it, and how many
    statements of each transaction come after its BEGIN and before the file's.

    Each transaction marks its own start after its guard (whose RESET ALL would clear
    an earlier mark): the guard's check does, else a statement of its own.
    """
    parts: list[str] = []
    file_offsets: list[int] = []
    head_counts: list[int] = []
    length = 0
    for text in texts:
        head = text.marked_opening
        file_offsets.append(length + len(head))
        head_counts.append(text.opening_statements + (0 if text.marked else 1))
        parts += [head, text.body, text.tail]
        length += len(head) + len(text.body) + len(text.tail)
    return "".join(parts), file_offsets, head_counts


_BEGIN_TAGS = (b"BEGIN", b"START TRANSACTION")


class _TransactionTexts:
    """Each step's transaction text, built once, ahead of need where possible."""

    def __init__(
        self,
        target: Target,
        steps: Sequence[Step],
        guard: psycopg.sql.Composable | None,
        prepared: _SessionStatements | None,
    ) -> None:
        self.target, self.steps, self.guard, self.prepared = target, steps, guard, prepared
        # A file that may DEALLOCATE or DISCARD the session's prepared statement and
        # function: from it on, the bookkeeping goes as plain statements.
        self.first_plain = next((i for i, step in enumerate(steps) if _may_drop_session_statements(step.file)), len(steps))
        self.built: dict[int, Transaction] = {}

    def of(self, index: int) -> Transaction:
        if index not in self.built:
            prepared = self.prepared if index < self.first_plain else None
            self.built[index] = transaction_text(self.target, self.steps[index], self.guard, prepared)
        return self.built[index]

    def build(self, indexes: range) -> None:
        for index in indexes:
            self.of(index)


@dataclass(frozen=True)
class Transaction:
    """One step's transaction, in the pieces a batch puts together."""

    opening: str  # BEGIN, the guard, the service's settings
    body: str  # the file's text, verbatim, so that PostgreSQL's error position maps back to it
    tail: str  # the bookkeeping and COMMIT
    opening_statements: int = 0  # statements of ``opening`` after its BEGIN
    marked: bool = False  # the guard marks the migration's start (else MARK_START does)

    @property
    def marked_opening(self) -> str:
        """The opening, with the mark of the migration's start if its guard sets none."""
        return self.opening if self.marked else self.opening + bookkeeping.MARK_START


def transaction_text(
    target: Target,
    step: Step,
    guard: psycopg.sql.Composable | None,
    prepared: _SessionStatements | None = None,
) -> Transaction:
    """One step's transaction; the mark of its start goes between opening and body."""
    conn, action, file = target.conn, step.action, step.file
    head_guard, guard_statements = _head_guard(target, step, guard, prepared)
    opening = _begin(file) + ";\n" + head_guard + target.transaction_settings
    version, title, checksum, event, after = action.version, action.title, file.checksum, event_of(action), action.version_after
    if version is None:  # a repeatable run before any version: the history's version is not null
        version = 0
    # The prepared statement inserts a version other than the one it deletes (see its
    # docstring); an out-of-order file leaves the version as it was.
    if prepared is not None and after is not None and after != step.version_before:
        bookkeeping_sql = prepared.record.execute(version=version, title=title, checksum=checksum, event=event, version_after=after)
    else:
        bookkeeping_sql = bookkeeping.record_migration(
            target.tables, version=version, title=title, checksum=checksum, event=event, version_after=after
        )
    restore = target.identity_restore if _may_change_identity(file) else ""
    tail = "\n;\n" + restore + bookkeeping_sql.as_string(conn) + "COMMIT;\n"
    return Transaction(
        opening, _transactional_body(file), tail, guard_statements + target.settings_count, marked=guard is None
    )


def _head_guard(
    target: Target, step: Step, guard: psycopg.sql.Composable | None, prepared: _SessionStatements | None
) -> tuple[str, int]:
    """What a step's transaction checks first, and in how many statements: behind a
    pooler, the pooler's guard (a DO block); else that the bookkeeping still holds the
    step's ``version_before`` (``guard.expect_version``, prepared in a run of steps)."""
    if guard is not None:
        return guard.as_string(target.conn), 1
    if prepared is not None:
        return prepared.expect.call(target.tables, step.version_before).as_string(target.conn), EXPECT_STATEMENTS
    return expect_version(target.tables, step.version_before).as_string(target.conn), EXPECT_STATEMENTS


@dataclass(frozen=True)
class _SessionStatements:
    """What a run of steps prepares in the session: the bookkeeping, and the check at the
    head of each transaction."""

    record: bookkeeping.PreparedBookkeeping
    expect: ExpectStatement


_prepared_runs = itertools.count(1)


@contextmanager
def _prepared_bookkeeping(target: Target, *, enabled: bool) -> Iterator[_SessionStatements | None]:
    """The bookkeeping statement and the check prepared in the session for one run of
    steps, and removed after it (their names are the run's own, so nothing else can
    collide)."""
    if not enabled:
        yield None
        return
    import psycopg

    conn = target.conn
    number = next(_prepared_runs)
    prepared = _SessionStatements(
        bookkeeping.PreparedBookkeeping(f"dbplan_record_migration_{number}"), ExpectStatement(f"dbplan_expect_{number}")
    )
    conn.execute((prepared.record.prepare(target.tables) + prepared.expect.prepare(target.tables)).as_string(conn).encode())
    try:
        yield prepared
    finally:
        if not (conn.closed or conn.broken):
            rollback_quietly(conn)
            for statement in (prepared.record.deallocate(), prepared.expect.deallocate()):
                with suppress(psycopg.Error):  # a file may have deallocated it; the session ends soon anyway
                    conn.execute(statement.as_string(conn).encode())


def _may_change_identity(file: MigrationFile) -> bool:
    """Whether a file may change who the rest of its transaction runs as (SET ROLE, SET
    SESSION AUTHORIZATION), which its own bookkeeping must not run as. Found with the
    parser, so most files pay nothing; one that does it where the parser cannot see
    (EXECUTE in a DO block) makes its bookkeeping fail loudly, never silently."""
    script = file.script
    return not script.parsed or any(
        statement.kind == "VariableSetStmt"
        and statement.ast.get("VariableSetStmt", {}).get("name") in ("role", "session_authorization")
        for statement in script.statements
    )


def _may_drop_session_statements(file: MigrationFile) -> bool:
    script = file.script
    return not script.parsed or any(statement.kind in ("DeallocateStmt", "DiscardStmt") for statement in script.statements)


def _results(conn: psycopg.Connection, query: bytes, meanwhile: Callable[[], None]) -> list[PGresult]:
    """Send a multi-statement query and return each statement's result, once all are in.

    Reading them as they arrive woke dbplan for every buffer the server flushed and cost
    the server more than it gave: measured, a batch read at its end ran faster. Batches are
    kept short in time (``QUICK_BATCH_SECONDS``), so progress still comes every fraction of
    a second, and each migration's duration is the server's measure, not the client's.
    """
    from psycopg import generators

    pgconn = conn.pgconn
    pgconn.send_query(query)
    conn.wait(generators.send(pgconn))
    meanwhile()
    return conn.wait(generators.fetch_many(pgconn))


def _is_done_marker(result: PGresult) -> bool:
    from psycopg import pq

    return (
        result.status == pq.ExecStatus.TUPLES_OK
        and result.nfields == 1
        and result.fname(0) == _DONE_MARKER_BYTES
    )


_DONE_MARKER_BYTES = bookkeeping.DONE_MARKER.encode()


def _step_at_position(error: Exception, file_offsets: list[int]) -> int | None:
    """Which step's text an error's position points into, if it has one."""
    diag = getattr(error, "diag", None)
    position = diag.statement_position if diag is not None else None
    if not position or not position.isdigit():
        return None
    return max(0, bisect_right(file_offsets, int(position) - 1) - 1)


def _describe_batch(chunk: list[Step]) -> str:
    first, last = chunk[0], chunk[-1]
    if len(chunk) == 1:
        return f"{first.file.display} (version {first.action.version})"
    return f"versions {first.action.version} to {last.action.version} of service '{first.action.service}'"


def _begin(file: MigrationFile) -> str:
    """The statement that opens the migration's transaction: the file's own BEGIN when it
    wraps itself in one (it may say ISOLATION LEVEL or READ ONLY), else a plain BEGIN."""
    script = file.script
    if script.transaction_style == "wrapped":
        return script.statements[0].sql
    return "BEGIN"


def _transactional_body(file: MigrationFile) -> str:
    """The file's text, with its own wrapping BEGIN/COMMIT blanked out (same length, same lines)."""
    script = file.script
    if script.transaction_style != "wrapped":
        return file.text
    text = list(file.text)
    inner = {id(statement) for statement in script.inner_statements}
    for statement in script.statements:
        if id(statement) in inner:
            continue
        for index in range(statement.offset, statement.offset + len(statement.sql)):
            if text[index] not in "\r\n":
                text[index] = " "
    return "".join(text)


# --------------------------------------------------------------------------- sizing


def _server_reads_batches(conn: psycopg.Connection) -> bool:
    """Whether the server splits a batch where the parser did (see the module's docstring)."""
    return (
        conn.info.server_version >= FIRST_BATCHING_SERVER
        and conn.info.parameter_status("standard_conforming_strings") == "on"
    )


class _BatchSizer:
    """How many steps go in the next batch."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.size = 1
        self.limit: int | None = None  # a one-off cap, after the server refused a later step's text

    def chunk(self, steps: Sequence[Step], start: int) -> list[Step]:
        size = self.size if self.limit is None else min(self.size, self.limit)
        self.limit = None
        chunk: list[Step] = []
        total = 0
        for step in steps[start : start + size]:
            # A file the parser did not read goes alone: where its text ends is uncertain.
            alone = not step.file.script.parsed
            if chunk and (alone or total + len(step.file.text) > MAX_BATCH_BYTES):
                break
            chunk.append(step)
            total += len(step.file.text)
            if alone:
                break
        return chunk

    def after(self, outcome: _BatchOutcome) -> None:
        if not self.enabled:
            return
        if outcome.refused_at is not None:
            # Nothing ran. Run the steps before the refused one, then that one first in
            # its batch, so that its error is reported as its own.
            self.limit, self.size = outcome.refused_at - outcome.committed, 1
        elif outcome.error is None and outcome.seconds < QUICK_BATCH_SECONDS:
            self.size = min(self.size * 2, MAX_BATCH_MIGRATIONS)
        else:
            self.size = 1

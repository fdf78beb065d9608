"""Transactional migrations whose file carries ``COPY ... FROM STDIN`` data (psql's and
pg_dump's way of seeding tables).

The data is not SQL, so such a file cannot travel as one string with its bookkeeping, as
``batches`` sends the others. It runs alone, in one transaction all the same: BEGIN and
the service's settings, then the file statement by statement, each COPY fed its data with
psycopg's ``copy()``, then the bookkeeping and COMMIT. Until that COMMIT nothing of it is
visible, and a failure anywhere rolls all of it back (after a lock timeout it is tried
again, as in ``batches``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..live.connection import connection_lost, read_as_parser
from . import batches
from .batches import (
    Step,
    StepReport,
    Transaction,
    run_transactional,
    transaction_text,
)
from .guard import guard_refusal
from .migration_run import (
    LOCK_NOT_AVAILABLE,
    QUERY_CANCELED,
    GuardFailed,
    RunControl,
    Target,
    migration_failure,
    ms_since,
    rollback_quietly,
    run_statement,
    sleep_unless_stopped,
    sqlstate_of,
)

if TYPE_CHECKING:
    import psycopg

    from ..migrations.scan import MigrationFile
    from ..migrations.sqlscript import Statement


def run_transactional_steps(
    run: RunControl,
    target: Target,
    steps: Sequence[Step],
    report: StepReport,
    *,
    guard: psycopg.sql.Composable | None = None,
) -> None:
    """``batches.run_transactional``, except that a file with inline COPY data runs alone
    (``run_with_inline_copy``) between the batches of those before and after it."""
    start = 0
    for index, step in enumerate(steps):
        if not step.file.script.has_inline_copy:
            continue
        if start < index:
            run_transactional(run, target, steps[start:index], report, guard=guard)
        run_with_inline_copy(run, target, step, report, guard=guard)
        start = index + 1
    if start < len(steps):
        run_transactional(run, target, steps[start:], report, guard=guard)


def run_with_inline_copy(
    run: RunControl, target: Target, step: Step, report: StepReport, *, guard: psycopg.sql.Composable | None
) -> None:
    """One migration, statement by statement in one transaction with its bookkeeping; tried
    again after a lock timeout, like the batches' migrations, since it left nothing."""
    action, file = step.action, step.file
    transaction = transaction_text(target, step, guard)
    for attempt in itertools.count(1):
        run.check_stop(f"before applying version {action.version} of service '{action.service}'")
        report.started(step)
        started = time.monotonic()
        try:
            with run.cancellation.running(target.conn, f"{file.display} (version {action.version})", rolls_back=True):
                _run_once(target.conn, transaction, file)
        except _StatementFailed as failed:
            delay = _retry_delay(target.conn, failed.error, attempt)
            if delay is None:
                raise _failure(run, target, step, failed, attempt) from failed.error
            run.notice(
                f"{file.display} (version {action.version}) waited longer than lock_timeout "
                f"({target.service.lock_timeout} ms) for a lock another session holds; rolled back, "
                f"retrying in {delay:g} s (attempt {attempt + 1} of {len(batches.LOCK_TIMEOUT_RETRY_SECONDS) + 1})"
            )
            sleep_unless_stopped(run, delay, f"before retrying version {action.version} of service '{action.service}'")
            continue
        report.committed(step, ms_since(started))
        return


class _StatementFailed(Exception):
    """A statement of the file (None: dbplan's own) failed; the transaction is rolled back."""

    def __init__(self, error: psycopg.Error, statement: Statement | None) -> None:
        super().__init__(str(error))
        self.error, self.statement = error, statement


def _run_once(conn: psycopg.Connection, transaction: Transaction, file: MigrationFile) -> None:
    import psycopg

    statement: Statement | None = None
    try:
        read_as_parser(conn)
        conn.execute(transaction.marked_opening.encode())
        for statement in file.script.inner_statements:
            read_as_parser(conn)  # a statement may have changed how the server reads the next
            run_statement(conn, statement)
        statement = None
        conn.execute(transaction.tail.encode())
    except psycopg.Error as err:
        rollback_quietly(conn)
        raise _StatementFailed(err, statement) from err


def _retry_delay(conn: psycopg.Connection, error: psycopg.Error, attempt: int) -> float | None:
    if sqlstate_of(error) != LOCK_NOT_AVAILABLE or connection_lost(conn, error):
        return None
    delays = batches.LOCK_TIMEOUT_RETRY_SECONDS  # read at run time: tests shorten them
    return delays[attempt - 1] if attempt <= len(delays) else None


def _failure(run: RunControl, target: Target, step: Step, failed: _StatementFailed, attempts: int) -> Exception:
    action, sqlstate = step.action, sqlstate_of(failed.error)
    if (refusal := guard_refusal(failed.error)) is not None:
        return GuardFailed(refusal)
    if sqlstate == QUERY_CANCELED and run.cancellation.requested:
        return run.interrupted(
            f"cancelled {step.file.display} (version {action.version} of service '{action.service}') while it "
            "ran; it was rolled back, nothing of it is left",
            service=action.service,
            version=action.version,
        )
    return migration_failure(
        target.conn, failed.error, action, step.file, target.owner, target.server,
        statement=failed.statement, attempts=attempts, lock_timeout=target.service.lock_timeout,
    )  # fmt: skip

"""Transactional migrations whose file carries ``COPY ... FROM STDIN`` data (psql's and
pg_dump's way of seeding tables).

The data is not SQL, so such a file cannot travel as one string with its bookkeeping, as
``batches`` sends the others. It runs alone, in one transaction all the same: BEGIN and
the service's settings, then the file statement by statement, each COPY fed its data with
psycopg's ``copy()``, then the bookkeeping and COMMIT. Until that COMMIT nothing of it is
visible, and a failure anywhere rolls all of it back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..live.connection import read_as_parser
from . import bookkeeping
from .batches import Step, StepReport, run_transactional, transaction_text
from .guard import GUARD_BUSY_SQLSTATE, GUARD_MOVED_SQLSTATE
from .migration_run import (
    QUERY_CANCELED,
    GuardFailed,
    RunControl,
    Target,
    migration_failure,
    ms_since,
    rollback_quietly,
    run_statement,
    sqlstate_of,
)

if TYPE_CHECKING:
    import psycopg

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
    """One migration, statement by statement in one transaction with its bookkeeping."""
    import psycopg

    conn, action, file = target.conn, step.action, step.file
    transaction = transaction_text(target, step, guard)
    run.check_stop(f"before applying version {action.version} of service '{action.service}'")
    report.started(step)
    started = time.monotonic()
    statement: Statement | None = None
    with run.cancellation.running(conn, f"{file.display} (version {action.version})", rolls_back=True):
        try:
            read_as_parser(conn)
            conn.execute((transaction.opening + bookkeeping.MARK_START).encode())
            for statement in file.script.inner_statements:
                read_as_parser(conn)  # a statement may have changed how the server reads the next
                run_statement(conn, statement)
            statement = None
            conn.execute(transaction.tail.encode())
        except psycopg.Error as err:
            rollback_quietly(conn)
            sqlstate = sqlstate_of(err)
            if sqlstate in (GUARD_BUSY_SQLSTATE, GUARD_MOVED_SQLSTATE):
                raise GuardFailed(str(sqlstate)) from None
            if sqlstate == QUERY_CANCELED and run.cancellation.requested:
                raise run.interrupted(
                    f"cancelled {file.display} (version {action.version} of service '{action.service}') while it "
                    "ran; it was rolled back, nothing of it is left",
                    service=action.service,
                    version=action.version,
                ) from err
            raise migration_failure(
                conn, err, action, file, target.owner, target.server,
                statement=statement, lock_timeout=target.service.lock_timeout,
            ) from err  # fmt: skip
    report.committed(step, ms_since(started))

"""What a run of ``apply`` reports and how it is stopped: the executor's vocabulary with
its callers.

``Progress`` is the callback protocol the CLI draws (and a library caller may log);
``Outcome`` and ``Result`` say what was done; ``Cancellation`` carries a stop request
from a signal handler to the executor, and ``Interrupted`` is the error a stop ends in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..errors import DbplanError
from ..planning.plan import Action
from .fleet import Failure, NotRun

if TYPE_CHECKING:
    import psycopg


class Progress(Protocol):
    """How the executor reports what it does; the CLI draws it, a library caller may log it."""

    def action_started(self, action: Action, index: int, total: int) -> None: ...
    def action_finished(self, outcome: Outcome, index: int, total: int) -> None: ...
    def notice(self, message: str) -> None: ...


class SilentProgress:
    def action_started(self, action: Action, index: int, total: int) -> None:
        pass

    def action_finished(self, outcome: Outcome, index: int, total: int) -> None:
        pass

    def notice(self, message: str) -> None:
        pass


@dataclass(frozen=True)
class Outcome:
    action: Action
    status: str  # done | skipped | failed | cancelled (stopped by a signal)
    duration_ms: int = 0
    detail: str | None = None  # why skipped, or the error


@dataclass(frozen=True)
class Result:
    outcomes: tuple[Outcome, ...]
    error: DbplanError | None = field(default=None, compare=False)  # the first failure (or the stop)
    # Every unit of work that failed, in the order they failed, and every one that did not
    # run and why (a fleet's run goes on after a failure with --keep-going).
    failures: tuple[Failure, ...] = field(default=(), compare=False)
    not_run: tuple[NotRun, ...] = field(default=(), compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def count(self, status: str) -> int:
        return sum(1 for outcome in self.outcomes if outcome.status == status)


class Interrupted(DbplanError):
    """A stop request (a signal) ended the run; ``signal_name`` says which."""

    def __init__(self, message: str, *, signal_name: str, **kwargs: object) -> None:
        self.signal_name = signal_name
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class Cancellation:
    """A request to stop, made by a signal handler and honoured by the executor.

    The executor checks it between actions. A transactional migration in flight is
    cancelled at once: its rollback leaves nothing behind. A no-transaction migration is
    let finish, because stopping it half-way leaves the service dirty; only a second
    request cancels it. ``request`` only sets fields and sends cancel requests, so it is
    safe to call from a signal handler.

    A fleet's apply runs several migrations at once, one per thread: each thread marks
    its own query (``running``), and a request reaches every one of them.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.requests = 0
        # thread id -> (connection, what runs, whether cancelling it rolls it back)
        self._running: dict[int, tuple[psycopg.Connection, str, bool]] = {}

    @property
    def requested(self) -> bool:
        return self.requests > 0

    def request(self, signal_name: str) -> str:
        """Ask the run to stop; returns what will happen, for the user to read."""
        self.requests += 1
        self.signal_name = signal_name
        running = list(self._running.values())  # a copy: threads come and go meanwhile
        if not running:
            return f"received {signal_name}: stopping before the next step"
        said = []
        for conn, description, rolls_back in running:
            if rolls_back:
                self._cancel_query(conn)
                said.append(f"cancelling {description}; it is rolled back")
            elif self.requests == 1:
                said.append(
                    f"letting {description} finish, since it runs outside a transaction "
                    f"and stopping it half-way would leave the service dirty; send {signal_name} again to cancel it"
                )
            else:
                self._cancel_query(conn)
                said.append(f"cancelling {description}; the service will be left dirty")
        again = " again" if self.requests > 1 and any(not rolls_back for _, _, rolls_back in running) else ""
        return f"received {signal_name}{again}: " + "; ".join(said)

    @contextmanager
    def running(self, conn: psycopg.Connection, description: str, *, rolls_back: bool) -> Iterator[None]:
        """Mark the query sent inside the block as the one a request may cancel."""
        import threading

        me = threading.get_ident()
        self._running[me] = (conn, description, rolls_back)
        try:
            yield
        finally:
            self._running.pop(me, None)

    @staticmethod
    def _cancel_query(conn: psycopg.Connection) -> None:
        import psycopg

        try:
            conn.cancel_safe(timeout=5.0)
        except psycopg.Error:
            pass  # the query ends anyway; the executor stops at its next check

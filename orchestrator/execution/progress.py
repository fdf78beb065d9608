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
    error: DbplanError | None = field(default=None, compare=False)

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
    request cancels it. ``request`` only sets fields and sends a cancel request, so it is
    safe to call from a signal handler.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.requests = 0
        self._conn: psycopg.Connection | None = None
        self._running: str | None = None
        self._rolls_back = False

    @property
    def requested(self) -> bool:
        return self.requests > 0

    def request(self, signal_name: str) -> str:
        """Ask the run to stop; returns what will happen, for the user to read."""
        self.requests += 1
        self.signal_name = signal_name
        if self._conn is None or self._running is None:
            return f"received {signal_name}: stopping before the next step"
        if self._rolls_back:
            self._cancel_query()
            return f"received {signal_name}: cancelling {self._running}; it is rolled back"
        if self.requests == 1:
            return (
                f"received {signal_name}: letting {self._running} finish, since it runs outside a transaction "
                f"and stopping it half-way would leave the service dirty; send {signal_name} again to cancel it"
            )
        self._cancel_query()
        return f"received {signal_name} again: cancelling {self._running}; the service will be left dirty"

    @contextmanager
    def running(self, conn: psycopg.Connection, description: str, *, rolls_back: bool) -> Iterator[None]:
        """Mark the query sent inside the block as the one a request may cancel."""
        self._conn, self._running, self._rolls_back = conn, description, rolls_back
        try:
            yield
        finally:
            self._conn = self._running = None

    def _cancel_query(self) -> None:
        import psycopg

        try:
            if self._conn is not None:
                self._conn.cancel_safe(timeout=5.0)
        except psycopg.Error:
            pass  # the query ends anyway; the executor stops at its next check

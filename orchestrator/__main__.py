"""``python -m orchestrator`` and the ``dbplan`` console script.

Nothing is imported before the signal handlers are in place (``_signal`` and ``sys`` are
built into the interpreter; the ``signal`` module would load ``enum`` first): a Ctrl-C or SIGTERM that arrives while typer, psycopg and
the rest load (the first tenth of a second) ends in a sentence and the shell's exit
code, never in a traceback. (The interpreter's own start, before this file runs, is
Python's.)
"""

import _signal
import sys

SIGNAL_NAMES = {_signal.SIGINT: "SIGINT", _signal.SIGTERM: "SIGTERM"}


class Stopped(BaseException):
    """SIGINT or SIGTERM outside apply's own handling (while loading or planning): the
    command ends there, with the shell's exit code 128 + ``signal_number``. Not a
    KeyboardInterrupt, which typer turns into a silent exit 130 (SIGTERM included), and
    not an Exception, which no ``except Exception`` on the way may take for an error."""

    def __init__(self, signal_number: int) -> None:
        self.signal_number = signal_number
        super().__init__(signal_number)


# Every signal the early handler took, in order. Raising is not enough: where a library
# wraps what a handler raises in an Exception and catches that (Python 3.11 wraps errors
# raised in __set_name__; psycopg falls back to another libpq wrapper on any Exception at
# import), the stop would be lost and the command would go on. The record survives that.
RECEIVED: list[int] = []


# `python -m orchestrator` runs this file as __main__: it is the same module cli looks the
# record up in (``cli._signal_taken_early``), so it is registered under its own name too,
# or a stop swallowed on its way would be looked for in a module never loaded.
if __name__ == "__main__":
    sys.modules.setdefault("orchestrator.__main__", sys.modules[__name__])


def _stop(signum: int, frame: object) -> None:
    RECEIVED.append(signum)
    raise Stopped(signum)


def received_signal() -> int | None:
    """The first SIGINT or SIGTERM taken before apply's own handlers, if any."""
    return RECEIVED[0] if RECEIVED else None


def main() -> None:
    # Until apply installs its own handlers, SIGTERM stops dbplan the way Ctrl-C does.
    _signal.signal(_signal.SIGTERM, _stop)
    _signal.signal(_signal.SIGINT, _stop)
    try:
        from .cli import run

        if RECEIVED:  # taken while loading, and swallowed on the way
            raise Stopped(RECEIVED[0])
    except BaseException as err:
        _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # one goodbye, not a traceback of a second signal
        _signal.signal(_signal.SIGTERM, _signal.SIG_IGN)
        from .errors import signal_number_behind

        number = signal_number_behind(err) or received_signal()
        if number is None:
            raise
        sys.stderr.write(f"{SIGNAL_NAMES[number]} while dbplan was starting: nothing was read or changed.\n")
        sys.exit(128 + number)
    run()


if __name__ == "__main__":
    main()

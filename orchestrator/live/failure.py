"""How a no-transaction migration that failed part-way is remembered: one ``fail`` row in
the history table, whose ``reason`` says where it failed and what had already run.

DESIGN's history events are apply, revert, force, baseline and accept; ``fail`` is one more
kind of row, never a version's state (the facts skip it when they read which event is
latest), so golang-migrate and every earlier reader see nothing new. The executor writes
the reason with ``reason_of``; the facts read it back with ``parse_reason``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FAIL_EVENT = "fail"


@dataclass(frozen=True)
class Failure:
    file: str
    line: int | None
    sqlstate: str | None
    message: str
    done: int  # statements that ran to their end before the one that failed (they stay done)
    total: int  # statements in the file


def reason_of(failure: Failure) -> str:
    """``failed at f.sql:3 after 2 of 4 statements, SQLSTATE 23505: could not create ...``"""
    where = f"{failure.file}:{failure.line}" if failure.line else failure.file
    return (
        f"failed at {where} after {failure.done} of {failure.total} statements, "
        f"SQLSTATE {failure.sqlstate or 'none'}: {failure.message}"
    )


_REASON = re.compile(
    r"failed at (?P<file>.+?)(?::(?P<line>\d+))? after (?P<done>\d+) of (?P<total>\d+) statements, "
    r"SQLSTATE (?P<sqlstate>\w+): (?P<message>.*)",
    re.DOTALL,
)


def parse_reason(reason: str | None) -> Failure | None:
    match = _REASON.fullmatch(reason or "")
    if match is None:
        return None
    return Failure(
        file=match["file"],
        line=int(match["line"]) if match["line"] else None,
        sqlstate=None if match["sqlstate"] == "none" else match["sqlstate"],
        message=match["message"],
        done=int(match["done"]),
        total=int(match["total"]),
    )

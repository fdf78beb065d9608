"""Inline data of ``COPY ... FROM STDIN`` in a migration file, as psql and pg_dump write it.

The data follows the COPY statement from the next line on and ends at a line that is
exactly ``\\.``. It is not SQL, so the parser must not read it: ``find_copy_blocks`` finds
each block, and ``blank_blocks`` turns it into spaces (newlines kept), so that the rest of
the file parses with every offset and line number unchanged. Pure: no database.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

from pglast.parser import ParseError, parse_sql_json

# psql ends inline data at a line holding only "\." (a CRLF file: "\.\r").
_END_OF_DATA = re.compile(r"^\\\.\r?$", re.MULTILINE)
# The COPY statement ends its line, perhaps with a comment after it (psql allows that).
_STATEMENT_END_LINE = re.compile(r";[ \t\r\f\v]*(?:--[^\n]*)?$", re.MULTILINE)
_STDIN = re.compile(r"stdin", re.IGNORECASE)


class CopyBlock(NamedTuple):
    """Character offsets of one block of inline data."""

    data_start: int  # the first character after the COPY statement's line
    data_end: int  # where the end line ``\\.`` starts
    block_end: int  # just after the end line (before its newline)


def find_copy_blocks(src: str) -> list[CopyBlock]:
    """Every block of inline COPY data, in file order.

    A block is only where the SQL before it, up to the end of a line ending in ``;``,
    parses and ends with ``COPY ... FROM STDIN``: so a ``\\.`` inside a string, a comment or
    a function body is never taken for data. A ``\\.`` line with no such statement before it
    stops the search: the parser then reports it as the syntax error it is.
    """
    blocks: list[CopyBlock] = []
    position = 0
    while (end_line := _END_OF_DATA.search(src, position)) is not None:
        data_start = _copy_statement_end(src, position, end_line.start())
        if data_start is None:
            break
        blocks.append(CopyBlock(data_start, end_line.start(), end_line.end()))
        position = end_line.end()
    return blocks


def _copy_statement_end(src: str, begin: int, limit: int) -> int | None:
    """Where data starts after a COPY FROM STDIN that ends a line in ``src[begin:limit]``."""
    stdin = _STDIN.search(src, begin, limit)
    if stdin is None:
        return None
    for line_end in _STATEMENT_END_LINE.finditer(src, stdin.end(), limit):
        data_start = src.find("\n", line_end.start(), limit + 1)
        if data_start < 0:
            return None
        data_start += 1
        if data_start > limit:
            return None
        if _ends_with_copy_from_stdin(src[begin:data_start]):
            return data_start
    return None


def _ends_with_copy_from_stdin(sql: str) -> bool:
    try:
        statements = json.loads(parse_sql_json(sql)).get("stmts", [])
    except ParseError:
        return False
    return bool(statements) and is_copy_from_stdin(statements[-1]["stmt"])


def is_copy_from_stdin(node: dict[str, object]) -> bool:
    copy = node.get("CopyStmt")
    return isinstance(copy, dict) and bool(copy.get("is_from")) and not copy.get("filename")


def is_copy_to_stdout(node: dict[str, object]) -> bool:
    copy = node.get("CopyStmt")
    return isinstance(copy, dict) and not copy.get("is_from") and not copy.get("filename")


def blank_blocks(src: str, blocks: list[CopyBlock]) -> str:
    """``src`` with each block's data and end line turned into spaces, newlines kept."""
    if not blocks:
        return src
    parts: list[str] = []
    position = 0
    for block in blocks:
        parts.append(src[position : block.data_start])
        parts.append(re.sub(r"[^\n]", " ", src[block.data_start : block.block_end]))
        position = block.block_end
    parts.append(src[position:])
    return "".join(parts)

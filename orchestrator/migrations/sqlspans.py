"""Where statements begin and end in a migration file: line numbers, UTF-8 byte offsets
turned into character offsets, the scanner's tokens, and each statement's span.

libpg_query reports byte offsets into the UTF-8 encoding; everything here that returns
an offset into text returns a *character* offset (a leading UTF-8 BOM counts as one
character, like any other). Pure: no database, no file system.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, NamedTuple

from pglast.parser import ParseError, scan

Node = dict[str, Any]


# --------------------------------------------------------------------------- offsets


def line_of_offset(text: str, offset: int) -> int:
    """1-based line of the character at ``offset`` in ``text`` (LF and CRLF line ends).

    Offsets past either end are clamped, so a PostgreSQL error position at the end of input
    maps to the last line.
    """
    offset = max(0, min(offset, len(text)))
    return text.count("\n", 0, offset) + 1


class ByteToChar:
    """Converts increasing UTF-8 byte offsets (at character boundaries) to character offsets.

    Linear in the text size over all calls; the identity for ASCII text.
    """

    def __init__(self, utf8: bytes, ascii_only: bool) -> None:
        self._utf8 = utf8
        self._ascii = ascii_only
        self._byte = 0
        self._char = 0

    def __call__(self, byte_offset: int) -> int:
        if self._ascii:
            return byte_offset
        if byte_offset < self._byte:  # not expected; restart from the beginning
            self._byte = self._char = 0
        self._char += len(self._utf8[self._byte : byte_offset].decode("utf-8"))
        self._byte = byte_offset
        return self._char


# Every byte >= 0x80 becomes "x": the PostgreSQL scanner treats all such bytes alike (as
# identifier characters, or as content inside strings and comments), so token boundaries stay
# the same while offsets become byte offsets of a pure-ASCII string. pglast's scan() maps
# offsets of non-ASCII input back to characters at a cost quadratic in the number of
# non-ASCII characters (40 ms for a 10 kB Cyrillic file), which this avoids. The only
# difference it can make is two dollar-quote tags that differ only in non-ASCII characters;
# scan_tokens() checks for that and falls back to the exact (slow) scan.
_HIGH_BYTES_TO_X = bytes(range(128)) + b"x" * 128

COMMENT_TOKENS = frozenset({"SQL_COMMENT", "C_COMMENT"})


class Token(NamedTuple):
    start: int  # byte offset
    end: int  # byte offset, exclusive
    name: str


def scan_tokens(src: str, utf8: bytes) -> list[Token]:
    """The scanner's tokens of ``src`` with UTF-8 byte offsets (end exclusive)."""
    if src.isascii():
        return [Token(t.start, t.end + 1, t.name) for t in scan(src)]
    ascii_text = utf8.translate(_HIGH_BYTES_TO_X).decode("ascii")
    try:
        tokens = [Token(t.start, t.end + 1, t.name) for t in scan(ascii_text)]
    except ParseError:
        tokens = None
    if tokens is not None and all(_dollar_tags_match(t, ascii_text, utf8) for t in tokens):
        return tokens
    # Exact scan of the original text: character offsets, converted to bytes.
    result: list[Token] = []
    char = byte = 0
    for t in scan(src):
        byte += len(src[char : t.start].encode("utf-8"))
        char = t.start
        end = byte + len(src[t.start : t.end + 1].encode("utf-8"))
        result.append(Token(byte, end, t.name))
    return result


def _dollar_tags_match(token: Token, ascii_text: str, utf8: bytes) -> bool:
    if token.name != "SCONST" or ascii_text[token.start] != "$":
        return True
    tag_len = ascii_text.index("$", token.start + 1) + 1 - token.start
    return utf8[token.start : token.start + tag_len] == utf8[token.end - tag_len : token.end]


# --------------------------------------------------------------------------- statement spans
#
# The parser gives each statement as a byte range from just after the previous semicolon
# to just before its own, comments and whitespace around it included; a statement is its
# first token to its last. Between two statements only whitespace and comments can
# stand, so skipping them forward from the range's start is exact. At the end a comment
# can hide in the last line, and only the scanner can tell a comment from a string there;
# so when the last line holds "--", or the range ends in "*/", the file's tokens decide.

_SPACE = b" \t\n\r\f\v"  # the PostgreSQL scanner's whitespace


def statement_spans(raw: list[Node], utf8: bytes) -> list[tuple[int, int]] | None:
    """Each statement's (first token, end of last token) in bytes; None: scan the file."""
    spans = []
    for item in raw:
        begin = item.get("stmt_location", 0)
        length = item.get("stmt_len", 0)
        end = begin + length if length else len(utf8)
        begin = _skip_space_and_comments(utf8, begin, end)
        end = begin + len(utf8[begin:end].rstrip(_SPACE))
        last_line = max(begin, utf8.rfind(b"\n", begin, end) + 1)
        if utf8.find(b"--", last_line, end) >= 0 or utf8.endswith(b"*/", begin, end):
            return None
        spans.append((begin, end))
    return spans


def _skip_space_and_comments(utf8: bytes, position: int, end: int) -> int:
    while position < end:
        if utf8[position] in _SPACE:
            position += 1
        elif utf8.startswith(b"--", position, end):
            newline = utf8.find(b"\n", position, end)
            position = end if newline < 0 else newline + 1
        elif utf8.startswith(b"/*", position, end):
            position = _block_comment_end(utf8, position, end)
        else:
            break
    return position


def _block_comment_end(utf8: bytes, position: int, end: int) -> int:
    """Just after the ``*/`` that closes the comment opened at ``position`` (they nest)."""
    depth = 0
    while position < end:
        opening = utf8.find(b"/*", position, end)
        closing = utf8.find(b"*/", position, end)
        if closing < 0:
            return end
        if 0 <= opening < closing:
            depth, position = depth + 1, opening + 2
        else:
            depth, position = depth - 1, closing + 2
            if depth == 0:
                return position
    return end


def spans_from_tokens(raw: list[Node], utf8: bytes, tokens: list[Token]) -> list[tuple[int, int]]:
    starts = [t.start for t in tokens]
    spans = []
    for item in raw:
        begin = item.get("stmt_location", 0)
        length = item.get("stmt_len", 0)
        end = begin + length if length else len(utf8)
        first = bisect_left(starts, begin)
        last = bisect_left(starts, end) - 1
        while first <= last and tokens[first].name in COMMENT_TOKENS:
            first += 1
        while last >= first and tokens[last].name in COMMENT_TOKENS:
            last -= 1
        if first <= last:
            begin, end = tokens[first].start, tokens[last].end
        spans.append((begin, end))
    return spans

"""Read a migration file with PostgreSQL's own parser: statements, transaction control, lint.

Pure: no database, no file system. ``parse_script`` turns the text of one migration file into
a :class:`Script` (its statements with exact text, line and character offset, how the file
uses transaction control, which statements PostgreSQL refuses inside a transaction block,
and the ``-- dbplan:...`` comments). ``lint`` turns a ``Script`` into :class:`Finding`\\ s a
reviewer must see (destructive or long-locking statements).

Everything that understands SQL is ``pglast`` (libpg_query, the PostgreSQL parser): one parser
call per file, and a scanner call where comments make a statement's end uncertain or the file
has ``-- dbplan:allow`` comments (``sqlspans``). A file the parser rejects does not raise: it
comes back with ``parsed=False`` and the parser's message, because the server reports the
precise error when the file is applied and the planner turns this into a warning.

Offsets: libpg_query reports byte offsets into the UTF-8 encoding; everything this module
returns is a *character* offset into the text it was given (a leading UTF-8 BOM counts as one
character, like any other).
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from pglast.parser import ParseError, parse_sql_json

from .copydata import CopyBlock, blank_blocks, find_copy_blocks
from .sqlspans import (
    ByteToChar,
    Token,
    line_of_offset,
    scan_tokens,
    spans_from_tokens,
    statement_spans,
)

__all__ = ["NO_TRANSACTION_MARKER", "Script", "Statement", "line_of_offset", "parse_script"]

NO_TRANSACTION_MARKER = "-- dbplan:no-transaction"
_ALLOW_PREFIX = "dbplan:allow"
_BOM = "\ufeff"

Node = dict[str, Any]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Statement:
    """One top-level SQL statement of a migration file."""

    sql: str
    """The statement exactly as in the file: first token to last token, no trailing ``;``."""
    line: int
    """1-based line of the statement's first token (leading comments are not part of it)."""
    offset: int
    """Character offset of the first token in the file text."""
    kind: str
    """The parse node's name: ``CreateStmt``, ``IndexStmt``, ``TransactionStmt``, ..."""
    end_offset: int
    """Character offset just after the statement's last token (``text[offset:end_offset] == sql``)."""
    index: int
    """0-based position of the statement in the file."""
    transaction_kind: str | None = None
    """For transaction control only: ``begin``, ``start``, ``commit`` (also ``END``),
    ``rollback`` (also ``ABORT``), ``savepoint``, ``release``, ``rollback_to``, ``prepare``,
    ``commit_prepared`` or ``rollback_prepared``; ``None`` for every other statement."""
    non_transactional: str | None = None
    """What PostgreSQL calls the command when it refuses to run it inside a transaction
    block (``CREATE INDEX CONCURRENTLY``, ``VACUUM``, ...); ``None`` when it can."""
    ast: Node = field(default_factory=dict, compare=False, hash=False, repr=False)
    """The statement's parse tree as libpg_query's JSON (``{"CreateStmt": {...}}``)."""
    copy_data: str | None = field(default=None, repr=False)
    """For ``COPY ... FROM STDIN`` followed in the file by its data (psql's and pg_dump's
    way, ended by a line ``\\.``): the data, without the end line; else ``None``."""
    copy_data_line: int | None = field(default=None, repr=False)
    """1-based line of the file where ``copy_data`` starts (for errors in the data)."""


@dataclass(frozen=True)
class Script:
    """A parsed migration file."""

    statements: tuple[Statement, ...]
    parsed: bool
    """False when the parser rejected the file; then ``statements == ()``."""
    parse_error: str | None
    """``"line N: <PostgreSQL's message>"`` when ``parsed`` is False."""
    no_transaction_marker: bool
    """The first line is exactly ``-- dbplan:no-transaction`` (trailing whitespace allowed)."""
    transaction_style: str
    """``none``: no transaction control; ``wrapped``: the file is exactly one BEGIN/START
    TRANSACTION ... COMMIT/END block around everything else; ``multiple``: any other use of
    transaction control (several blocks, COMMIT mid-file, ROLLBACK, ...). Savepoints
    (SAVEPOINT, RELEASE, ROLLBACK TO) do not count: they work inside a transaction."""
    inner_statements: tuple[Statement, ...]
    """The statements without the wrapping BEGIN and COMMIT when ``wrapped``, else ``statements``."""
    non_transactional: tuple[Statement, ...]
    """Statements PostgreSQL refuses inside a transaction block."""
    allowed_rules: frozenset[str]
    """Lint rules silenced by ``-- dbplan:allow rule[, rule...]`` comments anywhere in the file."""
    empty: bool
    """No statements at all (empty or comments only); still a valid migration."""
    parse_error_line: int | None = None
    """1-based line of the parse error, for a ``Place``."""
    allow_comments: tuple[tuple[str, int], ...] = ()
    """Each rule named by a ``-- dbplan:allow`` comment, with the comment's line."""

    @property
    def has_inline_copy(self) -> bool:
        """Some ``COPY ... FROM STDIN`` carries its data in the file: it cannot travel as text."""
        return any(statement.copy_data is not None for statement in self.statements)


# --------------------------------------------------------------------------- parsing


def is_unprintable(char: str) -> bool:
    """Control characters (ESC starts terminal sequences, CR returns to the line's start),
    format characters (bidi overrides reorder what a reviewer reads), line separators, and
    the surrogates Python makes of bytes that are not UTF-8."""
    return unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs")


def printable(text: str) -> str:
    """``text`` with every unprintable character written as a Python escape (``\\x1b``,
    ``\\r``), so that what a file holds cannot rewrite the terminal that shows it."""
    if text.isprintable():  # fast, and stricter: no escape needed
        return text
    return "".join(repr(char)[1:-1] if is_unprintable(char) else char for char in text)


def parse_script(text: str) -> Script:
    """Parse the text of one migration file. Never raises for bad SQL (see ``Script.parsed``)."""
    # PostgreSQL does not skip a byte order mark; a space keeps character offsets unchanged.
    src = " " + text[1:] if text.startswith(_BOM) else text
    first_line = text.removeprefix(_BOM).split("\n", 1)[0]
    marker = first_line.rstrip() == NO_TRANSACTION_MARKER

    def failed(message: str, line: int) -> Script:
        return Script(
            statements=(),
            parsed=False,
            parse_error=f"line {line}: {printable(message)}",  # it may quote the file's text
            no_transaction_marker=marker,
            transaction_style="none",
            inner_statements=(),
            non_transactional=(),
            allowed_rules=frozenset(),
            empty=False,
            parse_error_line=line,
        )

    nul = src.find("\x00")
    if nul >= 0:  # libpg_query reads a C string: it would silently stop at the NUL
        return failed("the file contains a NUL character", line_of_offset(text, nul))
    try:
        utf8 = src.encode("utf-8")
    except UnicodeEncodeError as err:
        return failed(f"the text is not valid Unicode ({err.reason})", line_of_offset(text, err.start))
    copy_blocks = find_copy_blocks(src) if "\\." in src else []
    if copy_blocks:  # the data is not SQL: the parser reads spaces in its place
        src = blank_blocks(src, copy_blocks)
        utf8 = src.encode("utf-8")
    try:
        tree = json.loads(parse_sql_json(src))
    except ParseError as err:
        index = err.args[1] if len(err.args) > 1 else None
        if index is None:  # "at end of input": the last line with something on it
            index = len(src.rstrip())
        return failed(str(err.args[0]), line_of_offset(text, index))

    raw = tree.get("stmts", [])
    spans = statement_spans(raw, utf8)
    tokens: list[Token] | None = None
    if spans is None or _ALLOW_PREFIX.encode() in utf8:
        tokens = scan_tokens(src, utf8)
    if spans is None:
        assert tokens is not None
        spans = spans_from_tokens(raw, utf8, tokens)
    to_char = ByteToChar(utf8, src.isascii())

    statements: list[Statement] = []
    line, line_at = 1, 0
    for index, (item, (begin, end)) in enumerate(zip(raw, spans)):
        offset, end_offset = to_char(begin), to_char(end)
        line += text.count("\n", line_at, offset)
        line_at = offset
        node: Node = item["stmt"]
        kind = next(iter(node))
        statements.append(
            Statement(
                sql=text[offset:end_offset],
                line=line,
                offset=offset,
                kind=kind,
                end_offset=end_offset,
                index=index,
                transaction_kind=_transaction_kind(node),
                non_transactional=_non_transactional(node),
                ast=node,
            )
        )

    stmts = _with_copy_data(tuple(statements), text, copy_blocks)
    style, inner = _transaction_style(stmts)
    allow_comments = _allow_comments(tokens, utf8, text) if tokens else ()
    return Script(
        statements=stmts,
        parsed=True,
        parse_error=None,
        no_transaction_marker=marker,
        transaction_style=style,
        inner_statements=inner,
        non_transactional=tuple(s for s in stmts if s.non_transactional),
        allowed_rules=frozenset(rule for rule, _ in allow_comments),
        empty=not stmts,
        allow_comments=allow_comments,
    )


def _with_copy_data(stmts: tuple[Statement, ...], text: str, blocks: list[CopyBlock]) -> tuple[Statement, ...]:
    """Each block's data given to the statement before it (a COPY FROM STDIN, as
    ``find_copy_blocks`` made sure)."""
    if not blocks:
        return stmts
    result = list(stmts)
    for block in blocks:
        before = [s for s in stmts if s.end_offset <= block.data_start]
        if before:
            last = before[-1]
            result[last.index] = replace(
                last,
                copy_data=text[block.data_start : block.data_end],
                copy_data_line=line_of_offset(text, block.data_start),
            )
    return tuple(result)


def _allow_comments(tokens: list[Token], utf8: bytes, text: str) -> tuple[tuple[str, int], ...]:
    rules: list[tuple[str, int]] = []
    to_char = ByteToChar(utf8, text.isascii())
    for token in tokens:
        if token.name != "SQL_COMMENT":
            continue
        body = utf8[token.start : token.end].decode("utf-8")[2:].strip()
        if not body.startswith(_ALLOW_PREFIX):
            continue
        rest = body[len(_ALLOW_PREFIX) :]
        if rest and not rest[0].isspace():
            continue  # "dbplan:allowed" or the like
        line = line_of_offset(text, to_char(token.start))
        # "rule, rule other words": the words after a rule are a free-text reason
        for item in rest.split(","):
            words = item.split()
            if not words:
                continue
            rules.append((words[0].lower(), line))
            if len(words) > 1:
                break
    return tuple(rules)


_TRANSACTION_KINDS = {
    "TRANS_STMT_BEGIN": "begin",
    "TRANS_STMT_START": "start",
    "TRANS_STMT_COMMIT": "commit",
    "TRANS_STMT_ROLLBACK": "rollback",
    "TRANS_STMT_SAVEPOINT": "savepoint",
    "TRANS_STMT_RELEASE": "release",
    "TRANS_STMT_ROLLBACK_TO": "rollback_to",
    "TRANS_STMT_PREPARE": "prepare",
    "TRANS_STMT_COMMIT_PREPARED": "commit_prepared",
    "TRANS_STMT_ROLLBACK_PREPARED": "rollback_prepared",
}


def _transaction_kind(node: Node) -> str | None:
    body = node.get("TransactionStmt")
    if body is None:
        return None
    kind = body.get("kind", "TRANS_STMT_BEGIN")  # proto3 JSON omits the first enum value
    return _TRANSACTION_KINDS.get(kind, kind.lower())


# Savepoints live inside a transaction and cannot end it: a file that uses them runs in
# dbplan's transaction as written (and outside one they would fail).
_INSIDE_A_TRANSACTION = frozenset({"savepoint", "release", "rollback_to"})


def _transaction_style(stmts: tuple[Statement, ...]) -> tuple[str, tuple[Statement, ...]]:
    control = [s.index for s in stmts if s.transaction_kind and s.transaction_kind not in _INSIDE_A_TRANSACTION]
    if not control:
        return "none", stmts
    first, last = stmts[0], stmts[-1]
    if (
        control == [0, len(stmts) - 1]
        and len(stmts) >= 2
        and first.transaction_kind in ("begin", "start")
        and last.transaction_kind == "commit"
        and not last.ast["TransactionStmt"].get("chain", False)
    ):
        return "wrapped", stmts[1:-1]
    return "multiple", stmts


def _defelem_bool(elem: Node) -> bool | None:
    """A DefElem's value read like PostgreSQL's defGetBoolean; None when not a boolean."""
    arg = elem.get("arg")
    if arg is None:
        return True
    kind, value = next(iter(arg.items()))
    if kind == "Boolean":
        return bool(value.get("boolval", False))
    if kind == "Integer":
        number = value.get("ival", 0)
        return {0: False, 1: True}.get(number)
    if kind == "String":
        word = value.get("sval", "")
    elif kind == "TypeName":  # `connect = off` parses as a type name
        names = value.get("names", [])
        word = names[-1]["String"]["sval"] if names else ""
    else:
        return None
    # Exactly these words, in any case (defGetBoolean compares with pg_strcasecmp; the
    # prefixes and yes/no that parse_bool takes for settings are refused here).
    return {"true": True, "on": True, "false": False, "off": False}.get(word.lower())


def _options(body: Node, key: str = "options") -> dict[str, Node]:
    result: dict[str, Node] = {}
    for item in body.get(key, []) or []:
        elem = item.get("DefElem")
        if elem is not None:
            result[elem.get("defname", "")] = elem
    return result


def _option_is(body: Node, name: str, default: bool, key: str = "options") -> bool:
    elem = _options(body, key).get(name)
    if elem is None:
        return default
    value = _defelem_bool(elem)
    return default if value is None else value


def _non_transactional(node: Node) -> str | None:
    """PostgreSQL's name for the command if it refuses to run inside a transaction block.

    Only the statically certain cases (PreventInTransactionBlock in PostgreSQL's source);
    cases that depend on the database (DROP SUBSCRIPTION of a subscription with a slot,
    REINDEX or CLUSTER of a partitioned table) are not flagged.
    """
    kind, body = next(iter(node.items()))
    if kind == "IndexStmt":
        return "CREATE INDEX CONCURRENTLY" if body.get("concurrent") else None
    if kind == "DropStmt":
        if body.get("concurrent") and body.get("removeType") == "OBJECT_INDEX":
            return "DROP INDEX CONCURRENTLY"
        return None
    if kind == "ReindexStmt":
        if _option_is(body, "concurrently", False, key="params"):
            return "REINDEX CONCURRENTLY"
        target = body.get("kind", "")
        if target in ("REINDEX_OBJECT_SCHEMA", "REINDEX_OBJECT_SYSTEM", "REINDEX_OBJECT_DATABASE"):
            return "REINDEX " + target.rsplit("_", 1)[1]
        return None
    if kind == "VacuumStmt":
        return "VACUUM" if body.get("is_vacuumcmd") else None
    if kind == "ClusterStmt":
        return "CLUSTER without a table" if not body.get("relation") else None
    simple = {
        "CreatedbStmt": "CREATE DATABASE",
        "DropdbStmt": "DROP DATABASE",
        "AlterSystemStmt": "ALTER SYSTEM",
        "CreateTableSpaceStmt": "CREATE TABLESPACE",
        "DropTableSpaceStmt": "DROP TABLESPACE",
    }
    if kind in simple:
        return simple[kind]
    if kind == "AlterDatabaseStmt":
        return "ALTER DATABASE SET TABLESPACE" if "tablespace" in _options(body) else None
    if kind == "DiscardStmt":
        return "DISCARD ALL" if body.get("target", "DISCARD_ALL") == "DISCARD_ALL" else None
    if kind == "TransactionStmt":
        return {
            "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
            "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
        }.get(body.get("kind", ""))
    if kind == "AlterTableStmt":
        for cmd in alter_commands(body):
            if cmd.get("subtype") == "AT_DetachPartition":
                partition = (cmd.get("def") or {}).get("PartitionCmd", {})
                if partition.get("concurrent"):
                    return "ALTER TABLE ... DETACH PARTITION ... CONCURRENTLY"
        return None
    if kind == "CreateSubscriptionStmt":
        connect = _option_is(body, "connect", True)
        if connect and _option_is(body, "create_slot", True):
            return "CREATE SUBSCRIPTION ... WITH (create_slot = true)"
        return None
    if kind == "AlterSubscriptionStmt":
        what = body.get("kind", "")
        if what in ("ALTER_SUBSCRIPTION_REFRESH", "ALTER_SUBSCRIPTION_REFRESH_PUBLICATION"):
            return "ALTER SUBSCRIPTION ... REFRESH PUBLICATION"
        if what in (
            "ALTER_SUBSCRIPTION_SET_PUBLICATION",
            "ALTER_SUBSCRIPTION_ADD_PUBLICATION",
            "ALTER_SUBSCRIPTION_DROP_PUBLICATION",
        ) and _option_is(body, "refresh", True):
            return "ALTER SUBSCRIPTION with refresh"
        return None
    return None


def alter_commands(body: Node) -> Iterator[Node]:
    for cmd in body.get("cmds", []):
        if "AlterTableCmd" in cmd:
            yield cmd["AlterTableCmd"]

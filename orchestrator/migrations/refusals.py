"""What in a migration file must stop the plan, because dbplan could not keep its word.

dbplan promises that a transactional migration commits exactly once, together with its
bookkeeping. That rests on reading the file as the server will: so a file the parser
cannot read, a statement that changes how the server reads the rest of the file, and
COPY that talks to a client which is not there, are refused in the plan, before
anything runs. So are names in ``-- dbplan:allow`` that are no rule. Pure: reads a
:class:`~orchestrator.migrations.sqlscript.Script`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .copydata import is_copy_from_stdin, is_copy_to_stdout
from .lint import ALLOWABLE_RULES
from .sqlscript import NO_TRANSACTION_MARKER, Node, Script, Statement


@dataclass(frozen=True)
class Refusal:
    """Why a file cannot run as planned, where, and what to do about it."""

    line: int | None
    message: str
    hint: str
    rule: str = "blocked"
    """A short name for the kind of refusal, as ``dbplan lint`` shows it."""


# The settings that change how the server splits and reads the text that follows, and
# the one value of each that dbplan's parser reads files with (dbplan's sessions use it).
READING_SETTINGS = {"standard_conforming_strings": "on", "client_encoding": "UTF8"}
_SAME_AS_PARSER = {
    "standard_conforming_strings": frozenset({"on", "true", "yes", "1"}),
    "client_encoding": frozenset({"utf8", "utf-8", "unicode"}),
}


def refusals(script: Script, *, transactional: bool) -> list[Refusal]:
    """Everything in ``script`` that must block the plan, in file order.

    ``transactional``: the file would run inside dbplan's transaction.
    """
    if not script.parsed:
        return [_unparsed(script)] if transactional else []
    found: list[Refusal] = []
    for statement in script.statements:
        found += _statement_refusals(statement, transactional=transactional)
    if not transactional:
        found += _savepoints_outside_a_block(script)
    found += _unknown_rules(script)
    return sorted(found, key=lambda refusal: refusal.line or 0)


def _savepoints_outside_a_block(script: Script) -> list[Refusal]:
    """Run statement by statement outside a transaction, a savepoint outside the file's own
    BEGIN ... COMMIT fails for certain (after the statements before it have run)."""
    found: list[Refusal] = []
    in_block = False
    for statement in script.statements:
        kind = statement.transaction_kind
        if kind in ("begin", "start"):
            in_block = True
        elif kind in ("commit", "rollback", "prepare"):
            in_block = False
        elif kind in ("savepoint", "release", "rollback_to") and not in_block:
            found.append(
                Refusal(
                    statement.line,
                    f"{_SAVEPOINT_WORDS[kind]} works only inside a transaction, and this file runs outside one",
                    f"remove '{NO_TRANSACTION_MARKER}' so that the file runs in dbplan's transaction, or open "
                    "the transaction yourself with BEGIN before it",
                    rule="savepoint-outside-transaction",
                )
            )
    return found


_SAVEPOINT_WORDS = {"savepoint": "SAVEPOINT", "release": "RELEASE SAVEPOINT", "rollback_to": "ROLLBACK TO SAVEPOINT"}


def _unparsed(script: Script) -> Refusal:
    return Refusal(
        script.parse_error_line,
        f"PostgreSQL's parser as dbplan has it cannot read this file ({script.parse_error}), so dbplan cannot "
        "tell whether it commits on its own, and does not run it in its transaction",
        "fix the syntax; if your server accepts it (syntax of an older or newer PostgreSQL), put it in a file of "
        f"its own whose first line is `{NO_TRANSACTION_MARKER}`: it then runs as one string outside a "
        "transaction, with the service marked dirty until it has succeeded",
        rule="parse-error",
    )


def _statement_refusals(statement: Statement, *, transactional: bool) -> list[Refusal]:
    found: list[Refusal] = []
    if transactional and statement.non_transactional:
        found.append(
            Refusal(
                statement.line,
                f"{statement.non_transactional} cannot run inside a transaction, and this file runs in one",
                f"put '{NO_TRANSACTION_MARKER}' on the file's first line to run it outside a transaction",
                rule="non-transactional-statement",
            )
        )
    if is_copy_to_stdout(statement.ast):
        found.append(
            Refusal(
                statement.line,
                "COPY ... TO STDOUT sends rows to dbplan, which has nowhere to put them",
                "remove it from the migration; to export data, run COPY from psql, or COPY ... TO a server file",
                rule="copy-to-stdout",
            )
        )
    elif is_copy_from_stdin(statement.ast) and statement.copy_data is None:
        found.append(
            Refusal(
                statement.line,
                "COPY ... FROM STDIN has no data in the file",
                "follow the statement with its rows, one per line, and a line holding only \\. (as pg_dump "
                "writes them), or load from a server file",
                rule="copy-without-data",
            )
        )
    for setting, how in _reading_changes(statement):
        found.append(
            Refusal(
                statement.line,
                f"{how} changes how PostgreSQL reads the statements after it ({setting}), so the server could see "
                "a statement, a COMMIT say, where dbplan's parser sees none",
                "remove it: dbplan runs every migration with standard_conforming_strings on and client_encoding "
                "UTF8, as its parser reads them (write E'...' for strings with backslash escapes)",
                rule="reading-setting",
            )
        )
    return found


def _reading_changes(statement: Statement) -> Iterator[tuple[str, str]]:
    """(setting, statement) for each change of a reading setting away from the parser's."""
    node = statement.ast
    kind, body = next(iter(node.items()))
    prefix = ""
    if kind in _ALTER_SET and "setstmt" in body:
        # ALTER SYSTEM reaches running sessions at the next reload, between two of dbplan's
        # queries; ALTER DATABASE and ALTER ROLE, every later session, other tools' too.
        prefix, kind, body = _ALTER_SET[kind] + " ", "VariableSetStmt", body["setstmt"]
    if kind == "VariableSetStmt" and body.get("name") in READING_SETTINGS:
        name = body["name"]
        verb = "RESET" if body.get("kind") == "VAR_RESET" else ("SET LOCAL" if body.get("is_local") else "SET")
        verb = prefix + verb
        if body.get("kind") in ("VAR_RESET", "VAR_SET_DEFAULT") or not _is_parser_value(name, _constants(body.get("args", []))):
            yield name, f"{verb} {name}"
    if "set_config" not in statement.sql.lower():  # walking every tree would cost more than the parse
        return
    for call in _function_calls(node, "set_config"):
        args = call.get("args", [])
        first = _constants(args[:1])
        if first and first[0].lower() in READING_SETTINGS:
            name = first[0].lower()
            if not _is_parser_value(name, _constants(args[1:2])):
                yield name, f"set_config('{name}', ...)"


_ALTER_SET = {"AlterSystemStmt": "ALTER SYSTEM", "AlterDatabaseSetStmt": "ALTER DATABASE", "AlterRoleSetStmt": "ALTER ROLE"}


def _is_parser_value(name: str, values: list[str]) -> bool:
    return len(values) == 1 and values[0].lower() in _SAME_AS_PARSER[name]


def _constants(args: list[Any]) -> list[str]:
    """The constant strings and words among ``args`` (``on``, ``'UTF8'``, ``true``, ``1``)."""
    values: list[str] = []
    for arg in args:
        const = arg.get("A_Const") if isinstance(arg, dict) else None
        if const is None:
            continue
        if "sval" in const:
            values.append(str(const["sval"].get("sval", "")))
        elif "boolval" in const:
            values.append("true" if const["boolval"].get("boolval") else "false")
        elif "ival" in const:
            values.append(str(const["ival"].get("ival", 0)))
    return values


def _function_calls(tree: Any, name: str) -> Iterator[Node]:
    """Every call of function ``name`` (any schema) anywhere in a parse tree."""
    if isinstance(tree, dict):
        call = tree.get("FuncCall")
        if isinstance(call, dict):
            names = call.get("funcname", [])
            if names and names[-1].get("String", {}).get("sval", "").lower() == name:
                yield call
        for value in tree.values():
            yield from _function_calls(value, name)
    elif isinstance(tree, list):
        for value in tree:
            yield from _function_calls(value, name)


def _unknown_rules(script: Script) -> list[Refusal]:
    return [
        Refusal(
            line,
            f"-- dbplan:allow names {unknown_rule(rule)}",
            "name a rule as the plan shows it in brackets after a warning ([drop-column]), or remove the comment",
            rule="unknown-rule",
        )
        for rule, line in script.allow_comments
        if rule not in ALLOWABLE_RULES
    ]


def unknown_rule(rule: str) -> str:
    """"unknown rule 'x'; did you mean 'y'?" for a name that is no lint rule."""
    match = difflib.get_close_matches(rule, sorted(ALLOWABLE_RULES), n=1, cutoff=0.6)
    shown = f"'{rule}'" if rule.isprintable() else repr(rule)  # a comment may hold anything
    return f"unknown rule {shown}" + (f"; did you mean '{match[0]}'?" if match else "")

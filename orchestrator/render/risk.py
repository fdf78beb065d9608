"""What the plan's warnings put at risk, in the reviewer's words: which kind of harm each
rule stands for, and what it touches ("drops 1 table, 1 column; rewrites 1 table").

The lint rules stay where they are (``migrations/lint.py``); this module only reads a
warning's ``rule`` and ``severity``, and the statement it quotes, so a new rule of
severity ``destructive`` or ``locking`` lands in the right alert without a change here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..planning.plan import Warning
from .text import plural

# Kinds of harm, most serious first; each is one GitHub alert level.
DATA_LOSS = "data-loss"
REWRITE = "rewrite"
LOCK = "lock"
RISK = "risk"  # may fail or surprise, but neither loses data nor takes a long lock
NOTE = "note"  # missing downs, run-mode notes, notices
KINDS = (DATA_LOSS, REWRITE, LOCK, RISK, NOTE)

ALERT_OF_KIND = {DATA_LOSS: "CAUTION", REWRITE: "WARNING", LOCK: "WARNING", RISK: "WARNING", NOTE: "NOTE"}

_REWRITE_RULES = frozenset({"alter-column-type", "add-column-volatile-default", "vacuum-full", "cluster"})
_NOTE_RULES = frozenset({"missing-down", "own-transaction"})
_RISK_RULES = frozenset({"parse-error", "missing-file", "owner-change"})


def kind_of(warning: Warning) -> str:
    """The one mapping from a warning's rule and severity to the harm it stands for."""
    if warning.rule in _REWRITE_RULES:
        return REWRITE
    if warning.severity == "destructive":
        return DATA_LOSS
    if warning.severity == "locking":
        return LOCK
    if warning.rule in _NOTE_RULES or warning.severity == "notice":
        return NOTE
    return RISK  # unknown rules are shown, not hidden under a note


# What the summary says each rule does, and to which kind of object.
_VERBS = {
    "drop-table": ("drops", "table"),
    "drop-column": ("drops", "column"),
    "drop-schema": ("drops", "schema"),
    "drop-database": ("drops", "database"),
    "drop-type": ("drops", "type"),
    "drop-owned": ("drops", "role's objects"),
    "truncate": ("deletes every row of", "table"),
    "delete-without-where": ("deletes every row of", "table"),
    "update-without-where": ("updates every row of", "table"),
    "missing-down": ("no down file for", "migration"),
}
_VERB_OF_KIND = {DATA_LOSS: ("loses data in", "table"), REWRITE: ("rewrites", "table"), LOCK: ("locks", "table")}


def risk_phrases(warnings: Iterable[Warning]) -> list[str]:
    """``["drops 1 table, 1 column", "rewrites 1 table", "locks 2 tables"]``, most serious first.

    Objects are counted once per verb: three lock warnings on one table lock 1 table."""
    touched: dict[str, dict[str, set[str]]] = {}
    for warning in sorted(warnings, key=lambda w: KINDS.index(kind_of(w))):
        verb, noun = _VERBS.get(warning.rule or "") or _VERB_OF_KIND.get(kind_of(warning), ("", ""))
        if not verb:
            continue
        names = touched.setdefault(verb, {}).setdefault(noun, set())
        names.update(targets(warning) if noun != "migration" else {warning.file or warning.message})
    return [f"{verb} " + ", ".join(_count(len(names), noun) for noun, names in nouns.items()) for verb, nouns in touched.items()]


def _count(number: int, noun: str) -> str:
    if noun == "role's objects":
        return f"the objects of {plural(number, 'role')}"
    return plural(number, noun)


def targets(warning: Warning) -> set[str]:
    """The tables (``schema.table``) or columns (``table.column``) a warning's statement
    touches, read with PostgreSQL's parser; its place when the statement cannot be read
    (it is cut at 120 characters), so that it still counts once."""
    fallback = {f"{warning.file}:{warning.line}:{warning.rule}"}
    if not warning.statement or warning.statement.endswith("..."):
        return fallback
    from pglast.parser import ParseError, parse_sql_json

    try:
        statements = json.loads(parse_sql_json(warning.statement)).get("stmts", [])
    except ParseError:
        return fallback
    found: set[str] = set()
    for statement in statements:
        kind, body = next(iter(statement.get("stmt", {}).items()), ("", {}))
        found |= _names_in(kind, body, warning.rule or "")
    return found or fallback


def _names_in(kind: str, body: dict, rule: str) -> set[str]:
    if kind == "DropStmt":
        return {".".join(item.get("String", {}).get("sval", "?") for item in obj.get("List", {}).get("items", []))
                for obj in body.get("objects", [])} - {""}  # fmt: skip
    if kind == "TruncateStmt":
        return {_relation(r["RangeVar"]) for r in body.get("relations", []) if "RangeVar" in r}
    table = _relation(body.get("relation") or {})
    if kind == "AlterTableStmt" and rule == "drop-column":
        return {
            f"{table}.{cmd['AlterTableCmd'].get('name', '?')}"
            for cmd in body.get("cmds", [])
            if cmd.get("AlterTableCmd", {}).get("subtype") == "AT_DropColumn"
        }
    return {table} if table else set()


def _relation(range_var: dict) -> str:
    name = range_var.get("relname", "")
    return f"{range_var['schemaname']}.{name}" if range_var.get("schemaname") and name else name


@dataclass(frozen=True)
class RuleGroup:
    """The warnings of one rule, in plan order: a repeat is listed once, with its places."""

    rule: str
    kind: str
    warnings: tuple[Warning, ...]


def group_by_rule(warnings: Sequence[Warning]) -> list[RuleGroup]:
    """Groups most serious kind first, then in the order their rule first turns up."""
    order: dict[str, list[Warning]] = {}
    for warning in warnings:
        order.setdefault(warning.rule or warning.message, []).append(warning)
    groups = [RuleGroup(rule, kind_of(items[0]), tuple(items)) for rule, items in order.items()]
    return sorted(groups, key=lambda group: KINDS.index(group.kind))

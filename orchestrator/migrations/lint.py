"""Lint: what in a migration a reviewer must see, found in PostgreSQL's own parse tree.

Destructive statements (DROP, TRUNCATE, DELETE or UPDATE without WHERE, type changes)
and statements that hold long locks on existing tables. A rule listed in a
``-- dbplan:allow <rule>`` comment of the file, or in the service's ``lint.allow``,
is silenced on purpose. Pure: reads a parsed :class:`~orchestrator.sqlscript.Script`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .sqlscript import (
    NO_TRANSACTION_MARKER,
    Node,
    Script,
    Statement,
    alter_commands,
    printable,
)


@dataclass(frozen=True)
class Finding:
    """Something in a migration a reviewer must see."""

    rule: str
    line: int
    statement: str
    """The statement on one line, at most 120 characters."""
    message: str
    severity: str
    """``destructive`` | ``locking`` | ``error``."""


# --------------------------------------------------------------------------- lint

KNOWN_RULES: frozenset[str] = frozenset(
    {
        "drop-table",
        "drop-column",
        "drop-schema",
        "drop-database",
        "drop-type",
        "drop-owned",
        "truncate",
        "delete-without-where",
        "update-without-where",
        "alter-column-type",
        "create-index-not-concurrently",
        "add-column-volatile-default",
        "set-not-null",
        "add-foreign-key-validated",
        "add-check-validated",
        "non-transactional-statement",
    }
)
"""Every rule ``lint`` can report."""

PLAN_RULES: frozenset[str] = frozenset({"missing-down", "own-transaction"})
"""Warnings of the planner about a file that ``dbplan:allow`` and ``lint.allow`` silence too."""

ALLOWABLE_RULES: frozenset[str] = KNOWN_RULES | PLAN_RULES
"""What ``-- dbplan:allow`` and ``lint.allow`` may name; any other name is an error."""

# Functions PostgreSQL marks VOLATILE that turn up in column defaults. A non-volatile default
# (a constant, now(), current_timestamp, ...) is evaluated once since PostgreSQL 11 and added
# without a rewrite; a volatile one is evaluated per row and rewrites the table.
_VOLATILE_FUNCTIONS = frozenset(
    {
        "random",
        "random_normal",
        "gen_random_uuid",
        "uuidv4",
        "uuidv7",
        "uuid_generate_v1",
        "uuid_generate_v1mc",
        "uuid_generate_v4",
        "gen_random_bytes",
        "clock_timestamp",
        "timeofday",
        "nextval",
        "currval",
        "lastval",
        "setval",
        "txid_current",
        "pg_current_xact_id",
    }
)
_SERIAL_TYPES = frozenset({"smallserial", "serial", "bigserial", "serial2", "serial4", "serial8"})

_TableKey = tuple[str | None, str]
_Report = Callable[[str, str, str], None]  # rule, severity, message


def _shorten(sql: str, limit: int = 120) -> str:
    one_line = printable(" ".join(sql.split()))  # a string in the SQL may hold terminal escapes
    return one_line if len(one_line) <= limit else one_line[: limit - 3] + "..."


def _rangevar_key(rv: Node) -> _TableKey:
    return rv.get("schemaname"), rv.get("relname", "")


def _key_name(key: _TableKey) -> str:
    return f"{key[0]}.{key[1]}" if key[0] else key[1]


def _names(items: list[Node]) -> str:
    return ".".join(i.get("String", {}).get("sval", "?") for i in items)


def _drop_object_name(obj: Node) -> str:
    kind, value = next(iter(obj.items()))
    if kind == "List":
        return _names(value.get("items", []))
    if kind == "String":
        return value.get("sval", "?")
    if kind == "TypeName":
        return _names(value.get("names", []))
    return "?"


class _NewTables:
    """Tables created earlier in the file (or declared new by the caller)."""

    def __init__(self, names: Iterable[str] | None) -> None:
        self._keys: set[_TableKey] = set()
        for name in names or ():
            schema, _, rel = name.rpartition(".")
            self._keys.add((schema or None, rel))

    def add(self, key: _TableKey) -> None:
        self._keys.add(key)

    def discard(self, key: _TableKey) -> None:
        self._keys = {k for k in self._keys if not _same_table(k, key)}

    def __contains__(self, key: _TableKey) -> bool:
        return any(_same_table(k, key) for k in self._keys)


def _same_table(a: _TableKey, b: _TableKey) -> bool:
    # An unqualified name matches the same name in any schema: the search_path is unknown here.
    return a[1] == b[1] and (a[0] is None or b[0] is None or a[0] == b[0])


def _track_new_tables(node: Node, new: _NewTables) -> None:
    kind, body = next(iter(node.items()))
    if kind == "CreateStmt":
        if not body.get("if_not_exists"):  # IF NOT EXISTS may meet an old table full of rows
            new.add(_rangevar_key(body["relation"]))
    elif kind == "CreateTableAsStmt":
        if not body.get("if_not_exists"):
            new.add(_rangevar_key(body["into"]["rel"]))
    elif kind == "SelectStmt" and body.get("intoClause"):
        new.add(_rangevar_key(body["intoClause"]["rel"]))
    elif kind == "RenameStmt" and body.get("renameType") == "OBJECT_TABLE" and body.get("relation"):
        old = _rangevar_key(body["relation"])
        if old in new:
            new.add((old[0], body.get("newname", "")))
    elif kind == "DropStmt" and body.get("removeType") == "OBJECT_TABLE":
        for obj in body.get("objects", []):
            items = obj.get("List", {}).get("items", [])
            parts = [i.get("String", {}).get("sval", "") for i in items]
            if parts:
                new.discard((parts[-2] if len(parts) > 1 else None, parts[-1]))


def _find_function(expr: Any) -> str | None:
    """The first volatile function called anywhere in an expression tree."""
    if isinstance(expr, dict):
        call = expr.get("FuncCall")
        if call is not None:
            names = call.get("funcname", [])
            name = names[-1].get("String", {}).get("sval", "") if names else ""
            if name in _VOLATILE_FUNCTIONS:
                return name
        for value in expr.values():
            found = _find_function(value)
            if found:
                return found
    elif isinstance(expr, list):
        for value in expr:
            found = _find_function(value)
            if found:
                return found
    return None


def _rewriting_column(column: Node) -> str | None:
    """Why adding this column fills every existing row one by one (rewriting the table)."""
    type_names = [n.get("String", {}).get("sval", "") for n in column.get("typeName", {}).get("names", [])]
    if len(type_names) == 1 and type_names[0] in _SERIAL_TYPES:
        return f"its type {type_names[0]} takes a default from a sequence (nextval), which is volatile"
    for item in column.get("constraints", []):
        constraint = item.get("Constraint", {})
        contype = constraint.get("contype")
        if contype == "CONSTR_DEFAULT":
            function = _find_function(constraint.get("raw_expr"))
            if function:
                return f"its default calls {function}(), which is volatile"
        elif contype == "CONSTR_IDENTITY":
            return "an identity column takes a value from a sequence for every row"
        elif contype == "CONSTR_GENERATED" and constraint.get("generated_kind", "s") == "s":
            return "a stored generated column is computed for every row"
    return None


def _dml_statements(node: Node) -> Iterator[tuple[str, Node]]:
    """The statement and the DELETE/UPDATE statements in its WITH clauses, recursively."""
    kind, body = next(iter(node.items()))
    yield kind, body
    for cte in (body.get("withClause") or {}).get("ctes", []):
        query = cte.get("CommonTableExpr", {}).get("ctequery")
        if query:
            yield from _dml_statements(query)


def lint(
    script: Script,
    *,
    new_tables: Iterable[str] | None = None,
    allow: frozenset[str] | Iterable[str] = frozenset(),
) -> tuple[Finding, ...]:
    """Findings for risky statements in ``script``, in file order.

    ``new_tables``: names (``table`` or ``schema.table``) of tables known to be new and empty,
    in addition to the tables the file itself creates earlier (``CREATE TABLE`` without ``IF
    NOT EXISTS``, ``CREATE TABLE AS``, ``SELECT INTO``, renames of those). Statements on new
    tables cannot lose data or block anyone and produce no finding.
    ``allow``: rules silenced for this file from outside (the plan file), in addition to
    ``script.allowed_rules``. An unparsed script has no findings.
    """
    silenced = frozenset(script.allowed_rules) | frozenset(allow)
    findings: list[Finding] = []
    new = _NewTables(new_tables)

    for stmt in script.statements:

        def report(rule: str, severity: str, message: str, stmt: Statement = stmt) -> None:
            if rule not in silenced:
                findings.append(Finding(rule, stmt.line, _shorten(stmt.sql), message, severity))

        _lint_statement(stmt, script, new, report)
        _track_new_tables(stmt.ast, new)
    return tuple(findings)


def _lint_statement(stmt: Statement, script: Script, new: _NewTables, report: _Report) -> None:
    node = stmt.ast
    kind, body = next(iter(node.items()))

    if stmt.non_transactional and not script.no_transaction_marker:
        report(
            "non-transactional-statement",
            "error",
            f"{stmt.non_transactional} cannot run inside a transaction block and this migration runs in one; "
            f"move it to its own migration whose first line is `{NO_TRANSACTION_MARKER}`.",
        )

    if kind == "DropStmt":
        remove = body.get("removeType")
        names = [_drop_object_name(o) for o in body.get("objects", [])]
        listed = ", ".join(names)
        cascade = body.get("behavior") == "DROP_CASCADE"
        if remove == "OBJECT_TABLE":
            old = [
                n for n, o in zip(names, body.get("objects", []))
                if _list_key(o) not in new
            ]
            if old:
                report(
                    "drop-table",
                    "destructive",
                    f"DROP TABLE deletes {', '.join(old)} and every row in it for good; "
                    "make sure nothing reads it any more and the data is backed up or no longer needed.",
                )
        elif remove == "OBJECT_SCHEMA":
            report(
                "drop-schema",
                "destructive",
                f"DROP SCHEMA deletes schema {listed}"
                + (" and, with CASCADE, every table and row in it" if cascade else "")
                + "; make sure nothing uses it any more and the data is backed up.",
            )
        elif remove in ("OBJECT_TYPE", "OBJECT_DOMAIN"):
            what = "TYPE" if remove == "OBJECT_TYPE" else "DOMAIN"
            report(
                "drop-type",
                "destructive",
                f"DROP {what} deletes {listed}"
                + (", and with CASCADE every column of that type and its data" if cascade else "")
                + "; make sure no column, function or client still uses it.",
            )
    elif kind == "DropdbStmt":
        report(
            "drop-database",
            "destructive",
            f"DROP DATABASE deletes database {body.get('dbname', '?')} with all its data; "
            "databases belong in the plan file, not in a migration.",
        )
    elif kind == "DropOwnedStmt":
        report(
            "drop-owned",
            "destructive",
            "DROP OWNED deletes every object the role owns in this database, tables and rows included; "
            "revoke privileges or reassign ownership (REASSIGN OWNED) instead unless that is intended.",
        )
    elif kind == "TruncateStmt":
        tables = [_rangevar_key(r["RangeVar"]) for r in body.get("relations", []) if "RangeVar" in r]
        old = [_key_name(k) for k in tables if k not in new]
        if old:
            report(
                "truncate",
                "destructive",
                f"TRUNCATE deletes every row of {', '.join(old)} under an ACCESS EXCLUSIVE lock; "
                "make sure the data is no longer needed.",
            )
    elif kind == "IndexStmt":
        table = _rangevar_key(body.get("relation", {}))
        if not body.get("concurrent") and table not in new:
            report(
                "create-index-not-concurrently",
                "locking",
                f"CREATE INDEX blocks every write to {_key_name(table)} until the index is built; "
                f"use CREATE INDEX CONCURRENTLY in a migration whose first line is `{NO_TRANSACTION_MARKER}`.",
            )
    elif kind == "AlterTableStmt" and body.get("objtype", "OBJECT_TABLE") == "OBJECT_TABLE":
        table = _rangevar_key(body.get("relation", {}))
        if table not in new:
            _lint_alter_table(_key_name(table), body, report)

    for dml, dml_body in _dml_statements(node):
        if dml not in ("DeleteStmt", "UpdateStmt") or dml_body.get("whereClause"):
            continue
        table = _rangevar_key(dml_body.get("relation", {}))
        if table in new:
            continue
        if dml == "DeleteStmt":
            report(
                "delete-without-where",
                "destructive",
                f"DELETE without WHERE deletes every row of {_key_name(table)}; add a WHERE clause, "
                "or allow the rule if emptying the table is intended.",
            )
        else:
            report(
                "update-without-where",
                "destructive",
                f"UPDATE without WHERE changes every row of {_key_name(table)} and locks them all; "
                "add a WHERE clause (and batch large updates), or allow the rule if intended.",
            )


def _list_key(obj: Node) -> _TableKey:
    parts = [i.get("String", {}).get("sval", "") for i in obj.get("List", {}).get("items", [])]
    if not parts:
        return None, ""
    return (parts[-2] if len(parts) > 1 else None), parts[-1]


def _lint_alter_table(table: str, body: Node, report: _Report) -> None:
    for cmd in alter_commands(body):
        subtype = cmd.get("subtype")
        column = cmd.get("name", "?")
        definition = cmd.get("def") or {}
        if subtype == "AT_DropColumn":
            report(
                "drop-column",
                "destructive",
                f"DROP COLUMN deletes {table}.{column} and its data for good; "
                "deploy code that no longer reads or writes it before this migration runs.",
            )
        elif subtype == "AT_AlterColumnType":
            report(
                "alter-column-type",
                "locking",
                f"changing the type of {table}.{column} takes an ACCESS EXCLUSIVE lock and usually rewrites "
                "the table and its indexes; add a new column, backfill it in batches and switch over instead.",
            )
        elif subtype == "AT_SetNotNull":
            report(
                "set-not-null",
                "locking",
                f"SET NOT NULL on {table}.{column} scans the whole table under an ACCESS EXCLUSIVE lock; "
                "first add CHECK (" + column + " IS NOT NULL) NOT VALID and VALIDATE it, then SET NOT NULL is instant.",
            )
        elif subtype == "AT_AddColumn" and "ColumnDef" in definition:
            reason = _rewriting_column(definition["ColumnDef"])
            if reason:
                name = definition["ColumnDef"].get("colname", "?")
                report(
                    "add-column-volatile-default",
                    "locking",
                    f"adding {table}.{name} rewrites the whole table under an ACCESS EXCLUSIVE lock because "
                    f"{reason}; add the column without a default, backfill it in batches, then set the default.",
                )
        elif subtype == "AT_AddConstraint" and "Constraint" in definition:
            constraint = definition["Constraint"]
            if constraint.get("skip_validation"):
                continue
            name = constraint.get("conname") or "(unnamed)"
            if constraint.get("contype") == "CONSTR_FOREIGN":
                report(
                    "add-foreign-key-validated",
                    "locking",
                    f"adding foreign key {name} on {table} checks every row while blocking writes to both tables; "
                    "add it NOT VALID, then VALIDATE CONSTRAINT in a later statement or migration.",
                )
            elif constraint.get("contype") == "CONSTR_CHECK":
                report(
                    "add-check-validated",
                    "locking",
                    f"adding check constraint {name} on {table} scans every row under an ACCESS EXCLUSIVE lock; "
                    "add it NOT VALID, then VALIDATE CONSTRAINT in a later statement or migration.",
                )

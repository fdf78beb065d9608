"""Lint: what in a migration a reviewer must see, found in PostgreSQL's own parse tree.

Destructive statements (DROP, TRUNCATE, DELETE or UPDATE without WHERE, renames) and
statements that hold long locks on existing tables or rewrite them; each locking finding
names the lock PostgreSQL takes (its documentation, per statement and ALTER TABLE
subcommand) and the table it is taken on, so the planner can add the live table's size.
Tables the pending migrations create are new and empty: statements on them are quiet.
A rule listed in a
``-- dbplan:allow <rule>`` comment of the file, or in the service's ``lint.allow``,
is silenced on purpose. Pure: reads a parsed :class:`~orchestrator.sqlscript.Script`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

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
    table: str | None = None
    """The table the statement locks or changes (``orders``, ``sales.orders``), or for an index
    statement the index's name (the planner looks up the table it belongs to)."""
    lock: str | None = None
    """The lock the statement takes on ``table``: ``ACCESS EXCLUSIVE``, ``SHARE``, ..."""


# Lock modes, as PostgreSQL's documentation names them (explicit-locking.html).
ACCESS_EXCLUSIVE = "ACCESS EXCLUSIVE"
EXCLUSIVE = "EXCLUSIVE"
SHARE_ROW_EXCLUSIVE = "SHARE ROW EXCLUSIVE"
SHARE = "SHARE"
SHARE_UPDATE_EXCLUSIVE = "SHARE UPDATE EXCLUSIVE"
ROW_EXCLUSIVE = "ROW EXCLUSIVE"

LOCKS: dict[str, str] = {
    "drop-table": ACCESS_EXCLUSIVE,
    "drop-column": ACCESS_EXCLUSIVE,
    "truncate": ACCESS_EXCLUSIVE,
    "delete-without-where": ROW_EXCLUSIVE,
    "update-without-where": ROW_EXCLUSIVE,
    "alter-column-type": ACCESS_EXCLUSIVE,
    "create-index-not-concurrently": SHARE,
    "add-column-volatile-default": ACCESS_EXCLUSIVE,
    "add-column-not-null-without-default": ACCESS_EXCLUSIVE,
    "set-not-null": ACCESS_EXCLUSIVE,
    "add-foreign-key-validated": SHARE_ROW_EXCLUSIVE,
    "add-check-validated": ACCESS_EXCLUSIVE,
    "add-unique-without-index": ACCESS_EXCLUSIVE,
    "add-primary-key-without-index": ACCESS_EXCLUSIVE,
    "drop-index-not-concurrently": ACCESS_EXCLUSIVE,
    "reindex-not-concurrently": SHARE,
    "rename-column": ACCESS_EXCLUSIVE,
    "rename-table": ACCESS_EXCLUSIVE,
    "detach-partition-not-concurrently": ACCESS_EXCLUSIVE,
    "alter-domain-add-constraint-validated": SHARE,
    "vacuum-full": ACCESS_EXCLUSIVE,
    "cluster": ACCESS_EXCLUSIVE,
}
"""The lock each table rule's statement takes on its table (the README's rules table)."""


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
        "add-column-not-null-without-default",
        "add-unique-without-index",
        "add-primary-key-without-index",
        "drop-index-not-concurrently",
        "reindex-not-concurrently",
        "rename-column",
        "rename-table",
        "detach-partition-not-concurrently",
        "alter-domain-add-constraint-validated",
        "vacuum-full",
        "cluster",
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


class _Report(Protocol):
    def __call__(self, rule: str, severity: str, message: str, table: str | None = None) -> None: ...


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

    def __init__(self, names: Iterable[str] | None, existing: Iterable[str] | None = None) -> None:
        self._keys: set[_TableKey] = {_name_key(name) for name in names or ()}
        self._existing = [_name_key(name) for name in existing or ()]

    def add(self, key: _TableKey, *, if_not_exists: bool = False) -> None:
        # CREATE TABLE IF NOT EXISTS of a table the live server already has creates nothing.
        if if_not_exists and any(_same_table(key, old) for old in self._existing):
            return
        self._keys.add(key)

    def discard(self, key: _TableKey) -> None:
        self._keys = {k for k in self._keys if not _same_table(k, key)}

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(_key_name(key) for key in self._keys))

    def __contains__(self, key: _TableKey) -> bool:
        return any(_same_table(k, key) for k in self._keys)


def _name_key(name: str) -> _TableKey:
    schema, _, rel = name.rpartition(".")
    return schema or None, rel


def _same_table(a: _TableKey, b: _TableKey) -> bool:
    # An unqualified name matches the same name in any schema: the search_path is unknown here.
    return a[1] == b[1] and (a[0] is None or b[0] is None or a[0] == b[0])


def _track_new_tables(node: Node, new: _NewTables) -> None:
    kind, body = next(iter(node.items()))
    if kind == "CreateStmt":
        new.add(_rangevar_key(body["relation"]), if_not_exists=bool(body.get("if_not_exists")))
    elif kind == "CreateTableAsStmt":
        new.add(_rangevar_key(body["into"]["rel"]), if_not_exists=bool(body.get("if_not_exists")))
    elif kind == "SelectStmt" and body.get("intoClause"):
        new.add(_rangevar_key(body["intoClause"]["rel"]))
    elif kind == "IndexStmt" and body.get("idxname") and _rangevar_key(body.get("relation", {})) in new:
        # An index of a new table is new too (indexes and tables share pg_class's names).
        new.add((_rangevar_key(body["relation"])[0], body["idxname"]))
    elif kind == "RenameStmt" and body.get("renameType") == "OBJECT_TABLE" and body.get("relation"):
        old = _rangevar_key(body["relation"])
        if old in new:
            new.add((old[0], body.get("newname", "")))
    elif kind == "DropStmt" and body.get("removeType") == "OBJECT_TABLE":
        for obj in body.get("objects", []):
            key = _list_key(obj)
            if key[1]:
                new.discard(key)


def new_tables_after(
    script: Script, new_tables: Iterable[str] | None = None, existing_tables: Iterable[str] | None = None
) -> tuple[str, ...]:
    """The tables known new and empty once ``script`` has run: ``new_tables`` and the tables
    it creates (however: ``CREATE TABLE``, ``IF NOT EXISTS`` unless in ``existing_tables``,
    ``AS``, ``SELECT INTO``, renamed), less those it drops. The planner chains this over
    the pending files of a service."""
    new = _NewTables(new_tables, existing_tables)
    for stmt in script.statements:
        _track_new_tables(stmt.ast, new)
    return new.names()


def relations_named(script: Script) -> frozenset[str]:
    """Every table or index name a statement of ``script`` names, unqualified: what live
    inspection reads the size of (one query per database, whatever the number of files)."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("relname"), str):
                found.add(value["relname"])
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for stmt in script.statements:
        walk(stmt.ast)
        kind, body = next(iter(stmt.ast.items()))
        if kind == "DropStmt" and body.get("removeType") in ("OBJECT_INDEX", "OBJECT_TABLE"):
            found.update(_list_key(obj)[1] for obj in body.get("objects", []) if _list_key(obj)[1])
    return frozenset(found)


def changes_a_column_type(script: Script) -> bool:
    """Whether a statement of ``script`` changes a column's type (ALTER TABLE ... ALTER
    COLUMN ... TYPE): only then does its lint need the live column types."""
    return any(
        cmd.get("subtype") == "AT_AlterColumnType"
        for stmt in script.statements
        if stmt.kind == "AlterTableStmt"
        for cmd in alter_commands(next(iter(stmt.ast.values())))
    )


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
    existing_tables: Iterable[str] | None = None,
    column_types: Mapping[str, Mapping[str, str]] | None = None,
    allow: frozenset[str] | Iterable[str] = frozenset(),
) -> tuple[Finding, ...]:
    """Findings for risky statements in ``script``, in file order.

    ``new_tables``: names (``table`` or ``schema.table``) of tables known to be new and empty
    (the planner passes those earlier pending files create), in addition to the tables the
    file itself creates earlier, however (``CREATE TABLE``, ``CREATE TABLE IF NOT EXISTS``,
    ``CREATE TABLE AS``, ``SELECT INTO``, renames of those). Statements on new tables cannot
    lose data or block anyone and produce no finding.
    ``existing_tables``: tables known to exist already (live): ``CREATE TABLE IF NOT EXISTS``
    of one of them creates nothing, so it stays an old table.
    ``column_types``: per table (``schema.table``), its columns' types as ``format_type``
    writes them, when known (live): a type change that only widens a ``varchar`` is quiet.
    ``allow``: rules silenced for this file from outside (the plan file), in addition to
    ``script.allowed_rules``. An unparsed script has no findings.
    """
    silenced = frozenset(script.allowed_rules) | frozenset(allow)
    findings: list[Finding] = []
    new = _NewTables(new_tables, existing_tables)
    context = _Context(script, new, column_types or {})

    for stmt in script.statements:

        def report(rule: str, severity: str, message: str, table: str | None = None, stmt: Statement = stmt) -> None:
            if rule not in silenced:
                lock = LOCKS.get(rule)
                findings.append(Finding(rule, stmt.line, _shorten(stmt.sql), message, severity, table, lock))

        _lint_statement(stmt, context, report)
        _track_new_tables(stmt.ast, new)
    return tuple(findings)


@dataclass(frozen=True)
class _Context:
    script: Script
    new: _NewTables
    column_types: Mapping[str, Mapping[str, str]]

    def old_type(self, table: _TableKey, column: str) -> str | None:
        for name, columns in self.column_types.items():
            if _same_table(_name_key(name), table) and column in columns:
                return columns[column]
        return None


def _takes(lock: str, where: str) -> str:
    return f"takes {lock} on {where}"


def _lint_statement(stmt: Statement, context: _Context, report: _Report) -> None:
    node = stmt.ast
    kind, body = next(iter(node.items()))
    new = context.new

    if stmt.non_transactional and not context.script.no_transaction_marker:
        report(
            "non-transactional-statement",
            "error",
            f"{stmt.non_transactional} cannot run inside a transaction block and this migration runs in one; "
            f"move it to its own migration whose first line is `{NO_TRANSACTION_MARKER}`.",
        )

    if kind == "DropStmt":
        _lint_drop(body, new, report)
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
        for key in (k for k in tables if k not in new):
            report(
                "truncate",
                "destructive",
                f"TRUNCATE deletes every row of {_key_name(key)} and {_takes(ACCESS_EXCLUSIVE, _key_name(key))}; "
                "make sure the data is no longer needed.",
                _key_name(key),
            )
    elif kind == "IndexStmt":
        table = _rangevar_key(body.get("relation", {}))
        if not body.get("concurrent") and table not in new:
            name = _key_name(table)
            report(
                "create-index-not-concurrently",
                "locking",
                f"CREATE INDEX {_takes(SHARE, name)}, blocking every write to it until the index is built; "
                f"use CREATE INDEX CONCURRENTLY in a migration whose first line is `{NO_TRANSACTION_MARKER}`.",
                name,
            )
    elif kind == "AlterTableStmt" and body.get("objtype", "OBJECT_TABLE") == "OBJECT_TABLE":
        table = _rangevar_key(body.get("relation", {}))
        if table not in new:
            _lint_alter_table(table, body, context, report)
    elif kind == "RenameStmt":
        _lint_rename(body, new, report)
    elif kind == "ReindexStmt":
        _lint_reindex(body, new, report)
    elif kind == "VacuumStmt" and body.get("is_vacuumcmd"):
        options = {o.get("DefElem", {}).get("defname") for o in body.get("options", [])}
        if "full" in options:
            for rel in body.get("rels", []) or [{}]:
                key = _rangevar_key(rel.get("VacuumRelation", {}).get("relation", {}))
                if key[1] and key in new:
                    continue
                where = _key_name(key) if key[1] else "every table of the database"
                report(
                    "vacuum-full",
                    "locking",
                    f"VACUUM FULL rewrites {where} and {_takes(ACCESS_EXCLUSIVE, 'it')} (no reads, no writes) until done; "
                    "use plain VACUUM, or pg_repack outside the migration to reclaim space online.",
                    _key_name(key) if key[1] else None,
                )
    elif kind == "ClusterStmt":
        key = _rangevar_key(body.get("relation") or {})
        if not (key[1] and key in new):
            where = _key_name(key) if key[1] else "every clustered table of the database"
            report(
                "cluster",
                "locking",
                f"CLUSTER rewrites {where} in index order and {_takes(ACCESS_EXCLUSIVE, 'it')} (no reads, no writes) "
                "until done; use pg_repack outside the migration instead.",
                _key_name(key) if key[1] else None,
            )
    elif kind == "AlterDomainStmt" and body.get("subtype") == "C":
        constraint = (body.get("def") or {}).get("Constraint", {})
        if not constraint.get("skip_validation"):
            domain = _names(body.get("typeName", []))
            report(
                "alter-domain-add-constraint-validated",
                "locking",
                f"ALTER DOMAIN {domain} ADD CONSTRAINT checks every column of the domain in every table and "
                f"{_takes(SHARE, 'each of those tables')} (no writes) while it does; add it NOT VALID, then "
                "ALTER DOMAIN ... VALIDATE CONSTRAINT in a later statement or migration.",
            )

    _lint_dml(node, new, report)


def _lint_drop(body: Node, new: _NewTables, report: _Report) -> None:
    remove = body.get("removeType")
    names = [_drop_object_name(o) for o in body.get("objects", [])]
    listed = ", ".join(names)
    cascade = body.get("behavior") == "DROP_CASCADE"
    if remove == "OBJECT_TABLE":
        old = [n for n, o in zip(names, body.get("objects", [])) if _list_key(o) not in new]
        if old:
            report(
                "drop-table",
                "destructive",
                f"DROP TABLE deletes {', '.join(old)} and every row in it for good; "
                "make sure nothing reads it any more and the data is backed up or no longer needed.",
                old[0] if len(old) == 1 else None,
            )
    elif remove == "OBJECT_INDEX" and not body.get("concurrent"):
        for name, obj in zip(names, body.get("objects", [])):
            if _list_key(obj) in new:
                continue
            report(
                "drop-index-not-concurrently",
                "locking",
                f"DROP INDEX {name} {_takes(ACCESS_EXCLUSIVE, 'its table')} (no reads, no writes), and waits behind "
                "every query on it; use DROP INDEX CONCURRENTLY in a migration whose first line is "
                f"`{NO_TRANSACTION_MARKER}`.",
                name,
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


def _lint_rename(body: Node, new: _NewTables, report: _Report) -> None:
    relation = body.get("relation")
    if not relation:
        return
    key = _rangevar_key(relation)
    if key in new:
        return
    table = _key_name(key)
    if body.get("renameType") == "OBJECT_COLUMN" and body.get("relationType") == "OBJECT_TABLE":
        report(
            "rename-column",
            "destructive",
            f"renaming {table}.{body.get('subname', '?')} to {body.get('newname', '?')} breaks every running "
            "client that still uses the old name (and it takes ACCESS EXCLUSIVE on "
            f"{table}); add the new column, deploy code that uses it, then drop the old one.",
            table,
        )
    elif body.get("renameType") == "OBJECT_TABLE":
        report(
            "rename-table",
            "destructive",
            f"renaming table {table} to {body.get('newname', '?')} breaks every running client that still uses "
            f"the old name (and it takes ACCESS EXCLUSIVE on {table}); deploy code that reads both first, "
            "or leave a view under the old name.",
            table,
        )


def _lint_reindex(body: Node, new: _NewTables, report: _Report) -> None:
    params = {p.get("DefElem", {}).get("defname") for p in body.get("params", [])}
    if "concurrently" in params or body.get("concurrent"):
        return
    kind = body.get("kind", "")
    relation = body.get("relation") or {}
    key = _rangevar_key(relation) if relation else (None, body.get("name", ""))
    if kind in ("REINDEX_OBJECT_TABLE", "REINDEX_OBJECT_INDEX") and key in new:
        return
    if kind == "REINDEX_OBJECT_INDEX":
        what, table = f"index {_key_name(key)}", _key_name(key)
        effect = f"{_takes(SHARE, 'its table')} (no writes) and ACCESS EXCLUSIVE on the index (no reads using it)"
    elif kind == "REINDEX_OBJECT_TABLE":
        what, table = f"every index of {_key_name(key)}", _key_name(key)
        effect = f"{_takes(SHARE, table)} (no writes) and ACCESS EXCLUSIVE on each index in turn"
    else:
        what, table = f"every index of {kind.removeprefix('REINDEX_OBJECT_').lower()} {key[1]}".rstrip(), None
        effect = f"{_takes(SHARE, 'each table')} (no writes) and ACCESS EXCLUSIVE on each index in turn"
    report(
        "reindex-not-concurrently",
        "locking",
        f"REINDEX rebuilds {what} and {effect} until done; use REINDEX ... CONCURRENTLY in a migration "
        f"whose first line is `{NO_TRANSACTION_MARKER}`.",
        table,
    )


def _lint_dml(node: Node, new: _NewTables, report: _Report) -> None:
    for dml, dml_body in _dml_statements(node):
        if dml not in ("DeleteStmt", "UpdateStmt") or dml_body.get("whereClause"):
            continue
        key = _rangevar_key(dml_body.get("relation", {}))
        if key in new:
            continue
        table = _key_name(key)
        if dml == "DeleteStmt":
            report(
                "delete-without-where",
                "destructive",
                f"DELETE without WHERE deletes every row of {table}; add a WHERE clause, "
                "or allow the rule if emptying the table is intended.",
                table,
            )
        else:
            report(
                "update-without-where",
                "destructive",
                f"UPDATE without WHERE changes every row of {table} and locks them all (ROW EXCLUSIVE on {table}, "
                "and every row until commit); add a WHERE clause (and batch large updates), or allow the rule if intended.",
                table,
            )


def _list_key(obj: Node) -> _TableKey:
    parts = [i.get("String", {}).get("sval", "") for i in obj.get("List", {}).get("items", [])]
    if not parts:
        return None, ""
    return (parts[-2] if len(parts) > 1 else None), parts[-1]


_TEXT_TYPES = frozenset({"varchar", "text"})


def _type_change_rewrites(cmd: Node, old_type: str | None) -> bool | None:
    """Whether ``ALTER COLUMN ... TYPE`` rewrites the table: False for a change PostgreSQL
    makes in the catalog only (a ``varchar`` widened, or made ``text`` or unbounded), True
    for any other, None when that depends on the column's current type, not known here."""
    column = (cmd.get("def") or {}).get("ColumnDef", {})
    if column.get("raw_default"):  # USING: every row is computed again
        return True
    type_name = column.get("typeName", {})
    names = [n.get("String", {}).get("sval", "") for n in type_name.get("names", [])]
    target = names[-1] if names else ""
    if target not in _TEXT_TYPES or type_name.get("arrayBounds"):
        return True
    mods = type_name.get("typmods", [])
    new_length = mods[0].get("A_Const", {}).get("ival", {}).get("ival") if mods else None
    if old_type is None:
        return None
    if old_type in ("text", "character varying"):
        old_length = None
    elif old_type.startswith("character varying("):
        old_length = int(old_type.removeprefix("character varying(").rstrip(")"))
    else:
        return True  # any other type to text or varchar converts every value
    if new_length is None:
        return False
    return old_length is None or new_length < old_length


def _lint_alter_table(key: _TableKey, body: Node, context: _Context, report: _Report) -> None:
    table = _key_name(key)
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
                table,
            )
        elif subtype == "AT_AlterColumnType":
            rewrites = _type_change_rewrites(cmd, context.old_type(key, column))
            if rewrites is False:
                continue
            unless = (
                " unless it only widens a varchar or text column (then no rewrite)" if rewrites is None else ""
            )
            report(
                "alter-column-type",
                "locking",
                f"changing the type of {table}.{column} {_takes(ACCESS_EXCLUSIVE, table)} and rewrites the table "
                f"and its indexes{unless}; add a new column, backfill it in batches and switch over instead.",
                table,
            )
        elif subtype == "AT_SetNotNull":
            report(
                "set-not-null",
                "locking",
                f"SET NOT NULL on {table}.{column} scans the whole table and {_takes(ACCESS_EXCLUSIVE, table)}; "
                "first add CHECK (" + column + " IS NOT NULL) NOT VALID and VALIDATE it, then SET NOT NULL is instant.",
                table,
            )
        elif subtype == "AT_AddColumn" and "ColumnDef" in definition:
            _lint_add_column(table, definition["ColumnDef"], report)
        elif subtype == "AT_AddConstraint" and "Constraint" in definition:
            _lint_add_constraint(table, definition["Constraint"], report)
        elif subtype == "AT_DetachPartition":
            partition = definition.get("PartitionCmd", {})
            if not partition.get("concurrent"):
                name = _key_name(_rangevar_key(partition.get("name", {})))
                report(
                    "detach-partition-not-concurrently",
                    "locking",
                    f"DETACH PARTITION {name} {_takes(ACCESS_EXCLUSIVE, table)} (no reads, no writes of any "
                    "partition); use DETACH PARTITION ... CONCURRENTLY in a migration whose first line is "
                    f"`{NO_TRANSACTION_MARKER}`.",
                    table,
                )


def _lint_add_column(table: str, column: Node, report: _Report) -> None:
    name = column.get("colname", "?")
    reason = _rewriting_column(column)
    if reason:
        report(
            "add-column-volatile-default",
            "locking",
            f"adding {table}.{name} rewrites the whole table and {_takes(ACCESS_EXCLUSIVE, table)} because "
            f"{reason}; add the column without a default, backfill it in batches, then set the default.",
            table,
        )
        return
    contypes = {c.get("Constraint", {}).get("contype") for c in column.get("constraints", [])}
    if "CONSTR_NOTNULL" in contypes and "CONSTR_DEFAULT" not in contypes and "CONSTR_GENERATED" not in contypes:
        report(
            "add-column-not-null-without-default",
            "locking",
            f"adding {table}.{name} NOT NULL without a DEFAULT fails (column contains null values) as soon as "
            f"{table} has a row; it {_takes(ACCESS_EXCLUSIVE, table)} too; give it a DEFAULT, or add it nullable, "
            "backfill it and set NOT NULL afterwards.",
            table,
        )


def _lint_add_constraint(table: str, constraint: Node, report: _Report) -> None:
    name = constraint.get("conname") or "(unnamed)"
    contype = constraint.get("contype")
    if contype in ("CONSTR_UNIQUE", "CONSTR_PRIMARY") and not constraint.get("indexname"):
        what = "unique constraint" if contype == "CONSTR_UNIQUE" else "primary key"
        report(
            "add-unique-without-index" if contype == "CONSTR_UNIQUE" else "add-primary-key-without-index",
            "locking",
            f"adding {what} {name} on {table} builds its index while it {_takes(ACCESS_EXCLUSIVE, table)} "
            "(no reads, no writes); build a unique index CONCURRENTLY first, then add the constraint "
            "USING INDEX, which is instant.",
            table,
        )
    if constraint.get("skip_validation"):
        return
    if contype == "CONSTR_FOREIGN":
        referenced = _key_name(_rangevar_key(constraint.get("pktable", {})))
        report(
            "add-foreign-key-validated",
            "locking",
            f"adding foreign key {name} on {table} checks every row and {_takes(SHARE_ROW_EXCLUSIVE, table)} "
            f"and on {referenced} (no writes to either) while it does; add it NOT VALID, then VALIDATE CONSTRAINT "
            "(SHARE UPDATE EXCLUSIVE, writes go on) in a later statement or migration.",
            table,
        )
    elif contype == "CONSTR_CHECK":
        report(
            "add-check-validated",
            "locking",
            f"adding check constraint {name} on {table} scans every row and {_takes(ACCESS_EXCLUSIVE, table)}; "
            "add it NOT VALID, then VALIDATE CONSTRAINT (SHARE UPDATE EXCLUSIVE, writes go on) in a later "
            "statement or migration.",
            table,
        )

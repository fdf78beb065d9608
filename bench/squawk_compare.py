"""dbplan's lint beside squawk's, on the same files (issue 14, item 4).

    PYTHONPATH=. python bench/squawk_compare.py [FILES_OR_FOLDERS...]

Default: the example migrations (migrations/) and bench/risky/, one risky file per rule.
Runs the ``squawk`` binary (pip install squawk-cli) on each file, with
``--assume-in-transaction`` unless the file starts with ``-- dbplan:no-transaction``
(dbplan runs every other file in a transaction), and dbplan's lint module on it (each
file alone, every table in it taken as an existing, full one: what ``dbplan lint`` does
with no selection). Prints a Markdown table: file, squawk's rules, dbplan's rules, and
squawk's findings about locks, rewrites or lost data that dbplan does not have. Exits 1
if there is one that the README's lint section does not explain (MOOT below).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from orchestrator.migrations.lint import lint
from orchestrator.migrations.sqlscript import NO_TRANSACTION_MARKER, parse_script

REPO = Path(__file__).resolve().parent.parent

# squawk's rules about locks, rewrites and lost data, and the dbplan rules that find the same.
RISK: dict[str, frozenset[str]] = {
    "adding-field-with-default": frozenset({"add-column-volatile-default"}),
    "adding-foreign-key-constraint": frozenset({"add-foreign-key-validated"}),
    "adding-not-nullable-field": frozenset({"set-not-null"}),
    "adding-required-field": frozenset({"add-column-not-null-without-default"}),
    "adding-serial-primary-key-field": frozenset({"add-primary-key-without-index", "add-column-volatile-default"}),
    "ban-alter-domain-with-add-constraint": frozenset({"alter-domain-add-constraint-validated"}),
    "ban-concurrent-index-creation-in-transaction": frozenset({"non-transactional-statement"}),
    "ban-drop-column": frozenset({"drop-column"}),
    "ban-drop-database": frozenset({"drop-database"}),
    "ban-drop-schema": frozenset({"drop-schema"}),
    "ban-drop-table": frozenset({"drop-table"}),
    "ban-drop-type": frozenset({"drop-type"}),
    "ban-truncate-cascade": frozenset({"truncate"}),
    "changing-column-type": frozenset({"alter-column-type"}),
    "constraint-missing-not-valid": frozenset(
        {"add-check-validated", "add-foreign-key-validated", "add-unique-without-index", "add-primary-key-without-index"}
    ),
    "disallowed-unique-constraint": frozenset({"add-unique-without-index"}),
    "renaming-column": frozenset({"rename-column"}),
    "renaming-table": frozenset({"rename-table"}),
    "require-concurrent-index-creation": frozenset({"create-index-not-concurrently"}),
    "require-concurrent-index-deletion": frozenset({"drop-index-not-concurrently"}),
    "require-concurrent-partition-detach": frozenset({"detach-partition-not-concurrently"}),
    "require-concurrent-reindex": frozenset({"reindex-not-concurrently"}),
}

# squawk's findings that are no risk under dbplan, or not about locks, rewrites or data:
# each is explained in the README's lint section.
MOOT: dict[str, str] = {
    "require-lock-timeout": "dbplan sets lock_timeout itself (per service, default 30s)",
    "require-statement-timeout": "dbplan sets statement_timeout from the plan file",
    "prefer-robust-stmts": "a failed migration rolls back in dbplan's transaction; a no-transaction one is marked dirty",
    "transaction-nesting": "dbplan runs a file's own BEGIN/COMMIT in its transaction (or refuses)",
    "ban-uncommitted-transaction": "dbplan refuses a file whose transaction is left open",
    "ban-create-domain-with-constraint": "a new domain is used by no column yet: nothing locked or rewritten",
    "ban-drop-not-null": "DROP NOT NULL is instant and loses nothing",
}
STYLE = frozenset(
    {
        "ban-char-field",
        "prefer-big-int",
        "prefer-bigint-over-int",
        "prefer-bigint-over-smallint",
        "prefer-identity",
        "prefer-text-field",
        "prefer-timestamptz",
        "require-table-schema",
    }
)


def sql_files(paths: list[Path]) -> list[Path]:
    """The files named, and in each folder its up files and other .sql files (no down files)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.sql") if not p.name.endswith(".down.sql"))
        else:
            files.append(path)
    return files


def squawk_rules(path: Path) -> list[str]:
    binary = shutil.which("squawk") or str(Path(sys.executable).parent / "squawk")
    transactional = not path.read_text(encoding="utf-8").startswith(NO_TRANSACTION_MARKER)
    args = [binary, "--reporter", "json", *(["--assume-in-transaction"] if transactional else []), str(path)]
    run = subprocess.run(args, capture_output=True, text=True, check=False)
    return sorted({finding["rule_name"] for finding in json.loads(run.stdout or "[]")})


def dbplan_rules(path: Path) -> list[str]:
    return sorted({finding.rule for finding in lint(parse_script(path.read_text(encoding="utf-8")))})


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or [REPO / "migrations", REPO / "bench" / "risky"]
    rows = []
    unexplained: list[str] = []
    risk_total = covered_total = 0
    for path in sql_files(paths):
        squawk, dbplan = squawk_rules(path), dbplan_rules(path)
        missed = []
        for rule in squawk:
            if rule in RISK:
                risk_total += 1
                if RISK[rule] & set(dbplan):
                    covered_total += 1
                else:
                    missed.append(rule)
                    unexplained.append(f"{path.name}: {rule}")
            elif rule not in MOOT and rule not in STYLE:
                unexplained.append(f"{path.name}: {rule} (rule unknown to this script)")
        shown_squawk = [r for r in squawk if r not in ("require-lock-timeout", "require-statement-timeout")]
        rows.append((str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path), shown_squawk, dbplan, missed))

    print("| file | squawk (less the timeout rules) | dbplan | squawk risk finding dbplan lacks |")
    print("|---|---|---|---|")
    for file, squawk, dbplan, missed in rows:
        print(f"| {file} | {', '.join(squawk) or '-'} | {', '.join(dbplan) or '-'} | {', '.join(missed) or '-'} |")
    print()
    print(f"{len(rows)} files; squawk's lock/rewrite/data-loss findings: {risk_total}, found by dbplan too: {covered_total}.")
    print("require-lock-timeout and require-statement-timeout (every file) are moot: " + MOOT["require-lock-timeout"] + ".")
    for item in unexplained:
        print(f"NOT COVERED: {item}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

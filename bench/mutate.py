#!/usr/bin/env python3
"""Mutation benchmark: do the tests notice when the code is wrong?

Run by hand (never part of the test suite):

    python bench/mutate.py                                  # every module, 60 mutants each
    python bench/mutate.py --module planner --mutants 20    # one module, fewer mutants
    python bench/mutate.py --module sqlscript --list        # show the mutants, run nothing
    python bench/mutate.py --equivalent bench/equivalent-mutants.txt   # the default

For each module (``MODULES``) it parses the source with ``ast``, lists every place a small
mistake can be made (a comparison flipped, ``and`` for ``or``, a condition negated, an
integer off by one, a return value replaced by None, a statement deleted, True for
False, a keyword-like string changed), picks N of them with a seeded random generator
(the same seed and source give the same mutants), and for each writes the mutated module
into a temporary copy of the repository (never into the working tree) and runs the
module's tests there (``pytest -x -q`` with a timeout). A mutant the tests fail on is
killed; one they pass is a survivor: either a gap in the tests or an equivalent mutant (a
change that does not change behaviour), which a person records in the equivalent file
with the reason. The score is killed / (mutants - equivalent); a timeout counts as killed.

Modules whose tests need PostgreSQL get two throwaway servers, started once for the run
(``DBPLAN_TEST_URL``, ``DBPLAN_TEST_URL2``). Only the standard library and, for those
servers, ``orchestrator.server.embedded`` of this checkout are imported.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_EQUIVALENT = REPO / "bench" / "equivalent-mutants.txt"


@dataclass(frozen=True)
class Target:
    source: str  # relative to the repository
    tests: tuple[str, ...]  # the test files that cover it
    needs_server: bool = False


MODULES: dict[str, Target] = {
    "planner": Target("orchestrator/planning/planner.py", ("tests/test_planner.py",)),
    "sqlscript": Target(
        "orchestrator/migrations/sqlscript.py", ("tests/test_sqlscript.py", "tests/test_migrations_scan.py")
    ),
    "scan": Target("orchestrator/migrations/scan.py", ("tests/test_migrations_scan.py",)),
    "bookkeeping": Target(
        "orchestrator/execution/bookkeeping.py",
        ("tests/test_bookkeeping.py", "tests/test_core_flow.py", "tests/test_batches.py"),  # quickest first: -x
        needs_server=True,
    ),
}


# --------------------------------------------------------------------------------------
# finding mutants


@dataclass(frozen=True)
class Mutant:
    module: str
    line: int  # 1-based, in the original source
    start: int  # character offsets of the replaced text in the original source
    end: int
    replacement: str
    description: str
    code: str  # the first line of the replaced code, for people
    context: str  # the source line it starts on, stripped, and where on it: for the key
    column: int

    @property
    def key(self) -> str:
        """What the equivalent file records: the line's text, not its number, so that edits
        above it do not make a recorded judgement point at another mutant."""
        return f"{self.module} | {self.description} | {self.context} @{self.column}"

    def apply(self, source: str) -> str:
        return source[: self.start] + self.replacement + source[self.end :]


_COMPARE_SWAPS: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}  # fmt: skip
_SYMBOLS: dict[type[ast.cmpop], str] = {
    ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
    ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not",
}  # fmt: skip
# Constructors whose string arguments are mostly prose for people (messages, hints):
# changing a sentence is a wording change, not a behaviour the score is about.
_PROSE_CALL = re.compile(r"(Error|Warning|Blocker|Place|Finding)$")
_WORDLIKE = re.compile(r"^[\w:.\-]+$")
_SQL_WORD = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|TABLE|SCHEMA|SET|WITH|RETURNING|WHERE|EXISTS|PREPARE|EXECUTE|"
    r"DEALLOCATE|PRIMARY|KEY|NOT|NULL|DEFAULT|INTO|FROM|VALUES|IF)\b"
)

# Mistakes in SQL text that still parse: a weaker type, a guard dropped, a flag inverted.
_SQL_EDITS = (
    (r"\bbigint\b", "integer"),
    (r"IF NOT EXISTS ", ""),
    (r"\bNOT EXISTS\b", "EXISTS"),
    (r"\bNOT NULL\b", "NULL"),
    (r"\btrue\b", "false"),
    (r"\bfalse\b", "true"),
    (r"\$6\b", "$1"),
)


def _is_keyword_like(text: str, *, in_message: bool) -> bool:
    """Strings a program compares or sends (SQL, node names, rule names), not prose. In a
    message's constructor only single words count (``rule="drift"``)."""
    if _WORDLIKE.match(text):
        return True
    return not in_message and bool(_SQL_WORD.search(text) or text.strip() in ("", ",", ";", "(", ")"))


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


class _Finder(ast.NodeVisitor):
    """Walks a module and lists every mutation site, in source order."""

    def __init__(self, module: str, source: str) -> None:
        self.module = module
        self.source = source
        self.lines = source.splitlines(keepends=True)
        starts = [0]
        for text in self.lines:
            starts.append(starts[-1] + len(text))
        self.line_starts = starts
        self.mutants: list[Mutant] = []
        self._prose_depth = 0

    # -- positions ------------------------------------------------------------------

    def _offset(self, line: int, col_bytes: int) -> int:
        text = self.lines[line - 1]
        return self.line_starts[line - 1] + len(text.encode("utf-8")[:col_bytes].decode("utf-8"))

    def _span(self, node: ast.AST) -> tuple[int, int]:
        return (
            self._offset(node.lineno, node.col_offset),  # type: ignore[attr-defined]
            self._offset(node.end_lineno, node.end_col_offset),  # type: ignore[attr-defined]
        )

    def _text(self, node: ast.AST) -> str:
        start, end = self._span(node)
        return self.source[start:end]

    def _add(self, node: ast.AST, replacement: str, description: str) -> None:
        start, end = self._span(node)
        code = self.source[start:end].split("\n", 1)[0].strip()
        line = self.lines[node.lineno - 1]  # type: ignore[attr-defined]
        context = line.strip()
        column = start - self.line_starts[node.lineno - 1] - (len(line) - len(line.lstrip()))  # type: ignore[attr-defined]
        self.mutants.append(
            Mutant(self.module, node.lineno, start, end, replacement, description, code, context, column)  # type: ignore[attr-defined]
        )

    # -- what is never mutated -------------------------------------------------------

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        return  # f-strings build messages; positions inside them are unreliable before 3.12

    def visit_arg(self, node: ast.arg) -> None:
        return  # annotations are never evaluated (from __future__ import annotations)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.visit(default)
        self._visit_body(node.body)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._visit_body(node.body)

    def visit_Module(self, node: ast.Module) -> None:
        self._visit_body(node.body)

    def visit_Import(self, node: ast.Import) -> None:
        return

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        return

    def visit_Assert(self, node: ast.Assert) -> None:
        return  # asserts narrow types for mypy

    def visit_Assign(self, node: ast.Assign) -> None:
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return
        if any(isinstance(t, (ast.Subscript, ast.Attribute)) for t in node.targets):
            self._delete(node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        prose = bool(_PROSE_CALL.search(name))
        self._prose_depth += prose
        self.generic_visit(node)
        self._prose_depth -= prose

    def _visit_body(self, body: list[ast.stmt]) -> None:
        for statement in body:
            if _is_docstring(statement):
                continue  # docstrings, and the attribute docstrings of dataclasses
            self.visit(statement)

    # -- mutations -------------------------------------------------------------------

    def _delete(self, node: ast.stmt) -> None:
        self._add(node, "pass", "delete statement")

    def visit_Expr(self, node: ast.Expr) -> None:
        self._delete(node)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._delete(node)
        self.generic_visit(node)

    def visit_Raise(self, node: ast.Raise) -> None:
        self._delete(node)
        self.generic_visit(node)

    def visit_Continue(self, node: ast.Continue) -> None:
        self._delete(node)

    def visit_Break(self, node: ast.Break) -> None:
        self._delete(node)

    def visit_Return(self, node: ast.Return) -> None:
        if node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None):
            self._add(node, "return None", "return None")
        self.generic_visit(node)

    def _negate(self, test: ast.expr) -> None:
        self._add(test, f"(not ({self._text(test)}))", "negate condition")

    def visit_If(self, node: ast.If) -> None:
        self._negate(node.test)
        if not node.orelse:
            self._delete(node)
        self.visit(node.test)
        self._visit_body(node.body)
        self._visit_body(node.orelse)

    def visit_While(self, node: ast.While) -> None:
        self._negate(node.test)
        self.generic_visit(node)

    def visit_IfExp(self, node: ast.IfExp) -> None:
        self._negate(node.test)
        self.generic_visit(node)

    def visit_comprehension(self, node: ast.comprehension) -> None:
        for condition in node.ifs:
            self._negate(condition)
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        for index, op in enumerate(node.ops):
            swapped = _COMPARE_SWAPS.get(type(op))
            if swapped is None:
                continue
            ops = list(node.ops)
            ops[index] = swapped()
            mutated = ast.Compare(left=node.left, ops=ops, comparators=node.comparators)
            self._add(node, f"({ast.unparse(mutated)})", f"`{_SYMBOLS[type(op)]}` -> `{_SYMBOLS[swapped]}`")
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        words = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
        self._add(node, f"({ast.unparse(ast.BoolOp(op=other, values=node.values))})", f"`{words[0]}` -> `{words[1]}`")
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if isinstance(node.op, ast.Not):
            self._add(node, f"({self._text(node.operand)})", "remove `not`")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        value = node.value
        if isinstance(value, bool):
            self._add(node, repr(not value), f"`{value}` -> `{not value}`")
        elif isinstance(value, int):
            self._add(node, repr(value + 1), f"`{value}` -> `{value + 1}`")
            if value > 0:
                self._add(node, repr(value - 1), f"`{value}` -> `{value - 1}`")
        elif isinstance(value, str) and _is_keyword_like(value, in_message=self._prose_depth > 0):
            edits = [(pattern, to) for pattern, to in _SQL_EDITS if re.search(pattern, value)]
            for pattern, to in edits:  # SQL text: a plausible mistake, not a syntax error
                self._add(node, repr(re.sub(pattern, to, value, count=1)), f"SQL {pattern!r} -> {to!r}")
            if not edits:
                self._add(node, repr("XX" + value + "XX"), f"string {value[:30]!r} -> 'XX...XX'")


def find_mutants(module: str, source: str) -> list[Mutant]:
    finder = _Finder(module, source)
    finder.visit(ast.parse(source))
    return sorted(finder.mutants, key=lambda m: (m.start, m.end, m.description))


def pick(mutants: list[Mutant], count: int, seed: str) -> list[Mutant]:
    if count <= 0 or count >= len(mutants):
        return mutants
    chosen = random.Random(f"{seed}:{mutants[0].module}").sample(range(len(mutants)), count)
    return [mutants[index] for index in sorted(chosen)]


def read_equivalent(path: Path) -> dict[str, str]:
    """``key`` lines (as the report prints them) with the reason in the ``#`` lines above."""
    judged: dict[str, str] = {}
    reason: list[str] = []
    after_key = False
    if not path.exists():
        return judged
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line:
            reason, after_key = [], False
        elif line.startswith("#"):
            if after_key:  # a new group's reason
                reason, after_key = [], False
            reason.append(line.lstrip("# "))
        else:
            judged[line] = " ".join(reason)
            after_key = True
    return judged


# --------------------------------------------------------------------------------------
# running the tests against a mutant


def copy_repository(into: Path, tests_at: str | None) -> Path:
    """The repository without git, caches or embedded data: tests run here, cwd included,
    so nothing can import the working tree's unmutated modules. ``tests_at``: the tests
    folder as it was at that commit (the score before new tests), the code as it is."""
    ignore = shutil.ignore_patterns(".git", "__pycache__", ".dbplan", ".mypy_cache", ".ruff_cache", "*.pyc")
    copy = into / "repo"
    shutil.copytree(REPO, copy, ignore=ignore)
    if tests_at:
        shutil.rmtree(copy / "tests")
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", tests_at, "tests"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(copy)], input=archive, check=True)
    return copy


@dataclass
class Outcome:
    mutant: Mutant | None
    status: str  # killed, survived, timeout, equivalent (survived, judged so), invalid
    seconds: float
    detail: str = ""


def run_tests(copy: Path, target: Target, timeout: float, env: dict[str, str]) -> tuple[str, float, str]:
    tests = [t for t in target.tests if (copy / t).exists()]
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    began = time.monotonic()
    # A session of its own: on a timeout the whole group goes (dbplan children, servers).
    process = subprocess.Popen(
        command, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return "timeout", time.monotonic() - began, ""
    seconds = time.monotonic() - began
    if process.returncode == 0:
        return "survived", seconds, ""
    failed = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return "killed", seconds, (failed[0] if failed else output.strip().splitlines()[-1:] or [""])[0]


def test_env(copy: Path, urls: tuple[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DBPLAN_TEST_URL", "DBPLAN_TEST_URL2")}
    env.update(PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1", NO_COLOR="1")
    if urls is not None:
        env.update(DBPLAN_TEST_URL=urls[0], DBPLAN_TEST_URL2=urls[1])
    return env


class Servers:
    """Two throwaway PostgreSQL servers for the whole run, for the modules that need them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.servers: list[object] = []

    def urls(self) -> tuple[str, str]:
        if not self.servers:
            sys.path.insert(0, str(REPO))
            from orchestrator.server.embedded import EmbeddedServer

            os.chmod(self.folder, 0o755)  # reachable for the account PostgreSQL runs as under root
            self.servers = [EmbeddedServer(self.folder / name, durable=False) for name in ("main", "second")]
        return tuple(server.ensure_running() for server in self.servers)  # type: ignore[attr-defined,return-value]

    def close(self) -> None:
        for server in self.servers:
            try:
                server.destroy()  # type: ignore[attr-defined]
            except Exception as err:  # noqa: BLE001 - the other server still has to go
                print(f"mutate: could not remove a test server: {err}", file=sys.stderr)


def mutate_module(
    name: str, copy: Path, args: argparse.Namespace, servers: Servers, judged: dict[str, str]
) -> list[Outcome]:
    target = MODULES[name]
    path = copy / target.source
    original = path.read_text()
    every = find_mutants(name, original)
    keys = {m.key for m in every}
    for stale in sorted(k for k in judged if k.startswith(f"{name} | ") and k not in keys):
        print(f"mutate: judged equivalent, but no such mutant any more (its line changed): {stale}", file=sys.stderr)
    mutants = pick(every, args.mutants, args.seed)
    if args.only:  # after picking, so that the numbers stay those of the full run
        mutants = [m for m in mutants if args.only in m.key]
    env = test_env(copy, servers.urls() if target.needs_server else None)
    status, baseline, detail = run_tests(copy, target, timeout=600, env=env)
    if status != "survived":
        sys.exit(f"mutate: the tests of {name} fail without any mutant ({detail}); fix that first")
    # Generous: on a shared machine a run can take several times as long, and a survivor
    # cut short would count as killed.
    timeout = args.timeout or max(60.0, 5 * baseline)
    print(f"\n{name}: {len(mutants)} mutants of {target.source}; tests {', '.join(target.tests)} "
          f"take {baseline:.1f} s unmutated (timeout {timeout:.0f} s)", flush=True)  # fmt: skip
    outcomes: list[Outcome] = []
    try:
        for number, mutant in enumerate(mutants, 1):
            text = mutant.apply(original)
            try:
                compile(text, str(path), "exec")
            except SyntaxError as err:
                outcomes.append(Outcome(mutant, "invalid", 0.0, str(err)))
                continue
            path.write_text(text)
            status, seconds, detail = run_tests(copy, target, timeout, env)
            if status == "survived" and mutant.key in judged:
                status = "equivalent"
            outcomes.append(Outcome(mutant, status, seconds, detail))
            print(f"  [{number:>3}/{len(mutants)}] {status:<10} {seconds:5.1f} s  "
                  f"{target.source.rsplit('/', 1)[1]}:{mutant.line}  {mutant.description}  `{mutant.code}`", flush=True)  # fmt: skip
    finally:
        path.write_text(original)
    return outcomes


# --------------------------------------------------------------------------------------
# the report


def summarize(name: str, outcomes: list[Outcome], judged: dict[str, str]) -> dict[str, object]:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("killed", "timeout", "survived", "equivalent", "invalid")}
    scored = counts["killed"] + counts["timeout"] + counts["survived"]
    score = (counts["killed"] + counts["timeout"]) / scored if scored else 1.0
    file = MODULES[name].source.rsplit("/", 1)[1]
    return {
        "module": name,
        **counts,
        "score": round(score, 4),
        "survivors": [
            {"where": f"{file}:{o.mutant.line}", "mutation": o.mutant.description, "key": o.mutant.key}
            for o in outcomes
            if o.status == "survived" and o.mutant is not None
        ],
        "equivalent_mutants": [
            {"where": f"{file}:{o.mutant.line}", "key": o.mutant.key, "why": judged.get(o.mutant.key, "")}
            for o in outcomes
            if o.status == "equivalent" and o.mutant is not None
        ],
    }


def print_report(summaries: list[dict[str, object]]) -> None:
    print("\nmodule        mutants  killed  timeout  survived  equivalent  score (killed / non-equivalent)")
    for s in summaries:
        total = sum(int(s[k]) for k in ("killed", "timeout", "survived", "equivalent"))  # type: ignore[call-overload]
        print(f"{s['module']:<13} {total:>7}  {s['killed']:>6}  {s['timeout']:>7}  {s['survived']:>8}  "
              f"{s['equivalent']:>10}  {100 * float(s['score']):5.1f}%")  # type: ignore[arg-type]  # fmt: skip
    for s in summaries:
        survivors = s["survivors"]
        if survivors:
            print(f"\nsurvivors of {s['module']} (a test gap, or equivalent: then add the key line to the "
                  "equivalent file with the reason):")  # fmt: skip
            for survivor in survivors:  # type: ignore[attr-defined]
                print(f"  {survivor['where']}: {survivor['mutation']}\n    {survivor['key']}")


def list_mutants(name: str, args: argparse.Namespace, judged: dict[str, str]) -> None:
    target = MODULES[name]
    source = (REPO / target.source).read_text()
    every = find_mutants(name, source)
    chosen = [m for m in pick(every, args.mutants, args.seed) if not args.only or args.only in m.key]
    print(f"\n{name}: {len(chosen)} of {len(every)} possible mutants of {target.source}")
    for mutant in chosen:
        mark = "  (equivalent)" if mutant.key in judged else ""
        print(f"  {mutant.line:>4}  {mutant.description}  `{mutant.code}` -> `{mutant.replacement[:60]}`{mark}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(MODULES), help="repeatable; default: all")
    parser.add_argument("--mutants", type=int, default=60, help="per module (0: every possible mutant)")
    parser.add_argument("--seed", default="1", help="picks the mutants (default 1)")
    parser.add_argument("--timeout", type=float, default=0, help="per mutant, seconds (default 5 x the unmutated run, at least 60)")
    parser.add_argument("--equivalent", type=Path, default=DEFAULT_EQUIVALENT, help="mutants judged equivalent")
    parser.add_argument("--only", metavar="TEXT", help="only the picked mutants whose key contains TEXT")
    parser.add_argument("--list", action="store_true", help="print the mutants and run nothing")
    parser.add_argument("--json", type=Path, help="write the report as JSON too")
    parser.add_argument("--tests-at", metavar="COMMIT", help="run the tests as they were at COMMIT (a score before)")
    args = parser.parse_args(argv)
    names = args.module or list(MODULES)
    judged = read_equivalent(args.equivalent)
    if args.list:
        for name in names:
            list_mutants(name, args, judged)
        return 0
    # Stopped with kill or Ctrl-C: still remove the copy and stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    summaries = []
    with tempfile.TemporaryDirectory(prefix="dbplan-mutate-") as folder:
        copy = copy_repository(Path(folder), args.tests_at)
        servers = Servers(Path(folder) / "servers")
        (Path(folder) / "servers").mkdir()
        try:
            for name in names:
                summaries.append(summarize(name, mutate_module(name, copy, args, servers, judged), judged))
        finally:
            servers.close()
    print_report(summaries)
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

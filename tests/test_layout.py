"""The pipeline is visible in the package's folders: imports point down it, never in a circle.

Read from the source with ``ast`` (nothing is imported), so the test also sees imports that
run late, inside functions or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "orchestrator"

# Each stage may import from the stages before it. errors is shared by all; the thin top
# (api, cli) sees everything.
STAGES = ["errors", "estate", "migrations", "server", "live", "planning", "execution", "verification", "render", "top"]


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    module_level: bool  # runs when the importer is imported (a TYPE_CHECKING block counts)


def module_name(path: Path) -> str:
    parts = ["orchestrator", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def stage_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("api", "cli", "__main__"):
        return "top"
    return parts[1]


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                for target in _targets_from(child, package, known):
                    found.append(Import(module, target, child.lineno, module_level))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "orchestrator":
                        found.append(Import(module, _longest_known(alias.name, known), child.lineno, module_level))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def _targets_from(node: ast.ImportFrom, package: str, known: set[str]) -> list[str]:
    if node.level:
        base = package.split(".")
        base = base[: len(base) - (node.level - 1)]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    if origin.split(".")[0] != "orchestrator":
        return []
    # `from .estate import graph` imports the module orchestrator.estate.graph
    submodules = [f"{origin}.{alias.name}" for alias in node.names if f"{origin}.{alias.name}" in known]
    return submodules or [_longest_known(origin, known)]


def _longest_known(name: str, known: set[str]) -> str:
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def all_imports() -> list[Import]:
    modules = package_modules()
    return [found for name, path in modules.items() for found in imports_of(name, path, set(modules))]


def test_every_module_sits_in_a_known_stage() -> None:
    strays = sorted(m for m in package_modules() if stage_of(m) not in STAGES)
    assert strays == [], f"modules outside the pipeline's folders: {strays}"


def test_imports_point_down_the_pipeline() -> None:
    upward = [
        f"{found.importer} (line {found.line}, stage {stage_of(found.importer)}) imports "
        f"{found.imported} (stage {stage_of(found.imported)})"
        for found in all_imports()
        if STAGES.index(stage_of(found.imported)) > STAGES.index(stage_of(found.importer))
    ]
    assert upward == [], "imports from a later stage into an earlier one:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for found in all_imports():
        if found.module_level and found.imported != found.importer:
            graph.setdefault(found.importer, set()).add(found.imported)
    cycle = find_cycle(graph)
    assert cycle is None, "module-level imports form a cycle: " + " -> ".join(cycle or [])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for following in sorted(graph.get(node, ())):
            if following in on_path:
                return path[path.index(following) :] + [following]
            if following not in done:
                cycle = visit(following)
                if cycle:
                    return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"b2", "c"}, "c": {"b"}}, ["b", "c", "b"]),
    ],
)
def test_find_cycle_finds_what_is_there(graph: dict[str, set[str]], expected: list[str] | None) -> None:
    assert find_cycle(graph) == expected


def test_the_checks_see_imports_inside_functions_and_type_checking(tmp_path: Path) -> None:
    source = tmp_path / "facts.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from ..estate import model\n"
        "if TYPE_CHECKING:\n"
        "    from ..execution.bookkeeping import Tables\n"
        "def late():\n"
        "    from ..render import text\n"
    )
    known = {"orchestrator.estate.model", "orchestrator.execution.bookkeeping", "orchestrator.render.text"}
    found = imports_of("orchestrator.live.facts", source, known)
    assert [(f.imported, f.module_level) for f in found] == [
        ("orchestrator.estate.model", True),
        ("orchestrator.execution.bookkeeping", True),
        ("orchestrator.render.text", False),
    ]

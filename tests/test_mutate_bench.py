"""bench/mutate.py, the mutation benchmark: its mutants are real, valid and reproducible.

The benchmark itself runs by hand (minutes); these only check the part a wrong score
would come from without anyone noticing: which mutants it makes.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mutate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutate_bench", REPO / "bench" / "mutate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutate_bench"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


SAMPLE = '''\
"""Docstring: never mutated."""
from __future__ import annotations

LIMIT: int = 3


def pick(items: list[int], strict: bool = False) -> int | None:
    """Neither is this."""
    found = [i for i in items if i > LIMIT and not strict]
    if not found:
        raise ValueError(f"nothing above {LIMIT}")
    return found[0]


SQL = "CREATE TABLE IF NOT EXISTS t (version bigint NOT NULL)"
'''


def test_each_kind_of_mistake_is_made_where_it_can_be(mutate: ModuleType) -> None:
    mutants = mutate.find_mutants("sample", SAMPLE)
    made = {(m.line, m.description, m.replacement) for m in mutants}
    assert (4, "`3` -> `4`", "4") in made
    assert (9, "`>` -> `>=`", "(i >= LIMIT)") in made
    assert (9, "`and` -> `or`", "(i > LIMIT or not strict)") in made
    assert (9, "remove `not`", "(strict)") in made
    assert (9, "negate condition", "(not (i > LIMIT and not strict))") in made
    assert (10, "delete statement", "pass") in made
    assert (11, "delete statement", "pass") in made
    assert (12, "return None", "return None") in made
    assert (15, "SQL 'IF NOT EXISTS ' -> ''", repr("CREATE TABLE t (version bigint NOT NULL)")) in made
    assert (15, "SQL '\\\\bbigint\\\\b' -> 'integer'", repr("CREATE TABLE IF NOT EXISTS t (version integer NOT NULL)")) in made
    # Docstrings, annotations, defaults' types and f-string messages are left alone.
    assert not [m for m in mutants if m.line in (1, 2, 8)]
    assert not [m for m in mutants if "nothing above" in m.replacement]


def test_every_mutant_of_the_benchmarked_modules_compiles_and_differs(mutate: ModuleType) -> None:
    for name, target in mutate.MODULES.items():
        source = (REPO / target.source).read_text()
        for mutant in mutate.find_mutants(name, source):
            text = mutant.apply(source)
            assert text != source, mutant.key
            ast.parse(text)  # raises on a mutant that does not compile


def test_the_same_seed_picks_the_same_mutants(mutate: ModuleType) -> None:
    source = (REPO / mutate.MODULES["planner"].source).read_text()
    every = mutate.find_mutants("planner", source)
    first = mutate.pick(every, 20, "7")
    assert first == mutate.pick(every, 20, "7")
    assert first != mutate.pick(every, 20, "8")
    assert len(first) == 20 and first == sorted(first, key=lambda m: (m.start, m.end, m.description))


def test_the_equivalent_file_is_read_with_its_reasons(mutate: ModuleType, tmp_path: Path) -> None:
    judged = tmp_path / "equivalent.txt"
    judged.write_text("# why\n# and more\nscan | `1` -> `2` | x = y + 1 @8\n# other\nscan | b | c @1\n\nplanner | a | b | c @0\n")
    assert mutate.read_equivalent(judged) == {
        "scan | `1` -> `2` | x = y + 1 @8": "why and more",
        "scan | b | c @1": "other",
        "planner | a | b | c @0": "",
    }

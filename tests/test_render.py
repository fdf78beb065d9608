"""Golden-file tests of the renderers: the plan as text, JSON and Markdown, and the graph.

Every case in ``render_cases.py`` is planned by the real pipeline (``config.load``, the
graph, the migration scan and ``planner.make_plan``) from a plan file and migration files
written to a temporary folder, with the live state given in memory; no server is needed.
The expected outputs are ``tests/golden/<case>.txt|.json|.md`` (and ``graph_<case>.mmd|.dot``).
After an intended change to an output, refresh them and review the diff like code:

    DBPLAN_UPDATE_GOLDEN=1 python -m pytest tests/test_render.py
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import render_cases
from render_cases import CASES, ROLE_PASSWORD, URL_PASSWORD, Case

from orchestrator.render import graph as render_graph
from orchestrator.render import json as render_json
from orchestrator.render import markdown, text

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("DBPLAN_UPDATE_GOLDEN") == "1"
ESCAPE = "\033["


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Case]:
    """Builds each case once per module, in a folder of its own."""
    built: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in built:
            built[name] = CASES[name](tmp_path_factory.mktemp(name))
        return built[name]

    return get


def assert_golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8", newline="")
        return
    assert path.exists(), f"no golden file {path}; create it with DBPLAN_UPDATE_GOLDEN=1 python -m pytest {__file__}"
    expected = path.read_text(encoding="utf-8")
    assert actual == expected, f"{name} differs from its golden file; if intended, refresh with DBPLAN_UPDATE_GOLDEN=1"


def render_markdown(c: Case, **options: int) -> str:
    return markdown.render_plan(c.plan, sql_for=c.sql_for, graph=c.planned.graph, **options)


RENDERERS: dict[str, Callable[[Case], str]] = {
    "txt": lambda c: text.render_plan(c.plan, color=False),
    "json": lambda c: render_json.render_plan(c.plan),
    "md": render_markdown,
}


# ---------------------------------------------------------------------------
# Golden files


@pytest.mark.parametrize("extension", sorted(RENDERERS))
@pytest.mark.parametrize("name", list(CASES))
def test_plan_matches_golden(case: Callable[[str], Case], name: str, extension: str) -> None:
    c = case(name)
    output = RENDERERS[extension](c)
    assert str(c.planned.estate.root) not in output, "output must not depend on where the estate lives"
    assert_golden(f"{name}.{extension}", output)


@pytest.mark.parametrize("format", ["mermaid", "dot"])
@pytest.mark.parametrize("name", ["new_estate", "awkward_names"])
def test_graph_matches_golden(case: Callable[[str], Case], name: str, format: str) -> None:
    output = render_graph.render(case(name).planned.graph, format)
    assert_golden(f"graph_{name}.{'mmd' if format == 'mermaid' else 'dot'}", output)


def test_golden_cases_cover_what_the_issue_lists(case: Callable[[str], Case]) -> None:
    """The cases really are what their names say, so the goldens show those situations."""
    assert case("new_estate").plan.summary() == {"create_roles": 2, "alter_roles": 0, "create_databases": 2, "change_owners": 0, "apply": 5, "revert": 0}
    assert [s.current for s in case("partly_applied").plan.services] == [1, 1]
    assert [d.version for d in case("drifted").plan.service("product").drift] == [2]
    assert case("dirty").plan.blocked and case("dirty").plan.service("orders").dirty
    assert {"drop-table", "drop-column", "delete-without-where"} <= {w.rule for w in case("destructive").plan.warnings}
    assert case("reverted").plan.summary()["revert"] == 2
    assert not case("up_to_date").plan.changes
    assert case("many_pending").plan.summary()["apply"] == 201


# ---------------------------------------------------------------------------
# Text


@pytest.mark.parametrize("name", ["new_estate", "drifted", "dirty", "destructive", "reverted"])
def test_text_colours_only_when_asked(case: Callable[[str], Case], name: str) -> None:
    plan = case(name).plan
    assert ESCAPE in text.render_plan(plan, color=True)
    assert ESCAPE not in text.render_plan(plan, color=False)
    assert ESCAPE in text.render_status(plan, color=True)
    assert ESCAPE not in text.render_status(plan, color=False)


def test_text_aligns_versions_and_titles(case: Callable[[str], Case]) -> None:
    lines = [line for line in text.render_plan(case("many_pending").plan).splitlines() if line.startswith("  + ")]
    ledger = [line for line in lines if "ledger" in line]
    assert len(ledger) == 200
    assert len({line.index("migrations/") for line in ledger}) == 1, "file names start in one column"
    assert {line.index("ledger_step") for line in ledger} == {8}, "versions are right-aligned"


def test_text_dirty_names_the_version_that_failed(case: Callable[[str], Case]) -> None:
    out = text.render_plan(case("dirty").plan)
    assert "! dirty at version 2" in out  # current is 1: the last version that finished
    assert "! blocked: 2 migrations not planned (versions 2-3)" in out


def test_version_ranges() -> None:
    assert text.version_ranges([7, 1, 2, 3, 5, 8, 9, 3]) == "1-3, 5, 7-9"
    assert text.version_ranges([]) == ""


# ---------------------------------------------------------------------------
# Markdown


def test_markdown_of_200_pending_migrations_fits_a_comment(case: Callable[[str], Case]) -> None:
    out = render_markdown(case("many_pending"))
    assert len(out) <= markdown.MAX_COMMENT_CHARS
    assert "| apply | 200 | `000200_ledger_step_200.up.sql` | yes |" in out, "every pending migration is listed"
    assert "> [!NOTE]\n> Shortened to stay under 60,000 characters" in out
    shown = out.count("<summary>apply ")
    assert 0 < shown < 201
    assert f"the SQL of {201 - shown} of 201 migrations is not shown" in out
    assert f"*SQL of {201 - shown} more migrations not shown, to keep this comment short.*" in out
    assert_balanced(out)


def test_markdown_cuts_a_long_file_and_says_so(case: Callable[[str], Case]) -> None:
    out = render_markdown(case("many_pending"))
    details = out.split("<summary>apply 1 <code>000001_countries.up.sql</code>")[1].split("</details>")[0]
    sql = details.split("```sql\n")[1].split("\n```")[0]
    assert len(sql) <= markdown.MAX_SQL_CHARS_PER_FILE
    assert sql.endswith("');"), "cut at the end of a line"
    assert "*Cut: showing lines 1–" in details and "of 601" in details
    assert "the SQL of 1 file is cut at 8,000 characters" in out


@pytest.mark.parametrize("max_chars", [2_000, 5_000, 12_000, 30_000])
def test_markdown_stays_under_any_limit_and_well_formed(case: Callable[[str], Case], max_chars: int) -> None:
    out = render_markdown(case("many_pending"), max_chars=max_chars)
    assert len(out) <= max_chars
    assert "Shortened to stay under" in out
    assert out.startswith(markdown.COMMENT_MARKER + "\n## dbplan plan\n\n**Plan:** 201 migrations to apply.")
    assert_balanced(out)


@pytest.fixture(scope="module")
def many_services(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return render_cases.many_services(tmp_path_factory.mktemp("many_services"))


@pytest.mark.parametrize("max_chars", [3_000, 20_000, markdown.MAX_COMMENT_CHARS])
def test_markdown_of_300_services_fits_too(many_services: Case, max_chars: int) -> None:
    out = render_markdown(many_services, max_chars=max_chars)
    assert len(out) <= max_chars
    assert "**Plan:** 300 databases to create, 600 migrations to apply. **Risk:** no down file for 300 migrations." in out
    assert "Shortened to stay under" in out
    assert_balanced(out)


def test_markdown_small_plans_are_not_shortened(case: Callable[[str], Case]) -> None:
    for name in CASES:
        if name != "many_pending":
            assert "Shortened" not in render_markdown(case(name)), name


def test_markdown_graph_only_with_more_than_one_service(case: Callable[[str], Case]) -> None:
    assert "```mermaid\nflowchart LR\n" in render_markdown(case("new_estate"))
    assert "```mermaid" not in render_markdown(case("destructive"))  # one service
    assert "```mermaid" not in markdown.render_plan(case("new_estate").plan)  # no graph given


def test_markdown_without_sql_reader_shows_no_sql(case: Callable[[str], Case]) -> None:
    c = case("new_estate")
    out = markdown.render_plan(c.plan, graph=c.planned.graph)
    assert "```sql" not in out and "<summary>apply" not in out
    assert "| apply | 1 | `000001_init_schema.up.sql` | yes |" in out


def test_markdown_says_when_a_file_cannot_be_read(case: Callable[[str], Case]) -> None:
    out = markdown.render_plan(case("destructive").plan, sql_for=lambda file: None)
    assert "*apply 2: the SQL of `migrations/billing/000002_cleanup.up.sql` could not be read.*" in out


def test_markdown_names_cannot_break_tables_or_fences(case: Callable[[str], Case]) -> None:
    markdown_it = pytest.importorskip("markdown_it")
    c = case("awkward_names")
    out = render_markdown(c)
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(out)
    # Each table row keeps its cells: a pipe in a name is escaped, not a column break.
    for row in re.findall(r"<tr>(.*?)</tr>", html, re.S):
        assert row.count("<td") + row.count("<th") in (4, 6), row
    assert "<code>données | prod`s</code>" in html
    assert "<code>000001_a|b `c` &lt;d&gt;.up.sql</code>" in html
    assert "<b>" not in html, "HTML in a name is shown, not interpreted"
    # The SQL holds ``` and </details>: the fence is longer and the details stay closed.
    assert "````sql\nSELECT '```' AS fence, '</details>' AS tag;\n````" in out
    assert_balanced(out)


def test_markdown_escapes_plain_text() -> None:
    assert markdown.md_text("a_b _c_ <b>x</b> | * # snake_case") == r"a_b \_c\_ \<b\>x\</b\> \| \* \# snake_case"
    assert markdown.code("a`b") == "``a`b``"
    assert markdown.code("`x`") == "`` `x` ``"
    assert markdown.code("a|b", in_table=True) == r"`a\|b`"


def assert_balanced(out: str) -> None:
    """Every code fence is closed, and every <details> outside code is closed too."""
    fence: str | None = None
    depth = 0
    for line in out.splitlines():
        if fence is None:
            opening = re.match(r"(`{3,})\w*$", line)
            if opening:
                fence = opening.group(1)
            elif line == "<details>":
                depth += 1
            elif line == "</details>":
                depth -= 1
                assert depth >= 0, "</details> without <details>"
        elif line == fence:
            fence = None
    assert fence is None, "a code fence is left open"
    assert depth == 0, "a <details> is left open"


# ---------------------------------------------------------------------------
# Graph


def test_graph_ids_are_generated_and_labels_escaped(case: Callable[[str], Case]) -> None:
    names = render_cases.AWKWARD
    mermaid = render_graph.render_mermaid(case("awkward_names").planned.graph)
    node_ids = re.findall(r"^\s+(n\d+)[\[(]", mermaid, re.M)
    assert node_ids == ["n1", "n2", "n3", "n4"]
    for name in names.values():
        assert name not in mermaid
    assert 'n3["svc #34;quoted#34; #91;x#93;"]' in mermaid
    assert '"' not in re.sub(r'\["[^"]*"\]|\(\["[^"]*"\]\)|\[\("[^"]*"\)\]', "", mermaid), "quotes only around labels"
    dot = render_graph.render_dot(case("awkward_names").planned.graph)
    assert 'n3 [label="svc \\"quoted\\" [x]", shape=box];' in dot


def test_dot_escapes_backslashes_and_quotes() -> None:
    assert render_graph.dot_string('a\\n"b"') == '"a\\\\n\\"b\\""'
    assert render_graph.mermaid_label('x"y#1;') == "x#34;y#35;1#59;"


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_graphviz_reads_the_labels_back(case: Callable[[str], Case]) -> None:
    dot = render_graph.render_dot(case("awkward_names").planned.graph)
    plain = subprocess.run(["dot", "-Tplain"], input=dot, capture_output=True, text=True, check=True).stdout
    labels = re.findall(r'^node n\d+ \S+ \S+ \S+ \S+ "((?:[^"\\]|\\.)*)"', plain, re.M)
    assert [label.replace('\\"', '"') for label in labels] == [
        render_cases.AWKWARD[kind] for kind in ("role", "database", "service", "other")
    ]


# ---------------------------------------------------------------------------
# Secrets


def every_output(c: Case) -> dict[str, str]:
    graph = c.planned.graph
    return {
        "text": text.render_plan(c.plan, color=False),
        "text colour": text.render_plan(c.plan, color=True),
        "status": text.render_status(c.plan),
        "json": render_json.render_plan(c.plan),
        "json status": render_json.render_status(c.plan),
        "markdown": render_markdown(c),
        "mermaid": render_graph.render_mermaid(graph),
        "dot": render_graph.render_dot(graph),
    }


def test_no_output_holds_a_password(case: Callable[[str], Case]) -> None:
    c = case("new_estate")
    assert set(c.planned.estate.secrets()) == {ROLE_PASSWORD, URL_PASSWORD}, "the case must hold both secrets"
    for what, output in every_output(c).items():
        assert ROLE_PASSWORD not in output, what
        assert URL_PASSWORD not in output, what


# ---------------------------------------------------------------------------
# Command line


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_cli(monkeypatch: pytest.MonkeyPatch, c: Case, *args: str, stdout: io.StringIO | None = None) -> tuple[int, str]:
    from orchestrator import api
    from orchestrator.cli import main

    monkeypatch.setattr(api, "plan", lambda *a, **k: c.planned)
    out = stdout if stdout is not None else io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    code = main([*args, "-f", str(c.planned.estate.file)])
    return code, out.getvalue()


def test_cli_colours_a_terminal_but_not_a_pipe_nor_with_no_color(
    case: Callable[[str], Case], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = case("drifted")
    monkeypatch.delenv("NO_COLOR", raising=False)
    code, on_terminal = run_cli(monkeypatch, c, "plan", stdout=_Terminal())
    assert code == 0 and ESCAPE in on_terminal
    code, in_pipe = run_cli(monkeypatch, c, "plan")
    assert code == 0 and ESCAPE not in in_pipe
    assert in_pipe == text.render_plan(c.plan, color=False)
    monkeypatch.setenv("NO_COLOR", "1")
    code, no_color = run_cli(monkeypatch, c, "plan", stdout=_Terminal())
    assert code == 0 and ESCAPE not in no_color
    code, status = run_cli(monkeypatch, c, "status", stdout=_Terminal())
    assert code == 0 and ESCAPE not in status


@pytest.mark.parametrize("format", ["text", "json", "markdown"])
def test_cli_plan_formats_hold_no_password(
    case: Callable[[str], Case], monkeypatch: pytest.MonkeyPatch, format: str
) -> None:
    code, out = run_cli(monkeypatch, case("new_estate"), "plan", "--format", format)
    assert code == 0
    assert ROLE_PASSWORD not in out and URL_PASSWORD not in out
    assert "init_schema" in out


def test_cli_markdown_has_the_sql_and_the_graph(case: Callable[[str], Case], monkeypatch: pytest.MonkeyPatch) -> None:
    c = case("new_estate")
    code, out = run_cli(monkeypatch, c, "plan", "--format", "markdown")
    assert code == 0
    assert out == render_markdown(c)
    assert "sku text NOT NULL UNIQUE" in out and "```mermaid" in out


@pytest.mark.parametrize("format", ["mermaid", "dot", None])
def test_cli_graph(case: Callable[[str], Case], monkeypatch: pytest.MonkeyPatch, format: str | None) -> None:
    c = case("new_estate")
    for variable, value in render_cases.EXAMPLE_ENV.items():
        monkeypatch.setenv(variable, value)
    code, out = run_cli(monkeypatch, c, "graph", *(["--format", format] if format else []))
    assert code == 0
    assert out == render_graph.render(c.planned.graph, format or "mermaid")
    assert URL_PASSWORD not in out and ROLE_PASSWORD not in out


def test_cli_graph_rejects_an_unknown_format(case: Callable[[str], Case], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = run_cli(monkeypatch, case("new_estate"), "graph", "--format", "png")
    assert code == 1 and out == ""

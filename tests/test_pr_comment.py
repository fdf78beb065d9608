"""The PR comment as a reviewer sees it on GitHub (issue 14, item 5).

The Markdown is rendered to HTML by cmark-gfm, GitHub's own Markdown library; GitHub then
turns a quote whose first line is ``[!CAUTION]`` (or WARNING, NOTE, ...) into an alert, and
``alerts`` below does the same, so the assertions are on what a reader sees: which alerts,
in which order, before which table, SQL in ``<pre><code>``, long tables folded.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from pathlib import Path

import cmarkgfm
import pytest
from cmarkgfm.cmark import Options
from estate import Estate
from render_cases import CASES, Case, _single, applied_through, build, everything_exists

from orchestrator.live.facts import LiveState
from orchestrator.planning.plan import Warning
from orchestrator.render import markdown, risk

_ALERT = re.compile(r"<blockquote>\s*<p>\[!(NOTE|TIP|IMPORTANT|WARNING|CAUTION)\]\s")


def to_html(text: str) -> str:
    """As GitHub renders a comment: GFM, with the raw HTML (details, summary) kept."""
    return cmarkgfm.github_flavored_markdown_to_html(text, options=Options.CMARK_OPT_UNSAFE)


def alerts(page: str) -> list[tuple[str, int]]:
    """Each alert's kind and where it starts in the HTML."""
    return [(match.group(1), match.start()) for match in _ALERT.finditer(page)]


def visible_text(page: str) -> str:
    """The HTML's text as a reader sees it, tags gone."""
    return html.unescape(re.sub(r"<[^>]+>", "", page))


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Case]:
    built: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in built:
            built[name] = (CASES | EXTRA)[name](tmp_path_factory.mktemp(name))
        return built[name]

    return get


def comment(c: Case, **options: int) -> str:
    return markdown.render_plan(c.plan, sql_for=c.sql_for, graph=c.planned.graph, **options)


# ---------------------------------------------------------------------------
# Cases of this file


def repeated_locks(root: Path, count: int = 12) -> Case:
    """A clean migration first, then ``count`` files that each index an existing table without
    CONCURRENTLY, and one that drops a column: repeats, and warned files after a clean one."""
    files = {
        "migrations/shop/000001_tables.up.sql": "CREATE TABLE orders (id bigint PRIMARY KEY, note text, sku text);\n",
        "migrations/shop/000001_tables.down.sql": "DROP TABLE orders;\n",
        "migrations/shop/000002_comment.up.sql": "COMMENT ON TABLE orders IS 'the orders';\n",
        "migrations/shop/000002_comment.down.sql": "COMMENT ON TABLE orders IS NULL;\n",
    }
    for n in range(count):
        version = n + 3
        files[f"migrations/shop/{version:06d}_index_{n}.up.sql"] = f"CREATE INDEX orders_{n}_idx ON orders (sku, id);\n"
        files[f"migrations/shop/{version:06d}_index_{n}.down.sql"] = f"DROP INDEX orders_{n}_idx;\n"
    files[f"migrations/shop/{count + 3:06d}_drop_note.up.sql"] = "ALTER TABLE orders DROP COLUMN note;\n"

    def live(estate, sets):  # type: ignore[no-untyped-def]
        return LiveState(servers=everything_exists(estate), services={"shop": applied_through(sets, "shop", 1)})

    return build(root, "repeated_locks", _single("shop"), files, live)


EXTRA: dict[str, Callable[[Path], Case]] = {"repeated_locks": repeated_locks}


# ---------------------------------------------------------------------------
# What the top says


def test_summary_names_the_risk(case: Callable[[str], Case]) -> None:
    top = comment(case("destructive")).split("\n\n")[1]
    assert top.startswith("**Plan:** 2 migrations to apply.")
    assert "**Risk:** drops 1 table, 1 column; deletes every row of 1 table; rewrites 1 table; locks 1 table" in top


@pytest.mark.parametrize(
    ("rule", "severity", "kind"),
    [
        ("drop-table", "destructive", risk.DATA_LOSS),
        ("a-rule-added-later", "destructive", risk.DATA_LOSS),  # the severity is enough
        ("alter-column-type", "locking", risk.REWRITE),
        ("vacuum-full", "locking", risk.REWRITE),
        ("drop-index-not-concurrently", "locking", risk.LOCK),
        ("missing-down", None, risk.NOTE),
        ("own-transaction", None, risk.NOTE),
        ("parse-error", None, risk.RISK),
        ("never-heard-of", None, risk.RISK),  # shown as a warning, not hidden in a note
    ],
)
def test_each_rule_has_one_kind(rule: str, severity: str | None, kind: str) -> None:
    assert risk.kind_of(Warning("m", rule=rule, severity=severity)) == kind


def test_alerts_come_before_tables_most_serious_first(case: Callable[[str], Case]) -> None:
    page = to_html(comment(case("destructive")))
    found = alerts(page)
    assert [kind for kind, _ in found] == ["CAUTION", "WARNING", "NOTE"]
    first_table = page.index("<table>")
    assert all(start < first_table for _, start in found)
    caution = page[found[0][1] : found[1][1]]
    assert "Data loss" in caution and "drop-table" in caution and "delete-without-where" in caution
    warning = page[found[1][1] : found[2][1]]
    assert "alter-column-type" in warning and "create-index-not-concurrently" in warning
    assert "missing-down" in page[found[2][1] : first_table]


def test_blockers_come_first(case: Callable[[str], Case]) -> None:
    page = to_html(comment(case("dirty")))
    found = alerts(page)
    assert found[0][0] == "CAUTION"
    assert "Apply refuses this plan" in page[found[0][1] : page.index("<table>")]


def test_statements_are_sql_blocks_and_no_backslash_shows(case: Callable[[str], Case]) -> None:
    page = to_html(comment(case("destructive")))
    assert '<pre lang="sql"><code>DROP TABLE invoice_archive;' in page
    assert '<pre lang="sql"><code>CREATE INDEX invoices_customer_idx ON invoices (customer);' in page
    # the message never runs into the statement: they are different blocks
    assert not re.search(r"<p>[^<]*DROP TABLE deletes[^<]*DROP TABLE invoice_archive", page)
    assert "\\`" not in visible_text(page)
    assert "<code>-- dbplan:no-transaction</code>" in page  # quoted in the message, shown as code


def test_repeats_are_grouped_by_rule(case: Callable[[str], Case]) -> None:
    text = comment(case("repeated_locks"))
    assert text.count("**create-index-not-concurrently**") == 1
    assert "**create-index-not-concurrently** × 12:" in text
    assert "and 7 more" in text  # five places named, the rest counted
    page = to_html(text)
    block = re.search(r'<pre lang="sql"><code>(-- migrations/shop/000003.*?)</code></pre>', page, re.DOTALL)
    assert block is not None and block.group(1).count("CREATE INDEX") == 12


def test_long_tables_fold_and_warned_sql_comes_first(case: Callable[[str], Case]) -> None:
    page = to_html(comment(case("repeated_locks")))
    folded = re.search(r"<details>\s*<summary>14 migrations: versions 2-15</summary>\s*<table>", page)
    assert folded is not None, page[:3000]
    sql_order = re.findall(r"<summary>apply (\d+) <code>", page)
    assert sql_order[0] == "3" and sql_order[-1] == "2"  # the clean file's SQL comes last


def test_short_tables_stay_open(case: Callable[[str], Case]) -> None:
    page = to_html(comment(case("destructive")))
    assert not re.search(r"<details>\s*<summary>[^<]*</summary>\s*<table>", page)


def test_commands_to_run_are_shell_blocks(case: Callable[[str], Case]) -> None:
    page = to_html(comment(case("dirty")))
    assert '<pre lang="shell"><code>dbplan force orders 2\ndbplan force orders 1\n</code></pre>' in page
    assert "run <code>dbplan force orders 2</code> if" in page


def test_over_the_limit_the_alerts_stay_and_tables_are_cut(case: Callable[[str], Case]) -> None:
    text = comment(case("repeated_locks"), max_chars=4_000)
    assert len(text) <= 4_000
    page = to_html(text)
    assert [kind for kind, _ in alerts(page)][:2] == ["NOTE", "CAUTION"]  # the notice says what was left out
    assert "Shortened to stay under 4,000 characters" in page
    assert "drop-column" in page


# ---------------------------------------------------------------------------
# A dirty service, for real


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    return Estate(tmp_path, pg_url, dbname_prefix, capsys)


FAILING = (
    "-- dbplan:no-transaction\n"
    "CREATE TABLE items (id int, sku text);\n"
    "INSERT INTO items VALUES (1, 'a'), (2, 'a');\n"
    "CREATE UNIQUE INDEX CONCURRENTLY items_sku_idx ON items (sku);\n"
    "CREATE TABLE after_it (id int);\n"
)


def test_dirty_service_says_which_line_failed_and_what_had_run(estate: Estate) -> None:
    estate.add_app()
    estate.write("app", "1_items.up.sql", FAILING)
    assert estate.dbplan("apply", "--yes").code == 1
    rows = estate.query("app", "select event, reason from dbplan_history where version = 1")
    assert rows == [("fail", rows[0][1])]
    assert rows[0][1].startswith("failed at migrations/app/1_items.up.sql:4 after 2 of 4 statements, SQLSTATE 23505: ")

    plan = estate.dbplan("plan", "--format", "markdown")
    assert plan.code == 1
    page = to_html(plan.out)
    assert "Failed at <code>migrations/app/1_items.up.sql:4</code> with SQLSTATE <code>23505</code>" in page
    assert "could not create unique index" in page
    assert page.index("Failed at") < page.index("<table>")  # at the top, beside the blocker
    assert "2 of its 4 statements had run before it, and stay done." in page
    assert re.search(r'<pre lang="sql"><code>CREATE TABLE items \(id int, sku text\);\nINSERT INTO items', page)
    assert '<pre lang="sql"><code>CREATE UNIQUE INDEX CONCURRENTLY items_sku_idx ON items (sku);' in page
    (service,) = json.loads(estate.dbplan("plan", "--format", "json").out)["services"]
    assert service["failure"] == {
        "file": "migrations/app/1_items.up.sql", "line": 4, "sqlstate": "23505",
        "message": 'could not create unique index "items_sku_idx"', "done": 2, "total": 4,
    }  # fmt: skip
    text = estate.dbplan("plan")
    assert "at line 4 with SQLSTATE 23505" in text.out and "2 of its 4 statements had run" in text.out

    # The fail row is no state: once forced, the service is clean and the failure gone.
    estate.execute("app", "DROP INDEX items_sku_idx")
    assert estate.dbplan("force", "app", "1").code == 0
    clean = estate.dbplan("plan", "--format", "json")
    assert clean.code == 0, clean.output
    assert '"failure"' not in clean.out and "23505" not in clean.out


def test_a_statement_with_backticks_keeps_its_fence() -> None:
    from orchestrator.planning.plan import Plan

    statement = "UPDATE notes SET body = '```sql ` `` x'"
    warning = Warning(
        "UPDATE without WHERE changes every row of notes; quote it as `UPDATE ... WHERE`",
        file="m/1_x.up.sql", line=1, rule="update-without-where", statement=statement, severity="destructive",
    )  # fmt: skip
    page = to_html(markdown.render_plan(Plan(actions=(), services=(), warnings=(warning,))))
    assert f'<pre lang="sql"><code>{html.escape(statement, quote=False)};\n</code></pre>' in page
    assert "<code>UPDATE ... WHERE</code>" in page and "\\`" not in visible_text(page)

#!/usr/bin/env python3
"""See the PR comment as a reviewer does: a big plan's Markdown and its Mermaid graph,
rendered to HTML and screenshot in headless Chromium. Run by hand, never in the suite.

    apt-get install -y chromium                      # once
    (cd /tmp/mermaid && npm install mermaid@11)      # once, for the graph
    python bench/render_markdown.py --mermaid /tmp/mermaid/node_modules/mermaid/dist/mermaid.min.js

It plans a made-up estate with the real pipeline and no server (``tests/render_cases.py``):
three services, one with ``--migrations`` pending files among which some drop, rewrite or
lock, one dirty. The Markdown goes through cmark-gfm, GitHub's own library; GitHub's alerts
(a quote whose first line is ``[!CAUTION]``) are drawn the way GitHub draws them, and the
``mermaid`` blocks of the comment and of ``dbplan graph`` are drawn by mermaid.js. It writes
``comment.md``, ``comment.html``, ``comment.png`` (the top of the page: what a reviewer
sees first) and ``graph.png`` to ``--out``, and prints the sizes.
"""

from __future__ import annotations

import argparse
import html
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

import cmarkgfm
import render_cases
from cmarkgfm.cmark import Options
from render_cases import applied_through, build, everything_exists, fresh

from orchestrator.live.facts import LiveState
from orchestrator.render import graph as render_graph
from orchestrator.render import markdown

CSS = """
body { font: 14px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 900px; margin: 24px; color: #1f2328; }
code, pre { font-family: ui-monospace, monospace; font-size: 12px; background: #f6f8fa; }
pre { padding: 12px; overflow: auto; border-radius: 6px; }
table { border-collapse: collapse; } td, th { border: 1px solid #d1d9e0; padding: 4px 10px; }
blockquote { margin: 0; padding: 0 1em; border-left: .25em solid #d1d9e0; color: #59636e; }
.alert { padding: 4px 16px; margin-bottom: 16px; border-left: .25em solid; }
.alert-title { font-weight: 600; margin: 8px 0; }
.alert-NOTE { border-color: #0969da; } .alert-NOTE .alert-title { color: #0969da; }
.alert-WARNING { border-color: #9a6700; } .alert-WARNING .alert-title { color: #9a6700; }
.alert-CAUTION { border-color: #d1242f; } .alert-CAUTION .alert-title { color: #d1242f; }
details { margin: 8px 0; } summary { cursor: pointer; }
"""
_ALERT = re.compile(r"<blockquote>\s*<p>\[!(NOTE|TIP|IMPORTANT|WARNING|CAUTION)\]\s*(.*?)</blockquote>", re.DOTALL)


def big_case(root: Path, migrations: int) -> render_cases.Case:
    files: dict[str, str] = {}
    for version in range(1, migrations + 1):
        name = f"migrations/orders/{version:06d}_step_{version}"
        if version % 50 == 0:
            body = f"ALTER TABLE orders_{version - 1} DROP COLUMN note;\n"
        elif version % 25 == 0:
            body = f"CREATE INDEX orders_{version}_idx ON orders_1 (note);\n"
        elif version % 60 == 0:
            body = "ALTER TABLE orders_1 ALTER COLUMN note TYPE varchar(20);\n"
        else:
            body = f"CREATE TABLE orders_{version} (id bigint PRIMARY KEY, note text);\n"
        files[f"{name}.up.sql"] = body
        if version % 7:
            files[f"{name}.down.sql"] = f"-- undo step {version}\nSELECT 1;\n"
    files["migrations/legacy/000001_drop.up.sql"] = "DROP TABLE old_invoices;\nTRUNCATE audit;\n"
    files["migrations/search/000001_t.up.sql"] = "CREATE TABLE docs (id int);\n"
    files["migrations/search/000002_idx.up.sql"] = (
        "-- dbplan:no-transaction\nCREATE TABLE seen (id int);\nCREATE UNIQUE INDEX CONCURRENTLY docs_idx ON docs (id);\n"
    )
    document = {
        "servers": {"main": {"url": "postgresql://postgres@127.0.0.1:5432/postgres"}},
        "databases": {name: {"server": "main"} for name in ("orders", "legacy", "search")},
        "services": {
            "orders": {"database": "orders", "migrations": "migrations/orders"},
            "legacy": {"database": "legacy", "migrations": "migrations/legacy", "depends_on": ["orders"]},
            "search": {"database": "search", "migrations": "migrations/search", "depends_on": ["orders"]},
        },
    }

    def live(estate, sets):  # type: ignore[no-untyped-def]
        from orchestrator.live.failure import Failure

        search = applied_through(sets, "search", 2, dirty=True)
        failure = Failure("migrations/search/000002_idx.up.sql", 3, "23505", 'could not create unique index "docs_idx"', 1, 2)
        search = type(search)(**{**vars(search), "failure": failure})
        services = {"orders": fresh(estate, "orders"), "legacy": fresh(estate, "legacy"), "search": search}
        return LiveState(servers=everything_exists(estate), services=services)

    return build(root, "big", document, files, live)


def to_html(text: str, mermaid_js: Path | None, title: str) -> str:
    body = cmarkgfm.github_flavored_markdown_to_html(text, options=Options.CMARK_OPT_UNSAFE)
    body = _ALERT.sub(
        lambda m: f'<div class="alert alert-{m[1]}"><p class="alert-title">{m[1].title()}</p><p>{m[2]}</div>', body
    )
    # GitHub draws ```mermaid blocks as diagrams; cmark-gfm gives <pre lang="mermaid">.
    body = re.sub(
        r'<pre lang="mermaid"><code>(.*?)</code></pre>',
        lambda m: f'<pre class="mermaid">{m[1]}</pre>',
        body,
        flags=re.DOTALL,
    )
    script = ""
    if mermaid_js is not None:
        script = f'<script src="{mermaid_js.as_uri()}"></script><script>mermaid.initialize({{startOnLoad: true}});</script>'
    # Open every <details> for the screenshot of the graph page only.
    return f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{CSS}</style>{body}{script}"


def screenshot(page: Path, png: Path, height: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                "--hide-scrollbars", "--virtual-time-budget=10000", f"--window-size=1000,{height}",
                f"--screenshot={png}", page.as_uri(),
            ],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--migrations", type=int, default=300)
    parser.add_argument("--mermaid", type=Path, help="mermaid.min.js (npm install mermaid); without it no diagram is drawn")
    parser.add_argument("--out", type=Path, default=Path("render-out"))
    parser.add_argument("--height", type=int, default=2400, help="pixels of the comment's screenshot")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        case = big_case(Path(folder), args.migrations)
        comment = markdown.render_plan(case.plan, sql_for=case.sql_for, graph=case.planned.graph)
        graph = render_graph.render(case.planned.graph, "mermaid")  # what `dbplan graph` prints
    mermaid_js = args.mermaid.resolve() if args.mermaid else None
    (args.out / "comment.md").write_text(comment, encoding="utf-8")
    page = args.out.resolve() / "comment.html"
    page.write_text(to_html(comment, mermaid_js, "PR comment"), encoding="utf-8")
    graph_page = args.out.resolve() / "graph.html"
    graph_page.write_text(to_html(f"```mermaid\n{graph}```\n", mermaid_js, "dbplan graph"), encoding="utf-8")
    screenshot(page, args.out / "comment.png", args.height)
    screenshot(graph_page, args.out / "graph.png", 700)
    print(f"comment: {len(comment):,} characters (GitHub's limit: 65,536), {comment.count(chr(10)):,} lines")
    print(f"wrote {args.out}/comment.md, comment.html, comment.png, graph.html, graph.png")


if __name__ == "__main__":
    main()

"""Markdown building blocks that keep any text from breaking the markup GitHub renders."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence


def code(text: str, *, in_table: bool = False) -> str:
    """``text`` as an inline code span, whatever backticks it holds."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    padded = f" {text} " if text.startswith("`") or text.endswith("`") or not text.strip() else text
    span = f"{fence}{padded}{fence}"
    return span.replace("|", "\\|") if in_table else span


# Characters Markdown may interpret; an underscore inside a word (snake_case) never is.
_MARKDOWN_SPECIAL = re.compile(r"[\\`*\[\]<>#~|&!]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")


def md_text(text: str) -> str:
    """Plain text with every character Markdown would interpret escaped."""
    return _MARKDOWN_SPECIAL.sub(lambda match: "\\" + match.group(0), " ".join(text.split()))


def html_code(text: str) -> str:
    return f"<code>{html.escape(text)}</code>"


def table(header: Sequence[str], align: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def alert(kind: str, lines: Iterable[str]) -> str:
    """A GitHub alert (``> [!WARNING]``); elsewhere it reads as a plain quote."""
    return "\n".join([f"> [!{kind}]"] + [f"> {line}".rstrip() for line in lines]) + "\n"


def fence(text: str, *, minimum: int = 3) -> str:
    """A backtick fence longer than any backtick run in ``text``, so the code cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(minimum, longest + 1)


def code_block(text: str, language: str) -> list[str]:
    """A fenced block as lines: it never runs into the sentence before it."""
    marks = fence(text)
    return [f"{marks}{language}", *text.splitlines(), marks]


def rich_text(text: str) -> str:
    """Plain text whose `back-quoted` parts become code spans, the rest escaped: a message
    that quotes ``-- dbplan:no-transaction`` shows it as code, not as escaped backticks."""
    parts = re.split(r"`([^`]+)`", " ".join(text.split()))
    return "".join(code(part) if index % 2 else _escaped(part) for index, part in enumerate(parts))


def _escaped(text: str) -> str:
    """``md_text`` that keeps the spaces at the ends, which separate it from a code span."""
    return _MARKDOWN_SPECIAL.sub(lambda match: "\\" + match.group(0), text)

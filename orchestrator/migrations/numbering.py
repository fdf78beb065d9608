"""The next migration's version in the folder's own numbering style.

golang-migrate and dbmate folders number files either sequentially (``000042``) or by the
time they were made: ``20240101120000`` (UTC, to the second) or Unix seconds. A new file
keeps the style of the files before it, and always sorts after the latest one.
"""

from __future__ import annotations

from datetime import datetime, timezone

SEQUENTIAL_WIDTH = 6  # golang-migrate's -seq -digits default


def next_version(versions_as_written: list[str], now: datetime | None = None) -> str:
    """The version text for a new file, given the version texts of the existing files."""
    now = now or datetime.now(timezone.utc)
    if not versions_as_written:
        return "1".zfill(SEQUENTIAL_WIDTH)
    latest_text = max(versions_as_written, key=int)
    latest = int(latest_text)
    if _is_datetime_stamp(latest_text):
        return str(max(int(now.strftime("%Y%m%d%H%M%S")), latest + 1))
    if _is_unix_seconds(latest_text):
        return str(max(int(now.timestamp()), latest + 1))
    width = max(len(text) for text in versions_as_written)
    return str(latest + 1).zfill(width)


def _is_datetime_stamp(text: str) -> bool:
    """YYYYMMDDHHMMSS, as golang-migrate (default -format) and dbmate write them."""
    if len(text) != 14:
        return False
    try:
        datetime.strptime(text, "%Y%m%d%H%M%S")
    except ValueError:
        return False
    return True


def _is_unix_seconds(text: str) -> bool:
    """golang-migrate's -format unix: ten digits, a time between 2001 and 2286."""
    return len(text) == 10 and not text.startswith("0")

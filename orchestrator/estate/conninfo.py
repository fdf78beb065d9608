"""A server's connection string, read the way libpq reads it, and shown without secrets.

A URL or ``key=value`` string can hold a password in many spellings (``user:pw@``,
``?password=``, ``password = 'a b'``, percent-encoded or not), so nothing here redacts
text: the string is parsed by libpq itself (``PQconninfoParse``, through psycopg) and only
what names the server, its host(s) and port(s), is ever shown.

libpq reads an unencoded ``@`` or ``/`` in a URL's password as the end of the password, or of
the host: what it then calls the host, port or database holds the rest of the password.
``problem`` refuses such strings before anything connects, so that what is shown is a host.
"""

from __future__ import annotations

import re

URL_SCHEMES = ("postgresql://", "postgres://")
# libpq's parse errors quote the text they stopped at ('missing "=" after "..."', 'invalid
# percent-encoded token: "..."'): everything from the first to the last quote goes.
_QUOTED = re.compile(r'".*"', re.DOTALL)


class UnreadableConninfo(ValueError):
    """libpq cannot parse the string; the message quotes none of it."""


def parse(url: str) -> dict[str, str]:
    """The connection parameters libpq reads from ``url`` (URL or key=value form)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as err:
        raise UnreadableConninfo(_without_quoted_text(str(err))) from None
    return {key: str(value) for key, value in params.items() if value is not None}


def _without_quoted_text(message: str) -> str:
    lines = _QUOTED.sub('"..."', message).strip().splitlines()
    return lines[0] if lines else "unreadable"


def problem(url: str) -> str | None:
    """Why ``url`` cannot be what its author meant, in words that quote none of it; or None."""
    try:
        params = parse(url)
    except UnreadableConninfo as err:
        return f"libpq cannot read it: {err}"
    is_url = url.lstrip().startswith(URL_SCHEMES)
    if "@" in params.get("host", "") or (is_url and "@" in params.get("dbname", "")):
        return (
            "libpq reads part of it as the host or database: a '@' or '/' in the user name or "
            "password must be percent-encoded ('%40', '%2F')"
        )
    ports = params.get("port", "")
    # An empty entry of a list ("5432,") is libpq's default port.
    if not all(port.strip().isdigit() or not port.strip() for port in ports.split(",")):
        return "its port is not a number (in a URL, a '/' in the password must be percent-encoded as '%2F')"
    return None


def password(url: str | None) -> str | None:
    """The password ``url`` holds, in whichever spelling, or None."""
    if not url:
        return None
    try:
        return parse(url).get("password") or None
    except UnreadableConninfo:
        return None


def describe(url: str) -> str:
    """The server ``url`` names, by host(s) and port(s) only: fit for any output."""
    try:
        params = parse(url)
    except UnreadableConninfo:
        return "an unreadable url"
    if problem(url):
        return "a url libpq misreads"
    hosts = params.get("host") or params.get("hostaddr")
    parts = [_plural("host", hosts) if hosts else "the default host"]
    if params.get("port"):
        parts.append(_plural("port", params["port"]))
    if params.get("service"):
        parts.append(f"service {params['service']}")
    return ", ".join(parts)


def _plural(what: str, values: str) -> str:
    items = [value.strip() or "default" for value in values.split(",")]
    return f"{what}s {', '.join(items)}" if len(items) > 1 else f"{what} {items[0]}"

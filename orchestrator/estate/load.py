"""Read ``dbplan.yaml`` into an ``Estate``.

The YAML is read with every node's line and column and ``${VAR}`` expanded (``document``),
then validated against ``schemas/dbplan.schema.json`` and its references checked here, so
that every error names the file, line, column and document path it is about.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError, Place
from . import conninfo, fleet
from .document import DocPath, Document, parse_yaml, quoted, read_text
from .model import (
    DEFAULT_EMBEDDED_DATA_DIR,
    DEFAULT_LOCK_TIMEOUT_MS,
    DEFAULT_MIGRATIONS_TABLE,
    DEFAULT_STATEMENT_TIMEOUT_MS,
    FORMAT_GOLANG_MIGRATE,
    Blueprint,
    Database,
    DatabaseSet,
    Discovery,
    EmbeddedSpec,
    Estate,
    Role,
    Server,
    Service,
    TableLimit,
    history_table_name,
)

DEFAULT_PLAN_FILE = "dbplan.yaml"
MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1; longer names are silently cut


# ---------------------------------------------------------------------------
# Schema validation


@cache
def load_schema() -> dict[str, Any]:
    """The plan file's JSON Schema: inside the wheel, or in the source checkout."""
    packaged = resources.files("orchestrator").joinpath("schemas/dbplan.schema.json")
    if packaged.is_file():
        return json.loads(packaged.read_text(encoding="utf-8"))
    source = Path(__file__).resolve().parents[2] / "schemas" / "dbplan.schema.json"
    return json.loads(source.read_text(encoding="utf-8"))


def suggest(word: str, choices: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    match = suggest(word, choices)
    return f"; did you mean '{match}'?" if match else ""


def is_secret(path: DocPath) -> bool:
    """Whether ``path`` is a role's password or a server's url (which may hold one), in the
    file itself or in one of its environments."""
    if len(path) >= 5 and path[0] == "environments":
        path = path[2:]
    return len(path) >= 3 and (path[0], path[2]) in (("roles", "password"), ("servers", "url"))


ENVIRONMENT_VARIABLE = "DBPLAN_ENV"
# What an environment may change, per section: how servers are reached, the passwords of
# roles, and the settings that rightly differ (the schema lists the same keys).
OVERLAY_SECTIONS = ("servers", "roles", "services")


def selected_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """The environment a command runs in: ``DBPLAN_ENV`` (which ``--env`` sets), or none."""
    return (os.environ if environ is None else environ).get(ENVIRONMENT_VARIABLE) or None


def _apply_environment(data: dict[str, Any], document: Document, name: str | None) -> dict[str, Any]:
    """The file's values with environment ``name``'s overlay laid over them; places of the
    overlaid values point at the overlay, so that later errors name its lines."""
    environments = data.get("environments") or {}
    if name is None:
        return data
    if name not in environments:
        known = ", ".join(f"'{env}'" for env in environments)
        raise ConfigError(
            f"unknown environment {quoted(name)}{_did_you_mean(name, environments)}",
            place=document.place(("environments",), key=True) if environments else Place(document.file),
            hint=f"environments of this file: {known}" if environments else "the plan file defines no environments",
        )
    merged = dict(data)
    for section in OVERLAY_SECTIONS:
        for item, changes in ((environments[name] or {}).get(section) or {}).items():
            declared = data.get(section) or {}
            if item not in declared:
                raise ConfigError(
                    f"environment {quoted(name)} changes {section[:-1]} {quoted(item)}, which the plan file "
                    f"does not declare{_did_you_mean(item, declared)}",
                    place=document.place(("environments", name, section, item), key=True),
                    hint=f"an environment changes what the file declares; declare the {section[:-1]} under '{section}' first",
                )
            merged[section] = {**merged.get(section, {}), item: {**merged[section][item], **changes}}
            for key in changes:
                _move_place(document, ("environments", name, section, item, key), (section, item, key))
    return merged


def _move_place(document: Document, source: DocPath, target: DocPath) -> None:
    for marks in (document.marks, document.key_marks):
        if source in marks:
            marks[target] = marks[source]
    unset = document.unset_secrets.get(source)
    if unset is not None:
        document.unset_secrets[target] = unset
    else:
        document.unset_secrets.pop(target, None)  # the overlay's value replaces an unset one


def _schema_error(error: Any, document: Document) -> ConfigError:
    path: DocPath = tuple(error.absolute_path)
    if is_secret(path):
        # jsonschema's messages quote the value ("12345 is not of type ..."): never here.
        expected = error.schema.get("type", "something else")
        expected_text = " or ".join(expected) if isinstance(expected, list) else expected
        return ConfigError(
            f"expected {expected_text}, got {_describe(error.instance, show=False)} (not shown: it is secret)",
            place=document.place(path),
            hint='quote a value that must stay text, as in password: "${PW}"',
        )
    # Names (as keys, or as schema/table values) are checked with a length and a regex;
    # jsonschema reports a bad key at its parent mapping and quotes the regex. Point at the
    # name itself and say what is wrong with it.
    name_problems = {
        "maxLength": f"is longer than {error.validator_value} characters",
        "minLength": "is empty",
        "pattern": "contains a control character (tab, newline, ...)",
    }
    is_name = error.schema.get("pattern") == load_schema()["$defs"]["name"]["pattern"]
    if "propertyNames" in error.schema_path and isinstance(error.instance, str):
        return ConfigError(
            f"name {error.instance!r} {name_problems.get(error.validator, 'is not allowed: ' + error.message)}",
            place=document.place(path + (error.instance,), key=True),
        )
    if error.validator == "pattern" and is_name and isinstance(error.instance, str):
        return ConfigError(f"{error.instance!r} {name_problems['pattern']}", place=document.place(path))
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        unknown = [key for key in error.instance if key not in allowed]
        key = unknown[0] if unknown else "?"
        expected = ", ".join(allowed)
        return ConfigError(
            f"unknown key {quoted(key)}{_did_you_mean(key, allowed)}",
            place=document.place(path + (key,), key=True),
            hint=f"allowed keys here: {expected}",
        )
    if error.validator == "required":
        return ConfigError(f"{error.message}", place=document.place(path))
    if error.validator == "type":
        expected = error.validator_value
        expected_text = " or ".join(expected) if isinstance(expected, list) else expected
        return ConfigError(
            f"expected {expected_text}, got {_describe(error.instance)}",
            place=document.place(path),
        )
    if error.validator == "enum" and isinstance(error.instance, str):
        what = error.schema.get("title", "value")
        return ConfigError(
            f"unknown {what} {quoted(error.instance)}{_did_you_mean(error.instance, error.validator_value)}",
            place=document.place(path),
            hint=f"known: {', '.join(error.validator_value)}",
        )
    if error.validator == "const" and path == ("version",):
        return ConfigError(
            f"unsupported plan file version {error.instance!r}; this dbplan reads version 1",
            place=document.place(path),
        )
    return ConfigError(error.message, place=document.place(path))


def _describe(value: Any, *, show: bool = True) -> str:
    if value is None:
        return "nothing (null)"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "a mapping"}
    text = repr(value) if show and isinstance(value, (int, float, str)) and len(repr(value)) < 40 else ""
    return f"{names.get(type(value), type(value).__name__)}{' ' + text if text else ''}"


def _validate_schema(data: Any, document: Document) -> None:
    import jsonschema  # slow import; only paid when a file is actually validated

    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(
        validator.iter_errors(data),
        key=lambda e: (document.place(tuple(e.absolute_path)).line or 0, len(e.absolute_path)),
    )
    if errors:
        first = _schema_error(jsonschema.exceptions.best_match([errors[0]]), document)
        if len(errors) > 1:
            first.hint = (first.hint + "; " if first.hint else "") + f"{len(errors) - 1} more {'problem' if len(errors) == 2 else 'problems'} after this one"
            first.args = (first.render(),)
        raise first


# ---------------------------------------------------------------------------
# Building the estate and checking references


def _check_identifier(name: str, what: str, place: Place) -> None:
    if len(name.encode("utf-8")) > MAX_IDENTIFIER_BYTES:
        raise ConfigError(
            f"{what} name '{name}' is {len(name.encode('utf-8'))} bytes long; PostgreSQL keeps only "
            f"{MAX_IDENTIFIER_BYTES} and would silently cut it",
            place=place,
        )
    if "\0" in name:
        raise ConfigError(f"{what} name contains a NUL character", place=place)


def _reference(
    document: Document, path: DocPath, value: str, known: Mapping[str, Any], what: str
) -> None:
    if value not in known:
        listing = ", ".join(f"'{name}'" for name in known) or "none are defined"
        raise ConfigError(
            f"unknown {what} {quoted(value)}{_did_you_mean(value, known)}",
            place=document.place(path),
            hint=f"known {what}s: {listing}",
        )


def _servers(data: dict[str, Any], document: Document, root: Path) -> dict[str, Server]:
    servers: dict[str, Server] = {}
    for name, spec in (data.get("servers") or {}).items():
        place = document.place(("servers", name), key=True)
        url = spec.get("url") or None
        unset_url = document.unset_secrets.get(("servers", name, "url"))
        embedded = None
        if url is None:
            if not spec.get("embedded") and unset_url is None:
                raise ConfigError(
                    f"server '{name}' has no url",
                    place=place,
                    hint="set url (for example ${DATABASE_URL}) or 'embedded: true' for a local server dbplan runs",
                )
        if url is None and spec.get("embedded"):
            data_dir = root / spec.get("data_dir", DEFAULT_EMBEDDED_DATA_DIR)
            port = spec.get("port")
            # JSON Schema's "integer" accepts 5432.0; a float port would end up in a URL.
            embedded = EmbeddedSpec(data_dir=data_dir, port=int(port) if port is not None else None)
        if url is not None and not isinstance(url, str):
            raise ConfigError("expected a string url", place=document.place(("servers", name, "url")))
        if url is not None:
            _check_url(url, name, document.place(("servers", name, "url")))
        servers[name] = Server(
            name=name,
            url=url,
            embedded=embedded,
            maintenance_database=spec.get("maintenance_database"),
            parallel=int(spec["parallel"]) if spec.get("parallel") is not None else None,
            create_strategy=spec.get("create_strategy"),
            place=place,
            unset_url=unset_url,
        )
    data_dirs: dict[Path, str] = {}
    for server in servers.values():
        if server.embedded:
            other = data_dirs.setdefault(server.embedded.data_dir, server.name)
            if other != server.name:
                raise ConfigError(
                    f"servers '{other}' and '{server.name}' share the embedded data_dir",
                    place=server.place,
                    hint="give each embedded server its own data_dir",
                )
    return servers


def _check_url(url: str, server: str, place: Place) -> None:
    """A url libpq cannot read, or would read otherwise than meant, fails here, before
    anything connects; the message never quotes it, since it may hold a password."""
    problem = conninfo.problem(url)
    if problem:
        raise ConfigError(
            f"the url of server '{server}' cannot be used: {problem}",
            place=place,
            hint="the url is not shown, since it may hold a password; libpq's forms are at "
            "https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-CONNSTRING",
        )


def _roles(data: dict[str, Any], document: Document, servers: dict[str, Server]) -> dict[str, Role]:
    roles: dict[str, Role] = {}
    for name, spec in (data.get("roles") or {}).items():
        place = document.place(("roles", name), key=True)
        _check_identifier(name, "role", place)
        _check_role_name(name, place)
        on = spec["server"] if isinstance(spec["server"], list) else [spec["server"]]
        for index, server in enumerate(on):
            path = ("roles", name, "server") + ((index,) if isinstance(spec["server"], list) else ())
            _reference(document, path, server, servers, "server")
        password = spec.get("password")  # a NUL in it is refused with the document (libpq would cut it there)
        member_of = spec.get("member_of")
        for index, server in enumerate(on):
            # One entry per server; the first keeps the plain name, so a role on one
            # server is what it always was.
            roles[name if index == 0 else f"{name}@{server}"] = Role(
                name=name,
                server=server,
                login=bool(spec["login"]) if "login" in spec else None,
                connection_limit=int(spec["connection_limit"]) if "connection_limit" in spec else None,
                member_of=tuple(dict.fromkeys(member_of)) if member_of is not None else None,
                password=password or None,
                place=place,
                unset_password=document.unset_secrets.get(("roles", name, "password")),
            )
    for role in roles.values():
        _check_memberships(role, roles, document)
    _refuse_membership_cycles(roles, document)
    return roles


def _check_memberships(role: Role, roles: dict[str, Role], document: Document) -> None:
    """Each ``member_of`` entry is a role of this file on the same server, or one of
    PostgreSQL's predefined ``pg_*`` roles (which every server has)."""
    for index, other in enumerate(role.member_of or ()):
        path = ("roles", role.name, "member_of", index)
        if other == role.name:
            raise ConfigError(f"role {quoted(role.name)} is listed as a member of itself", place=document.place(path))
        if other.startswith(_RESERVED_ROLE_PREFIX):
            continue
        _reference(document, path, other, roles, "role")
        servers_of_other = [r.server for r in roles.values() if r.name == other]
        if role.server not in servers_of_other:
            raise ConfigError(
                f"role {quoted(role.name)} on server '{role.server}' cannot be a member of role {quoted(other)}, "
                f"which is on server '{', '.join(servers_of_other)}'",
                place=document.place(path),
            )


def _refuse_membership_cycles(roles: dict[str, Role], document: Document) -> None:
    """PostgreSQL refuses a circular GRANT; say so before anything is changed."""
    cycle = _membership_cycle(roles)
    if cycle is None:
        return
    first = roles[cycle[0]]
    assert first.member_of is not None
    raise ConfigError(
        "roles are members of each other in a circle: " + " -> ".join(quoted(n) for n in [*cycle, cycle[0]]),
        place=document.place(("roles", first.name, "member_of", first.member_of.index(cycle[1 % len(cycle)]))),
        hint="a role cannot be granted, even through others, to a role it is granted; remove one of these member_of entries",
    )


def _membership_cycle(roles: dict[str, Role]) -> list[str] | None:
    """The first circle of ``member_of`` in file order, as role names; None when there is none."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return path[path.index(name) :]
        if name in done or name not in roles:
            return None
        for other in roles[name].member_of or ():
            found = visit(other, [*path, name])
            if found is not None:
                return found
        done.add(name)
        return None

    for name in roles:
        found = visit(name, [])
        if found is not None:
            return found
    return None


# PostgreSQL refuses these names in CREATE ROLE (role name "..." is reserved).
_RESERVED_ROLE_NAMES = ("public", "none")
_RESERVED_ROLE_PREFIX = "pg_"


def _check_role_name(name: str, place: Place) -> None:
    if name.startswith(_RESERVED_ROLE_PREFIX) or name in _RESERVED_ROLE_NAMES:
        reason = " (names starting with 'pg_' are for its own roles)" if name.startswith(_RESERVED_ROLE_PREFIX) else ""
        raise ConfigError(
            f"role name {quoted(name)} is reserved by PostgreSQL{reason}",
            place=place,
            hint="choose another name; an existing role such as pg_read_all_data is granted, not created",
        )


def _databases(
    data: dict[str, Any], document: Document, servers: dict[str, Server], roles: dict[str, Role]
) -> tuple[dict[str, Database], dict[str, DatabaseSet]]:
    databases: dict[str, Database] = {}
    sets: dict[str, DatabaseSet] = {}
    for name, spec in (data.get("databases") or {}).items():
        place = document.place(("databases", name), key=True)
        _check_identifier(name, "database", place)
        if ("server" in spec) == ("set" in spec):
            raise ConfigError(
                f"database '{name}' needs either 'server' (one database) or 'set' (many)",
                place=place,
                hint="write 'server: NAME', or 'set:' with names, range, per_server or discover",
            )
        owner = spec.get("owner")
        if owner is not None:
            _reference(document, ("databases", name, "owner"), owner, {r.name: r for r in roles.values()}, "role")
        if "set" in spec:
            sets[name] = read_set(name, spec["set"], owner, document, servers, roles)
            continue
        _reference(document, ("databases", name, "server"), spec["server"], servers, "server")
        if owner is not None:
            _check_owner_on(owner, spec["server"], name, roles, document)
        databases[name] = Database(name=name, server=spec["server"], owner=owner, place=place)
    _check_set_names(databases, sets, document)
    return databases, sets


def _check_owner_on(owner: str, server: str, database: str, roles: dict[str, Role], document: Document) -> None:
    on = [role.server for role in roles.values() if role.name == owner]
    if server not in on:
        raise ConfigError(
            f"owner '{owner}' is a role on server{'s' if len(on) > 1 else ''} {', '.join(repr(s) for s in on)}, "
            f"but database '{database}' is on server '{server}'",
            place=document.place(("databases", database, "owner")),
            hint=f"declare the role on that server too (roles.{owner}.server: [{', '.join([*on, server])}])",
        )


def _check_set_names(databases: dict[str, Database], sets: dict[str, DatabaseSet], document: Document) -> None:
    """A database name stands for one database: two entries, or two sets, naming the same
    one would plan it twice."""
    claimed: dict[str, str] = {name: f"database '{name}'" for name in databases}
    claimed.update({name: f"the name of set '{name}'" for name in sets})
    for key, database_set in sets.items():
        for server, name in database_set.members:
            other = claimed.setdefault(name, f"set '{key}' (server '{server}')")
            if other != f"set '{key}' (server '{server}')":
                raise ConfigError(
                    f"database '{name}' of set '{key}' on server '{server}' is also {other}",
                    place=database_set.place,
                    hint="each database may appear once in the plan file",
                )


MAX_SET_SIZE = 100_000  # more than any server holds; stops a typo (to: 1e9) before it fills memory


def read_set(
    key: str, spec: dict[str, Any], owner: str | None, document: Document, servers: dict[str, Server], roles: dict[str, Role]
) -> DatabaseSet:
    """A ``set:`` entry: its members placed on servers, its canaries checked."""
    base = ("databases", key, "set")
    forms = [form for form in ("names", "range", "per_server", "discover") if form in spec]
    if not forms or ("per_server" in forms and len(forms) > 1) or ("discover" in forms and len(forms) > 1):
        raise ConfigError(
            f"set '{key}' needs names and/or range (with servers), per_server, or discover (with servers)"
            + (f"; it has {' and '.join(forms)}" if forms else ""),
            place=document.place(base),
            hint="see the Fleets section of the README",
        )
    set_servers: list[str] = list(spec.get("servers") or ())
    for index, server in enumerate(set_servers):
        _reference(document, base + ("servers", index), server, servers, "server")
    if "per_server" in forms:
        if set_servers:
            raise ConfigError(
                f"set '{key}' has both per_server and servers",
                place=document.place(base + ("servers",)),
                hint="per_server says where each database is; drop servers",
            )
        members: list[tuple[str, str]] = []
        for server, listed in spec["per_server"].items():
            _reference(document, base + ("per_server", server), server, servers, "server")
            where = base + ("per_server", server)
            names = _member_names(listed if isinstance(listed, dict) else {"names": listed}, where, document)
            members += [(server, name) for name in names]
    else:
        if not set_servers:
            raise ConfigError(f"set '{key}' needs servers: the servers its databases are on", place=document.place(base))
        names = [] if "discover" in forms else _member_names(spec, base, document)
        members = fleet.spread(names, set_servers)
    _check_members(key, members, document, base)
    for server in {server for server, _ in members} | (set(set_servers) if "discover" in forms else set()):
        if owner is not None:
            _check_owner_on(owner, server, key, roles, document)
    discovery = Discovery(spec["discover"], tuple(set_servers)) if "discover" in forms else None
    canary = _canary(key, spec.get("canary"), [name for _, name in members], discovery is not None, document, base)
    return DatabaseSet(
        key=key,
        owner=owner,
        members=tuple(members),
        discovery=discovery,
        canary=canary,
        place=document.place(("databases", key), key=True),
        canary_place=document.place(base + ("canary",)),
    )


def _member_names(spec: dict[str, Any], base: DocPath, document: Document) -> list[str]:
    names = list(spec.get("names") or ())
    if "range" in spec:
        names += _range(spec["range"], base + ("range",), document)
    if not names:
        raise ConfigError("expected names or a range of databases", place=document.place(base))
    return names


def _range(spec: dict[str, Any], base: DocPath, document: Document) -> list[str]:
    pattern, first, last = spec["pattern"], int(spec["from"]), int(spec["to"])
    if pattern.count("{n}") != 1:
        raise ConfigError(
            f"range pattern {quoted(pattern)} must hold {{n}} once, where the number goes",
            place=document.place(base + ("pattern",)),
            hint="for example pattern: tenant_{n}",
        )
    if first > last:
        raise ConfigError(f"range from {first} to {last} is empty: 'from' is above 'to'", place=document.place(base + ("from",)))
    if last - first + 1 > MAX_SET_SIZE:
        raise ConfigError(
            f"range from {first} to {last} holds {last - first + 1} databases; a set holds at most {MAX_SET_SIZE}",
            place=document.place(base + ("to",)),
        )
    width = int(spec["width"]) if spec.get("width") is not None else None
    if width is not None and len(str(last)) > width:
        raise ConfigError(
            f"range width {width} is too narrow for {last}: names would not sort or read alike",
            place=document.place(base + ("width",)),
            hint=f"width: {len(str(last))} or more",
        )
    return fleet.range_names(pattern, first, last, width)


def _check_members(key: str, members: list[tuple[str, str]], document: Document, base: DocPath) -> None:
    seen: dict[str, str] = {}
    for server, name in members:
        _check_identifier(name, "database", document.place(base))
        if name in seen and seen[name] != server:
            raise ConfigError(
                f"database '{name}' of set '{key}' is listed on server '{seen[name]}' and on server '{server}'",
                place=document.place(base + ("per_server", server)),
                hint="a database name stands for one database: list it under one server",
            )
        if name in seen:
            raise ConfigError(f"database '{name}' is listed twice in set '{key}'", place=document.place(base))
        seen[name] = server


def _canary(
    key: str, value: Any, names: list[str], discovered: bool, document: Document, base: DocPath
) -> int | float | tuple[str, ...] | None:
    place = document.place(base + ("canary",))
    if value is None:
        return None
    if isinstance(value, list):
        if discovered:
            return tuple(value)  # checked once the servers were read: a missing one is not migrated
        unknown = [name for name in value if name not in set(names)]
        if unknown:
            raise ConfigError(
                f"canary {quoted(unknown[0])} is not a database of set '{key}'{_did_you_mean(unknown[0], names)}",
                place=document.place(base + ("canary", value.index(unknown[0]))),
                hint="name databases of the set, or give a count (canary: 2) or a percentage (canary: '5%')",
            )
        return tuple(value)
    if isinstance(value, str):
        percent = float(value.rstrip("%"))
        if not 0 < percent <= 100:
            raise ConfigError(f"canary percentage {value} is out of range: give more than 0% and at most 100%", place=place)
        return percent
    if not discovered and value > len(names):
        raise ConfigError(f"canary count {value} is more than the {len(names)} databases of set '{key}'", place=place)
    return int(value)


def _services(
    data: dict[str, Any], document: Document, root: Path, databases: Mapping[str, object]
) -> dict[str, Service]:
    specs = data.get("services") or {}
    services: dict[str, Service] = {}
    for name, spec in specs.items():
        base = ("services", name)
        _reference(document, base + ("database",), spec["database"], databases, "database")
        for index, dependency in enumerate(spec.get("depends_on") or []):
            _reference(document, base + ("depends_on", index), dependency, specs, "service")
            if dependency == name:
                raise ConfigError(
                    f"service '{name}' depends on itself", place=document.place(base + ("depends_on", index))
                )
        for key, what in (("schema", "schema"), ("table", "table")):
            if key in spec:
                _check_identifier(spec[key], what, document.place(base + (key,)))
        if "table" in spec:
            # The history table beside it is `X_history`: 8 bytes more, cut silently too.
            _check_identifier(history_table_name(spec["table"]), "history table", document.place(base + ("table",)))
        services[name] = Service(
            name=name,
            database=spec["database"],
            migrations_dir=root / spec["migrations"],
            migrations_display=spec["migrations"],
            depends_on=tuple(spec.get("depends_on") or ()),
            schema=spec.get("schema"),
            table=spec.get("table", DEFAULT_MIGRATIONS_TABLE),
            allow_out_of_order=bool(spec.get("allow_out_of_order", False)),
            format=spec.get("format", FORMAT_GOLANG_MIGRATE),
            target=int(spec["target"]) if spec.get("target") is not None else None,  # 1.0 is an "integer" too
            lint_allow=frozenset((spec.get("lint") or {}).get("allow") or ()),
            lint_block_over=_table_limit(
                (spec.get("lint") or {}).get("block_on_tables_larger_than"),
                document.place(base + ("lint", "block_on_tables_larger_than")),
            ),
            lock_timeout=_duration_ms(spec.get("lock_timeout"), document.place(base + ("lock_timeout",)))
            or (0 if "lock_timeout" in spec else DEFAULT_LOCK_TIMEOUT_MS),
            statement_timeout=_duration_ms(
                spec.get("statement_timeout", DEFAULT_STATEMENT_TIMEOUT_MS), document.place(base + ("statement_timeout",))
            ),
            place=document.place(base, key=True),
            migrations_place=document.place(base + ("migrations",)),
        )
    return services


_DURATION = re.compile(r"^([0-9]+) ?(ms|s|min|h|d)?$")
_DURATION_UNIT_MS = {None: 1, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
_MAX_TIMEOUT_MS = 2**31 - 1  # PostgreSQL keeps timeouts in an int of milliseconds


def _duration_ms(value: int | str | None, place: Place) -> int | None:
    """A timeout as PostgreSQL writes it ('5s', '500ms', '2min') or an int of ms, in ms."""
    if value is None:
        return None
    match = _DURATION.match(value) if isinstance(value, str) else None
    millis = int(match.group(1)) * _DURATION_UNIT_MS[match.group(2)] if match else value
    if not isinstance(millis, int) or isinstance(millis, bool) or not 0 <= millis <= _MAX_TIMEOUT_MS:
        raise ConfigError(
            f"expected a duration such as '30s', '500ms' or '2min' (or milliseconds), got {value!r}",
            place=place,
            hint=f"at most {_MAX_TIMEOUT_MS} ms (about 24 days); 0 means no limit",
        )
    return millis


_TABLE_LIMIT = re.compile(r"^([0-9]+) ?(kB|MB|GB|TB|rows)$")
_SIZE_UNIT_BYTES = {"kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}  # as pg_size_pretty counts


def _table_limit(value: object, place: Place) -> TableLimit | None:
    """``block_on_tables_larger_than``: '10MB', '2 GB', '500kB' or '1000000 rows'."""
    if value is None:
        return None
    match = _TABLE_LIMIT.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(
            f"expected a table size such as '10MB', '2GB' or '1000000 rows', got {value!r}",
            place=place,
            hint="units: kB, MB, GB, TB (of pg_total_relation_size) or rows (estimated, pg_class.reltuples)",
        )
    number, unit = int(match.group(1)), match.group(2)
    if unit == "rows":
        return TableLimit(number, "rows", match.group(0))
    return TableLimit(number * _SIZE_UNIT_BYTES[unit], "bytes", match.group(0))


def _check_shared_tables(services: dict[str, Service], document: Document) -> None:
    # Schema None means "the role's current schema": two such services in one database
    # would end up on the same table, so None is compared as a value of its own.
    # The history tables are compared too: table `dbplan` keeps its history in
    # `dbplan_history`, which is also the history of the default `schema_migrations`.
    seen: dict[tuple[str, str | None, str], tuple[str, str]] = {}
    for service in services.values():
        for table, use in ((service.table, "migrations"), (service.history_table, "history")):
            key = (service.database, service.schema, table)
            other, other_use = seen.setdefault(key, (service.name, use))
            if other == service.name:
                continue
            if use == other_use == "migrations":
                message = (
                    f"services '{other}' and '{service.name}' both keep their migrations in table "
                    f"'{service.table}' of database '{service.database}'"
                )
            else:
                message = (
                    f"table '{table}' of database '{service.database}' would hold the {other_use} of service "
                    f"'{other}' and the {use} of service '{service.name}'"
                )
            raise ConfigError(message, place=service.place, hint="give one of them its own 'table' (or 'schema')")


def load(file: str | os.PathLike[str] = DEFAULT_PLAN_FILE, environ: Mapping[str, str] | None = None) -> Estate:
    """Read, expand and validate a plan file; return the estate it declares, in the
    environment that ``DBPLAN_ENV`` names (the file as written when it is unset)."""
    path = Path(file)
    display = str(file)
    text, checksum = read_text(path, display)
    document = Document(display, is_secret)
    environ = os.environ if environ is None else environ
    data = parse_yaml(text, document, environ)
    if not isinstance(data, dict):
        raise ConfigError(
            f"the plan file must be a mapping with 'version: 1' at the top, got {_describe(data)}",
            place=document.place(()),
        )
    _validate_schema(data, document)
    environment = selected_environment(environ)
    data = _apply_environment(data, document, environment)
    root = path.resolve().parent
    servers = _servers(data, document, root)
    roles = _roles(data, document, servers)
    written, sets = _databases(data, document, servers, roles)
    blueprint = Blueprint(written, sets, _services(data, document, root, {**written, **sets}))
    databases, services = fleet.expand(blueprint)
    _check_shared_tables(services, document)
    estate = Estate(
        file=path,
        root=root,
        servers=servers,
        roles=roles,
        databases=databases,
        services=services,
        file_checksum=checksum,
        environment=environment,
        sets=sets,
        blueprint=blueprint if sets else None,
        discovered=not any(spec.discovery for spec in sets.values()),
    )
    from . import (
        graph,  # cycles are a property of the whole file: report them at load time
    )

    graph.build(estate)
    return estate

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
from . import conninfo
from .document import DocPath, Document, parse_yaml, quoted, read_text
from .model import (
    DEFAULT_EMBEDDED_DATA_DIR,
    DEFAULT_LOCK_TIMEOUT_MS,
    DEFAULT_MIGRATIONS_TABLE,
    DEFAULT_STATEMENT_TIMEOUT_MS,
    Database,
    EmbeddedSpec,
    Estate,
    Role,
    Server,
    Service,
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
            parallel=spec.get("parallel"),
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
        _reference(document, ("roles", name, "server"), spec["server"], servers, "server")
        password = spec.get("password")  # a NUL in it is refused with the document (libpq would cut it there)
        roles[name] = Role(
            name=name,
            server=spec["server"],
            login=bool(spec.get("login", False)),
            password=password or None,
            place=place,
            unset_password=document.unset_secrets.get(("roles", name, "password")),
        )
    return roles


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
) -> dict[str, Database]:
    databases: dict[str, Database] = {}
    for name, spec in (data.get("databases") or {}).items():
        place = document.place(("databases", name), key=True)
        _check_identifier(name, "database", place)
        _reference(document, ("databases", name, "server"), spec["server"], servers, "server")
        owner = spec.get("owner")
        if owner is not None:
            _reference(document, ("databases", name, "owner"), owner, roles, "role")
            if roles[owner].server != spec["server"]:
                raise ConfigError(
                    f"owner '{owner}' is a role on server '{roles[owner].server}', "
                    f"but database '{name}' is on server '{spec['server']}'",
                    place=document.place(("databases", name, "owner")),
                )
        databases[name] = Database(name=name, server=spec["server"], owner=owner, place=place)
    return databases


def _services(
    data: dict[str, Any], document: Document, root: Path, databases: dict[str, Database]
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
            target=int(spec["target"]) if spec.get("target") is not None else None,  # 1.0 is an "integer" too
            lint_allow=frozenset((spec.get("lint") or {}).get("allow") or ()),
            lock_timeout=_duration_ms(spec.get("lock_timeout"), document.place(base + ("lock_timeout",)))
            or (0 if "lock_timeout" in spec else DEFAULT_LOCK_TIMEOUT_MS),
            statement_timeout=_duration_ms(
                spec.get("statement_timeout", DEFAULT_STATEMENT_TIMEOUT_MS), document.place(base + ("statement_timeout",))
            ),
            place=document.place(base, key=True),
            migrations_place=document.place(base + ("migrations",)),
        )
    _check_shared_tables(services, document)
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
    databases = _databases(data, document, servers, roles)
    services = _services(data, document, root, databases)
    estate = Estate(
        file=path,
        root=root,
        servers=servers,
        roles=roles,
        databases=databases,
        services=services,
        file_checksum=checksum,
        environment=environment,
    )
    from . import graph  # cycles are a property of the whole file: report them at load time

    graph.build(estate)
    return estate

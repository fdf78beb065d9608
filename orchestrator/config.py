"""Stage 1: read ``dbplan.yaml`` into an ``Estate``.

Load the YAML keeping every node's line and column, expand ``${VAR}`` per scalar, validate
against ``schemas/dbplan.schema.json`` and check references, so that every error names the
file, line, column and document path it is about.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, Place
from .model import (
    DEFAULT_EMBEDDED_DATA_DIR,
    DEFAULT_MAINTENANCE_DATABASE,
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
MAX_PLAN_FILE_BYTES = 4 * 1024 * 1024
# An alias may point at a node that itself holds aliases ("billion laughs"); expanding
# them is exponential, so the number of values built is capped.
MAX_DOCUMENT_VALUES = 100_000
MAX_IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1; longer names are silently cut

DocPath = tuple[str | int, ...]


def format_path(path: Iterable[str | int]) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if part.isprintable() else repr(part)[1:-1]  # keep a message on one line
            text += f".{name}" if text else name
    return text


def quoted(name: str) -> str:
    """'name' for a message; a key or value with a newline or control character is escaped,
    so an error stays one paragraph whatever the file holds."""
    return f"'{name}'" if name.isprintable() else repr(name)


class _Document:
    """The parsed YAML: plain Python values plus the place of every node."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.marks: dict[DocPath, tuple[int, int]] = {}
        self.key_marks: dict[DocPath, tuple[int, int]] = {}

    def place(self, path: DocPath, *, key: bool = False) -> Place:
        marks = self.key_marks if key and path in self.key_marks else self.marks
        probe = path
        while probe not in marks and probe:
            probe = probe[:-1]
        line, column = marks.get(probe, (None, None))
        return Place(self.file, line, column, format_path(path) or None)


# ---------------------------------------------------------------------------
# YAML with marks and ${VAR} expansion

_EXPANSION = re.compile(r"\$\$|\$\{([^}]*)\}|\$\{")
_VARIABLE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?$", re.DOTALL)
_SCALAR_RESOLVER = yaml.resolver.Resolver()
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Constructor(yaml.constructor.SafeConstructor):
    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # "<<: [*a, *a, ...]" nested a few levels copies key/value pairs exponentially
        # before a single value is built, so the values_built cap alone cannot stop it.
        # PyYAML's flatten_mapping recurses through self, so every level is checked.
        super().flatten_mapping(node)
        if len(node.value) > MAX_DOCUMENT_VALUES:
            raise yaml.constructor.ConstructorError(
                problem=f"merge keys ('<<') expand this mapping to more than {MAX_DOCUMENT_VALUES} entries",
                problem_mark=node.start_mark,
            )


def expand_variables(text: str, environ: Mapping[str, str], where: Place) -> str:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``$$``; nothing else is interpreted."""

    def replace(match: re.Match[str]) -> str:
        whole = match.group(0)
        if whole == "$$":
            return "$"
        if match.group(1) is None:
            raise ConfigError("unterminated '${' in value", place=where, hint="write '$$' for a literal '$'")
        spec = _VARIABLE.match(match.group(1))
        if spec is None:
            raise ConfigError(
                f"'{whole}' is not a variable reference",
                place=where,
                hint="use ${NAME} or ${NAME:-default}; write '$$' for a literal '$'",
            )
        name, default = spec.group(1), spec.group(2)
        value = environ.get(name)
        if default is not None and not value:
            return default
        if value is None:
            raise ConfigError(
                f"environment variable {name} is not set",
                place=where,
                hint=f"set {name}, or give a default with ${{{name}:-default}}",
            )
        return value

    return _EXPANSION.sub(replace, text)


class _Builder:
    """Turns composed YAML nodes into Python values, recording marks and expanding."""

    def __init__(self, document: _Document, environ: Mapping[str, str]) -> None:
        self.document = document
        self.environ = environ
        self.values_built = 0
        self.constructor = _Constructor()

    def build(self, node: yaml.Node, path: DocPath) -> Any:
        self.values_built += 1
        if self.values_built > MAX_DOCUMENT_VALUES:
            raise ConfigError(
                f"the document expands to more than {MAX_DOCUMENT_VALUES} values "
                "(aliases that multiply?)",
                place=self.document.place(path),
            )
        self.document.marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (index,)) for index, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        return self._scalar(node, path)

    def _construct(self, node: yaml.Node, path: DocPath) -> Any:
        # SafeConstructor raises plain ValueError/KeyError/AttributeError for scalars that
        # match a tag but do not parse: `!!int abc`, `!!bool maybe`, `2024-13-45`.
        try:
            return self.constructor.construct_object(node)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as err:
            kind = node.tag.rsplit(":", 1)[-1]
            where = self.document.place(path)
            if node.start_mark is not None:
                where = Place(where.file, node.start_mark.line + 1, node.start_mark.column + 1, where.path)
            raise ConfigError(
                f"cannot read {node.value!r} as {kind}", place=where, hint="quote the value to make it a string"
            ) from err

    def _mapping(self, node: yaml.MappingNode, path: DocPath) -> dict[str, Any]:
        own_pairs = sum(1 for key_node, _ in node.value if key_node.tag != _MERGE_TAG)
        self.constructor.flatten_mapping(node)  # resolves "<<" merge keys
        # flatten_mapping puts the merged pairs first; a key written here overrides a merged
        # one (as YAML merge keys mean), only a key written twice here is a duplicate.
        merged_pairs = len(node.value) - own_pairs
        result: dict[str, Any] = {}
        own_keys: set[str] = set()
        for index, (key_node, value_node) in enumerate(node.value):
            key = self._construct(key_node, path)
            if not isinstance(key, str):
                # Keys are names: `on:`, `no:` or `null:` mean the name, not YAML 1.1's bool/null.
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key)
            child = path + (key,)
            if index >= merged_pairs:
                if key in own_keys:
                    first_line = self.document.key_marks[child][0]
                    raise ConfigError(
                        f"duplicate key {quoted(key)} (first defined on line {first_line})",
                        place=Place(
                            self.document.file,
                            key_node.start_mark.line + 1,
                            key_node.start_mark.column + 1,
                            format_path(child),
                        ),
                    )
                own_keys.add(key)
            self.document.key_marks[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            result[key] = self.build(value_node, child)
        return result

    def _scalar(self, node: yaml.ScalarNode, path: DocPath) -> Any:
        value = self._construct(node, path)
        if not isinstance(value, str) or "$" not in value:
            return value
        expanded = expand_variables(value, self.environ, self.document.place(path))
        if node.style is not None:  # quoted: stays a string
            return expanded
        # The expansion is read as a scalar (never a structure), so `${PORT:-5432}` is a number.
        tag = _SCALAR_RESOLVER.resolve(yaml.ScalarNode, expanded, (True, False))
        return self._construct(yaml.ScalarNode(tag, expanded, node.start_mark, node.end_mark), path)


def _read_text(path: Path, display: str) -> tuple[str, str]:
    """The plan file's text, and the sha256 of the bytes it was decoded from."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ConfigError(
            f"plan file {display} not found",
            hint="run dbplan in the folder that holds dbplan.yaml, or pass -f PATH",
        ) from None
    except OSError as err:
        raise ConfigError(f"cannot read plan file {display}: {err.strerror}") from err
    if path.is_dir():
        raise ConfigError(f"{display} is a folder, not a plan file", hint="pass -f PATH/dbplan.yaml")
    if size > MAX_PLAN_FILE_BYTES:
        raise ConfigError(f"plan file {display} is {size} bytes; the limit is {MAX_PLAN_FILE_BYTES}")
    raw = path.read_bytes()
    if b"\0" in raw:
        raise ConfigError(f"plan file {display} is binary, not YAML")
    try:
        return raw.decode("utf-8-sig"), hashlib.sha256(raw).hexdigest()
    except UnicodeDecodeError as err:
        raise ConfigError(f"plan file {display} is not UTF-8 (byte {err.start})") from err


def _parse_yaml(text: str, document: _Document, environ: Mapping[str, str]) -> Any:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError as err:  # PyYAML's composer recurses once per nesting level
        raise ConfigError("the document nests too deeply", place=Place(document.file)) from err
    except yaml.reader.ReaderError as err:
        # A control character: PyYAML gives only an offset ("position 23"); name the line.
        line = text.count("\n", 0, err.position) + 1
        column = err.position - text.rfind("\n", 0, err.position)
        raise ConfigError(
            f"invalid YAML: control character #x{err.character:04x} is not allowed",
            place=Place(document.file, line, column),
            hint="remove it, or write it as an escape inside double quotes",
        ) from err
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        place = Place(document.file, mark.line + 1, mark.column + 1) if mark else Place(document.file)
        raise ConfigError(f"invalid YAML: {err.problem or err.context}", place=place) from err
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML: {err}", place=Place(document.file)) from err
    if node is None:
        raise ConfigError("the plan file is empty", place=Place(document.file), hint="start with 'version: 1'")
    try:
        return _Builder(document, environ).build(node, ())
    except yaml.constructor.ConstructorError as err:
        mark = err.problem_mark
        place = Place(document.file, mark.line + 1, mark.column + 1) if mark else Place(document.file)
        raise ConfigError(f"invalid YAML: {err.problem}", place=place) from err
    except RecursionError as err:
        raise ConfigError("the document nests too deeply", place=Place(document.file)) from err


# ---------------------------------------------------------------------------
# Schema validation


@cache
def load_schema() -> dict[str, Any]:
    """The plan file's JSON Schema: inside the wheel, or in the source checkout."""
    packaged = resources.files("orchestrator").joinpath("schemas/dbplan.schema.json")
    if packaged.is_file():
        return json.loads(packaged.read_text(encoding="utf-8"))
    source = Path(__file__).resolve().parent.parent / "schemas" / "dbplan.schema.json"
    return json.loads(source.read_text(encoding="utf-8"))


def suggest(word: str, choices: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    match = suggest(word, choices)
    return f"; did you mean '{match}'?" if match else ""


def _schema_error(error: Any, document: _Document) -> ConfigError:
    path: DocPath = tuple(error.absolute_path)
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
    if error.validator == "const" and path == ("version",):
        return ConfigError(
            f"unsupported plan file version {error.instance!r}; this dbplan reads version 1",
            place=document.place(path),
        )
    return ConfigError(error.message, place=document.place(path))


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "a mapping"}
    text = repr(value) if isinstance(value, (int, float, str)) and len(repr(value)) < 40 else ""
    return f"{names.get(type(value), type(value).__name__)}{' ' + text if text else ''}"


def _validate_schema(data: Any, document: _Document) -> None:
    import jsonschema  # slow import; only paid when a file is actually validated

    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(
        validator.iter_errors(data),
        key=lambda e: (document.place(tuple(e.absolute_path)).line or 0, len(e.absolute_path)),
    )
    if errors:
        first = _schema_error(jsonschema.exceptions.best_match([errors[0]]), document)
        if len(errors) > 1:
            first.hint = (first.hint + "; " if first.hint else "") + f"{len(errors) - 1} more problem(s) after this one"
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
    document: _Document, path: DocPath, value: str, known: Mapping[str, Any], what: str
) -> None:
    if value not in known:
        listing = ", ".join(f"'{name}'" for name in known) or "none are defined"
        raise ConfigError(
            f"unknown {what} {quoted(value)}{_did_you_mean(value, known)}",
            place=document.place(path),
            hint=f"known {what}s: {listing}",
        )


def _servers(data: dict[str, Any], document: _Document, root: Path) -> dict[str, Server]:
    servers: dict[str, Server] = {}
    for name, spec in (data.get("servers") or {}).items():
        place = document.place(("servers", name), key=True)
        url = spec.get("url") or None
        embedded = None
        if url is None:
            if not spec.get("embedded"):
                raise ConfigError(
                    f"server '{name}' has no url",
                    place=place,
                    hint="set url (for example ${DATABASE_URL}) or 'embedded: true' for a local server dbplan runs",
                )
            data_dir = root / spec.get("data_dir", DEFAULT_EMBEDDED_DATA_DIR)
            port = spec.get("port")
            # JSON Schema's "integer" accepts 5432.0; a float port would end up in a URL.
            embedded = EmbeddedSpec(data_dir=data_dir, port=int(port) if port is not None else None)
        if url is not None and not isinstance(url, str):
            raise ConfigError("expected a string url", place=document.place(("servers", name, "url")))
        servers[name] = Server(
            name=name,
            url=url,
            embedded=embedded,
            maintenance_database=spec.get("maintenance_database", DEFAULT_MAINTENANCE_DATABASE),
            place=place,
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


def _roles(data: dict[str, Any], document: _Document, servers: dict[str, Server]) -> dict[str, Role]:
    roles: dict[str, Role] = {}
    for name, spec in (data.get("roles") or {}).items():
        place = document.place(("roles", name), key=True)
        _check_identifier(name, "role", place)
        _reference(document, ("roles", name, "server"), spec["server"], servers, "server")
        password = spec.get("password")
        roles[name] = Role(
            name=name,
            server=spec["server"],
            login=bool(spec.get("login", False)),
            password=str(password) if password not in (None, "") else None,
            place=place,
        )
    return roles


def _databases(
    data: dict[str, Any], document: _Document, servers: dict[str, Server], roles: dict[str, Role]
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
    data: dict[str, Any], document: _Document, root: Path, databases: dict[str, Database]
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


def _check_shared_tables(services: dict[str, Service], document: _Document) -> None:
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
    """Read, expand and validate a plan file; return the estate it declares."""
    path = Path(file)
    display = str(file)
    text, checksum = _read_text(path, display)
    document = _Document(display)
    data = _parse_yaml(text, document, os.environ if environ is None else environ)
    if not isinstance(data, dict):
        raise ConfigError(
            f"the plan file must be a mapping with 'version: 1' at the top, got {_describe(data)}",
            place=document.place(()),
        )
    _validate_schema(data, document)
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
    )
    from . import graph  # cycles are a property of the whole file: report them at load time

    graph.build(estate)
    return estate

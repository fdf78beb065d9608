"""The plan file's text into plain values, keeping the place of every node.

YAML is composed with PyYAML and built node by node, so that each value's line and column
are known (``Document.place``) and ``${VAR}`` / ``${VAR:-default}`` are expanded per scalar,
never anything else. Aliases and merge keys are capped, so a small file cannot expand
into millions of values. What the values mean is ``config``'s business.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, Place, UnsetVariable

MAX_PLAN_FILE_BYTES = 4 * 1024 * 1024
# An alias may point at a node that itself holds aliases ("billion laughs"); expanding
# them is exponential, so the number of values built is capped.
MAX_DOCUMENT_VALUES = 100_000

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


class Document:
    """The parsed YAML: plain Python values plus the place of every node."""

    def __init__(self, file: str, is_secret: Callable[[DocPath], bool] = lambda path: False) -> None:
        self.file = file
        # Values under these paths (passwords, urls) are never quoted in a message.
        self.is_secret = is_secret
        self.marks: dict[DocPath, tuple[int, int]] = {}
        self.key_marks: dict[DocPath, tuple[int, int]] = {}
        # A secret whose variable is unset: an error only for the commands that connect
        # (validate, graph and new need no secrets). The value reads as empty meanwhile.
        self.unset_secrets: dict[DocPath, UnsetVariable] = {}

    def place(self, path: DocPath, *, key: bool = False) -> Place:
        marks = self.key_marks if key and path in self.key_marks else self.marks
        probe = path
        while probe not in marks and probe:
            probe = probe[:-1]
        line, column = marks.get(probe, (None, None))
        return Place(self.file, line, column, format_path(path) or None)


_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SPECIAL = re.compile(r"\$\$|\$\{")  # "$$" first: "$${X}" is a literal "${X}"
_SPECIAL_IN_DEFAULT = re.compile(r"\$\$|\$\{|\}")
# ${A:-${B:-${C}}} nests; a cap keeps a 4 MB value of "${A:-" from recursing 800,000 deep.
MAX_EXPANSION_NESTING = 16
_SCALAR_RESOLVER = yaml.resolver.Resolver()
_STRING_TAG = "tag:yaml.org,2002:str"
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


@dataclass(frozen=True)
class _Reference:
    """``${name}``, or ``${name:-default}`` with the default's own parts (it may nest)."""

    name: str
    default: tuple[str | _Reference, ...] | None


class _ExpansionSyntax:
    """Reads a value into literal text and ``_Reference``s; nothing is looked up yet, so
    a default is only expanded when it is used (``${SET:-${UNSET}}`` is fine)."""

    def __init__(self, text: str, where: Place, secret: bool) -> None:
        self.text = text
        self.where = where
        self.secret = secret

    def parts(self, start: int, depth: int) -> tuple[tuple[str | _Reference, ...], int]:
        """The parts from ``start`` to the end of the value (depth 0), or to the ``}`` that
        closes the default being read (depth > 0), and where they end."""
        text, index = self.text, start
        parts: list[str | _Reference] = []
        literal: list[str] = []
        special = _SPECIAL_IN_DEFAULT if depth else _SPECIAL
        while True:
            found = special.search(text, index)  # jumps over plain text: a value may be 4 MB
            if found is None:
                if depth:
                    raise self.error("unterminated '${' in value")
                literal.append(text[index:])
                index = len(text)
                break
            literal.append(text[index : found.start()])
            if found.group(0) == "}":  # closes the default being read
                index = found.start()
                break
            if found.group(0) == "$$":
                literal.append("$")
                index = found.end()
                continue
            parts.append("".join(literal))
            literal = []
            reference, index = self.reference(found.start(), depth)
            parts.append(reference)
        parts.append("".join(literal))
        return tuple(part for part in parts if part != ""), index

    def reference(self, start: int, depth: int) -> tuple[_Reference, int]:
        """The reference whose ``${`` is at ``start``, and the index after its ``}``."""
        name = _VARIABLE_NAME.match(self.text, start + 2)
        after = name.end() if name else start + 2
        if name and self.text.startswith("}", after):
            return _Reference(name.group(0), None), after + 1
        if name and self.text.startswith(":-", after):
            if depth >= MAX_EXPANSION_NESTING:
                raise self.error(f"defaults nest more than {MAX_EXPANSION_NESTING} levels deep")
            default, end = self.parts(after + 2, depth + 1)
            return _Reference(name.group(0), default), end + 1
        close = self.text.find("}", start)
        if close < 0:
            raise self.error("unterminated '${' in value")
        shown = "a '${...}'" if self.secret else f"'{self.text[start : close + 1]}'"
        raise self.error(f"{shown} is not a variable reference")

    def error(self, message: str) -> ConfigError:
        return ConfigError(
            message, place=self.where, hint="use ${NAME} or ${NAME:-default}; write '$$' for a literal '$'"
        )


def expand_variables(text: str, environ: Mapping[str, str], where: Place, *, secret: bool = False) -> str:
    """Expand ``${VAR}``, ``${VAR:-default}`` (the default may hold references and ``$$``
    itself) and ``$$``; nothing else is interpreted. With ``secret``, no message quotes
    the value."""
    parts, _ = _ExpansionSyntax(text, where, secret).parts(0, 0)
    return _evaluate(parts, environ, where)


def _evaluate(parts: tuple[str | _Reference, ...], environ: Mapping[str, str], where: Place) -> str:
    expanded: list[str] = []
    for part in parts:
        if isinstance(part, str):
            expanded.append(part)
            continue
        value = environ.get(part.name)
        if part.default is not None and not value:
            expanded.append(_evaluate(part.default, environ, where))
            continue
        if value is None:
            raise UnsetVariable(
                f"environment variable {part.name} is not set",
                place=where,
                hint=f"set {part.name}, or give a default with ${{{part.name}:-default}}",
            )
        expanded.append(_checked_text(part.name, value, where))
    return "".join(expanded)


def _checked_text(name: str, value: str, where: Place) -> str:
    # Python reads bytes that are not UTF-8 in the environment as lone surrogates, which
    # no connection or statement can encode: an error here, not an internal error later.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ConfigError(
            f"environment variable {name} is not valid UTF-8 (at character {err.start + 1} of its value)",
            place=where,
            hint=f"set {name} to UTF-8 text",
        ) from None
    return value


def _check_text(value: str, where: Place, what: str = "the value") -> None:
    """Refuse what no name, password, url or path can hold, before anything uses it: a NUL
    character (libpq cuts a string there, a file name cannot hold one) and a lone
    surrogate (a "\\udcff" escape: not UTF-8, so no statement can carry it)."""
    if "\0" in value:
        raise ConfigError(
            f"{what} holds a NUL character, which PostgreSQL, libpq and file names cannot take",
            place=where,
            hint="remove the \\0 (or \\x00, \\u0000) escape",
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ConfigError(
            f"{what} holds a lone surrogate (character {err.start + 1}), which is not UTF-8 text",
            place=where,
            hint="write the character itself, or the \\U escape of a whole character",
        ) from None


class _Builder:
    """Turns composed YAML nodes into Python values, recording marks and expanding."""

    def __init__(self, document: Document, environ: Mapping[str, str]) -> None:
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
            shown = "the value" if self.document.is_secret(path) else repr(node.value)
            raise ConfigError(
                f"cannot read {shown} as {kind}", place=where, hint="quote the value to make it a string"
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
            key_place = Place(self.document.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _check_text(key, key_place, "the name")
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
        value = self._expanded_scalar(node, path)
        if isinstance(value, str):
            _check_text(value, self.document.place(path))
        return value

    def _expanded_scalar(self, node: yaml.ScalarNode, path: DocPath) -> Any:
        value = self._construct(node, path)
        if not isinstance(value, str) or "$" not in value:
            return value
        secret = self.document.is_secret(path)
        try:
            expanded = expand_variables(value, self.environ, self.document.place(path), secret=secret)
        except UnsetVariable as err:
            if not secret:
                raise
            self.document.unset_secrets[path] = err
            return ""
        if node.style:  # quoted (or a block scalar): stays a string; plain is None in PyYAML, "" in libyaml
            return expanded
        # The expansion is read as a scalar (never a structure), so `${PORT:-5432}` is a number.
        tag = _SCALAR_RESOLVER.resolve(yaml.ScalarNode, expanded, (True, False))
        if secret and expanded and tag != _STRING_TAG:
            raise self._secret_not_text(tag, path)
        return self._construct(yaml.ScalarNode(tag, expanded, node.start_mark, node.end_mark), path)

    def _secret_not_text(self, tag: str, path: DocPath) -> ConfigError:
        # PW=null would silently mean "no password", PW=0123 the password "83", PW=yes
        # True: a secret is text, and what it holds is never shown.
        kinds = {"null": "nothing", "bool": "a boolean", "int": "a number", "float": "a number", "timestamp": "a date"}
        read_as = kinds.get(tag.rsplit(":", 1)[-1], "something other than text")
        key = next((part for part in reversed(path) if isinstance(part, str)), "value")
        return ConfigError(
            f"the expanded value reads in YAML as {read_as}, not as text (not shown: it is secret)",
            place=self.document.place(path),
            hint=f'quote it, as in {key}: "${{...}}", so that it stays text whatever it holds',
        )


def read_text(path: Path, display: str) -> tuple[str, str]:
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


def _compose(text: str) -> yaml.Node | None:
    """The document's node tree, from libyaml when PyYAML has it (a 500-database fleet
    file composes in a tenth of the time). libyaml words some errors otherwise, and a
    document it refuses is composed again by PyYAML's own parser, so that errors read the
    same with or without it."""
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None:
        try:
            return yaml.compose(text, Loader=fast)
        except (yaml.YAMLError, RecursionError):
            pass
    return yaml.compose(text, Loader=yaml.SafeLoader)


def parse_yaml(text: str, document: Document, environ: Mapping[str, str]) -> Any:
    try:
        node = _compose(text)
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

"""Hostile and broken input: every malformed plan file or migration folder is a DbplanError.

A catalogue of inputs a careless or hostile repository can hold. For each one the library
raises a ``DbplanError`` subclass (never anything else) whose message names the place, and
``dbplan validate`` exits 1 with a one-paragraph ``error:`` on stderr and no traceback.
A hypothesis test then feeds random documents to ``config.load``.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from estate import write_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import api
from orchestrator.cli import main
from orchestrator.errors import ConfigError, DbplanError, MigrationFileError
from orchestrator.estate import load as config

BASE_PLAN = """\
version: 1
servers:
  main:
    url: postgresql://postgres@127.0.0.1:5432/postgres
roles:
  product_svc:
    server: main
databases:
  products:
    server: main
    owner: product_svc
services:
  product:
    database: products
    migrations: migrations/product
"""
GOOD_MIGRATION = {"000001_init.up.sql": "CREATE TABLE product (id bigint);\n"}
UNSET_VARIABLE = "DBPLAN_HOSTILE_SURELY_UNSET"


@dataclass(frozen=True)
class Hostile:
    """One broken input. ``build`` writes it under a folder and returns the plan file;
    ``place`` is what the error must name, with ``{plan}`` standing for the plan file."""

    id: str
    build: Callable[[Path], Path]
    place: str


def _write_folder(root: Path, files: dict[str, str | bytes]) -> Path:
    return write_files(root / "migrations" / "product", files)


def plan_file(id: str, content: str | bytes, at: str | None = None) -> Hostile:
    """A broken plan file; the error names the line holding ``at`` (or just the file)."""

    def build(root: Path) -> Path:
        _write_folder(root, GOOD_MIGRATION)
        plan = root / "dbplan.yaml"
        plan.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return plan

    if at is None:
        return Hostile(id, build, "{plan}")
    text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
    line = next(number for number, line in enumerate(text.splitlines(), 1) if at in line)
    return Hostile(id, build, f"{{plan}}:{line}:")


def edited(id: str, old: str, new: str, at: str | None = None) -> Hostile:
    assert old in BASE_PLAN, old
    return plan_file(id, BASE_PLAN.replace(old, new, 1), at)


def appended(id: str, extra: str, at: str | None = None) -> Hostile:
    return plan_file(id, BASE_PLAN + extra, at)


def folder(id: str, files: dict[str, str | bytes], place: str) -> Hostile:
    """A broken migration folder beside a valid plan file; ``place`` is the file's path."""

    def build(root: Path) -> Path:
        _write_folder(root, {**GOOD_MIGRATION, **files})
        plan = root / "dbplan.yaml"
        plan.write_text(BASE_PLAN)
        return plan

    return Hostile(id, build, place)


def custom(id: str, place: str) -> Callable[[Callable[[Path], None]], Hostile]:
    """A case whose files need more than text: links, pipes, sparse files."""

    def wrap(prepare: Callable[[Path], None]) -> Hostile:
        def build(root: Path) -> Path:
            _write_folder(root, GOOD_MIGRATION)
            plan = root / "dbplan.yaml"
            plan.write_text(BASE_PLAN)
            prepare(root)
            return plan

        return Hostile(id, build, place)

    return wrap


def _billion_laughs() -> str:
    lines = ["version: 1", 'lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"lol{n}: &lol{n} [{', '.join([f'*lol{n - 1}'] * 9)}]" for n in range(1, 10)]
    return "\n".join(lines) + "\n"


def _merge_bomb() -> str:
    lines = ["version: 1", "servers:", "  m0: &m0 {url: 'host=x'}"]
    lines += [f"  m{n}: &m{n} {{<<: [{', '.join([f'*m{n - 1}'] * 9)}]}}" for n in range(1, 10)]
    return "\n".join(lines) + "\n"


BILLION_LAUGHS = _billion_laughs()
MERGE_BOMB = _merge_bomb()
SERVICE_TAIL = "    migrations: migrations/product\n"
MIGRATIONS_LINE = BASE_PLAN.splitlines().index(SERVICE_TAIL.rstrip("\n")) + 1


@custom("symlinked-file-outside-the-plan-folder", "migrations/product/000002_steal.up.sql")
def _symlink_out(root: Path) -> None:
    secret = root.parent / f"{root.name}-secret.sql"
    secret.write_text("SELECT 'someone else''s file';\n")
    (root / "migrations/product/000002_steal.up.sql").symlink_to(secret)


@custom("symlinked-folder-outside-the-plan-folder", f"{{plan}}:{MIGRATIONS_LINE}:")
def _symlink_folder_out(root: Path) -> None:
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir()
    (outside / "000001_init.up.sql").write_text("SELECT 1;\n")
    directory = root / "migrations/product"
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()
    directory.symlink_to(outside)


@custom("symlink-loop", "migrations/product/000002_loop.up.sql")
def _symlink_loop(root: Path) -> None:
    (root / "migrations/product/000002_loop.up.sql").symlink_to("000002_loop.up.sql")


@custom("dangling-symlink", "migrations/product/000002_gone.up.sql")
def _dangling(root: Path) -> None:
    (root / "migrations/product/000002_gone.up.sql").symlink_to(root / "nowhere.sql")


@custom("named-pipe", "migrations/product/000002_pipe.up.sql")
def _fifo(root: Path) -> None:
    os.mkfifo(root / "migrations/product/000002_pipe.up.sql")


@custom("huge-migration", "migrations/product/000002_huge.up.sql")
def _huge_migration(root: Path) -> None:
    with (root / "migrations/product/000002_huge.up.sql").open("wb") as huge:
        huge.truncate(64 * 1024 * 1024 + 1)  # sparse


@custom("migration-folder-is-a-file", f"{{plan}}:{MIGRATIONS_LINE}:")
def _folder_is_file(root: Path) -> None:
    directory = root / "migrations/product"
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()
    directory.write_text("not a folder")


def _plan_is_a_folder(root: Path) -> Path:
    plan = root / "dbplan.yaml"
    plan.mkdir()
    return plan


def _plan_is_missing(root: Path) -> Path:
    return root / "dbplan.yaml"


CATALOGUE: list[Hostile] = [
    # --- the file as bytes
    plan_file("empty-file", b""),
    plan_file("only-comments", "# dbplan.yaml\n# nothing here yet\n"),
    plan_file("only-blank-lines", "\n\n   \n"),
    plan_file("binary", b"version: 1\n\x00\x01\x02\x03\xff\xfe"),
    plan_file("non-utf8", ("# caf\xe9\n" + BASE_PLAN).encode("latin-1")),
    plan_file("utf16", BASE_PLAN.encode("utf-16")),
    plan_file("huge-file", b"version: 1\n" + b"#" * (4 * 1024 * 1024)),
    plan_file("control-character", BASE_PLAN.replace("  products:\n", "  prod\x07ucts:\n"), at="prod\x07ucts"),
    Hostile("plan-file-is-a-folder", _plan_is_a_folder, "{plan}"),
    Hostile("plan-file-missing", _plan_is_missing, "{plan}"),
    # --- YAML that does not parse
    edited("tab-indentation", "    database: products", "\tdatabase: products", at="\tdatabase"),
    edited("unclosed-flow-sequence", SERVICE_TAIL, "    depends_on: [a, b\n" + SERVICE_TAIL, at="migrations:"),
    edited("unclosed-flow-mapping", "  main:\n    url", "  main: {url: x\n    url", at="    url: postgresql"),
    edited("bad-indentation", "    database: products", "   database: products", at="    migrations:"),
    edited("mapping-in-a-scalar", "    database: products", "    database: products: more", at="products: more"),
    edited("undefined-alias", "    server: main\n    owner", "    server: *nowhere\n    owner", at="*nowhere"),
    plan_file("two-documents", "version: 1\n---\nversion: 1\n", at="---"),
    # --- the wrong shape
    plan_file("list-at-top-level", "- version: 1\n- servers: {}\n", at="- version"),
    plan_file("scalar-at-top-level", "just a sentence\n", at="just"),
    plan_file("number-at-top-level", "42\n", at="42"),
    edited("version-missing", "version: 1\n", "# no version\n", at="servers:"),  # the mapping that lacks it
    edited("version-2", "version: 1", "version: 2", at="version"),
    edited("version-as-word", "version: 1", "version: one", at="version"),
    edited("servers-is-a-list", "servers:\n  main:\n    url: postgresql://postgres@127.0.0.1:5432/postgres\n",
           "servers:\n  - main\n", at="- main"),
    edited("server-is-a-string", "  main:\n    url: postgresql://postgres@127.0.0.1:5432/postgres\n",
           "  main: postgresql://postgres@127.0.0.1:5432/postgres\n", at="main: postgresql"),
    edited("url-is-a-number", "url: postgresql://postgres@127.0.0.1:5432/postgres", "url: 5432", at="url:"),
    edited("login-is-a-string", "  product_svc:\n    server: main\n", "  product_svc:\n    server: main\n    login: 'yes'\n",
           at="login"),
    appended("depends-on-is-a-string", "    depends_on: product\n", at="depends_on"),
    appended("depends-on-repeats", "    depends_on: [a, a]\n", at="depends_on"),
    appended("target-negative", "    target: -1\n", at="target"),
    appended("target-fraction", "    target: 1.5\n", at="target"),
    edited("port-out-of-range", "    url: postgresql://postgres@127.0.0.1:5432/postgres\n",
           "    embedded: true\n    port: 80\n", at="port"),
    edited("service-is-null", "  product:\n    database: products\n    migrations: migrations/product\n",
           "  product:\n", at="  product:"),
    edited("unknown-top-level-key", "services:", "service:", at="service:"),
    edited("unknown-nested-key", "    database: products", "    databse: products", at="databse"),
    appended("complex-key", "? {a: 1}\n: x\n", at="? {a: 1}"),
    appended("null-key", "~: 1\n", at="~: 1"),
    appended("key-with-blank-lines", '"x\\n\\ny": 1\n', at='"x\\n'),
    edited("duplicate-top-level-key", "roles:", "servers: {}\nroles:", at="servers: {}"),
    edited("duplicate-nested-key", SERVICE_TAIL, "    database: inventory\n" + SERVICE_TAIL, at="database: inventory"),
    # --- tags
    edited("python-object-tag", "version: 1", "version: !!python/object/apply:os.system ['echo pwned']", at="version"),
    edited("unknown-tag", "    server: main\n    owner", "    server: !Ref main\n    owner", at="!Ref"),
    edited("int-tag-on-a-word", "version: 1", "version: !!int one", at="version"),
    edited("impossible-date", "version: 1", "version: 2024-13-45", at="version"),
    edited("binary-tag", "url: postgresql://postgres@127.0.0.1:5432/postgres", "url: !!binary aGVsbG8=", at="url:"),
    # --- variables
    # (an unset url or password is an error only for commands that connect: test_lifecycle)
    edited("unset-variable", "migrations: migrations/product", f"migrations: ${{{UNSET_VARIABLE}}}",
           at="migrations: ${"),
    edited("unterminated-variable", "url: postgresql://postgres@127.0.0.1:5432/postgres", "url: '${DATABASE_URL'",
           at="url:"),
    edited("not-a-variable-name", "url: postgresql://postgres@127.0.0.1:5432/postgres", "url: '${1; rm -rf /}'",
           at="url:"),
    # --- references and the graph
    appended("unknown-dependency", "    depends_on: [prodcut]\n", at="depends_on"),
    edited("unknown-database", "    database: products", "    database: prodcuts", at="prodcuts"),
    edited("unknown-server", "  product_svc:\n    server: main", "  product_svc:\n    server: mian", at="mian"),
    edited("owner-with-quotes-and-semicolons", "owner: product_svc", "owner: \"x'; DROP ROLE postgres; --\"",
           at="DROP ROLE"),
    edited("reference-with-blank-lines", "owner: product_svc", 'owner: "product\\n\\nsvc"', at="owner:"),
    appended("depends-on-itself", "    depends_on: [product]\n", at="depends_on"),
    appended(
        "three-service-cycle",
        "    depends_on: [search]\n  inventory:\n    database: products\n    migrations: migrations/product\n"
        "    table: inventory_migrations\n    depends_on: [product]\n  search:\n    database: products\n"
        "    migrations: migrations/product\n    table: search_migrations\n    depends_on: [inventory]\n",
        at="  product:",
    ),
    appended("two-services-one-table", "  billing:\n    database: products\n    migrations: migrations/product\n",
             at="  billing:"),
    edited("server-without-url", "    url: postgresql://postgres@127.0.0.1:5432/postgres\n", "    url:\n", at="  main:"),
    edited("owner-on-another-server", "roles:\n  product_svc:\n    server: main",
           "  other:\n    url: postgresql://other/postgres\nroles:\n  product_svc:\n    server: other", at="owner:"),
    # --- names
    edited("name-with-tab", "  product_svc:\n", '  "product\\tsvc":\n', at="product\\tsvc"),
    edited("name-with-newlines", "  product_svc:\n", '  "product\\n\\nsvc":\n', at="product\\n"),
    edited("name-with-nul", "  product_svc:\n", '  "product\\0svc":\n', at="product\\0"),
    edited("name-with-lone-surrogate", "  product_svc:\n", '  "product\\udcffsvc":\n', at="product\\udcff"),
    edited("password-with-nul", "    server: main\n", '    server: main\n    password: "pa\\x00ss"\n', at="pa\\x00"),
    edited("password-with-lone-surrogate", "    server: main\n", '    server: main\n    password: "pa\\ud800ss"\n',
           at="pa\\ud800"),
    edited("url-with-nul", "url: postgresql://postgres@127.0.0.1:5432/postgres",
           'url: "host=127.0.0.1\\0 port=1"', at="url:"),
    edited("nested-default-unterminated", "url: postgresql://postgres@127.0.0.1:5432/postgres",
           "url: ${DATABASE_URL:-${OTHER_URL}", at="url:"),
    edited("empty-name", "  products:\n    server", '  "":\n    server', at='"":'),
    edited("name-64-ascii-bytes", "  product_svc:\n", f"  {'r' * 64}:\n", at="r" * 64),
    edited("name-64-bytes-of-umlauts", "  products:\n", f"  {'ü' * 32}:\n", at="ü" * 32),
    edited("name-64-bytes-of-emoji", "  product_svc:\n", f"  {'😀' * 16}:\n", at="😀"),
    edited("quote-semicolon-name-too-long", "  product_svc:\n", f"  \"a'; DROP DATABASE x; --{'ä' * 25}\":\n",
           at="DROP DATABASE"),
    appended("schema-with-control-character", '    schema: "pub\\u0001lic"\n', at="schema:"),
    appended("history-table-too-long", f"    table: {'t' * 60}\n", at="table:"),
    # --- size and depth
    # Named by the anchored value that multiplies (line 2) and the path that expands it.
    Hostile("billion-laughs", plan_file("billion-laughs", BILLION_LAUGHS).build, "{plan}:2:7 (lol5["),
    plan_file("deep-flow-lists", "version: 1\nx: " + "[" * 5000 + "]" * 5000 + "\n"),
    plan_file("deep-flow-mappings", "version: 1\nx: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n"),
    plan_file("deep-block-lists", "version: 1\nx:\n" + "".join("  " * n + "-\n" for n in range(1, 1500))),
    plan_file("recursive-alias", "version: 1\nx: &loop [*loop]\n"),
    # --- migration folders
    edited("migrations-path-escapes", "migrations: migrations/product", "migrations: ../../../etc", at="../../../etc"),
    edited("migrations-path-absolute", "migrations: migrations/product", "migrations: /etc", at="/etc"),
    edited("migrations-path-with-nul", "migrations: migrations/product", 'migrations: "migrations/\\0product"',
           at="\\0product"),
    edited("migrations-folder-missing", "migrations: migrations/product", "migrations: migrations/nope", at="nope"),
    _folder_is_file,
    _symlink_folder_out,
    folder("malformed-name", {"init.up.sql": ""}, "migrations/product/init.up.sql"),
    folder("name-without-direction", {"000002_prices.sql": ""}, "migrations/product/000002_prices.sql"),
    folder("unicode-digits-version", {"٠٠٢_prices.up.sql": ""}, "migrations/product/٠٠٢_prices.up.sql"),
    folder("newline-in-file-name", {"000002_a\n.up.sql": ""}, "migrations/product/000002_a\\n.up.sql"),
    folder("version-beyond-bigint", {"99999999999999999999_big.up.sql": ""},
           "migrations/product/99999999999999999999_big.up.sql"),
    folder("duplicate-version", {"00001_init.up.sql": ""}, "migrations/product/00001_init.up.sql"),
    folder("title-mismatch-with-quotes", {"000002_a;b.up.sql": "", "000002_a'b.down.sql": ""},
           "migrations/product/000002_a;b.up.sql"),
    folder("down-without-up", {"000002_prices.down.sql": ""}, "migrations/product/000002_prices.down.sql"),
    folder("binary-migration", {"000002_blob.up.sql": b"\x89PNG\r\n\x1a\n\x00\x00"},
           "migrations/product/000002_blob.up.sql"),
    folder("non-utf8-migration", {"000002_latin1.up.sql": "SELECT 'caf\xe9';".encode("latin-1")},
           "migrations/product/000002_latin1.up.sql"),
    folder("utf16-migration", {"000002_wide.up.sql": "SELECT 1;".encode("utf-16")},
           "migrations/product/000002_wide.up.sql"),
    _symlink_out,
    _symlink_loop,
    _dangling,
    _fifo,
    _huge_migration,
]


def test_catalogue_is_large_and_ids_are_unique() -> None:
    assert len(CATALOGUE) >= 40
    assert len({case.id for case in CATALOGUE}) == len(CATALOGUE)


def _place(case: Hostile, plan: Path) -> str:
    return case.place.format(plan=plan)


@pytest.mark.parametrize("case", CATALOGUE, ids=[case.id for case in CATALOGUE])
def test_library_raises_a_dbplan_error_naming_the_place(case: Hostile, tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    plan = case.build(root)
    with pytest.raises(DbplanError) as caught:  # anything else propagates and fails the test
        api.validate(plan, environ={})
    err = caught.value
    assert isinstance(err, (ConfigError, MigrationFileError)), type(err)
    assert _place(case, plan) in str(err)


@pytest.mark.parametrize("case", CATALOGUE, ids=[case.id for case in CATALOGUE])
def test_cli_validate_exits_1_with_one_paragraph(
    case: Hostile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(UNSET_VARIABLE, raising=False)
    monkeypatch.setenv("NO_COLOR", "1")
    root = tmp_path / "project"
    root.mkdir()
    plan = case.build(root)
    code = main(["validate", "-f", str(plan)])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err.startswith("error: ")
    assert "Traceback" not in out + err
    assert "internal error" not in err
    assert "\n\n" not in err.strip(), err  # one paragraph
    assert _place(case, plan) in err


# ---------------------------------------------------------------------------
# Random documents

NAMES = st.sampled_from(
    ["version", "servers", "roles", "databases", "services", "main", "url", "embedded", "port", "server",
     "owner", "login", "password", "database", "migrations", "depends_on", "target", "table", "schema",
     "lint", "allow", "<<", "data_dir", "allow_out_of_order", "", "x" * 70, "ü" * 40]
) | st.text(max_size=12)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["${A}", "${A:-5432}", "${B}", "${B:-}", "$$", "${", "${1}", "$${A}", "a: b", "[x]",
                       "migrations/../../..", "/etc", "2024-13-45", "0x1F", "on", "~", "!!int x"])
    | st.text(max_size=20)
)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(NAMES, children, max_size=5),
    max_leaves=25,
)
PLAN_SHAPED = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 1, 2, "1", None])},
    optional={
        "servers": st.dictionaries(NAMES, st.dictionaries(NAMES, DOCUMENTS, max_size=3), max_size=2),
        "roles": st.dictionaries(NAMES, st.dictionaries(NAMES, DOCUMENTS, max_size=3), max_size=2),
        "databases": st.dictionaries(NAMES, st.dictionaries(NAMES, DOCUMENTS, max_size=3), max_size=2),
        "services": st.dictionaries(NAMES, st.dictionaries(NAMES, DOCUMENTS, max_size=4), max_size=3),
    },
)
YAMLISH_TEXT = st.text(alphabet=string.ascii_letters[:6] + "0123 :-[]{}&*!|>'\"#%@`,?\n\t$<=~.\\", max_size=200)

@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every example (a function-scoped tmp_path would be shared anyway)."""
    return tmp_path_factory.mktemp("random-documents")


def _load_only_dbplan_errors(scratch: Path, text: str) -> None:
    plan = scratch / "dbplan.yaml"
    plan.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        config.load(plan, environ={"A": "1", "B": ""})
    except DbplanError as err:
        assert str(plan) in str(err)  # every error names the file
        assert "\n\n" not in str(err)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(DOCUMENTS, PLAN_SHAPED))
def test_random_documents_raise_only_dbplan_errors(scratch: Path, document: object) -> None:
    _load_only_dbplan_errors(scratch, yaml.safe_dump(document, allow_unicode=True))


# Unquoted fragments that YAML reads as something other than text, or cannot read at all.
RAW_FRAGMENTS = st.sampled_from(
    ["2024-13-45", "2024-02-30 10:00:00", "!!int x", "!!bool maybe", "!!float x", "!!timestamp x", "!!binary @@",
     "!!int 99999999999999999999999", "!!python/name:os.system", "!Custom x", "&a [*a]", "*nope", "[" * 400,
     "{a: " * 400, "? x", "<<: *a", "<<: [1, 2]", "${", "${X:-}", "${UNSET}", "'", '"', "|", ">", "\t", "\x07",
     "~", "0o9", "1_000", ".inf", "-.nan", "yes", "on", "1e400", "@at", "`tick", "%TAG", "- - -", "{}", "[]"]
) | st.text(alphabet=string.printable.replace("\n", "").replace("\r", "").replace("\x0b", "").replace("\x0c", ""), max_size=30)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=BASE_PLAN.count("\n") - 1), RAW_FRAGMENTS), min_size=1, max_size=3))
def test_raw_fragments_in_a_valid_plan_raise_only_dbplan_errors(scratch: Path, edits: list[tuple[int, str]]) -> None:
    lines = BASE_PLAN.splitlines()
    for index, fragment in edits:
        key, colon, _ = lines[index].partition(":")
        lines[index] = f"{key}: {fragment}" if colon else f"{lines[index]}{fragment}"
    _load_only_dbplan_errors(scratch, "\n".join(lines) + "\n")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(YAMLISH_TEXT)
def test_random_yamlish_text_raises_only_dbplan_errors(scratch: Path, text: str) -> None:
    _load_only_dbplan_errors(scratch, text)


def test_merge_key_bomb_is_refused_or_defused(tmp_path: Path) -> None:
    """``<<: [*m, *m, ...]`` nested nine deep: PyYAML before 6.0.4 copies merged pairs
    exponentially, and dbplan's cap refuses the file at the mapping that explodes; 6.0.4
    merges each key once, and the file loads as the ten small servers it spells."""
    from orchestrator.estate import load as config

    root = tmp_path / "project"
    root.mkdir()
    plan = plan_file("merge-key-bomb", MERGE_BOMB, at="m6:").build(root)
    try:
        estate = config.load(plan)
    except DbplanError as err:
        assert err.place is not None and err.place.line == MERGE_BOMB.splitlines().index(
            next(line for line in MERGE_BOMB.splitlines() if "m6:" in line)
        ) + 1
        assert "merge keys" in err.message
    else:
        assert list(estate.servers) == [f"m{n}" for n in range(10)]
        assert {server.url for server in estate.servers.values()} == {"host=x"}

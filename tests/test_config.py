"""config.load: ${VAR} expansion, schema validation, references and where errors point.

Every plan file is written to ``tmp_path`` and loaded with an explicit ``environ`` so the
tests never depend on the environment they run in.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from orchestrator.errors import ConfigError, DbplanError, GraphError
from orchestrator.estate import load as config
from orchestrator.estate.model import EmbeddedSpec, Estate, Role, Server

REPOSITORY = Path(__file__).resolve().parent.parent

# The DESIGN.md example with no variables: every test changes one thing in it.
BASE_PLAN = """\
version: 1
servers:
  main:
    url: postgresql://postgres@127.0.0.1:5432/postgres
roles:
  product_svc:
    server: main
    login: true
databases:
  products:
    server: main
    owner: product_svc
  inventory:
    server: main
services:
  product:
    database: products
    migrations: migrations/product
  inventory:
    database: inventory
    migrations: migrations/inventory
    depends_on: [product]
"""


def write_plan(tmp_path: Path, text: str) -> Path:
    plan = tmp_path / "dbplan.yaml"
    plan.write_text(textwrap.dedent(text), encoding="utf-8")
    return plan


def load(tmp_path: Path, text: str, environ: Mapping[str, str] | None = None) -> Estate:
    return config.load(write_plan(tmp_path, text), environ={} if environ is None else environ)


def load_error(tmp_path: Path, text: str, environ: Mapping[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, environ)
    return caught.value


def line_of(text: str, fragment: str, occurrence: int = 1) -> int:
    """1-based line number of the n-th line of ``text`` that contains ``fragment``."""
    found = [number for number, line in enumerate(text.splitlines(), 1) if fragment in line]
    return found[occurrence - 1]


def column_of(text: str, fragment: str, occurrence: int = 1) -> int:
    line = text.splitlines()[line_of(text, fragment, occurrence) - 1]
    return line.index(fragment) + 1


# ---------------------------------------------------------------------------
# ${VAR} expansion


def test_variable_is_expanded_from_the_given_environment(tmp_path: Path) -> None:
    text = BASE_PLAN.replace("url: postgresql://postgres@127.0.0.1:5432/postgres", "url: ${DATABASE_URL}")
    estate = load(tmp_path, text, {"DATABASE_URL": "postgresql://admin@db.internal/postgres"})
    assert estate.servers["main"].url == "postgresql://admin@db.internal/postgres"


def test_variable_is_read_from_os_environ_when_no_environ_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBPLAN_TEST_URL_FROM_OS", "postgresql://from-os/postgres")
    text = BASE_PLAN.replace(
        "url: postgresql://postgres@127.0.0.1:5432/postgres", "url: ${DBPLAN_TEST_URL_FROM_OS}"
    )
    estate = config.load(write_plan(tmp_path, text))
    assert estate.servers["main"].url == "postgresql://from-os/postgres"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "postgresql://fallback/postgres"),  # unset
        ({"DATABASE_URL": ""}, "postgresql://fallback/postgres"),  # empty counts as unset
        ({"DATABASE_URL": "postgresql://set/postgres"}, "postgresql://set/postgres"),
    ],
    ids=["unset", "empty", "set"],
)
def test_default_applies_when_the_variable_is_unset_or_empty(
    tmp_path: Path, environ: dict[str, str], expected: str
) -> None:
    text = BASE_PLAN.replace(
        "url: postgresql://postgres@127.0.0.1:5432/postgres",
        "url: ${DATABASE_URL:-postgresql://fallback/postgres}",
    )
    assert load(tmp_path, text, environ).servers["main"].url == expected


def test_double_dollar_is_a_literal_dollar_and_is_not_expanded(tmp_path: Path) -> None:
    text = BASE_PLAN.replace("    login: true\n", "    login: true\n    password: pa$$word$${NOT_A_VARIABLE}\n")
    estate = load(tmp_path, text, {"NOT_A_VARIABLE": "leaked"})
    assert estate.roles["product_svc"].password == "pa$word${NOT_A_VARIABLE}"


def _password_of(tmp_path: Path, value: str, environ: Mapping[str, str]) -> str | None:
    text = BASE_PLAN.replace("    login: true\n", f"    login: true\n    password: {value}\n")
    return load(tmp_path, text, environ).roles["product_svc"].password


@pytest.mark.parametrize(
    ("value", "environ", "expected"),
    [
        ("${A:-${B}}", {"B": "from-b"}, "from-b"),
        ("${A:-${B}}", {"A": "from-a"}, "from-a"),  # B is not needed, so not missing
        ("${A:-${B:-${C:-last}}}", {}, "last"),
        ("${A:-x${B:-y}z}", {}, "xyz"),
        ("${A:-pa$$word}", {}, "pa$word"),
        ("${A:-$${B}}", {"B": "no"}, "${B}"),
        ("'${A:-${B}}'", {"B": "quoted"}, "quoted"),
        ("${A:-}tail", {}, "tail"),
        ("${A}", {"A": "${B}"}, "${B}"),  # a value from the environment is never expanded again
    ],
    ids=["default-is-a-variable", "default-unused", "three-deep", "text-around", "dollar-in-default",
         "escaped-reference-in-default", "quoted", "empty-default", "values-not-re-expanded"],
)
def test_defaults_may_hold_references_and_dollars(
    tmp_path: Path, value: str, environ: dict[str, str], expected: str
) -> None:
    assert _password_of(tmp_path, value, environ) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("'${A:-${B}'", "unterminated '${' in value"),
        ("'${A:-x'", "unterminated '${' in value"),
        ("'${A:-${B}}'", "environment variable B is not set"),
        ("'" + "${A:-" * 17 + "x" + "}" * 17 + "'", "defaults nest more than 16 levels deep"),
        ("'" + "${A:-" * 200_000 + "'", "defaults nest more than 16 levels deep"),
    ],
    ids=["inner-unterminated", "default-unterminated", "inner-unset", "too-deep", "very-deep"],
)
def test_a_nested_default_that_cannot_be_expanded_is_a_located_error(tmp_path: Path, value: str, message: str) -> None:
    text = BASE_PLAN.replace("    migrations: migrations/product\n", f"    migrations: {value}\n")
    err = load_error(tmp_path, text)
    assert err.message == message
    assert err.place is not None and (err.place.line, err.place.path) == (18, "services.product.migrations")


def test_several_variables_in_one_scalar(tmp_path: Path) -> None:
    text = BASE_PLAN.replace(
        "url: postgresql://postgres@127.0.0.1:5432/postgres",
        "url: postgresql://${PGUSER}@${PGHOST:-localhost}:${PGPORT:-5432}/postgres",
    )
    estate = load(tmp_path, text, {"PGUSER": "admin", "PGPORT": "6543"})
    assert estate.servers["main"].url == "postgresql://admin@localhost:6543/postgres"


def test_expansion_is_read_as_a_yaml_scalar(tmp_path: Path) -> None:
    text = """\
    version: 1
    servers:
      local:
        embedded: ${EMBEDDED:-true}
        port: ${PG_PORT:-5433}
    databases:
      products:
        server: local
    services:
      product:
        database: products
        migrations: migrations/product
        target: ${PRODUCT_TARGET}
    """
    estate = load(tmp_path, text, {"PRODUCT_TARGET": "7"})
    assert estate.servers["local"].embedded == EmbeddedSpec(data_dir=tmp_path / ".dbplan/postgres", port=5433)
    assert type(estate.servers["local"].embedded.port) is int
    assert estate.services["product"].target == 7
    assert type(estate.services["product"].target) is int


def test_integral_floats_are_read_as_integers(tmp_path: Path) -> None:
    # JSON Schema's "integer" accepts 5433.0; the port ends up in a URL, the target in SQL.
    text = """\
    version: 1
    servers:
      local:
        embedded: true
        port: 5433.0
    databases:
      products:
        server: local
    services:
      product:
        database: products
        migrations: migrations/product
        target: ${PRODUCT_TARGET:-2.0}
    """
    estate = load(tmp_path, text)
    assert repr(estate.servers["local"].embedded.port) == "5433"
    assert repr(estate.services["product"].target) == "2"


@pytest.mark.parametrize(
    "value",
    ["a: b", "[x]", "{url: evil}", "- item", "x\nservers: {}", "&anchor value", "*alias", "!!python/object:os.system"],
)
def test_expansion_never_injects_structure(tmp_path: Path, value: str) -> None:
    text = BASE_PLAN.replace("    login: true\n", "    login: true\n    password: ${PRODUCT_DB_PASSWORD}\n")
    estate = load(tmp_path, text, {"PRODUCT_DB_PASSWORD": value})
    assert estate.roles["product_svc"].password == value
    assert list(estate.servers) == ["main"]


def test_quoted_scalars_stay_strings(tmp_path: Path) -> None:
    text = BASE_PLAN.replace("    login: true\n", "    login: true\n    password: \"${PRODUCT_DB_PASSWORD}\"\n")
    estate = load(tmp_path, text, {"PRODUCT_DB_PASSWORD": "12345"})
    assert estate.roles["product_svc"].password == "12345"


def test_quoted_expansion_is_not_read_as_a_number(tmp_path: Path) -> None:
    text = BASE_PLAN.replace(
        "    migrations: migrations/product\n", "    migrations: migrations/product\n    target: '${T}'\n"
    )
    err = load_error(tmp_path, text, {"T": "3"})
    assert err.message == "expected integer, got a string '3'"
    assert err.place is not None and err.place.path == "services.product.target"


def test_missing_variable_is_named_with_its_place(tmp_path: Path) -> None:
    # A url or password may wait until a command connects (see test_lifecycle); any other
    # value is needed to read the file at all.
    text = BASE_PLAN.replace("url: postgresql://postgres@127.0.0.1:5432/postgres", "url: ${DATABASE_URL}")
    estate = load(tmp_path, text, {})
    with pytest.raises(ConfigError) as raised:
        estate.require_secrets()
    err = raised.value
    assert err.message == "environment variable DATABASE_URL is not set"
    assert err.hint == "set DATABASE_URL, or give a default with ${DATABASE_URL:-default}"
    assert (err.place.line, err.place.column, err.place.path) == (4, 10, "servers.main.url")
    assert str(err).startswith(f"{tmp_path / 'dbplan.yaml'}:4:10 (servers.main.url): environment variable")
    folder = load_error(tmp_path, text.replace("migrations: migrations/product", "migrations: ${PRODUCT_DIR}"), {})
    assert folder.message == "environment variable PRODUCT_DIR is not set"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("${DATABASE_URL", "unterminated '${' in value"),
        ("${1NOT_A_NAME}", "'${1NOT_A_NAME}' is not a variable reference"),
        ("${}", "'${}' is not a variable reference"),
        ("${A-B}", "'${A-B}' is not a variable reference"),
    ],
)
def test_malformed_references_are_errors(tmp_path: Path, value: str, message: str) -> None:
    text = BASE_PLAN.replace("    migrations: migrations/product\n", f"    migrations: '{value}'\n")
    err = load_error(tmp_path, text)
    assert err.message == message
    assert err.place is not None and (err.place.line, err.place.path) == (18, "services.product.migrations")


SECRET_LOOKALIKES = ["12345", "0123", "1.0e+3", "0x1F", "yes", "off", "null", "~", "Null", "NULL", "2024-01-01",
                     "2024-13-45", ".inf", "12:30:00"]


@pytest.mark.parametrize("value", SECRET_LOOKALIKES)
@pytest.mark.parametrize("field", ["password", "url"])
def test_a_secret_that_reads_as_no_text_is_an_error_that_never_shows_it(tmp_path: Path, field: str, value: str) -> None:
    if field == "password":
        text = BASE_PLAN.replace("    login: true\n", "    login: true\n    password: ${PW}\n")
        path = "roles.product_svc.password"
    else:
        text = BASE_PLAN.replace("url: postgresql://postgres@127.0.0.1:5432/postgres", "url: ${PW}")
        path = "servers.main.url"
    err = load_error(tmp_path, text, {"PW": value})
    assert value not in _without_folder(err, tmp_path), "the message shows the secret"
    assert "(not shown: it is secret)" in err.message
    assert 'quote it, as in' in (err.hint or "")
    assert err.place is not None and err.place.path == path


def _without_folder(err: Exception, folder: Path) -> str:
    """The message, but for the test's folder: pytest numbers its folders (pytest-1677),
    and a secret such as 77 would be found in the path."""
    return str(err).replace(str(folder), "<folder>")


@pytest.mark.parametrize("value", ["12345", "yes", "1.5", "[a, b]", "{a: b}", "!!int 77", "!!timestamp 2024-13-45"])
def test_a_secret_written_as_no_text_is_an_error_that_never_shows_it(tmp_path: Path, value: str) -> None:
    text = BASE_PLAN.replace("    login: true\n", f"    login: true\n    password: {value}\n")
    err = load_error(tmp_path, text)
    for shown in ("12345", "77", "1.5", "2024-13-45", "'a'"):
        assert shown not in _without_folder(err, tmp_path), "the message shows the secret"
    assert err.place is not None and err.place.path == "roles.product_svc.password"


@pytest.mark.parametrize("value", ["'${a b}'", "'pre${1x}post'", "'x${A-B}y'"])
def test_a_malformed_reference_in_a_secret_is_not_quoted(tmp_path: Path, value: str) -> None:
    text = BASE_PLAN.replace("    login: true\n", f"    login: true\n    password: {value}\n")
    err = load_error(tmp_path, text)
    assert err.message == "a '${...}' is not a variable reference"
    assert value.strip("'") not in str(err)


def test_a_quoted_secret_stays_text_whatever_it_holds(tmp_path: Path) -> None:
    assert _password_of(tmp_path, '"${PW}"', {"PW": "null"}) == "null"
    assert _password_of(tmp_path, '"${PW}"', {"PW": "0123"}) == "0123"
    assert _password_of(tmp_path, "${PW:-}", {}) is None, "an empty password is no password"
    assert _password_of(tmp_path, "${PW}", {"PW": "p4ss"}) == "p4ss"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("pg_admin", "role name 'pg_admin' is reserved by PostgreSQL (names starting with 'pg_' are for its own roles)"),
        ("pg_", "role name 'pg_' is reserved by PostgreSQL (names starting with 'pg_' are for its own roles)"),
        ("public", "role name 'public' is reserved by PostgreSQL"),
        ("none", "role name 'none' is reserved by PostgreSQL"),
    ],
)
def test_reserved_role_names_are_refused(tmp_path: Path, name: str, message: str) -> None:
    text = BASE_PLAN.replace("product_svc", name)
    err = load_error(tmp_path, text)
    assert err.message == message
    assert err.place is not None and (err.place.line, err.place.path) == (line_of(text, f"  {name}:"), f"roles.{name}")


@pytest.mark.parametrize("name", ["Pg_admin", "pgadmin", "PUBLIC", "None", "current_user"])
def test_names_postgresql_accepts_are_not_reserved(tmp_path: Path, name: str) -> None:
    assert name in load(tmp_path, BASE_PLAN.replace("product_svc", name)).roles


@pytest.mark.parametrize("escape", ["\\0", "\\x00", "\\u0000"])
def test_a_password_with_a_nul_character_is_refused(tmp_path: Path, escape: str) -> None:
    text = BASE_PLAN.replace("    login: true\n", f'    login: true\n    password: "before{escape}after"\n')
    err = load_error(tmp_path, text)
    assert err.message.startswith("the value holds a NUL character")
    assert "before" not in str(err) and "after" not in str(err)
    assert err.place is not None and err.place.path == "roles.product_svc.password"


def test_an_environment_variable_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    text = BASE_PLAN.replace("    login: true\n", "    login: true\n    password: ${PW}\n")
    err = load_error(tmp_path, text, {"PW": "ab" + b"\xff".decode("utf-8", "surrogateescape")})
    assert err.message == "environment variable PW is not valid UTF-8 (at character 3 of its value)"
    assert err.place is not None and err.place.path == "roles.product_svc.password"


def test_keys_are_not_expanded(tmp_path: Path) -> None:
    text = BASE_PLAN.replace("  main:\n", "  ${SERVER}:\n").replace("server: main", "server: ${SERVER}")
    err = load_error(tmp_path, text, {"SERVER": "main"})
    # The key stays "${SERVER}"; the references expand to "main", which is then unknown.
    assert err.message == "unknown server 'main'"
    assert err.hint == "known servers: '${SERVER}'"


# ---------------------------------------------------------------------------
# The repository's own example


def test_repository_example_validates_with_an_empty_environment() -> None:
    estate = config.load(REPOSITORY / "dbplan.yaml", environ={})
    assert estate.servers["main"].url is None
    assert estate.servers["main"].embedded == EmbeddedSpec(data_dir=REPOSITORY / ".dbplan/postgres", port=None)
    assert estate.roles["product_svc"] == Role("product_svc", "main", login=True, password=None)
    assert [(d.name, d.owner) for d in estate.databases.values()] == [
        ("products", "product_svc"),
        ("inventory", "inventory_svc"),
    ]
    assert [(s.name, s.depends_on) for s in estate.services.values()] == [
        ("product", ()),
        ("inventory", ("product",)),
    ]
    assert estate.services["product"].migrations_dir == REPOSITORY / "migrations/product"


def test_repository_example_takes_url_and_passwords_from_the_environment() -> None:
    estate = config.load(
        REPOSITORY / "dbplan.yaml",
        environ={"DATABASE_URL": "postgresql://u:pw@h/postgres", "PRODUCT_DB_PASSWORD": "s3cret"},
    )
    assert estate.servers["main"].url == "postgresql://u:pw@h/postgres"
    assert estate.roles["product_svc"].password == "s3cret"
    assert estate.roles["inventory_svc"].password is None
    assert estate.secrets() == ("s3cret", "pw")


# ---------------------------------------------------------------------------
# What the file declares


def test_base_plan_loads_in_file_order(tmp_path: Path) -> None:
    estate = load(tmp_path, BASE_PLAN)
    assert estate.servers == {
        "main": Server("main", "postgresql://postgres@127.0.0.1:5432/postgres", embedded=None)
    }
    assert list(estate.databases) == ["products", "inventory"]
    assert list(estate.services) == ["product", "inventory"]
    assert estate.root == tmp_path
    assert estate.services["inventory"].place.line == line_of(BASE_PLAN, "  inventory:", 2)


def test_merge_keys_let_a_mapping_override_what_it_merges(tmp_path: Path) -> None:
    text = BASE_PLAN + textwrap.indent(
        textwrap.dedent(
            """\
            billing: &service_defaults
              database: products
              migrations: migrations/billing
              table: billing_migrations
            billing_jobs:
              <<: *service_defaults
              migrations: migrations/billing_jobs
              table: billing_jobs_migrations
            """
        ),
        "  ",
    )
    estate = load(tmp_path, text)
    jobs = estate.services["billing_jobs"]
    assert (jobs.database, jobs.migrations_display, jobs.table) == (
        "products",
        "migrations/billing_jobs",
        "billing_jobs_migrations",
    )


def test_yaml_11_words_as_keys_stay_names(tmp_path: Path) -> None:
    # `on:`, `no:` and `null:` are booleans and null in YAML 1.1; as keys they are names.
    text = BASE_PLAN.replace("  product_svc:\n", "  on:\n").replace("owner: product_svc", "owner: 'on'")
    estate = load(tmp_path, text)
    assert list(estate.roles) == ["on"]
    assert estate.databases["products"].owner == "on"


def test_names_with_quotes_and_semicolons_are_kept_verbatim(tmp_path: Path) -> None:
    # Legal PostgreSQL identifiers when quoted; the executor quotes every identifier.
    name = "x\"'; DROP ROLE postgres; --"
    text = BASE_PLAN.replace("  product_svc:\n", f"  '{name.replace(chr(39), chr(39) * 2)}':\n").replace(
        "owner: product_svc", f"owner: '{name.replace(chr(39), chr(39) * 2)}'"
    )
    estate = load(tmp_path, text)
    assert list(estate.roles) == [name]
    assert estate.databases["products"].owner == name


# ---------------------------------------------------------------------------
# Schema errors: unknown keys, wrong types, versions


def test_unknown_key_suggests_the_known_one(tmp_path: Path) -> None:
    text = BASE_PLAN.replace("    url: postgresql", "    urll: postgresql")
    err = load_error(tmp_path, text)
    assert err.message == "unknown key 'urll'; did you mean 'url'?"
    assert err.hint == "allowed keys here: url, embedded, data_dir, port, maintenance_database, parallel, create_strategy"
    assert (err.place.line, err.place.column, err.place.path) == (4, 5, "servers.main.urll")


def test_unknown_top_level_key_suggests_services(tmp_path: Path) -> None:
    text = BASE_PLAN.replace("services:", "service:")
    err = load_error(tmp_path, text)
    assert err.message == "unknown key 'service'; did you mean 'services'?"
    assert (err.place.line, err.place.column) == (line_of(text, "service:"), 1)


def test_unknown_key_without_a_close_match_has_no_suggestion(tmp_path: Path) -> None:
    text = BASE_PLAN.replace("    depends_on: [product]", "    zzzz: 1")
    err = load_error(tmp_path, text)
    assert err.message == "unknown key 'zzzz'"
    assert err.place.path == "services.inventory.zzzz"


@pytest.mark.parametrize(
    ("old", "new", "path", "message"),
    [
        ("    login: true", "    login: 'yes'", "roles.product_svc.login", "expected boolean, got a string 'yes'"),
        ("depends_on: [product]", "depends_on: product", "services.inventory.depends_on",
         "expected array, got a string 'product'"),
        ("  product:\n    database: products\n", "  product:\n    database: 42\n", "services.product.database",
         "expected string, got a number 42"),
        ("  products:\n    server: main", "  products:\n    server: [main]", "databases.products.server",
         "expected string, got a list"),
        ("url: postgresql://postgres@127.0.0.1:5432/postgres", "url: 5432", "servers.main.url",
         "expected string or null, got a number (not shown: it is secret)"),
    ],
    ids=["bool", "array", "string-number", "string-list", "string-or-null"],
)
def test_wrong_types_name_what_was_expected(tmp_path: Path, old: str, new: str, path: str, message: str) -> None:
    text = BASE_PLAN.replace(old, new, 1)
    assert text != BASE_PLAN
    err = load_error(tmp_path, text)
    assert err.message == message
    assert err.place.path == path
    assert err.place.line == line_of(text, new.strip().splitlines()[-1])


def test_a_list_at_the_top_is_an_error(tmp_path: Path) -> None:
    err = load_error(tmp_path, "- version: 1\n")
    assert err.message == "the plan file must be a mapping with 'version: 1' at the top, got a list"
    assert (err.place.line, err.place.column) == (1, 1)


@pytest.mark.parametrize(
    ("version", "message"),
    [
        ("2", "unsupported plan file version 2; this dbplan reads version 1"),
        ("'1'", "unsupported plan file version '1'; this dbplan reads version 1"),
        ("true", "unsupported plan file version True; this dbplan reads version 1"),
    ],
)
def test_version_must_be_1(tmp_path: Path, version: str, message: str) -> None:
    err = load_error(tmp_path, BASE_PLAN.replace("version: 1", f"version: {version}"))
    assert err.message == message
    assert (err.place.line, err.place.column, err.place.path) == (1, 10, "version")


def test_version_is_required(tmp_path: Path) -> None:
    err = load_error(tmp_path, BASE_PLAN.replace("version: 1\n", ""))
    assert err.message == "'version' is a required property"


def test_several_schema_problems_report_the_first_and_count_the_rest(tmp_path: Path) -> None:
    text = BASE_PLAN.replace("    login: true", "    login: 'yes'").replace("depends_on: [product]", "depends_on: 1")
    err = load_error(tmp_path, text)
    assert err.place.path == "roles.product_svc.login"
    assert err.hint == "1 more problem after this one"


def test_a_tagged_scalar_that_does_not_parse_is_an_error_not_a_crash(tmp_path: Path) -> None:
    text = BASE_PLAN.replace("    login: true", "    login: !!bool maybe")
    err = load_error(tmp_path, text)
    assert err.message == "cannot read 'maybe' as bool"
    assert (err.place.line, err.place.path) == (line_of(text, "maybe"), "roles.product_svc.login")


def test_an_impossible_date_is_an_error_not_a_crash(tmp_path: Path) -> None:
    err = load_error(tmp_path, BASE_PLAN.replace("version: 1", "version: 2024-13-45"))
    assert err.message == "cannot read '2024-13-45' as timestamp"
    assert (err.place.line, err.place.column) == (1, 10)


# ---------------------------------------------------------------------------
# References


@pytest.mark.parametrize(
    ("old", "new", "path", "message"),
    [
        ("depends_on: [product]", "depends_on: [prodcut]", "services.inventory.depends_on[0]",
         "unknown service 'prodcut'; did you mean 'product'?"),
        ("    database: inventory\n", "    database: inventroy\n", "services.inventory.database",
         "unknown database 'inventroy'; did you mean 'inventory'?"),
        ("owner: product_svc", "owner: prodct_svc", "databases.products.owner",
         "unknown role 'prodct_svc'; did you mean 'product_svc'?"),
        ("  product_svc:\n    server: main", "  product_svc:\n    server: mian", "roles.product_svc.server",
         "unknown server 'mian'; did you mean 'main'?"),
        ("owner: product_svc", "owner: somebody_else", "databases.products.owner", "unknown role 'somebody_else'"),
    ],
    ids=["service", "database", "role", "server", "no-suggestion"],
)
def test_unknown_references_suggest_the_closest_name(
    tmp_path: Path, old: str, new: str, path: str, message: str
) -> None:
    text = BASE_PLAN.replace(old, new, 1)
    assert text != BASE_PLAN
    err = load_error(tmp_path, text)
    assert err.message == message
    assert err.place.path == path
    fragment = new.strip().splitlines()[-1].split(": ")[1].strip("[]")
    assert (err.place.line, err.place.column) == (line_of(text, fragment), column_of(text, fragment))


def test_unknown_service_error_lists_the_known_services(tmp_path: Path) -> None:
    err = load_error(tmp_path, BASE_PLAN.replace("depends_on: [product]", "depends_on: [prodcut]"))
    assert err.hint == "known services: 'product', 'inventory'"
    text = BASE_PLAN.replace("depends_on: [product]", "depends_on: [prodcut]")
    assert str(err) == (
        f"{tmp_path / 'dbplan.yaml'}:{line_of(text, 'prodcut')}:18 (services.inventory.depends_on[0]): "
        "unknown service 'prodcut'; did you mean 'product'?\n  hint: known services: 'product', 'inventory'"
    )


def test_a_service_that_depends_on_itself(tmp_path: Path) -> None:
    err = load_error(tmp_path, BASE_PLAN.replace("depends_on: [product]", "depends_on: [product, inventory]"))
    assert err.message == "service 'inventory' depends on itself"
    assert err.place.path == "services.inventory.depends_on[1]"


def test_owner_must_be_on_the_database_server(tmp_path: Path) -> None:
    text = BASE_PLAN.replace("  main:\n", "  main:\n    url: postgresql://a/postgres\n  other:\n", 1).replace(
        "    url: postgresql://postgres@127.0.0.1:5432/postgres\n", "    url: postgresql://b/postgres\n"
    ).replace("  product_svc:\n    server: main", "  product_svc:\n    server: other")
    err = load_error(tmp_path, text)
    assert err.message == "owner 'product_svc' is a role on server 'other', but database 'products' is on server 'main'"
    assert err.place.path == "databases.products.owner"


def test_dependency_cycle_is_reported_at_load_time(tmp_path: Path) -> None:
    text = BASE_PLAN.replace(
        "    migrations: migrations/product\n", "    migrations: migrations/product\n    depends_on: [inventory]\n"
    )
    with pytest.raises(GraphError) as caught:
        load(tmp_path, text)
    assert caught.value.message == (
        "dependency cycle between services ('a -> b': a depends on b): product -> inventory -> product"
    )
    assert caught.value.place.line == line_of(text, "  product:")


# ---------------------------------------------------------------------------
# Line, column, duplicate keys


def test_duplicate_key_names_both_lines(tmp_path: Path) -> None:
    text = BASE_PLAN.replace("    depends_on: [product]\n", "    depends_on: [product]\n    database: products\n")
    err = load_error(tmp_path, text)
    first = line_of(text, "    database: inventory")
    second = line_of(text, "    database: products", 2)
    assert err.message == f"duplicate key 'database' (first defined on line {first})"
    assert (err.place.line, err.place.column, err.place.path) == (second, 5, "services.inventory.database")


def test_duplicate_top_level_section(tmp_path: Path) -> None:
    err = load_error(tmp_path, BASE_PLAN + "servers:\n  other:\n    url: x\n")
    assert err.message == "duplicate key 'servers' (first defined on line 2)"
    assert err.place.line == len(BASE_PLAN.splitlines()) + 1


def test_invalid_yaml_points_at_line_and_column(tmp_path: Path) -> None:
    text = BASE_PLAN.replace("depends_on: [product]", "depends_on: [product")
    err = load_error(tmp_path, text)
    assert err.message.startswith("invalid YAML: ")
    assert err.place.file == str(tmp_path / "dbplan.yaml")
    assert err.place.line == len(text.splitlines()) + 1  # the parser notices at the end of the stream


def test_tab_indentation_points_at_the_tab(tmp_path: Path) -> None:
    text = BASE_PLAN.replace("    login: true", "\tlogin: true")
    err = load_error(tmp_path, text)
    assert err.message == "invalid YAML: found character '\\t' that cannot start any token"
    assert (err.place.line, err.place.column) == (line_of(text, "\tlogin"), 1)


def test_control_character_points_at_its_line(tmp_path: Path) -> None:
    text = BASE_PLAN.replace("  inventory:\n    server", "  invent\x07ory:\n    server")
    err = load_error(tmp_path, text)
    assert err.message == "invalid YAML: control character #x0007 is not allowed"
    assert (err.place.line, err.place.column) == (line_of(text, "\x07"), 9)


# ---------------------------------------------------------------------------
# Servers, shared tables, identifier lengths


def test_server_without_url_must_be_embedded(tmp_path: Path) -> None:
    text = BASE_PLAN.replace("    url: postgresql://postgres@127.0.0.1:5432/postgres\n", "    url:\n")
    err = load_error(tmp_path, text)
    assert err.message == "server 'main' has no url"
    assert "embedded: true" in err.hint
    assert (err.place.line, err.place.path) == (3, "servers.main")


def test_empty_url_with_embedded_is_the_embedded_server(tmp_path: Path) -> None:
    text = BASE_PLAN.replace(
        "    url: postgresql://postgres@127.0.0.1:5432/postgres\n",
        "    url: ${DATABASE_URL:-}\n    embedded: true\n    data_dir: var/pg\n",
    )
    server = load(tmp_path, text).servers["main"]
    assert (server.url, server.embedded) == (None, EmbeddedSpec(data_dir=tmp_path / "var/pg"))


def test_two_embedded_servers_cannot_share_a_data_dir(tmp_path: Path) -> None:
    text = "version: 1\nservers:\n  a:\n    embedded: true\n  b:\n    embedded: true\n"
    err = load_error(tmp_path, text)
    assert err.message == "servers 'a' and 'b' share the embedded data_dir"
    assert err.place.line == 5


def test_two_services_sharing_a_migrations_table(tmp_path: Path) -> None:
    text = BASE_PLAN + "  billing:\n    database: products\n    migrations: migrations/billing\n"
    err = load_error(tmp_path, text)
    assert err.message == (
        "services 'product' and 'billing' both keep their migrations in table 'schema_migrations' "
        "of database 'products'"
    )
    assert err.hint == "give one of them its own 'table' (or 'schema')"
    assert (err.place.line, err.place.path) == (line_of(text, "  billing:"), "services.billing")


@pytest.mark.parametrize("extra", ["    table: billing_migrations\n", "    schema: billing\n"])
def test_services_in_one_database_with_their_own_table_or_schema(tmp_path: Path, extra: str) -> None:
    text = BASE_PLAN + "  billing:\n    database: products\n    migrations: migrations/billing\n" + extra
    assert list(load(tmp_path, text).services) == ["product", "inventory", "billing"]


def test_two_services_sharing_a_history_table(tmp_path: Path) -> None:
    # Table `dbplan` keeps its history in `dbplan_history`: the default table's history too.
    text = BASE_PLAN + "  billing:\n    database: products\n    migrations: migrations/billing\n    table: dbplan\n"
    err = load_error(tmp_path, text)
    assert err.message == (
        "table 'dbplan_history' of database 'products' would hold the history of service 'product' "
        "and the history of service 'billing'"
    )


def test_a_migrations_table_named_like_another_services_history(tmp_path: Path) -> None:
    text = (
        BASE_PLAN + "  billing:\n    database: products\n    migrations: migrations/billing\n    table: dbplan_history\n"
    )
    err = load_error(tmp_path, text)
    assert err.message == (
        "table 'dbplan_history' of database 'products' would hold the history of service 'product' "
        "and the migrations of service 'billing'"
    )


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        ("a" * 63, True),
        ("ü" * 31 + "a", True),  # 63 bytes
        ("ü" * 32, False),  # 32 characters, 64 bytes
        ("名" * 22, False),  # 66 bytes
        ("😀" * 16, False),  # 64 bytes
    ],
    ids=["63-ascii", "63-bytes", "64-bytes-2-byte-chars", "66-bytes-3-byte-chars", "64-bytes-emoji"],
)
def test_database_names_are_limited_to_63_bytes(tmp_path: Path, name: str, accepted: bool) -> None:
    text = BASE_PLAN.replace("  inventory:\n    server: main", f"  {name}:\n    server: main").replace(
        "database: inventory", f"database: {name}"
    )
    if accepted:
        assert name in load(tmp_path, text).databases
        return
    err = load_error(tmp_path, text)
    size = len(name.encode("utf-8"))
    assert err.message == (
        f"database name '{name}' is {size} bytes long; PostgreSQL keeps only 63 and would silently cut it"
    )
    assert (err.place.line, err.place.path) == (line_of(text, f"  {name}:"), f"databases.{name}")


def test_role_name_of_64_multibyte_bytes(tmp_path: Path) -> None:
    name = "ö" * 32
    text = BASE_PLAN.replace("product_svc", name)
    err = load_error(tmp_path, text)
    assert err.message.startswith(f"role name '{name}' is 64 bytes long")
    assert err.place.path == f"roles.{name}"


def test_names_longer_than_63_characters_point_at_the_key(tmp_path: Path) -> None:
    name = "r" * 64
    text = BASE_PLAN.replace("product_svc", name)
    err = load_error(tmp_path, text)
    assert err.message == f"name '{name}' is longer than 63 characters"
    assert (err.place.line, err.place.column, err.place.path) == (line_of(text, f"  {name}:"), 3, f"roles.{name}")


def test_names_with_control_characters_point_at_the_key(tmp_path: Path) -> None:
    text = BASE_PLAN.replace("  product_svc:\n", '  "product\\tsvc":\n')
    err = load_error(tmp_path, text)
    assert err.message == "name 'product\\tsvc' contains a control character (tab, newline, ...)"
    assert err.place.line == line_of(text, "product\\tsvc")


def test_table_name_over_63_bytes(tmp_path: Path) -> None:
    table = "t" * 40 + "ü" * 12  # 52 characters, 64 bytes
    text = BASE_PLAN.replace("    migrations: migrations/product\n", f"    migrations: migrations/product\n    table: {table}\n")
    err = load_error(tmp_path, text)
    assert err.message.startswith(f"table name '{table}' is 64 bytes long")
    assert err.place.path == "services.product.table"


def test_history_table_name_over_63_bytes(tmp_path: Path) -> None:
    table = "m" * 60  # fits, but its history table m..._history does not
    text = BASE_PLAN.replace("    migrations: migrations/product\n", f"    migrations: migrations/product\n    table: {table}\n")
    err = load_error(tmp_path, text)
    assert err.message.startswith(f"history table name '{table}_history' is 68 bytes long")
    assert (err.place.line, err.place.path) == (line_of(text, "    table:"), "services.product.table")


# ---------------------------------------------------------------------------
# The file itself


def test_missing_plan_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(tmp_path / "nope.yaml", environ={})
    assert caught.value.message == f"plan file {tmp_path / 'nope.yaml'} not found"


def test_empty_plan_file(tmp_path: Path) -> None:
    err = load_error(tmp_path, "# only a comment\n")
    assert err.message == "the plan file is empty"
    assert err.hint == "start with 'version: 1'"


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    plan = tmp_path / "dbplan.yaml"
    plan.write_bytes(b"\xef\xbb\xbf" + BASE_PLAN.encode())
    assert list(config.load(plan, environ={}).services) == ["product", "inventory"]


def test_every_error_is_a_dbplan_error(tmp_path: Path) -> None:
    assert issubclass(ConfigError, DbplanError)
    assert issubclass(GraphError, ConfigError)

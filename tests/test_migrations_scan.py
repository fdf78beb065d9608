"""migrations.scan_service: golang-migrate file names, pairing, and files that cannot be used.

Folders are written under ``tmp_path``, which plays the plan file's folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from estate import write_files

from orchestrator.errors import MigrationFileError, Place
from orchestrator.estate.model import Database, Estate, Server, Service
from orchestrator.migrations import scan as migrations
from orchestrator.migrations.scan import Migration, MigrationFile, MigrationSet, RunMode

MIGRATIONS_PLACE = Place("dbplan.yaml", 12, 17, "services.product.migrations")


def product_service(root: Path, folder: str = "migrations/product") -> Service:
    return Service(
        name="product",
        database="products",
        migrations_dir=root / folder,
        migrations_display=folder,
        migrations_place=MIGRATIONS_PLACE,
    )


def write(root: Path, files: dict[str, str | bytes], folder: str = "migrations/product") -> Path:
    return write_files(root / folder, files)


def scan(root: Path) -> MigrationSet:
    return migrations.scan_service(product_service(root), root)


def scan_error(root: Path) -> MigrationFileError:
    with pytest.raises(MigrationFileError) as caught:
        scan(root)
    return caught.value


def file_of(root: Path, name: str, folder: str = "migrations/product") -> MigrationFile:
    path = root / folder / name
    return MigrationFile(path, f"{folder}/{name}", hashlib.sha256(path.read_bytes()).hexdigest(), text="")


# ---------------------------------------------------------------------------
# Names and pairing


def test_golang_migrate_pairs(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "000001_init_schema.up.sql": "CREATE TABLE product (id bigint);\n",
            "000001_init_schema.down.sql": "DROP TABLE product;\n",
            "000002_add_prices.up.sql": "ALTER TABLE product ADD price numeric;\n",
        },
    )
    scanned = scan(tmp_path)
    assert scanned == MigrationSet(
        "product",
        tmp_path / "migrations/product",
        (
            Migration(
                1,
                "init_schema",
                file_of(tmp_path, "000001_init_schema.up.sql"),
                file_of(tmp_path, "000001_init_schema.down.sql"),
            ),
            Migration(2, "add_prices", file_of(tmp_path, "000002_add_prices.up.sql"), None),
        ),
    )
    assert scanned.latest == 2
    assert scanned.migrations[0].up.text == "CREATE TABLE product (id bigint);\n"


def test_versions_are_ordered_numerically_not_by_name(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "10_ten.up.sql": "",
            "9_nine.up.sql": "",
            "20240101120000_timestamp.up.sql": "",
            "0_zero.up.sql": "",
        },
    )
    scanned = scan(tmp_path)
    assert [(m.version, m.title) for m in scanned.migrations] == [
        (0, "zero"),
        (9, "nine"),
        (10, "ten"),
        (20240101120000, "timestamp"),
    ]


def test_sparse_versions(tmp_path: Path) -> None:
    write(tmp_path, {"000001_a.up.sql": "", "000005_b.up.sql": "", "000100_c.up.sql": ""})
    scanned = scan(tmp_path)
    assert [m.version for m in scanned.migrations] == [1, 5, 100]
    assert sorted(scanned.by_version()) == [1, 5, 100]
    assert scanned.latest == 100


def test_titles_may_hold_dots_dashes_and_unicode(tmp_path: Path) -> None:
    write(tmp_path, {"000001_add.users-v2_ünïcode.up.sql": "", "000001_add.users-v2_ünïcode.down.sql": ""})
    (migration,) = scan(tmp_path).migrations
    assert migration.title == "add.users-v2_ünïcode"
    assert migration.down is not None


def test_differently_padded_up_and_down_of_one_version_pair_up(tmp_path: Path) -> None:
    write(tmp_path, {"00034_add_index.up.sql": "SELECT 1;\n", "000034_add_index.down.sql": "SELECT 2;\n"})
    (migration,) = scan(tmp_path).migrations
    assert migration == Migration(
        34,
        "add_index",
        file_of(tmp_path, "00034_add_index.up.sql"),
        file_of(tmp_path, "000034_add_index.down.sql"),
    )


def test_two_up_files_of_one_version_are_a_duplicate(tmp_path: Path) -> None:
    write(tmp_path, {"00034_add_index.up.sql": "", "000034_add_index.up.sql": ""})
    err = scan_error(tmp_path)
    assert err.message == "two up files for version 34: 000034_add_index.up.sql and 00034_add_index.up.sql"
    assert err.place == Place("migrations/product/00034_add_index.up.sql")
    assert err.hint == "every version needs exactly one up file (and at most one down file)"


def test_two_up_files_of_one_version_with_different_titles(tmp_path: Path) -> None:
    write(tmp_path, {"000003_alpha.up.sql": "", "3_beta.up.sql": ""})
    err = scan_error(tmp_path)
    assert err.message == "two up files for version 3: 000003_alpha.up.sql and 3_beta.up.sql"


def test_two_down_files_of_one_version(tmp_path: Path) -> None:
    write(tmp_path, {"01_a.up.sql": "", "01_a.down.sql": "", "1_a.down.sql": ""})
    err = scan_error(tmp_path)
    assert err.message == "two down files for version 1: 01_a.down.sql and 1_a.down.sql"
    assert str(err).startswith("migrations/product/1_a.down.sql: ")


def test_neighbouring_versions_with_different_padding_are_fine(tmp_path: Path) -> None:
    write(tmp_path, {"00034_a.up.sql": "", "000035_b.up.sql": ""})
    assert [m.version for m in scan(tmp_path).migrations] == [34, 35]


def test_up_and_down_titles_must_match(tmp_path: Path) -> None:
    write(tmp_path, {"000001_init.up.sql": "", "000001_initial.down.sql": ""})
    err = scan_error(tmp_path)
    assert err.message == "the up and down files of version 1 have different titles: 'init' and 'initial'"
    assert err.place == Place("migrations/product/000001_initial.down.sql")


def test_down_without_up(tmp_path: Path) -> None:
    write(tmp_path, {"000001_init.up.sql": "", "000002_prices.down.sql": ""})
    err = scan_error(tmp_path)
    assert err.message == "down file without an up file for version 2"
    assert err.place == Place("migrations/product/000002_prices.down.sql")
    assert err.hint == "add the matching .up.sql file or remove 000002_prices.down.sql"


@pytest.mark.parametrize(
    "name",
    [
        "000001_init.sql",  # no direction
        "000001.up.sql",  # no title
        "000001_.up.sql",  # empty title
        "init_000001.up.sql",
        "v1_init.up.sql",
        "-1_init.up.sql",
        "1.5_init.up.sql",
        "000001_init.UP.sql",
        "000001_init.upgrade.sql",
        "000001_init.up.sql.sql",
        "٠٠١_arabic_digits.up.sql",  # digits, but not 0-9
        "１_fullwidth.up.sql",
        " 000001_init.up.sql",
    ],
)
def test_malformed_names_are_errors_naming_the_file(tmp_path: Path, name: str) -> None:
    write(tmp_path, {"000001_ok.up.sql": "", name: ""})
    err = scan_error(tmp_path)
    assert err.message == f"cannot read the migration file name '{name}'"
    assert err.place == Place(f"migrations/product/{name}")
    assert "000001_init_schema.up.sql" in err.hint


def test_version_beyond_bigint(tmp_path: Path) -> None:
    write(tmp_path, {"9223372036854775807_max.up.sql": ""})
    assert scan(tmp_path).latest == 2**63 - 1
    write(tmp_path, {"9223372036854775808_over.up.sql": ""})
    err = scan_error(tmp_path)
    assert err.message == "version 9223372036854775808 does not fit in a bigint"
    assert err.place == Place("migrations/product/9223372036854775808_over.up.sql")


# ---------------------------------------------------------------------------
# Contents


def test_empty_and_comment_only_files_are_migrations(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "000001_empty.up.sql": "",
            "000001_empty.down.sql": "",
            "000002_comments.up.sql": "-- nothing to do yet\n/* really nothing */\n",
        },
    )
    empty, comments = scan(tmp_path).migrations
    assert (empty.version, empty.up.checksum) == (1, hashlib.sha256(b"").hexdigest())
    assert empty.run_mode == RunMode.TRANSACTION and empty.transactional
    assert (comments.version, comments.run_mode) == (2, RunMode.TRANSACTION)
    assert comments.up.script.parsed


def test_no_transaction_marker_on_the_first_line(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "000001_index.up.sql": "-- dbplan:no-transaction\nCREATE INDEX CONCURRENTLY i ON t (c);\n",
            "000002_late_marker.up.sql": "SELECT 1;\n-- dbplan:no-transaction\n",
        },
    )
    first, second = scan(tmp_path).migrations
    assert (first.run_mode, first.transactional) == (RunMode.NO_TRANSACTION, False)
    assert (second.run_mode, second.transactional) == (RunMode.TRANSACTION, True)


def test_checksum_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    raw = b"\xef\xbb\xbfCREATE TABLE caf\xc3\xa9 (id int);\r\n"
    write(tmp_path, {"000001_bom_crlf.up.sql": raw})
    (migration,) = scan(tmp_path).migrations
    assert migration.up.checksum == hashlib.sha256(raw).hexdigest()
    assert migration.up.text == "CREATE TABLE café (id int);\r\n"  # BOM dropped from the text only


def test_editing_a_file_changes_its_checksum(tmp_path: Path) -> None:
    write(tmp_path, {"000001_a.up.sql": "SELECT 1;\n"})
    before = scan(tmp_path).migrations[0].up.checksum
    write(tmp_path, {"000001_a.up.sql": "SELECT 1; \n"})
    assert scan(tmp_path).migrations[0].up.checksum != before


def test_binary_file_is_refused(tmp_path: Path) -> None:
    write(tmp_path, {"000001_blob.up.sql": b"SELECT 1;\x00\x01\x02"})
    err = scan_error(tmp_path)
    assert err.message == "000001_blob.up.sql is binary, not SQL"
    assert err.place == Place("migrations/product/000001_blob.up.sql")


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    write(tmp_path, {"000001_latin1.up.sql": "SELECT 'café';".encode("latin-1")})
    err = scan_error(tmp_path)
    assert err.message == "000001_latin1.up.sql is not UTF-8 (byte 11)"  # offset of é, from 0
    assert err.hint == "save the file as UTF-8"


def test_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    directory = write(tmp_path, {})
    with (directory / "000001_huge.up.sql").open("wb") as huge:
        huge.truncate(migrations.MAX_MIGRATION_BYTES + 1)  # sparse: nothing is written
    err = scan_error(tmp_path)
    assert err.message == f"000001_huge.up.sql is {migrations.MAX_MIGRATION_BYTES + 1} bytes; the limit is 67108864"


def test_other_files_and_folders_are_ignored(tmp_path: Path) -> None:
    directory = write(
        tmp_path,
        {
            "000001_init.up.sql": "SELECT 1;\n",
            "README.md": "# migrations\n",
            "notes.txt": "not sql",
            "000002_draft.up.sql.bak": "",
            ".000003_hidden.up.sql": "",
            ".DS_Store": b"\x00\x01",
            "000004_upper.up.SQL": "",
        },
    )
    (directory / "000005_folder.up.sql").mkdir()
    (directory / "archive").mkdir()
    (directory / "archive" / "000006_old.up.sql").write_text("")
    assert [m.version for m in scan(tmp_path).migrations] == [1]


def test_empty_folder_is_an_empty_set(tmp_path: Path) -> None:
    write(tmp_path, {})
    scanned = scan(tmp_path)
    assert (scanned.migrations, scanned.latest) == ((), None)


# ---------------------------------------------------------------------------
# Folders and links


def test_missing_folder_names_the_plan_file_place(tmp_path: Path) -> None:
    err = scan_error(tmp_path)
    assert err.message == "migration folder 'migrations/product' of service 'product' does not exist"
    assert err.place == MIGRATIONS_PLACE
    assert err.hint == "create it (dbplan new product TITLE does) or fix the path"


def test_folder_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations/product").write_text("")
    err = scan_error(tmp_path)
    assert err.message == "'migrations/product' of service 'product' is not a folder"


def test_folder_outside_the_plan_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    write(tmp_path, {"000001_a.up.sql": ""}, folder="elsewhere")
    service = product_service(root, "../elsewhere")
    with pytest.raises(MigrationFileError) as caught:
        migrations.scan_service(service, root)
    assert caught.value.message == "migration folder '../elsewhere' leads outside the plan file's folder"
    assert caught.value.place == MIGRATIONS_PLACE


def test_folder_symlinked_outside_the_plan_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "project"
    (root / "migrations").mkdir(parents=True)
    outside = write(tmp_path, {"000001_a.up.sql": ""}, folder="elsewhere")
    (root / "migrations/product").symlink_to(outside)
    with pytest.raises(MigrationFileError) as caught:
        migrations.scan_service(product_service(root), root)
    assert caught.value.message == "migration folder 'migrations/product' leads outside the plan file's folder"


def test_file_symlinked_outside_the_plan_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "project"
    directory = write(root, {"000001_a.up.sql": ""})
    secret = tmp_path / "secret.sql"
    secret.write_text("SELECT 'not yours';")
    (directory / "000002_steal.up.sql").symlink_to(secret)
    with pytest.raises(MigrationFileError) as caught:
        migrations.scan_service(product_service(root), root)
    assert caught.value.message == "000002_steal.up.sql is a link that leads outside the plan file's folder"
    assert caught.value.place == Place("migrations/product/000002_steal.up.sql")


def test_file_symlinked_inside_the_plan_folder_is_read(tmp_path: Path) -> None:
    directory = write(tmp_path, {})
    shared = tmp_path / "shared" / "extensions.sql"
    shared.parent.mkdir()
    shared.write_text("CREATE EXTENSION IF NOT EXISTS pg_trgm;\n")
    (directory / "000001_extensions.up.sql").symlink_to(shared)
    (migration,) = scan(tmp_path).migrations
    assert migration.up.checksum == hashlib.sha256(shared.read_bytes()).hexdigest()


def test_symlink_loop_is_refused_not_a_crash(tmp_path: Path) -> None:
    directory = write(tmp_path, {})
    (directory / "000001_loop.up.sql").symlink_to("000001_loop.up.sql")
    err = scan_error(tmp_path)
    assert err.message == "cannot read 000001_loop.up.sql: Too many levels of symbolic links"
    assert err.place == Place("migrations/product/000001_loop.up.sql")


def test_dangling_symlink_is_refused(tmp_path: Path) -> None:
    directory = write(tmp_path, {})
    (directory / "000001_gone.up.sql").symlink_to(tmp_path / "migrations" / "gone.sql")
    err = scan_error(tmp_path)
    assert err.message == "cannot read 000001_gone.up.sql: No such file or directory"


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    directory = write(tmp_path, {})
    os.mkfifo(directory / "000001_pipe.up.sql")
    err = scan_error(tmp_path)
    assert err.message == "000001_pipe.up.sql is not a regular file"


def test_scan_covers_every_service_in_file_order(tmp_path: Path) -> None:
    write(tmp_path, {"000001_a.up.sql": ""}, folder="migrations/product")
    write(tmp_path, {"000001_b.up.sql": "", "000002_c.up.sql": ""}, folder="migrations/inventory")
    inventory = Service("inventory", "inventory", tmp_path / "migrations/inventory", "migrations/inventory")
    estate = Estate(
        file=tmp_path / "dbplan.yaml",
        root=tmp_path,
        servers={"main": Server("main", "postgresql://localhost/postgres", None)},
        roles={},
        databases={"inventory": Database("inventory", "main"), "products": Database("products", "main")},
        services={"inventory": inventory, "product": product_service(tmp_path)},
    )
    scanned = migrations.scan(estate)
    assert list(scanned) == ["inventory", "product"]
    assert [m.title for m in scanned["inventory"].migrations] == ["b", "c"]
    assert scanned["product"].folder == tmp_path / "migrations/product"


# ---------------------------------------------------------------------------
# How each file runs (found untested by bench/mutate.py)


def test_each_file_runs_the_way_the_plan_says(tmp_path: Path) -> None:
    """The run modes are shown in the plan and its JSON: their names are part of the contract."""
    write(
        tmp_path,
        {
            "000001_plain.up.sql": "CREATE TABLE a (id int);\n",
            "000002_wrapped.up.sql": "BEGIN;\nCREATE TABLE b (id int);\nCOMMIT;\n",
            "000003_marker.up.sql": "-- dbplan:no-transaction\nCREATE INDEX CONCURRENTLY i ON a (id);\n",
            "000004_two_blocks.up.sql": "BEGIN;\nCREATE TABLE c (id int);\nCOMMIT;\nBEGIN;\nCREATE TABLE d (id int);\nCOMMIT;\n",
            "000005_commit_mid_file.up.sql": "CREATE TABLE e (id int);\nCOMMIT;\nCREATE TABLE f (id int);\n",
            "000006_marker_wins.up.sql": "-- dbplan:no-transaction\nBEGIN;\nSELECT 1;\nCOMMIT;\n",
        },
    )
    modes = [(m.version, m.run_mode, m.transactional) for m in scan(tmp_path).migrations]
    assert modes == [
        (1, "transaction", True),
        (2, "own-transaction-folded", True),
        (3, "no-transaction", False),
        (4, "own-transactions", False),
        (5, "own-transactions", False),
        (6, "no-transaction", False),
    ]


def test_several_transaction_blocks_never_run_as_one_transaction(tmp_path: Path) -> None:
    write(tmp_path, {"000001_blocks.up.sql": "START TRANSACTION;\nSELECT 1;\nEND;\nSTART TRANSACTION;\nSELECT 2;\nEND;\n"})
    (migration,) = scan(tmp_path).migrations
    assert migration.run_mode == RunMode.OWN_TRANSACTIONS
    assert not migration.transactional


def test_a_migration_shown_in_a_log_does_not_dump_its_sql(tmp_path: Path) -> None:
    write(tmp_path, {"000001_secret.up.sql": "ALTER ROLE app PASSWORD 'hunter2';\n"})
    (migration,) = scan(tmp_path).migrations
    assert "hunter2" not in repr(migration)
    assert "000001_secret.up.sql" in repr(migration)



def test_a_file_of_exactly_the_size_limit_is_read(tmp_path: Path) -> None:
    statement = b"SELECT 1;"
    write(tmp_path, {"000001_big.up.sql": statement + b"\n" * (migrations.MAX_MIGRATION_BYTES - len(statement))})
    (migration,) = scan(tmp_path).migrations
    assert len(migration.up.text) == migrations.MAX_MIGRATION_BYTES


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files in /proc/self/fd")
def test_scanning_leaves_no_file_open(tmp_path: Path) -> None:
    write(tmp_path, {f"{v:06d}_m.up.sql": f"SELECT {v};\n" for v in range(1, 41)})
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        assert len(scan(tmp_path).migrations) == 40
    assert len(os.listdir("/proc/self/fd")) == before


def test_an_absolute_folder_reached_through_a_link_is_scanned_and_shown_as_written(tmp_path: Path) -> None:
    """``migrations: /srv/alias/migrations`` where /srv/alias links to the plan file's folder
    (macOS's /var is /private/var): inside the folder, but not under its path."""
    root = tmp_path / "project"
    write(root, {"000001_a.up.sql": "SELECT 1;\n"})
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    folder = alias / "migrations" / "product"
    service = Service("product", "products", folder, str(folder), migrations_place=MIGRATIONS_PLACE)
    (migration,) = migrations.scan_service(service, root).migrations
    assert migration.up.display == f"{folder}/000001_a.up.sql"


def test_migrations_in_the_plan_files_own_folder_are_shown_by_their_names(tmp_path: Path) -> None:
    write(tmp_path, {"000001_a.up.sql": "SELECT 1;\n"}, folder=".")
    service = Service("product", "products", tmp_path, ".", migrations_place=MIGRATIONS_PLACE)
    (migration,) = migrations.scan_service(service, tmp_path).migrations
    assert migration.up.display == "000001_a.up.sql"

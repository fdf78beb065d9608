"""A throwaway estate for integration tests: a plan file, migration folders, and the CLI.

Database and role names carry the test's unique prefix, so tests sharing a cluster never
see each other's objects, and conftest drops them afterwards.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@dataclass
class CliRun:
    code: int
    out: str
    err: str

    @property
    def output(self) -> str:
        return self.out + self.err


class Estate:
    def __init__(self, root: Path, url: str, prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.root = root
        self.url = url
        self.prefix = prefix
        self.capsys = capsys
        self.plan_file = root / "dbplan.yaml"
        self.document: dict[str, Any] = {"version": 1, "servers": {"main": {"url": url}}}

    # -- names -------------------------------------------------------------------------

    def name(self, short: str) -> str:
        return f"{self.prefix}_{short}"

    # -- the plan file -------------------------------------------------------------------

    def add_database(self, short: str, *, server: str = "main", owner: str | None = None) -> str:
        spec: dict[str, Any] = {"server": server}
        if owner:
            spec["owner"] = self.name(owner)
        self.document.setdefault("databases", {})[self.name(short)] = spec
        self.save()
        return self.name(short)

    def add_role(self, short: str, *, server: str = "main", login: bool = True, password: str | None = None) -> str:
        spec: dict[str, Any] = {"server": server, "login": login}
        if password is not None:
            spec["password"] = password
        self.document.setdefault("roles", {})[self.name(short)] = spec
        self.save()
        return self.name(short)

    def add_service(self, service: str, database: str, **options: Any) -> Path:
        folder = self.root / "migrations" / service
        folder.mkdir(parents=True, exist_ok=True)
        spec = {"database": self.name(database), "migrations": f"migrations/{service}", **options}
        self.document.setdefault("services", {})[service] = spec
        self.save()
        return folder

    def add_app(self, **options: Any) -> Path:
        """The one-service estate most tests start from: database "app", service "app" on it."""
        self.add_database("app")
        return self.add_service("app", "app", **options)

    def add_server(self, name: str, url: str) -> None:
        self.document["servers"][name] = {"url": url}
        self.save()

    def save(self) -> None:
        self.plan_file.write_text(yaml.safe_dump(self.document, sort_keys=False), encoding="utf-8")

    def write(self, service: str, filename: str, sql: str) -> Path:
        path = self.root / "migrations" / service / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(sql, encoding="utf-8")
        return path

    # -- running dbplan ------------------------------------------------------------------

    def dbplan(self, *args: str) -> CliRun:
        from orchestrator.cli import main

        self.capsys.readouterr()
        code = main([*args, "-f", str(self.plan_file)])
        captured = self.capsys.readouterr()
        return CliRun(code, captured.out, captured.err)

    # -- looking inside --------------------------------------------------------------------

    def query(self, database: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, dbname=self.name(database), autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]

    def execute(self, database: str, sql: str) -> None:
        with psycopg.connect(self.url, dbname=self.name(database), autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def tables(self, database: str) -> set[str]:
        rows = self.query(database, "select tablename from pg_tables where schemaname = 'public'")
        return {row[0] for row in rows}

    def database_exists(self, database: str) -> bool:
        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute("select 1 from pg_database where datname = %s", (self.name(database),)).fetchone()
        return row is not None


def write_files(folder: Path, files: dict[str, str | bytes]) -> Path:
    """Write migration files (text as UTF-8, bytes as they are) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_text(content, encoding="utf-8")
    return folder


def example_latest(service: str) -> int:
    """The latest version among the repository's example migrations of ``service``."""
    return max(int(path.name.split("_", 1)[0]) for path in (REPO / "migrations" / service).glob("*.up.sql"))


def example_migration_count() -> int:
    return sum(1 for _ in (REPO / "migrations").glob("*/*.up.sql"))


EXAMPLE_ACTIONS = 4  # two roles and two databases, before the migrations


def example_estate(estate: Estate) -> Estate:
    """The repository's own example (product and inventory), with prefixed names."""
    estate.add_role("product_svc")
    estate.add_role("inventory_svc")
    estate.add_database("products", owner="product_svc")
    estate.add_database("inventory", owner="inventory_svc")
    for service in ("product", "inventory"):
        shutil.copytree(REPO / "migrations" / service, estate.root / "migrations" / service)
    estate.add_service("product", "products")
    estate.add_service("inventory", "inventory", depends_on=["product"])
    return estate


def databases_named_like(url: str, pattern: str) -> list[str]:
    """Names of the databases on ``url``'s server matching a LIKE pattern (throwaway twins
    and copies that must be gone after a test)."""
    with psycopg.connect(url, autocommit=True) as conn:
        return [row[0] for row in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (pattern,))]

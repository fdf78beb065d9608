"""Throwaway PostgreSQL clusters for the test suite (used by conftest.py).

One :class:`ClusterPool` per test session owns every embedded cluster the session starts:
they live in one temporary folder, are started in background threads as soon as the
collected tests show they are needed, and are stopped and deleted at session end.

Environment:
  DBPLAN_TEST_URL   admin URL of an existing server used instead of the main cluster
  DBPLAN_TEST_URL2  same, for the second cluster (multi-server plans)
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import psycopg
from psycopg import sql

from orchestrator.server.embedded import EmbeddedServer, PgBinaries, find_binaries, list_binaries

ENV_URL = "DBPLAN_TEST_URL"
ENV_URL2 = "DBPLAN_TEST_URL2"

MAIN = "main"
SECOND = "second"


def connect(url: str, **kwargs: object) -> psycopg.Connection:
    """An autocommit connection (short timeout: a test should fail, not hang)."""
    kwargs.setdefault("connect_timeout", 10)
    return psycopg.connect(url, autocommit=True, **kwargs)  # type: ignore[arg-type]


def embedded_password(url: str) -> str | None:
    """The password of an embedded cluster's URL, read from the file it names (?passfile=).

    For test helpers that cannot read libpq's password file themselves (PgBouncer).
    """
    from urllib.parse import parse_qs, urlsplit

    passfile = parse_qs(urlsplit(url).query).get("passfile")
    if not passfile:
        return None
    lines = Path(passfile[0]).read_text().splitlines()
    return next(line.rsplit(":", 1)[1] for line in lines if line and not line.startswith("#"))


def new_prefix() -> str:
    """A unique short lowercase name prefix: 't' + 8 hex characters."""
    return "t" + uuid.uuid4().hex[:8]


def server_version(url: str) -> str:
    with connect(url) as conn:
        return str(conn.execute("show server_version").fetchone()[0]).split()[0]


def drop_databases_with_prefix(url: str, prefix: str) -> None:
    """Drop every database (WITH (FORCE)) and role whose name starts with ``prefix``."""
    if not prefix or not prefix.islower():
        raise ValueError(f"refusing to drop objects for prefix {prefix!r}")
    with connect(url) as conn:
        databases = [
            row[0]
            for row in conn.execute(
                "select datname from pg_database where starts_with(datname, %s)", [prefix]
            )
        ]
        for name in databases:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
        roles = [
            row[0]
            for row in conn.execute(
                "select rolname from pg_roles where starts_with(rolname, %s)", [prefix]
            )
        ]
        if not roles:
            return
        idents = sql.SQL(", ").join(sql.Identifier(r) for r in roles)
        try:
            conn.execute(sql.SQL("drop role if exists {}").format(idents))
            return
        except psycopg.errors.DependentObjectsStillExist:
            pass
        # The roles own objects or hold privileges somewhere: clear them in every database.
        others = [
            row[0]
            for row in conn.execute("select datname from pg_database where datallowconn")
        ]
    for name in others:
        with connect(url, dbname=name) as conn:
            conn.execute(sql.SQL("drop owned by {} cascade").format(idents))
    with connect(url) as conn:
        conn.execute(sql.SQL("drop role if exists {}").format(idents))


class ClusterPool:
    """The session's clusters, keyed by name ("main", "second", "pg15", ...)."""

    def __init__(self) -> None:
        self._root: Path | None = None
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pgcluster")
        self._futures: dict[str, Future[str]] = {}
        self._servers: dict[str, EmbeddedServer] = {}
        self._closed = False
        self._main_binaries: PgBinaries | None = None
        atexit.register(self.close)

    # -- which clusters exist -----------------------------------------------------------

    @staticmethod
    def version_keys() -> list[tuple[int, PgBinaries | None]]:
        """One (major, binaries) per distinct major found; [(0, None)] under DBPLAN_TEST_URL."""
        if os.environ.get(ENV_URL):
            return [(0, None)]
        seen: dict[int, PgBinaries] = {}
        for binaries in list_binaries():
            seen.setdefault(binaries.major, binaries)
        return sorted(seen.items())

    def main_binaries(self) -> PgBinaries:
        if self._main_binaries is None:
            self._main_binaries = find_binaries()
        return self._main_binaries

    def key_for_major(self, major: int) -> str:
        """The main cluster serves its own major; other majors get a cluster each."""
        if major == 0 or major == self.main_binaries().major:
            return MAIN
        return f"pg{major}"

    # -- starting -----------------------------------------------------------------------

    def _root_dir(self) -> Path:
        with self._lock:
            if self._root is None:
                # 0755 so the unprivileged account PostgreSQL runs as under root can reach it
                # (pytest's own tmp folders are 0700 under /tmp/pytest-of-root).
                self._root = Path(tempfile.mkdtemp(prefix="dbplan-test-"))
                os.chmod(self._root, 0o755)
            return self._root

    def _start(self, key: str, binaries: PgBinaries) -> str:
        server = EmbeddedServer(self._root_dir() / key, binaries=binaries, durable=False)
        with self._lock:
            self._servers[key] = server
        return server.ensure_running()

    def prefetch(self, key: str, binaries: PgBinaries | None = None) -> Future[str]:
        """Start cluster ``key`` in the background (once); a future of its URL."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the cluster pool is closed")
            future = self._futures.get(key)
            if future is not None:
                return future
            if key == MAIN and os.environ.get(ENV_URL):
                future = Future()
                future.set_result(os.environ[ENV_URL])
            elif key == SECOND and os.environ.get(ENV_URL2):
                future = Future()
                future.set_result(os.environ[ENV_URL2])
            else:
                future = None
            if future is not None:
                self._futures[key] = future
                return future
        if binaries is None:
            binaries = self.main_binaries()
        with self._lock:
            future = self._futures.get(key)
            if future is None:
                future = self._executor.submit(self._start, key, binaries)
                self._futures[key] = future
            return future

    def prefetch_major(self, major: int, binaries: PgBinaries | None) -> Future[str]:
        key = self.key_for_major(major)
        return self.prefetch(key, None if key == MAIN else binaries)

    def url(self, key: str, binaries: PgBinaries | None = None) -> str:
        return self.prefetch(key, binaries).result()

    def started_urls(self) -> list[str]:
        """URLs of the clusters started (or given by env) so far, without waiting."""
        with self._lock:
            futures = list(self._futures.values())
        return [f.result() for f in futures if f.done() and f.exception() is None]

    # -- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            futures = list(self._futures.values())
        for future in futures:  # let running starts finish so their servers get stopped
            try:
                future.result(timeout=120)
            except Exception:  # noqa: BLE001 - teardown must go on
                pass
        with self._lock:
            servers = list(self._servers.values())
        list(self._executor.map(_destroy_quietly, servers))
        self._executor.shutdown(wait=True)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)


def _destroy_quietly(server: EmbeddedServer) -> None:
    try:
        server.destroy()
    except Exception:  # noqa: BLE001 - teardown must go on
        pass


def remove_relocated_clusters(basetemp: Path) -> list[Path]:
    """Delete the relocated folders (``/var/tmp/dbplan-<uid>/<hash>/``) of the stopped
    servers whose requested data folder was under ``basetemp``; the ones deleted."""
    from orchestrator.server.runas import REQUESTED_DIR_FILE, relocation_root

    removed = []
    ours = basetemp.resolve()
    for record in relocation_root().glob(f"*/{REQUESTED_DIR_FILE}"):
        try:
            requested = Path(record.read_text(encoding="utf-8", errors="surrogateescape").strip()).resolve()
        except OSError:
            continue
        folder = record.parent
        running = (folder / "postgres" / "postmaster.pid").exists()
        if ours in requested.parents and not running:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed

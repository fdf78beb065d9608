"""Shared fixtures: real PostgreSQL servers for the tests.

* ``pg_url``            admin URL of the main throwaway cluster (env DBPLAN_TEST_URL overrides)
* ``pg_url2``           a second, independent cluster (env DBPLAN_TEST_URL2 overrides)
* ``pg_versions_urls``  [(version, url)], one cluster per PostgreSQL major installed
* ``pg_any_url``        parametrized over those majors (test ids ``pg15``, ``pg18``, ...)
* ``dbname_prefix``     unique lowercase prefix per test; databases and roles named with it
                        are dropped from every session cluster after the test

Clusters are started in background threads right after collection (only those the
collected tests use) and are stopped and deleted at session end.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE), str(_HERE.parent)):  # pgcluster, and orchestrator when not installed
    if _path not in sys.path:
        sys.path.insert(0, _path)

import pgcluster  # noqa: E402
from pgcluster import ClusterPool, drop_databases_with_prefix, remove_relocated_clusters  # noqa: E402

_POOL = ClusterPool()

# A suite started in the background by a non-interactive shell (`bash .ci/run &`, nohup)
# inherits SIGINT ignored, and so would every dbplan the tests start: a Ctrl-C sent in
# its first moments, before dbplan's own handler is in place, would then be lost where a
# terminal's is not. A handler of the suite's own is reset to the default by exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pg_any_url" in metafunc.fixturenames:
        keys = ClusterPool.version_keys()
        ids = ["pgurl" if major == 0 else f"pg{major}" for major, _ in keys]
        metafunc.parametrize("pg_any_url", keys, ids=ids, indirect=True, scope="session")


@pytest.hookimpl(trylast=True)  # after -k/-m deselection
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Start the clusters the selected tests need, in parallel, before the first test runs."""
    if config.option.collectonly:
        return
    used: set[str] = set()
    for item in items:
        used.update(getattr(item, "fixturenames", ()))
    try:
        if "pg_url" in used:
            _POOL.prefetch(pgcluster.MAIN)
        if "pg_url2" in used:
            _POOL.prefetch(pgcluster.SECOND)
        if "pg_versions_urls" in used or "pg_any_url" in used:
            for major, binaries in ClusterPool.version_keys():
                _POOL.prefetch_major(major, binaries)
    except Exception:  # noqa: BLE001 - the fixtures report the error where it matters
        pass


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _POOL.close()


@pytest.fixture(scope="session", autouse=True)
def _relocated_clusters_removed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Under root, a server a test starts in its tmp_path (which PostgreSQL's account
    cannot reach) lives in /var/tmp/dbplan-0/<hash>/ instead, and pytest's clean-up of its
    own folders never sees it: 40 MB per server and run, for ever. At the end, remove those
    whose recorded folder (``runas.REQUESTED_DIR_FILE``) was one of this session's, once
    stopped; any other (a developer's own embedded server) stays."""
    yield
    remove_relocated_clusters(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def pg_url() -> str:
    return _POOL.url(pgcluster.MAIN)


@pytest.fixture(scope="session")
def pg_url2() -> str:
    return _POOL.url(pgcluster.SECOND)


@pytest.fixture(scope="session")
def pg_versions_urls() -> list[tuple[str, str]]:
    keys = ClusterPool.version_keys()
    futures = [_POOL.prefetch_major(major, binaries) for major, binaries in keys]
    result = []
    for (major, binaries), future in zip(keys, futures):
        url = future.result()
        version = binaries.version if binaries is not None else pgcluster.server_version(url)
        result.append((version, url))
    return result


@pytest.fixture(scope="session")
def pg_any_url(request: pytest.FixtureRequest) -> str:
    major, binaries = request.param
    return _POOL.prefetch_major(major, binaries).result()


@pytest.fixture
def dbname_prefix() -> Iterator[str]:
    prefix = pgcluster.new_prefix()
    yield prefix
    for url in _POOL.started_urls():
        drop_databases_with_prefix(url, prefix)

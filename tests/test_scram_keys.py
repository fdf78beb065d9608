"""A fleet's connections log in with one SCRAM key per server instead of hashing the
password again for every database (live/scram.py), and that shortcut changes nothing a
user can see: the same logins succeed and fail, a changed password still works, the
server logs nothing for the exchange that learns the salt, and no key is ever shown."""

from __future__ import annotations

import base64
import hashlib
import hmac
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from orchestrator.errors import ConnectionFailed
from orchestrator.estate.model import Server
from orchestrator.live import connection, scram

pytestmark = pytest.mark.skipif(
    not scram.libpq_takes_keys(), reason="libpq before 18 takes no SCRAM keys"
)

PASSWORD = "fleet-Pw-8Rt3"


@pytest.fixture
def role(pg_url: str, dbname_prefix: str) -> Iterator[str]:
    """A login role with a SCRAM password, and three databases it may connect to."""
    name = f"{dbname_prefix}fleet"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(PASSWORD)
            )
        )
        for n in range(3):
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(f"{name}_{n}"), sql.Identifier(name)
                )
            )
    yield name
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for n in range(3):
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(f"{name}_{n}")
                )
            )
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def _passfile_url(
    pg_url: str, role: str, folder: Path, password: str
) -> tuple[str, Path]:
    parts = urlsplit(pg_url)
    passfile = folder / "pgpass"
    passfile.write_text(f"*:*:*:{role}:{password}\n")
    passfile.chmod(0o600)
    return (
        f"postgresql://{role}@{parts.hostname}:{parts.port}/{role}_0?passfile={passfile}",
        passfile,
    )


def _endpoint(pg_url: str, role: str) -> scram.Endpoint:
    parts = urlsplit(pg_url)
    return scram.Endpoint(
        str(parts.hostname), int(parts.port or 5432), role, f"{role}_0", ssl=False
    )


def _server_log(pg_url: str) -> Path:
    with psycopg.connect(pg_url) as conn:
        log = (
            Path(str(conn.execute("SHOW data_directory").fetchone()[0]))
            / "postgres.log"
        )  # type: ignore[index]
    if not log.is_file():
        pytest.skip("the server's log is not readable here (DBPLAN_TEST_URL?)")
    return log


def test_the_keys_alone_log_in_to_every_database_and_wrong_ones_do_not(
    pg_url: str, role: str
) -> None:
    keys = scram.keys_for(_endpoint(pg_url, role), PASSWORD)
    assert keys is not None
    parts = urlsplit(pg_url)
    for n in range(3):  # no password given: the keys prove it
        with psycopg.connect(
            host=parts.hostname, port=parts.port, user=role, dbname=f"{role}_{n}", sslmode="disable",
            **keys.as_parameters(),
        ) as conn:  # fmt: skip
            assert conn.execute("SELECT current_user").fetchone() == (role,)
    wrong = scram.keys_for(_endpoint(pg_url, role), PASSWORD + "x")
    assert wrong is not None and wrong != keys
    with pytest.raises(
        psycopg.OperationalError, match="password authentication failed"
    ):
        psycopg.connect(host=parts.hostname, port=parts.port, user=role, dbname=f"{role}_0", sslmode="disable",
                        **wrong.as_parameters())  # fmt: skip


def test_a_server_that_does_not_know_the_password_is_refused_by_the_server_key(pg_url: str, role: str) -> None:
    """The keys keep SCRAM mutual: with the right client key but a server key from another
    password (a server that stole the client key, not the verifier), libpq refuses the
    server's signature instead of logging in."""
    keys = scram.keys_for(_endpoint(pg_url, role), PASSWORD)
    other = scram.keys_for(_endpoint(pg_url, role), PASSWORD + "x")
    assert keys is not None and other is not None
    parts = urlsplit(pg_url)
    with pytest.raises(psycopg.OperationalError, match="server signature"):
        psycopg.connect(host=parts.hostname, port=parts.port, user=role, dbname=f"{role}_0", sslmode="disable",
                        scram_client_key=keys.client, scram_server_key=other.server)  # fmt: skip


def test_no_part_of_dbplan_reads_a_connection_string_back_from_libpq() -> None:
    """libpq's own account of a connection (psycopg's ``info.dsn``, ``get_parameters()``)
    leaves out the password but holds the SCRAM keys: nothing in dbplan may read it, so
    that no output, log or error can show them."""
    sources = (Path(connection.__file__).parent.parent).rglob("*.py")
    readers = [
        f"{path.name}:{number}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if ".info.dsn" in line or ".get_parameters(" in line
    ]
    assert readers == []


def test_learning_the_salt_leaves_no_line_in_the_server_log_and_no_session(
    pg_url: str, role: str
) -> None:
    """Even with log_connections on, the server logs only that a connection came in (it
    ends the session quietly, as for psql asking for a password), names no role, and
    counts no session."""
    log = _server_log(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET log_connections = on")
        conn.execute("SELECT pg_reload_conf()")
        try:
            _wait_for_new_sessions_to_log_connections(pg_url)
            start = log.stat().st_size
            for _ in range(3):
                assert scram.keys_for(_endpoint(pg_url, role), PASSWORD) is not None
            sessions = conn.execute(
                "SELECT sum(sessions) FROM pg_stat_database WHERE datname LIKE %s",
                (f"{role}%",),
            ).fetchone()
        finally:
            conn.execute("ALTER SYSTEM RESET log_connections")
            conn.execute("SELECT pg_reload_conf()")
    written = log.read_bytes()[start:].decode("utf-8", "replace")
    assert written.count("connection received") == 3, written
    assert (
        role not in written and "FATAL" not in written and "could not" not in written
    ), written
    assert sessions == (0,), "no session was counted in the databases' statistics"


def _wait_for_new_sessions_to_log_connections(pg_url: str) -> None:
    """The postmaster reads the reloaded setting when it gets round to the signal."""
    for _ in range(100):
        with psycopg.connect(pg_url) as probe:
            if probe.execute("SHOW log_connections").fetchone() == ("on",):
                return
        time.sleep(0.05)
    pytest.fail("log_connections never took effect")


def test_a_server_that_asks_for_no_scram_gets_no_keys(pg_url: str) -> None:
    """The test server lets its own OS user in on the unix socket without a password
    (peer), and nothing listens on port 1: no keys either way, and no error."""
    with psycopg.connect(pg_url) as conn:
        sockets = str(conn.execute("SHOW unix_socket_directories").fetchone()[0]).split(",")[0].strip()  # type: ignore[index]
        user, port = conn.info.user, conn.info.port
    assert scram.keys_for(scram.Endpoint(sockets, port, user, "postgres", ssl=False), "x") is None
    assert scram.keys_for(scram.Endpoint("127.0.0.1", 1, user, "postgres", ssl=False), "x") is None


def test_connect_goes_on_when_the_password_changes_between_connections(
    pg_url: str, role: str, tmp_path: Path
) -> None:
    url, passfile = _passfile_url(pg_url, role, tmp_path, PASSWORD)
    server = Server("main", url, embedded=None)
    for n in range(3):  # the second connection learns the keys, the third uses them
        with connection.connect(server, url, f"{role}_{n}") as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (
                f"{role}_{n}",
            )
    assert connection._SCRAM_KEYS.usable(url) is not None, "the keys were learned"

    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER ROLE {} PASSWORD 'changed-Pw-2'").format(
                sql.Identifier(role)
            )
        )
    passfile.write_text(f"*:*:*:{role}:changed-Pw-2\n")
    with connection.connect(
        server, url, f"{role}_1"
    ) as conn:  # stale keys: the password, at once
        assert conn.execute("SELECT current_user").fetchone() == (role,)
    assert connection._SCRAM_KEYS.usable(url) is None, "stale keys are forgotten"

    passfile.write_text(f"*:*:*:{role}:not-the-password\n")
    with pytest.raises(ConnectionFailed, match="password authentication failed"):
        connection.connect(server, url, f"{role}_2")


def test_no_key_is_shown_when_a_connection_with_keys_fails(
    pg_url: str, role: str, tmp_path: Path
) -> None:
    url, _ = _passfile_url(pg_url, role, tmp_path, PASSWORD)
    server = Server("main", url, embedded=None)
    for n in range(2):
        connection.connect(server, url, f"{role}_{n}").close()
    keys = connection._SCRAM_KEYS.usable(url)
    assert keys is not None
    with pytest.raises(ConnectionFailed) as failed:
        connection.connect(server, url, f"{role}_missing")
    shown = str(failed.value) + str(failed.value.hint or "")
    assert "does not exist" in shown
    for secret in (keys.client, keys.server, PASSWORD):
        assert secret not in shown


def _sasl_continue(body: bytes) -> bytes:
    payload = struct.pack("!i", 11) + body
    return b"R" + struct.pack("!i", len(payload) + 4) + payload


SASL_OFFER = b"R" + struct.pack("!i", 23) + struct.pack("!i", 10) + b"SCRAM-SHA-256\0\0"


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda nonce: SASL_OFFER + _sasl_continue(b"r=" + nonce + b"x,i=4096"), id="no-salt"),
        pytest.param(lambda nonce: SASL_OFFER + _sasl_continue(b"r=" + nonce + b"x,s=!!notbase64,i=4096"), id="bad-salt"),
        pytest.param(lambda nonce: SASL_OFFER + _sasl_continue(b"r=" + nonce + b"x,s=c2FsdA==,i=999999999"), id="huge-count"),
        pytest.param(lambda nonce: SASL_OFFER + _sasl_continue(b"r=someone-else,s=c2FsdA==,i=4096"), id="wrong-nonce"),
        pytest.param(lambda nonce: b"HTTP/1.1 400 Bad Request\r\n\r\n", id="not-postgres"),
        pytest.param(lambda nonce: SASL_OFFER, id="closes-after-offer"),
    ],
)
def test_a_server_that_answers_nonsense_gets_no_keys(answer: Callable[[bytes], bytes]) -> None:
    """The salt comes from whatever listens there: a malformed, hostile or foreign answer
    leaves the keys unlearned (the connection then logs in with the password), never a
    crash, and a huge iteration count is not hashed here."""
    with _fake_server(answer) as port:
        started = time.monotonic()
        assert scram.keys_for(scram.Endpoint("127.0.0.1", port, "someone", "db", ssl=False), "pw") is None
        assert time.monotonic() - started < 5


def test_the_salt_is_learned_over_ssl_when_the_login_used_it(tmp_path: Path) -> None:
    """A server reached over SSL is asked over SSL too (SSLRequest, then TLS): the keys
    come out as PBKDF2 of the password with the salt the server sent."""
    tls = _self_signed_tls(tmp_path)
    salt = b"salt-of-the-role"

    def offer(nonce: bytes) -> bytes:
        return SASL_OFFER + _sasl_continue(b"r=" + nonce + b"srv,s=" + base64.b64encode(salt) + b",i=4096")

    with _fake_server(offer, tls=tls) as port:
        keys = scram.keys_for(scram.Endpoint("127.0.0.1", port, "someone", "db", ssl=True), "pw")
    salted = hashlib.pbkdf2_hmac("sha256", b"pw", salt, 4096)
    assert keys == scram.Keys(
        client=base64.b64encode(hmac.new(salted, b"Client Key", "sha256").digest()).decode(),
        server=base64.b64encode(hmac.new(salted, b"Server Key", "sha256").digest()).decode(),
    )


def _self_signed_tls(folder: Path) -> ssl.SSLContext:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: no certificate for a TLS server")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@contextmanager
def _fake_server(answer: Callable[[bytes], bytes], *, tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """A one-connection server on a free port that answers the startup message with
    ``answer(b"")`` up to the SASL offer and the client's first SCRAM message with the
    rest of ``answer(nonce)``; with ``tls``, it takes an SSLRequest first."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve() -> None:
            peer, _ = listener.accept()
            if tls is not None:
                peer.recv(8)  # the SSLRequest
                peer.sendall(b"S")
                peer = tls.wrap_socket(peer, server_side=True)
            with peer:
                peer.recv(4096)  # the startup message
                first = answer(b"")
                peer.sendall(first[: len(SASL_OFFER)] if first.startswith(SASL_OFFER) else first)
                if first.startswith(SASL_OFFER) and len(first) > len(SASL_OFFER):
                    request = peer.recv(4096)
                    nonce = request.rsplit(b"r=", 1)[1]
                    peer.sendall(answer(nonce)[len(SASL_OFFER) :])

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        yield listener.getsockname()[1]
        server.join(5)

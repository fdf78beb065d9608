"""One SCRAM key per server and role, so that a fleet's hundreds of connections skip PBKDF2.

A SCRAM-SHA-256 login makes the client hash the password 4,096 times (PBKDF2) with the
role's salt, every time: about 3 ms of CPU in libpq, the largest part of a connection's
cost, and it holds the GIL, so threads cannot share it out. The salt and iteration count
belong to the role, not to a database (``pg_authid`` is one catalog per server), so the
result is the same for every database of the server. libpq 18 accepts it directly
(``scram_client_key``, ``scram_server_key``: the keys postgres_fdw passes through), and still
checks the server's signature with the server key, so the server proves it knows the
verifier exactly as with a password.

The salt is learned the way any client learns it: a startup message, the first SCRAM
message, the server's answer (``r=...,s=salt,i=iterations``), then the socket is closed.
The server ends such a session without a log line (it is how psql asks for a password).
Nothing secret is sent, so this first exchange needs no certificate check: a forged salt
only yields keys that the real, verified connection then fails with, and ``connect`` falls
back to the password.

The keys are secrets like the password: they live in this process's memory, go to libpq
only, and are never shown.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import struct
from dataclasses import dataclass

MECHANISM = b"SCRAM-SHA-256"
PROTOCOL_3_0 = 196608
SSL_REQUEST = 80877103
AUTH_SASL, AUTH_SASL_CONTINUE = 10, 11
HANDSHAKE_TIMEOUT_SECONDS = 5.0
# PostgreSQL's default is 4,096 (scram_iterations); a count past this is left to libpq,
# rather than hashed here while every other connection to the server waits.
MAX_ITERATIONS = 1_000_000
# libpq 18 is the first to take the keys instead of a password.
FIRST_LIBPQ_WITH_KEYS = 180000


@dataclass(frozen=True)
class Keys:
    client: str  # base64, as libpq takes them
    server: str

    def as_parameters(self) -> dict[str, str]:
        return {"scram_client_key": self.client, "scram_server_key": self.server}


@dataclass(frozen=True)
class Endpoint:
    """Where and as whom a connection logged in, as libpq reports it afterwards."""

    host: str  # a host name or address, or a unix socket's folder
    port: int
    user: str
    database: str
    ssl: bool


def libpq_takes_keys() -> bool:
    from psycopg import pq

    return pq.version() >= FIRST_LIBPQ_WITH_KEYS


def keys_for(endpoint: Endpoint, password: str) -> Keys | None:
    """The role's SCRAM keys, or None when the server does not ask this role for SCRAM
    (trust, peer, md5, certificates) or cannot be asked (any error: the caller goes on
    with the password, as before)."""
    try:
        learned = _salt_and_iterations(endpoint)
    except (OSError, ValueError, KeyError, struct.error):  # ssl.SSLError is an OSError
        return None
    if learned is None or not 0 < learned[1] <= MAX_ITERATIONS:
        return None
    salt, iterations = learned
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return Keys(
        client=base64.b64encode(
            hmac.new(salted, b"Client Key", "sha256").digest()
        ).decode(),
        server=base64.b64encode(
            hmac.new(salted, b"Server Key", "sha256").digest()
        ).decode(),
    )


def _salt_and_iterations(endpoint: Endpoint) -> tuple[bytes, int] | None:
    with _open(endpoint) as channel:
        channel.sendall(_startup_message(endpoint))
        kind, body = _read_message(channel)
        if (
            kind != b"R"
            or _auth_code(body) != AUTH_SASL
            or MECHANISM not in body[4:].split(b"\0")
        ):
            return None
        nonce = base64.b64encode(os.urandom(18))
        first = b"n,,n=,r=" + nonce  # the user name travels in the startup message
        channel.sendall(
            _message(b"p", MECHANISM + b"\0" + struct.pack("!i", len(first)) + first)
        )
        kind, body = _read_message(channel)
        if kind != b"R" or _auth_code(body) != AUTH_SASL_CONTINUE:
            return None
        fields = dict(
            part.split(b"=", 1) for part in body[4:].split(b",") if b"=" in part
        )
        if not fields.get(b"r", b"").startswith(nonce):
            return None
        return base64.b64decode(fields[b"s"], validate=True), int(fields[b"i"])


def _open(endpoint: Endpoint) -> socket.socket:
    if endpoint.host.startswith("/"):
        channel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            channel.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
            channel.connect(f"{endpoint.host}/.s.PGSQL.{endpoint.port}")
        except OSError:
            channel.close()
            raise
        return channel
    channel = socket.create_connection(
        (endpoint.host, endpoint.port), timeout=HANDSHAKE_TIMEOUT_SECONDS
    )
    if not endpoint.ssl:
        return channel
    import ssl  # here, not at the top: importing it costs every dbplan command about 10 ms

    try:
        channel.sendall(struct.pack("!ii", 8, SSL_REQUEST))
        if channel.recv(1) != b"S":
            raise ValueError("the server did not take SSL this time")
        context = ssl.create_default_context()
        context.check_hostname = False  # nothing secret is sent: see the module's docstring
        context.verify_mode = ssl.CERT_NONE
        return context.wrap_socket(channel)
    except (OSError, ValueError):
        channel.close()
        raise


def _startup_message(endpoint: Endpoint) -> bytes:
    fields = b"".join(
        key + b"\0" + value.encode() + b"\0"
        for key, value in (
            (b"user", endpoint.user),
            (b"database", endpoint.database),
            (b"application_name", "dbplan"),
        )
    )
    body = struct.pack("!i", PROTOCOL_3_0) + fields + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _read_message(channel: socket.socket) -> tuple[bytes, bytes]:
    header = _read_exactly(channel, 5)
    (length,) = struct.unpack("!i", header[1:])
    if not 4 <= length <= 65536:
        raise ValueError("not a PostgreSQL message")
    return header[:1], _read_exactly(channel, length - 4)


def _read_exactly(channel: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = channel.recv(count - len(data))
        if not chunk:
            raise ValueError("the server closed the connection")
        data += chunk
    return data


def _auth_code(body: bytes) -> int:
    return int(struct.unpack("!i", body[:4])[0])

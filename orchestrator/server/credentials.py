"""Who may connect to the embedded server: the user who runs dbplan, and nobody else.

Any local account can reach 127.0.0.1, and a superuser session runs shell commands as the
server's account (``COPY ... TO PROGRAM``), so every way in is closed to other accounts:

* TCP asks for a password (``scram-sha-256``). dbplan generates the superuser's password
  and keeps it beside the data folder, in ``<data>.pgpass`` (libpq's password file
  format), mode 0600 and owned by the user who runs dbplan. Not in the data folder: when
  dbplan is root the server runs as another account, which owns that folder and could
  swap the file for a link to one of root's; and a file it cannot read would break its
  base backups. The server only ever gets the password's SCRAM verifier, from which no
  client can log in. The server's URL names the file (``?passfile=``), so the password
  is in no URL, command line, output or log.
* The unix socket lives in the data folder (mode 0700, the server account's), and
  ``peer`` authentication admits only the user who runs dbplan, as ``postgres``.
* ``pg_hba.conf`` and ``pg_ident.conf`` are rewritten before every start, so a data folder
  an older dbplan made with ``trust`` is closed on its next start.

Only the standard library is imported: the CLI imports this module on every run.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from ..errors import EmbeddedServerError
from .runas import Account, run_program, safe_write

__all__ = [
    "SUPERUSER",
    "check_running_server_has_password",
    "hba_conf",
    "ident_conf",
    "new_password",
    "password_file",
    "read_password",
    "scram_verifier",
    "set_new_password",
    "store_password",
    "verifier_matches",
    "write_access_rules",
]

SUPERUSER = "postgres"
IDENT_MAP = "dbplan"
PASSWORD_BYTES = 32
# PostgreSQL's default. A random 256-bit password needs no key stretching, but clients
# that follow RFC 7677's "at least 4096" (Go's lib/pq, used by dbmate) refuse fewer.
SCRAM_ITERATIONS = 4096
_PASSWORD_SHAPE = re.compile(r"[A-Za-z0-9_-]{40,}")  # what new_password makes: no ':' or '\'


def password_file(data_dir: Path) -> Path:
    """``<data>.pgpass``: beside the data folder, in the folder dbplan made it in."""
    return data_dir.with_name(f"{data_dir.name}.pgpass")


# --------------------------------------------------------------------------------------
# The superuser's password
# --------------------------------------------------------------------------------------


def set_new_password(bindir: Path, data_dir: Path, account: Account | None, *, durable: bool) -> None:
    """Give the stopped server's superuser a new password, then store it in the file.

    PostgreSQL in single-user mode gets the statement on its standard input, with the
    SCRAM verifier only: the password itself never reaches the server, its log, or a
    command line. In this order a failure at any point leaves no password file, and the
    next start makes another password.
    """
    password = new_password()
    verifier = scram_verifier(password)
    no_fsync = [] if durable else ["-F"]
    done = run_program(
        [bindir / "postgres", "--single", "-D", data_dir, *no_fsync,
         "-c", "exit_on_error=on", "-c", "log_statement=none", "postgres"],
        account,
        input=f"ALTER ROLE {SUPERUSER} PASSWORD '{verifier}';\n",
    )  # fmt: skip
    if done.returncode != 0:
        output = (done.stdout + done.stderr).replace(verifier, "***")  # an error may quote it
        raise EmbeddedServerError(
            f"could not set the superuser password of the embedded server in {data_dir}:\n"
            + "\n".join(output.strip().splitlines()[-15:]),
            hint="fix the cause above and start it again: a new password is generated",
        )
    store_password(data_dir, password)


def check_running_server_has_password(data_dir: Path) -> None:
    """Refuse a running server without dbplan's password file (an older dbplan's: trust)."""
    if read_password(data_dir) is not None:
        return
    raise EmbeddedServerError(
        f"the embedded server in {data_dir} runs without a usable password file "
        f"({password_file(data_dir)}: missing, not yours, or readable by others); it was started by an "
        "older dbplan, which let every local user in, or the file was changed",
        hint="stop it with `dbplan server stop` (or pg_ctl stop -D <data folder>); the next "
        "start closes it to other users and generates a new password",
    )


def new_password() -> str:
    import secrets

    return secrets.token_urlsafe(PASSWORD_BYTES)


def scram_verifier(password: str, iterations: int = SCRAM_ITERATIONS) -> str:
    """The ``SCRAM-SHA-256$...`` secret PostgreSQL stores for ``password`` (RFC 5802/7677).

    ``password`` is ASCII (see :func:`new_password`), so SASLprep leaves it as it is.
    """
    salt = os.urandom(16)
    stored_key, server_key = _scram_keys(password.encode("utf-8"), salt, iterations)
    return f"SCRAM-SHA-256${iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


def verifier_matches(stored: str | None, password: str, role: str) -> bool:
    """Whether ``stored`` (pg_authid.rolpassword) is a secret of ``password``: the SCRAM
    keys recomputed with the stored salt and iterations, or the md5 hash of an older
    server. None (no password) or a shape dbplan cannot read does not match."""
    import hashlib
    import hmac

    if stored is None:
        return False
    if stored.startswith("md5"):
        expected = "md5" + hashlib.md5((password + role).encode("utf-8")).hexdigest()  # PostgreSQL's md5 format
        return hmac.compare_digest(stored, expected)
    match = _SCRAM_SHAPE.fullmatch(stored)
    if match is None:
        return False
    import base64
    import binascii

    try:
        salt, stored_key, server_key = (base64.b64decode(match.group(i), validate=True) for i in (2, 3, 4))
    except (binascii.Error, ValueError):
        return False
    computed = _scram_keys(saslprep(password), salt, int(match.group(1)))
    return hmac.compare_digest(computed[0], stored_key) and hmac.compare_digest(computed[1], server_key)


_SCRAM_SHAPE = re.compile(r"SCRAM-SHA-256\$([0-9]{1,9}):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)")


def _scram_keys(password: bytes, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """StoredKey and ServerKey of RFC 5802 for a prepared password."""
    import hashlib
    import hmac

    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    return hashlib.sha256(client_key).digest(), server_key


def _b64(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode("ascii")


def saslprep(password: str) -> bytes:
    """The bytes libpq hashes for ``password``: SASLprep (RFC 4013) as PostgreSQL's
    ``pg_saslprep`` does it. ASCII is left as it is; a password SASLprep refuses
    (prohibited or badly mixed bidirectional characters) is used as its raw UTF-8,
    which is what PostgreSQL falls back to as well."""
    import stringprep
    import unicodedata

    raw = password.encode("utf-8")
    if password.isascii():
        return raw
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c))
    prepared = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3, stringprep.in_table_c4,
        stringprep.in_table_c5, stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
        stringprep.in_table_c9, stringprep.in_table_a1,
    )  # fmt: skip
    if not prepared or any(check(c) for c in prepared for check in prohibited):
        return raw
    if any(stringprep.in_table_d1(c) for c in prepared):
        if any(stringprep.in_table_d2(c) for c in prepared):
            return raw
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            return raw
    return prepared.encode("utf-8")


def read_password(data_dir: Path) -> str | None:
    """The stored password, or None when the file is missing or cannot be trusted.

    Untrusted: not a regular file of this user with mode 0600 or stricter (somebody else
    may have read or planted it), or not in the shape dbplan writes.
    """
    path = password_file(data_dir)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd, encoding="utf-8", errors="replace") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            return None
        lines = handle.read(4096).splitlines()
    passwords = {line.rsplit(":", 1)[-1] for line in lines if line and not line.startswith("#")}
    if len(passwords) != 1:
        return None
    password = passwords.pop()
    return password if _PASSWORD_SHAPE.fullmatch(password) else None


def store_password(data_dir: Path, password: str) -> None:
    """Write the password file: mode 0600, owned by this user (never the server's account).

    Written to a new file and renamed over the old one, so nobody can have opened it
    before its mode was set, and a symlink planted in its place is replaced, not followed.
    """
    lines = [
        "# The embedded server's superuser password, generated by dbplan (libpq password",
        "# file: PGPASSFILE=<this file>, or ?passfile=<this file> in a URL). Keep it 0600.",
        *(f"{host}:*:*:{SUPERUSER}:{password}" for host in ("127.0.0.1", "localhost")),
    ]
    # Created 0600 (O_EXCL: nobody can have opened it before), then renamed into place.
    safe_write(password_file(data_dir), "\n".join(lines) + "\n", None)


# --------------------------------------------------------------------------------------
# pg_hba.conf and pg_ident.conf
# --------------------------------------------------------------------------------------


def write_access_rules(data_dir: Path, account: Account | None) -> None:
    """(Re)write ``pg_hba.conf`` and ``pg_ident.conf``: before every start, never trust."""
    safe_write(data_dir / "pg_hba.conf", hba_conf(), account)
    safe_write(data_dir / "pg_ident.conf", ident_conf(), account)


def hba_conf() -> str:
    return "\n".join(
        [
            "# Written by dbplan before every start of the embedded server: only the user who",
            "# runs dbplan may connect (edits here are lost). TCP: the password in the file",
            "# <this folder>.pgpass beside this folder. Unix socket (in this private folder):",
            "# peer, mapped in pg_ident.conf.",
            f"local   all           all                  peer map={IDENT_MAP}",
            f"local   replication   all                  peer map={IDENT_MAP}",
            "host    all           all   127.0.0.1/32   scram-sha-256",
            "host    replication   all   127.0.0.1/32   scram-sha-256",
        ]
    ) + "\n"


def ident_conf() -> str:
    """The peer map: the OS user who runs dbplan may connect as ``postgres``, nobody else."""
    lines = ["# Written by dbplan before every start of the embedded server (see pg_hba.conf)."]
    user = _invoking_user()
    if user is not None and '"' not in user:
        lines.append(f'{IDENT_MAP}   "{user}"   {SUPERUSER}')
    return "\n".join(lines) + "\n"


def _invoking_user() -> str | None:
    """The name of the OS user dbplan runs as; None for a uid without one (peer fails)."""
    try:
        import pwd
    except ImportError:  # not POSIX: no unix socket either
        return None
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return None

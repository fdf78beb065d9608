"""The servers throwaway databases go to: an embedded server per PostgreSQL major beside
the plan file (``.dbplan/scratch-pg18``), or one the user names with ``--scratch-url``.

A scratch server is not durable (fsync off: what it holds is thrown away anyway), is
started on first use and left running, like the plan file's embedded server, and is
stopped by ``dbplan server stop``.
"""

from __future__ import annotations

from ..estate.model import Estate, Server
from ..server.embedded import EmbeddedServer
from ..server.pgbinaries import PgBinaries, find_binaries, list_binaries

SCRATCH_DATA_DIR = ".dbplan/scratch-pg{major}"


def scratch_server(estate: Estate, *, binaries: PgBinaries | None = None, scratch_url: str | None = None) -> Server:
    """``scratch_url``'s server, else the embedded scratch server of ``binaries``' major
    (default: the binaries the embedded server uses), running; its url is resolved once."""
    if scratch_url:
        return Server("scratch", scratch_url, None)
    binaries = binaries or find_binaries()
    data_dir = estate.root / SCRATCH_DATA_DIR.format(major=binaries.major)
    url = EmbeddedServer(data_dir, binaries=binaries, durable=False).ensure_running()
    return Server(f"scratch-pg{binaries.major}", url, None)


def scratch_servers(estate: Estate) -> list[tuple[str, EmbeddedServer]]:
    """The scratch servers made beside this plan file, by name (one per installed major;
    the data may live elsewhere, see server.embedded, so each is asked)."""
    found = []
    for binaries in {b.major: b for b in reversed(list_binaries())}.values():
        server = EmbeddedServer(estate.root / SCRATCH_DATA_DIR.format(major=binaries.major), binaries=binaries, durable=False)
        if server.status().version is not None:  # a cluster exists there
            found.append((f"scratch-pg{binaries.major}", server))
    return sorted(found, key=lambda item: item[0])


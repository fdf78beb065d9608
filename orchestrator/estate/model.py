"""The estate as the plan file declares it: frozen values, no I/O.

``config.load`` builds an ``Estate``; every later stage reads it and none changes it.
Each value keeps the ``Place`` it came from so later stages can point at the YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Place, UnsetVariable
from . import conninfo

DEFAULT_MIGRATIONS_TABLE = "schema_migrations"
# How a service's migration folder names and splits its files (``format:``): golang-migrate's
# up/down pairs, dbmate's single files with -- migrate:up / -- migrate:down sections, or
# Flyway's V/U names. The default is stated, not guessed from the files: a folder read one
# way or the other would give different versions, and versions are what the bookkeeping keeps.
FORMAT_GOLANG_MIGRATE = "golang-migrate"
FORMAT_DBMATE = "dbmate"
FORMAT_FLYWAY = "flyway"
FOLDER_FORMATS = (FORMAT_GOLANG_MIGRATE, FORMAT_DBMATE, FORMAT_FLYWAY)
DEFAULT_MAINTENANCE_DATABASE = "postgres"
DEFAULT_EMBEDDED_DATA_DIR = ".dbplan/postgres"
# How long a migration may wait for a table lock before it gives up (and, in a
# transaction, is retried). While an ALTER TABLE waits behind a long transaction, every
# query on that table queues behind it, so waiting forever can take the service down;
# 30 s still lets a migration through a busy moment. Long-running migrations are not
# affected: lock_timeout counts only time spent waiting for a lock.
DEFAULT_LOCK_TIMEOUT_MS = 30_000
# Connections per server for a fleet's inspection and apply: enough to keep a server busy
# on small migrations, few enough to leave a default max_connections (100) room to serve.
DEFAULT_PARALLEL_PER_SERVER = 8
# statement_timeout is left unset (the server's own setting applies): a backfill or an
# index build may rightly take hours, and only the project knows its ceiling.
DEFAULT_STATEMENT_TIMEOUT_MS: int | None = None


@dataclass(frozen=True)
class EmbeddedSpec:
    """An embedded server dbplan starts itself when a command needs it."""

    data_dir: Path
    port: int | None = None


# CREATE DATABASE ... STRATEGY exists from PostgreSQL 15; before, every copy is a file copy.
FIRST_STRATEGY_MAJOR = 15


@dataclass(frozen=True)
class Server:
    name: str
    url: str | None  # None when the server is embedded
    embedded: EmbeddedSpec | None
    maintenance_database: str | None = None  # None: the url's database, else DEFAULT_MAINTENANCE_DATABASE
    # At most this many connections dbplan opens to the server at once for a fleet's
    # inspection and apply; None: DEFAULT_PARALLEL_PER_SERVER (or --parallel).
    parallel: int | None = None
    # How CREATE DATABASE copies the template (its STRATEGY, from FIRST_STRATEGY_MAJOR on):
    # "wal_log" or "file_copy"; None: the server's default (wal_log).
    create_strategy: str | None = None
    place: Place = field(default=Place(), compare=False)
    # The url's variable is not set: fine offline, an error once a command connects.
    unset_url: UnsetVariable | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Role:
    """A role the plan file declares. An attribute the file does not write (None) is set
    to PostgreSQL's default when the role is created and never compared afterwards, so
    a file that names a role only to own a database does not fight what a DBA set."""

    name: str
    server: str
    login: bool | None = None  # None: not written; created NOLOGIN
    connection_limit: int | None = None  # None: not written; created unlimited (-1)
    # Roles this one is granted membership in; None: not written, memberships left alone.
    member_of: tuple[str, ...] | None = None
    # Kept out of repr so a stray log line or traceback cannot print it.
    password: str | None = field(default=None, repr=False)
    place: Place = field(default=Place(), compare=False)
    unset_password: UnsetVariable | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Database:
    name: str
    server: str
    owner: str | None = None
    place: Place = field(default=Place(), compare=False)
    # A database expanded from a set (issue #12) names the set's key; None: written out.
    fleet: str | None = None
    # Roll-out stage within its fleet: stage 0 (the canaries) first; a database of stage
    # n starts only when every database of the same fleet in stages below n succeeded.
    stage: int = 0


@dataclass(frozen=True)
class TableLimit:
    """``lint.block_on_tables_larger_than``: a lock or rewrite warning on a live table above
    this size, in bytes or estimated rows, blocks the plan."""

    amount: int
    unit: str  # "bytes" | "rows"
    text: str  # as the plan file writes it, for messages

    def exceeded_by(self, rows: int | None, size: int | None) -> bool:
        value = rows if self.unit == "rows" else size
        return value is not None and value > self.amount


@dataclass(frozen=True)
class Service:
    name: str
    database: str
    migrations_dir: Path
    migrations_display: str  # the folder as written in the plan file, for output
    depends_on: tuple[str, ...] = ()
    schema: str | None = None  # None: the connecting role's current_schema()
    table: str = DEFAULT_MIGRATIONS_TABLE
    allow_out_of_order: bool = False
    format: str = FORMAT_GOLANG_MIGRATE  # one of FOLDER_FORMATS
    target: int | None = None
    lint_allow: frozenset[str] = frozenset()
    lint_block_over: TableLimit | None = None  # None: a warning on a large table stays a warning
    lock_timeout: int = DEFAULT_LOCK_TIMEOUT_MS  # milliseconds; 0 waits forever
    statement_timeout: int | None = DEFAULT_STATEMENT_TIMEOUT_MS  # milliseconds; None: the server's
    place: Place = field(default=Place(), compare=False)
    migrations_place: Place = field(default=Place(), compare=False)
    # One service definition served over a set of databases is expanded into one Service
    # per database; each names the definition it came from (for --only, grouping, output).
    fleet: str | None = None

    @property
    def history_table(self) -> str:
        return history_table_name(self.table)


def history_table_name(migrations_table: str) -> str:
    """DESIGN: ``dbplan_history`` beside ``schema_migrations``, ``X_history`` beside ``X``."""
    if migrations_table == DEFAULT_MIGRATIONS_TABLE:
        return "dbplan_history"
    return f"{migrations_table}_history"


@dataclass(frozen=True)
class Discovery:
    """A set whose members are the databases already on its servers whose names match a
    LIKE pattern: found at inspection, migrated, never created or dropped by dbplan."""

    like: str
    servers: tuple[str, ...]


@dataclass(frozen=True)
class DatabaseSet:
    """One ``databases:`` entry that stands for many (issue #12), as the file declares it."""

    key: str
    owner: str | None
    members: tuple[tuple[str, str], ...]  # (server, database) of a declared set, in set order
    discovery: Discovery | None = None
    # Stage 0: a count, a percentage (float, 0 < p <= 100) or named databases; None: none.
    canary: int | float | tuple[str, ...] | None = None
    place: Place = field(default=Place(), compare=False)
    canary_place: Place = field(default=Place(), compare=False)


@dataclass(frozen=True)
class Blueprint:
    """The databases and services as written, before sets are expanded: a discovered set
    is expanded again once its members are known (``estate.fleet.expand``)."""

    databases: dict[str, Database]  # written out
    sets: dict[str, DatabaseSet]
    services: dict[str, Service]  # a service's database may name a set; depends_on as written


@dataclass(frozen=True)
class Estate:
    """Everything the plan file says, in file order (dicts keep YAML order)."""

    file: Path
    root: Path  # folder of the plan file; relative paths start here
    servers: dict[str, Server]
    roles: dict[str, Role]
    databases: dict[str, Database]
    services: dict[str, Service]
    file_checksum: str | None = None  # sha256 of the plan file as it was read
    environment: str | None = None  # the overlay in effect (--env, DBPLAN_ENV); None: the file as written
    sets: dict[str, DatabaseSet] = field(default_factory=dict)  # the sets the databases were expanded from
    blueprint: Blueprint | None = field(default=None, compare=False, repr=False)
    # Whether discovered sets' members have been read from the servers (api.plan does).
    discovered: bool = False
    shard: tuple[int, int] | None = None  # (index from 1, count) of a --shard part
    # Services of part 1 that a --shard part's services depend on: read, never changed, so
    # the part is blocked while they have work left (part 1 does it).
    foreign: frozenset[str] = frozenset()

    def fleet_instances(self, fleet: str) -> list[str]:
        """The services expanded from service definition ``fleet``, in order."""
        return [name for name, service in self.services.items() if service.fleet == fleet]

    def require_secrets(self) -> None:
        """Raise for the first secret whose variable is unset: called by every command that
        connects, before it connects, so that nothing is done half-way for want of one."""
        for server in self.servers.values():
            if server.unset_url is not None:
                raise server.unset_url
        for role in self.roles.values():
            if role.unset_password is not None:
                raise role.unset_password

    def server_of_service(self, service: Service) -> Server:
        return self.servers[self.databases[service.database].server]

    def secrets(self) -> tuple[str, ...]:
        """Every secret the file holds, so outputs can be checked and scrubbed."""
        found: list[str] = [role.password for role in self.roles.values() if role.password]
        for server in self.servers.values():
            password = conninfo.password(server.url)
            if password:
                found.append(password)
        return tuple(found)

"""The executor, the only module that writes to servers.

For each group of actions it takes the lock, re-reads the live state, re-plans, and goes
on only if the fresh plan is what was shown (or what is left of it after another run did
part of it). A transactional migration travels to the server in one string together
with its bookkeeping and the COMMIT, so nothing of it survives a failure; consecutive
ones share round trips (``batches``).

Behind a connection pooler (PgBouncer in transaction mode) no session lock holds, so
each transaction takes a transaction-level lock and checks that the bookkeeping is what
it planned from (``guard.transaction_guard``); what cannot run in a transaction (a
no-transaction migration) is refused there.

A stop request (SIGINT, SIGTERM: see ``Cancellation``) is honoured between actions; a
transactional migration in flight is cancelled, since its rollback leaves no trace.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import DbplanError, MigrationFailed, PlanBlocked, PlanChanged
from ..estate.model import FIRST_STRATEGY_MAJOR, Estate, Server, Service
from ..live.connection import (
    behind_pooler,
    connect,
    connection_bound,
    connection_lost,
    server_url,
    try_lock_unless_pooled,
)
from ..live.facts import (
    LiveRole,
    ServerFacts,
    ServiceFacts,
    declared_passwords,
    locate_apart,
    read_database_owners,
    read_server,
    read_service,
)
from ..live.locks import (
    DEFAULT_LOCK_WAIT_SECONDS,
    LockWait,
    advisory_lock,
    database_lock_key,
    hold_again,
    migrations_lock_key,
    pooler_message,
    server_lock_key,
)
from ..migrations.scan import Migration, MigrationFile, MigrationSet
from ..planning import savedplan
from ..planning.plan import (
    Action,
    AlterDatabaseOwner,
    AlterRole,
    ApplyMigration,
    ApplyRepeatable,
    CreateDatabase,
    CreateRole,
    MigrationAction,
    Plan,
    RevertMigration,
    action_phrase,
)
from ..planning.planner import plan_service
from ..planning.records import ADOPTION_REASON
from . import bookkeeping, fleet
from .batches import Step
from .guard import transaction_guard
from .inline_copy import run_transactional_steps
from .migration_run import (
    GuardFailed,
    Target,
    as_role,
    checkpoint,
    execute_guarded,
    file_of,
    ms_since,
    rollback_quietly,
    run_outside_transaction,
)
from .progress import (
    Cancellation,
    Interrupted,
    Outcome,
    Progress,
    Result,
    SilentProgress,
)

if TYPE_CHECKING:
    import psycopg

__all__ = ["execute"]


@dataclass
class _Run:
    plan: Plan
    estate: Estate
    migration_sets: dict[str, MigrationSet]
    progress: Progress
    lock_wait: float
    cancellation: Cancellation = field(default_factory=Cancellation)
    outcomes: list[Outcome] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)
    # Units of a fleet run on several threads: outcomes and progress go through one lock,
    # so each line is whole and the counts add up.
    said: threading.RLock = field(default_factory=threading.RLock)
    members: dict[str, list[Service]] = field(default_factory=dict)  # database -> its services
    # Per service, its actions in the plan, and those reported so far: looked up once per
    # service, so a fleet's thousands of services do not each scan the whole run.
    plan_actions: dict[str, list[MigrationAction]] = field(default_factory=dict)
    reported: set[Action] = field(default_factory=set)
    # apply --one-pass: per service, the state its saved plan was made from, checked under
    # its lock before anything of it runs (None: the plan was made and checked just now).
    expected: Mapping[str, dict[str, object]] | None = None

    def url(self, server: Server) -> str:
        with self.said:
            if server.name not in self.urls:
                self.urls[server.name] = server_url(server)
            return self.urls[server.name]

    def finish(self, outcome: Outcome) -> None:
        with self.said:
            self.outcomes.append(outcome)
            self.reported.add(outcome.action)
            self.progress.action_finished(outcome, len(self.outcomes), len(self.plan.actions))

    def start(self, action: Action) -> None:
        with self.said:
            self.progress.action_started(action, len(self.outcomes) + 1, len(self.plan.actions))

    def notice(self, message: str) -> None:
        with self.said:
            self.progress.notice(message)

    def lock_wait_for(self, conn: psycopg.Connection, key: int, what: str) -> LockWait:
        """Waiting for a lock the way this run waits: up to ``--lock-wait``, announced, and
        ended by a stop request."""
        return LockWait(
            conn, key, what, wait_seconds=self.lock_wait, on_wait=self.progress.notice,
            stop=lambda: self.check_stop(f"while waiting for the lock on {what}"),
        )  # fmt: skip

    def check_stop(self, where: str) -> None:
        """Raise ``Interrupted`` if a stop was requested; ``where`` completes "stopped ..."."""
        if self.cancellation.requested:
            raise self.interrupted(f"stopped {where}")

    def interrupted(self, what: str, *, hint: str | None = None, **context: object) -> Interrupted:
        signal_name = self.cancellation.signal_name or "a stop request"
        done = sum(1 for outcome in self.outcomes if outcome.status == "done")
        return Interrupted(
            f"{signal_name}: {what} ({done} of {len(self.plan.actions)} {'action' if len(self.plan.actions) == 1 else 'actions'} done)",
            signal_name=signal_name,
            hint=hint or "nothing is half done; run 'dbplan apply' again to go on from here",
            **context,
        )


def execute(
    plan: Plan,
    estate: Estate,
    migration_sets: dict[str, MigrationSet],
    *,
    progress: Progress | None = None,
    lock_wait: float = DEFAULT_LOCK_WAIT_SECONDS,
    cancellation: Cancellation | None = None,
    parallel: int | None = None,
    keep_going: bool = False,
    expected: Mapping[str, dict[str, object]] | None = None,
) -> Result:
    """Carry out ``plan`` and report what was done.

    Independent work runs side by side, up to ``connection_bound(server, parallel)``
    units at once per server (``fleet``). The first failure stops new work (what is in
    flight finishes), unless ``keep_going``: then everything that does not depend on a
    failure runs. ``cancellation`` stops it: nothing new starts, what runs is rolled back
    or finishes. ``expected`` (a saved plan applied in one pass): per service, the state
    the plan was made from; a service found otherwise under its lock is refused, a failure.
    """
    if plan.blocked:
        first = plan.blockers[0]
        raise PlanBlocked(first.message, service=first.service, version=first.version, hint=first.hint)

    run = _Run(plan, estate, migration_sets, progress or SilentProgress(), lock_wait, cancellation or Cancellation())
    run.expected = expected
    try:
        _refuse_unguardable_behind_pooler(run)
    except DbplanError as err:
        return Result(tuple(run.outcomes), err, failures=(), not_run=())
    for service in estate.services.values():
        run.members.setdefault(service.database, []).append(service)
    for action in plan.actions:
        if isinstance(action, (ApplyMigration, RevertMigration, ApplyRepeatable)):
            run.plan_actions.setdefault(action.service, []).append(action)
    units = fleet.units_of(plan, estate)
    servers = {unit.server for unit in units}
    bounds = {name: connection_bound(estate.servers[name], parallel) for name in servers}
    for name in servers:  # before the threads: starting an embedded server is done once
        try:
            run.url(estate.servers[name])
        except DbplanError as err:
            return Result(tuple(run.outcomes), err)
    _announce(run.progress, units)
    schedule = fleet.run_units(
        units,
        bounds,
        lambda unit: _run_unit(run, unit),
        keep_going=keep_going,
        stop_requested=lambda: run.cancellation.requested,
        on_finished=lambda unit, status: _unit_finished(run, unit, status),
    )
    error = _first_error(run, schedule)
    return Result(tuple(run.outcomes), error, failures=tuple(schedule.failures), not_run=tuple(schedule.not_run))


def _run_unit(run: _Run, unit: fleet.Unit) -> DbplanError | None:
    """One unit's work; its error (None: it succeeded). Runs on a worker thread."""
    import psycopg

    first = unit.actions[0]
    try:
        run.check_stop(f"before {action_phrase(first)}")
        if unit.kind == fleet.ROLES:
            _create_on_server(run, run.estate.servers[unit.server], unit.actions)
        elif unit.kind == fleet.DATABASE:
            _create_database(run, run.estate.servers[unit.server], unit.actions)
        else:
            _migrate_service(run, run.estate.services[first.service], unit.actions)  # type: ignore[union-attr, arg-type]
    except psycopg.Error as err:
        return _driver_error(run, first, err)
    except DbplanError as err:
        return err
    return None


def _first_error(run: _Run, schedule: fleet.Schedule) -> DbplanError | None:
    """The error the run ends with: a stop request if there was one, else the first failure."""
    for failure in schedule.failures:
        if isinstance(failure.error, Interrupted):
            return failure.error
    if run.cancellation.requested and schedule.not_run:
        return run.interrupted("stopped before the next step")
    return schedule.failures[0].error if schedule.failures else None


def _announce(progress: Progress, units: list[fleet.Unit]) -> None:
    """Tell a progress that follows databases (``FleetProgress``) what the run holds."""
    started = getattr(progress, "fleet_started", None)
    if started is not None:
        started(units)


def _unit_finished(run: _Run, unit: fleet.Unit, status: str) -> None:
    finished = getattr(run.progress, "unit_finished", None)
    if finished is not None:
        with run.said:
            finished(unit, status)


def _driver_error(run: _Run, first: Action, err: Exception) -> DbplanError:
    """A driver error that no step turned into a sentence of its own: mostly a session
    terminated, or a server restarted, between the steps of a run (connected, not yet
    queried; reading the bookkeeping; waiting for a lock). What a migration does is
    reported by its own step, so this names the server, the step and what was done."""
    if isinstance(first, (CreateRole, AlterRole, CreateDatabase, AlterDatabaseOwner)):
        server = run.estate.servers[first.server]
    else:
        server = run.estate.server_of_service(run.estate.services[first.service])
    done = sum(1 for outcome in run.outcomes if outcome.status == "done")
    total = len(run.plan.actions)
    reason = _pg_message(err).splitlines()[0]
    return DbplanError(
        f"lost the connection to server '{server.name}' before {action_phrase(first)}: {reason} "
        f"({done} of {total} {'action' if total == 1 else 'actions'} done)",
        server=server.name,
        hint="what is done is recorded and is not applied twice: run 'dbplan apply' again "
        "('dbplan status' shows where each service stands)",
    )


def _refuse_unguardable_behind_pooler(run: _Run) -> None:
    """Before anything runs: a no-transaction migration cannot be protected behind a pooler."""
    first_per_server: dict[str, tuple[Server, MigrationAction]] = {}
    for action in run.plan.actions:
        if isinstance(action, (ApplyMigration, RevertMigration)) and not action.transactional:
            server = run.estate.server_of_service(run.estate.services[action.service])
            first_per_server.setdefault(server.name, (server, action))
    for server, action in first_per_server.values():
        with connect(server, run.url(server)) as conn:
            pooled = behind_pooler(conn)
        if pooled:
            raise _unguardable(server, action)


def _unguardable(server: Server, action: MigrationAction) -> DbplanError:
    return DbplanError(
        pooler_message(server.name)
        + f"; {action.file} (version {action.version} of service '{action.service}') runs outside a transaction, "
        "where no lock can keep a concurrent run out, so nothing was changed",
        server=server.name,
        service=action.service,
        version=action.version,
        hint="apply it over a direct connection to PostgreSQL; migrations that run in a transaction are safe "
        "through the pooler",
    )


# ---------------------------------------------------------------------------
# Roles and databases


def _create_on_server(run: _Run, server: Server, actions: list[Action]) -> None:
    with connect(server, run.url(server)) as conn:
        if behind_pooler(conn):
            # No session lock holds here; none is needed: each CREATE is atomic on its own,
            # and a concurrent run's creation shows up as a duplicate error, taken as done.
            _create_each(run, conn, server, actions)
            return
        waiting = run.lock_wait_for(conn, server_lock_key(server.name), f"server '{server.name}'")
        with advisory_lock(waiting, server=server.name):
            checkpoint("locked")
            _create_each(run, conn, server, actions)


def _create_database(run: _Run, server: Server, actions: list[Action]) -> None:
    """Create one database (or change its owner) under a lock of its own, so that a
    fleet's databases are created side by side and two runs never both create one."""
    database = actions[0].database  # type: ignore[union-attr]
    with connect(server, run.url(server)) as conn:
        key = database_lock_key(server.name, database)
        taken = try_lock_unless_pooled(conn, key)  # one round trip for both questions
        if taken is None:  # behind a pooler: see _create_on_server
            _create_each(run, conn, server, actions)
            return
        waiting = run.lock_wait_for(conn, key, f"database '{database}' on server '{server.name}'")
        # The session ends with this block: its end releases the lock.
        with advisory_lock(waiting, server=server.name, taken=taken, closing=True):
            checkpoint("locked")
            _create_each(run, conn, server, actions)


# CREATE DATABASE copies template1 and refuses while any session is connected to it
# ("source database "template1" is being accessed by other users", 55006): a monitoring
# probe or a psql left open there. Concurrent CREATE DATABASE statements do not conflict
# with each other (they share the template's lock), so this is a wait, not a race:
# retried for a while rather than switched to template0, which would drop whatever the
# administrator put in template1.
TEMPLATE_BUSY_RETRY_SECONDS = 10.0


def _execute_create(run: _Run, conn: psycopg.Connection, statement: psycopg.sql.Composed, what: str) -> None:
    from psycopg import errors

    deadline = time.monotonic() + TEMPLATE_BUSY_RETRY_SECONDS
    delay = 0.05
    while True:
        try:
            conn.execute(statement)
            return
        except errors.ObjectInUse:
            if time.monotonic() + delay > deadline:
                raise
            run.notice(f"{what}: the template database is in use by another session; retrying")
            run.check_stop(f"while waiting to create {what}")
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _create_each(run: _Run, conn: psycopg.Connection, server: Server, actions: list[Action]) -> None:
    if all(isinstance(action, (CreateDatabase, AlterDatabaseOwner)) for action in actions):
        _create_databases(run, conn, server, actions)
        return
    # Re-read under the lock; stored passwords are compared only where a role is altered.
    passwords = declared_passwords(run.estate, server.name) if any(isinstance(a, AlterRole) for a in actions) else None
    live = read_server(conn, server, passwords)
    for action in actions:
        if isinstance(action, AlterDatabaseOwner):
            _alter_owner(run, server, action, live.database_owners.get(action.database))
            continue
        if isinstance(action, AlterRole):
            # Roles created a moment ago by this group are read again with what they are now.
            fresh = read_server(conn, server, declared_passwords(run.estate, server.name)) if action.role not in live.roles else live
            _alter_role(run, conn, server, action, fresh)
            continue
        exists = action.role in live.roles if isinstance(action, CreateRole) else action.database in live.databases
        _create_one(run, conn, server, action, exists=exists)


def _create_databases(run: _Run, conn: psycopg.Connection, server: Server, actions: list[Action]) -> None:
    """A fleet's database unit: re-read under the lock only the databases it creates, not
    the whole server (which, once per database, made a fleet's creation quadratic). Only
    an owner to change needs the read: a database another run created meanwhile makes
    CREATE DATABASE fail as a duplicate, which ``_create_one`` takes as done by that run."""
    if not any(isinstance(action, AlterDatabaseOwner) for action in actions):
        for action in actions:
            _create_one(run, conn, server, action, exists=False)
        return
    owners = read_database_owners(conn, server, [action.database for action in actions])  # type: ignore[union-attr]
    for action in actions:
        if isinstance(action, AlterDatabaseOwner):
            _alter_owner(run, server, action, owners.get(action.database))
        else:
            _create_one(run, conn, server, action, exists=action.database in owners)  # type: ignore[union-attr]


def _create_one(run: _Run, conn: psycopg.Connection, server: Server, action: Action, *, exists: bool) -> None:
    """CREATE one role or database, unless it exists (then another run made it)."""
    from psycopg import errors

    if exists:
        run.finish(Outcome(action, "skipped", detail="already exists (created by another run)"))
        return
    what = f"role '{action.role}'" if isinstance(action, CreateRole) else f"database '{action.database}'"  # type: ignore[union-attr]
    run.check_stop(f"before {action_phrase(action)}")
    run.start(action)
    started = time.monotonic()
    checkpoint("create")
    try:
        _execute_create(run, conn, _create_statement(conn, run.estate, action), what)
    # UniqueViolation: a concurrent CREATE of the same name committed while this one ran.
    except (errors.DuplicateDatabase, errors.DuplicateObject, errors.UniqueViolation):
        run.finish(Outcome(action, "skipped", detail="already exists (created by another run)"))
        return
    except errors.Error as err:
        failure = DbplanError(f"cannot create {what} on server '{server.name}': {_pg_message(err)}", server=server.name)
        run.finish(Outcome(action, "failed", detail=failure.message))
        raise failure from err
    checkpoint("created")
    run.finish(Outcome(action, "done", ms_since(started)))


def _alter_owner(run: _Run, server: Server, action: AlterDatabaseOwner, owner_now: str | None) -> None:
    """Hand the database and its bookkeeping tables to the declared owner, in one
    transaction in the database itself: never the database without its tables."""
    import psycopg
    from psycopg import sql

    if owner_now == action.owner:
        run.finish(Outcome(action, "skipped", detail=f"already owned by {action.owner} (changed by another run)"))
        return
    run.check_stop(f"before {action_phrase(action)}")
    run.start(action)
    started = time.monotonic()
    owner = sql.Identifier(action.owner)
    statements = [sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(action.database), owner)]
    statements += [
        sql.SQL("ALTER TABLE IF EXISTS {} OWNER TO {}").format(sql.Identifier(*table.split(".", 1)), owner)
        for table in action.bookkeeping_tables
    ]
    try:
        with connect(server, run.url(server), action.database) as conn, conn.transaction():
            for statement in statements:
                conn.execute(statement)
    except psycopg.Error as err:
        failure = DbplanError(
            f"cannot change the owner of database '{action.database}' on server '{server.name}' to "
            f"'{action.owner}': {_pg_message(err)}; nothing was changed",
            server=server.name,
            hint="the administrator in the server's url must own the database or be a superuser, and be a member "
            f"of role '{action.owner}'",
        )
        run.finish(Outcome(action, "failed", detail=failure.message))
        raise failure from err
    run.finish(Outcome(action, "done", ms_since(started)))


def _alter_role(run: _Run, conn: psycopg.Connection, server: Server, action: AlterRole, live: ServerFacts) -> None:
    """Only what still differs under the lock (another run may have done part), in one
    transaction: the role's attributes and its new memberships together or not at all."""
    from psycopg import errors, sql

    current = live.role_attributes.get(action.role)
    left = _still_differs(action, current, live)
    if not left.changes():
        run.finish(Outcome(action, "skipped", detail="already as declared (changed by another run)"))
        return
    run.check_stop(f"before {action_phrase(action)}")
    run.start(action)
    started = time.monotonic()
    name = sql.Identifier(action.role)
    options: list[sql.Composable] = []
    if left.login is not None:
        options.append(sql.SQL("LOGIN" if left.login[1] else "NOLOGIN"))
    if left.connection_limit is not None:
        options.append(sql.SQL("CONNECTION LIMIT {}").format(sql.Literal(left.connection_limit[1])))
    if left.password:
        password = run.estate.roles[action.role].password
        assert password is not None
        options.append(sql.SQL("PASSWORD {}").format(sql.Literal(password_verifier(conn, action.role, password))))
    try:
        with conn.transaction():
            if options:
                conn.execute(sql.SQL("ALTER ROLE {} {}").format(name, sql.SQL(" ").join(options)))
            if left.grant:
                grants = sql.SQL(", ").join(sql.Identifier(other) for other in left.grant)
                conn.execute(sql.SQL("GRANT {} TO {}").format(grants, name))
    except errors.Error as err:
        failure = DbplanError(
            f"cannot alter role '{action.role}' on server '{server.name}' ({', '.join(left.changes())}): "
            f"{_pg_message(err)}; nothing was changed",
            server=server.name,
            hint="the administrator in the server's url must be a superuser, or have CREATEROLE and (from "
            "PostgreSQL 16) ADMIN OPTION on this role and the roles granted (it has it on roles it created)",
        )
        run.finish(Outcome(action, "failed", detail=failure.message))
        raise failure from err
    run.finish(Outcome(action, "done", ms_since(started)))


def _still_differs(action: AlterRole, current: LiveRole | None, live: ServerFacts) -> AlterRole:
    """The part of ``action`` that the role read under the lock still lacks."""
    if current is None:  # gone since the plan: alter what was shown, and let the server say why not
        return action
    return AlterRole(
        action.server,
        action.role,
        login=action.login if action.login is not None and current.login != action.login[1] else None,
        connection_limit=action.connection_limit
        if action.connection_limit is not None and current.connection_limit != action.connection_limit[1]
        else None,
        grant=tuple(other for other in action.grant if other not in current.member_of),
        password=action.password and (live.passwords_match or {}).get(action.role) is not True,
    )


STRATEGIES = {"wal_log": "WAL_LOG", "file_copy": "FILE_COPY"}  # the only values the schema allows


def _create_statement(conn: psycopg.Connection, estate: Estate, action: Action) -> psycopg.sql.Composed:
    from psycopg import sql

    if isinstance(action, CreateRole):
        role = estate.roles[action.role]
        options: list[sql.Composable] = [sql.SQL("LOGIN" if role.login else "NOLOGIN")]
        if role.password is not None:
            verifier = password_verifier(conn, role.name, role.password)
            options.append(sql.SQL("PASSWORD {}").format(sql.Literal(verifier)))
        return sql.SQL("CREATE ROLE {} {}").format(sql.Identifier(role.name), sql.SQL(" ").join(options))
    assert isinstance(action, CreateDatabase)
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(action.database))
    if action.owner:
        statement += sql.SQL(" OWNER {}").format(sql.Identifier(action.owner))
    strategy = estate.servers[action.server].create_strategy
    # Before PostgreSQL 15 there is no STRATEGY: every copy is a file copy (the planner
    # blocks wal_log there).
    if strategy is not None and conn.info.server_version // 10000 >= FIRST_STRATEGY_MAJOR:
        statement += sql.SQL(" STRATEGY {}").format(sql.SQL(STRATEGIES[strategy]))
    return statement


def password_verifier(conn: psycopg.Connection, role: str, password: str) -> str:
    """The SCRAM-SHA-256 verifier of ``password``, computed here by libpq.

    The statement that sets a password travels to pg_stat_activity, pg_stat_statements
    and the server log (with log_statement = 'all', and whenever it fails); sending the
    verifier instead of the password keeps the password itself out of all of them. The
    server stores a verifier as it is, whatever password_encryption says, and a password
    that merely looks like a verifier ('md5' and 32 hex digits) is hashed like any other.
    """
    verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256")
    return verifier.decode("ascii")


# ---------------------------------------------------------------------------
# Migrations


def _migrate_service(run: _Run, service: Service, shown: list[MigrationAction]) -> None:
    server = run.estate.server_of_service(service)
    owner = run.estate.databases[service.database].owner
    with connect(server, run.url(server), service.database) as conn:
        # Fixed for the run: the lock's key and every statement name this table.
        schema, present = _located(run, conn, service, owner)
        key = migrations_lock_key(service.database, schema, service.table)
        what = f"the migrations of service '{service.name}' ({service.database}.{schema}.{service.table})"
        tables = bookkeeping.Tables(schema, service.table, service.history_table)
        waiting = run.lock_wait_for(conn, key, what)
        taken = try_lock_unless_pooled(conn, key)
        if taken is None:
            _migrate_guarded(run, Target(conn, service, server, owner, tables), shown, waiting)
            return
        # The session ends with this block: its end releases the lock.
        with advisory_lock(waiting, server=server.name, taken=taken, closing=True):
            checkpoint("locked")
            # Tables seen before the lock are still there under it (nothing dbplan runs drops
            # them); tables not seen may have been made since, and are looked for again.
            _migrate_locked(run, Target(conn, service, server, owner, tables, lock=waiting), shown,
                            present if present == (True, True) else None)  # fmt: skip


def _located(
    run: _Run, conn: psycopg.Connection, service: Service, owner: str | None
) -> tuple[str, tuple[bool, bool] | None]:
    """The schema of the service's tables (and whether both are there): from the saved plan
    applied in one pass, which found them there and whose state is checked under the lock
    (a table gone since fails that read), else looked for. A catalog query less per database."""
    saved = savedplan.saved_location(run.expected.get(service.name)) if run.expected is not None else None
    if saved is not None:
        return saved, (True, True)
    return locate_apart(conn, run.estate, service, owner, run.members.get(service.database))


def _migrate_locked(
    run: _Run, target: Target, shown: list[MigrationAction], present: tuple[bool, bool] | None = None
) -> None:
    """Under the session lock: re-read, re-plan, then run what is still to do.

    Every migration's transaction checks that the bookkeeping is what this run planned
    from (``guard.expect_version``). It can only fail when a migration released the
    session lock and another run got in: then take the lock again, re-read, re-plan,
    and go on with what is left.
    """
    service = target.service
    by_version = run.migration_sets[service.name].by_version()
    rejected: ServiceFacts | None = None
    first_read = True
    while True:
        # Under the lock: another run may have moved on.
        facts = read_service(
            target.conn, service, target.owner, schema=target.tables.schema, server=target.server.name,
            present=present if first_read else None,
        )  # fmt: skip
        if first_read:
            _refuse_if_changed_since_saved(run, target, shown, facts)
            first_read = False
        todo = _fresh_todo(run, service, shown, facts)
        _skip_done_by_others(run, shown, todo)
        if not todo:
            return
        if not (facts.table_exists and facts.history_exists):  # else nothing to create or record: a round trip less
            _prepare(target, facts)
        checkpoint("prepared")
        try:
            _run_todo(run, target, todo, facts.version, by_version)
            return
        except GuardFailed:
            if facts == rejected:
                raise _guard_contradicts(service) from None
            rejected = facts
            assert target.lock is not None
            hold_again(target.lock)


def _run_todo(
    run: _Run, target: Target, todo: list[MigrationAction], version: int | None, by_version: dict[int, Migration]
) -> None:
    """Run ``todo`` in order, starting from ``version`` in schema_migrations."""
    for actions in _runs_of_same_kind(todo):
        _run_and_report(run, target, actions, by_version, version_before=version)
        version = actions[-1].version_after


def _skip_done_by_others(run: _Run, shown: list[MigrationAction], todo: list[MigrationAction]) -> None:
    """Report the shown actions that are neither still to do nor reported yet as skipped."""
    still_to_do = set(todo)  # actions are frozen values: a set keeps 1,000 migrations linear
    with run.said:
        reported = {action for action in shown if action in run.reported}
    for action in shown:
        if action not in still_to_do and action not in reported:
            run.finish(Outcome(action, "skipped", detail="already done by another run"))


def _refuse_if_changed_since_saved(run: _Run, target: Target, shown: list[MigrationAction], facts: ServiceFacts) -> None:
    """apply --one-pass: a service whose bookkeeping is not what its saved plan was made
    from is refused here, before anything of it runs; the check the whole plan gets
    before its first change otherwise (``savedplan.check``), one database at a time.

    Except where it stands at the plan's end, with nothing left to do: an earlier run of
    the same saved plan got that far (its actions are then reported as skipped), so
    running the saved plan again goes on where a failure or a stop left it.
    """
    if run.expected is None:
        return
    service = target.service
    changed = savedplan.database_changed(
        run.expected.get(service.name), savedplan.service_fingerprint(run.estate, service.name, facts)
    )
    if changed is not None and not _at_plan_end(run, service, shown, facts):
        raise PlanChanged(
            f"the bookkeeping of service '{service.name}' in database '{service.database}' on server "
            f"'{target.server.name}' changed since the plan was saved ({changed}); nothing was changed in it",
            server=target.server.name,
            service=service.name,
            hint=savedplan.REPLAN_HINT,
        )


def _at_plan_end(run: _Run, service: Service, shown: list[MigrationAction], facts: ServiceFacts) -> bool:
    """Whether the service is where the plan's last action for it leaves it, clean, with
    nothing left to do."""
    last = run.plan_actions[service.name][-1]
    if facts.dirty or facts.version != last.version_after:
        return False
    try:
        return not _fresh_todo(run, service, shown, facts)
    except DbplanError:  # the fresh plan is not the shown one, or is blocked: not its end
        return False


def _guard_contradicts(service: Service) -> DbplanError:
    return DbplanError(
        f"the bookkeeping of service '{service.name}' reads the same as before, yet the guard says it "
        "changed; refusing to go on",
        service=service.name,
        hint="report this with --debug output; run 'dbplan status' to see where the service stands",
    )


def _prepare(target: Target, facts: ServiceFacts) -> None:
    """Create the bookkeeping tables (as the owner) before the first migration; a refusal
    (the owner may not create or write them) is an error that names them, not a crash."""
    import psycopg

    service = target.service
    try:
        target.conn.execute(as_role(target.conn, target.owner, _prepare_bookkeeping(target.tables, service, facts)))
    except psycopg.Error as err:
        rollback_quietly(target.conn)
        if connection_lost(target.conn, err):
            raise
        who = f"role '{target.owner}' (the database's owner, which migrations run as)" if target.owner else "the url's user"
        raise DbplanError(
            f"cannot prepare the migrations table {target.tables.schema}.{service.table} of service '{service.name}' "
            f"in database '{service.database}' on server '{target.server.name}' as {who}: {_pg_message(err)}; "
            "nothing was changed",
            server=target.server.name,
            service=service.name,
            hint=f"give {who.split(' (')[0]} the tables and their schema (ALTER TABLE ... OWNER TO, GRANT), "
            "or make it the database's owner",
        ) from err


def _runs_of_same_kind(actions: list[MigrationAction]) -> Iterator[list[MigrationAction]]:
    """Consecutive transactional migrations together (they may share round trips); each
    no-transaction one alone."""
    group: list[MigrationAction] = []
    for action in actions:
        if group and not (action.transactional and group[-1].transactional):
            yield group
            group = []
        group.append(action)
    if group:
        yield group


def _migrate_guarded(run: _Run, target: Target, shown: list[MigrationAction], waiting: LockWait) -> None:
    """Behind a pooler: every transaction locks and checks for itself (``transaction_guard``).

    After each transaction, or a guard that found the lock busy or the bookkeeping moved
    on, the facts are read again and the plan re-made, as the locked path does once.
    """
    service = target.service
    by_version = run.migration_sets[service.name].by_version()
    settled = 0  # shown[:settled] are reported
    rejected: ServiceFacts | None = None
    first_read = True
    while True:
        facts = read_service(target.conn, service, target.owner, schema=target.tables.schema, server=target.server.name)
        if facts.dirty_in_progress:  # a directly connected run is inside a no-transaction migration
            waiting.pause()
            continue
        if first_read:
            # Behind a pooler nothing holds the lock between transactions: what is checked
            # here is the state before this run's first transaction, as with the lock.
            _refuse_if_changed_since_saved(run, target, shown, facts)
            first_read = False
        todo = _fresh_todo(run, service, shown, facts)
        for action in shown[settled : len(shown) - len(todo)]:
            run.finish(Outcome(action, "skipped", detail="already done by another run"))
        settled = len(shown) - len(todo)
        if not todo:
            return
        action = todo[0]
        if not action.transactional:
            raise _unguardable(target.server, action)
        guard = transaction_guard(waiting.key, target.tables, facts)
        try:
            if not (facts.table_exists and facts.history_exists):
                prepare = _prepare_bookkeeping(target.tables, service, facts)
                execute_guarded(target.conn, as_role(target.conn, target.owner, prepare, guard=guard))
                checkpoint("prepared")
                continue
            _run_and_report(run, target, [action], by_version, guard=guard, version_before=facts.version)
            settled += 1
        except GuardFailed as failed:
            if failed.busy:
                waiting.pause()
            elif facts == rejected:
                raise _guard_contradicts(service) from None
            rejected = facts


def _run_and_report(
    run: _Run,
    target: Target,
    actions: list[MigrationAction],
    by_version: dict[int, Migration],
    *,
    version_before: int | None,
    guard: psycopg.sql.Composable | None = None,
) -> None:
    """Run consecutive migrations of one kind (see ``_runs_of_same_kind``), reporting each;
    the first starts from ``version_before`` in schema_migrations, each next one from the
    version the one before leaves."""
    report = _StepProgress(run)
    befores = [version_before] + [action.version_after for action in actions[:-1]]
    try:
        if actions[0].transactional:
            repeatables = {r.description: r.file for r in run.migration_sets[target.service.name].repeatables}
            steps = [
                Step(action, _file_to_run(action, by_version, repeatables), before)
                for action, before in zip(actions, befores)
            ]
            run_transactional_steps(run, target, steps, report, guard=guard)
        else:
            (action,) = actions
            assert not isinstance(action, ApplyRepeatable), "a repeatable always runs in a transaction"
            run.check_stop(f"before {action_phrase(action)}")
            report.started(Step(action, file_of(action, by_version[action.version])))
            run_outside_transaction(run, target, action, by_version[action.version], version_before)
            report.committed_now()
    except (MigrationFailed, Interrupted) as failure:
        report.failed(failure)
        raise


def _file_to_run(
    action: MigrationAction, by_version: dict[int, Migration], repeatables: dict[str, MigrationFile]
) -> MigrationFile:
    if isinstance(action, ApplyRepeatable):
        return repeatables[action.title]
    assert action.version is not None
    return file_of(action, by_version[action.version])


class _StepProgress:
    """Turns what ``batches`` hears of its steps into the run's outcomes and progress."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.current: MigrationAction | None = None
        self.started_at = 0.0

    def started(self, step: Step) -> None:
        self.current, self.started_at = step.action, time.monotonic()
        self.run.start(step.action)

    def committed(self, step: Step, duration_ms: int) -> None:
        checkpoint("migrated")
        self.current = None
        self.run.finish(Outcome(step.action, "done", duration_ms))

    def committed_now(self) -> None:
        assert self.current is not None
        checkpoint("migrated")
        action, self.current = self.current, None
        self.run.finish(Outcome(action, "done", ms_since(self.started_at)))

    def failed(self, failure: DbplanError) -> None:
        if self.current is not None:
            # A migration stopped on request was rolled back (or left dirty, as the message
            # says): cancelled, not a failure of its SQL.
            status = "cancelled" if isinstance(failure, Interrupted) else "failed"
            self.run.finish(Outcome(self.current, status, ms_since(self.started_at), failure.message))


def _fresh_todo(run: _Run, service: Service, shown: list[MigrationAction], facts: ServiceFacts) -> list[MigrationAction]:
    fresh = plan_service(service, run.estate, run.migration_sets[service.name], facts, lint=False)
    if fresh.blockers:
        raise PlanBlocked(fresh.blockers[0].message, service=service.name, hint=fresh.blockers[0].hint)
    return _still_to_do(service, shown, list(fresh.actions), run.plan_actions.get(service.name, []))


def _prepare_bookkeeping(tables: bookkeeping.Tables, service: Service, facts: ServiceFacts) -> psycopg.sql.Composable:
    """Create the tables; when adopting a golang-migrate database, record where it stood.

    The baseline tells later plans that versions up to it were applied before dbplan's
    history began, so that they are not mistaken for files that arrived out of order.
    """
    statements = bookkeeping.create_tables(tables, create_schema=service.schema is not None)
    if facts.version is not None and not facts.history_exists:
        statements += bookkeeping.record_event(
            tables,
            version=facts.version,
            title=None,
            checksum=None,
            event="baseline",
            reason=ADOPTION_REASON,
            duration_ms=0,
        )
    return statements


def _still_to_do(
    service: Service, shown: list[MigrationAction], fresh: list[MigrationAction], planned: list[MigrationAction]
) -> list[MigrationAction]:
    """The fresh plan must be the shown one (``planned``: the service's actions in the
    plan), or its tail when another run did the head."""
    all_shown = list(planned)
    start = all_shown.index(shown[0])
    remaining_shown = all_shown[start:]
    if len(fresh) <= len(remaining_shown) and fresh == remaining_shown[len(remaining_shown) - len(fresh) :]:
        fresh_set = set(fresh)
        return [action for action in shown if action in fresh_set]
    raise PlanChanged(
        f"the migrations of service '{service.name}' changed since the plan was made: "
        f"the plan would now {_describe_actions(fresh)} instead of {_describe_actions(remaining_shown)}",
        service=service.name,
        hint="run 'dbplan plan' again and review the new plan",
    )


def _describe_actions(actions: list[MigrationAction]) -> str:
    if not actions:
        return "do nothing"
    return ", ".join(_described(action) for action in actions)


def _described(action: MigrationAction) -> str:
    if isinstance(action, ApplyRepeatable):
        return f"run repeatable {action.title}"
    return f"{'apply' if isinstance(action, ApplyMigration) else 'revert'} {action.version}"


def _pg_message(err: Exception) -> str:
    diag = getattr(err, "diag", None)
    if diag is not None and diag.message_primary:
        return f"{diag.message_primary} (SQLSTATE {diag.sqlstate})"
    return str(err).strip()

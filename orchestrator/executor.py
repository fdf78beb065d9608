"""Stage 6: the executor, the only module that writes to servers.

For each group of actions it takes the lock, re-reads the live state, re-plans, and goes
on only if the fresh plan is what was shown (or what is left of it after another run did
part of it). A transactional migration travels to the server in one string together
with its bookkeeping and the COMMIT: one round trip, and nothing of it survives a failure.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from . import bookkeeping
from .connection import connect, server_url
from .errors import DbplanError, MigrationFailed, PlanBlocked, PlanChanged
from .facts import ServiceFacts, read_server, read_service, resolve_schema
from .locks import DEFAULT_LOCK_WAIT_SECONDS, advisory_lock, migrations_lock_key, server_lock_key
from .migrations import Migration, MigrationFile, MigrationSet
from .model import Estate, Server, Service
from .plan import Action, ApplyMigration, CreateDatabase, CreateRole, MigrationAction, Plan, RevertMigration
from .planner import plan_service
from .sqlscript import Script, Statement, line_of_offset

if TYPE_CHECKING:
    import psycopg


class Progress(Protocol):
    """How the executor reports what it does; the CLI draws it, a library caller may log it."""

    def action_started(self, action: Action, index: int, total: int) -> None: ...
    def action_finished(self, outcome: Outcome, index: int, total: int) -> None: ...
    def notice(self, message: str) -> None: ...


class SilentProgress:
    def action_started(self, action: Action, index: int, total: int) -> None:
        pass

    def action_finished(self, outcome: Outcome, index: int, total: int) -> None:
        pass

    def notice(self, message: str) -> None:
        pass


@dataclass(frozen=True)
class Outcome:
    action: Action
    status: str  # done | skipped | failed
    duration_ms: int = 0
    detail: str | None = None  # why skipped, or the error


@dataclass(frozen=True)
class Result:
    outcomes: tuple[Outcome, ...]
    error: DbplanError | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def count(self, status: str) -> int:
        return sum(1 for outcome in self.outcomes if outcome.status == status)


@dataclass
class _Run:
    plan: Plan
    estate: Estate
    migration_sets: dict[str, MigrationSet]
    progress: Progress
    lock_wait: float
    outcomes: list[Outcome] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)

    def url(self, server: Server) -> str:
        if server.name not in self.urls:
            self.urls[server.name] = server_url(server)
        return self.urls[server.name]

    def finish(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.progress.action_finished(outcome, len(self.outcomes), len(self.plan.actions))

    def start(self, action: Action) -> None:
        self.progress.action_started(action, len(self.outcomes) + 1, len(self.plan.actions))


def execute(
    plan: Plan,
    estate: Estate,
    migration_sets: dict[str, MigrationSet],
    *,
    progress: Progress | None = None,
    lock_wait: float = DEFAULT_LOCK_WAIT_SECONDS,
) -> Result:
    """Carry out ``plan``; stop at the first failure and report what was done."""
    if plan.blocked:
        first = plan.blockers[0]
        raise PlanBlocked(first.message, service=first.service, version=first.version, hint=first.hint)
    run = _Run(plan, estate, migration_sets, progress or SilentProgress(), lock_wait)
    try:
        for group in _groups(plan.actions):
            if isinstance(group[0], (CreateRole, CreateDatabase)):
                _create_on_server(run, estate.servers[group[0].server], group)
            else:
                _migrate_service(run, estate.services[group[0].service], group)  # type: ignore[arg-type]
    except DbplanError as err:
        return Result(tuple(run.outcomes), err)
    return Result(tuple(run.outcomes))


def _groups(actions: tuple[Action, ...]) -> Iterator[list[Action]]:
    """Consecutive actions that run under one lock: one server's creations, one service's migrations."""
    group: list[Action] = []
    for action in actions:
        if group and _lock_scope(group[0]) != _lock_scope(action):
            yield group
            group = []
        group.append(action)
    if group:
        yield group


def _lock_scope(action: Action) -> tuple[str, str]:
    if isinstance(action, (CreateRole, CreateDatabase)):
        return ("server", action.server)
    return ("service", action.service)


# ---------------------------------------------------------------------------
# Roles and databases


def _create_on_server(run: _Run, server: Server, actions: list[Action]) -> None:
    from psycopg import errors

    with connect(server, run.url(server)) as conn:
        with advisory_lock(
            conn, server_lock_key(server.name), f"server '{server.name}'", wait_seconds=run.lock_wait,
            on_wait=run.progress.notice,
        ):
            live = read_server(conn, server)  # re-read under the lock
            for action in actions:
                exists = action.role in live.roles if isinstance(action, CreateRole) else action.database in live.databases
                if exists:
                    run.finish(Outcome(action, "skipped", detail="already exists (created by another run)"))
                    continue
                run.start(action)
                started = time.monotonic()
                try:
                    conn.execute(_create_statement(run.estate, action))
                except (errors.DuplicateDatabase, errors.DuplicateObject):
                    run.finish(Outcome(action, "skipped", detail="already exists (created by another run)"))
                    continue
                except errors.Error as err:
                    what = f"role '{action.role}'" if isinstance(action, CreateRole) else f"database '{action.database}'"
                    failure = DbplanError(
                        f"cannot create {what} on server '{server.name}': {_pg_message(err)}", server=server.name
                    )
                    run.finish(Outcome(action, "failed", detail=failure.message))
                    raise failure from err
                run.finish(Outcome(action, "done", _ms_since(started)))


def _create_statement(estate: Estate, action: Action) -> psycopg.sql.Composed:
    from psycopg import sql

    if isinstance(action, CreateRole):
        role = estate.roles[action.role]
        options = [sql.SQL("LOGIN" if role.login else "NOLOGIN")]
        if role.password is not None:
            options.append(sql.SQL("PASSWORD {}").format(sql.Literal(role.password)))
        return sql.SQL("CREATE ROLE {} {}").format(sql.Identifier(role.name), sql.SQL(" ").join(options))
    assert isinstance(action, CreateDatabase)
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(action.database))
    if action.owner:
        statement += sql.SQL(" OWNER {}").format(sql.Identifier(action.owner))
    return statement


# ---------------------------------------------------------------------------
# Migrations


def _migrate_service(run: _Run, service: Service, shown: list[MigrationAction]) -> None:
    server = run.estate.server_of_service(service)
    owner = run.estate.databases[service.database].owner
    migration_set = run.migration_sets[service.name]
    with connect(server, run.url(server), service.database) as conn:
        with conn.transaction():
            schema = service.schema or resolve_schema(conn, owner)
        key = migrations_lock_key(service.database, schema, service.table)
        what = f"the migrations of service '{service.name}' ({service.database}.{schema}.{service.table})"
        with advisory_lock(conn, key, what, wait_seconds=run.lock_wait, on_wait=run.progress.notice):
            facts = read_service(conn, service, owner)  # under the lock: another run may have moved on
            assert facts.schema is not None
            fresh = plan_service(service, run.estate, migration_set, facts)
            if fresh.blockers:
                raise PlanBlocked(fresh.blockers[0].message, service=service.name, hint=fresh.blockers[0].hint)
            todo = _still_to_do(service, shown, list(fresh.actions), run.plan)
            tables = bookkeeping.Tables(facts.schema, service.table, service.history_table)
            if todo:
                conn.execute(_as_role(conn, owner, _prepare_bookkeeping(tables, service, facts)))
            by_version = migration_set.by_version()
            for action in shown:
                if action not in todo:
                    run.finish(Outcome(action, "skipped", detail="already done by another run"))
                    continue
                run.start(action)
                started = time.monotonic()
                try:
                    _run_migration(conn, tables, owner, action, by_version[action.version], server)
                except MigrationFailed as failure:
                    run.finish(Outcome(action, "failed", _ms_since(started), failure.message))
                    raise
                run.finish(Outcome(action, "done", _ms_since(started)))


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
            reason="adopted: versions up to here were applied before dbplan kept history",
            duration_ms=0,
        )
    return statements


def _still_to_do(
    service: Service, shown: list[MigrationAction], fresh: list[MigrationAction], plan: Plan
) -> list[MigrationAction]:
    """The fresh plan must be the shown one, or its tail when another run did the head."""
    all_shown = list(plan.actions_of(service.name))
    start = all_shown.index(shown[0])
    remaining_shown = all_shown[start:]
    if fresh == remaining_shown[len(remaining_shown) - len(fresh) :] and len(fresh) <= len(remaining_shown):
        return [action for action in shown if action in fresh]
    raise PlanChanged(
        f"the migrations of service '{service.name}' changed since the plan was made: "
        f"the plan would now {_describe_actions(fresh)} instead of {_describe_actions(remaining_shown)}",
        service=service.name,
        hint="run 'dbplan plan' again and review the new plan",
    )


def _describe_actions(actions: list[MigrationAction]) -> str:
    if not actions:
        return "do nothing"
    return ", ".join(f"{'apply' if isinstance(a, ApplyMigration) else 'revert'} {a.version}" for a in actions)


def _run_migration(
    conn: psycopg.Connection,
    tables: bookkeeping.Tables,
    owner: str | None,
    action: MigrationAction,
    migration: Migration,
    server: Server,
) -> None:
    reverting = isinstance(action, RevertMigration)
    file = migration.down if reverting else migration.up
    assert file is not None
    event = "revert" if reverting else "apply"
    if action.transactional:
        _run_in_transaction(conn, tables, owner, action, file, event, server)
    else:
        _run_outside_transaction(conn, tables, owner, action, file, event, server)


def _run_in_transaction(
    conn: psycopg.Connection,
    tables: bookkeeping.Tables,
    owner: str | None,
    action: MigrationAction,
    file: MigrationFile,
    event: str,
    server: Server,
) -> None:
    from psycopg import sql

    body = _transactional_body(file)
    head = sql.SQL("BEGIN;\n") + _set_role(owner, local=True)
    tail = bookkeeping.record_event(
        tables, version=action.version, title=action.title, checksum=file.checksum, event=event
    ) + bookkeeping.set_version(tables, action.version_after, False)
    head_text = head.as_string(conn)
    # The file's text goes in verbatim so that PostgreSQL's error position maps back to it.
    script = head_text + body + "\n;\n" + tail.as_string(conn) + "COMMIT;"
    try:
        conn.execute(script.encode())
    except Exception as err:
        _rollback_quietly(conn)
        raise _migration_failure(conn, err, action, file, owner, server, offset=len(head_text)) from err


def _transactional_body(file: MigrationFile) -> str:
    """The file's text, with its own wrapping BEGIN/COMMIT blanked out (same length, same lines)."""
    script = file.script
    if script.transaction_style != "wrapped":
        return file.text
    text = list(file.text)
    inner = set(id(statement) for statement in script.inner_statements)
    for statement in script.statements:
        if id(statement) in inner:
            continue
        for index in range(statement.offset, statement.offset + len(statement.sql)):
            if text[index] not in "\r\n":
                text[index] = " "
    return "".join(text)


def _run_outside_transaction(
    conn: psycopg.Connection,
    tables: bookkeeping.Tables,
    owner: str | None,
    action: MigrationAction,
    file: MigrationFile,
    event: str,
    server: Server,
) -> None:
    """Statement by statement, with the dirty flag set around the run (golang-migrate's way)."""
    from psycopg import sql

    started = time.monotonic()
    conn.execute(
        (sql.SQL("BEGIN;\n") + _set_role(owner, local=True) + bookkeeping.set_version(tables, action.version, True) + sql.SQL("COMMIT;")).as_string(conn).encode()
    )
    script = file.script
    statements: tuple[Statement, ...] = script.statements if script.parsed else ()
    try:
        if owner:
            conn.execute(_set_role(owner, local=False).as_string(conn).encode())
        if not statements and not script.parsed:
            conn.execute(file.text.encode())
        for statement in statements:
            try:
                conn.execute(statement.sql.encode())
            except Exception as err:
                _rollback_quietly(conn)
                raise _migration_failure(
                    conn, err, action, file, owner, server, statement=statement, dirty=True
                ) from err
    finally:
        if owner and not conn.closed and not conn.broken:
            conn.execute("RESET ROLE")
    done = (
        sql.SQL("BEGIN;\n")
        + _set_role(owner, local=True)
        + bookkeeping.record_event(
            tables,
            version=action.version,
            title=action.title,
            checksum=file.checksum,
            event=event,
            duration_ms=_ms_since(started),
        )
        + bookkeeping.set_version(tables, action.version_after, False)
        + sql.SQL("COMMIT;")
    )
    conn.execute(done.as_string(conn).encode())


def _set_role(owner: str | None, *, local: bool) -> psycopg.sql.Composable:
    from psycopg import sql

    if not owner:
        return sql.SQL("")
    return sql.SQL("SET LOCAL ROLE {};\n" if local else "SET ROLE {};\n").format(sql.Identifier(owner))


def _as_role(conn: psycopg.Connection, owner: str | None, statements: psycopg.sql.Composable) -> bytes:
    from psycopg import sql

    return (sql.SQL("BEGIN;\n") + _set_role(owner, local=True) + statements + sql.SQL("COMMIT;")).as_string(conn).encode()


def _rollback_quietly(conn: psycopg.Connection) -> None:
    import psycopg

    if conn.closed or conn.broken:
        return
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            pass  # the connection is going away; the server rolls back on its own


def _migration_failure(
    conn: psycopg.Connection,
    err: Exception,
    action: MigrationAction,
    file: MigrationFile,
    owner: str | None,
    server: Server,
    *,
    offset: int = 0,
    statement: Statement | None = None,
    dirty: bool = False,
) -> MigrationFailed:
    import psycopg

    verb = "revert" if isinstance(action, RevertMigration) else "apply"
    if not isinstance(err, psycopg.Error):
        return MigrationFailed(f"{file.display}: cannot {verb} version {action.version}: {err}", service=action.service, version=action.version)
    diag = err.diag
    sqlstate = diag.sqlstate
    message = diag.message_primary or str(err).strip().splitlines()[0]
    if isinstance(err, psycopg.OperationalError) and (conn.closed or conn.broken):
        return MigrationFailed(
            f"lost the connection to server '{server.name}' while running {file.display} "
            f"(service '{action.service}', version {action.version}): {message}",
            service=action.service,
            server=server.name,
            version=action.version,
            hint="nothing of a transactional migration is recorded unless it finished; run 'dbplan plan' to see where things stand",
        )
    line = _failure_line(conn, file, diag.statement_position, offset, statement, owner)
    where = f"{file.display}:{line}" if line else file.display
    details = [f"{where}: {message}" + (f" (SQLSTATE {sqlstate})" if sqlstate else "")]
    if diag.message_detail:
        details.append(f"detail: {diag.message_detail}")
    if diag.message_hint:
        details.append(f"postgres hint: {diag.message_hint}")
    if dirty:
        hint = (
            f"the migration ran outside a transaction, so service '{action.service}' is now dirty at version "
            f"{action.version}: fix the database by hand, then 'dbplan force {action.service} VERSION'"
        )
    else:
        hint = "the migration was rolled back: nothing of it is left in the database; fix the file and apply again"
    return MigrationFailed(
        f"cannot {verb} version {action.version} of service '{action.service}': " + "\n  ".join(details),
        sqlstate=sqlstate,
        pg_message=message,
        hint=hint,
        service=action.service,
        version=action.version,
        server=server.name,
    )


def _failure_line(
    conn: psycopg.Connection,
    file: MigrationFile,
    position: str | None,
    offset: int,
    statement: Statement | None,
    owner: str | None,
) -> int | None:
    if statement is not None:
        if position and position.isdigit():
            return statement.line + statement.sql[: int(position) - 1].count("\n")
        return statement.line
    if position and position.isdigit():
        index = int(position) - 1 - offset
        if 0 <= index <= len(file.text):
            return line_of_offset(file.text, index)
        return None
    located = _replay_to_find_failure(conn, file.script, owner)
    return located.line if located else None


def _replay_to_find_failure(conn: psycopg.Connection, script: Script, owner: str | None) -> Statement | None:
    """Run the statements one by one in a transaction that is rolled back, to find the one that fails.

    Only used after a failure without an error position, so the fast path stays one round trip.
    """
    import psycopg

    if not script.parsed or conn.closed or conn.broken:
        return None
    try:
        conn.execute("BEGIN")
        if owner:
            conn.execute(_set_role(owner, local=True).as_string(conn).encode())
        for statement in script.inner_statements:
            try:
                conn.execute(statement.sql.encode())
            except psycopg.Error:
                return statement
        return None
    except psycopg.Error:
        return None
    finally:
        _rollback_quietly(conn)


def _pg_message(err: Exception) -> str:
    diag = getattr(err, "diag", None)
    if diag is not None and diag.message_primary:
        return f"{diag.message_primary} (SQLSTATE {diag.sqlstate})"
    return str(err).strip()


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


"""A connection to the user's database: engine set-up, transactions and error translation.

Everything that differs between SQL dialects in how we connect and begin lives here.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from backfill.config import number_from_env
from backfill.errors import ConfigError, DatabaseUnavailable
from backfill.redaction import redact_url
from backfill.store.dialects import MYSQL, READ_ONLY
from backfill.store.locks import SQLITE_BUSY_TIMEOUT_MS, sqlite_write_lock
from backfill.store.tables import ensure_schema
from backfill.store.transient import Transient, classify, sqlstate

_SESSION_LIMITS = "backfill_session_limits"  # a pooled MySQL connection still has a batch's limits
# What "no limit" means for innodb_lock_wait_timeout: MariaDB's largest (about 3 years; MySQL's
# is larger).
_MYSQL_NO_LOCK_TIMEOUT = 100_000_000
DEFAULT_LOCK_TIMEOUT = 2.0
DEFAULT_STATEMENT_TIMEOUT = 60.0
DEFAULT_ESTIMATE_ABOVE = 5_000_000


def application_name(pid: int | None = None) -> str:
    """How a process's connections show in pg_stat_activity (unless the URL names one), and as
    MySQL's `program_name` connection attribute (performance_schema.session_connect_attrs)."""
    return f"backfill pid {os.getpid() if pid is None else pid}"


def _create_engine(url: str | sa.URL) -> sa.Engine:
    try:
        url = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError) as error:
        raise ConfigError(
            f"the database URL {redact_url(url)} is not a valid SQLAlchemy URL "
            "(dialect+driver://user:password@host:port/database)"
        ) from error
    connect_args: dict[str, Any] = {}
    options: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        connect_args["check_same_thread"] = False
    else:
        # Positional parameters, so the hot statements compiled once take plain tuples
        # (scan.py). pool_pre_ping: a pooled connection that died (server restart,
        # pg_terminate_backend) is replaced on checkout instead of failing the next statement.
        options.update(pool_pre_ping=True, paramstyle="format")
    if url.get_backend_name() == "postgresql" and "application_name" not in url.query:
        connect_args["application_name"] = application_name()
    if url.get_backend_name() in MYSQL:
        if "program_name" not in url.query:
            connect_args["program_name"] = application_name()
        # PostgreSQL's default: a batch's FOR UPDATE locks the rows it read, not the gaps
        # between them (REPEATABLE READ's next-key locks would hold up the app's inserts).
        options["isolation_level"] = "READ COMMITTED"
    try:
        # SQLAlchemy imports the dialect's driver (the DBAPI module) here, not at connect time.
        engine = sa.create_engine(url, connect_args=connect_args, **options)
    except sa.exc.NoSuchModuleError as error:
        raise ConfigError(
            f"the database URL {redact_url(url)} names a dialect SQLAlchemy does not know: "
            f"{url.drivername!r}"
        ) from error
    except ImportError as error:
        module = (error.name or url.get_driver_name()).partition(".")[0]
        extra = {"psycopg": "postgresql", "pymysql": "mysql"}.get(module)
        problem = (
            "is not installed" if isinstance(error, ModuleNotFoundError) else "fails to import"
        )
        raise ConfigError(
            f"the database URL {redact_url(url)} needs the driver {module}, which {problem}"
            + (f": pip install 'backfill[{extra}]'" if extra else "")
        ) from error
    if url.get_backend_name() == "sqlite":
        _configure_sqlite(engine)
    return engine


@dataclass(frozen=True)
class Limits:
    """How long one batch transaction may wait, on PostgreSQL and MySQL, before it backs off.

    `lock_timeout`: the longest wait for a row lock the application holds (then the batch rolls
    back and is retried later, so the migration never queues the app behind it for long);
    `statement_timeout`: the longest any statement of the batch may run. Seconds; 0 means no
    limit. Set with `SET LOCAL` in each batch transaction only (status, cancel and the app's
    own sessions are untouched); MySQL has no per-transaction settings, so there they are set
    for the session when a batch begins and put back when the connection returns to the pool.
    `estimate_above`: beyond this many rows (the planner's estimate, pg_class.reltuples),
    `total` is that estimate instead of an exact count(*)."""

    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT
    estimate_above: int = DEFAULT_ESTIMATE_ABOVE

    def __post_init__(self) -> None:
        if self.lock_timeout < 0 or self.statement_timeout < 0 or self.estimate_above < 0:
            raise ValueError("timeouts and the estimate threshold must not be negative")

    @classmethod
    def from_env(cls) -> Limits:
        """`BACKFILL_LOCK_TIMEOUT`, `BACKFILL_STATEMENT_TIMEOUT` (seconds) and
        `BACKFILL_ESTIMATE_ABOVE` (rows)."""
        return cls(
            lock_timeout=number_from_env("BACKFILL_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT),
            statement_timeout=number_from_env(
                "BACKFILL_STATEMENT_TIMEOUT", DEFAULT_STATEMENT_TIMEOUT
            ),
            estimate_above=int(number_from_env("BACKFILL_ESTIMATE_ABOVE", DEFAULT_ESTIMATE_ABOVE)),
        )

    def batch_settings_sql(self) -> str:
        """One statement (one round trip) that sets both limits for the current transaction."""
        lock, statement = (round(s * 1000) for s in (self.lock_timeout, self.statement_timeout))
        return (
            f"SELECT set_config('lock_timeout', '{lock}', true), "
            f"set_config('statement_timeout', '{statement}', true)"
        )

    def mysql_settings_sql(self, mariadb: bool) -> str:
        """`batch_settings_sql` for MySQL and MariaDB: one `SET SESSION`. InnoDB counts its lock
        wait in whole seconds (so a fraction rounds up, to at least 1); the statement limit is
        MariaDB's `max_statement_time` (seconds) or MySQL's `max_execution_time` (milliseconds,
        SELECTs only)."""
        lock = math.ceil(self.lock_timeout) if self.lock_timeout else _MYSQL_NO_LOCK_TIMEOUT
        statement = (
            f"max_statement_time = {self.statement_timeout:g}"
            if mariadb
            else f"max_execution_time = {round(self.statement_timeout * 1000)}"
        )
        return f"SET SESSION innodb_lock_wait_timeout = {lock}, {statement}"


def _configure_mysql(engine: sa.Engine) -> None:
    @event.listens_for(engine, "reset")
    def on_reset(dbapi_connection: Any, record: Any, _state: Any) -> None:
        # A batch's limits are meant for its transaction only (status, leases and count(*) must
        # not inherit them): put the server's defaults back before the connection is reused.
        # Should this fail, the pool discards the connection.
        if record.info.pop(_SESSION_LIMITS, None) is not None:
            statement = "max_statement_time" if _is_mariadb(engine) else "max_execution_time"
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(
                    f"SET SESSION innodb_lock_wait_timeout = DEFAULT, {statement} = DEFAULT"
                )
            finally:
                cursor.close()


def _configure_sqlite(engine: sa.Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # We issue BEGIN ourselves: pysqlite's implicit transactions would defer the write lock.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        # WAL lets status readers and the app read while a batch writes; NORMAL is durable in WAL.
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: sa.Connection) -> None:
        # A writing transaction takes the write lock up front, so it never fails half-way on
        # "database is locked" when upgrading from a read lock.
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _stored_in_progress(row: Mapping[str, Any]) -> bool:
    return bool(row["state"] == "inProgress")


class Database:
    def __init__(self, url: str | sa.URL | sa.Engine, *, limits: Limits | None = None) -> None:
        self.engine = url if isinstance(url, sa.Engine) else _create_engine(url)
        self.dialect = self.engine.dialect.name
        self.display_url = redact_url(self.engine.url)
        self.limits = limits if limits is not None else Limits()
        self._schema_ready = False
        self._postgresql = self.dialect == "postgresql"
        self._mysql = self.dialect in MYSQL
        if self._mysql:
            _configure_mysql(self.engine)
        self._batch_settings = self.limits.batch_settings_sql() if self._postgresql else None

    @contextmanager
    def unavailable_as_error(self) -> Iterator[None]:
        """Turn driver errors that are not about a row into DatabaseUnavailable (exit 4)."""
        try:
            yield
        except sa.exc.DBAPIError as error:
            detail = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
            raise DatabaseUnavailable(f"database {self.display_url}: {detail}") from error

    def ensure_schema(
        self,
        *,
        wait: float = 30.0,
        holds_lease: Callable[[Mapping[str, Any]], bool] = _stored_in_progress,
    ) -> None:
        """backfill's tables in the current layout (store.tables.ensure_schema), once per
        Database. The Runner says which runs are live; by default any stored `inProgress`
        holds its lease (an upgrade then waits even for a dead runner's migration)."""
        if not self._schema_ready:
            with self.unavailable_as_error():
                ensure_schema(self.engine, wait=wait, holds_lease=holds_lease)
            self._schema_ready = True

    @contextmanager
    def write(self, *, meanwhile: Callable[[], None] | None = None) -> Iterator[sa.Connection]:
        """One transaction that may write; commits when the block ends without raising. On
        SQLite, with `meanwhile`, the write lock is waited for in short tries with `meanwhile()`
        between them (store.locks.sqlite_write_lock): a read that refuses at once, say, once a
        runner holds what this transaction was going to claim."""
        if meanwhile is not None and self.dialect == "sqlite":
            with sqlite_write_lock(self.engine, meanwhile, SQLITE_BUSY_TIMEOUT_MS / 1000) as conn:
                yield conn
            return
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def read(self, *, rollback: bool = False) -> Iterator[sa.Connection]:
        """One transaction that reads; with `rollback`, whatever was written in it is undone
        (a migration function given the connection during verify may write)."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(**{READ_ONLY: True})
            with conn.begin() as transaction:
                yield conn
                if rollback:
                    transaction.rollback()

    def begin_batch(self, conn: sa.Connection) -> sa.RootTransaction:
        """Begin a batch transaction; on PostgreSQL and MySQL with its lock and statement
        timeouts."""
        transaction = conn.begin()
        settings = self._batch_settings
        if self._mysql:
            # Set for the session, once per connection: undone when it goes back to the pool.
            info = conn.connection.info
            settings = None if _SESSION_LIMITS in info else self._mysql_settings()
            info[_SESSION_LIMITS] = True
        if settings is not None:
            try:
                raw = driver(conn).cursor()
                try:
                    raw.execute(settings)
                finally:
                    raw.close()
            except BaseException:
                conn.connection.info.pop(_SESSION_LIMITS, None)
                transaction.rollback()
                raise
        return transaction

    def _mysql_settings(self) -> str:
        return self.limits.mysql_settings_sql(mariadb=_is_mariadb(self.engine))

    # -- errors worth retrying ----------------------------------------------------------------

    def is_database_error(self, error: BaseException) -> bool:
        """An error raised by the database or its driver (not by a migration function)."""
        dbapi = self.engine.dialect.loaded_dbapi
        return isinstance(error, (sa.exc.DBAPIError, dbapi.Error))

    def is_disconnect(self, error: BaseException) -> bool:
        """A driver error that means the connection is gone: what the dialect recognises (on
        MySQL: lost, gone away, killed), and on PostgreSQL any OperationalError without a
        SQLSTATE (psycopg raises those for client-side connection failures: refused, reset,
        closed)."""
        if not (self._postgresql or self._mysql):
            return False
        dbapi = self.engine.dialect.loaded_dbapi
        if not isinstance(error, dbapi.Error):
            return False
        if (
            self._postgresql
            and isinstance(error, dbapi.OperationalError)
            and sqlstate(error) is None
        ):
            return True
        return bool(self.engine.dialect.is_disconnect(error, None, None))

    def transient(self, error: BaseException) -> Transient | None:
        """Why `error` is worth retrying the batch for, or None (see backfill.store.transient)."""
        return classify(
            error, is_database_error=self.is_database_error, is_disconnect=self.is_disconnect
        )

    # -- size of a table ----------------------------------------------------------------------

    def total_rows(
        self, table: sa.Table, where: sa.ColumnElement[bool] | None = None
    ) -> tuple[int, bool]:
        """(rows in `table`, or in its range `where`; whether that is the planner's estimate).
        PostgreSQL answers with an estimate when the table is beyond `limits.estimate_above`
        rows (pg_class.reltuples; a count(*) of a big table reads all of it), for a range the
        planner's estimate of the rows it selects; below, and on other dialects, exactly."""
        counted = sa.select(sa.func.count()).select_from(table)
        if where is not None:
            counted = counted.where(where)
        with self.read() as conn:
            if self._postgresql:
                name = self.engine.dialect.identifier_preparer.format_table(table)
                estimate = conn.execute(
                    sa.text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:name)"),
                    {"name": name},
                ).scalar()
                if estimate is not None and estimate > self.limits.estimate_above:
                    if where is None:
                        return int(estimate), True
                    return self._planned_rows(conn, sa.select(sa.literal(1)).where(where)), True
            total = conn.execute(counted).scalar()
        return int(total or 0), False

    def _planned_rows(self, conn: sa.Connection, query: sa.Select[Any]) -> int:
        compiled: Any = query.compile(dialect=self.engine.dialect)
        params = tuple(compiled.params[n] for n in compiled.positiontup or ())
        plan: Any = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + compiled.string, params)
        plan = plan.scalar()
        if isinstance(plan, str):
            plan = json.loads(plan)
        return int(plan[0]["Plan"]["Plan Rows"])

    def dispose(self) -> None:
        self.engine.dispose()


def _is_mariadb(engine: sa.Engine) -> bool:
    """Whether the server is MariaDB, under either dialect name (known once connected)."""
    return bool(getattr(engine.dialect, "is_mariadb", False))


def driver(conn: sa.Connection) -> Any:
    """The DBAPI connection under `conn`: the hot statements go straight to it (store.scan)."""
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    return dbapi

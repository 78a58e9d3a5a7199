"""The database-wide lock that serializes the creation and upgrade of backfill's own tables.

Two processes using backfill for the first time at the same instant must not both create its
tables (the second would fail on a catalog's unique key), and an upgrade must run once while
the others wait. Each dialect has its own lock: PostgreSQL a transaction-level advisory lock
(its DDL commits with the transaction), MySQL/MariaDB a named lock held by the connection (its
DDL commits by itself), SQLite the write lock its `BEGIN IMMEDIATE` takes.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from backfill.errors import DatabaseUnavailable

# SQLite: how long one try for the write lock waits, and the busy timeout it puts back.
_SQLITE_TRY_MS = 50
SQLITE_BUSY_TIMEOUT_MS = 30_000

# pg_advisory_xact_lock's key ("backfill" in ASCII); advisory locks are per database.
POSTGRES_KEY = 0x6261636B66696C6C


def _refused_after(wait: float) -> DatabaseUnavailable:
    return DatabaseUnavailable(
        f"another process has been creating or upgrading backfill's tables for over {wait:g} s "
        "(it holds their lock); try again once it is done"
    )


def mysql_lock_name(database: str) -> str:
    """The named lock guarding `database`'s backfill tables (MySQL's names are server-wide and
    at most 64 characters long)."""
    return "backfill:" + hashlib.sha1(database.encode()).hexdigest()[:32]


class Unneeded(Exception):
    """Raised by a `meanwhile` callback: another process did what the lock was wanted for."""


@contextmanager
def sqlite_write_lock(
    engine: sa.Engine, meanwhile: Callable[[], None], wait: float
) -> Iterator[sa.Connection]:
    """A SQLite connection in a transaction that holds the write lock, waited for in short tries
    with `meanwhile()` (a read: it may raise) between them. A runner takes the write lock batch
    after batch, and a writer left in SQLite's busy handler (which retries every 100 ms at best)
    rarely hits the gap between two batches: it would wait until the run ends, then act on what
    it read before. Each try is a connection of its own: a failed BEGIN leaves nothing behind."""
    deadline = time.monotonic() + wait
    while True:
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            raw.execute(f"PRAGMA busy_timeout = {_SQLITE_TRY_MS}")
            try:
                transaction = conn.begin()  # BEGIN IMMEDIATE
            except sa.exc.OperationalError:
                if time.monotonic() > deadline:
                    raise
                transaction = None
            finally:
                raw.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            if transaction is not None:
                with transaction:
                    yield conn
                return
        meanwhile()


@contextmanager
def engine_tables_locked(
    engine: sa.Engine, wait: float, meanwhile: Callable[[], None]
) -> Iterator[sa.Connection | None]:
    """A connection, in a transaction, that holds the lock; waits for it at most `wait`
    seconds (then DatabaseUnavailable). None instead when `meanwhile` (called while waiting,
    on SQLite) raised Unneeded."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        acquired = False
        try:
            with sqlite_write_lock(engine, meanwhile, wait) as conn:
                acquired = True
                yield conn
        except Unneeded:
            yield None
        except sa.exc.OperationalError as error:
            if acquired:
                raise
            raise _refused_after(wait) from error
        return
    with engine.connect() as conn:
        if dialect == "postgresql":
            with conn.begin():
                try:
                    conn.execute(
                        sa.text("SELECT set_config('lock_timeout', :ms, true)"),
                        {"ms": str(max(1, round(wait * 1000)))},
                    )
                    conn.execute(
                        sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": POSTGRES_KEY}
                    )
                except sa.exc.OperationalError as error:
                    raise _refused_after(wait) from error
                conn.execute(sa.text("SELECT set_config('lock_timeout', '0', true)"))
                yield conn
        else:  # MySQL, MariaDB
            # Named locks are server-wide: the name says which database's tables it guards.
            name = mysql_lock_name(conn.execute(sa.text("SELECT DATABASE()")).scalar() or "")
            got = conn.execute(
                sa.text("SELECT GET_LOCK(:name, :wait)"), {"name": name, "wait": math.ceil(wait)}
            ).scalar()
            conn.commit()
            if got != 1:
                raise _refused_after(wait)
            try:
                with conn.begin():
                    yield conn
            finally:
                conn.execute(sa.text("SELECT RELEASE_LOCK(:name)"), {"name": name})
                conn.commit()

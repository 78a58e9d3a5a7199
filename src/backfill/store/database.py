"""A connection to the user's database: engine set-up, transactions and error translation.

Everything that differs between SQL dialects in how we connect and begin lives here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from backfill.config import redact_url
from backfill.errors import DatabaseUnavailable
from backfill.store.tables import ensure_schema

_READ_ONLY = "backfill_read_only"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def _create_engine(url: str | sa.URL) -> sa.Engine:
    url = sa.make_url(url)
    if url.get_backend_name() == "sqlite":
        engine = sa.create_engine(url, connect_args={"check_same_thread": False})
        _configure_sqlite(engine)
        return engine
    # Positional parameters, so the hot statements compiled once take plain tuples (scan.py).
    return sa.create_engine(url, pool_pre_ping=True, paramstyle="format")


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
        read_only = conn.get_execution_options().get(_READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


class Database:
    def __init__(self, url: str | sa.URL | sa.Engine) -> None:
        self.engine = url if isinstance(url, sa.Engine) else _create_engine(url)
        self.dialect = self.engine.dialect.name
        self.display_url = redact_url(self.engine.url)
        self._schema_ready = False

    @contextmanager
    def unavailable_as_error(self) -> Iterator[None]:
        """Turn driver errors that are not about a row into DatabaseUnavailable (exit 4)."""
        try:
            yield
        except sa.exc.DBAPIError as error:
            detail = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
            raise DatabaseUnavailable(f"database {self.display_url}: {detail}") from error

    def ensure_schema(self) -> None:
        if not self._schema_ready:
            with self.unavailable_as_error():
                ensure_schema(self.engine)
            self._schema_ready = True

    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """One transaction that may write; commits when the block ends without raising."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            conn = conn.execution_options(**{_READ_ONLY: True})
            with conn.begin():
                yield conn

    def dispose(self) -> None:
        self.engine.dispose()

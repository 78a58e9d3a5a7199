"""A batch decided in the database: a migration's declared SQL (`definition.SqlChange`) applied to
the key range of one batch, inside the batch's own transaction.

Two steps, where the Python path has a read and a write:

1. prepare the batch: `SELECT key FROM t WHERE key > :cursor ORDER BY key LIMIT :size FOR
   UPDATE` (the same rows, in the same order and with the same locks, as the Python path's
   read; only the keys travel, and on SQLite the columns the function reads, to be decoded),
   which gives the batch's size and its last key;
2. `UPDATE t SET <values> WHERE key > :cursor AND key <= :last AND <where>`: the rows of that
   range that the migration changes, computed from their current columns by the database.

Where the SQL is not faithful to the function on every row, the batch is Rejected before it
writes: on SQLite when the driver cannot decode a value of step 1 (TEXT that is not UTF-8),
and when a declared guard does not hold for a row of the range (one more `SELECT key ...
LIMIT 1` in step 1).

On SQLite, step 1 of the next batch may run ahead, on another connection, while this batch's
UPDATE runs (backfill.ahead decides when that stands). The cursor, counters and lease check
around both steps are the batch's (backfill.batch), as for any batch.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from backfill.definition import Migration, SqlChange
from backfill.store.database import driver
from backfill.store.dialects import declared_for
from backfill.store.scan import keyset_read
from backfill.store.statement import Statement
from backfill.types import Key, row_id


@dataclass(frozen=True)
class Applied:
    """What one batch did in the database."""

    processed: int  # rows in the batch's range (locked)
    first_key: Key | None
    last_key: Key | None
    changed: int  # rows the UPDATE wrote: those of the range that `where` selects


@dataclass(frozen=True)
class Prepared:
    """The rows of a batch, known before its UPDATE: how many, the first and the last key."""

    rows: int
    last_key: Key | None
    first_key: Key | None = None


class Rejected(Exception):
    """The batch cannot be decided in the database: a row of it is outside what the SQL
    handles faithfully, or the database refused the UPDATE because of the data (a failed cast,
    a violated constraint: SQLSTATE classes 22 and 23; on SQLite, a SQL function's error, such
    as a JSON function given a blob). The transaction can only roll back; the batch is then
    done again through the migration function, which names the row and field."""

    def __init__(self, migration: str, detail: str) -> None:
        super().__init__(f"migration {migration!r}: not decided in the database: {detail}")

    @classmethod
    def refused(cls, migration: str, error: sa.exc.DBAPIError) -> Rejected:
        detail = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        return cls(migration, f"the database rejected its SQL: {detail}")


def declared_change(migration: Migration, dialect: str) -> SqlChange | None:
    """The migration's SQL for `dialect` (SQLAlchemy's name), built and checked against its
    table; None when it declares none there."""
    return migration.checked_sql(dialect, declared_for(dialect, migration.sql))


class SqlBatch:
    """The two statements of a batch decided in the database, for one migration and dialect."""

    def __init__(self, engine: sa.Engine, migration: Migration, change: SqlChange) -> None:
        self.migration = migration
        self.dialect = engine.dialect
        key = migration.key
        self._width = len(key)
        self._locks: dict[tuple[bool, int], Statement] = {}
        table = migration.table
        update = sa.update(table).values(dict(change.values)).where(change.where)
        self._range = migration.range
        if self._range is not None:
            update = update.where(self._range)
        # Key values come as the driver gave them (a UUID as SQLite's hex text), and go back as
        # they are: without SQLAlchemy's conversions for the column's type.
        last = [_as_given(f"backfill_last_{i}") for i in range(len(key))]
        self._update_first = update.where(_compare(key, last, "<="))
        after = [_as_given(f"backfill_after_{i}") for i in range(len(key))]
        self._update_after = self._update_first.where(_compare(key, after, ">"))
        # SQLite keeps TEXT that is not UTF-8 and its functions take it byte for byte (3.40 has
        # no strict check of its own), while the Python path's read cannot even decode such a
        # row. So on SQLite the lock statement also fetches the columns the function reads, and
        # the driver decodes them exactly as for that read. Measured (instructions per row),
        # no cheaper than this: a function of ours called per row, or the batch's TEXT joined
        # by group_concat and decoded at once.
        keys = {c.name for c in key}
        self._decoded = (
            [c for c in migration.read_columns if c.name not in keys]
            if self.dialect.name == "sqlite"
            else []
        )
        # The first row of the range outside the guard, if any (NULL counts as outside), by
        # whether a cursor is given; the driver takes the last key, then the cursor.
        self._checks: tuple[Statement, Statement] | None = None
        if change.guard is not None:
            check = sa.select(*key).where(sa.case((change.guard, 0), else_=1) == 1)
            check = check.order_by(*[c.asc() for c in key]).limit(1)
            if self._range is not None:
                check = check.where(self._range)
            first = check.where(_compare(key, last, "<="))
            then = first.where(_compare(key, after, ">"))
            names = [f"backfill_last_{i}" for i in range(len(key))]
            after_names = names + [f"backfill_after_{i}" for i in range(len(key))]
            self._checks = (
                Statement.compile(first, self.dialect, names),
                Statement.compile(then, self.dialect, after_names),
            )

    @classmethod
    def declared(cls, engine: sa.Engine, migration: Migration) -> SqlBatch | None:
        """The migration's SQL path on this engine's dialect; None when it declares none."""
        change = declared_change(migration, engine.dialect.name)
        return None if change is None else cls(engine, migration, change)

    def _lock_statement(self, cursor_given: bool, limit: int) -> Statement:
        cached = self._locks.get((cursor_given, limit))
        if cached is None:
            key = self.migration.key
            select = sa.select(*key, *self._decoded)
            cached = keyset_read(select, key, self._range, cursor_given, limit, True, self.dialect)
            self._locks[(cursor_given, limit)] = cached
        return cached

    def prepare(self, conn: sa.Connection, cursor: Key | None, limit: int) -> Prepared:
        """The next `limit` rows after `cursor`: locked (PostgreSQL, MySQL), their text decoded
        (SQLite) and checked against the guard. Rejected when a row of them is outside what
        the SQL handles faithfully.

        Inside the batch's transaction, or on SQLite ahead of it, on another connection and
        outside any transaction (the batch then checks that nothing committed since): so
        only driver cursors here, never a SQLAlchemy execute, which would begin a transaction
        that takes SQLite's write lock."""
        name = self.migration.name
        statement = self._lock_statement(cursor is not None, limit)
        raw = driver(conn).cursor()
        try:
            try:
                raw.execute(statement.sql, statement.params(cursor or ()))
                rows = raw.fetchall()
            except sqlite3.OperationalError as error:
                if "decode" not in str(error):
                    raise
                raise Rejected(name, "a row holds TEXT that is not valid UTF-8") from error
            if not rows:
                return Prepared(0, None)
            first, last = tuple(rows[0][: self._width]), tuple(rows[-1][: self._width])
            if self._checks is not None:
                check = self._checks[cursor is not None]
                raw.execute(check.sql, check.params(last + (cursor or ())))
                outside = raw.fetchone()
                if outside is not None:
                    row = row_id(tuple(outside))
                    raise Rejected(name, f"row {row!r} is outside the guard of its SQL")
        finally:
            raw.close()
        return Prepared(len(rows), last, first)

    def apply(self, conn: sa.Connection, cursor: Key | None, prepared: Prepared) -> Applied:
        """Update the rows of the `prepared` batch after `cursor` that the migration changes,
        inside the batch's transaction. Rejected, with nothing written, when the database
        refuses the UPDATE on this batch's data."""
        last = prepared.last_key
        if last is None:
            return Applied(0, None, None, 0)
        params: dict[str, Any] = {f"backfill_last_{i}": v for i, v in enumerate(last)}
        update = self._update_first
        if cursor is not None:
            params.update({f"backfill_after_{i}": v for i, v in enumerate(cursor)})
            update = self._update_after
        try:
            result = conn.execute(update, params)
        except (sa.exc.DataError, sa.exc.IntegrityError) as error:
            raise Rejected.refused(self.migration.name, error) from error
        except sa.exc.OperationalError as error:
            # SQLite reports a SQL function's error (a JSON function given a blob, malformed
            # JSON) as SQLITE_ERROR; busy, I/O and full-disk errors have codes of their own.
            if getattr(error.orig, "sqlite_errorcode", None) != sqlite3.SQLITE_ERROR:
                raise
            raise Rejected.refused(self.migration.name, error) from error
        return Applied(prepared.rows, prepared.first_key, last, max(result.rowcount, 0))


def _as_given(name: str) -> sa.ColumnElement[Any]:
    """A parameter passed to the driver as it is (a bare one would take the key's type)."""
    return sa.type_coerce(sa.bindparam(name), sa.types.NullType())


def _compare(
    key: tuple[sa.Column[Any], ...], values: list[Any], operator: str
) -> sa.ColumnElement[bool]:
    """`key <op> values` in key order: a row comparison for a composite key."""
    left: Any = key[0] if len(key) == 1 else sa.tuple_(*key)
    right: Any = values[0] if len(values) == 1 else sa.tuple_(*values)
    compared: sa.ColumnElement[bool] = left > right if operator == ">" else left <= right
    return compared

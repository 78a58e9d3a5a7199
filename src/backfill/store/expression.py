"""A batch decided in the database: a migration's declared SQL (`definition.SqlChange`) applied to
the key range of one batch, inside the batch's own transaction.

Two statements, where the Python path has a read and a write:

1. lock the batch: `SELECT key FROM t WHERE key > :cursor ORDER BY key LIMIT :size FOR UPDATE`
   (the same rows, in the same order and with the same locks, as the Python path's read; only
   the keys travel), which gives the batch's size and its last key;
2. `UPDATE t SET <values> WHERE key > :cursor AND key <= :last AND <where>`: the rows of that
   range that the migration changes, computed from their current columns by the database.

The cursor, counters and lease check around them are the pipeline's, as for any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from backfill.definition import Migration, SqlChange
from backfill.store.records import Key
from backfill.store.scan import Statement


@dataclass(frozen=True)
class Applied:
    """What one batch did in the database."""

    processed: int  # rows in the batch's range (locked)
    last_key: Key | None
    changed: int  # rows the UPDATE wrote: those of the range that `where` selects


class Rejected(Exception):
    """The database refused the batch's UPDATE because of the data (a failed cast, a violated
    constraint: SQLSTATE classes 22 and 23). The transaction can only roll back; the batch is
    then done again through the migration function, which names the row and field."""

    def __init__(self, migration: str, error: sa.exc.DBAPIError) -> None:
        detail = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        super().__init__(f"migration {migration!r}: the database rejected its SQL: {detail}")


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
        last = [sa.bindparam(f"backfill_last_{i}", type_=c.type) for i, c in enumerate(key)]
        self._update_first = update.where(_compare(key, last, "<="))
        after = [sa.bindparam(f"backfill_after_{i}", type_=c.type) for i, c in enumerate(key)]
        self._update_after = self._update_first.where(_compare(key, after, ">"))

    @classmethod
    def declared(cls, engine: sa.Engine, migration: Migration) -> SqlBatch | None:
        """The migration's SQL path on this engine's dialect; None when it declares none."""
        change = migration.sql_change(engine.dialect.name)
        return None if change is None else cls(engine, migration, change)

    def _lock_statement(self, cursor_given: bool, limit: int) -> Statement:
        cached = self._locks.get((cursor_given, limit))
        if cached is None:
            key = self.migration.key
            names = [f"k{i}" for i in range(self._width)] if cursor_given else []
            statement = sa.select(*key)
            if cursor_given:
                params = [sa.bindparam(n, type_=c.type) for n, c in zip(names, key, strict=True)]
                statement = statement.where(_compare(key, params, ">"))
            statement = statement.order_by(*[c.asc() for c in key]).limit(limit)
            if self.dialect.name == "postgresql":
                statement = statement.with_for_update()
            cached = Statement.compile(statement, self.dialect, names)
            self._locks[(cursor_given, limit)] = cached
        return cached

    def apply(self, conn: sa.Connection, cursor: Key | None, limit: int) -> Applied:
        """Lock the next `limit` rows after `cursor` and update those the migration changes.
        Rejected when the database refuses the UPDATE on this batch's data."""
        statement = self._lock_statement(cursor is not None, limit)
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        raw = dbapi.cursor()
        try:
            raw.execute(statement.sql, statement.params(cursor or ()))
            keys = raw.fetchall()
        finally:
            raw.close()
        if not keys:
            return Applied(0, None, 0)
        last = tuple(keys[-1])
        params: dict[str, Any] = {f"backfill_last_{i}": v for i, v in enumerate(last)}
        update = self._update_first
        if cursor is not None:
            params.update({f"backfill_after_{i}": v for i, v in enumerate(cursor)})
            update = self._update_after
        try:
            result = conn.execute(update, params)
        except (sa.exc.DataError, sa.exc.IntegrityError) as error:
            raise Rejected(self.migration.name, error) from error
        return Applied(len(keys), last, max(result.rowcount, 0))


def _compare(
    key: tuple[sa.Column[Any], ...], values: list[sa.BindParameter[Any]], operator: str
) -> sa.ColumnElement[bool]:
    """`key <op> values` in key order: a row comparison for a composite key."""
    left: Any = key[0] if len(key) == 1 else sa.tuple_(*key)
    right: Any = values[0] if len(values) == 1 else sa.tuple_(*values)
    compared: sa.ColumnElement[bool] = left > right if operator == ">" else left <= right
    return compared

"""The two hot statements of a batch for one migration's table: read after a cursor, and write
the changes (store.writes, which TableScan hands the write to).

Both are built with SQLAlchemy Core (quoting, dialect compilation) once per migration, then sent
straight to the driver with plain tuples: measured, SQLAlchemy's per-row result and JSON
processing would cost a third of the run (docs/architecture.md, "Where the time goes"). The
values themselves, decoded for the function and encoded back, live in `store.values`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from backfill.definition import Migration
from backfill.store.database import driver
from backfill.store.dialects import JSON_AS_TEXT, LOCKING
from backfill.store.statement import Statement
from backfill.store.values import Fault, Rows, Writes, decode_json, is_json
from backfill.store.writes import TableWrites
from backfill.types import Key

Snapshot = tuple[int, int]


def keyset_read(
    select: sa.Select[Any],
    key: tuple[sa.Column[Any], ...],
    where: sa.ColumnElement[bool] | None,
    cursor_given: bool,
    limit: int,
    lock: bool,
    dialect: sa.Dialect,
) -> Statement:
    """The next `limit` rows of `select` in `key` order, in the range `where`, after a cursor
    given as parameters k0, k1, ... (a row comparison for a composite key); locked where the
    dialect locks when `lock`. Every keyset read of a batch is built here."""
    names = [f"k{i}" for i in range(len(key))] if cursor_given else []
    statement = select if where is None else select.where(where)
    if cursor_given:
        params = [sa.bindparam(n, type_=c.type) for n, c in zip(names, key, strict=True)]
        left: Any = key[0] if len(key) == 1 else sa.tuple_(*key)
        right: Any = params[0] if len(key) == 1 else sa.tuple_(*params)
        statement = statement.where(left > right)
    statement = statement.order_by(*[c.asc() for c in key]).limit(limit)
    if lock and dialect.name in LOCKING:
        statement = statement.with_for_update()
    return Statement.compile(statement, dialect, names)


class TableScan:
    def __init__(self, engine: sa.Engine, migration: Migration) -> None:
        self.migration = migration
        self.dialect = engine.dialect
        table = migration.table
        self.columns = migration.read_columns
        self.names = [c.name for c in self.columns]
        self.key_width = len(migration.key)
        self.key_names = frozenset(c.name for c in migration.key)
        self.column_names = frozenset(c.name for c in table.columns)
        # Drivers that hand back JSON as text (SQLite; MariaDB, whose JSON is LONGTEXT, and
        # MySQL through PyMySQL) need decoding; psycopg decodes jsonb itself.
        decode_text = self.dialect.name in JSON_AS_TEXT
        self.decoded = [c.name for c in self.columns if is_json(c) and decode_text]
        self.json_names = frozenset(c.name for c in table.columns if is_json(c))
        self._range = migration.range
        self._select = sa.select(*self.columns)
        self._reads: dict[tuple[bool, int, bool], Statement] = {}
        self._triggers: bool | None = None  # None: not looked up yet
        self.writer = TableWrites(engine, migration)

    # -- reading ------------------------------------------------------------------------------

    def _read_statement(self, cursor_given: bool, limit: int, lock: bool) -> Statement:
        cached = self._reads.get((cursor_given, limit, lock))
        if cached is None:
            cached = keyset_read(
                self._select,
                self.migration.key,
                self._range,
                cursor_given,
                limit,
                lock,
                self.dialect,
            )
            self._reads[(cursor_given, limit, lock)] = cached
        return cached

    def read(self, conn: sa.Connection, cursor: Key | None, limit: int, lock: bool = True) -> Rows:
        """The next `limit` rows after `cursor` in key order, decoded for the function; locked
        (PostgreSQL, MySQL) unless `lock` is false, as for read-only scans that must not block
        the app."""
        statement = self._read_statement(cursor is not None, limit, lock)
        sql, params = statement.sql, statement.params(cursor or ())
        raw = driver(conn).cursor()
        try:
            try:
                raw.execute(sql, params)
                fetched = raw.fetchall()
            except sqlite3.OperationalError as error:
                if "decode" not in str(error):
                    raise
                return self._read_undecodable(conn, cursor, limit)
        finally:
            raw.close()
        return self._rows(fetched)

    def _rows(
        self, fetched: Sequence[Sequence[Any]], faults: dict[int, Fault] | None = None
    ) -> Rows:
        # Whole-batch comprehensions rather than a function call per row: the per-row work that
        # remains runs in C (dict, zip, slicing). Rows have exactly our columns, and a strict
        # zip made building the dicts 60% slower.
        names, width = self.names, self.key_width
        values = [dict(zip(names, row, strict=False)) for row in fetched]
        for name in self.decoded:
            for row_values in values:
                stored = row_values[name]
                if stored is not None:
                    row_values[name] = decode_json(stored)
        return Rows([tuple(row[:width]) for row in fetched], values, faults)

    def _read_undecodable(self, conn: sa.Connection, cursor: Key | None, limit: int) -> Rows:
        """SQLite only: some TEXT in this batch is not UTF-8. Read bytes and decode per value,
        so the bad row and field can be named instead of the whole batch failing to fetch."""
        kinds = [sa.func.typeof(c) for c in self.columns]
        selected = sa.select(*self.columns, *kinds)
        key, given = self.migration.key, cursor is not None
        statement = keyset_read(selected, key, self._range, given, limit, False, self.dialect)
        dbapi = driver(conn)
        previous = dbapi.text_factory
        dbapi.text_factory = bytes
        try:
            raw = dbapi.cursor()
            raw.execute(statement.sql, statement.params(cursor or ()))
            fetched = raw.fetchall()
            raw.close()
        finally:
            dbapi.text_factory = previous
        width = len(self.columns)
        decoded: list[list[Any]] = []
        faults: dict[int, Fault] = {}
        for position, values in enumerate(fetched):
            stored, kinds_of = list(values[:width]), values[width:]
            for i, kind in enumerate(kinds_of):
                if kind == b"text":
                    try:
                        stored[i] = stored[i].decode("utf-8")
                    except UnicodeDecodeError as error:
                        faults.setdefault(
                            position,
                            Fault(
                                self.names[i],
                                f"is not valid UTF-8 ({error.reason} at byte {error.start})",
                            ),
                        )
                        stored[i] = None
            decoded.append(stored)
        return self._rows(decoded, faults)

    def snapshot(self, conn: sa.Connection) -> Snapshot | None:
        """A token that stays the same on `conn` while no other connection commits to the
        database; None where the dialect offers none, or where our own writes may change rows
        of other batches (triggers on the table). Lets a batch read ahead of its transaction be
        trusted."""
        if self._triggers is None:
            self._triggers = self.dialect.name != "sqlite" or _has_triggers(conn, self.migration)
        if self._triggers:
            return None
        dbapi = driver(conn)
        raw = dbapi.cursor()
        try:
            (version,) = raw.execute("PRAGMA data_version").fetchone()
        finally:
            raw.close()
        # data_version is per connection: the same number on another one means nothing.
        return id(dbapi), int(version)

    # -- writing ------------------------------------------------------------------------------

    def writes(self) -> Writes:
        return self.writer.writes()

    def write(self, conn: sa.Connection, writes: Writes) -> None:
        """Write every changed row (store.writes)."""
        self.writer.write(conn, writes)


def _has_triggers(conn: sa.Connection, migration: Migration) -> bool:
    table = migration.table
    if table.schema is not None:
        return True  # an attached database: do not guess, assume the worst
    raw = driver(conn).cursor()
    try:
        found = raw.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?", (table.name,)
        ).fetchone()
    finally:
        raw.close()
    return found is not None


def scan_descriptor(migration: Migration, dialect: sa.Dialect) -> str:
    """What a cursor walks: table, key, range (and a copy's target). A cursor recorded for
    another scan cannot be resumed."""
    described: dict[str, Any] = {
        "table": migration.table.name,
        "key": [c.name for c in migration.key],
    }
    predicate = migration.range
    if predicate is not None:
        described["range"] = _sql_text(predicate, dialect)
    if migration.target is not None:
        described["target"] = migration.target.name
    return json.dumps(described)


def describe_scan(descriptor: str) -> str:
    """A scan descriptor in words, for messages."""
    try:
        described = json.loads(descriptor)
        words = f"table {described['table']!r}, key ({', '.join(described['key'])})"
    except (ValueError, KeyError, TypeError):
        return repr(descriptor)
    words += f", range {described['range']}" if "range" in described else ", the whole table"
    if "target" in described:
        words += f", copied into {described['target']!r}"
    return words


def _sql_text(predicate: sa.ColumnElement[bool], dialect: sa.Dialect) -> str:
    """A predicate as SQL with its values, to tell one range from another."""
    try:
        return str(predicate.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    except Exception:  # noqa: BLE001 - a value with no literal form: say it with its parameters
        compiled = predicate.compile(dialect=dialect)
        return f"{compiled} {sorted(compiled.params.items(), key=str)!r}"

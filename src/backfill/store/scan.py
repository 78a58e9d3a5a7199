"""The two hot statements of a batch for one migration's table: read after a cursor, write changes.

Both are built with SQLAlchemy Core (quoting, dialect compilation) once per migration, then sent
straight to the driver with plain tuples: measured, SQLAlchemy's per-row result and JSON
processing would cost a third of the run (docs/design.md). So this module also owns decoding the
stored values for the migration function and encoding its changes back.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from backfill.definition import Migration
from backfill.errors import SchemaMismatch
from backfill.store.records import Key

Decoder = Callable[[Any], Any]


@dataclass(frozen=True)
class MalformedJSON:
    """A JSON column whose stored text does not parse; handed to the function instead of raising."""

    text: str
    error: str

    def __str__(self) -> str:
        return f"malformed JSON ({self.error})"


@dataclass(frozen=True)
class Fault:
    """A stored value the engine could not even decode (invalid UTF-8 in TEXT)."""

    field: str
    reason: str


@dataclass(frozen=True)
class ScannedRow:
    key: Key
    values: dict[str, Any]
    fault: Fault | None = None


def _decode_json(raw: Any) -> Any:
    if raw is None or not isinstance(raw, str | bytes):
        return raw
    try:
        return json.loads(raw)
    except ValueError as error:
        text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
        return MalformedJSON(text, str(error))


def _encode_json(value: Any) -> str | None:
    # SQL NULL where the function means "nothing", never the JSON literal null.
    if value is None:
        return None
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _is_json(column: sa.Column[Any]) -> bool:
    return isinstance(column.type, sa.JSON)


@dataclass(frozen=True)
class Statement:
    """SQL compiled once for the driver, with the order in which it takes its parameters."""

    sql: str
    order: tuple[int, ...] | None  # None: parameters are already in the driver's order
    constants: tuple[Any, ...]  # values SQLAlchemy bound itself (LIMIT), appended in order

    @classmethod
    def compile(
        cls, statement: sa.ClauseElement, dialect: sa.Dialect, names: Sequence[str]
    ) -> Statement:
        compiled: Any = statement.compile(dialect=dialect)
        if not compiled.positional:
            raise NotImplementedError(
                f"{dialect.name}: named parameter styles are not supported yet"
            )
        wanted = list(compiled.positiontup or ())
        ours = [n for n in wanted if n in names]
        constants = tuple(compiled.params[n] for n in wanted if n not in names)
        if wanted[: len(ours)] != ours or any(n not in names for n in ours):
            raise AssertionError(f"unexpected parameter order {wanted}")
        order = tuple(names.index(n) for n in ours)
        identity = order == tuple(range(len(names)))
        return cls(compiled.string, None if identity else order, constants)

    def params(self, values: Sequence[Any]) -> tuple[Any, ...]:
        if self.order is not None:
            values = tuple(values[i] for i in self.order)
        return tuple(values) + self.constants


class TableScan:
    def __init__(self, engine: sa.Engine, migration: Migration) -> None:
        self.migration = migration
        self.dialect = engine.dialect
        table = migration.table
        self.columns = migration.read_columns
        self.names = [c.name for c in self.columns]
        self.key_width = len(migration.key)
        # Drivers that hand back JSON as text (SQLite) need decoding; psycopg decodes jsonb itself.
        decode_text = self.dialect.name == "sqlite"
        self.decoders: list[Decoder | None] = [
            _decode_json if _is_json(c) and decode_text else None for c in self.columns
        ]
        self.json_names = {c.name for c in table.columns if _is_json(c)}
        self._select = sa.select(*self.columns)
        self._order = [c.asc() for c in migration.key]
        self._reads: dict[tuple[bool, int], Statement] = {}
        self._writes: dict[tuple[str, ...], Statement] = {}

    # -- reading ------------------------------------------------------------------------------

    def _after(self, statement: sa.Select[Any], cursor_given: bool) -> sa.Select[Any]:
        if not cursor_given:
            return statement
        key = self.migration.key
        params = [sa.bindparam(f"k{i}", type_=c.type) for i, c in enumerate(key)]
        if len(key) == 1:
            return statement.where(key[0] > params[0])
        return statement.where(sa.tuple_(*key) > sa.tuple_(*params))

    def _key_names(self, cursor_given: bool) -> list[str]:
        return [f"k{i}" for i in range(self.key_width)] if cursor_given else []

    def _read_statement(self, cursor_given: bool, limit: int) -> Statement:
        cached = self._reads.get((cursor_given, limit))
        if cached is None:
            statement = self._after(self._select, cursor_given).order_by(*self._order).limit(limit)
            if self.dialect.name == "postgresql":
                statement = statement.with_for_update()
            cached = Statement.compile(statement, self.dialect, self._key_names(cursor_given))
            self._reads[(cursor_given, limit)] = cached
        return cached

    def read(self, conn: sa.Connection, cursor: Key | None, limit: int) -> list[ScannedRow]:
        """The next `limit` rows after `cursor` in key order, decoded for the function."""
        statement = self._read_statement(cursor is not None, limit)
        sql, params = statement.sql, statement.params(cursor or ())
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        raw = dbapi.cursor()
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
        return [self._scanned(values) for values in fetched]

    def _scanned(self, values: Sequence[Any], fault: Fault | None = None) -> ScannedRow:
        decoded = [
            value if decoder is None else decoder(value)
            for value, decoder in zip(values, self.decoders, strict=True)
        ]
        return ScannedRow(
            tuple(decoded[: self.key_width]), dict(zip(self.names, decoded, strict=True)), fault
        )

    def _read_undecodable(
        self, conn: sa.Connection, cursor: Key | None, limit: int
    ) -> list[ScannedRow]:
        """SQLite only: some TEXT in this batch is not UTF-8. Read bytes and decode per value,
        so the bad row and field can be named instead of the whole batch failing to fetch."""
        kinds = [sa.func.typeof(c) for c in self.columns]
        selected = self._after(sa.select(*self.columns, *kinds), cursor is not None)
        statement = Statement.compile(
            selected.order_by(*self._order).limit(limit),
            self.dialect,
            self._key_names(cursor is not None),
        )
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
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
        rows = []
        for values in fetched:
            stored, kinds_of = list(values[:width]), values[width:]
            fault = None
            for i, kind in enumerate(kinds_of):
                if kind == b"text":
                    try:
                        stored[i] = stored[i].decode("utf-8")
                    except UnicodeDecodeError as error:
                        fault = fault or Fault(
                            self.names[i],
                            f"is not valid UTF-8 ({error.reason} at byte {error.start})",
                        )
                        stored[i] = None
            rows.append(self._scanned(stored, fault))
        return rows

    # -- writing ------------------------------------------------------------------------------

    def check_columns(self, changed: Iterable[str]) -> str | None:
        """The first name that is not a column of the table, if any."""
        for name in changed:
            if name not in self.migration.table.c:
                return name
        return None

    def _write_statement(self, names: tuple[str, ...]) -> Statement:
        cached = self._writes.get(names)
        if cached is None:
            table = self.migration.table
            statement = sa.update(table).values(
                {
                    table.c[n]: sa.bindparam(f"v{i}", type_=table.c[n].type)
                    for i, n in enumerate(names)
                }
            )
            for i, column in enumerate(self.migration.key):
                statement = statement.where(column == sa.bindparam(f"k{i}", type_=column.type))
            params = [f"v{i}" for i in range(len(names))] + self._key_names(True)
            cached = Statement.compile(statement, self.dialect, params)
            self._writes[names] = cached
        return cached

    def encode(self, name: str, value: Any) -> Any:
        return _encode_json(value) if name in self.json_names else value

    def write(self, conn: sa.Connection, changes: list[tuple[Key, dict[str, Any]]]) -> None:
        """Write every changed row: one prepared statement per set of changed columns, executed
        by the driver over the whole batch (SQLite has no round trip to save beyond that)."""
        groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for key, values in changes:
            names = tuple(values)
            encoded = tuple(self.encode(n, values[n]) for n in names)
            groups.setdefault(names, []).append(encoded + key)
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        raw = dbapi.cursor()
        try:
            for names, rows in groups.items():
                statement = self._write_statement(names)
                if statement.order is not None or statement.constants:
                    rows = [statement.params(row) for row in rows]
                raw.executemany(statement.sql, rows)
        finally:
            raw.close()


def check_table(engine: sa.Engine, migration: Migration) -> None:
    """Refuse, with one sentence, a migration whose table or columns are not in the database."""
    table = migration.table
    inspector = sa.inspect(engine)
    if not inspector.has_table(table.name, schema=table.schema):
        raise SchemaMismatch(
            f"migration {migration.name!r}: table {table.name!r} does not exist in the database"
        )
    present = {c["name"] for c in inspector.get_columns(table.name, schema=table.schema)}
    for column in migration.read_columns:
        if column.name not in present:
            role = "key column" if column.primary_key else "column"
            raise SchemaMismatch(
                f"migration {migration.name!r}: table {table.name!r} has no {role} {column.name!r}"
            )


def scan_descriptor(migration: Migration) -> str:
    """What a cursor walks; a cursor recorded for another scan cannot be resumed."""
    return json.dumps({"table": migration.table.name, "key": [c.name for c in migration.key]})

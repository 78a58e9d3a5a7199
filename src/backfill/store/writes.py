"""The write of a batch's changed rows, one statement per group of rows changing the same
columns, built once per migration for its dialect and sent straight to the driver:

- SQLite: `UPDATE ... FROM (VALUES ...)` (one driver call: it releases the GIL for the whole
  statement);
- PostgreSQL with psycopg 3: `UPDATE ... FROM unnest(<binary arrays>)`;
- MariaDB and MySQL: `UPDATE ... JOIN (<the rows as a derived table>)`;

each falling back to one UPDATE per row where the set-based form could not store the same
values. (Reading the rows is store.scan's.)
"""

from __future__ import annotations

import datetime
import sqlite3
from collections.abc import Callable
from decimal import Decimal
from itertools import chain
from typing import Any

import sqlalchemy as sa

from backfill.definition import Migration
from backfill.store.database import driver
from backfill.store.dialects import MYSQL
from backfill.store.statement import Statement
from backfill.store.values import Writes, is_json

_ROWS_PER_STATEMENT = 5000
# MySQL: the Python types PyMySQL renders as one kind of literal each (a bool as an integer). A
# column of a group whose values are all of one of these kinds (or NULL) keeps, in a derived
# table, exactly the value its literal has in a row-by-row UPDATE.
_LITERAL_KINDS = frozenset(
    {str, int, float, Decimal, bytes, datetime.datetime, datetime.date, datetime.time}
    | {datetime.timedelta}
)


class TableWrites:
    """The writes of one migration's changes to its table."""

    def __init__(self, engine: sa.Engine, migration: Migration) -> None:
        self.migration = migration
        self.dialect = engine.dialect
        self.key_width = len(migration.key)
        self.key_names = frozenset(c.name for c in migration.key)
        self.json_names = frozenset(c.name for c in migration.table.columns if is_json(c))
        self._writes: dict[tuple[str, ...], Statement] = {}
        self._joined: dict[tuple[tuple[str, ...], int], str] = {}
        self._derived: dict[tuple[tuple[str, ...], int, bool], str] = {}
        self._derived_settings: tuple[int, bool] | None = None  # MySQL; None: not asked yet
        key = migration.key
        self._integer_key = len(key) == 1 and isinstance(key[0].type, sa.Integer)
        self._unnests: dict[tuple[str, ...], str | None] = {}

    def writes(self) -> Writes:
        return Writes(self.json_names)

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
            params = [f"v{i}" for i in range(len(names))] + [f"k{i}" for i in range(self.key_width)]
            cached = Statement.compile(statement, self.dialect, params)
            self._writes[names] = cached
        return cached

    def write(self, conn: sa.Connection, writes: Writes) -> None:
        """Write every changed row, a group of rows changing the same columns at a time."""
        raw = driver(conn).cursor()
        try:
            for names, rows in writes.groups.items():
                if self.dialect.name == "sqlite" and sqlite3.sqlite_version_info >= (3, 33):
                    self._write_joined(raw, names, rows)
                    continue
                unnest = self._unnest_sql(names)
                if unnest is not None and self._write_unnest(raw, unnest, names, rows):
                    continue
                if self.dialect.name in MYSQL and self._write_derived(raw, names, rows):
                    continue
                self._write_each(raw, names, rows)
        finally:
            raw.close()

    def _write_each(self, raw: Any, names: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        """One `UPDATE ... WHERE key = ...` per row (`executemany`): where no set-based form
        stores exactly what it stores."""
        statement = self._write_statement(names)
        if statement.order is not None or statement.constants:
            rows = [statement.params(row) for row in rows]
        raw.executemany(statement.sql, rows)

    def _unnest_sql(self, names: tuple[str, ...]) -> str | None:
        """PostgreSQL with psycopg 3: `UPDATE t SET c = _changes.v0 FROM unnest(%b::JSONB[],
        %b::INTEGER[]) AS _changes(v0, k0) WHERE t.k = _changes.k0`, a whole group of rows in one
        statement and one round trip. Arrays go in binary (psycopg's text format escapes each
        element in Python: measured, slower than the row-by-row `executemany` it replaces).
        None where that cannot be done faithfully: rows then go one by one."""
        if names in self._unnests:
            return self._unnests[names]
        cached = None
        if self.dialect.name == "postgresql" and self.dialect.driver == "psycopg":
            table = self.migration.table
            columns = [table.c[n] for n in names] + list(self.migration.key)
            types = [_array_element_type(c, self.dialect) for c in columns]
            if all(types):
                quote, target = _format_quoting(self.dialect, table)
                keys = [f"k{i}" for i in range(self.key_width)]
                aliases = [f"v{i}" for i in range(len(names))] + keys
                arrays = ", ".join(f"%b::{t}[]" for t in types)
                sets = ", ".join(f"{quote(n)} = _changes.v{i}" for i, n in enumerate(names))
                match = " AND ".join(
                    f"{target}.{quote(c.name)} = _changes.{k}"
                    for c, k in zip(self.migration.key, keys, strict=True)
                )
                cached = (
                    f"UPDATE {target} SET {sets} FROM unnest({arrays}) "
                    f"AS _changes({', '.join(aliases)}) WHERE {match}"
                )
        self._unnests[names] = cached
        return cached

    def _write_unnest(
        self, raw: Any, sql: str, names: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> bool:
        """Send a group as one `UPDATE ... FROM unnest(...)`; False, with nothing sent, when
        psycopg cannot make arrays of its values (mixed Python types in a column, say ints in
        a float column): the caller then writes the group row by row, as before."""
        arrays = [list(column) for column in zip(*rows, strict=True)]
        for name, values in zip(names, arrays, strict=False):
            # A list where a plain column expects a scalar: unnest would flatten it into
            # neighbouring rows' values. Only JSON columns hold documents (encoded already).
            if name not in self.json_names and any(type(v) in (list, tuple) for v in values):
                return False
        try:
            raw.execute(sql, arrays)
        except Exception as error:
            # Raised while adapting the parameters, before anything reached the server (no
            # SQLSTATE, the transaction still usable); a server error is the batch's.
            if getattr(error, "sqlstate", None) is None and _usable(raw):
                return False
            raise
        return True

    def _write_joined(self, raw: Any, names: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        """SQLite: one `UPDATE ... FROM (VALUES ...)` for the group (or as many rows as SQLite
        takes parameters for). Measured alone, it costs SQLite about a fifth more than
        `executemany` (the rows are materialised first), but it is one driver call, which
        releases the GIL for the whole statement: `executemany` takes the GIL back after every
        row, and would wait for it each time while the next batch is decided in the other
        thread."""
        width = len(names) + self.key_width
        limit = raw.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        step = max(1, min(_ROWS_PER_STATEMENT, limit // width))
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            raw.execute(self._joined_sql(names, len(chunk)), list(chain.from_iterable(chunk)))

    def _joined_sql(self, names: tuple[str, ...], count: int) -> str:
        cached = self._joined.get((names, count))
        if cached is None:
            quote = self.dialect.identifier_preparer.quote
            table = self.dialect.identifier_preparer.format_table(self.migration.table)
            keys = [c.name for c in self.migration.key]
            columns = [f"v{i}" for i in range(len(names))] + [f"k{i}" for i in range(len(keys))]
            row = "(" + ", ".join("?" * len(columns)) + ")"
            sets = ", ".join(f"{quote(n)} = _changes.v{i}" for i, n in enumerate(names))
            match = " AND ".join(f"{table}.{quote(k)} = _changes.k{i}" for i, k in enumerate(keys))
            cached = (
                f"WITH _changes({', '.join(columns)}) AS (VALUES {', '.join([row] * count)}) "
                f"UPDATE {table} SET {sets} FROM _changes WHERE {match}"
            )
            if len(self._joined) < 64:  # a few sizes recur (full chunks); others are one-offs
                self._joined[(names, count)] = cached
        return cached

    def _write_derived(self, raw: Any, names: tuple[str, ...], rows: list[tuple[Any, ...]]) -> bool:
        """MySQL and MariaDB: the group in as few `UPDATE ... JOIN (<rows>) AS _changes` as the
        server's packet size allows (see `_derived_sql`), where PyMySQL's `executemany` sends
        one UPDATE per row. False, with nothing sent, where that cannot store exactly what those
        would: a group that changes a key column (one statement meets the unique keys in
        another order), a column holding values of more than one kind (see `_literals`), or
        another driver than PyMySQL (whose literals `_literals` makes).
        The rest of a group goes row by row from a chunk of one row (a value too large to share
        a statement), and from a chunk whose keys the server cannot compare with the column's
        (a key column in another character set, given non-ASCII keys: "Illegal mix of
        collations", raised before anything is written)."""
        if self.dialect.driver != "pymysql" or self.key_names.intersection(names):
            return False
        literals = _literals(raw.connection, rows, len(names))
        if literals is None:
            return False
        budget, walk = self._derived_limits(raw)
        walk = walk and self._integer_key and all(type(row[-1]) is int for row in rows)
        start, size = 0, 0
        for end, row in enumerate(literals + [()]):
            length = sum(map(len, row)) + 2 * len(row)
            full = size + length > budget or end - start == _ROWS_PER_STATEMENT
            if end > start and (full or end == len(literals)):
                chunk = rows[start:end]
                if len(chunk) == 1:
                    self._write_each(raw, names, chunk)
                elif not _send(
                    raw, self._derived_sql(names, len(chunk), walk), literals[start:end], walk
                ):
                    self._write_each(raw, names, rows[start:])
                    return True
                start, size = end, 0
            size += length
        return True

    def _derived_limits(self, raw: Any) -> tuple[int, bool]:
        """A set-based write's size in bytes, a quarter of the packet the server (and PyMySQL)
        accept, for the SQL around the values and the encoding of the text; and whether the
        target table may be walked first (MariaDB, derived tables given an index)."""
        if self._derived_settings is None:
            raw.execute("SELECT @@max_allowed_packet, @@optimizer_switch")
            packet, switches = raw.fetchone()
            packet = min(int(packet), int(getattr(raw.connection, "max_allowed_packet", packet)))
            mariadb = bool(getattr(self.dialect, "is_mariadb", False))
            walk = mariadb and "derived_with_keys=on" in str(switches)
            self._derived_settings = packet // 4, walk
        return self._derived_settings

    def _derived_sql(self, names: tuple[str, ...], count: int, walk: bool) -> str:
        """MariaDB: `UPDATE t AS _target JOIN (SELECT %s AS v0, %s AS k0 UNION ALL VALUES
        (%s, %s), ...) AS _changes ON _target.k = _changes.k0 SET _target.c = _changes.v0`.
        MySQL (no table value constructor before 8.0.19, another syntax since): `UNION ALL
        SELECT %s, %s` for each row instead. Each `%s` is a literal of `_literals`, put in by
        `_send` (PyMySQL would escape every value again).

        The derived table's column types are aggregated over all its rows (a longer string
        after a short one widens it, NULL first takes the others' type), so each value stays
        what its literal is, and the assignment to the column is the row-by-row UPDATE's (a
        value too long raises 1406, as there). The keys keep their literals' coercibility, so
        they compare in the column's collation, as `WHERE k = '...'` does.

        With `walk` (one integer key, on MariaDB with derived_with_keys), `STRAIGHT_JOIN ...
        WHERE _target.k BETWEEN %s AND %s`: the table's rows are walked over the chunk's key
        range and each is looked up in the derived table's index, so each row is updated as it
        is read. Otherwise the derived table comes first and each of its rows is looked up in
        the table by key (with any character set: a lookup the other way round scanned the
        derived table for each row when the key columns' character sets differed), and MariaDB
        keeps the new values in a temporary table until the join is done. Measured on MariaDB
        10.11, 2,000 of the flagship's rows to a statement: 47 ms walked, 62 ms not, 300 ms an
        UPDATE per row; the table value constructor was 15% cheaper than SELECTs."""
        cached = self._derived.get((names, count, walk))
        if cached is None:
            quote, table = _format_quoting(self.dialect, self.migration.table)
            keys = [quote(c.name) for c in self.migration.key]
            aliases = [f"v{i}" for i in range(len(names))] + [f"k{i}" for i in range(len(keys))]
            first = "SELECT " + ", ".join(f"%s AS {a}" for a in aliases)
            row = ", ".join(["%s"] * len(aliases))
            if getattr(self.dialect, "is_mariadb", False):
                rest = " UNION ALL VALUES " + ", ".join([f"({row})"] * (count - 1))
            else:
                rest = f" UNION ALL SELECT {row}" * (count - 1)
            sets = ", ".join(f"_target.{quote(n)} = _changes.v{i}" for i, n in enumerate(names))
            match = " AND ".join(f"_target.{k} = _changes.k{i}" for i, k in enumerate(keys))
            join = "STRAIGHT_JOIN" if walk else "JOIN"
            cached = (
                f"UPDATE {table} AS _target {join} ({first}{rest}) AS _changes "
                f"ON {match} SET {sets}"
            )
            if walk:
                cached += f" WHERE _target.{keys[0]} BETWEEN %s AND %s"
            if len(self._derived) < 64:  # a few sizes recur (full chunks); others are one-offs
                self._derived[(names, count, walk)] = cached
        return cached


def _literals(
    connection: Any, rows: list[tuple[Any, ...]], values: int
) -> list[tuple[str, ...]] | None:
    """Each value of `rows` as the SQL literal PyMySQL puts in a row-by-row UPDATE, or None
    where a derived table would not keep every value as that literal is: a column holding
    more than one kind of value (an integer and a string come out of it as two strings), a
    type PyMySQL renders in no single way, numbers too wide for one DECIMAL (see
    `_exact_decimal`).

    The strings of the first `values` columns (the new values) go as `_utf8mb4 X'<their
    UTF-8 in hex>'` on a utf8mb4 connection: the same string in the same character set as the
    quoted literal, measured eight times cheaper to make than PyMySQL's escaping (a Python
    pass over each character, a third of the write). Keys stay quoted: a quoted ASCII literal
    also compares with a key column in another character set."""
    escape = connection.escape
    hex_text = getattr(connection, "charset", None) == "utf8mb4"
    encoding = getattr(connection, "encoding", "utf8")
    # PyMySQL's own encoder of ints is str(): said without its calls, unless replaced.
    encode_int = connection.encoders.get(int)
    digits = getattr(encode_int, "__module__", "") + "." + getattr(encode_int, "__name__", "")
    digits_as_str = digits == "pymysql.converters.escape_int"
    columns: list[list[str]] = []
    for position, column in enumerate(zip(*rows, strict=True)):
        kinds = set(map(type, column))
        kinds.discard(type(None))
        if bool in kinds:
            kinds.discard(bool)
            kinds.add(int)
        if len(kinds) > 1 or not kinds <= _LITERAL_KINDS:
            return None
        if kinds == {str} and hex_text and position < values:
            columns.append(
                ["NULL" if v is None else f"_utf8mb4 X'{v.encode(encoding).hex()}'" for v in column]
            )
            continue
        if kinds == {int} and digits_as_str:
            rendered = [
                str(v) if type(v) is int else "NULL" if v is None else escape(v) for v in column
            ]
        else:
            rendered = ["NULL" if v is None else escape(v) for v in column]
        if kinds & {int, Decimal} and not _exact_decimal(rendered, Decimal in kinds):
            return None
        columns.append(rendered)
    return list(zip(*columns, strict=True))


def _exact_decimal(literals: list[str], fractions: bool) -> bool:
    """Integer or Decimal literals whose common type in a derived table is an exact DECIMAL:
    at most 65 digits with the most digits before the point and the most after it (38 at
    most). A wider one is out of range there (clamped to 99...9 outside strict mode), where
    each literal alone is not."""
    if not fractions:  # integers (or NULL): a sign or the NULL's letters only count against
        return max(map(len, literals)) <= 65
    whole, fraction = 0, 0
    for literal in literals:
        before, _, after = literal.lstrip("-").partition(".")
        whole, fraction = max(whole, len(before)), max(fraction, len(after))
    return whole + fraction <= 65 and fraction <= 38


def _send(raw: Any, sql: str, literals: list[tuple[str, ...]], walk: bool) -> bool:
    """Run one set-based MySQL write; False, with nothing written, when the server cannot
    compare the keys with the key columns (1267, 1270, 1271: "Illegal mix of collations",
    raised before the statement runs; the transaction goes on)."""
    params = list(chain.from_iterable(literals))
    if walk:  # one integer key, rendered as its digits
        keys = [int(row[-1]) for row in literals]
        params += [str(min(keys)), str(max(keys))]
    try:
        raw.execute(sql % tuple(params))
    except Exception as error:
        if error.args[:1] in ((1267,), (1270,), (1271,)):
            return False
        raise
    return True


def _array_element_type(column: sa.Column[Any], dialect: sa.Dialect) -> str | None:
    """The type an array parameter for `column` is cast to, with no length or precision: an
    explicit cast to VARCHAR(16) silently truncates where assigning to the column raises, so
    strings go as TEXT and numerics as NUMERIC, and the column's own type applies on
    assignment. None for a type this cannot be said of safely (array columns, which unnest
    would flatten; types with modifiers; types that do not compile)."""
    type_: Any = column.type.dialect_impl(dialect)
    while isinstance(type_, sa.TypeDecorator):
        type_ = type_.impl_instance.dialect_impl(dialect)
    if isinstance(type_, sa.ARRAY):
        return None
    if isinstance(type_, sa.String) and not isinstance(type_, sa.Enum):
        return "TEXT"
    if isinstance(type_, sa.Numeric) and not isinstance(type_, sa.Float):
        return "NUMERIC"
    try:
        compiled: str = type_.compile(dialect=dialect)
    except Exception:  # noqa: BLE001 - a type we cannot name
        return None
    return None if "(" in compiled or "[" in compiled else compiled


def _usable(raw: Any) -> bool:
    """psycopg: the connection is still inside a transaction that has not failed."""
    status = getattr(getattr(raw.connection, "info", None), "transaction_status", None)
    return getattr(status, "name", None) == "INTRANS"


def _format_quoting(dialect: sa.Dialect, table: sa.Table) -> tuple[Callable[[str], str], str]:
    """How to quote a column name, and the table's quoted name, in SQL for the `format`
    paramstyle (psycopg, PyMySQL): a `%` in a name must not read as a placeholder. SQLAlchemy's
    preparer doubles it already for those paramstyles (not for the others): double it once."""
    preparer = dialect.identifier_preparer
    doubled = "%%" in preparer.quote("%")

    def quote(name: str) -> str:
        quoted = preparer.quote(name)
        return quoted if doubled else quoted.replace("%", "%%")

    target = preparer.format_table(table)
    return quote, target if doubled else target.replace("%", "%%")

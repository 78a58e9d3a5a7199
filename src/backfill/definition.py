"""What a migration is: a table, a key, a range, a function and what must hold before it may run.

This module knows no database connection: it only describes work that the runner later does
(a table given by name is reflected by the runner, on its own database).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from enum import StrEnum
from typing import Any, Final

import sqlalchemy as sa

Row = dict[str, Any]


class _Delete:
    """Marker returned for a field the migration wants cleared (SQL NULL)."""

    _instance: _Delete | None = None

    def __new__(cls) -> _Delete:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DELETE"


DELETE: Final = _Delete()


@dataclass(frozen=True)
class Keep:
    """Returned by a migration function for a row it deliberately leaves alone, with the reason.

    Such rows are counted as `kept` and listed by `verify`, so a careful migration (a cleanup that
    refuses to drop data it cannot account for) never loses a row silently.
    """

    reason: str


@dataclass(frozen=True)
class Context:
    """The second argument of a migration function that takes two: the batch's own work.

    `conn` is the connection of the batch's transaction (SQLAlchemy Core): what the function
    writes through it commits with the batch and its cursor, or rolls back with it. Under
    `--on-error skip` each row (each batch call, for a batch function) runs in a savepoint, so
    a row that raises leaves nothing behind. `dry_run` is true in dry runs, `verify` and
    `count`, whose transactions are rolled back whatever the function writes.
    """

    conn: sa.Connection  # this module opens none: the runner hands the batch's own
    migration: str
    dry_run: bool = False


# What a migration function may return for one row.
Change = Mapping[str, Any] | Keep | None
# A row function takes the row, or the row and a Context. A batch function takes the batch's
# rows (and a Context) and returns a change per row, in order, or the number of rows it
# changed itself through `Context.conn` (one set-based statement per batch, say).
MigrationFunction = Callable[..., Any]


class Form(StrEnum):
    ROW = "row"  # the function takes one row
    BATCH = "batch"  # the function takes the batch's rows


class Existing(StrEnum):
    """What a copy does with a target row that is already there (the app wrote it, or an earlier
    run did): KEEP it as it is, or UPDATE it to what the function gives."""

    KEEP = "keep"
    UPDATE = "update"


@dataclass(frozen=True)
class Prerequisite:
    """Another migration that must have succeeded, long enough ago and with nothing left."""

    migration: str
    min_age: timedelta = timedelta(0)
    verified: bool = True


@dataclass(frozen=True)
class SqlChange:
    """The migration function said in SQL, for one dialect: what it writes and where.

    `values` maps each column the function writes to a SQLAlchemy Core expression over the
    row's current columns; `where` is the predicate of exactly the rows the function changes.
    The engine then updates each batch in the database (`UPDATE ... SET <values> WHERE <key in
    the batch's locked range> AND <where>`) instead of reading its rows into Python. Same
    transactions, cursor, locks and lease checks; `changed` counts the rows `where` selects.

    The function stays the truth: `verify`, `count`, dry runs and readers' fallbacks run it,
    and a batch the database rejects (a cast that fails on bad input) is done again through
    it, so a bad row is named, or recorded under `--on-error skip`, exactly as without SQL. A
    migration must declare only what it has shown equivalent on its data (a test comparing
    both paths); rows it would `Keep` cannot be told apart in SQL.

    `guard`, when given, is the predicate of the rows the SQL handles faithfully (say, values
    of the storage class it expects, where SQLite lets any value into any column): a batch
    with a row in its range outside it is done through the function instead, which names or
    records the bad row. On SQLite the engine also sends there every batch holding TEXT that
    is not valid UTF-8 in a column the function reads (it could not even hand that row over).
    """

    values: Mapping[str, Any]
    where: Any  # a boolean SQLAlchemy expression; sa.true() for every row in the range
    # Rows per batch when batches are decided in the database (no Python per row, so larger
    # batches pay off); None: the migration's batch_size. `run --batch-size` overrides both.
    batch_size: int | None = None
    guard: Any = None  # a boolean SQLAlchemy expression; None: every row

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("SqlChange needs at least one column in `values`")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.where is None:
            raise ValueError(
                "SqlChange needs `where`, the rows the function changes (sa.true() for all)"
            )


# A SqlChange, or a function of the migration's table that returns one (built when first needed;
# handy for `table.c.<name>`).
DeclaredSql = SqlChange | Callable[[sa.Table], SqlChange]
# Per dialect name, as SQLAlchemy names it ("postgresql", "sqlite", "mysql", "mariadb"). Which
# declaration serves a dialect is store.dialects.declared_for's to say.
SqlChanges = Mapping[str, DeclaredSql]


# A range: a boolean SQLAlchemy expression over the table, or a function of the table giving one.
Range = Any


@dataclass(frozen=True)
class Migration:
    name: str
    table: sa.Table
    function: MigrationFunction
    batch_size: int = 100
    # Columns read for the function; the key is always read. Empty means every column.
    columns: tuple[str, ...] = ()
    requires: Prerequisite | None = None
    description: str = ""
    sql: SqlChanges = field(default_factory=dict, hash=False, compare=False)
    # Only rows matching this predicate are scanned (None: the whole table).
    where: Range = field(default=None, hash=False, compare=False)
    # Columns of a unique, index-backed key to walk in order; empty: the primary key.
    key_columns: tuple[str, ...] = ()
    form: Form = Form.ROW
    takes_context: bool = False
    # A copy writes the function's rows into `target` (inserted, never duplicated) and leaves
    # the scanned table as it is.
    target: sa.Table | None = field(default=None, hash=False, compare=False)
    existing: Existing = Existing.KEEP
    # True while `table` (and `target`) are names still to be reflected from the database.
    reflect: bool = False

    def default_batch_size(self, change: SqlChange | None = None) -> int:
        """Rows per batch unless the run says otherwise: the SqlChange's own when batches are
        decided in the database by `change`, else the migration's."""
        if change is not None and change.batch_size is not None:
            return change.batch_size
        return self.batch_size

    def checked_sql(self, dialect: str, declared: DeclaredSql | None) -> SqlChange | None:
        """`declared`, this migration's SQL for `dialect` (None: it declares none), built and
        checked against the table."""
        if declared is None:
            return None
        change = declared if isinstance(declared, SqlChange) else declared(self.table)
        if not isinstance(change, SqlChange):
            raise TypeError(
                f"migration {self.name!r}: sql[{dialect!r}] returned "
                f"{type(change).__name__}, not a SqlChange"
            )
        keys = {c.name for c in self.key}
        for column in change.values:
            if column not in self.table.c:
                raise ValueError(
                    f"migration {self.name!r}: sql[{dialect!r}] writes {column!r}, "
                    f"which is not a column of table {self.table.name!r}"
                )
            if column in keys:
                raise ValueError(
                    f"migration {self.name!r}: sql[{dialect!r}] may not write key column "
                    f"{column!r} (batches are ranges of the key)"
                )
        return change

    @property
    def cannot_undo(self) -> str | None:
        """Why a run of it cannot log its changes to undo them (`--undo`); None when it can."""
        if self.takes_context:
            return (
                f"migration {self.name!r} takes a Context: what its function writes through "
                "the connection cannot be undone"
            )
        return None

    @property
    def key(self) -> tuple[sa.Column[Any], ...]:
        if self.key_columns:
            return tuple(self.table.c[n] for n in self.key_columns)
        return tuple(self.table.primary_key.columns)

    @property
    def read_columns(self) -> tuple[sa.Column[Any], ...]:
        key = self.key
        names = self.columns or tuple(c.name for c in self.table.columns)
        rest = tuple(self.table.c[n] for n in names if n not in {k.name for k in key})
        return key + rest

    @property
    def range(self) -> sa.ColumnElement[bool] | None:
        """The predicate restricting the scan, built over this migration's table."""
        where = self.where
        predicate: sa.ColumnElement[bool] | None = where(self.table) if callable(where) else where
        return predicate

    @property
    def in_place(self) -> bool:
        """The function's changes are written back to the scanned rows (not a copy)."""
        return self.target is None

    def resolved(self, tables: Callable[[str, str | None], sa.Table]) -> Migration:
        """This migration over real tables: names looked up with `tables(name, schema)`."""
        if not self.reflect:
            return self
        table = tables(self.table.name, self.table.schema)
        target = self.target
        if target is not None:
            target = tables(target.name, target.schema)
        migration = replace(self, table=table, target=target, reflect=False)
        migration.check()
        return migration

    def check(self) -> None:
        """Refuse a definition that cannot work on its tables (raised at definition time, or
        when tables given by name have been reflected)."""
        table = self.table
        if not self.key:
            raise ValueError(f"table {table.name!r} has no primary key to order batches by")
        for column in (*self.columns, *self.key_columns):
            if column not in table.c:
                raise ValueError(f"table {table.name!r} has no column {column!r}")
        if self.target is not None:
            if not self.target.primary_key.columns:
                raise ValueError(
                    f"target table {self.target.name!r} has no primary key: copies are made "
                    "idempotent by the target's key"
                )
            if self.sql:
                raise ValueError(f"migration {self.name!r}: a copy cannot declare `sql`")
        for dialect, declared in self.sql.items():
            if isinstance(declared, SqlChange):
                self.checked_sql(dialect, declared)  # checked now; a function is checked when used

"""What a migration is: a table, a key, a function and what must hold before it may run.

This module knows no database connection: it only describes work that the runner later does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

import sqlalchemy as sa

from backfill.errors import UnknownMigration

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


# What a migration function may return for one row.
Change = Mapping[str, Any] | Keep | None
MigrationFunction = Callable[[Row], Change]


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
    """

    values: Mapping[str, Any]
    where: Any  # a boolean SQLAlchemy expression; sa.true() for every row in the range
    # Rows per batch when batches are decided in the database (no Python per row, so larger
    # batches pay off); None: the migration's batch_size. `run --batch-size` overrides both.
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("SqlChange needs at least one column in `values`")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.where is None:
            raise ValueError(
                "SqlChange needs `where`, the rows the function changes (sa.true() for all)"
            )


# Per dialect name ("postgresql", "sqlite"): a SqlChange, or a function of the migration's
# table that returns one (built when first needed; handy for `table.c.<name>`).
SqlChanges = Mapping[str, SqlChange | Callable[[sa.Table], SqlChange]]


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

    def default_batch_size(self, dialect: str, *, sql: bool = True) -> int:
        """Rows per batch unless the run says otherwise: the SqlChange's own when batches on
        `dialect` are decided in the database (`sql`), else the migration's."""
        change = self.sql_change(dialect) if sql else None
        if change is not None and change.batch_size is not None:
            return change.batch_size
        return self.batch_size

    def sql_change(self, dialect: str) -> SqlChange | None:
        """The declared SQL equivalent for `dialect`, checked against the table; None if none."""
        declared = self.sql.get(dialect)
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
    def key(self) -> tuple[sa.Column[Any], ...]:
        return tuple(self.table.primary_key.columns)

    @property
    def read_columns(self) -> tuple[sa.Column[Any], ...]:
        key = self.key
        names = self.columns or tuple(c.name for c in self.table.columns)
        rest = tuple(self.table.c[n] for n in names if n not in {k.name for k in key})
        return key + rest


@dataclass
class Migrations:
    """The registry of an application's migrations, in definition order."""

    _by_name: dict[str, Migration] = field(default_factory=dict)

    def migration(
        self,
        *,
        table: sa.Table,
        batch_size: int = 100,
        name: str | None = None,
        columns: Sequence[str] = (),
        requires: Prerequisite | None = None,
        sql: SqlChanges | None = None,
    ) -> Callable[[MigrationFunction], MigrationFunction]:
        """Register the decorated function as a migration over `table`; `sql` optionally
        says the same change in SQL per dialect (see SqlChange)."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not table.primary_key.columns:
            raise ValueError(f"table {table.name!r} has no primary key to order batches by")

        def register(function: MigrationFunction) -> MigrationFunction:
            migration_name = name or function.__name__
            if migration_name in self._by_name:
                raise ValueError(f"migration {migration_name!r} is defined twice")
            for column in columns:
                if column not in table.c:
                    raise ValueError(f"table {table.name!r} has no column {column!r}")
            migration = Migration(
                name=migration_name,
                table=table,
                function=function,
                batch_size=batch_size,
                columns=tuple(columns),
                requires=requires,
                description=(function.__doc__ or "").strip().split("\n")[0],
                sql=dict(sql or {}),
            )
            for dialect, declared in migration.sql.items():
                if isinstance(declared, SqlChange):
                    migration.sql_change(dialect)  # checked now; a function is checked when used
            self._by_name[migration_name] = migration
            return function

        return register

    def __getitem__(self, name: str) -> Migration:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(self._by_name) or "none"
            raise UnknownMigration(f"unknown migration {name!r} (defined: {known})") from None

    def __iter__(self) -> Iterator[Migration]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def names(self) -> list[str]:
        return list(self._by_name)

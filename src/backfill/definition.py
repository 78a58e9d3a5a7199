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
class Migration:
    name: str
    table: sa.Table
    function: MigrationFunction
    batch_size: int = 100
    # Columns read for the function; the key is always read. Empty means every column.
    columns: tuple[str, ...] = ()
    requires: Prerequisite | None = None
    description: str = ""

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
    ) -> Callable[[MigrationFunction], MigrationFunction]:
        """Register the decorated function as a migration over `table`."""
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
            self._by_name[migration_name] = Migration(
                name=migration_name,
                table=table,
                function=function,
                batch_size=batch_size,
                columns=tuple(columns),
                requires=requires,
                description=(function.__doc__ or "").strip().split("\n")[0],
            )
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

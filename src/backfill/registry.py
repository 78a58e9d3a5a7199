"""The registry of an application's migrations and the decorators that fill it.

Each decorator turns a function into a `Migration` (backfill.definition) and checks what can be
checked without a database; a table given by name is checked once the runner has reflected it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from backfill.definition import (
    Existing,
    Form,
    Migration,
    MigrationFunction,
    Prerequisite,
    Range,
    SqlChanges,
)
from backfill.errors import UnknownMigration
from backfill.views import View, checked


def _takes_context(function: Callable[..., Any]) -> bool:
    """Whether `function` takes a second positional argument (the Context)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in positional)


def _named(table: sa.Table | str) -> tuple[sa.Table, bool]:
    """A Table as given, or a stand-in for one given by name (reflected by the runner)."""
    if isinstance(table, sa.Table):
        return table, False
    schema, _, name = table.rpartition(".") if "." in table else (None, "", table)
    return sa.Table(name, sa.MetaData(), schema=schema or None), True


@dataclass
class Migrations:
    """The registry of an application's migrations, in definition order."""

    _by_name: dict[str, Migration] = field(default_factory=dict)
    # Pages of the application's own data that the dashboard serves (backfill.views).
    views: list[View] = field(default_factory=list)

    def migration(
        self,
        *,
        table: sa.Table | str,
        batch_size: int = 100,
        name: str | None = None,
        columns: Sequence[str] = (),
        requires: Prerequisite | None = None,
        sql: SqlChanges | None = None,
        where: Range = None,
        key: Sequence[str] = (),
    ) -> Callable[[MigrationFunction], MigrationFunction]:
        """Register the decorated function as a migration over `table` (a Table, or a name to
        reflect: "Message", "schema.Message"). The function takes a row, or a row and a
        Context, and returns the fields to change. `where` restricts the scan to a range;
        `key` names a unique, index-backed key to walk instead of the primary key; `sql`
        optionally says the same change in SQL per dialect (see SqlChange)."""
        return self._register(table, batch_size, name, columns, requires, sql, where, key, Form.ROW)

    def batch_migration(
        self,
        *,
        table: sa.Table | str,
        batch_size: int = 100,
        name: str | None = None,
        columns: Sequence[str] = (),
        requires: Prerequisite | None = None,
        where: Range = None,
        key: Sequence[str] = (),
    ) -> Callable[[MigrationFunction], MigrationFunction]:
        """Register a function of a whole batch: `f(rows)` or `f(rows, ctx)` returns a change per
        row (in order), or the number of rows it changed itself through `ctx.conn`. A batch that
        raises is called again one row at a time, so the bad row is named (or skipped)."""
        return self._register(
            table, batch_size, name, columns, requires, None, where, key, Form.BATCH
        )

    def copy(
        self,
        *,
        source: sa.Table | str,
        target: sa.Table | str,
        batch_size: int = 100,
        name: str | None = None,
        columns: Sequence[str] = (),
        requires: Prerequisite | None = None,
        where: Range = None,
        key: Sequence[str] = (),
        existing: Existing | str = Existing.KEEP,
    ) -> Callable[[MigrationFunction], MigrationFunction]:
        """Register a copy: `f(row)` (or `f(row, ctx)`) returns the row to put in `target`
        (every column it sets, the target's key included) or None to copy nothing. Rows are
        inserted with the source batch's cursor in one transaction; a target row already there
        is kept (`existing="keep"`) or updated (`"update"`), so a re-run never duplicates.
        `source` is never written."""
        target_table, target_named = _named(target)
        return self._register(
            source, batch_size, name, columns, requires, None, where, key, Form.ROW,
            target=target_table, target_named=target_named, existing=Existing(existing),
        )  # fmt: skip

    def _register(
        self,
        table: sa.Table | str,
        batch_size: int,
        name: str | None,
        columns: Sequence[str],
        requires: Prerequisite | None,
        sql: SqlChanges | None,
        where: Range,
        key: Sequence[str],
        form: Form,
        *,
        target: sa.Table | None = None,
        target_named: bool = False,
        existing: Existing = Existing.KEEP,
    ) -> Callable[[MigrationFunction], MigrationFunction]:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        source, source_named = _named(table)
        if source_named != target_named and target is not None:
            raise ValueError("give source and target both as Tables, or both by name")

        def register(function: MigrationFunction) -> MigrationFunction:
            migration_name = name or function.__name__
            if migration_name in self._by_name:
                raise ValueError(f"migration {migration_name!r} is defined twice")
            migration = Migration(
                name=migration_name,
                table=source,
                function=function,
                batch_size=batch_size,
                columns=tuple(columns),
                requires=requires,
                description=(function.__doc__ or "").strip().split("\n")[0],
                sql=dict(sql or {}),
                where=where,
                key_columns=tuple(key),
                form=form,
                takes_context=_takes_context(function),
                target=target,
                existing=existing,
                reflect=source_named,
            )
            if not source_named:
                migration.check()
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

    def add_view(self, view: View) -> View:
        """Have `backfill dashboard` serve `view` (backfill.views) under /views/{view.name}/."""
        if any(known.name == view.name for known in self.views):
            raise ValueError(f"view {view.name!r} is added twice")
        self.views.append(checked(view))
        return view

    def requiring(self, name: str) -> list[str]:
        """The migrations whose prerequisite is `name`."""
        return [m.name for m in self if m.requires is not None and m.requires.migration == name]

"""What the database says of a migration's tables: whether they fit it, and tables given by name.

`check_table` refuses, with one sentence, a migration whose tables, columns or key do not fit.
`reflect_table` reads a table given by name, with what SQLAlchemy's reflection misses: MariaDB
keeps a JSON column as LONGTEXT with a `json_valid()` check, which SQLAlchemy reflects as text;
the column is made JSON again here, so its documents reach the function decoded, as on the other
dialects.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from backfill.definition import Migration
from backfill.errors import SchemaMismatch
from backfill.store.dialects import MYSQL, READ_ONLY

_JSON_VALID = re.compile(r"json_valid\(\s*`((?:[^`]|``)+)`\s*\)", re.IGNORECASE)


@contextmanager
def _reading(engine: sa.Engine) -> Iterator[sa.Connection]:
    # Read-only: on SQLite it takes no write lock, so a runner's batches never hold it up.
    with engine.connect() as conn:
        yield conn.execution_options(**{READ_ONLY: True})


def reflect_table(engine: sa.Engine, name: str, schema: str | None) -> sa.Table:
    try:
        with _reading(engine) as conn:
            table = sa.Table(name, sa.MetaData(), schema=schema, autoload_with=conn)
    except sa.exc.NoSuchTableError:
        raise SchemaMismatch(f"table {name!r} does not exist in the database") from None
    if engine.dialect.name in MYSQL:
        for column in _json_checked(engine, name, schema):
            if column in table.c and isinstance(table.c[column].type, sa.String):
                table.c[column].type = sa.JSON()
    return table


def _json_checked(engine: sa.Engine, name: str, schema: str | None) -> list[str]:
    """Columns of the table under a `json_valid()` check (MariaDB's JSON; SQLAlchemy does not
    reflect column-level checks)."""
    query = sa.text(
        "SELECT check_clause FROM information_schema.check_constraints "
        "WHERE constraint_schema = COALESCE(:schema, DATABASE()) AND table_name = :name"
    )
    with _reading(engine) as conn:
        clauses = conn.execute(query, {"schema": schema, "name": name}).scalars().all()
    return [c.replace("``", "`") for clause in clauses for c in _JSON_VALID.findall(clause or "")]


def check_table(engine: sa.Engine, migration: Migration) -> None:
    """Refuse, with one sentence, a migration whose tables, columns or key do not fit the
    database."""
    with _reading(engine) as conn:
        inspector = sa.inspect(conn)
        _check_columns(inspector, migration, migration.table, migration.read_columns, "")
        if migration.target is not None:
            _check_columns(
                inspector, migration, migration.target, tuple(migration.target.columns), "target "
            )
        if migration.key_columns:
            _check_unique_key(inspector, migration)


def _check_columns(
    inspector: Any,
    migration: Migration,
    table: sa.Table,
    columns: Sequence[sa.Column[Any]],
    role_of_table: str,
) -> None:
    if not inspector.has_table(table.name, schema=table.schema):
        raise SchemaMismatch(
            f"migration {migration.name!r}: {role_of_table}table {table.name!r} does not exist "
            "in the database"
        )
    present = {c["name"] for c in inspector.get_columns(table.name, schema=table.schema)}
    for column in columns:
        if column.name not in present:
            role = "key column" if column.primary_key else "column"
            raise SchemaMismatch(
                f"migration {migration.name!r}: {role_of_table}table {table.name!r} has no "
                f"{role} {column.name!r}"
            )


def _check_unique_key(inspector: Any, migration: Migration) -> None:
    """A key given by name must be unique and backed by an index: batches are keyset ranges of
    it, and a duplicate key value at a batch's edge would be skipped."""
    table, wanted = migration.table, set(migration.key_columns)
    name, schema = table.name, table.schema
    pk = inspector.get_pk_constraint(name, schema=schema).get("constrained_columns") or []
    unique = [set(pk)] + [
        set(u["column_names"]) for u in inspector.get_unique_constraints(name, schema=schema)
    ]
    unique += [
        set(i["column_names"])
        for i in inspector.get_indexes(name, schema=schema)
        if i.get("unique") and None not in i["column_names"]
    ]
    # A key that contains a unique set of columns is unique too (created_at, id).
    if not any(u and u <= wanted for u in unique):
        columns = ", ".join(migration.key_columns)
        raise SchemaMismatch(
            f"migration {migration.name!r}: key ({columns}) of table {name!r} is not backed by "
            "a unique index or constraint; batches walk the key in order, so it must be unique "
            "(add the primary key's columns at its end, or create a unique index)"
        )

"""Tables given by name, read from the database: SQLAlchemy's reflection, plus what it misses.

MariaDB keeps a JSON column as LONGTEXT with a `json_valid()` check, and SQLAlchemy reflects it
as text: the column is made JSON again here, so its documents reach the function decoded, as on
the other dialects.
"""

from __future__ import annotations

import re

import sqlalchemy as sa

from backfill.errors import SchemaMismatch

_JSON_VALID = re.compile(r"json_valid\(\s*`((?:[^`]|``)+)`\s*\)", re.IGNORECASE)


def reflect_table(engine: sa.Engine, name: str, schema: str | None) -> sa.Table:
    try:
        table = sa.Table(name, sa.MetaData(), schema=schema, autoload_with=engine)
    except sa.exc.NoSuchTableError:
        raise SchemaMismatch(f"table {name!r} does not exist in the database") from None
    if engine.dialect.name in ("mysql", "mariadb"):
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
    with engine.connect() as conn:
        clauses = conn.execute(query, {"schema": schema, "name": name}).scalars().all()
    return [c.replace("``", "`") for clause in clauses for c in _JSON_VALID.findall(clause or "")]

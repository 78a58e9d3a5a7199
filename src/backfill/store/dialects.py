"""What differs between the SQL dialects backfill runs on, named once: the sets of dialects
that share a behaviour, which of a migration's per-dialect declarations serves a dialect, and the
statements that are spelled differently on each."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite

MYSQL = frozenset({"mysql", "mariadb"})  # SQLAlchemy's names: mysql+pymysql, mariadb+pymysql
# Dialects whose batches lock the rows they read (SELECT ... FOR UPDATE); SQLite locks the file.
LOCKING = frozenset({"postgresql"}) | MYSQL
# Dialects whose driver hands JSON columns back as text, for backfill to decode.
JSON_AS_TEXT = frozenset({"sqlite"}) | MYSQL
# The execution option of a connection that only reads: on SQLite its transactions begin with a
# plain BEGIN, not BEGIN IMMEDIATE (the write lock).
READ_ONLY = "backfill_read_only"

T = TypeVar("T")


def declared_for(dialect: str, declared: Mapping[str, T]) -> T | None:
    """The entry of `declared` (keyed by dialect name) for `dialect`; None if none. SQLAlchemy
    names a MySQL-family dialect by the URL (mysql+pymysql, mariadb+pymysql), so an entry under
    "mysql" serves "mariadb" and the other way round; the dialect's own name comes first."""
    found = declared.get(dialect)
    if found is None and dialect in MYSQL:
        found = next((declared[d] for d in sorted(MYSQL - {dialect}) if d in declared), None)
    return found


def insert_ignoring_conflicts(
    dialect: sa.Dialect, table: sa.Table, values: dict[Any, Any], key: sa.Column[Any]
) -> sa.Insert:
    """INSERT that leaves alone a row whose key `key` was inserted meanwhile (by another
    transaction: it waits for that one to end), instead of failing on the duplicate key. On
    MySQL a no-op ON DUPLICATE KEY UPDATE: INSERT IGNORE would also hide other errors."""
    name = dialect.name
    if name == "postgresql":
        return postgresql.insert(table).values(values).on_conflict_do_nothing()
    if name == "sqlite":
        return sqlite.insert(table).values(values).on_conflict_do_nothing()
    if name in MYSQL:
        return mysql.insert(table).values(values).on_duplicate_key_update({key: key})
    return sa.insert(table).values(values)

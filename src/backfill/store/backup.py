"""Backups of the tables migrations touch: taken in one snapshot, put back in one transaction.

A backup is a directory:
- `manifest.json`: `{"format": 1, "taken_at": ..., "database": <redacted URL>, "dialect": ...,
  "migrations": [...], "tables": [{"name", "schema", "file", "columns", "key", "rows"}, ...]}`,
  tables listed parents first (by their foreign keys);
- one `<table>.jsonl` per table: a JSON object per row, in key order, each value as the driver
  gave it, tagged so that it comes back as the same Python value (store.undo's encoding).

The snapshot: SQLite's online backup API copies the database file consistently, and the tables
are read from the copy; PostgreSQL and MariaDB read every table in one `REPEATABLE READ`
transaction. Restoring updates the rows the backup has, inserts those it lacks, parents first,
then deletes, children first, the rows it does not have (no row is deleted and inserted again,
so a foreign key with `ON DELETE CASCADE` elsewhere never fires for a row the backup keeps).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from backfill.errors import Refused
from backfill.store.database import driver
from backfill.store.dialects import LOCKING
from backfill.store.undo import decode_value, encode_value
from backfill.types import Key, decode_key, encode_key, iso

FORMAT = 1
MANIFEST = "manifest.json"
_CHUNK = 1_000

# A table as the backup names it: (name, schema).
TableName = tuple[str, str | None]


@dataclass(frozen=True)
class BackupInfo:
    path: str
    tables: list[str]
    rows: int
    bytes: int
    taken_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "tables": self.tables,
            "rows": self.rows,
            "bytes": self.bytes,
            "taken_at": iso(self.taken_at),
        }


@contextmanager
def snapshot(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection on which every read sees the database at one moment."""
    if engine.dialect.name == "sqlite":
        with tempfile.TemporaryDirectory(prefix="backfill-backup-") as folder:
            copy = os.path.join(folder, "snapshot.db")
            with engine.connect() as conn:
                target = sqlite3.connect(copy)
                try:
                    driver(conn).backup(target)  # the online backup API: one consistent copy
                finally:
                    target.close()
            reader = sa.create_engine(f"sqlite:///{copy}", poolclass=NullPool)
            try:
                with reader.connect() as conn, conn.begin():
                    yield conn
            finally:
                reader.dispose()
        return
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            yield conn


def reflected(conn: sa.Connection, names: list[TableName]) -> list[sa.Table]:
    """The tables as they are in the database, parents first (by their foreign keys)."""
    metadata = sa.MetaData()
    tables = [sa.Table(name, metadata, schema=schema, autoload_with=conn) for name, schema in names]
    ordered = [t for t in metadata.sorted_tables if t in tables]
    return ordered + [t for t in tables if t not in ordered]


def _raw(table: sa.Table) -> list[sa.Label[Any]]:
    """Every column as the driver gives it (no type's processing)."""
    return [sa.type_coerce(c, sa.types.NullType()).label(c.name) for c in table.columns]


def _key(table: sa.Table) -> list[sa.Column[Any]]:
    return list(table.primary_key.columns) or list(table.columns)


def take(
    engine: sa.Engine,
    names: list[TableName],
    folder: Path,
    *,
    database: str,
    migrations: list[str],
    now: float,
    also: Callable[[sa.Connection, list[sa.Table]], None] | None = None,
) -> BackupInfo:
    """Write a backup of the tables `names` into `folder` (created; it must not exist). `also`
    reads in the same snapshot (a test's own view of what the backup holds)."""
    folder.mkdir(parents=True)
    listed: list[dict[str, Any]] = []
    total = 0
    with snapshot(engine) as conn:
        tables = reflected(conn, names)
        for index, table in enumerate(tables):
            file = f"{index:02d}-{table.name}.jsonl"
            count = 0
            query = sa.select(*_raw(table)).order_by(*_key(table))
            with (folder / file).open("w", encoding="utf-8") as out:
                for row in conn.execute(query).mappings():
                    values = {n: encode_value(v) for n, v in row.items()}
                    out.write(json.dumps(values, ensure_ascii=False) + "\n")
                    count += 1
            total += count
            listed.append(
                {
                    "name": table.name,
                    "schema": table.schema,
                    "file": file,
                    "columns": [c.name for c in table.columns],
                    "key": [c.name for c in table.primary_key.columns],
                    "rows": count,
                }
            )
        if also is not None:
            also(conn, tables)
    manifest = {
        "format": FORMAT,
        "taken_at": iso(now),
        "taken_at_epoch": now,
        "database": database,
        "dialect": engine.dialect.name,
        "migrations": migrations,
        "tables": listed,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    size = sum(f.stat().st_size for f in folder.iterdir())
    return BackupInfo(str(folder), [t["name"] for t in listed], total, size, now)


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise Refused(f"{folder} is not a backfill backup: {error}") from None
    if manifest.get("format") != FORMAT:
        raise Refused(f"{folder}: backup format {manifest.get('format')!r} is not {FORMAT}")
    return dict(manifest)


def _rows(folder: Path, file: str) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    with (folder / file).open(encoding="utf-8") as lines:
        for line in lines:
            chunk.append({n: decode_value(v) for n, v in json.loads(line).items()})
            if len(chunk) == _CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def put_back(conn: sa.Connection, folder: Path, manifest: dict[str, Any]) -> int:
    """Make the backed-up tables hold exactly the backup's rows, in `conn`'s transaction; the
    rows written. Refused when a table's columns are not the backup's."""
    entries = manifest["tables"]
    tables = reflected(conn, [(t["name"], t["schema"]) for t in entries])
    by_name = {(t.name, t.schema): t for t in tables}
    kept: dict[tuple[str, str | None], set[Key]] = {}
    written = 0
    for entry in entries:  # parents first
        table = by_name[(entry["name"], entry["schema"])]
        if [c.name for c in table.columns] != entry["columns"]:
            raise Refused(
                f"table {table.name!r} no longer has the columns of the backup "
                f"({', '.join(entry['columns'])}); nothing was restored"
            )
        keys = kept[(table.name, table.schema)] = set()
        for chunk in _rows(folder, entry["file"]):
            written += _upsert(conn, table, chunk, keys)
    for entry in reversed(entries):  # children first
        table = by_name[(entry["name"], entry["schema"])]
        _delete_others(conn, table, kept[(table.name, table.schema)])
    return written


class _AsGiven(sa.types.TypeDecorator[Any]):
    """A value handed to the driver as it is (SQLAlchemy gives a bare parameter the type of
    the column it is written to, whose processing would not take the driver's own values)."""

    impl = sa.types.NullType
    cache_ok = True


def _bind(conn: sa.Connection, column: sa.Column[Any], name: str) -> sa.BindParameter[Any]:
    # Values go back as the driver gave them. psycopg gives them as the column's types take
    # them (JSON decoded, for one), and its dialect casts each parameter to its column's type.
    typed = conn.dialect.name == "postgresql"
    return sa.bindparam(name, type_=column.type if typed else _AsGiven())


def _normal(key: tuple[Any, ...]) -> Key:
    found = decode_key(encode_key(key))
    assert found is not None
    return found


def _upsert(
    conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]], keys: set[Key]
) -> int:
    key_columns = _key(table)
    names = [c.name for c in key_columns]
    wanted = [tuple(r[n] for n in names) for r in rows]
    raw = [sa.type_coerce(c, sa.types.NullType()) for c in key_columns]
    query = sa.select(*raw).where(sa.tuple_(*raw).in_(wanted))
    if conn.dialect.name in LOCKING:
        query = query.with_for_update()
    present = {_normal(tuple(r)) for r in conn.execute(query)}
    updates: list[dict[str, Any]] = []
    inserts: list[dict[str, Any]] = []
    for key, row in zip(wanted, rows, strict=True):
        normal = _normal(key)
        keys.add(normal)
        (updates if normal in present else inserts).append(row)
    # Parameters named apart from the columns: a parameter named as its column would be bound
    # with the column's type, which would not take the driver's own values.
    if inserts:
        insert = sa.insert(table).values(
            {c.name: _bind(conn, c, f"v_{c.name}") for c in table.columns}
        )
        conn.execute(insert, [{f"v_{n}": v for n, v in r.items()} for r in inserts])
    others = [c for c in table.columns if c not in key_columns]
    if updates and others and table.primary_key.columns:
        update = (
            sa.update(table)
            .where(*(c == _bind(conn, c, f"key_{c.name}") for c in key_columns))
            .values({c.name: _bind(conn, c, f"v_{c.name}") for c in others})
        )
        conn.execute(
            update,
            [
                {**{f"v_{n}": v for n, v in r.items()}, **{f"key_{n}": r[n] for n in names}}
                for r in updates
            ],
        )
    return len(rows)


def _delete_others(conn: sa.Connection, table: sa.Table, keys: set[Key]) -> None:
    """Delete the rows whose keys the backup does not have."""
    key_columns = _key(table)
    raw = [sa.type_coerce(c, sa.types.NullType()) for c in key_columns]
    gone = [tuple(r) for r in conn.execute(sa.select(*raw)) if _normal(tuple(r)) not in keys]
    for start in range(0, len(gone), 500):
        chosen = gone[start : start + 500]
        conn.execute(sa.delete(table).where(sa.tuple_(*raw).in_(chosen)))

"""A run's shard plan: the migration's key range split into range shards at key quantiles.

Range shards, not modulo: each worker reads only its own rows (`id % N` makes every worker scan
the whole key). The plan is made once per run from the keys as they are then, in one ordered
pass over the key's index (`row_number()` over the key, every dialect here has it), and kept in
`_migration_shards` (store.shards), so changing the number of workers never moves a row to
another shard.
Shard k holds the keys in (lo, hi]: the first has no `lo`, the last no `hi` (it walks to the
table's current end, as one runner does). Any key shape: integer, text, UUID, composite.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import NullType

from backfill.definition import Migration
from backfill.store.database import driver
from backfill.store.statement import Statement
from backfill.types import Key

# A plan has this many shards when a `worker` or a step starts the run (the contract), and
# 4 x N for `--workers N`; one when the range holds fewer than this many batches.
SHARDS_WITHOUT_WORKERS = 16


@dataclass(frozen=True)
class Shard:
    """Keys in (lo, hi]; None: no bound on that side."""

    id: int
    lo: Key | None
    hi: Key | None


def shard_count(workers: int | None, rows: int, batch_size: int) -> int:
    """How many shards a run's plan has: 4 x `workers`, or 16 without a worker count, and one
    when `rows` fill fewer than 16 batches (sharding a small range only adds claims)."""
    if rows < SHARDS_WITHOUT_WORKERS * batch_size:
        return 1
    return SHARDS_WITHOUT_WORKERS if workers is None else 4 * workers


def quantile_keys(conn: sa.Connection, migration: Migration, parts: int) -> list[Key]:
    """Up to `parts - 1` keys, ascending, that end the first `parts - 1` of `parts` runs of
    about equal rows in the migration's range (fewer when the range has fewer rows). Keys as
    the driver gives them, as a cursor holds them (store.scan reads keys the same way)."""
    key, where = migration.key, migration.range
    counted = sa.select(sa.func.count()).select_from(migration.table)
    if where is not None:
        counted = counted.where(where)
    rows = int(driver_rows(conn, counted)[0][0] or 0)
    if parts <= 1 or rows < parts:
        return []
    position = sa.func.row_number().over(order_by=[c.asc() for c in key]).label("backfill_row")
    ranked = sa.select(*key, position).select_from(migration.table)
    if where is not None:
        ranked = ranked.where(where)
    inner = ranked.subquery("backfill_ranked")
    marks = sorted({round(rows * i / parts) for i in range(1, parts)} - {0})
    query = (
        sa.select(*(inner.c[c.name] for c in key))
        .where(sa.or_(*(inner.c.backfill_row == mark for mark in marks)))
        .order_by(inner.c.backfill_row)
    )
    return [tuple(row) for row in driver_rows(conn, query)]


def driver_rows(conn: sa.Connection, query: sa.Select[Any]) -> list[Any]:
    statement = Statement.compile(query, conn.dialect, [])
    raw = driver(conn).cursor()
    try:
        raw.execute(statement.sql, statement.params(()))
        return list(raw.fetchall())
    finally:
        raw.close()


def plan(
    conn: sa.Connection, migration: Migration, parts: int, after: Key | None = None
) -> list[Shard]:
    """The migration's range (after the key `after`, a cursor of a run before) in about `parts`
    shards of about equal rows."""
    scoped = bounded(migration, after, None)
    bounds: list[Key | None] = [after, *quantile_keys(conn, scoped, parts), None]
    return [Shard(i, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def bounded(migration: Migration, lo: Key | None, hi: Key | None) -> Migration:
    """`migration` restricted to the keys in (lo, hi]: its own range and those bounds (a row
    comparison for a composite key). The bounds are keys as the driver gave them and go back to
    it as they are, without the column type's conversions (a UUID as SQLite's hex text)."""
    key = migration.key
    left: Any = key[0] if len(key) == 1 else sa.tuple_(*key)
    conditions = [] if migration.range is None else [migration.range]
    for bound, below in ((lo, False), (hi, True)):
        if bound is None:
            continue
        values = [sa.type_coerce(sa.bindparam(None, v, unique=True), NullType()) for v in bound]
        right: Any = values[0] if len(key) == 1 else sa.tuple_(*values)
        conditions.append(left <= right if below else left > right)
    if not conditions:
        return migration
    return replace(migration, where=sa.and_(*conditions))

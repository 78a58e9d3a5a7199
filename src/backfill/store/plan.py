"""A run's shard plan: the migration's key range split into range shards at key quantiles.

Range shards, not modulo: each worker reads only its own rows (`id % N` makes every worker scan
the whole key). The plan is made once per run from the keys as they are then, in one ordered
pass over the key's index (`row_number()` over the key, every dialect here has it), and kept in
`_migration_shards`, so changing the number of workers never moves a row to another shard.
Shard k holds the keys in (lo, hi]: the first has no `lo`, the last no `hi` (it walks to the
table's current end, as one runner does). Any key shape: integer, text, UUID, composite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from backfill.definition import Migration
from backfill.store.database import driver
from backfill.store.statement import Statement
from backfill.store.tables import migration_shards
from backfill.types import Key, decode_key, encode_key

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
    rows = int(_driver_rows(conn, counted)[0][0] or 0)
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
    return [tuple(row) for row in _driver_rows(conn, query)]


def _driver_rows(conn: sa.Connection, query: sa.Select[Any]) -> list[Any]:
    statement = Statement.compile(query, conn.dialect, [])
    raw = driver(conn).cursor()
    try:
        raw.execute(statement.sql, statement.params(()))
        return list(raw.fetchall())
    finally:
        raw.close()


def plan(conn: sa.Connection, migration: Migration, parts: int) -> list[Shard]:
    """The migration's range in about `parts` shards of about equal rows."""
    bounds: list[Key | None] = [None, *quantile_keys(conn, migration, parts), None]
    return [Shard(i, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def within(
    key: tuple[sa.Column[Any], ...], shard: Shard
) -> tuple[sa.ColumnElement[bool], list[str], tuple[Any, ...]]:
    """The predicate of the shard's keys, (lo, hi] (a row comparison for a composite key), with
    its parameters' names and values, for a Statement sent to the driver (bounds are keys as
    the driver gave them)."""
    left: Any = key[0] if len(key) == 1 else sa.tuple_(*key)
    conditions: list[sa.ColumnElement[bool]] = []
    names: list[str] = []
    values: tuple[Any, ...] = ()
    for side, bound in (("lo", shard.lo), ("hi", shard.hi)):
        if bound is None:
            continue
        params = [sa.bindparam(f"{side}{i}", type_=c.type) for i, c in enumerate(key)]
        right: Any = params[0] if len(key) == 1 else sa.tuple_(*params)
        conditions.append(left > right if side == "lo" else left <= right)
        names += [p.key for p in params]
        values += tuple(bound)
    return sa.and_(sa.true(), *conditions), names, values


def record_plan(
    conn: sa.Connection, name: str, shards: list[Shard], run_id: int | None = None
) -> None:
    """Keep the plan of the run `run_id` of migration `name` (replacing an earlier one)."""
    conn.execute(sa.delete(migration_shards).where(migration_shards.c.migration == name))
    conn.execute(
        sa.insert(migration_shards),
        [
            {
                "migration": name,
                "id": s.id,
                "lo": None if s.lo is None else encode_key(s.lo),
                "hi": None if s.hi is None else encode_key(s.hi),
                "state": "pending",
                "generation": 0,
                "processed": 0,
                "changed": 0,
                "skipped_errors": 0,
                "kept": 0,
                "run_id": run_id,
            }
            for s in shards
        ],
    )


def load_plan(conn: sa.Connection, name: str) -> list[Shard]:
    """The plan kept for migration `name`, in shard order; empty when it has none."""
    rows = conn.execute(
        sa.select(migration_shards.c.id, migration_shards.c.lo, migration_shards.c.hi)
        .where(migration_shards.c.migration == name)
        .order_by(migration_shards.c.id)
    )
    return [Shard(int(r[0]), decode_key(r[1]), decode_key(r[2])) for r in rows]

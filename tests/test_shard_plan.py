"""A run's shard plan, on every dialect: key quantiles split the range into shards of about equal
rows that cover every row exactly once, for integer, text, UUID and composite keys, ranges
included; the plan is kept in `_migration_shards` and read back as it was."""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from backfill import Migrations
from backfill.definition import Migration
from backfill.store import plan as plans
from backfill.store import shards as kept
from backfill.store.database import Database, driver
from backfill.store.statement import Statement

ROWS = 1_000
metadata = sa.MetaData()
by_int = sa.Table(
    "by_int", metadata, sa.Column("id", sa.Integer, primary_key=True), sa.Column("v", sa.Text)
)
by_text = sa.Table(
    "by_text", metadata, sa.Column("code", sa.String(40), primary_key=True), sa.Column("v", sa.Text)
)
by_uuid = sa.Table(
    "by_uuid", metadata, sa.Column("id", sa.Uuid, primary_key=True), sa.Column("v", sa.Text)
)
by_pair = sa.Table(
    "by_pair",
    metadata,
    sa.Column("chat", sa.String(40), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("v", sa.Text),
)  # fmt: skip


def keys_of(table: sa.Table, rng: random.Random) -> list[dict[str, Any]]:
    if table is by_int:  # with gaps
        return [{"id": i} for i in rng.sample(range(1, 10 * ROWS), ROWS)]
    if table is by_text:
        return [{"code": f"{rng.choice('abcxyz')}-{i:05d}"} for i in range(ROWS)]
    if table is by_uuid:
        return [{"id": uuid.UUID(int=rng.getrandbits(128), version=4)} for _ in range(ROWS)]
    return [{"chat": f"chat-{i // 37:03d}", "seq": i % 37 * 3} for i in range(ROWS)]


@pytest.fixture
def db(database_url):
    """The database with the four tables, their rows inserted in shuffled order."""
    engine = sa.create_engine(database_url, poolclass=NullPool)
    metadata.create_all(engine)
    rng = random.Random(7)
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            rows = keys_of(table, rng)
            rng.shuffle(rows)
            conn.execute(sa.insert(table), [dict(r, v=f"row {n}") for n, r in enumerate(rows)])
    engine.dispose()
    database = Database(database_url)
    yield database
    database.dispose()


def migration_over(table: sa.Table, **options: Any):
    registry = Migrations()
    registry.migration(table=table, **options)(lambda row: None)
    return registry[registry.names()[0]]


def rows_in(conn: sa.Connection, migration: Migration, shard: plans.Shard) -> int:
    """The rows of the migration's range in `shard`, counted by the database."""
    scoped = plans.bounded(migration, shard.lo, shard.hi)
    counted = sa.select(sa.func.count()).select_from(migration.table)
    if scoped.range is not None:
        counted = counted.where(scoped.range)
    statement = Statement.compile(counted, conn.dialect, [])
    raw = driver(conn).cursor()
    try:
        raw.execute(statement.sql, statement.params(()))
        return int(raw.fetchone()[0])
    finally:
        raw.close()


EVERYTHING = plans.Shard(0, None, None)


@pytest.mark.parametrize("table", [by_int, by_text, by_uuid, by_pair], ids=lambda t: t.name)
def test_quantiles_split_the_range_into_even_shards_covering_every_row_once(db, table):
    migration = migration_over(table)
    with db.read() as conn:
        shards = plans.plan(conn, migration, 16)
        counts = [rows_in(conn, migration, s) for s in shards]
        everything = rows_in(conn, migration, EVERYTHING)
    assert len(shards) == 16 and [s.id for s in shards] == list(range(16))
    assert shards[0].lo is None and shards[-1].hi is None  # the last walks to the table's end
    assert all(a.hi == b.lo for a, b in zip(shards, shards[1:], strict=False))
    assert sum(counts) == everything == ROWS  # each row in exactly one shard (they are disjoint)
    assert max(counts) - min(counts) <= 1, counts  # 62 or 63 rows each


def test_a_range_is_planned_over_its_own_rows(db):
    migration = migration_over(by_int, where=lambda t: t.c.id % 2 == 0)
    with db.read() as conn:
        shards = plans.plan(conn, migration, 4)
        in_range = [rows_in(conn, migration, s) for s in shards]
        even = rows_in(conn, migration, EVERYTHING)
    assert sum(in_range) == even and max(in_range) - min(in_range) <= 1, in_range


def test_fewer_rows_than_shards_give_one_shard_and_small_ranges_are_not_sharded(db):
    migration = migration_over(by_int, where=lambda t: t.c.id < 0)  # an empty range
    with db.read() as conn:
        assert plans.plan(conn, migration, 16) == [plans.Shard(0, None, None)]
    assert plans.shard_count(2, rows=15 * 100, batch_size=100) == 1  # under 16 batches
    assert plans.shard_count(2, rows=16 * 100, batch_size=100) == 8  # 4 x --workers
    assert plans.shard_count(None, rows=10**6, batch_size=100) == 16  # a worker or a step


def test_a_plan_is_kept_and_read_back_as_it_was(db):
    db.ensure_schema()
    migration = migration_over(by_uuid)
    with db.write() as conn:
        shards = plans.plan(conn, migration, 8)
        kept.record_plan(conn, "m", shards, run_id=3)
    with db.read() as conn:
        again = [s.bounds for s in kept.load(conn, "m")]
        assert kept.load(conn, "other") == ()
        # Keys come back as stored (JSON lists of what the driver gave): the same rows.
        assert [rows_in(conn, migration, s) for s in again] == [
            rows_in(conn, migration, s) for s in shards
        ]
        assert sum(rows_in(conn, migration, s) for s in again) == ROWS


def test_a_plan_after_a_cursor_covers_only_the_rows_after_it(db):
    migration = migration_over(by_pair)
    with db.read() as conn:
        whole = plans.plan(conn, migration, 4)
        rest = plans.plan(conn, migration, 4, after=whole[1].hi)
        counts = [rows_in(conn, migration, s) for s in rest]
    assert rest[0].lo == whole[1].hi and rest[-1].hi is None
    assert sum(counts) == ROWS // 2 + (ROWS % 2) and max(counts) - min(counts) <= 1, counts

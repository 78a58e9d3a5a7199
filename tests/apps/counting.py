"""A test app that makes double application visible: every migrated row's `counter` goes up by one.

The migration `derive` fills `derived` from `source` on rows where it is still NULL and increments
`counter`. If the engine ever applied a batch twice (a replay after a crash, a zombie runner that
commits after being taken over), some `counter` would end above 1.

`COUNTING_ROW_DELAY` (seconds, float) makes the function sleep on every row, so a run lasts long
enough to be killed, stopped or canceled while it is inside a batch transaction.

A `source` starting with `bad:` is input the function rejects (`BadValue` on `source`): bad input
any database can hold, for the error policies.

`logged` is a second registry with the same migration, named the same, whose function also
writes through its Context: one `item_log` row per migrated row, committed with the batch. A row
logged twice is a side effect applied twice.

Uses only backfill's public API, as a user's application would.
"""

from __future__ import annotations

import os
import random
import time

import sqlalchemy as sa

from backfill import BadValue, Context, Migrations, Row

ROW_DELAY_ENV = "COUNTING_ROW_DELAY"
NAME = "derive"
BAD_PREFIX = "bad:"

metadata = sa.MetaData()

items = sa.Table(
    "items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("derived", sa.Text),
    sa.Column("counter", sa.Integer, nullable=False, server_default="0"),
)

# What `logged`'s function writes through its Context, one row per migrated item.
item_log = sa.Table(
    "item_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("item_id", sa.Integer, nullable=False),
)

migrations = Migrations()
logged = Migrations()

_row_delay = float(os.environ.get(ROW_DELAY_ENV) or 0)


def transform(source: str) -> str:
    """What `derive` writes. Tests compute their expectation on their own, not with this."""
    return f"{source[::-1].upper()}#{len(source)}"


@migrations.migration(table=items, batch_size=100)
def derive(row: Row) -> dict[str, object] | None:
    """Fill `derived` from `source` and count how many times the row was migrated."""
    if _row_delay:
        time.sleep(_row_delay)
    if row["derived"] is not None:
        return None
    if row["source"].startswith(BAD_PREFIX):
        raise BadValue("source", "is marked bad")
    return {"derived": transform(row["source"]), "counter": row["counter"] + 1}


@logged.migration(table=items, batch_size=100, name=NAME)
def derive_logged(row: Row, ctx: Context) -> dict[str, object] | None:
    """`derive`, logging each row it migrates in `item_log` through the batch's transaction."""
    change = derive(row)
    if change is not None:
        ctx.conn.execute(sa.insert(item_log).values(item_id=row["id"]))
    return change


_WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")


def create_items(engine: sa.Engine, count: int, *, seed: int = 0) -> None:
    """(Re)create the `items` table with `count` unmigrated rows whose ids are 1..count."""
    rng = random.Random(seed)
    metadata.drop_all(engine, tables=[items, item_log], checkfirst=True)
    metadata.create_all(engine, tables=[items, item_log])
    rows = [
        {
            "id": i,
            "source": f"{rng.choice(_WORDS)}-{i}-{rng.randrange(10**6)}",
            "derived": None,
            "counter": 0,
        }
        for i in range(1, count + 1)
    ]
    with engine.begin() as conn:
        for start in range(0, len(rows), 5_000):
            conn.execute(sa.insert(items), rows[start : start + 5_000])

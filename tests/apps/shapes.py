"""A test app for the shapes beyond the flagship's: a composite-key table and a cross-table copy.

`derive_pairs` walks `pairs`, whose primary key is (chat_id, seq): it fills `derived` from
`source` and increments `counter`, so a row migrated twice shows `counter` > 1, and a row the
keyset walk skipped shows `derived` NULL.

`copy_items` copies every row of `notes` into `notes_copy` (under another key name, with a
JSON column), leaving `notes` as it is. Each call of its function also inserts, through the
batch's own connection (`ctx.conn`), one row into `copy_events`, an append-only log without
any unique constraint: a batch applied twice leaves two events for a note, a copy committed
without the writes of its context leaves none. The event records the runner's pid, so a test
can tell which process wrote it.

`SHAPES_ROW_DELAY` (seconds, float) makes both functions sleep on every row, so a run lasts long
enough to be killed or stopped mid-run.

Uses only backfill's public API, as a user's application would.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import sqlalchemy as sa

from backfill import Context, Migrations, Row

ROW_DELAY_ENV = "SHAPES_ROW_DELAY"
PAIRS = "derive_pairs"
COPY = "copy_items"

metadata = sa.MetaData()

pairs = sa.Table(
    "pairs",
    metadata,
    sa.Column("chat_id", sa.String(40), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("derived", sa.Text),
    sa.Column("counter", sa.Integer, nullable=False, server_default="0"),
)

notes = sa.Table(
    "notes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("author", sa.String(40), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
)

notes_copy = sa.Table(
    "notes_copy",
    metadata,
    sa.Column("note_id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("author", sa.String(40), nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("words", sa.JSON(none_as_null=True)),
)

copy_events = sa.Table(
    "copy_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("note_id", sa.Integer, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
)

migrations = Migrations()

_row_delay = float(os.environ.get(ROW_DELAY_ENV) or 0)


def _slow() -> None:
    if _row_delay:
        time.sleep(_row_delay)


@migrations.migration(table=pairs, batch_size=100)
def derive_pairs(row: Row) -> dict[str, object] | None:
    """Fill `derived` of a (chat_id, seq) row and count how many times it was migrated."""
    _slow()
    if row["derived"] is not None:
        return None
    derived = f"{row['chat_id']}/{row['seq']}:{row['source'][::-1]}"
    return {"derived": derived, "counter": row["counter"] + 1}


@migrations.copy(source=notes, target=notes_copy, batch_size=100)
def copy_items(row: Row, ctx: Context) -> dict[str, object] | None:
    """Copy a note into `notes_copy`, logging the call in `copy_events` in the batch."""
    _slow()
    ctx.conn.execute(sa.insert(copy_events).values(note_id=row["id"], pid=os.getpid()))
    words = row["body"].split()
    return {
        "note_id": row["id"],
        "author": row["author"],
        "title": row["body"].title(),
        "words": {"count": len(words), "first": words[0] if words else None},
    }


_WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")


def create_pairs(engine: sa.Engine, count: int, *, seed: int = 0) -> None:
    """(Re)create `pairs` with `count` unmigrated rows: chats of 1 to 40 messages each, with
    gaps in `seq`, inserted in shuffled order (the key order is not the insertion order)."""
    rng = random.Random(seed)
    keys: list[tuple[str, int]] = []
    chat = 0
    while len(keys) < count:
        chat += 1
        seq = 0
        for _ in range(min(rng.randint(1, 40), count - len(keys))):
            seq += rng.randint(1, 3)
            keys.append((f"chat-{chat:06d}", seq))
    rng.shuffle(keys)
    rows = [
        {
            "chat_id": chat_id,
            "seq": seq,
            "source": f"{rng.choice(_WORDS)}-{rng.randrange(10**6)}",
            "derived": None,
            "counter": 0,
        }
        for chat_id, seq in keys
    ]
    _recreate(engine, [pairs], pairs, rows)


def create_notes(engine: sa.Engine, count: int, *, seed: int = 0) -> None:
    """(Re)create `notes` with `count` rows (ids 1..count), an empty `notes_copy` and an empty
    `copy_events`."""
    rng = random.Random(seed)
    rows = [
        {
            "id": i,
            "author": f"user-{rng.randrange(50)}",
            "body": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 8))),
        }
        for i in range(1, count + 1)
    ]
    _recreate(engine, [notes, notes_copy, copy_events], notes, rows)


def _recreate(
    engine: sa.Engine, tables: list[sa.Table], filled: sa.Table, rows: list[dict[str, Any]]
) -> None:
    metadata.drop_all(engine, tables=tables, checkfirst=True)
    metadata.create_all(engine, tables=tables)
    with engine.begin() as conn:
        for start in range(0, len(rows), 5_000):
            conn.execute(sa.insert(filled), rows[start : start + 5_000])

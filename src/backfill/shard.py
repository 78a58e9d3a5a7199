"""One shard worked by one worker: how a worker takes it (a free one claimed, or the tail of
another's split off), where its batches keep their cursor and counters (the shard's row, while
the worker holds it) and the heartbeat that keeps its lease. `backfill.worker` takes
shards and drives their batches; `backfill.batch` runs each batch with a `ShardPosition`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from backfill.definition import Migration
from backfill.errors import LeaseLost
from backfill.lease import Heartbeat
from backfill.position import Stored
from backfill.state import ShardState, State
from backfill.store import records, shards
from backfill.store.database import Database
from backfill.store.records import Ledger
from backfill.store.shards import ShardRecord
from backfill.types import Clock, Identity, Liveness


@dataclass(frozen=True)
class Joined:
    """The run a worker works in: its generation (of the migration's row) and its number."""

    generation: int
    run_id: int
    undo: bool = False  # the run logs its changes to undo them


class ShardMoved(Exception):
    """A split moved the upper bound of the shard a batch was working (store.shards.split): the
    batch rolled back, and the worker goes on within the new bound."""


class ShardPosition:
    """A worker's batches: the cursor and counters on its shard's row, while it holds the shard
    at its generation, in the run it joined (`Joined`). Each batch first reads the migration's
    row (no lock: workers do not queue on it) to stop when the run ended, a cancel was asked
    for, or another run took over."""

    def __init__(self, db: Database, name: str, joined: Joined, shard: ShardRecord) -> None:
        self.name, self.joined, self.shard = name, joined, shard
        self.start: Stored = shard
        self.ledger = Ledger(db.engine.dialect, name, joined.generation)

    def stop_requested(self, conn: sa.Connection) -> bool:
        found = self.ledger.read(conn)
        if found is None or found[0] != self.joined.generation:
            raise LeaseLost(self.name)
        return found[1] is not State.IN_PROGRESS or found[2]

    def advance(self, conn: sa.Connection, values: dict[str, Any], done: bool, now: float) -> None:
        held = self.shard
        also = {"hi": held["hi"], "run_id": self.joined.run_id}
        values.update(heartbeat_at=now)
        if done:
            advanced = shards.transition(
                conn,
                self.name,
                held,
                source=ShardState.IN_PROGRESS,
                target=ShardState.DONE,
                also=also,
                runner_host=None,
                runner_pid=None,
                released_at=now,  # finished is let go: the run is not dead before the next step
                **values,
            )
        else:
            advanced = shards.update_held(conn, self.name, held.id, held.generation, also, **values)
        if not advanced:
            self._lost(conn)

    def _lost(self, conn: sa.Connection) -> None:
        now = shards.reload(conn, self.name, self.shard.id)
        if now.generation == self.shard.generation and now.state is ShardState.IN_PROGRESS:
            raise ShardMoved(self.name)
        raise LeaseLost(self.name)

    def reload(self, conn: sa.Connection) -> Stored:
        now = shards.reload(conn, self.name, self.shard.id)
        if now.generation != self.shard.generation or now.state is not ShardState.IN_PROGRESS:
            raise LeaseLost(self.name)
        if now["hi"] != self.shard["hi"]:
            raise ShardMoved(self.name)
        return now


def heartbeat(
    db: Database, name: str, held: Callable[[], ShardRecord], interval: float, clock: Clock
) -> Heartbeat:
    """The heartbeat of the shard `held()` returns (the worker's, as it last read it: a split
    moves its bound, not its lease), so a slow batch or a pause never looks like a dead worker;
    `lost` once it was taken over."""

    def beat(conn: sa.Connection) -> bool:
        shard = held()
        return shards.update_held(conn, name, shard.id, shard.generation, heartbeat_at=clock())

    return Heartbeat(db, beat, interval, f"heartbeat-{name}")


def take(
    db: Database,
    migration: Migration,
    joined: Joined,
    me: Identity,
    seen: Callable[[], Liveness],
    split_below: int,
) -> ShardRecord | None:
    """A shard for worker `me`: a free one, else the tail of the largest shard another worker
    holds, split past its cursor (when more than `split_below` rows are left of it). None when
    there is nothing to take, or the run is no longer `joined`."""
    name = migration.name
    with db.write(meanwhile=nothing) as conn:
        found = Ledger(conn.dialect, name, joined.generation).read(conn)
        if found is None or found[0] != joined.generation or found[1] is not State.IN_PROGRESS:
            return None
        taken = shards.claim(conn, name, joined.run_id, me, seen())
        if taken is not None:
            return taken
    return _split(db, migration, joined, me, seen, split_below)


def _split(
    db: Database,
    migration: Migration,
    joined: Joined,
    me: Identity,
    seen: Callable[[], Liveness],
    split_below: int,
) -> ShardRecord | None:
    name, now = migration.name, seen()
    with db.read() as conn:
        held = [
            s for s in shards.load(conn, name) if shards.observed(s, now) is ShardState.IN_PROGRESS
        ]
        sizes = [(shards.remaining(conn, migration, s, 10 * split_below), s) for s in held]
    sizes = [(rows, s) for rows, s in sizes if rows > split_below]
    for rows, shard in sorted(sizes, key=lambda found: -found[0]):
        with db.write(meanwhile=nothing) as conn:
            records.lock(conn, name)  # one split at a time: each numbers a new shard
            plan = shards.load(conn, name)
            current = shards.locked(conn, name, shard.id)
            if (
                current.generation != shard.generation
                or current.state is not ShardState.IN_PROGRESS
            ):
                continue
            new_id = max(s.id for s in plan) + 1
            new = shards.split(
                conn, migration, current, rows // 2, new_id, joined.run_id, me, seen().now
            )
            if new is not None:
                return new
    return None


def nothing() -> None:
    """Between SQLite's tries for the write lock: nothing to refuse early (store.locks)."""

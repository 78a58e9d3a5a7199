"""The shards of a run with workers, under leases: claim, heartbeat, advance, let go, split.

A shard (a key range of the run's plan, store.plan) is held by one worker at a time, with a
generation of its own, as a migration is held by one runner. Every write of a shard's state goes
through `transition`, which enforces backfill.state's SHARD_TRANSITIONS with a compare-and-set
on the generation and the stored states; a worker's batch advances its shard only while it
holds it (`advance`: generation, run, state, and the upper bound it read with, so a split that
moved the bound meanwhile makes the batch roll back). Claims read the candidates locked with
`FOR UPDATE SKIP LOCKED` where the dialect locks rows, so a worker never queues behind another's
claim; SQLite has one writer at a time anyway. Counters live on the shards (a batch writes its
own shard's row only, so workers do not queue on one row) and are summed on read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from backfill.definition import Migration
from backfill.state import SHARD_TRANSITIONS, ShardState, check_shard, stored_shard
from backfill.store.dialects import LOCKING
from backfill.store.plan import Shard, bounded, driver_rows
from backfill.store.tables import migration_shards
from backfill.types import Identity, Key, Liveness, decode_key, encode_key

shards = migration_shards
COUNTERS = ("processed", "changed", "skipped_errors", "kept")


@dataclass(frozen=True)
class ShardRecord:
    """A `_migration_shards` row as stored (its state never `interrupted`)."""

    values: Mapping[str, Any]

    @property
    def id(self) -> int:
        return int(self.values["id"])

    @property
    def state(self) -> ShardState:
        return ShardState(self.values["state"])

    @property
    def generation(self) -> int:
        return int(self.values["generation"])

    @property
    def cursor(self) -> Key | None:
        return decode_key(self.values["cursor"])

    @property
    def bounds(self) -> Shard:
        return Shard(self.id, decode_key(self.values["lo"]), decode_key(self.values["hi"]))

    @property
    def holder(self) -> Identity | None:
        host, pid = self.values["runner_host"], self.values["runner_pid"]
        return None if host is None or pid is None else Identity(host, int(pid))

    def __getitem__(self, column: str) -> Any:
        return self.values[column]


def load(conn: sa.Connection, name: str) -> tuple[ShardRecord, ...]:
    """The plan of migration `name`, shard by shard; empty when it has none."""
    rows = conn.execute(
        sa.select(shards).where(shards.c.migration == name).order_by(shards.c.id)
    ).mappings()
    return tuple(ShardRecord(dict(row)) for row in rows)


def load_all(conn: sa.Connection) -> dict[str, tuple[ShardRecord, ...]]:
    found: dict[str, list[ShardRecord]] = {}
    for row in conn.execute(sa.select(shards).order_by(shards.c.migration, shards.c.id)).mappings():
        found.setdefault(row["migration"], []).append(ShardRecord(dict(row)))
    return {name: tuple(plan) for name, plan in found.items()}


def observed(shard: ShardRecord, seen: Liveness) -> ShardState:
    """The shard's state as people see it: held by a worker that is gone is `interrupted`."""
    stored = shard.state
    if stored is not ShardState.IN_PROGRESS:
        return stored
    if seen.holds(shard["heartbeat_at"], shard["runner_host"], shard["runner_pid"]):
        return stored
    return ShardState.INTERRUPTED


def transition(
    conn: sa.Connection,
    name: str,
    shard: ShardRecord,
    *,
    source: ShardState,
    target: ShardState,
    also: Mapping[str, Any] | None = None,
    **values: Any,
) -> bool:
    """The one write of a shard's state: checks SHARD_TRANSITIONS (`source` as observed), then
    compare-and-sets on the generation `shard` was read at, the stored states the table allows,
    and the columns of `also` (their values as read). False, with nothing written, when the
    shard changed meanwhile."""
    check_shard(source, target)
    allowed = sorted(
        {str(stored_shard(s)) for (s, t) in SHARD_TRANSITIONS if t is target and s is source}
    )
    statement = (
        _this(name, shard.id)
        .where(shards.c.generation == shard.generation)
        .where(shards.c.state.in_(allowed))
        .values(state=str(target), **values)
    )
    for column, expected in (also or {}).items():
        statement = statement.where(shards.c[column].is_not_distinct_from(expected))
    return bool(conn.execute(statement).rowcount == 1)


def _this(name: str, shard_id: int) -> sa.Update:
    return sa.update(shards).where(shards.c.migration == name).where(shards.c.id == shard_id)


def update_held(
    conn: sa.Connection,
    name: str,
    shard_id: int,
    generation: int,
    also: Mapping[str, Any] | None = None,
    **values: Any,
) -> bool:
    """A write to a shard held at `generation` (a batch's advance, a heartbeat), never to its
    state: False when it is no longer held at that generation (or `also` no longer holds)."""
    assert "state" not in values, "state changes go through transition()"
    statement = (
        _this(name, shard_id)
        .where(shards.c.generation == generation)
        .where(shards.c.state == str(ShardState.IN_PROGRESS))
        .values(**values)
    )
    for column, expected in (also or {}).items():
        statement = statement.where(shards.c[column].is_not_distinct_from(expected))
    return bool(conn.execute(statement).rowcount == 1)


def claim(
    conn: sa.Connection, name: str, run_id: int, me: Identity, seen: Liveness
) -> ShardRecord | None:
    """Take a free shard for `me` in the run `run_id`: one whose worker is gone first (its
    progress is furthest along), else the first pending one. None when every shard is done or
    held by a live worker (or being taken by another claim this instant).

    Where the dialect locks rows, each candidate is read again locked, one row at a time,
    skipping a row another claim holds (`FOR UPDATE SKIP LOCKED` on its key: one row locked,
    never the others), so claims at the same instant take different shards, none waits for
    another, and none finds nothing while a shard is free. The compare-and-set of `transition`
    is the guarantee; the lock spares the misses."""
    free = [s for s in load(conn, name) if observed(s, seen) in _CLAIMABLE]
    free.sort(key=lambda s: (observed(s, seen) is not ShardState.INTERRUPTED, s.id))
    for candidate in free:
        shard: ShardRecord | None = candidate
        if conn.dialect.name in LOCKING:
            shard = _locked_unless_held(conn, name, candidate.id)
            if shard is None or observed(shard, seen) not in _CLAIMABLE:
                continue
        assert shard is not None
        if transition(
            conn,
            name,
            shard,
            source=observed(shard, seen),
            target=ShardState.IN_PROGRESS,
            generation=shard.generation + 1,
            runner_host=me.host,
            runner_pid=me.pid,
            heartbeat_at=seen.now,
            released_at=None,
            run_id=run_id,
        ):
            return reload(conn, name, shard.id)
    return None


def _locked_unless_held(conn: sa.Connection, name: str, shard_id: int) -> ShardRecord | None:
    """The shard's row as committed, locked until this transaction ends; None when another
    transaction holds it."""
    row = (
        conn.execute(
            sa.select(shards)
            .where(shards.c.migration == name, shards.c.id == shard_id)
            .with_for_update(skip_locked=True)
        )
        .mappings()
        .first()
    )
    return None if row is None else ShardRecord(dict(row))


_CLAIMABLE = (ShardState.PENDING, ShardState.INTERRUPTED)


def reload(conn: sa.Connection, name: str, shard_id: int) -> ShardRecord:
    row = (
        conn.execute(sa.select(shards).where(shards.c.migration == name, shards.c.id == shard_id))
        .mappings()
        .one()
    )
    return ShardRecord(dict(row))


def locked(conn: sa.Connection, name: str, shard_id: int) -> ShardRecord:
    """The shard's row, locked until this transaction ends where the dialect locks rows (its
    holder's next advance then waits: a split reads a cursor that cannot move meanwhile)."""
    query = sa.select(shards).where(shards.c.migration == name, shards.c.id == shard_id)
    if conn.dialect.name in LOCKING:
        query = query.with_for_update()
    return ShardRecord(dict(conn.execute(query).mappings().one()))


def let_go(conn: sa.Connection, name: str, shard: ShardRecord, now: float) -> bool:
    """The holder lets its shard go, its cursor and counters kept, for another worker (or a
    later run) to take; False when it was no longer held by it."""
    return transition(
        conn,
        name,
        shard,
        source=ShardState.IN_PROGRESS,
        target=ShardState.PENDING,
        runner_host=None,
        runner_pid=None,
        heartbeat_at=None,
        released_at=now,
    )


def free_unfinished(conn: sa.Connection, name: str, run_id: int, seen: Liveness) -> bool:
    """A claim that resumes the run: every shard not done becomes pending under a new
    generation (a worker of the run before, should it wake, commits nothing). False when a
    shard changed meanwhile (the claim should then roll back)."""
    for shard in load(conn, name):
        source = observed(shard, seen)
        if source is ShardState.DONE:
            continue
        if not transition(
            conn,
            name,
            shard,
            source=source,
            target=ShardState.PENDING,
            generation=shard.generation + 1,
            runner_host=None,
            runner_pid=None,
            heartbeat_at=None,
            released_at=None,
            run_id=run_id,
        ):
            return False
    return True


def record_plan(conn: sa.Connection, name: str, plan: list[Shard], run_id: int) -> None:
    """Keep the plan of the run `run_id` (replacing an earlier one): every shard pending."""
    forget(conn, name)
    conn.execute(sa.insert(shards), [_new_row(name, s, run_id) for s in plan])


def _new_row(name: str, shard: Shard, run_id: int) -> dict[str, Any]:
    return {
        "migration": name,
        "id": shard.id,
        "lo": None if shard.lo is None else encode_key(shard.lo),
        "hi": None if shard.hi is None else encode_key(shard.hi),
        "state": str(ShardState.PENDING),
        "generation": 0,
        **dict.fromkeys(COUNTERS, 0),
        "run_id": run_id,
    }


def forget(conn: sa.Connection, name: str) -> None:
    """Drop the plan of migration `name` (a reset, or a run that starts from the beginning)."""
    conn.execute(sa.delete(shards).where(shards.c.migration == name))


def sums(plan: tuple[ShardRecord, ...]) -> dict[str, int]:
    """The counters of a plan, summed."""
    return {c: sum(int(s[c]) for s in plan) for c in COUNTERS}


def remaining(conn: sa.Connection, migration: Migration, shard: ShardRecord, cap: int) -> int:
    """Rows of the shard after its cursor, counted up to `cap`."""
    scoped = bounded(migration, shard.cursor or shard.bounds.lo, shard.bounds.hi)
    rows = sa.select(sa.literal(1)).select_from(scoped.table)
    if scoped.range is not None:
        rows = rows.where(scoped.range)
    counted = sa.select(sa.func.count()).select_from(rows.limit(cap).subquery())
    return int(driver_rows(conn, counted)[0][0])


def split(
    conn: sa.Connection,
    migration: Migration,
    shard: ShardRecord,
    skip: int,
    new_id: int,
    run_id: int,
    me: Identity,
    now: float,
) -> ShardRecord | None:
    """Split `shard` (held by another worker, read in this transaction) at the key `skip` rows
    past its cursor: it keeps the keys up to that one, and a new shard `new_id`, taken by `me`,
    gets the rest. None when the shard moved on meanwhile or has no such key (nothing written).
    The holder's next advance sees its upper bound moved and rolls back (store.shards.advance),
    so no row is done by both."""
    name, lo, hi = migration.name, shard.cursor or shard.bounds.lo, shard.bounds.hi
    scoped = bounded(migration, lo, hi)
    keys = sa.select(*scoped.key).select_from(scoped.table)
    if scoped.range is not None:
        keys = keys.where(scoped.range)
    keys = keys.order_by(*[c.asc() for c in scoped.key]).offset(skip).limit(1)
    found = driver_rows(conn, keys)
    if not found:
        return None
    at = tuple(found[0])
    moved = update_held(
        conn,
        name,
        shard.id,
        shard.generation,
        also={"hi": shard["hi"], "cursor": shard["cursor"]},
        hi=encode_key(at),
    )
    if not moved:
        return None
    conn.execute(sa.insert(shards).values(_new_row(name, Shard(new_id, at, hi), run_id)))
    new = reload(conn, name, new_id)
    taken = transition(
        conn,
        name,
        new,
        source=ShardState.PENDING,
        target=ShardState.IN_PROGRESS,
        generation=1,
        runner_host=me.host,
        runner_pid=me.pid,
        heartbeat_at=now,
    )
    assert taken, "a shard inserted in this transaction"
    return reload(conn, name, new_id)

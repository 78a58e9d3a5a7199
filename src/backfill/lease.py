"""Ownership of a migration by one runner: claim, heartbeat and release, with a generation number.

A runner owns a migration while its generation is the stored one. Taking over a dead runner's
migration bumps the generation, so every later commit of the old runner (which compares its
generation in the same transaction) is refused: a revived zombie can write nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from backfill.errors import BeingReverted, LeaseHeld, Refused
from backfill.history import Invocation, Kind
from backfill.state import ShardState, State
from backfill.store import history, records, shards, skipped
from backfill.store import undo as undo_log
from backfill.store.database import Database
from backfill.store.plan import Shard
from backfill.store.records import Record
from backfill.types import Clock, Identity, Key, Liveness, process_alive

# Makes a run's plan, in its claim's transaction: the range after a cursor (None: all of it).
Planner = Callable[[sa.Connection, Key | None], list[Shard]]

DEFAULT_LEASE_SECONDS = 30.0


def observed_state(
    record: Record | None,
    now: float,
    lease: float,
    here: Identity,
    alive: Callable[[int], bool] = process_alive,
) -> State:
    """The state as people see it: a stored inProgress whose runner is gone is interrupted:
    its heartbeat is older than `lease` seconds, or it ran on this host and `alive(pid)` says
    its process is gone. A run with a plan (workers) is in progress while its runner (who
    claimed it) is, or a shard is held by a live worker, or, when no shard is held by a worker
    known to be gone (on this host: seen at once), one was let go or finished less than `lease`
    seconds ago (the steps of a job queue, one after another, are one run)."""
    if record is None:
        return State.PENDING
    stored = record.state
    if stored is not State.IN_PROGRESS:
        return stored
    seen = Liveness(now, lease, here, alive)
    if live_holders(record, seen):
        return State.IN_PROGRESS
    held = [s for s in record.plan if s.state is ShardState.IN_PROGRESS]
    if any(seen.gone(s["runner_host"], s["runner_pid"]) for s in held):
        return State.INTERRUPTED
    if any(seen.recent(s["released_at"]) for s in record.plan):
        return State.IN_PROGRESS
    return State.INTERRUPTED


def reverting_live(record: Record | None, seen: Liveness) -> bool:
    """Whether a live revert holds the migration (its own state inProgress, its runner alive)."""
    return (
        record is not None
        and record.state is State.REVERTING
        and record["revert_state"] == str(State.IN_PROGRESS)
        and seen.holds(record["heartbeat_at"], record["runner_host"], record["runner_pid"])
    )


def live_holders(record: Record, seen: Liveness) -> list[Identity]:
    """Who holds the migration and is alive: its runner, and the workers holding its shards."""
    found: list[Identity] = []
    if seen.holds(record["heartbeat_at"], record["runner_host"], record["runner_pid"]):
        found.append(Identity(record["runner_host"], record["runner_pid"]))
    for shard in record.plan:
        holder = shard.holder
        if shards.observed(shard, seen) is ShardState.IN_PROGRESS and holder not in found:
            assert holder is not None
            found.append(holder)
    return found


def refuse_if_live(
    name: str,
    record: Record | None,
    observed: State,
    seen: Liveness | None = None,
) -> None:
    """LeaseHeld naming the live holders when the migration is observed in progress, or a live
    revert holds it."""
    if record is not None and seen is not None and reverting_live(record, seen):
        raise LeaseHeld(name, record["runner_host"], record["runner_pid"])
    if observed is not State.IN_PROGRESS or record is None:
        return
    holders = [] if seen is None else live_holders(record, seen)
    if not holders:
        raise LeaseHeld(name, record["runner_host"], record["runner_pid"])
    first, *rest = holders
    others = [(h.host, h.pid) for h in rest]
    raise LeaseHeld(name, first.host, first.pid, others, workers=bool(record.plan))


def refuse_if_held(db: Database, name: str, *, now: float, lease: float, me: Identity) -> None:
    """Refuse at once, from a read transaction, when a live runner holds the migration.

    On SQLite that very runner takes the write lock batch after batch, and a waiting writer is
    starved by SQLite's busy handler (it retries every 100 ms and rarely hits the gap between two
    batches): a refusal must not wait for the write lock. Callers check again under it."""
    with db.read() as conn:
        record = records.load(conn, name)
    refuse_if_live(name, record, observed_state(record, now, lease, me), Liveness(now, lease, me))


@dataclass(frozen=True)
class Undo:
    """Whether a run logs its changes to undo them: as `asked` (None: not said), else as the
    run it resumes did, else (a run from the beginning) `default` (prod: where it can)."""

    asked: bool | None = None
    default: bool = False


# A run that says nothing of undo: as the run it resumes, else no log.
NOT_ASKED = Undo()


@dataclass(frozen=True)
class Claim:
    """A migration this runner now holds: its record as claimed, and the state it came from."""

    record: Record
    source: State

    @property
    def generation(self) -> int:
        return self.record.generation

    @property
    def run_id(self) -> int:
        return int(self.record["run_id"])


def enter(
    db: Database,
    name: str,
    *,
    now: float,
    lease: float,
    me: Identity,
    restart: bool,
    scan: str,
    total: int | None,
    batch_size: int,
    total_is_estimate: bool = False,
    planner: Planner | None = None,
    invocation: Invocation | None = None,
    undo: Undo | None = None,
) -> Claim | None:
    """Claim the migration for this runner, in one transaction: a new generation and a new run
    (its `run_id`). None when it already succeeded and no restart.
    Two claimants at the same instant: one wins the compare-and-set of `records.transition`,
    the other gets LeaseHeld naming it, and its transaction leaves nothing behind.

    With a `planner` (a run with workers) the run has a plan: a run from the beginning, or one
    resuming a run without a plan (after its cursor), gets a plan from `planner(conn, cursor)`;
    a run resuming one with a plan frees its unfinished shards, cursors kept. Without one, a
    run from the beginning drops an old plan; a run with a plan is the workers' to resume
    (Runner.run hands such a run to one).

    The run's history row is written in the same transaction, with `invocation`: who asked.
    `undo`: whether the run logs its changes to undo them; a resume that asks otherwise than
    the run it resumes did is refused: one run, one choice."""

    def refuse_if_taken() -> None:
        refuse_if_held(db, name, now=now, lease=lease, me=me)

    refuse_if_taken()
    with db.write(meanwhile=refuse_if_taken) as conn:
        record = records.ensure_record(conn, name)
        observed = observed_state(record, now, lease, me)
        refuse_if_live(name, record, observed, Liveness(now, lease, me))
        if observed is State.REVERTING:
            raise BeingReverted(name)
        if observed is State.SUCCESS and not restart:
            return None
        fresh = restart or observed is State.PENDING or (record.cursor is None and not record.plan)
        logs = _logs(name, record, fresh, undo or NOT_ASKED)
        # Batches committed without the log since it began: a revert could not restore them.
        unlogged = not logs or (bool(record["unlogged"]) and undo_log.count(conn, name) > 0)
        if not fresh and planner is None and record.plan:
            raise Refused(f"migration {name!r} has a plan: resume it with `backfill worker`")
        run_id = history.begin(
            conn,
            name,
            kind=Kind.RUN,
            invocation=invocation or Invocation(),
            database=db.display_url,
            now=now,
            me=me,
            before=dict.fromkeys(shards.COUNTERS, 0) if fresh else record.totals(),
            backup=record["backup_path"],
        )
        values: dict[str, object] = {}
        if fresh:
            values.update(
                cursor=None, processed=0, changed=0, skipped_errors=0, kept=0, started_at=now
            )
        values.update(taken(record, run_id, me, now))
        values.update(
            scan=scan,
            run_processed_start=0 if fresh else record.totals()["processed"],
            total=total,
            total_is_estimate=total_is_estimate,
            batch_size=batch_size,
            undo=logs,
            unlogged=unlogged,
        )
        records.transition(
            conn,
            name,
            at_generation=record.generation,
            source=observed,
            target=State.IN_PROGRESS,
            **values,
        )
        if fresh:
            skipped.forget(conn, name)
            shards.forget(conn, name)
        if planner is not None:
            if fresh or not record.plan:
                after = None if fresh else record.cursor
                shards.record_plan(conn, name, planner(conn, after), run_id)
            elif not shards.free_unfinished(conn, name, run_id, Liveness(now, lease, me)):
                raise Refused(f"migration {name!r} changed meanwhile; nothing was done, try again")
        claimed = records.load(conn, name)
        assert claimed is not None
        return Claim(claimed, observed)


def taken(record: Record, run_id: int, me: Identity, now: float) -> dict[str, object]:
    """What a claim (of a run, or a revert) writes of its lease on the migration's row: a new
    generation, its run, its runner and heartbeat, no end, no cancel request, no error."""
    return {
        "generation": record.generation + 1,
        "run_id": run_id,
        "runner_host": me.host,
        "runner_pid": me.pid,
        "heartbeat_at": now,
        "updated_at": now,
        "run_started_at": now,
        "finished_at": None,
        "cancel_requested": False,
        "error_message": None,
        "error_type": None,
        "error_row_id": None,
        "error_field": None,
    }


def _logs(name: str, record: Record, fresh: bool, undo: Undo) -> bool:
    """Whether the run being claimed logs its changes: as asked, or as the run it resumes."""
    before = record["undo"]
    if fresh or before is None:
        return undo.default if undo.asked is None else undo.asked
    if undo.asked is not None and undo.asked != bool(before):
        how = "with" if before else "without"
        raise Refused(
            f"migration {name!r} was run {how} --undo; resume it {how} --undo (one run, one "
            f"choice), or start over with `backfill run {name} --restart`"
        )
    return bool(before)


def leave(
    db: Database, name: str, generation: int, target: State, now: float, **values: object
) -> None:
    """Record the end of a run (success, failed, canceled); LeaseLost if this runner no longer
    owns it."""
    with db.write() as conn:
        records.transition(
            conn,
            name,
            at_generation=generation,
            source=State.IN_PROGRESS,
            target=target,
            finished_at=now,
            updated_at=now,
            heartbeat_at=None,
            **values,
        )


class Heartbeat:
    """Beats in a background thread so a slow batch or a pause never looks like a dead holder:
    every `interval` seconds `beat(conn)` writes the heartbeat in a transaction of its own and
    says whether the lease is still held; `lost` is set once it is not."""

    def __init__(
        self, db: Database, beat: Callable[[sa.Connection], bool], interval: float, name: str
    ) -> None:
        self._db, self._write, self._interval = db, beat, interval
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=name, daemon=True)

    @classmethod
    def of_run(
        cls,
        db: Database,
        name: str,
        generation: int,
        interval: float,
        clock: Clock,
        state: State = State.IN_PROGRESS,
    ) -> Heartbeat:
        """The heartbeat of one runner's run (`state`: a revert's, reverting), on the
        migration's row."""

        def beat(conn: sa.Connection) -> bool:
            return records.update_live(conn, name, generation, state=state, heartbeat_at=clock())

        return cls(db, beat, interval, f"heartbeat-{name}")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                with self._db.write() as conn:
                    held = self._write(conn)
            except Exception:  # noqa: BLE001 - a missed beat is retried; the lease absorbs it
                continue
            if not held and not self._stop.is_set():
                self.lost.set()
                return

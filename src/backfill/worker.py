"""A worker of a run with a plan: it starts the run or joins it, then takes shards one at a time
and runs each one's batches under the shard's own lease, until it can claim or split nothing
more. The run ends by one transition, whichever worker gets there: `success` after the last
shard is done, `failed` at the first row failure (the first error is kept; the others stop
after their batch), `canceled` on request. `Runner.work` (the `worker` command, and each of the
processes of `run --workers N`) and `Runner.step` (a time slice for a job queue) drive it; what
happens inside a batch is `backfill.batch`'s, with the shard's row as its position.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any

import sqlalchemy as sa

from backfill import lease as leases
from backfill import retry
from backfill.batch import Batches, Stored
from backfill.decision import OnError
from backfill.definition import Migration
from backfill.errors import BackfillError, LeaseHeld, LeaseLost, RowFailed
from backfill.events import (
    BatchCommitted,
    Emitter,
    RunError,
    RunFinished,
    RunStarted,
    StateChanged,
    shown_key,
)
from backfill.progress import MigrationStatus
from backfill.run import Run
from backfill.state import ShardState, State
from backfill.stop_signals import StopSignals
from backfill.store import plan as plans
from backfill.store import records, shards
from backfill.store.database import Database
from backfill.store.records import Ledger, Record
from backfill.store.shards import ShardRecord
from backfill.types import Clock, Identity, Liveness


class ShardMoved(Exception):
    """A split moved the upper bound of the shard a batch was working (store.shards.split): the
    batch rolled back, and the worker goes on within the new bound."""


@dataclass(frozen=True)
class Joined:
    """The run a worker works in: its generation (of the migration's row), its number, and the
    state the worker's claim started it from (None: it joined a run in progress)."""

    generation: int
    run_id: int
    source: State | None


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
            moved = shards.transition(
                conn,
                self.name,
                held,
                source=ShardState.IN_PROGRESS,
                target=ShardState.DONE,
                also=also,
                runner_host=None,
                runner_pid=None,
                **values,
            )
        else:
            moved = shards.update_held(conn, self.name, held.id, held.generation, also, **values)
        if not moved:
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


class Ending(Enum):
    """Why a worker stopped working a shard."""

    DONE = "done"  # the shard's range is exhausted
    STOPPED = "stopped"  # the run ended, or was asked to stop
    BUDGET = "budget"  # a step's time is spent
    LEFT = "left"  # this worker was asked to stop (a signal)


@dataclass(frozen=True)
class WorkResult:
    """What a worker (or a step) did: rows it processed, and the migration's status after."""

    name: str
    status: MigrationStatus
    processed: int = 0
    already_done: bool = False
    left: bool = False  # stopped by a signal, the run going on without it
    error: RowFailed | retry.RetriesExhausted | None = None

    @property
    def state(self) -> State:
        return self.status.state

    @property
    def exit_code(self) -> int:
        """The contract's: the run's outcome if it ended (0, 1 failed on a row, 4 the database,
        3 canceled), else 0 (others are finishing it); 3 for a worker stopped by a signal."""
        if self.error is not None:
            return self.error.exit_code
        state = self.state
        if state is State.FAILED:
            error = self.status.error
            return 1 if error is not None and error.row_id is not None else 4
        return 3 if state is State.CANCELED or self.left else 0


class Worker:
    """One worker of `migration`'s run with a plan, in this process (`me`)."""

    def __init__(
        self,
        db: Database,
        migration: Migration,
        *,
        clock: Clock,
        lease_seconds: float,
        me: Identity,
        retry_policy: retry.RetryPolicy,
        sleep: Callable[[float], None],
        emit: Emitter,
        status: Callable[[str], MigrationStatus],
    ) -> None:
        self.db, self.migration, self.name = db, migration, migration.name
        self.clock, self.lease_seconds, self.me = clock, lease_seconds, me
        self.retry_policy, self.sleep, self.emit = retry_policy, sleep, emit
        self._status = status
        self._run = Run(
            db,
            migration,
            clock=clock,
            lease_seconds=lease_seconds,
            me=me,
            retry_policy=retry_policy,
            sleep=sleep,
            emit=emit,
            status=status,
            observed=self._observed,
        )

    def _seen(self) -> Liveness:
        return Liveness(self.clock(), self.lease_seconds, self.me)

    def _observed(self, record: Record | None) -> State:
        seen = self._seen()
        return leases.observed_state(record, seen.now, seen.lease, seen.here, seen.alive)

    def _record(self) -> Record | None:
        with self.db.read() as conn:
            return records.load(conn, self.name)

    # -- the run: start or join --------------------------------------------------------------

    def join(
        self,
        size: int,
        *,
        restart: bool = False,
        workers: int | None = None,
        start_from: frozenset[State] | None = None,
        join: bool = True,
    ) -> Joined | None:
        """Join the run in progress, or start or resume one exactly as `run` would (`workers`
        sets the plan's size: 4 x N shards, 16 without). None when the migration succeeded and
        no restart was asked, or (`start_from`) its state is not one a run may start from.
        LeaseHeld, naming the holders, when one runner without a plan holds it, or any holds
        it and `join` is false (`run`, which never joins: it starts a run or is refused)."""
        for _ in range(5):
            record = self._record()
            observed = self._observed(record)
            if observed is State.IN_PROGRESS and record is not None:
                if not record.plan or restart or not join:
                    leases.refuse_if_live(self.name, record, observed, self._seen())
                joined = Joined(record.generation, int(record["run_id"]), None)
                self._started(joined, record, workers)
                return joined
            if start_from is not None and observed not in start_from:
                return None
            try:
                claim = self._run.claim(size, restart, planner=self._planner(workers, size))
            except LeaseHeld:
                if not join:
                    raise
                continue  # another worker started it this instant: join it
            if claim is None:
                return None
            joined = Joined(claim.generation, claim.run_id, claim.source)
            self.emit(StateChanged(self.name, self.clock(), str(claim.source), "inProgress"))
            self._started(joined, claim.record, workers)
            return joined
        raise LeaseHeld(self.name, None, None)  # pragma: no cover - five races lost in a row

    def _started(self, joined: Joined, record: Record, workers: int | None) -> None:
        processed = int(record["processed"]) + shards.sums(record.plan)["processed"]
        self.emit(
            RunStarted(
                self.name, self.clock(), joined.run_id, workers or 1, record["total"], processed
            )
        )

    def _planner(self, workers: int | None, size: int) -> leases.Planner:
        def make(conn: sa.Connection, after: Any) -> list[plans.Shard]:
            scoped = plans.bounded(self.migration, after, None)
            rows = self.db.total_rows(scoped.table, scoped.range)[0]
            return plans.plan(
                conn, self.migration, plans.shard_count(workers, rows, size), after=after
            )

        return make

    # -- shards ------------------------------------------------------------------------------

    def take(self, joined: Joined, *, split_below: int) -> ShardRecord | None:
        """A shard for this worker: a free one, else the tail of the largest shard another
        worker holds, split past its cursor (when more than `split_below` rows are left of it).
        None when there is nothing to take, or the run is no longer `joined`."""
        seen = self._seen()
        with self.db.write(meanwhile=_nothing) as conn:
            found = Ledger(conn.dialect, self.name, joined.generation).read(conn)
            if found is None or found[0] != joined.generation or found[1] is not State.IN_PROGRESS:
                return None
            taken = shards.claim(conn, self.name, joined.run_id, self.me, seen)
            if taken is not None:
                return taken
        return self._split(joined, split_below)

    def _split(self, joined: Joined, split_below: int) -> ShardRecord | None:
        seen = self._seen()
        with self.db.read() as conn:
            held = [
                s
                for s in shards.load(conn, self.name)
                if shards.observed(s, seen) is ShardState.IN_PROGRESS
            ]
            sizes = [(shards.remaining(conn, self.migration, s, 10 * split_below), s) for s in held]
        sizes = [(rows, s) for rows, s in sizes if rows > split_below]
        for rows, shard in sorted(sizes, key=lambda found: -found[0]):
            with self.db.write(meanwhile=_nothing) as conn:
                records.lock(conn, self.name)  # one split at a time: each numbers a new shard
                plan = shards.load(conn, self.name)
                now = shards.locked(conn, self.name, shard.id)
                if now.generation != shard.generation or now.state is not ShardState.IN_PROGRESS:
                    continue
                new = shards.split(
                    conn,
                    self.migration,
                    now,
                    rows // 2,
                    max(s.id for s in plan) + 1,
                    joined.run_id,
                    self.me,
                    self.clock(),
                )
                if new is not None:
                    return new
        return None

    def work_shard(
        self,
        joined: Joined,
        shard: ShardRecord,
        size: int,
        policy: OnError,
        pause: float,
        signals: StopSignals,
        sql: bool,
        deadline: float | None = None,
    ) -> tuple[Ending, int, RowFailed | retry.RetriesExhausted | None]:
        """Run the shard's batches until its range is exhausted, the run stops, a signal comes
        or the `deadline` (a step's) passes: (why it stopped, rows processed, the failure that
        ended the run, if this worker's). The shard is done, or let go with its cursor kept."""
        processed = 0
        interval = max(self.lease_seconds / 3, 0.05)
        with ShardHeartbeat(self.db, self.name, shard, interval, self.clock) as beat:
            while True:
                position = ShardPosition(self.db, self.name, joined, shard)
                scoped = plans.bounded(self.migration, shard.bounds.lo, shard.bounds.hi)
                try:
                    with Batches(
                        self.db, scoped, position, size, policy, self.clock, sql=sql
                    ) as batches:
                        ending, rows = self._batches(shard, batches, pause, beat, signals, deadline)
                        processed += rows
                except ShardMoved:
                    shard = self._reload(shard)
                    beat.shard = shard
                    continue
                except (retry.RetriesExhausted, RowFailed) as failure:
                    self._fail(joined, failure)
                    self._let_go(shard)
                    return Ending.STOPPED, processed, failure
                if ending is Ending.DONE:
                    self._finish_if_last(joined)
                    return ending, processed, None
                if ending is Ending.STOPPED:
                    self._stop(joined)
                self._let_go(position.shard)
                return ending, processed, None

    def _batches(
        self,
        shard: ShardRecord,
        batches: Batches,
        pause: float,
        beat: ShardHeartbeat,
        signals: StopSignals,
        deadline: float | None,
    ) -> tuple[Ending, int]:
        processed = 0
        while True:
            if beat.lost.is_set():
                raise LeaseLost(self.name)
            if signals.received is not None:
                return Ending.LEFT, processed
            if deadline is not None and self.clock() >= deadline:
                return Ending.BUDGET, processed
            batch = retry.call(
                batches.next,
                migration=self.name,
                policy=self.retry_policy,
                classify=self.db.transient,
                recover=batches.recover,
                sleep=self.sleep,
                on_retry=partial(retry.log_retry, self.name, self.retry_policy.attempts),
            )
            if batch is None:
                return Ending.STOPPED, processed
            processed += batch.rows_read
            self.emit(
                BatchCommitted(
                    self.name,
                    self.clock(),
                    shard.id,
                    shown_key(batch.first_key),
                    shown_key(batch.last_key),
                    batch.rows_read,
                    batch.rows_changed,
                    round(batch.seconds, 6),
                    batch.batch_size,
                    batches.processed,  # the shard's
                    None,
                )
            )
            if batch.done:
                return Ending.DONE, processed
            if pause > 0:
                self.sleep(pause)

    def _reload(self, shard: ShardRecord) -> ShardRecord:
        with self.db.read() as conn:
            now = shards.reload(conn, self.name, shard.id)
        if now.generation != shard.generation or now.state is not ShardState.IN_PROGRESS:
            raise LeaseLost(self.name)
        return now

    def _let_go(self, shard: ShardRecord) -> None:
        with self.db.write(meanwhile=_nothing) as conn:
            now = shards.reload(conn, self.name, shard.id)
            if now.generation == shard.generation and now.state is ShardState.IN_PROGRESS:
                shards.let_go(conn, self.name, now, self.clock())

    # -- the run's end: one transition, whichever worker gets there ---------------------------

    def _end(self, joined: Joined, target: State, **values: Any) -> bool:
        """Move the run from inProgress to `target`; False when another worker (or a claim)
        got there first, which is not an error for a worker."""
        try:
            with self.db.write(meanwhile=_nothing) as conn:
                if target is State.SUCCESS and not all(
                    s.state is ShardState.DONE for s in shards.load(conn, self.name)
                ):
                    return False
                records.transition(
                    conn,
                    self.name,
                    at_generation=joined.generation,
                    source=State.IN_PROGRESS,
                    target=target,
                    finished_at=self.clock(),
                    updated_at=self.clock(),
                    heartbeat_at=None,
                    **values,
                )
        except LeaseLost:
            return False
        self.emit(StateChanged(self.name, self.clock(), str(State.IN_PROGRESS), str(target)))
        return True

    def _finish_if_last(self, joined: Joined) -> None:
        # Each worker looks after its own commit: the last shard's worker sees every one done.
        self._end(joined, State.SUCCESS)

    def end_if_done(self, joined: Joined) -> bool:
        """Whether the run has ended; when every shard is done, it ends with `success` (even
        if the worker of the last shard died before it could say so)."""
        record = self._record()
        if record is None or record.state is not State.IN_PROGRESS:
            return True
        if record.generation != joined.generation:
            return True
        if record.plan and all(s.state is ShardState.DONE for s in record.plan):
            self._end(joined, State.SUCCESS)
            return True
        return False

    def _stop(self, joined: Joined) -> None:
        record = self._record()
        if record is not None and record.state is State.IN_PROGRESS and record["cancel_requested"]:
            self._end(joined, State.CANCELED)

    def _fail(self, joined: Joined, failure: RowFailed | retry.RetriesExhausted) -> None:
        row = failure if isinstance(failure, RowFailed) else None
        if self._end(
            joined,
            State.FAILED,
            error_message=failure.message,
            error_type=failure.error_type,
            error_row_id=None if row is None else json.dumps(row.row_id, default=str),
            error_field=None if row is None else row.field,
        ):
            self.emit(
                RunError(
                    self.name,
                    self.clock(),
                    failure.message,
                    failure.error_type,
                    None if row is None else row.row_id,
                    None if row is None else row.field,
                )
            )

    def cancel(self, joined: Joined, *, alone_only: bool) -> None:
        """After a signal stopped this worker: cancel the run (`alone_only`: only when no other
        worker holds a shard, so a lone worker's Ctrl-C means what it means for `run`, and one
        of many leaving lets the others go on)."""
        record = self._record()
        if record is None or record.state is not State.IN_PROGRESS:
            return
        seen = self._seen()
        others = [
            s
            for s in record.plan
            if shards.observed(s, seen) is ShardState.IN_PROGRESS and s.holder != self.me
        ]
        if not (alone_only and others):
            self._end(joined, State.CANCELED)

    def finished(self, joined: Joined, result: WorkResult) -> WorkResult:
        self.emit(
            RunFinished(
                self.name,
                self.clock(),
                str(result.state),
                result.exit_code,
                joined.run_id,
            )
        )
        return result

    def end_by_error(self, joined: Joined, error: BackfillError) -> None:
        state: str | None
        try:
            state = str(self._status(self.name).state)
        except BackfillError:
            state = None
        self.emit(RunFinished(self.name, self.clock(), state, error.exit_code, joined.run_id))


def _nothing() -> None:
    """Between SQLite's tries for the write lock: nothing to refuse early (store.locks)."""


class ShardHeartbeat:
    """Beats the held shard's heartbeat in a background thread, so a slow batch or a pause never
    looks like a dead worker; `lost` when the shard was taken over."""

    def __init__(
        self, db: Database, name: str, shard: ShardRecord, interval: float, clock: Clock
    ) -> None:
        self._db, self._name, self.shard = db, name, shard
        self._interval, self._clock = interval, clock
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"heartbeat-{name}-{shard.id}", daemon=True
        )

    def __enter__(self) -> ShardHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            shard = self.shard
            try:
                with self._db.write() as conn:
                    held = shards.update_held(
                        conn, self._name, shard.id, shard.generation, heartbeat_at=self._clock()
                    )
            except Exception:  # noqa: BLE001 - a missed beat is retried; the lease absorbs it
                continue
            if not held and not self._stop.is_set():
                self.lost.set()
                return

"""A worker of a run with a plan: it starts the run or joins it, then takes shards one at a time
and runs each one's batches under the shard's own lease, until it can claim or split nothing
more. The run ends by one transition, whichever worker gets there: `success` after the last
shard is done, `failed` at the first row failure (the first error is kept; the others stop
after their batch), `canceled` on request. `Runner.work` (the `worker` command, and each of the
processes of `run --workers N`) and `Runner.step` (a time slice for a job queue) drive it; what
happens inside a batch is `backfill.batch`'s, with the shard's row as its position.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

import sqlalchemy as sa

from backfill import lease as leases
from backfill import retry
from backfill.batch import Batches
from backfill.decision import OnError
from backfill.errors import BackfillError, LeaseHeld, LeaseLost, RowFailed
from backfill.events import (
    RunFinished,
    RunStarted,
    StateChanged,
)
from backfill.progress import MigrationStatus
from backfill.run import Run
from backfill.run_end import RunEnd
from backfill.shard import Joined, ShardMoved, ShardPosition, nothing, take
from backfill.shard import heartbeat as shard_heartbeat
from backfill.state import ShardState, State
from backfill.stop_signals import StopSignals
from backfill.store import plan as plans
from backfill.store import records, shards
from backfill.store.records import Record
from backfill.store.shards import ShardRecord
from backfill.store.undo import UndoLog
from backfill.types import Liveness

# A worker with nothing to claim splits a shard with more than this many batches left.
SPLIT_BELOW_BATCHES = 4


class Ending(Enum):
    """Why a worker stopped working a shard."""

    DONE = "done"  # the shard's range is exhausted
    STOPPED = "stopped"  # the run ended, or was asked to stop
    BUDGET = "budget"  # a step's time is spent
    LEFT = "left"  # this worker was asked to stop (a signal)


@dataclass(frozen=True)
class StepResult:
    """What a step did: `more` (the run goes on: step again), `done` (it succeeded), the
    migration's `state` after it, `held_until` (None until holds exist) and the rows it
    processed."""

    more: bool
    done: bool
    state: State
    held_until: datetime | None
    processed: int


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
    """One worker of a migration's run with a plan, in this process."""

    def __init__(self, run: Run) -> None:
        """`run` is what one runner would do: the claim a worker makes when it starts a run."""
        self._run = run
        self.db, self.migration, self.name = run.db, run.migration, run.name
        self.clock, self.lease_seconds, self.me = run.clock, run.lease_seconds, run.me
        self.retry_policy, self.sleep, self.emit = run.retry_policy, run.sleep, run.emit
        self._status = run.status

    def _seen(self) -> Liveness:
        return Liveness(self.clock(), self.lease_seconds, self.me)

    def _observed(self, record: Record | None) -> State:
        return self._run.observed(record)

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
        undo: leases.Undo = leases.NOT_ASKED,
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
                joined = Joined(record.generation, int(record["run_id"]), bool(record["undo"]))
                self._started(joined, record, workers)
                return joined
            if start_from is not None and observed not in start_from:
                return None
            try:
                claim = self._run.claim(
                    size, restart, planner=self._planner(workers, size), undo=undo
                )
            except LeaseHeld:
                if not join:
                    raise
                continue  # another worker started it this instant: join it
            if claim is None:
                return None
            joined = Joined(claim.generation, claim.run_id, bool(claim.record["undo"]))
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
        """A shard for this worker, claimed or split off another's (shard.take)."""
        return take(self.db, self.migration, joined, self.me, self._seen, split_below)

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
        with shard_heartbeat(self.db, self.name, lambda: shard, interval, self.clock) as beat:
            while True:
                position = ShardPosition(self.db, self.name, joined, shard)
                scoped = plans.bounded(self.migration, shard.bounds.lo, shard.bounds.hi)
                try:
                    log = UndoLog(self.name, joined.run_id) if joined.undo else None
                    with Batches(
                        self.db, scoped, position, size, policy, self.clock, sql=sql, undo=log
                    ) as batches:
                        ending, rows = self._batches(shard, batches, pause, beat, signals, deadline)
                        processed += rows
                except ShardMoved:
                    shard = self._reload(shard)  # (the heartbeat reads it)
                    continue
                except (retry.RetriesExhausted, RowFailed) as failure:
                    self._end(joined).fail(failure)
                    self._let_go(shard)
                    return Ending.STOPPED, processed, failure
                if ending is Ending.DONE:
                    self._end(joined).to(State.SUCCESS)
                    return ending, processed, None
                if ending is Ending.STOPPED:
                    self._end(joined).cancel_if_asked()
                self._let_go(position.shard)
                return ending, processed, None

    def _batches(
        self,
        shard: ShardRecord,
        batches: Batches,
        pause: float,
        beat: leases.Heartbeat,
        signals: StopSignals,
        deadline: float | None,
    ) -> tuple[Ending, int]:
        processed = 0
        while True:
            if beat.lost.is_set():
                raise LeaseLost(self.name)
            if signals.received is not None:
                return Ending.LEFT, processed
            if deadline is not None and processed and self.clock() >= deadline:
                return Ending.BUDGET, processed  # (a step does at least one batch)
            batch = batches.next_retried(self.retry_policy, self.sleep)
            if batch is None:
                return Ending.STOPPED, processed
            processed += batch.rows_read
            # A shard's batch event counts the shard's rows.
            self.emit(batch.event(self.name, self.clock(), shard.id, batches.processed, None))
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
        with self.db.write(meanwhile=nothing) as conn:
            now = shards.reload(conn, self.name, shard.id)
            if now.generation == shard.generation and now.state is ShardState.IN_PROGRESS:
                shards.let_go(conn, self.name, now, self.clock())

    def _end(self, joined: Joined) -> RunEnd:
        return RunEnd(
            self.db,
            self.name,
            joined,
            clock=self.clock,
            emit=self.emit,
            seen=self._seen,
            me=self.me,
        )

    # -- a worker until nothing is left, and a step ---------------------------------------------

    def join_and_work(
        self,
        size: int,
        policy: OnError,
        pause: float,
        sql: bool,
        *,
        restart: bool = False,
        wait: bool = False,
        workers: int | None = None,
        run: bool = False,
        undo: leases.Undo = leases.NOT_ASKED,
    ) -> WorkResult:
        """Join or start the run (`run` never joins one: it starts a run or is refused), then
        work it until nothing is left (`work`)."""
        joined = self.join(size, restart=restart, workers=workers, join=not run, undo=undo)
        if joined is None:
            return WorkResult(self.name, self._status(self.name), already_done=True)
        return self.work(joined, size, policy, pause, sql, wait=wait, signal_cancels=run)

    def work(
        self,
        joined: Joined,
        size: int,
        policy: OnError,
        pause: float,
        sql: bool,
        *,
        wait: bool,
        signal_cancels: bool,
    ) -> WorkResult:
        """Take shards one at a time until none is left to claim or split (`wait`: until the
        run ends). A signal stops this worker after its batch and lets its shard go; with
        `signal_cancels` (`run`) it cancels the run, else only when no other worker holds a
        shard (the others go on)."""
        processed, left = 0, False
        error: RowFailed | retry.RetriesExhausted | None = None
        end = self._end(joined)
        try:
            with StopSignals() as signals:
                while error is None and not left:
                    shard = self.take(joined, split_below=SPLIT_BELOW_BATCHES * size)
                    if shard is None:
                        if end.ended() or not wait:
                            break
                        left = signals.received is not None
                        self.sleep(min(1.0, self.lease_seconds / 3))
                        continue
                    ending, rows, error = self.work_shard(
                        joined, shard, size, policy, pause, signals, sql
                    )
                    processed += rows
                    left = ending is Ending.LEFT
                    if ending is Ending.STOPPED:
                        break
                if left:
                    end.cancel(alone_only=not signal_cancels)
        except BackfillError as failure:
            self._finished_by(joined, failure)
            raise
        status = self._status(self.name)
        return self._finished(
            joined, WorkResult(self.name, status, processed, left=left, error=error)
        )

    def step(self, joined: Joined, size: int, policy: OnError, sql: bool, budget: float) -> int:
        """One shard's batches for about `budget` seconds (at least one batch), then let it go:
        the rows processed (0 when there was nothing to take)."""
        deadline = self.clock() + budget
        shard = self.take(joined, split_below=SPLIT_BELOW_BATCHES * size)
        if shard is None:
            self._end(joined).ended()
            return 0
        _ending, processed, _failure = self.work_shard(
            joined, shard, size, policy, 0.0, StopSignals(), sql, deadline
        )
        return processed

    def _finished(self, joined: Joined, result: WorkResult) -> WorkResult:
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

    def _finished_by(self, joined: Joined, error: BackfillError) -> None:
        state: str | None
        try:
            state = str(self._status(self.name).state)
        except BackfillError:
            state = None
        self.emit(RunFinished(self.name, self.clock(), state, error.exit_code, joined.run_id))

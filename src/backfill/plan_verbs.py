"""The Runner's verbs for runs with a plan, worked by workers or a job queue's steps: `work`
(the `worker` command), `begin` (`run --workers N`, before it starts its workers) and `step`.
A part of `Runner` (backfill.runner), kept apart so that each module says one thing; its
methods use the Runner's own (`RunnerParts`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Protocol

from backfill import lease as leases
from backfill.decision import OnError
from backfill.definition import Migration
from backfill.events import Emitter, Listener
from backfill.history import Invocation, Origin
from backfill.progress import MigrationStatus
from backfill.state import State
from backfill.store.database import Database
from backfill.worker import StepResult, Worker, WorkResult


class RunnerParts(Protocol):
    """What these verbs use of the Runner."""

    db: Database
    listeners: list[Listener]
    invocation: Invocation

    def migration(self, name: str) -> Migration: ...

    def status(self, names: Sequence[str] = ()) -> dict[str, MigrationStatus]: ...

    def _ensure_schema(self) -> None: ...

    def _ready(
        self,
        migration: Migration,
        batch_size: int | None,
        sql: bool,
        *,
        gate: bool,
        min_age: timedelta | None = None,
        record: bool = True,
        undo: leases.Undo = leases.NOT_ASKED,
    ) -> tuple[int, leases.Undo]: ...

    def _worker(
        self, migration: Migration, emit: Emitter, invocation: Invocation | None = None
    ) -> Worker: ...


class PlanVerbs:
    def work(
        self: RunnerParts,
        name: str,
        *,
        batch_size: int | None = None,
        restart: bool = False,
        on_error: OnError | str = OnError.FAIL,
        min_age: timedelta | None = None,
        force: bool = False,
        pause: float = 0.0,
        wait: bool = False,
        workers: int | None = None,
        listeners: Sequence[Listener] = (),
        sql: bool = True,
        undo: bool | None = None,
        prefer_undo: bool = False,
    ) -> WorkResult:
        """Be a worker of `name`'s run with a plan (the `worker` command): start or resume the
        run exactly as `run` would (same gates, same `restart`; a plan of 4 x `workers` shards,
        16 without), or join the run in progress; then take shards, one at a time, until none
        is left to claim or split. With `wait`, wait for a shard to free meanwhile, until the
        run ends."""
        emit = Emitter([*self.listeners, *listeners])
        migration = self.migration(name)
        policy = OnError(on_error)
        self._ensure_schema()
        with self.db.unavailable_as_error():
            joining = self.status([name])[name].state is State.IN_PROGRESS
            size, choice = self._ready(
                migration,
                batch_size,
                sql,
                gate=not force and not joining,
                min_age=min_age,
                undo=leases.Undo(undo, prefer_undo),
            )
            return self._worker(migration, emit).join_and_work(
                size,
                policy,
                pause,
                sql,
                restart=restart,
                wait=wait,
                workers=workers,
                undo=choice,
            )

    def begin(
        self: RunnerParts,
        name: str,
        workers: int,
        *,
        batch_size: int | None = None,
        restart: bool = False,
        min_age: timedelta | None = None,
        force: bool = False,
        sql: bool = True,
        listeners: Sequence[Listener] = (),
        undo: bool | None = None,
        prefer_undo: bool = False,
    ) -> WorkResult | None:
        """Start or resume `name`'s run with a plan of 4 x `workers` shards without working it
        (`run --workers N` does this, then starts N workers): None when the run is ready for
        workers, else what there is to say (it had succeeded). LeaseHeld while it is held."""
        emit = Emitter([*self.listeners, *listeners])
        migration = self.migration(name)
        self._ensure_schema()
        with self.db.unavailable_as_error():
            size, choice = self._ready(
                migration,
                batch_size,
                sql,
                gate=not force,
                min_age=min_age,
                undo=leases.Undo(undo, prefer_undo),
            )
            worker = self._worker(migration, emit)
            joined = worker.join(size, restart=restart, workers=workers, join=False, undo=choice)
        if joined is None:
            return WorkResult(name, self.status([name])[name], already_done=True)
        return None

    def step(
        self: RunnerParts,
        name: str,
        budget_seconds: float = 60.0,
        *,
        resume: bool = False,
        batch_size: int | None = None,
        on_error: OnError | str = OnError.FAIL,
        sql: bool = True,
        listeners: Sequence[Listener] = (),
    ) -> StepResult:
        """One time slice of `name`'s run, for a job queue whose jobs have a timeout: start
        the run (from pending or interrupted; from failed or canceled only with `resume`, so a
        late duplicate of a step never undoes a cancel) or join it, take one shard, run its
        batches until `budget_seconds` are spent or it is done, and let it go. A duplicate or
        late step is harmless: it finds nothing to take, or goes on from a shard's cursor."""
        emit = Emitter([*self.listeners, *listeners])
        migration = self.migration(name)
        policy = OnError(on_error)
        self._ensure_schema()
        starts = {State.PENDING, State.INTERRUPTED} | (
            {State.FAILED, State.CANCELED} if resume else set()
        )
        processed = 0
        with self.db.unavailable_as_error():
            size, _ = self._ready(migration, batch_size, sql, gate=False)
            worker = self._worker(migration, emit, self.invocation.by(Origin.STEP))
            joined = worker.join(size, start_from=frozenset(starts))
            if joined is not None:
                processed = worker.step(joined, size, policy, sql, budget_seconds)
        status = self.status([name])[name]
        return StepResult(
            more=status.state is State.IN_PROGRESS,
            done=status.state is State.SUCCESS,
            state=status.state,
            held_until=None,
            processed=processed,
        )

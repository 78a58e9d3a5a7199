"""The Runner: run, status, cancel, count, verify and reset migrations against one database.

This is the Python API the CLI and the tests share, one method per verb (a run of one migration
is `backfill.run`'s). It returns values and emits events; it prints nothing and knows nothing of
Rich or click.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from backfill import gate, retry
from backfill import lease as leases
from backfill.decision import OnError
from backfill.definition import Migration
from backfill.dry_run import rehearse
from backfill.events import (
    Emitter,
    Listener,
    StateChanged,
)
from backfill.pacing import wall_clock
from backfill.progress import MigrationStatus, status_of
from backfill.registry import Migrations
from backfill.run import Run, RunResult
from backfill.state import State
from backfill.store import records
from backfill.store.database import Database, Limits
from backfill.store.expression import declared_change
from backfill.store.inspection import check_table, reflect_table
from backfill.store.shards import forget as forget_plan
from backfill.types import Clock, Identity, Liveness
from backfill.verification import SAMPLE_IDS, Verification, verify
from backfill.worker import StepResult, Worker, WorkResult


class Runner:
    def __init__(
        self,
        database: str | sa.URL | sa.Engine | Database,
        migrations: Migrations,
        *,
        clock: Clock = wall_clock,
        lease_seconds: float | None = None,
        retry_policy: retry.RetryPolicy | None = None,
        limits: Limits | None = None,
        listeners: Sequence[Listener] = (),
    ) -> None:
        """`listeners` are called with every event of this runner (backfill.events)."""
        self.db = database if isinstance(database, Database) else Database(database, limits=limits)
        self.retry_policy = retry_policy or retry.RetryPolicy()
        self.sleep: Callable[[float], None] = time.sleep  # between retries; tests replace it
        self.migrations = migrations
        self.clock = clock
        self.lease_seconds = (
            leases.DEFAULT_LEASE_SECONDS if lease_seconds is None else lease_seconds
        )
        self.me = Identity.current()
        self.listeners = list(listeners)
        self._resolved: dict[str, Migration] = {}

    def migration(self, name: str) -> Migration:
        """The migration called `name`, over this database's tables (reflected, when it names
        them rather than giving Tables)."""
        migration = self.migrations[name]
        if not migration.reflect:
            return migration
        if name not in self._resolved:
            with self.db.unavailable_as_error():
                self._resolved[name] = migration.resolved(self._reflect)
        return self._resolved[name]

    def _reflect(self, table: str, schema: str | None) -> sa.Table:
        return reflect_table(self.db.engine, table, schema)

    # -- reading state ------------------------------------------------------------------------

    def _observed(self, record: records.Record | None) -> State:
        return leases.observed_state(record, self.clock(), self.lease_seconds, self.me)

    def _ensure_schema(self) -> None:
        """backfill's tables, created or upgraded (refused while a live run holds a lease)."""
        self.db.ensure_schema(
            wait=self.lease_seconds,
            holds_lease=lambda row: self._observed(records.Record(row)) is State.IN_PROGRESS,
        )

    def status(self, names: Sequence[str] = ()) -> dict[str, MigrationStatus]:
        wanted = [self.migrations[n].name for n in names] or self.migrations.names()
        # Reading creates nothing: without the engine's tables every migration is pending.
        with self.db.unavailable_as_error(), self.db.read() as conn:
            stored = records.load_all(conn) if records.tables_exist(conn) else {}
        report = {}
        for name in wanted:
            record = stored.get(name)
            report[name] = (
                self._status_of(record)
                if record
                else MigrationStatus(name=name, state=State.PENDING)
            )
        return report

    def _status_of(self, record: records.Record) -> MigrationStatus:
        seen = Liveness(self.clock(), self.lease_seconds, self.me)
        return status_of(record, self._observed(record), seen)

    def skipped_rows(self, name: str, limit: int = SAMPLE_IDS) -> list[dict[str, Any]]:
        self.migrations[name]
        with self.db.unavailable_as_error(), self.db.read() as conn:
            return records.skipped_rows(conn, name, limit) if records.tables_exist(conn) else []

    # -- control ------------------------------------------------------------------------------

    def cancel(self, name: str) -> bool:
        """Ask a live run to stop after its current batch. False: no live run, nothing changed."""
        self.migrations[name]
        self._ensure_schema()
        # No live run: say so at once, without waiting for the write lock a runner may hold.
        with self.db.unavailable_as_error(), self.db.read() as conn:
            if self._observed(records.load(conn, name)) is not State.IN_PROGRESS:
                return False
        with self.db.unavailable_as_error(), self.db.write() as conn:
            record = records.load(conn, name)
            if self._observed(record) is not State.IN_PROGRESS or record is None:
                return False
            return records.update_live(conn, name, record.generation, cancel_requested=True)

    def reset(self, name: str) -> MigrationStatus:
        """Forget progress so the next run starts from the beginning. Refused (LeaseHeld) while
        a live run holds the migration, even one that claimed it at this very moment: then
        nothing is forgotten, not even its skipped rows."""
        self.migrations[name]
        self._ensure_schema()

        def refuse_if_held() -> None:
            leases.refuse_if_held(
                self.db, name, now=self.clock(), lease=self.lease_seconds, me=self.me
            )

        with self.db.unavailable_as_error():
            # A live run is refused at once, without waiting for the write lock it may hold.
            refuse_if_held()
        with self.db.unavailable_as_error(), self.db.write(meanwhile=refuse_if_held) as conn:
            record = records.load(conn, name)
            if record is not None:
                observed = self._observed(record)
                leases.refuse_if_live(
                    name, record, observed, Liveness(self.clock(), self.lease_seconds, self.me)
                )
                records.transition(
                    conn,
                    name,
                    at_generation=record.generation,
                    source=observed,
                    target=State.PENDING,
                    **records.forgotten_progress(self.clock()),
                )
                records.forget_skipped(conn, name)
                forget_plan(conn, name)
        if record is not None:
            Emitter(self.listeners)(StateChanged(name, self.clock(), str(observed), "pending"))
        return self.status([name])[name]

    # -- read-only scans ----------------------------------------------------------------------

    def verify(self, name: str) -> Verification:
        """Full read-only scan: rows the migration would still change, and rows it raises on."""
        migration = self.migration(name)
        with self.db.unavailable_as_error():
            check_table(self.db.engine, migration)
            return verify(self.db, migration)

    def count(self, name: str) -> Verification:
        """How many rows the migration would still change (the same scan as verify)."""
        return self.verify(name)

    # -- running ------------------------------------------------------------------------------

    def run(
        self,
        names: Sequence[str],
        *,
        batch_size: int | None = None,
        dry_run: bool = False,
        dry_run_batches: int = 1,
        restart: bool = False,
        on_error: OnError | str = OnError.FAIL,
        min_age: timedelta | None = None,
        force: bool = False,
        pause: float = 0.0,
        listeners: Sequence[Listener] = (),
        sql: bool = True,
    ) -> list[RunResult]:
        """Run the migrations one after another; stop at the first that fails or is canceled.
        `sql=False` ignores declared SQL (SqlChange): every row goes through the function.
        `listeners` get this call's events, after the runner's own."""
        emit = Emitter([*self.listeners, *listeners])
        chosen = [self.migration(name) for name in names]
        policy = OnError(on_error)
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch size must be at least 1")
        if not dry_run:  # a dry run persists nothing, not even the engine's tables
            self._ensure_schema()
        results = []
        for migration in chosen:
            with self.db.unavailable_as_error():
                check_table(self.db.engine, migration)
                if not force:
                    self._check_gate(migration, min_age)
                # A dry run goes through the function.
                size = self._batch_size(migration, batch_size, sql and not dry_run)
                if dry_run:
                    report = rehearse(
                        self.db, migration, size, dry_run_batches, policy, self._observed
                    )
                    status = self.status([migration.name])[migration.name]
                    result = RunResult(migration.name, status, dry_run=report)
                elif not restart and self._has_plan_to_finish(migration.name):
                    # A run with a plan resumes every shard from its cursor: one worker, here.
                    worker = self._worker(migration, emit)
                    work = worker.join_and_work(size, policy, pause, sql, run=True)
                    result = RunResult(work.name, work.status, work.already_done, work.error)
                else:
                    result = self._run_one(migration, size, restart, policy, pause, emit, sql=sql)
            results.append(result)
            if result.state in (State.FAILED, State.CANCELED):
                break
        return results

    def _has_plan_to_finish(self, name: str) -> bool:
        with self.db.read() as conn:
            record = records.load(conn, name)
        return record is not None and bool(record.plan) and record.state is not State.SUCCESS

    def work(
        self,
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
            check_table(self.db.engine, migration)
            if not force and self.status([name])[name].state is not State.IN_PROGRESS:
                self._check_gate(migration, min_age)
            size = self._batch_size(migration, batch_size, sql)
            return self._worker(migration, emit).join_and_work(
                size, policy, pause, sql, restart=restart, wait=wait, workers=workers
            )

    def begin(
        self,
        name: str,
        workers: int,
        *,
        batch_size: int | None = None,
        restart: bool = False,
        min_age: timedelta | None = None,
        force: bool = False,
        sql: bool = True,
        listeners: Sequence[Listener] = (),
    ) -> WorkResult | None:
        """Start or resume `name`'s run with a plan of 4 x `workers` shards without working it
        (`run --workers N` does this, then starts N workers): None when the run is ready for
        workers, else what there is to say (it had succeeded). LeaseHeld while it is held."""
        emit = Emitter([*self.listeners, *listeners])
        migration = self.migration(name)
        self._ensure_schema()
        with self.db.unavailable_as_error():
            check_table(self.db.engine, migration)
            if not force:
                self._check_gate(migration, min_age)
            size = self._batch_size(migration, batch_size, sql)
            worker = self._worker(migration, emit)
            joined = worker.join(size, restart=restart, workers=workers, join=False)
        if joined is None:
            return WorkResult(name, self.status([name])[name], already_done=True)
        return None

    def step(
        self,
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
            check_table(self.db.engine, migration)
            size = self._batch_size(migration, batch_size, sql)
            worker = self._worker(migration, emit)
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

    def _batch_size(self, migration: Migration, given: int | None, sql: bool) -> int:
        """`given`, else the migration's: its declared SQL's on this dialect when `sql`."""
        change = declared_change(migration, self.db.dialect) if sql else None
        return given or migration.default_batch_size(change)

    def _worker(self, migration: Migration, emit: Emitter) -> Worker:
        return Worker(self._run(migration, emit))

    def _run(self, migration: Migration, emit: Emitter) -> Run:
        return Run(
            self.db,
            migration,
            clock=self.clock,
            lease_seconds=self.lease_seconds,
            me=self.me,
            retry_policy=self.retry_policy,
            sleep=self.sleep,
            emit=emit,
            status=lambda name: self.status([name])[name],
            observed=self._observed,
        )

    def _check_gate(self, migration: Migration, min_age: timedelta | None) -> None:
        gate.check(
            migration,
            min_age,
            now=self.clock(),
            status=lambda name: self.status([name])[name],
            verify=self.verify,
        )

    def _run_one(
        self,
        migration: Migration,
        size: int,
        restart: bool,
        policy: OnError,
        pause: float,
        emit: Emitter,
        *,
        sql: bool = True,
    ) -> RunResult:
        run = self._run(migration, emit)
        return run.start(size, restart, policy, pause, sql=sql)


__all__ = ["Runner", "StepResult"]

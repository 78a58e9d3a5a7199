"""The Runner: run, status, cancel, count, verify and reset migrations against one database.

This is the Python API the CLI and the tests share. It returns values and emits progress events;
it prints nothing and knows nothing of Rich or click.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import sqlalchemy as sa

from backfill import lease as leases
from backfill import retry
from backfill.batch import Batches
from backfill.decision import OnError
from backfill.definition import Migration
from backfill.dry_run import DryRun, rehearse
from backfill.errors import BackfillError, GateClosed, LeaseLost, RowFailed, SchemaMismatch
from backfill.events import (
    BatchCommitted,
    Emitter,
    Listener,
    RunError,
    RunFinished,
    RunStarted,
    StateChanged,
    shown_key,
)
from backfill.pacing import wall_clock
from backfill.progress import MigrationStatus, status_of
from backfill.registry import Migrations
from backfill.state import State
from backfill.stop_signals import StopSignals
from backfill.store import records
from backfill.store.database import Database, Limits
from backfill.store.expression import declared_change
from backfill.store.inspection import check_table, reflect_table
from backfill.store.scan import describe_scan, scan_descriptor
from backfill.types import Clock, Identity
from backfill.verification import SAMPLE_IDS, Verification, verify


@dataclass(frozen=True)
class RunResult:
    name: str
    status: MigrationStatus
    already_done: bool = False
    error: RowFailed | retry.RetriesExhausted | None = None
    dry_run: DryRun | None = None

    @property
    def state(self) -> State:
        return self.status.state

    @property
    def exit_code(self) -> int:
        """The contract's: 1 failed on a row, 4 the database kept failing, 3 canceled, else 0."""
        if self.error is not None:
            return self.error.exit_code
        if self.state is State.FAILED:
            return 1
        return 3 if self.state is State.CANCELED else 0


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
            observed = self._observed(record)
            report[name] = (
                status_of(record, observed)
                if record
                else MigrationStatus(name=name, state=State.PENDING)
            )
        return report

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
                leases.refuse_if_live(name, record, observed)
                records.transition(
                    conn,
                    name,
                    at_generation=record.generation,
                    source=observed,
                    target=State.PENDING,
                    **records.forgotten_progress(self.clock()),
                )
                records.forget_skipped(conn, name)
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
                in_sql = sql and not dry_run  # a dry run goes through the function
                change = declared_change(migration, self.db.dialect) if in_sql else None
                size = batch_size or migration.default_batch_size(change)
                if dry_run:
                    report = rehearse(
                        self.db, migration, size, dry_run_batches, policy, self._observed
                    )
                    status = self.status([migration.name])[migration.name]
                    result = RunResult(migration.name, status, dry_run=report)
                else:
                    result = self._run_one(migration, size, restart, policy, pause, emit, sql=sql)
            results.append(result)
            if result.state in (State.FAILED, State.CANCELED):
                break
        return results

    def _check_gate(self, migration: Migration, min_age: timedelta | None) -> None:
        prerequisite = migration.requires
        if prerequisite is None:
            return
        before = prerequisite.migration
        wait = prerequisite.min_age if min_age is None else min_age
        status = self.status([before])[before]
        if status.state is not State.SUCCESS or status.finished_at is None:
            raise GateClosed(
                f"migration {migration.name!r} requires {before!r} to have finished with "
                f"success; it is {status.state}"
            )
        age = timedelta(seconds=self.clock() - status.finished_at)
        if age < wait:
            raise GateClosed(
                f"migration {migration.name!r} may run only {wait} after {before!r} succeeded; "
                f"it succeeded {_rounded(age)} ago (use --min-age to change the wait, "
                "--force to skip this check)"
            )
        if prerequisite.verified:
            check = self.verify(before)
            if not check.clean:
                raise GateClosed(
                    f"migration {migration.name!r} requires `verify {before}` to find nothing "
                    f"left; it finds {check.remaining} rows left and {check.raising} that raise"
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
        name = migration.name
        scan_id = scan_descriptor(migration, self.db.engine.dialect)
        if not restart:
            self._refuse_other_scan(migration, scan_id)
        total, estimated = self.db.total_rows(migration.table, migration.range)
        claim = leases.enter(
            self.db,
            name,
            now=self.clock(),
            lease=self.lease_seconds,
            me=self.me,
            restart=restart,
            scan=scan_id,
            total=total,
            total_is_estimate=estimated,
            batch_size=size,
        )
        if claim is None:
            return RunResult(name, self.status([name])[name], already_done=True)
        record = claim.record
        now = self.clock()
        emit(StateChanged(name, now, str(claim.source), str(State.IN_PROGRESS)))
        emit(RunStarted(name, now, claim.run_id, 1, record["total"], record["processed"]))
        interval = max(self.lease_seconds / 3, 0.05)
        try:
            with (
                leases.Heartbeat(self.db, name, claim.generation, interval, self.clock) as beat,
                StopSignals() as signals,
                Batches(
                    self.db, migration, claim.generation, record, size, policy, self.clock, sql=sql
                ) as batches,
            ):
                result = self._loop(name, claim.generation, batches, pause, emit, beat, signals)
        except BackfillError as error:
            emit(
                RunFinished(
                    name, self.clock(), self._state_now(name), error.exit_code, claim.run_id
                )
            )
            raise
        state = str(result.state)
        emit(RunFinished(name, self.clock(), state, result.exit_code, claim.run_id))
        return result

    def _state_now(self, name: str) -> str | None:
        """The migration's state as observed now, or None when the database cannot say."""
        try:
            return str(self.status([name])[name].state)
        except BackfillError:
            return None

    def _refuse_other_scan(self, migration: Migration, scan_id: str) -> None:
        """A half-done migration whose table, key or range changed since its cursor was saved
        cannot resume: the cursor is a position in the old scan."""
        name = migration.name
        with self.db.read() as conn:
            record = records.load(conn, name)
        if record is None or record.cursor is None or record["scan"] in (None, scan_id):
            return
        if self._observed(record) in (State.SUCCESS, State.PENDING):
            return
        raise SchemaMismatch(
            f"migration {name!r} is half done ({record['processed']} rows) over "
            f"{describe_scan(record['scan'])}, but is now defined over "
            f"{describe_scan(scan_id)}; its cursor cannot move to another range or key. "
            f"Start it again from the beginning with `backfill run {name} --restart` "
            f"(or `backfill reset {name}`), or restore the old definition to finish it"
        )

    def _loop(
        self,
        name: str,
        generation: int,
        batches: Batches,
        pause: float,
        emit: Emitter,
        heartbeat: leases.Heartbeat,
        signals: StopSignals,
    ) -> RunResult:
        while True:
            if heartbeat.lost.is_set():
                raise LeaseLost(name)
            if signals.received is not None:
                return self._finish(name, generation, State.CANCELED, emit)
            try:
                batch = retry.call(
                    batches.next,
                    migration=name,
                    policy=self.retry_policy,
                    classify=self.db.transient,
                    recover=batches.recover,
                    sleep=self.sleep,
                    on_retry=partial(retry.log_retry, name, self.retry_policy.attempts),
                )
            except (retry.RetriesExhausted, RowFailed) as failure:
                # A row at fault names its id and field; exhausted retries name only the cause.
                row = failure if isinstance(failure, RowFailed) else None
                emit(
                    RunError(
                        name,
                        self.clock(),
                        failure.message,
                        failure.error_type,
                        None if row is None else row.row_id,
                        None if row is None else row.field,
                    )
                )
                self._finish(
                    name,
                    generation,
                    State.FAILED,
                    emit,
                    error_message=failure.message,
                    error_type=failure.error_type,
                    error_row_id=None if row is None else json.dumps(row.row_id, default=str),
                    error_field=None if row is None else row.field,
                )
                return RunResult(name, self.status([name])[name], error=failure)
            if batch is None:
                return self._finish(name, generation, State.CANCELED, emit)
            # From what this run just committed: a status query per batch cost as much as the
            # batch's own bookkeeping.
            status = batches.status()
            emit(
                BatchCommitted(
                    name,
                    self.clock(),
                    None,
                    shown_key(batch.first_key),
                    shown_key(batch.last_key),
                    batch.rows_read,
                    batch.rows_changed,
                    round(batch.seconds, 6),
                    batch.batch_size,
                    status.processed,
                    status.total,
                )
            )
            if batch.done:
                emit(StateChanged(name, self.clock(), str(State.IN_PROGRESS), str(State.SUCCESS)))
                return RunResult(name, self.status([name])[name])
            if pause > 0:
                time.sleep(pause)

    def _finish(
        self, name: str, generation: int, target: State, emit: Emitter, **values: Any
    ) -> RunResult:
        leases.leave(self.db, name, generation, target, self.clock(), **values)
        emit(StateChanged(name, self.clock(), str(State.IN_PROGRESS), str(target)))
        return RunResult(name, self.status([name])[name])


def _rounded(age: timedelta) -> timedelta:
    return timedelta(seconds=round(age.total_seconds()))


__all__ = ["RunResult", "Runner"]

"""One run of one migration: its claim, then batch after batch under a heartbeat until the range
is done, a stop is asked for, a row fails or the lease is lost; the events it emits on the way
and the state it ends in. `Runner.run` starts one per migration; what happens inside a batch is
`backfill.batch`'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backfill import lease as leases
from backfill import retry
from backfill.batch import Batches
from backfill.decision import OnError
from backfill.definition import Migration
from backfill.dry_run import DryRun
from backfill.errors import BackfillError, LeaseLost, RowFailed, SchemaMismatch
from backfill.events import (
    Emitter,
    RunError,
    RunFinished,
    RunStarted,
    StateChanged,
)
from backfill.position import MigrationPosition
from backfill.progress import MigrationStatus
from backfill.setting import Setting
from backfill.state import State
from backfill.stop_signals import StopSignals
from backfill.store import records
from backfill.store.scan import describe_scan, scan_descriptor
from backfill.store.undo import UndoLog


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


class Run:
    """One run of `migration` by this process, in `setting`, reporting to `emit`."""

    def __init__(
        self,
        setting: Setting,
        migration: Migration,
        *,
        emit: Emitter,
        status: Callable[[str], MigrationStatus],
    ) -> None:
        self.setting, self.migration, self.name = setting, migration, migration.name
        self.db, self.clock, self.me = setting.db, setting.clock, setting.me
        self.lease_seconds, self.invocation = setting.lease_seconds, setting.invocation
        self.retry_policy, self.sleep = setting.retry_policy, setting.sleep
        self.emit, self.status, self.observed = emit, status, setting.observed

    def start(
        self,
        size: int,
        restart: bool,
        policy: OnError,
        pause: float,
        *,
        sql: bool = True,
        undo: leases.Undo = leases.NOT_ASKED,
    ) -> RunResult:
        """Claim the migration and run its batches: a RunResult (`already_done` when it had
        succeeded and no restart was asked for), or the error that ended the run, raised after
        its run_finished event."""
        migration, name, emit = self.migration, self.name, self.emit
        claim = self.claim(size, restart, undo=undo)
        if claim is None:
            return RunResult(name, self.status(name), already_done=True)
        record = claim.record
        now = self.clock()
        emit(StateChanged(name, now, str(claim.source), str(State.IN_PROGRESS)))
        emit(RunStarted(name, now, claim.run_id, 1, record["total"], record["processed"]))
        interval = max(self.lease_seconds / 3, 0.05)
        try:
            with (
                leases.Heartbeat.of_run(
                    self.db, name, claim.generation, interval, self.clock
                ) as beat,
                StopSignals() as signals,
                Batches(
                    self.db,
                    migration,
                    MigrationPosition(self.db, record),
                    size,
                    policy,
                    self.clock,
                    sql=sql,
                    undo=UndoLog(name, claim.run_id) if record["undo"] else None,
                ) as batches,
            ):
                result = self._loop(claim.generation, batches, pause, beat, signals)
        except BackfillError as error:
            emit(RunFinished(name, self.clock(), self._state_now(), error.exit_code, claim.run_id))
            raise
        state = str(result.state)
        emit(RunFinished(name, self.clock(), state, result.exit_code, claim.run_id))
        return result

    def claim(
        self,
        size: int,
        restart: bool,
        planner: leases.Planner | None = None,
        undo: leases.Undo = leases.NOT_ASKED,
    ) -> leases.Claim | None:
        """Claim the migration (lease.enter) after checking its scan did not change under a
        half-done run, counting `total` first; with a `planner`, for workers."""
        migration = self.migration
        scan_id = scan_descriptor(migration, self.db.engine.dialect)
        if not restart:
            self._refuse_other_scan(scan_id)
        total, estimated = self.db.total_rows(migration.table, migration.range)
        return leases.enter(
            self.db,
            self.name,
            now=self.clock(),
            lease=self.lease_seconds,
            me=self.me,
            restart=restart,
            scan=scan_id,
            total=total,
            total_is_estimate=estimated,
            batch_size=size,
            planner=planner,
            invocation=self.invocation,
            undo=undo,
        )

    def _state_now(self) -> str | None:
        """The migration's state as observed now, or None when the database cannot say."""
        try:
            return str(self.status(self.name).state)
        except BackfillError:
            return None

    def _refuse_other_scan(self, scan_id: str) -> None:
        """A half-done migration whose table, key or range changed since its cursor was saved
        cannot resume: the cursor is a position in the old scan."""
        name = self.name
        with self.db.read() as conn:
            record = records.load(conn, name)
        if record is None or record.cursor is None or record["scan"] in (None, scan_id):
            return
        if self.observed(record) in (State.SUCCESS, State.PENDING):
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
        generation: int,
        batches: Batches,
        pause: float,
        heartbeat: leases.Heartbeat,
        signals: StopSignals,
    ) -> RunResult:
        name, emit = self.name, self.emit
        while True:
            if heartbeat.lost.is_set():
                raise LeaseLost(name)
            if signals.received is not None:
                return self._finish(generation, State.CANCELED)
            try:
                batch = batches.next_retried(self.retry_policy, self.sleep)
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
                    generation,
                    State.FAILED,
                    error_message=failure.message,
                    error_type=failure.error_type,
                    error_row_id=None if row is None else json.dumps(row.row_id, default=str),
                    error_field=None if row is None else row.field,
                )
                return RunResult(name, self.status(name), error=failure)
            if batch is None:
                return self._finish(generation, State.CANCELED)
            # From what this run just committed: a status query per batch cost as much as the
            # batch's own bookkeeping.
            status = batches.status()
            emit(batch.event(name, self.clock(), None, status.processed, status.total))
            if batch.done:
                emit(StateChanged(name, self.clock(), str(State.IN_PROGRESS), str(State.SUCCESS)))
                return RunResult(name, self.status(name))
            if pause > 0:
                self.sleep(pause)

    def _finish(self, generation: int, target: State, **values: Any) -> RunResult:
        leases.leave(self.db, self.name, generation, target, self.clock(), **values)
        self.emit(StateChanged(self.name, self.clock(), str(State.IN_PROGRESS), str(target)))
        return RunResult(self.name, self.status(self.name))

"""A revert: a run of its own kind that puts back, newest first, what runs with `--undo` logged
(backfill.store.undo), with the engine's lease, heartbeat, cancel, events and history.

Each batch is one transaction: it takes the newest log entries, locks and reads the rows they
name, restores each value that is still the value the migration wrote, keeps (and marks) each
one the app changed since, deletes the entries it restored and counts, under the lease's
generation. The log is its own cursor: a revert killed at any moment resumes where the last
commit left it. A finished revert leaves the migration `pending`, as if it had never run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa

from backfill import lease as leases
from backfill import retry
from backfill.definition import Migration
from backfill.errors import BackfillError, LeaseLost, Refused
from backfill.events import BatchCommitted, Emitter, RunFinished, RunStarted, StateChanged
from backfill.history import Kind
from backfill.setting import Setting
from backfill.state import State
from backfill.stop_signals import StopSignals
from backfill.store import history, records, shards, skipped
from backfill.store import undo as log
from backfill.store.restore import Restore
from backfill.types import row_id

# What a finished (or forgotten) revert leaves of its own columns.
NO_REVERT = {
    "revert_state": None,
    "revert_total": None,
    "revert_processed": None,
    "revert_reverted": None,
    "revert_kept": None,
}


@dataclass(frozen=True)
class RevertResult:
    name: str
    state: State  # the revert's own: success, canceled or failed
    reverted: int
    kept: int
    kept_ids: list[Any]
    error: retry.RetriesExhausted | None = None

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return self.error.exit_code
        return 3 if self.state is State.CANCELED else 0


def refuse_dependents(conn: sa.Connection, name: str, dependents: list[str]) -> None:
    """Refused while a migration that requires `name` has a log not yet reverted: reverting
    `name` first would leave rows the other one changed on top of what `name` wrote."""
    for other in dependents:
        left = log.count(conn, other)
        if left:
            raise Refused(
                f"migration {name!r} cannot be reverted while {other!r}, which requires it, has "
                f"{left:,} logged changes not reverted: revert {other!r} first "
                f"(`backfill revert {other}`)"
            )


class Revert:
    """The revert of `migration` by this process, in `setting`, reporting to `emit`: after
    the migrations that require it (`dependents`) have been reverted."""

    def __init__(
        self, setting: Setting, migration: Migration, *, emit: Emitter, dependents: list[str]
    ) -> None:
        self.setting, self.migration, self.name = setting, migration, migration.name
        self.db, self.clock, self.me = setting.db, setting.clock, setting.me
        self.lease_seconds, self.invocation = setting.lease_seconds, setting.invocation
        self.retry_policy, self.sleep = setting.retry_policy, setting.sleep
        self.emit, self.dependents = emit, dependents
        self.restore = Restore(self.db.engine, migration)

    def start(self, size: int) -> RevertResult:
        """Claim the migration for a revert (or resume one) and go through its log."""
        generation, run_id, record = self._claim()
        name, emit = self.name, self.emit
        emit(StateChanged(name, self.clock(), str(record.source), str(State.REVERTING)))
        total = int(record.record["revert_total"] or 0)
        emit(RunStarted(name, self.clock(), run_id, 1, total, record.record["revert_processed"]))
        interval = max(self.lease_seconds / 3, 0.05)
        try:
            with (
                leases.Heartbeat.of_run(
                    self.db, name, generation, interval, self.clock, State.REVERTING
                ) as beat,
                StopSignals() as signals,
            ):
                result = self._loop(generation, run_id, size, beat, signals, total)
        except BackfillError as error:
            emit(RunFinished(name, self.clock(), None, error.exit_code, run_id))
            raise
        emit(RunFinished(name, self.clock(), str(result.state), result.exit_code, run_id))
        return result

    # -- the claim ----------------------------------------------------------------------------

    def _claim(self) -> tuple[int, int, leases.Claim]:
        db, name, now, me = self.db, self.name, self.clock(), self.me

        def refuse_if_taken() -> None:
            leases.refuse_if_held(db, name, now=self.clock(), lease=self.lease_seconds, me=me)

        refuse_if_taken()
        with db.write(meanwhile=refuse_if_taken) as conn:
            record = records.load(conn, name)
            observed = self.setting.observed(record)
            leases.refuse_if_live(name, record, observed, self.setting.seen())
            if record is None:
                raise Refused(f"migration {name!r} has never run: there is nothing to revert")
            for other in self.dependents:
                other_record = records.load(conn, other)
                other_state = self.setting.observed(other_record)
                leases.refuse_if_live(other, other_record, other_state, self.setting.seen())
            refuse_dependents(conn, name, self.dependents)
            left = log.count(conn, name)
            if observed is not State.REVERTING:
                self._refuse_unlogged(record, left)
            run_id = history.begin(
                conn,
                name,
                kind=Kind.REVERT,
                invocation=self.invocation,
                database=db.display_url,
                now=now,
                me=me,
                before=record.revert_totals(),
            )
            values: dict[str, Any] = {}
            if observed is State.REVERTING:
                if record["revert_state"] == str(State.IN_PROGRESS):  # its runner died
                    self._close(conn, record, State.INTERRUPTED, record.last_seen())
            else:
                values.update(records.forgotten_progress(now))
                values.update(revert_total=left, revert_processed=0)
                values.update(revert_reverted=0, revert_kept=0)
            values.update(leases.taken(record, run_id, me, now))
            values.update(
                revert_state=str(State.IN_PROGRESS),
                # What a verify found no longer holds once values are put back.
                verified_at=None,
                verified_remaining=None,
                verified_raising=None,
            )
            records.transition(
                conn,
                name,
                at_generation=record.generation,
                source=observed,
                target=State.REVERTING,
                **values,
            )
            if observed is not State.REVERTING:
                skipped.forget(conn, name)
                shards.forget(conn, name)
            claimed = records.load(conn, name)
            assert claimed is not None
        return record.generation + 1, run_id, leases.Claim(claimed, observed)

    def _refuse_unlogged(self, record: records.Record, left: int) -> None:
        name = self.name
        if record["unlogged"] or (not record["undo"] and not left):
            raise Refused(
                f"migration {name!r} cannot be reverted: batches of its run were not logged "
                f"(it ran without --undo), so the log cannot put them back; restore a backup "
                f"instead (`backfill restore`), or run it again with --undo after `backfill "
                f"forget-undo {name}`"
            )

    def _close(
        self, conn: sa.Connection, record: records.Record, outcome: State, at: float | None
    ) -> None:
        history.close(conn, record["run_id"], outcome=outcome, at=at, totals=record.revert_totals())

    # -- the batches --------------------------------------------------------------------------

    def _loop(
        self,
        generation: int,
        run_id: int,
        size: int,
        heartbeat: leases.Heartbeat,
        signals: StopSignals,
        total: int,
    ) -> RevertResult:
        while True:
            if heartbeat.lost.is_set():
                raise LeaseLost(self.name)
            if signals.received is not None:
                return self._stop(generation, State.CANCELED)
            try:
                done = retry.call(
                    lambda: self._batch(generation, size, total),
                    migration=self.name,
                    policy=self.retry_policy,
                    classify=self.db.transient,
                    recover=lambda _transient: None,
                    sleep=self.sleep,
                    on_retry=lambda *a: retry.log_retry(self.name, self.retry_policy.attempts, *a),
                )
            except retry.RetriesExhausted as failure:
                result = self._stop(generation, State.FAILED, failure.message, failure.error_type)
                return replace(result, error=failure)
            if done is None:
                return self._stop(generation, State.CANCELED)
            if done:
                return self._finish(generation)

    def _batch(self, generation: int, size: int, total: int) -> bool | None:
        """One transaction over the newest `size` entries: True when none was left, None when a
        cancel was asked for; LeaseLost when the revert is no longer this one's."""
        name = self.name
        began = time.perf_counter()
        with self.db.write() as conn:
            record = records.load(conn, name, with_plan=False)
            if (
                record is None
                or record.generation != generation
                or record.state is not State.REVERTING
                or record["revert_state"] != str(State.IN_PROGRESS)
            ):
                raise LeaseLost(name)
            if record["cancel_requested"]:
                return None
            entries = log.newest(conn, name, size)
            if not entries:
                return True
            reverted, kept = self.restore(conn, entries)
            log.settle(conn, reverted, kept)
            processed = int(record["revert_processed"] or 0) + len(entries)
            if not records.update_live(
                conn,
                name,
                generation,
                state=State.REVERTING,
                revert_processed=processed,
                revert_reverted=int(record["revert_reverted"] or 0) + len(reverted),
                revert_kept=int(record["revert_kept"] or 0) + len(kept),
                updated_at=self.clock(),
                heartbeat_at=self.clock(),
            ):
                raise LeaseLost(name)
        self.emit(
            BatchCommitted(
                name,
                self.clock(),
                None,
                row_id(entries[0].key),
                row_id(entries[-1].key),
                len(entries),
                len(reverted),
                round(time.perf_counter() - began, 6),
                size,
                processed,
                total,
            )
        )
        return False

    # -- the end ------------------------------------------------------------------------------

    def _finish(self, generation: int) -> RevertResult:
        """The log is gone through: the migration is `pending`, as if it had never run."""
        name, now = self.name, self.clock()
        with self.db.write() as conn:
            record = self._owned(conn, generation)
            kept_ids = [row_id(k) for k in log.kept_keys(conn, name)]
            self._close(conn, record, State.SUCCESS, now)
            records.forget(
                conn, record, State.REVERTING, now, **NO_REVERT, undo=None, unlogged=False
            )
        self.emit(StateChanged(name, now, str(State.REVERTING), str(State.PENDING)))
        return self._result(State.SUCCESS, record, kept_ids)

    def _stop(
        self,
        generation: int,
        how: State,
        message: str | None = None,
        error_type: str | None = None,
    ) -> RevertResult:
        """A revert canceled or failed: the migration stays `reverting`; `revert` resumes it."""
        name, now = self.name, self.clock()
        with self.db.write() as conn:
            record = self._owned(conn, generation)
            self._close(conn, record, how, now)
            records.transition(
                conn,
                name,
                at_generation=generation,
                source=State.REVERTING,
                target=State.REVERTING,
                revert_state=str(how),
                heartbeat_at=None,
                finished_at=now,
                updated_at=now,
                error_message=message,
                error_type=error_type,
            )
            kept_ids = [row_id(k) for k in log.kept_keys(conn, name)]
        return self._result(how, record, kept_ids)

    def _result(self, how: State, record: records.Record, kept_ids: list[Any]) -> RevertResult:
        reverted, kept = int(record["revert_reverted"] or 0), int(record["revert_kept"] or 0)
        return RevertResult(self.name, how, reverted, kept, kept_ids)

    def _owned(self, conn: sa.Connection, generation: int) -> records.Record:
        record = records.load(conn, self.name, with_plan=False)
        if record is None or record.generation != generation:
            raise LeaseLost(self.name)
        return record

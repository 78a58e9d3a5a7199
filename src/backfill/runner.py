"""The Runner: run, status, cancel, count, verify and reset migrations against one database.

This is the Python API the CLI and the tests share, one method per verb (a run of one migration
is `backfill.run`'s). It returns values and emits events; it prints nothing and knows nothing of
Rich or click.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from backfill import gate, retry, verification
from backfill import lease as leases
from backfill.backups import Backups, RestoreResult
from backfill.by_hand import ByHand
from backfill.decision import OnError
from backfill.definition import Migration, Prerequisite
from backfill.dry_run import rehearse
from backfill.errors import BackfillError, Refused
from backfill.events import (
    Emitter,
    Listener,
    StateChanged,
)
from backfill.history import HistoryEntry, Invocation
from backfill.pacing import wall_clock
from backfill.plan_verbs import PlanVerbs
from backfill.progress import MigrationStatus, report
from backfill.registry import Migrations
from backfill.revert import Revert, RevertResult
from backfill.run import Run, RunResult
from backfill.setting import Setting
from backfill.state import State
from backfill.store import history as history_rows
from backfill.store import records, skipped
from backfill.store import undo as undo_log
from backfill.store.backup import BackupInfo
from backfill.store.database import Database, Limits
from backfill.store.expression import declared_change
from backfill.store.inspection import check_table, reflect_table
from backfill.types import Clock, Identity, Liveness
from backfill.verification import SAMPLE_IDS, Verification, verify
from backfill.worker import StepResult, Worker


class Runner(PlanVerbs):
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
        invocation: Invocation | None = None,
    ) -> None:
        """`listeners` are called with every event of this runner (backfill.events);
        `invocation` is what the history records of who uses it (default: the Python API)."""
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
        self.invocation = invocation or Invocation()
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
        return self._setting().observed(record)

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
            logged = undo_log.counts(conn) if stored and undo_log.kept_here(conn) else {}
        seen = Liveness(self.clock(), self.lease_seconds, self.me)
        return report(wanted, stored, self._requires, self._observed, seen, logged)

    def _requires(self, name: str) -> Prerequisite | None:
        return self.migrations[name].requires

    def skipped_rows(
        self, name: str, limit: int = SAMPLE_IDS, *, newest: bool = False
    ) -> list[dict[str, Any]]:
        """Rows skipped under --on-error skip: the first `limit` (or the `newest`)."""
        self.migrations[name]
        with self.db.unavailable_as_error(), self.db.read() as conn:
            if not records.tables_exist(conn):
                return []
            return skipped.rows(conn, name, limit, newest=newest)

    # -- control ------------------------------------------------------------------------------

    def cancel(self, name: str) -> bool:
        """Ask a live run to stop after its current batch. False: no live run, nothing changed."""
        self.migrations[name]
        self._ensure_schema()
        return self._by_hand().cancel(name)

    def reset(self, name: str) -> MigrationStatus:
        """Forget progress so the next run starts from the beginning. Refused (LeaseHeld) while
        a live run holds the migration: then nothing is forgotten."""
        self.migrations[name]
        self._ensure_schema()
        before = self._by_hand().reset(name)
        if before is not None:
            Emitter(self.listeners)(StateChanged(name, self.clock(), str(before), "pending"))
        return self.status([name])[name]

    def forget_undo(self, name: str) -> bool:
        """Drop the migration's undo log (False: it had none). A migration `reverting` becomes
        `pending`; a run the log held can no longer be reverted."""
        self.migrations[name]
        self._ensure_schema()
        return self._by_hand().forget_undo(name)

    def revert(
        self, name: str, *, batch_size: int | None = None, listeners: Sequence[Listener] = ()
    ) -> RevertResult:
        """Put back what the migration's runs with undo logged, newest first, in batches of
        `batch_size` log entries: a run of its own kind (lease, heartbeat, cancel, events,
        history), resumable after a cancel or a crash. Rows the app changed since are kept."""
        migration = self.migration(name)
        self._ensure_schema()
        with self.db.unavailable_as_error():
            check_table(self.db.engine, migration)
            revert = Revert(
                self._setting(),
                migration,
                emit=Emitter([*self.listeners, *listeners]),
                dependents=self.migrations.requiring(name),
            )
            return revert.start(batch_size or migration.batch_size)

    # -- backups ------------------------------------------------------------------------------

    def backup(self, names: Sequence[str] = (), output: str | Path | None = None) -> BackupInfo:
        """Back up, in one snapshot, the tables the named migrations (every one when none)
        touch, into `output` (a new directory; by default under ./backfill-backups)."""
        chosen = [self.migration(name) for name in names or self.migrations.names()]
        folder = None if output is None else Path(output)
        with contextlib.suppress(BackfillError):  # a read-only user backs up all the same
            self._ensure_schema()
        return self._backups().take(chosen, folder)

    def restore(self, path: str | Path) -> RestoreResult:
        """Put a backup back; the migrations over its tables are `pending` after it."""
        self._ensure_schema()
        return self._backups().restore(Path(path))

    def _backups(self) -> Backups:
        every = [self.migration(name) for name in self.migrations.names()]
        return Backups(self._setting(), every)

    def _by_hand(self) -> ByHand:
        return ByHand(self._setting())

    def _setting(self, invocation: Invocation | None = None) -> Setting:
        """As this runner is set now (tests replace its `sleep`)."""
        return Setting(
            self.db,
            self.clock,
            self.lease_seconds,
            self.me,
            self.retry_policy,
            self.sleep,
            invocation or self.invocation,
        )

    def history(self, name: str | None = None, limit: int = 50) -> list[HistoryEntry]:
        """What was done to the migrations (to `name`, when given), newest first."""
        if name is not None:
            self.migrations[name]
        with self.db.unavailable_as_error(), self.db.read() as conn:
            return history_rows.entries(conn, name, limit, self._setting().held)

    def run_entry(self, name: str) -> HistoryEntry | None:
        """The history row of `name`'s run in progress, or of its latest; None before any."""
        self.migrations[name]
        with self.db.unavailable_as_error(), self.db.read() as conn:
            return history_rows.latest(conn, name, self._setting().held)

    # -- read-only scans ----------------------------------------------------------------------

    def verify(self, name: str, *, record: bool = True) -> Verification:
        """Full read-only scan: rows the migration would still change, and rows it raises on.
        Its result is recorded for `status` where backfill's tables are and this user may write;
        where it may not (a read-only user, a replica), verify works the same and says so in the
        log."""
        migration = self.migration(name)
        with self.db.unavailable_as_error():
            check_table(self.db.engine, migration)
            found = verify(self.db, migration)
        if record:
            verification.record(self.db, name, found, self.clock())
        return found

    def count(self, name: str) -> Verification:
        """How many rows the migration would still change (the same scan as verify, read-only:
        nothing recorded)."""
        return self.verify(name, record=False)

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
        undo: bool | None = None,
        prefer_undo: bool = False,
    ) -> list[RunResult]:
        """Run the migrations one after another; stop at the first that fails or is canceled.
        `sql=False` ignores declared SQL (SqlChange): every row goes through the function.
        `listeners` get this call's events, after the runner's own. `undo`: log each change
        to undo it (`revert`); None: as the run it resumes did, else with `prefer_undo`
        (prod's default) wherever the migration can be undone."""
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
                # A dry run goes through the function, and records nothing (not a verify).
                size, choice = self._ready(
                    migration,
                    batch_size,
                    sql and not dry_run,
                    gate=not force,
                    min_age=min_age,
                    record=not dry_run,
                    undo=leases.Undo(undo, prefer_undo),
                )
                if dry_run:
                    report = rehearse(
                        self.db, migration, size, dry_run_batches, policy, self._observed
                    )
                    status = self.status([migration.name])[migration.name]
                    result = RunResult(migration.name, status, dry_run=report)
                elif not restart and records.has_plan_to_finish(self.db, migration.name):
                    # A run with a plan resumes every shard from its cursor: one worker, here.
                    worker = self._worker(migration, emit)
                    work = worker.join_and_work(size, policy, pause, sql, run=True, undo=choice)
                    result = RunResult(work.name, work.status, work.already_done, work.error)
                else:
                    run = self._run(migration, emit)
                    result = run.start(size, restart, policy, pause, sql=sql, undo=choice)
            results.append(result)
            if result.state in (State.FAILED, State.CANCELED):
                break
        return results

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
    ) -> tuple[int, leases.Undo]:
        """What every run of `migration` checks first: its table, its prerequisite's `gate`
        (a verify it needs `record`ed), its undo choice (`undo.default`, prod's, only where it
        can be undone; an explicit `--undo` where it cannot is refused); and the batch size:
        `batch_size`, else the migration's (its declared SQL's on this dialect when `sql`)."""
        check_table(self.db.engine, migration)
        if gate:
            self._check_gate(migration, min_age, record=record)
        cannot = migration.cannot_undo
        if undo.asked and cannot:
            raise Refused(f"{cannot}; run it without --undo")
        change = declared_change(migration, self.db.dialect) if sql else None
        size = batch_size or migration.default_batch_size(change)
        return size, leases.Undo(undo.asked, undo.default and cannot is None)

    def _worker(
        self, migration: Migration, emit: Emitter, invocation: Invocation | None = None
    ) -> Worker:
        return Worker(self._run(migration, emit, invocation))

    def _run(
        self, migration: Migration, emit: Emitter, invocation: Invocation | None = None
    ) -> Run:
        status = self.status
        return Run(self._setting(invocation), migration, emit=emit, status=lambda n: status([n])[n])

    def _check_gate(
        self, migration: Migration, min_age: timedelta | None, *, record: bool = True
    ) -> None:
        """GateClosed unless `migration` may run; a verify it needs is recorded (`record`:
        not for a dry run, which persists nothing)."""
        gate.check(
            migration,
            min_age,
            now=self.clock(),
            status=lambda name: self.status([name])[name],
            verify=lambda name: self.verify(name, record=record),
        )


__all__ = ["Runner", "StepResult"]

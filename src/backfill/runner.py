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

from backfill import lease as leases
from backfill import retry
from backfill.decision import OnError
from backfill.definition import Migration
from backfill.dry_run import rehearse
from backfill.errors import GateClosed
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
from backfill.types import Clock, Identity
from backfill.verification import SAMPLE_IDS, Verification, verify


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
        run = Run(
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
        return run.start(size, restart, policy, pause, sql=sql)


def _rounded(age: timedelta) -> timedelta:
    return timedelta(seconds=round(age.total_seconds()))


__all__ = ["Runner"]

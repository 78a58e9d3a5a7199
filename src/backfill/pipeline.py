"""A run's batches: one transaction each, and the next batch made ready while one commits.

The runner drives the loop (lease, signals, progress events, pauses) and calls `Batches.next`;
this module owns what happens inside and between the transactions. It knows nothing of the CLI.

Where the store can tell that no other connection committed in between (SQLite), work on the
next batch is done on a second connection while the current one works (SQLite runs with the
GIL released): on the Python path its rows are read and decided while a thread writes and
commits the current batch; on the SQL path its rows are prepared (counted, decoded, checked
against the guard) on a thread while the current batch's UPDATE runs. The next transaction
takes that work instead of doing it again. Otherwise, or when in doubt, each transaction does
its own. On SQLite the WAL is checkpointed on a thread of its own too (store.checkpoints).
"""

from __future__ import annotations

import gc
import sys
import time as _time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import sqlalchemy as sa

from backfill.ahead import Ahead
from backfill.batch import OnError, Outcome, decide
from backfill.definition import Context, Form, Migration
from backfill.errors import LeaseLost, RowFailed
from backfill.progress import MigrationStatus
from backfill.retry import Transient
from backfill.state import State
from backfill.store import records
from backfill.store.checkpoints import WalCheckpointer
from backfill.store.copy import CopyTarget
from backfill.store.database import Database
from backfill.store.expression import Prepared, Rejected, SqlBatch
from backfill.store.scan import Snapshot, TableScan
from backfill.store.values import Rows
from backfill.types import Clock, Key, decode_key, encode_key

GIL_HANDOFF_SECONDS = 0.0005


@dataclass(frozen=True)
class Batch:
    """A committed batch: its rows' first and last keys, how many it read and changed, the
    time from its BEGIN to its COMMIT, and whether it was the last."""

    done: bool
    first_key: Key | None
    last_key: Key | None
    rows_read: int
    rows_changed: int
    seconds: float
    batch_size: int


class Decider:
    """A migration's decisions on the rows of a batch, on the connection of its transaction:
    the function (given a Context if it takes one) and, for a copy, what its target lacks.
    Runs, dry runs and read-only scans (verify) all decide through it."""

    def __init__(self, db: Database, migration: Migration, scan: TableScan) -> None:
        self.db = db
        self.migration = migration
        self.scan = scan
        self.copier = None if migration.in_place else CopyTarget(db.engine, migration)
        # Only a plain function of a row, written back in place, may be decided outside the
        # batch's transaction (read ahead): the others need its connection.
        self.needs_transaction = (
            migration.takes_context or migration.form is Form.BATCH or not migration.in_place
        )

    def _transient(self, error: BaseException) -> bool:
        return self.db.transient(error) is not None

    def __call__(
        self,
        conn: sa.Connection,
        rows: Rows,
        policy: OnError,
        *,
        samples: int = 0,
        write: bool = True,
        dry_run: bool = False,
    ) -> Outcome:
        """Decide `rows`; with `write`, a copy's rows are written (in place changes are written
        by the caller, from `outcome.writes`)."""
        migration, copier = self.migration, self.copier
        context = Context(conn, migration.name, dry_run) if migration.takes_context else None
        writes = self.scan.writes() if copier is None else copier.writes()
        outcome = decide(
            migration, rows, policy, samples, writes, context=context, passthrough=self._transient
        )
        if copier is not None:
            kept, before = copier.settle(
                conn, outcome.changes, outcome.writes, lock=write, write=write
            )
            outcome.narrow(kept, before)
        return outcome


class Batches:
    """The batch transactions of one run that holds the lease at `generation`."""

    def __init__(
        self,
        db: Database,
        migration: Migration,
        generation: int,
        record: records.Record,
        size: int,
        policy: OnError,
        clock: Clock,
        *,
        sql: bool = True,
    ) -> None:
        self.db = db
        self.migration = migration
        self.size = size
        self.policy = policy
        self.clock = clock
        self.scan = TableScan(db.engine, migration)
        self.decider = Decider(db, migration, self.scan)
        self.ledger = records.Ledger(db.engine.dialect, migration.name, generation)
        self.progress = _Progress(record)
        # The migration's declared SQL for this dialect, unless the run asked for Python only.
        self.in_database = SqlBatch.declared(db.engine, migration) if sql else None
        self._ahead: Ahead[Outcome] | None = None  # the next batch decided (Python path)
        self._prepared: Ahead[Prepared] | None = None  # the next batch prepared (SQL path)
        self._checkpoints: WalCheckpointer | None = None
        self._stack = ExitStack()

    def __enter__(self) -> Batches:
        # One connection for every batch transaction (a snapshot token is only comparable on
        # the same connection), one to read ahead on, and one thread that writes and commits.
        stack = self._stack
        self._conn = stack.enter_context(self.db.engine.connect())
        self._reader = stack.enter_context(self.db.engine.connect())
        self._helper = stack.enter_context(
            ThreadPoolExecutor(1, thread_name_prefix=f"batch-{self.migration.name}")
        )
        if self.db.dialect == "sqlite":
            self._checkpoints = stack.enter_context(WalCheckpointer(self.db.engine, self._conn))
        stack.enter_context(_interpreter_tuned())
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    def status(self) -> MigrationStatus:
        """As of the last commit of this run, without asking the database."""
        return records.Record(self.progress.values).status(State.IN_PROGRESS)

    def next(self) -> Batch | None:
        """One transaction: rows, changes, skipped rows and the cursor commit together, and only
        while this runner still owns the migration. None when a cancel was requested; RowFailed
        under OnError.FAIL (nothing of the batch is kept); LeaseLost when taken over.

        With a declared SqlChange the batch is decided in the database; if the database rejects
        it (bad input), the batch rolled back and is done again through the Python function,
        which names the bad row and field, or records it under OnError.SKIP."""
        try:
            return self._next(self.in_database)
        except Rejected:
            return self._next(None)

    def _next(self, in_database: SqlBatch | None) -> Batch | None:
        conn, scan, progress, name = self._conn, self.scan, self.progress, self.migration.name
        ahead, self._ahead = self._ahead, None
        prepared_ahead, self._prepared = self._prepared, None
        if self._checkpoints is not None:
            self._checkpoints.before_batch()
        began = _time.perf_counter()
        transaction = self.db.begin_batch(conn)
        preparing: Future[Ahead[Prepared] | None] | None = None
        try:
            owned, cancel_requested = self.ledger.check(conn)
            if not owned:
                raise LeaseLost(name)
            if cancel_requested:
                transaction.rollback()
                return None
            snapshot = scan.snapshot(conn)
            outcome = None if ahead is None else ahead.take(progress.cursor, snapshot)
            if outcome is None and in_database is not None:
                prepared = None
                if prepared_ahead is not None:
                    prepared = prepared_ahead.take(progress.cursor, snapshot)
                if prepared is None:
                    prepared = in_database.prepare(conn, progress.cursor, self.size)
                if snapshot is not None and prepared.rows == self.size:
                    # The next batch is prepared on the reader while this one's UPDATE runs.
                    preparing = self._helper.submit(
                        self._prepare_ahead, in_database, prepared.last_key, snapshot
                    )
                applied = in_database.apply(conn, progress.cursor, prepared)
                outcome = Outcome(
                    applied.processed,
                    last_key=applied.last_key,
                    first_key=applied.first_key,
                    changed_in_database=applied.changed,
                )
                snapshot = None  # the next batch is decided in the database too: no read-ahead
            if outcome is None:
                rows = scan.read(conn, progress.cursor, self.size)
                outcome = self.decider(conn, rows, self.policy)
            now = self.clock()
            records.record_skipped(
                conn,
                name,
                [(s.key, s.field, s.error_type, s.message) for s in outcome.skipped],
                now,
            )
            values = progress.after(outcome)
            values.update(updated_at=now, heartbeat_at=now)
            done = outcome.processed < self.size
            if done:
                values.update(finished_at=now, heartbeat_at=None)
                records.transition(
                    conn,
                    name,
                    at_generation=self.ledger.generation,
                    source=State.IN_PROGRESS,
                    target=State.SUCCESS,
                    **values,
                )
            elif not self.ledger.advance(conn, values):
                raise LeaseLost(name)
            # No read-ahead where batches are decided in the database: a batch done in Python
            # (rejected by the SQL) must not pull the next one out of the SQL path.
            ahead_useful = self.in_database is None and not self.decider.needs_transaction
            if done or snapshot is None or outcome.moves_keys or not ahead_useful:
                committed = _write_and_commit(conn, scan, outcome, transaction)
            else:
                committing = self._helper.submit(
                    _write_and_commit, conn, scan, outcome, transaction
                )
                try:
                    self._ahead = self._read_ahead(decode_key(values["cursor"]), snapshot)
                finally:
                    committed = committing.result()  # the commit's own error, if any, wins
        except BaseException:
            self._ahead = None
            if preparing is not None:
                wait([preparing])  # the reader is free again before anything else uses it
            if transaction.is_active:
                transaction.rollback()
            raise
        if preparing is not None:
            self._prepared = preparing.result()
        if self._checkpoints is not None:
            self._checkpoints.committed()
        progress.commit(values)
        return Batch(
            done,
            outcome.first_key,
            outcome.last_key,
            outcome.processed,
            outcome.changed,
            committed - began,
            self.size,
        )

    def recover(self, transient: Transient) -> None:
        """Make ready to try a batch again after a transient error (backfill.retry): the failed
        try rolled back, or died with its connection, which is then replaced. Progress is read
        back from `_migrations`, the truth even when the connection died during a COMMIT whose
        outcome this runner never heard."""
        self._ahead = self._prepared = None
        if transient.reconnect:
            for old in (self._conn, self._reader):
                with suppress(Exception):
                    old.invalidate()
                with suppress(Exception):
                    old.close()
            self._conn = self._stack.enter_context(self.db.engine.connect())
            self._reader = self._stack.enter_context(self.db.engine.connect())
        if transient.shrink:
            self.size = max(1, self.size // 2)
        with self._conn.begin():
            record = records.load(self._conn, self.migration.name)
        if record is None or record.generation != self.ledger.generation:
            raise LeaseLost(self.migration.name)
        self.progress = _Progress(record)

    def _read_ahead(self, cursor: Key | None, snapshot: Snapshot) -> Ahead[Outcome] | None:
        try:
            # One SELECT outside any transaction: SQLite reads it from one snapshot.
            rows = self.scan.read(self._reader, cursor, self.size)
        except Exception:  # noqa: BLE001 - the next transaction reads again and reports it
            return None
        writes = self.scan.writes()
        try:
            outcome = decide(self.migration, rows, self.policy, writes=writes)
        except RowFailed:
            # Not kept: the transaction decides the batch again, which reports the failure
            # exactly as a plain run does.
            return Ahead(cursor, snapshot)
        return Ahead(cursor, snapshot, outcome)

    def _prepare_ahead(
        self, in_database: SqlBatch, cursor: Key | None, snapshot: Snapshot
    ) -> Ahead[Prepared] | None:
        try:
            return Ahead(cursor, snapshot, in_database.prepare(self._reader, cursor, self.size))
        except Exception:  # noqa: BLE001 - Rejected, say: the transaction prepares it again
            return None


class _Progress:
    """The run's `_migrations` row as last committed; `after` proposes the next values."""

    def __init__(self, record: records.Record) -> None:
        self.values = dict(record.values)
        self.cursor: Key | None = record.cursor

    def after(self, outcome: Outcome) -> dict[str, Any]:
        v = self.values
        return {
            "processed": v["processed"] + outcome.processed,
            "changed": v["changed"] + outcome.changed,
            "skipped_errors": v["skipped_errors"] + len(outcome.skipped),
            "kept": v["kept"] + len(outcome.kept),
            "cursor": v["cursor"] if outcome.last_key is None else encode_key(outcome.last_key),
        }

    def commit(self, values: dict[str, Any]) -> None:
        self.values.update(values)
        self.cursor = decode_key(values["cursor"])


def _write_and_commit(
    conn: sa.Connection, scan: TableScan, outcome: Outcome, transaction: sa.RootTransaction
) -> float:
    """Write the batch's changes and commit; the moment the COMMIT returned."""
    if outcome.writes is not None and outcome.changes:
        scan.write(conn, outcome.writes)
    transaction.commit()
    return _time.perf_counter()


@contextmanager
def _interpreter_tuned() -> Iterator[None]:
    """Two interpreter settings for the length of a run, both measured on the flagship:

    - the garbage collector leaves alone the objects that exist before the run (modules,
      SQLAlchemy metadata: hundreds of thousands). Each batch's rows outlive a young collection
      or two, and the full collections they trigger walked that whole heap again and again, a
      tenth of the run. Not done if the application froze objects itself;
    - threads hand the GIL over after 0.5 ms instead of 5: the commit thread needs it back
      after each SQLite call, and waited up to 5 ms each time while the main thread decided
      the next batch, which made the commit, not the Python work, set the pace.
    """
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, GIL_HANDOFF_SECONDS))
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
        if freeze:
            gc.unfreeze()

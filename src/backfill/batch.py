"""The batch: one transaction that reads the rows after the cursor, decides them, writes the
changes and advances the cursor under the lease, then commits. The heart of the engine.

`Batches._next` is those steps, in order (docs/architecture.md, "A batch"):

1. begin, and check the migration is still this runner's (its generation, state inProgress)
   and not asked to stop;
2. read the rows after the cursor in key order, locked where the dialect locks, and decide
   them: in the database when the migration declares SQL for this dialect (store.expression),
   else through the Python function (backfill.decision);
3. advance `_migrations` (cursor, counters, heartbeat; `success` on the last batch) with a
   compare-and-set on the generation, so a runner taken over commits nothing;
4. write the changes and commit.

A crash before the commit leaves no trace; after it the batch is done for good. Work on the next
batch done meanwhile (backfill.ahead) is only ever a shortcut: the transaction checks it may
stand, else does it again. The runner drives the loop (lease, signals, events, pauses).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any

import sqlalchemy as sa

from backfill import retry
from backfill.ahead import WorkAhead, interpreter_tuned
from backfill.decision import Decider, OnError, Outcome
from backfill.definition import Migration
from backfill.events import BatchCommitted, shown_key
from backfill.position import Position, Stored
from backfill.progress import MigrationStatus, status_of
from backfill.state import State
from backfill.store import records, skipped
from backfill.store.checkpoints import checkpoints_for
from backfill.store.database import Database
from backfill.store.expression import Rejected, SqlBatch
from backfill.store.scan import Snapshot, TableScan
from backfill.store.transient import Transient
from backfill.store.undo import UndoLog
from backfill.types import Clock, Key, decode_key, encode_key


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

    def event(
        self, migration: str, at: float, shard: int | None, processed: int, total: int | None
    ) -> BatchCommitted:
        """This batch as its `batch` event reports it (`processed`: the count it advanced)."""
        return BatchCommitted(
            migration,
            at,
            shard,
            shown_key(self.first_key),
            shown_key(self.last_key),
            self.rows_read,
            self.rows_changed,
            round(self.seconds, 6),
            self.batch_size,
            processed,
            total,
        )


class Batches:
    """The batch transactions of one run that holds the lease at `generation`."""

    def __init__(
        self,
        db: Database,
        migration: Migration,
        position: Position,
        size: int,
        policy: OnError,
        clock: Clock,
        *,
        sql: bool = True,
        undo: UndoLog | None = None,
    ) -> None:
        self.db = db
        self.migration = migration
        self.size = size
        self.policy = policy
        self.clock = clock
        self.scan = TableScan(db.engine, migration)
        # A run that logs its changes to undo them decides every row in Python, in the batch's
        # own transaction: the log needs each value before, read under the batch's locks.
        self.undo = undo
        self.decider = Decider(db, migration, self.scan, keep_before=undo is not None)
        self.position = position
        self.progress = _Progress(position.start)
        # The migration's declared SQL for this dialect, unless the run asked for Python only.
        self.in_database = SqlBatch.declared(db.engine, migration) if sql and not undo else None
        # Reading ahead on the Python path: not where batches are decided in the database (a
        # batch done in Python, rejected by the SQL, must not pull the next one out of the SQL
        # path), nor for functions that need the batch's transaction.
        self._reads_ahead = (
            self.in_database is None and not self.decider.needs_transaction and undo is None
        )
        self._stack = ExitStack()

    def __enter__(self) -> Batches:
        # One connection for every batch transaction (a snapshot token is only comparable on
        # the same connection), one to work ahead on, and one thread that writes and commits.
        stack = self._stack
        self._conn = stack.enter_context(self.db.engine.connect())
        helper = stack.enter_context(
            ThreadPoolExecutor(1, thread_name_prefix=f"batch-{self.migration.name}")
        )
        self._helper = helper
        reader = stack.enter_context(self.db.engine.connect())
        self.ahead = WorkAhead(reader, helper, self.scan, self.migration, self.policy)
        self._checkpoints = stack.enter_context(checkpoints_for(self.db.engine, self._conn))
        stack.enter_context(interpreter_tuned())
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()

    def status(self) -> MigrationStatus:
        """As of the last commit of this run, without asking the database (one runner's)."""
        return status_of(records.Record(self.progress.values), State.IN_PROGRESS)

    @property
    def processed(self) -> int:
        """Rows processed where these batches keep their counters, as last committed."""
        return int(self.progress.values["processed"])

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

    def next_retried(
        self, policy: retry.RetryPolicy, sleep: Callable[[float], None]
    ) -> Batch | None:
        """`next`, a transient error (the database's, store.transient) retried by `policy`
        after `recover`."""
        name = self.migration.name
        return retry.call(
            self.next,
            migration=name,
            policy=policy,
            classify=self.db.transient,
            recover=self.recover,
            sleep=sleep,
            on_retry=partial(retry.log_retry, name, policy.attempts),
        )

    def _next(self, in_database: SqlBatch | None) -> Batch | None:
        conn = self._conn
        self._checkpoints.before_batch()
        began = time.perf_counter()
        transaction = self.db.begin_batch(conn)
        try:
            if self._stop_requested(conn):  # 1. (LeaseLost if no longer ours)
                transaction.rollback()
                return None
            outcome, snapshot = self._decide(conn, in_database)  # 2.
            values, done = self._advance(conn, outcome)  # 3.
            committed = self._write_and_commit(conn, outcome, transaction, values, done, snapshot)
        except BaseException:
            self.ahead.drop()
            if transaction.is_active:
                transaction.rollback()
            raise
        self.ahead.settle()
        self._checkpoints.committed()
        self.progress.commit(values)
        return Batch(
            done,
            outcome.first_key,
            outcome.last_key,
            outcome.processed,
            outcome.changed,
            committed - began,
            self.size,
        )

    def _stop_requested(self, conn: sa.Connection) -> bool:
        """Whether a stop was requested; LeaseLost when the batches are no longer ours."""
        return self.position.stop_requested(conn)

    def _decide(
        self, conn: sa.Connection, in_database: SqlBatch | None
    ) -> tuple[Outcome, Snapshot | None]:
        """The batch after the cursor, decided: as worked ahead if that may stand, else in the
        database, else in Python. Also the snapshot token a read-ahead may be checked against
        (None: no read-ahead after this batch)."""
        cursor = self.progress.cursor
        snapshot = self.scan.snapshot(conn)
        decided = self.ahead.decided(cursor, snapshot)
        prepared = self.ahead.prepared(cursor, snapshot)
        if decided is not None:
            return decided, snapshot
        if in_database is not None:
            return self._decide_in_database(conn, in_database, prepared, snapshot), None
        return self.decider(conn, self.scan.read(conn, cursor, self.size), self.policy), snapshot

    def _decide_in_database(
        self,
        conn: sa.Connection,
        in_database: SqlBatch,
        prepared: Any,
        snapshot: Snapshot | None,
    ) -> Outcome:
        cursor = self.progress.cursor
        if prepared is None:
            prepared = in_database.prepare(conn, cursor, self.size)
        if snapshot is not None and prepared.rows == self.size:
            # The next batch is prepared on the reader while this one's UPDATE runs.
            self.ahead.prepare_next(in_database, prepared.last_key, snapshot, self.size)
        applied = in_database.apply(conn, cursor, prepared)
        return Outcome(
            applied.processed,
            last_key=applied.last_key,
            first_key=applied.first_key,
            changed_in_database=applied.changed,
        )

    def _advance(self, conn: sa.Connection, outcome: Outcome) -> tuple[dict[str, Any], bool]:
        """Skipped rows, cursor and counters, under the generation check; the last batch (fewer
        rows than asked for) ends the range: `success` through the transition table."""
        name, now = self.migration.name, self.clock()
        skipped.record(
            conn, name, [(s.key, s.field, s.error_type, s.message) for s in outcome.skipped], now
        )
        if self.undo is not None:
            self._log(conn, outcome)
        values = self.progress.after(outcome)
        done = outcome.processed < self.size
        self.position.advance(conn, values, done, now)
        return values, done

    def _log(self, conn: sa.Connection, outcome: Outcome) -> None:
        """The batch's changes in the undo log, in its transaction: in place, each changed
        column's value before and after; for a copy, the target rows it inserts, and those it
        overwrites (existing="update") column by column."""
        assert self.undo is not None
        if self.migration.in_place:
            changes = zip(outcome.changes, outcome.befores, strict=True)
            self.undo.updates(conn, ((key, before, diff) for (key, diff), before in changes))
            return
        target = self.migration.target
        assert target is not None
        names = tuple(target.primary_key.columns.keys())
        inserted, overwritten = [], []
        for source_key, row in outcome.changes:
            target_key = tuple(row[n] for n in names)
            old = outcome.replaced.get(source_key)
            if old is None:
                inserted.append((target_key, row))
            else:
                after = {n: v for n, v in row.items() if n not in names}
                overwritten.append((target_key, old, after))
        self.undo.inserts(conn, inserted)
        self.undo.updates(conn, overwritten)

    def _write_and_commit(
        self,
        conn: sa.Connection,
        outcome: Outcome,
        transaction: sa.RootTransaction,
        values: dict[str, Any],
        done: bool,
        snapshot: Snapshot | None,
    ) -> float:
        """Write the changes and commit; the moment the COMMIT returned. Where the next batch
        may be read ahead, the commit runs on the thread while this one reads and decides it."""
        if done or snapshot is None or outcome.moves_keys or not self._reads_ahead:
            return _write_and_commit(conn, self.scan, outcome, transaction)
        committing = self._helper.submit(_write_and_commit, conn, self.scan, outcome, transaction)
        try:
            self.ahead.decide_next(decode_key(values["cursor"]), snapshot, self.size)
        finally:
            committed = committing.result()  # the commit's own error, if any, wins
        return committed

    def recover(self, transient: Transient) -> None:
        """Make ready to try a batch again after a transient error (backfill.retry): the failed
        try rolled back, or died with its connection, which is then replaced. Progress is read
        back from `_migrations`, the truth even when the connection died during a COMMIT whose
        outcome this runner never heard."""
        self.ahead.drop()
        if transient.reconnect:
            for old in (self._conn, self.ahead.reader):
                with suppress(Exception):
                    old.invalidate()
                with suppress(Exception):
                    old.close()
            self._conn = self._stack.enter_context(self.db.engine.connect())
            self.ahead.reader = self._stack.enter_context(self.db.engine.connect())
        if transient.shrink:
            self.size = max(1, self.size // 2)
        with self._conn.begin():
            self.progress = _Progress(self.position.reload(self._conn))


class _Progress:
    """The batches' progress as last committed; `after` proposes the next values."""

    def __init__(self, stored: Stored) -> None:
        self.values = dict(stored.values)
        self.cursor: Key | None = stored.cursor

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
    return time.perf_counter()

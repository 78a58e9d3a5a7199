"""Work on the next batch done ahead of its transaction, and when that work may stand.

Where the store can tell that no other connection committed in between (SQLite's snapshot
token), the next batch is worked on a second connection while the current one works (SQLite
runs with the GIL released): on the Python path its rows are read and decided while a thread
writes and commits the current batch; on the SQL path its rows are prepared (counted, decoded,
checked against the guard) on that thread while the current batch's UPDATE runs. The next
transaction takes that work instead of doing it again, if nothing can have changed it.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

import sqlalchemy as sa

from backfill.decision import OnError, Outcome, decide
from backfill.definition import Migration
from backfill.errors import RowFailed
from backfill.store.expression import Prepared, SqlBatch
from backfill.store.scan import Snapshot, TableScan
from backfill.types import Key

Work = TypeVar("Work")
GIL_HANDOFF_SECONDS = 0.0005


@dataclass(frozen=True)
class Ahead(Generic[Work]):
    """Work on the next batch done outside any transaction, on the reader connection, while the
    current batch commits (its rows read and decided, on the Python path) or runs its UPDATE
    (its rows prepared, on the SQL path).

    It may stand for that work inside the next transaction only when nothing can have changed
    its rows in between: same cursor, and the store's snapshot token unchanged (no other
    connection committed since the current transaction took the write lock; the current batch
    writes other rows).
    """

    cursor: Key | None
    snapshot: Snapshot
    work: Work | None = None

    def take(self, cursor: Key | None, snapshot: Snapshot | None) -> Work | None:
        """The work to use in the transaction that sees `snapshot`; None: do it again."""
        if snapshot is None or snapshot != self.snapshot or cursor != self.cursor:
            return None
        return self.work


class WorkAhead:
    """The next batch's work for one run: done on `reader`, on the pool's one thread for the
    SQL path's preparation; held until the next transaction takes it, or dropped."""

    def __init__(
        self,
        reader: sa.Connection,
        helper: ThreadPoolExecutor,
        scan: TableScan,
        migration: Migration,
        policy: OnError,
    ) -> None:
        self.reader, self._helper = reader, helper
        self._scan, self._migration, self._policy = scan, migration, policy
        self._decided: Ahead[Outcome] | None = None  # the next batch decided (Python path)
        self._prepared: Ahead[Prepared] | None = None  # the next batch prepared (SQL path)
        self._preparing: Future[Ahead[Prepared] | None] | None = None

    def decided(self, cursor: Key | None, snapshot: Snapshot | None) -> Outcome | None:
        """The batch after `cursor` as decided ahead, if that may stand (taken once)."""
        ahead, self._decided = self._decided, None
        return None if ahead is None else ahead.take(cursor, snapshot)

    def prepared(self, cursor: Key | None, snapshot: Snapshot | None) -> Prepared | None:
        """The batch after `cursor` as prepared ahead, if that may stand (taken once)."""
        ahead, self._prepared = self._prepared, None
        return None if ahead is None else ahead.take(cursor, snapshot)

    def decide_next(self, cursor: Key | None, snapshot: Snapshot, size: int) -> None:
        """Read and decide the batch after `cursor` (here, while the commit runs on the
        thread). Nothing is kept if it cannot be done: the transaction does it again."""
        try:
            # One SELECT outside any transaction: SQLite reads it from one snapshot.
            rows = self._scan.read(self.reader, cursor, size)
        except Exception:  # noqa: BLE001 - the next transaction reads again and reports it
            return
        writes = self._scan.writes()
        try:
            outcome = decide(self._migration, rows, self._policy, writes=writes)
        except RowFailed:
            # Not kept: the transaction decides the batch again, which reports the failure
            # exactly as a plain run does.
            self._decided = Ahead(cursor, snapshot)
            return
        self._decided = Ahead(cursor, snapshot, outcome)

    def prepare_next(
        self, in_database: SqlBatch, cursor: Key | None, snapshot: Snapshot, size: int
    ) -> None:
        """Start preparing the batch after `cursor` on the thread (while this one's UPDATE
        runs); `settle` collects it once this batch committed."""
        self._preparing = self._helper.submit(self._prepare, in_database, cursor, snapshot, size)

    def _prepare(
        self, in_database: SqlBatch, cursor: Key | None, snapshot: Snapshot, size: int
    ) -> Ahead[Prepared] | None:
        try:
            return Ahead(cursor, snapshot, in_database.prepare(self.reader, cursor, size))
        except Exception:  # noqa: BLE001 - Rejected, say: the transaction prepares it again
            return None

    def settle(self) -> None:
        """After a commit: keep what was prepared meanwhile."""
        preparing, self._preparing = self._preparing, None
        if preparing is not None:
            self._prepared = preparing.result()

    def drop(self) -> None:
        """After a failed batch: nothing done ahead stands, and the reader is free again."""
        preparing, self._preparing = self._preparing, None
        if preparing is not None:
            wait([preparing])
        self._decided = self._prepared = None


@contextmanager
def interpreter_tuned() -> Iterator[None]:
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

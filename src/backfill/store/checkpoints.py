"""SQLite's WAL checkpoints during a run: taken off the commit path, onto a thread of their own.

By default the connection that commits also checkpoints, inside COMMIT, once the WAL passes
1,000 pages: each batch of the flagship (10,000 rows, about 11 MB of WAL) then copied its pages
into the database file and synced it before the next batch could begin, a third of a run.
During a run the batch connection does not checkpoint (`wal_autocheckpoint = 0`); a thread with
a connection of its own runs a PASSIVE checkpoint after each commit while the next batch works
(SQLite releases the GIL, so both cores work). The WAL starts over only when a transaction
begins with every frame checkpointed, which never happens while batches keep coming; so once
it passes `bound` bytes, the next batch first waits for the checkpoint to catch up, and its
transaction starts the WAL over. Measured: a WAL left to grow cost more than it saved (a file
growing block by block costs the filesystem more than one rewritten in place).

The app's own writers may still checkpoint at their commits (their connections' setting); a
passive checkpoint never waits for ours. What a commit guarantees does not change: a committed
batch is in the WAL either way. When the run ends the WAL is checkpointed once more, as the
last commit would have done.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, closing, suppress
from types import TracebackType
from typing import Any, Protocol

import sqlalchemy as sa

from backfill.store.database import driver

WAL_BOUND_BYTES = 64 * 1024 * 1024


class WalCheckpointer:
    """Checkpoints `conn`'s database on a thread of its own, for the length of a run.

    The run calls `before_batch` before each batch transaction begins and `committed` after
    each commit."""

    def __init__(self, engine: sa.Engine, conn: sa.Connection) -> None:
        self._engine = engine
        self._batch_connection = driver(conn)
        self._bound = WAL_BOUND_BYTES
        self._condition = threading.Condition()
        self._requested = 0  # commits after which a checkpoint was asked for
        self._covered = 0  # of those, the latest a finished checkpoint has seen
        self._wal_bytes = 0  # the WAL's size as the latest checkpoint found it
        self._caught_up = False  # whether the latest checkpoint copied every frame
        self._stopping = False
        self._running = False
        self._thread: threading.Thread | None = None

    def __enter__(self) -> WalCheckpointer:
        self._own = self._engine.connect()
        raw = self._batch_connection.cursor()
        try:
            (self._restore,) = raw.execute("PRAGMA wal_autocheckpoint").fetchone()
            raw.execute("PRAGMA wal_autocheckpoint = 0")
            (self._page_size,) = raw.execute("PRAGMA page_size").fetchone()
        finally:
            raw.close()
        self._running = True
        self._thread = threading.Thread(target=self._work, name="wal-checkpoints", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        assert self._thread is not None
        self._thread.join()  # after the checkpoint asked for by the last commit
        self._own.close()
        with suppress(Exception):  # a connection gone bad is discarded by the pool anyway
            raw = self._batch_connection.cursor()
            raw.execute(f"PRAGMA wal_autocheckpoint = {int(self._restore)}")
            raw.close()

    def committed(self) -> None:
        """A batch committed: its frames are to be checkpointed."""
        with self._condition:
            self._requested += 1
            self._condition.notify_all()

    def before_batch(self) -> None:
        """Wait, if need be, so the WAL stays within about the bound and two batches: until the
        checkpointer is at most one commit behind, and, once the WAL is past the bound, until it
        has caught up with every commit (the transaction about to begin then starts the WAL
        over)."""
        with self._condition:
            self._condition.wait_for(self._may_begin)
            if self._covered >= self._requested and self._caught_up:
                self._wal_bytes = 0  # the transaction about to begin starts the WAL over

    def _may_begin(self) -> bool:
        if not self._running or self._covered >= self._requested:
            return True
        return self._covered >= self._requested - 1 and self._wal_bytes < self._bound

    def _work(self) -> None:
        try:
            with closing(driver(self._own).cursor()) as raw:
                while True:
                    with self._condition:
                        self._condition.wait_for(
                            lambda: self._requested > self._covered or self._stopping
                        )
                        if self._requested == self._covered:
                            return  # stopping, with every commit checkpointed
                        target = self._requested
                    found = self._checkpoint(raw)
                    with self._condition:
                        self._covered = target
                        if found is not None:
                            busy, frames, copied = found
                            self._wal_bytes = frames * self._page_size
                            self._caught_up = not busy and copied == frames
                        self._condition.notify_all()
        finally:
            with self._condition:  # nobody waits for a thread that is gone
                self._running = False
                self._condition.notify_all()

    @staticmethod
    def _checkpoint(raw: Any) -> tuple[int, int, int] | None:
        # As for SQLite's own automatic checkpoints, a failed one is not the run's error: the
        # frames stay in the WAL (every commit is there already) for the next one to copy.
        try:
            row = raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except Exception:  # noqa: BLE001
            return None
        return int(row[0]), int(row[1]), int(row[2])


class _NoCheckpoints:
    """Where the server checkpoints on its own (PostgreSQL, MySQL): nothing to do."""

    def __enter__(self) -> _NoCheckpoints:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def before_batch(self) -> None:
        return None

    def committed(self) -> None:
        return None


class Checkpoints(Protocol):
    """What a run tells the checkpoints of its batch connection."""

    def before_batch(self) -> None: ...

    def committed(self) -> None: ...


def checkpoints_for(engine: sa.Engine, conn: sa.Connection) -> AbstractContextManager[Checkpoints]:
    """What a run's batch connection `conn` does about checkpoints: SQLite's WAL checkpointed
    on a thread of its own, nothing elsewhere. Enter it for the length of the run."""
    if engine.dialect.name == "sqlite":
        return WalCheckpointer(engine, conn)
    return _NoCheckpoints()

"""Work on the next batch done ahead of its transaction, and when that work may stand.

The pipeline does it on a second connection while the current batch works; this module only
holds it with what it was done against (the cursor, and the store's snapshot token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from backfill.store.scan import Snapshot
from backfill.types import Key

Work = TypeVar("Work")


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

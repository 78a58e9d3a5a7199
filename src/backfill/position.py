"""Where a run's batches keep their cursor and counters, and who may advance them: the
migration's own `_migrations` row for one runner (`MigrationPosition`), or a shard's row for a
worker of a run with a plan (`backfill.shard.ShardPosition`). `backfill.batch` advances one in
each batch's transaction, only while it is still this runner's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import sqlalchemy as sa

from backfill.errors import LeaseLost
from backfill.state import State
from backfill.store import records
from backfill.store.database import Database
from backfill.types import Key


class Stored(Protocol):
    """Where a position keeps a run's progress: its cursor and counters, as last committed."""

    @property
    def values(self) -> Mapping[str, Any]: ...

    @property
    def cursor(self) -> Key | None: ...


class Position(Protocol):
    """Where batches keep their cursor and counters, and who may advance them: the migration's
    own row for one runner (`MigrationPosition`), or a shard's for a worker
    (`backfill.shard.ShardPosition`)."""

    @property
    def start(self) -> Stored:
        """The progress the batches start from."""
        ...

    def stop_requested(self, conn: sa.Connection) -> bool:
        """Whether to stop before this batch; LeaseLost when the batches are no longer ours."""
        ...

    def advance(self, conn: sa.Connection, values: dict[str, Any], done: bool, now: float) -> None:
        """Record the batch's cursor and counters (`values`; `done`: its range is exhausted),
        in the batch's transaction, only while still ours: else LeaseLost."""
        ...

    def reload(self, conn: sa.Connection) -> Stored:
        """The progress as committed (after an error whose outcome is unknown); LeaseLost when
        no longer ours."""
        ...


class MigrationPosition:
    """One runner's batches: the cursor and counters on the migration's `_migrations` row,
    under the generation the runner claimed (records.Ledger)."""

    def __init__(self, db: Database, record: records.Record) -> None:
        self.name = str(record["name"])
        self.start: Stored = record
        self.ledger = records.Ledger(db.engine.dialect, self.name, record.generation)

    def stop_requested(self, conn: sa.Connection) -> bool:
        owned, cancel_requested = self.ledger.check(conn)
        if not owned:
            raise LeaseLost(self.name)
        return cancel_requested

    def advance(self, conn: sa.Connection, values: dict[str, Any], done: bool, now: float) -> None:
        values.update(updated_at=now, heartbeat_at=now)
        if done:
            values.update(finished_at=now, heartbeat_at=None)
            records.transition(
                conn,
                self.name,
                at_generation=self.ledger.generation,
                source=State.IN_PROGRESS,
                target=State.SUCCESS,
                **values,
            )
        elif not self.ledger.advance(conn, values):
            raise LeaseLost(self.name)

    def reload(self, conn: sa.Connection) -> Stored:
        record = records.load(conn, self.name)
        if (
            record is None
            or record.generation != self.ledger.generation
            or record.state is not State.IN_PROGRESS
        ):
            raise LeaseLost(self.name)
        return record

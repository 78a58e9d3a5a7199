"""The end of a run with workers: one transition from `inProgress`, whichever worker gets there.

`success` once the last shard is done (each worker looks after its own commit, so the worker of
the last shard always sees every one done; any worker finding them all done says it too, should
that one have died first); `failed` at the first row failure (a later one misses the
compare-and-set: the first error is kept); `canceled` by the first worker that reads a cancel
request, or the last one standing after a signal. The other workers see the state at their
next batch and stop. A miss is no error for a worker: another one got there first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from backfill import retry
from backfill.errors import LeaseLost, RowFailed
from backfill.events import Emitter, RunError, StateChanged
from backfill.shard import Joined, nothing
from backfill.state import ShardState, State
from backfill.store import records, shards
from backfill.store.database import Database
from backfill.types import Clock, Identity, Liveness


class RunEnd:
    """The ways the run `joined` of migration `name` may end, as seen by worker `me`."""

    def __init__(
        self,
        db: Database,
        name: str,
        joined: Joined,
        *,
        clock: Clock,
        emit: Emitter,
        seen: Callable[[], Liveness],
        me: Identity,
    ) -> None:
        self.db, self.name, self.joined = db, name, joined
        self.clock, self.emit, self.seen, self.me = clock, emit, seen, me

    def to(self, target: State, **values: Any) -> bool:
        """Move the run from inProgress to `target` (`success` only when every shard is done);
        False when it did not (another worker, or a claim, got there first)."""
        try:
            with self.db.write(meanwhile=nothing) as conn:
                if target is State.SUCCESS and not all(
                    s.state is ShardState.DONE for s in shards.load(conn, self.name)
                ):
                    return False
                records.transition(
                    conn,
                    self.name,
                    at_generation=self.joined.generation,
                    source=State.IN_PROGRESS,
                    target=target,
                    finished_at=self.clock(),
                    updated_at=self.clock(),
                    heartbeat_at=None,
                    **values,
                )
        except LeaseLost:
            return False
        self.emit(StateChanged(self.name, self.clock(), str(State.IN_PROGRESS), str(target)))
        return True

    def ended(self) -> bool:
        """Whether the run has ended; when every shard is done, it ends now with `success`."""
        with self.db.read() as conn:
            record = records.load(conn, self.name)
        if record is None or record.state is not State.IN_PROGRESS:
            return True
        if record.generation != self.joined.generation:
            return True
        if record.plan and all(s.state is ShardState.DONE for s in record.plan):
            self.to(State.SUCCESS)
            return True
        return False

    def cancel_if_asked(self) -> None:
        with self.db.read() as conn:
            record = records.load(conn, self.name, with_plan=False)
        if record is not None and record.state is State.IN_PROGRESS and record["cancel_requested"]:
            self.to(State.CANCELED)

    def fail(self, failure: RowFailed | retry.RetriesExhausted) -> None:
        row = failure if isinstance(failure, RowFailed) else None
        if self.to(
            State.FAILED,
            error_message=failure.message,
            error_type=failure.error_type,
            error_row_id=None if row is None else json.dumps(row.row_id, default=str),
            error_field=None if row is None else row.field,
        ):
            self.emit(
                RunError(
                    self.name,
                    self.clock(),
                    failure.message,
                    failure.error_type,
                    None if row is None else row.row_id,
                    None if row is None else row.field,
                )
            )

    def cancel(self, *, alone_only: bool) -> None:
        """After a signal stopped this worker: cancel the run (`alone_only`: only when no other
        worker holds a shard, so a lone worker's Ctrl-C means what it means for `run`, and one
        of many leaving lets the others go on)."""
        with self.db.read() as conn:
            record = records.load(conn, self.name)
        if record is None or record.state is not State.IN_PROGRESS:
            return
        seen = self.seen()
        others = [
            s
            for s in record.plan
            if shards.observed(s, seen) is ShardState.IN_PROGRESS and s.holder != self.me
        ]
        if not (alone_only and others):
            self.to(State.CANCELED)

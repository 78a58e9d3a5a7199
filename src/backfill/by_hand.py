"""Commands by hand on a migration's run: `cancel`, `reset` and `forget-undo` (later `tune`,
`hold`, `release`).
Each is one write to the migration's row, checked against its live run, with its history row
in the same transaction."""

from __future__ import annotations

import sqlalchemy as sa

from backfill import lease as leases
from backfill.errors import BeingReverted
from backfill.history import Kind
from backfill.revert import NO_REVERT
from backfill.setting import Setting
from backfill.state import State
from backfill.store import history, records, undo
from backfill.types import Liveness


class ByHand:
    """The commands by hand of this process, in `setting` (its invocation: who asks)."""

    def __init__(self, setting: Setting) -> None:
        self.setting, self.db, self.clock = setting, setting.db, setting.clock
        self.lease_seconds, self.me, self.invocation = (
            setting.lease_seconds,
            setting.me,
            setting.invocation,
        )
        self.observed = setting.observed

    def _live(self, record: records.Record | None) -> State | None:
        """The state a live run (inProgress) or revert (reverting) holds it in; else None."""
        if self.observed(record) is State.IN_PROGRESS:
            return State.IN_PROGRESS
        seen = Liveness(self.clock(), self.lease_seconds, self.me)
        return State.REVERTING if leases.reverting_live(record, seen) else None

    def cancel(self, name: str) -> bool:
        """Ask the live run (or revert) to stop after its current batch; False when there is
        none."""
        db = self.db
        # No live run: say so at once, without waiting for the write lock a runner may hold.
        with db.unavailable_as_error(), db.read() as conn:
            if self._live(records.load(conn, name)) is None:
                return False
        with db.unavailable_as_error(), db.write() as conn:
            record = records.load(conn, name)
            live = self._live(record)
            if live is None or record is None:
                return False
            if not records.update_live(
                conn, name, record.generation, state=live, cancel_requested=True
            ):
                return False
            self._record(conn, name, Kind.CANCEL, None)
            return True

    def reset(self, name: str) -> State | None:
        """Forget the migration's progress; the state it was in (None: it had no row).
        LeaseHeld while a live run holds it, even one that claimed it this very moment: then
        nothing is forgotten, not even its skipped rows."""
        db = self.db

        def refuse_if_held() -> None:
            leases.refuse_if_held(db, name, now=self.clock(), lease=self.lease_seconds, me=self.me)

        with db.unavailable_as_error():
            # A live run is refused at once, without waiting for the write lock it may hold.
            refuse_if_held()
        with db.unavailable_as_error(), db.write(meanwhile=refuse_if_held) as conn:
            record = records.load(conn, name)
            if record is None:
                return None
            observed = self.observed(record)
            seen = Liveness(self.clock(), self.lease_seconds, self.me)
            leases.refuse_if_live(name, record, observed, seen)
            if observed is State.REVERTING:
                raise BeingReverted(name)
            records.forget(conn, record, observed, self.clock())
            self._record(conn, name, Kind.RESET, State.PENDING)
        return observed

    def forget_undo(self, name: str) -> bool:
        """Drop the migration's undo log; False when it had none. A migration `reverting` is
        then `pending` (its revert cannot go on); any other keeps its state, and a run whose
        batches the log held can no longer be reverted. Refused while a run or revert holds
        it."""
        db = self.db
        seen = Liveness(self.clock(), self.lease_seconds, self.me)
        with db.unavailable_as_error(), db.write() as conn:
            record = records.load(conn, name)
            observed = self.observed(record)
            leases.refuse_if_live(name, record, observed, seen)
            had = undo.count(conn, name) > 0 or undo.kept_keys(conn, name, 1) != []
            undo.forget(conn, name)
            if record is None:
                return had
            if observed is State.REVERTING:
                if record["revert_state"] == str(State.IN_PROGRESS):  # its runner died
                    history.close(
                        conn,
                        record["run_id"],
                        outcome=State.INTERRUPTED,
                        at=record.last_seen(),
                        totals=record.revert_totals(),
                    )
                records.forget(
                    conn, record, observed, self.clock(), **NO_REVERT, undo=None, unlogged=False
                )
            elif had and observed is not State.PENDING:
                records.annotate(conn, name, unlogged=True)
            return had

    def _record(self, conn: sa.Connection, name: str, kind: Kind, outcome: State | None) -> None:
        history.record(
            conn,
            name,
            kind=kind,
            invocation=self.invocation,
            database=self.db.display_url,
            now=self.clock(),
            me=self.me,
            outcome=outcome,
        )

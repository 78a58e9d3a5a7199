"""A dry run: batches decided through the function (never the SQL path), with a run's reads,
locks and writes, in one transaction that is rolled back; no `_migrations` bookkeeping.

It starts where the next real run would (the stored cursor), takes no lease, and keeps nothing,
not even state; it reports how many rows would change and up to ten before/after samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from backfill.decision import Decider, OnError, Sample
from backfill.definition import Migration
from backfill.state import State
from backfill.store import records
from backfill.store.database import Database
from backfill.store.scan import TableScan
from backfill.types import row_id

SAMPLES = 10


@dataclass(frozen=True)
class DryRun:
    name: str
    batches: int
    rows: int
    would_change: int
    would_skip: int
    would_keep: int
    samples: list[Sample]

    def to_json(self) -> dict[str, Any]:
        """The `dry_run` object of `run --dry-run --json`."""
        return {
            "batches": self.batches,
            "rows": self.rows,
            "would_change": self.would_change,
            "would_skip": self.would_skip,
            "would_keep": self.would_keep,
            "samples": [
                {"row_id": row_id(s.key), "before": s.before, "after": s.after}
                for s in self.samples
            ],
        }


def rehearse(
    db: Database,
    migration: Migration,
    size: int,
    batches: int,
    policy: OnError,
    observed: Callable[[records.Record | None], State],
) -> DryRun:
    """Run up to `batches` batches of `size` rows and roll them all back; `observed` tells the
    stored state as the runner sees it (a success starts again from the beginning)."""
    scan = TableScan(db.engine, migration)
    decider = Decider(db, migration, scan)
    with db.engine.connect() as conn:
        # The batch's timeouts too: a dry run locks rows like a run, and must not queue the
        # application behind it either.
        transaction = db.begin_batch(conn)
        try:
            record = (
                records.load(conn, migration.name, with_plan=False)
                if records.tables_exist(conn)
                else None
            )
            cursor = record.cursor if record and observed(record) is not State.SUCCESS else None
            rows_seen = changed = skipped = kept = done_batches = 0
            samples: list[Sample] = []
            for _ in range(batches):
                rows = scan.read(conn, cursor, size)
                if not rows:
                    break
                wanted = SAMPLES - len(samples)
                outcome = decider(conn, rows, policy, samples=wanted, dry_run=True)
                if outcome.writes is not None and outcome.changes:
                    scan.write(conn, outcome.writes)
                samples += outcome.samples
                rows_seen += outcome.processed
                changed += outcome.changed
                skipped += len(outcome.skipped)
                kept += len(outcome.kept)
                done_batches += 1
                cursor = outcome.last_key
                if len(rows) < size:
                    break
        finally:
            transaction.rollback()
    return DryRun(migration.name, done_batches, rows_seen, changed, skipped, kept, samples)

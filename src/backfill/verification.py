"""Verify: a full read-only scan that runs a migration's function over every row of its range,
and reports what is still to change, what raises and what is kept. Nothing the scan does is
kept: each of its transactions is rolled back (a function given the connection may write). What
it found is then recorded for `status` (`record`), where the database lets this user write."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from backfill.decision import Decider, OnError, Outcome
from backfill.definition import Migration
from backfill.errors import BackfillError
from backfill.store import records
from backfill.store.database import Database
from backfill.store.scan import TableScan
from backfill.store.tables import SCHEMA_VERSION, layout
from backfill.types import Key, row_id

SAMPLE_IDS = 20
log = logging.getLogger("backfill")


@dataclass(frozen=True)
class Verification:
    name: str
    remaining: int
    sample_ids: list[Any]
    raising: int
    raising_ids: list[Any]
    kept: int = 0
    kept_ids: list[Any] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.remaining == 0 and self.raising == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "remaining": self.remaining,
            "sample_ids": self.sample_ids,
            "raising": self.raising,
            "raising_ids": self.raising_ids,
            "kept": self.kept,
            "kept_ids": self.kept_ids,
        }


def verify(db: Database, migration: Migration) -> Verification:
    """Rows the migration would still change, rows it raises on and rows it keeps, with up to
    SAMPLE_IDS ids of each."""
    remaining = raising = kept = 0
    sample_ids: list[Any] = []
    raising_ids: list[Any] = []
    kept_ids: list[Any] = []
    for outcome in _scan_all(db, migration):
        remaining += outcome.changed
        raising += len(outcome.skipped)
        kept += len(outcome.kept)
        sample_ids += [row_id(k) for k, _ in outcome.changes][: SAMPLE_IDS - len(sample_ids)]
        raising_ids += [row_id(s.key) for s in outcome.skipped][: SAMPLE_IDS - len(raising_ids)]
        kept_ids += [row_id(k) for k in outcome.kept][: SAMPLE_IDS - len(kept_ids)]
    return Verification(migration.name, remaining, sample_ids, raising, raising_ids, kept, kept_ids)


def record(db: Database, name: str, found: Verification, now: float) -> None:
    """Keep what verify `found` for `status`, in backfill's tables as they are (verify creates
    or upgrades none). Where this user may not write (read-only, a replica) it is only logged:
    verify must work there as everywhere."""
    try:
        with db.unavailable_as_error(), db.read() as conn:
            if layout(conn) != SCHEMA_VERSION:
                return
        with db.unavailable_as_error(), db.write() as conn:
            records.record_verified(conn, name, now, found.remaining, found.raising)
    except BackfillError as error:
        log.warning("verify %s: its result was not recorded (%s)", name, error)


def _scan_all(db: Database, migration: Migration) -> Iterator[Outcome]:
    scan = TableScan(db.engine, migration)
    decider = Decider(db, migration, scan)
    cursor: Key | None = None
    while True:
        # Rolled back: a function given the connection may write, and must leave nothing.
        with db.read(rollback=True) as conn:
            rows = scan.read(conn, cursor, migration.batch_size, lock=False)
            if not rows:
                return
            # Encoded as a run would, so a value that cannot be stored counts as raising.
            outcome = decider(conn, rows, OnError.SKIP, write=False, dry_run=True)
        yield outcome
        cursor = rows.last_key
        if len(rows) < migration.batch_size:
            return

"""One batch: call the migration function on each row read and work out what to write.

The transaction around it (read, write, advance the cursor under the lease, commit) is the
runner's; this module decides per row and knows nothing of connections.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from backfill.definition import DELETE, Keep, Migration
from backfill.errors import BadValue, RowFailed
from backfill.store.records import Key, row_id
from backfill.store.scan import Snapshot
from backfill.store.values import Rows, Writes


class OnError(StrEnum):
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Skipped:
    key: Key
    field: str | None
    error_type: str
    message: str


@dataclass(frozen=True)
class Sample:
    key: Key
    before: dict[str, Any]
    after: dict[str, Any]


@dataclass
class Outcome:
    """What one batch did to its rows, before anything is written."""

    processed: int = 0
    changes: list[tuple[Key, dict[str, Any]]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    kept: list[Key] = field(default_factory=list)
    last_key: Key | None = None
    samples: list[Sample] = field(default_factory=list)
    # The changes encoded for the driver, when decide was given somewhere to encode them.
    writes: Writes | None = None
    # Some change sets a key column: the rows after this batch are not known before it commits.
    moves_keys: bool = False
    # Rows the batch changed in the database itself (a declared SqlChange), not one by one.
    changed_in_database: int = 0

    @property
    def changed(self) -> int:
        return len(self.changes) + self.changed_in_database


def _failure(migration: Migration, key: Key, error: Exception) -> RowFailed:
    field_name = error.field if isinstance(error, BadValue) else None
    message = error.reason if isinstance(error, BadValue) else str(error) or type(error).__name__
    return RowFailed(migration.name, row_id(key), field_name, message, type(error).__name__)


_ABSENT: Any = object()


def decide(
    migration: Migration,
    rows: Rows,
    on_error: OnError,
    samples: int = 0,
    writes: Writes | None = None,
    defer: bool = False,
) -> Outcome:
    """Run the function over `rows`; raise RowFailed on the first bad row under OnError.FAIL.

    With `writes`, each change is also encoded there for the driver, so a value that cannot be
    stored is an error on its own row rather than a failure of the whole write.
    """
    outcome = Outcome(processed=len(rows), last_key=rows.last_key, writes=writes)
    # This loop runs once per row of the table: names are bound to locals once, and a change is
    # told from "no change" by cheap checks first (a type differs) before comparing values.
    function = migration.function
    columns = frozenset(c.name for c in migration.table.columns)
    keys = frozenset(c.name for c in migration.key)
    changes, faults = outcome.changes, rows.faults
    encode = None if writes is None else writes.defer if defer else writes.add
    for position, (key, values) in enumerate(zip(rows.keys, rows.values, strict=True)):
        try:
            if faults and position in faults:
                fault = faults[position]
                raise BadValue(fault.field, fault.reason)
            result = function(values)
            if result is None:
                continue
            if isinstance(result, Keep):
                outcome.kept.append(key)
                continue
            diff: dict[str, Any] = {}
            for name, value in result.items():
                if name not in columns:
                    raise BadValue(name, f"is not a column of table {migration.table.name!r}")
                if name in keys:
                    outcome.moves_keys = True
                new = None if value is DELETE else value
                old = values.get(name, _ABSENT)
                if type(old) is not type(new) or old is _ABSENT or old != new:
                    diff[name] = new
            if diff and encode is not None:
                encode(key, diff)
        except Exception as error:  # noqa: BLE001 - any error in user code is about this row
            failure = _failure(migration, key, error)
            if on_error is OnError.FAIL:
                raise failure from error
            outcome.skipped.append(Skipped(key, failure.field, failure.error_type, failure.message))
            continue
        if diff:
            changes.append((key, diff))
            if len(outcome.samples) < samples:
                before = {name: values.get(name) for name in diff}
                outcome.samples.append(Sample(key, before, diff))
    return outcome


@dataclass(frozen=True)
class Ahead:
    """The next batch, read and decided outside any transaction while the previous one commits.

    It may stand for a read inside the next transaction only when nothing can have changed its
    rows in between: same cursor, and the store's snapshot token unchanged (no other connection
    committed since the previous transaction took the write lock).

    Its changes are encoded later (`encode`), while the previous batch commits, and what is
    left then by the committing thread. A batch that fails on a row, or has a value that cannot
    be stored, is not kept: the transaction reads and decides it again, which reports the
    failure in order, exactly as a plain run does.
    """

    cursor: Key | None
    snapshot: Snapshot
    outcome: Outcome | None = None

    @classmethod
    def decide(
        cls,
        migration: Migration,
        rows: Rows,
        on_error: OnError,
        writes: Writes,
        cursor: Key | None,
        snapshot: Snapshot,
    ) -> Ahead:
        try:
            outcome = decide(migration, rows, on_error, writes=writes, defer=True)
        except RowFailed:
            return cls(cursor, snapshot)
        return cls(cursor, snapshot, outcome)

    def encode(self, enough: Callable[[], bool]) -> Ahead | None:
        """Encode the changes until `enough()`; None when one cannot be stored (do it again)."""
        writes = None if self.outcome is None else self.outcome.writes
        if writes is not None:
            try:
                writes.encode_deferred(enough)
            except BadValue:
                return None
        return self

    def take(self, cursor: Key | None, snapshot: Snapshot | None) -> Outcome | None:
        """The outcome to use in the transaction that sees `snapshot`; None: read again."""
        if snapshot is None or snapshot != self.snapshot or cursor != self.cursor:
            return None
        return self.outcome

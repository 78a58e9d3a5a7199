"""One batch: call the migration function on each row read and work out what to write.

The transaction around it (read, write, advance the cursor under the lease, commit) is the
runner's; this module decides per row and knows nothing of connections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from backfill.definition import DELETE, Keep, Migration
from backfill.errors import BadValue, RowFailed
from backfill.store.records import Key, row_id
from backfill.store.scan import ScannedRow


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

    @property
    def changed(self) -> int:
        return len(self.changes)


def _failure(migration: Migration, row: ScannedRow, error: Exception) -> RowFailed:
    field_name = error.field if isinstance(error, BadValue) else None
    message = error.reason if isinstance(error, BadValue) else str(error) or type(error).__name__
    return RowFailed(migration.name, row_id(row.key), field_name, message, type(error).__name__)


def decide(
    migration: Migration, rows: list[ScannedRow], on_error: OnError, samples: int = 0
) -> Outcome:
    """Run the function over `rows`; raise RowFailed on the first bad row under OnError.FAIL."""
    outcome = Outcome(processed=len(rows), last_key=rows[-1].key if rows else None)
    function = migration.function
    table_columns = migration.table.c
    for row in rows:
        try:
            if row.fault is not None:
                raise BadValue(row.fault.field, row.fault.reason)
            result = function(row.values)
            if result is None:
                continue
            if isinstance(result, Keep):
                outcome.kept.append(row.key)
                continue
            diff: dict[str, Any] = {}
            for name, value in result.items():
                if name not in table_columns:
                    raise BadValue(name, f"is not a column of table {migration.table.name!r}")
                new = None if value is DELETE else value
                if (
                    name not in row.values
                    or row.values[name] != new
                    or (type(row.values[name]) is not type(new))
                ):
                    diff[name] = new
        except Exception as error:  # noqa: BLE001 - any error in user code is about this row
            failure = _failure(migration, row, error)
            if on_error is OnError.FAIL:
                raise failure from error
            outcome.skipped.append(
                Skipped(row.key, failure.field, failure.error_type, failure.message)
            )
            continue
        if diff:
            outcome.changes.append((row.key, diff))
            if len(outcome.samples) < samples:
                before = {name: row.values.get(name) for name in diff}
                outcome.samples.append(Sample(row.key, before, diff))
    return outcome

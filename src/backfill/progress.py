"""The status report of one migration: state, counters, rate, ETA, and its contract JSON shape."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from backfill.state import State
from backfill.store.records import Record
from backfill.types import Identity


def iso(seconds: float | None) -> str | None:
    """UTC ISO-8601 with a trailing Z, or None."""
    if seconds is None:
        return None
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class RowError:
    message: str
    type: str
    row_id: Any
    field: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "type": self.type,
            "row_id": self.row_id,
            "field": self.field,
        }


@dataclass(frozen=True)
class MigrationStatus:
    name: str
    state: State
    processed: int = 0
    total: int | None = None
    changed: int = 0
    skipped_errors: int = 0
    kept: int = 0
    total_is_estimate: bool = False
    batch_size: int | None = None
    started_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None
    # Rate is measured over the current (or last) run only, so a resume does not dilute it.
    run_started_at: float | None = None
    run_processed_start: int = 0
    runner: Identity | None = None
    error: RowError | None = None
    cancel_requested: bool = False
    # Live lease holders: the runner of a run in progress, 0 when none (workers: issue 10).
    workers: int = 0

    @property
    def completed(self) -> bool:
        return self.state.completed

    @property
    def rows_per_second(self) -> float | None:
        if self.run_started_at is None or self.updated_at is None:
            return None
        elapsed = self.updated_at - self.run_started_at
        done = self.processed - self.run_processed_start
        if elapsed <= 0 or done <= 0:
            return None
        return done / elapsed

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rows_per_second
        if self.state is not State.IN_PROGRESS or rate is None or self.total is None:
            return None
        return max(self.total - self.processed, 0) / rate

    def to_json(self) -> dict[str, Any]:
        rate = self.rows_per_second
        eta = self.eta_seconds
        return {
            "state": str(self.state),
            "progress": {
                "processed": self.processed,
                "total": self.total,
                "completed": self.completed,
            },
            "changed": self.changed,
            "skipped_errors": self.skipped_errors,
            "kept": self.kept,
            "total_is_estimate": self.total_is_estimate,
            "batch_size": self.batch_size,
            "rows_per_second": None if rate is None else round(rate, 1),
            "eta_seconds": None if eta is None else round(eta, 1),
            "started_at": iso(self.started_at),
            "updated_at": iso(self.updated_at),
            "finished_at": iso(self.finished_at),
            "runner": None
            if self.runner is None
            else {"host": self.runner.host, "pid": self.runner.pid},
            "error": None if self.error is None else self.error.to_json(),
            "workers": self.workers,
            # A run's shard plan (store.plan): no run makes one before workers exist.
            "shards": [],
        }


def status_of(record: Record, observed: State) -> MigrationStatus:
    """The report of a stored `_migrations` row, in the state as people see it (`observed`:
    `interrupted` for a stored inProgress whose runner is gone)."""
    v = record.values
    live = observed in (State.IN_PROGRESS, State.INTERRUPTED)
    error = None
    if v["error_message"] is not None:
        error = RowError(
            message=v["error_message"],
            type=v["error_type"],
            row_id=None if v["error_row_id"] is None else json.loads(v["error_row_id"]),
            field=v["error_field"],
        )
    holder = Identity(v["runner_host"], v["runner_pid"]) if live and v["runner_host"] else None
    return MigrationStatus(
        name=v["name"],
        state=observed,
        processed=v["processed"],
        total=v["total"],
        changed=v["changed"],
        skipped_errors=v["skipped_errors"],
        kept=v["kept"],
        total_is_estimate=bool(v["total_is_estimate"]),
        batch_size=v["batch_size"],
        started_at=v["started_at"],
        updated_at=v["updated_at"],
        finished_at=v["finished_at"],
        run_started_at=v["run_started_at"],
        run_processed_start=v["run_processed_start"] or 0,
        runner=holder,
        error=error,
        cancel_requested=bool(v["cancel_requested"]),
        workers=1 if observed is State.IN_PROGRESS else 0,
    )

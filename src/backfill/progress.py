"""The status report of one migration: state, counters, rate, ETA, and its contract JSON shape."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from backfill import lease as leases
from backfill.definition import Prerequisite
from backfill.state import ShardState, State
from backfill.store import shards
from backfill.store.records import Record
from backfill.store.shards import COUNTERS
from backfill.types import Identity, Key, Liveness, iso, row_id


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
class ShardStatus:
    """One range shard of a run with workers (the contract's shape; keys as `row_id`)."""

    id: int
    lo: Key | None
    hi: Key | None
    cursor: Key | None
    state: ShardState
    runner: Identity | None
    processed: int
    changed: int
    heartbeat_at: float | None

    def to_json(self) -> dict[str, Any]:
        def shown(key: Key | None) -> Any:
            return None if key is None else row_id(key)

        return {
            "id": self.id,
            "range": [shown(self.lo), shown(self.hi)],
            "cursor": shown(self.cursor),
            "state": str(self.state),
            "runner": None
            if self.runner is None
            else {"host": self.runner.host, "pid": self.runner.pid},
            "processed": self.processed,
            "changed": self.changed,
            "heartbeat_at": iso(self.heartbeat_at),
        }


@dataclass(frozen=True)
class Verified:
    """What the latest `verify` found, and when (recorded where the database is writable)."""

    at: float
    remaining: int
    raising: int

    def to_json(self) -> dict[str, Any]:
        return {"at": iso(self.at), "remaining": self.remaining, "raising": self.raising}


@dataclass(frozen=True)
class RevertStatus:
    """A revert begun and not finished: its own state (inProgress, canceled, failed, or
    interrupted when its runner died), log entries gone through of those it began with, entries
    restored, and entries kept because the app changed the row since."""

    state: State
    processed: int
    total: int
    reverted: int
    kept: int

    def to_json(self) -> dict[str, Any]:
        return {
            "state": str(self.state),
            "progress": {"processed": self.processed, "total": self.total, "completed": False},
            "reverted": self.reverted,
            "kept_changed_by_app": self.kept,
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
    # Live lease holders: the runner of a run in progress, or the workers holding its shards.
    workers: int = 0
    # The shards of its run's plan (a run with workers); empty without one.
    shards: tuple[ShardStatus, ...] = ()
    verified: Verified | None = None
    # Whether its run (in progress, or the last) logs its changes to undo them; entries of the
    # log not reverted yet; a revert begun and not finished.
    undo: bool | None = None
    undo_rows: int = 0
    revert: RevertStatus | None = None
    # The latest backup of the tables it touches: (path, when).
    backup: tuple[str, float] | None = None
    # When the gate of a migration that requires another opens (None: not known yet, or no gate).
    allowed_at: float | None = None

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
            "shards": [shard.to_json() for shard in self.shards],
            "verified": None if self.verified is None else self.verified.to_json(),
            "undo": self.undo,
            "undo_rows": self.undo_rows,
            "revert": None if self.revert is None else self.revert.to_json(),
            "backup": None
            if self.backup is None
            else {"path": self.backup[0], "at": iso(self.backup[1])},
            "allowed_at": iso(self.allowed_at),
        }


def status_of(
    record: Record, observed: State, seen: Liveness | None = None, undo_rows: int = 0
) -> MigrationStatus:
    """The report of a stored `_migrations` row, in the state as people see it (`observed`:
    `interrupted` for a stored inProgress whose runner is gone). A run with a plan adds its
    shards' counters (summed on read) and its shards, as `seen` from here now: their states,
    and its workers (the live ones holding shards)."""
    holders: list[Identity] | None = None
    shard_states = [s.state for s in record.plan]
    if record.plan and seen is not None:
        shard_states = [shards.observed(s, seen) for s in record.plan]
        alive = leases.live_holders(record, seen) if observed is State.IN_PROGRESS else []
        working = [
            s.holder
            for s, state in zip(record.plan, shard_states, strict=True)
            if state is ShardState.IN_PROGRESS
        ]
        # The workers holding shards; the runner that claimed the run while none does yet.
        holders = [h for h in alive if h in working] or alive[:1]
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
    runner = Identity(v["runner_host"], v["runner_pid"]) if live and v["runner_host"] else None
    if holders is None:
        holders = [runner] if runner is not None and observed is State.IN_PROGRESS else []
    counters = {c: int(v[c]) for c in COUNTERS}
    updated = [v["updated_at"]]
    for shard in record.plan:
        for c in COUNTERS:
            counters[c] += int(shard[c])
        updated += [shard["heartbeat_at"], shard["released_at"]]
    plan = tuple(
        ShardStatus(
            s.id,
            s.bounds.lo,
            s.bounds.hi,
            s.cursor,
            state,
            s.holder if state in (ShardState.IN_PROGRESS, ShardState.INTERRUPTED) else None,
            int(s["processed"]),
            int(s["changed"]),
            s["heartbeat_at"],
        )
        for s, state in zip(record.plan, shard_states, strict=True)
    )
    verified = None
    if v.get("verified_at") is not None:  # layouts before 4 have no such column
        verified = Verified(
            v["verified_at"], int(v["verified_remaining"]), int(v["verified_raising"])
        )
    revert = None
    if observed is State.REVERTING and v["revert_state"] is not None:
        revert_state = State(v["revert_state"])
        if (
            revert_state is State.IN_PROGRESS
            and seen is not None
            and not leases.reverting_live(record, seen)
        ):
            revert_state = State.INTERRUPTED
        revert = RevertStatus(
            revert_state,
            int(v["revert_processed"] or 0),
            int(v["revert_total"] or 0),
            int(v["revert_reverted"] or 0),
            int(v["revert_kept"] or 0),
        )
        if revert_state is State.IN_PROGRESS:
            runner = Identity(v["runner_host"], v["runner_pid"])
            holders = [runner]
    return MigrationStatus(
        name=v["name"],
        state=observed,
        processed=counters["processed"],
        total=v["total"],
        changed=counters["changed"],
        skipped_errors=counters["skipped_errors"],
        kept=counters["kept"],
        total_is_estimate=bool(v["total_is_estimate"]),
        batch_size=v["batch_size"],
        started_at=v["started_at"],
        updated_at=max((t for t in updated if t is not None), default=None),
        finished_at=v["finished_at"],
        run_started_at=v["run_started_at"],
        run_processed_start=v["run_processed_start"] or 0,
        runner=holders[0] if holders else (runner if observed is State.INTERRUPTED else None),
        error=error,
        cancel_requested=bool(v["cancel_requested"]),
        workers=len(holders),
        shards=plan,
        verified=verified,
        undo=None if v.get("undo") is None else bool(v["undo"]),
        undo_rows=undo_rows,
        revert=revert,
        backup=None if v.get("backup_at") is None else (v["backup_path"], v["backup_at"]),
    )


def report(
    wanted: list[str],
    stored: Mapping[str, Record],
    requires: Callable[[str], Prerequisite | None],
    observed: Callable[[Record], State],
    seen: Liveness,
    logged: Mapping[str, int],
) -> dict[str, MigrationStatus]:
    """The status of each `wanted` migration from its `stored` row (pending without one), with
    its undo log's size (`logged`) and, for one that `requires` another, when its gate opens."""

    def of(name: str) -> MigrationStatus | None:
        record = stored.get(name)
        if record is None:
            return None
        return status_of(record, observed(record), seen, logged.get(name, 0))

    found = {}
    for name in wanted:
        status = of(name) or MigrationStatus(name=name, state=State.PENDING)
        prerequisite = requires(name)
        if prerequisite is not None:
            opens = gate_opens_at(prerequisite, of(prerequisite.migration))
            status = replace(status, allowed_at=opens)
        found[name] = status
    return found


def gate_opens_at(prerequisite: Prerequisite, before: MigrationStatus | None) -> float | None:
    """When a prerequisite's gate opens by time: the moment the migration it requires succeeded
    plus its wait; None while it has not succeeded. (A gate that also asks for a clean verify
    checks it then.)"""
    if before is None or before.state is not State.SUCCESS or before.finished_at is None:
        return None
    return before.finished_at + prerequisite.min_age.total_seconds()

"""The history of what was done to each migration: every run (its `id` is the run's `run_id`; the
workers and steps of one run share it), revert and restore, and each reset, cancel, tune, hold
and release by hand; who asked, from where, with which arguments, and how it ended. Stored in
`_migration_runs` (backfill.store.history); a run whose runner died is `interrupted` on read.
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from backfill.state import State
from backfill.types import iso

# The counters a history row reports, as a run's own (not the migration's totals).
COUNTERS = ("processed", "changed", "skipped_errors")


class Kind(StrEnum):
    RUN = "run"
    REVERT = "revert"
    RESTORE = "restore"
    TUNE = "tune"
    RESET = "reset"
    CANCEL = "cancel"
    HOLD = "hold"
    RELEASE = "release"


# Kinds that hold the migration while they go on, and end with a state.
RUNNING_KINDS = frozenset({Kind.RUN, Kind.REVERT})


class Origin(StrEnum):
    CLI = "cli"
    DASHBOARD = "dashboard"
    API = "api"  # the HTTP API, or Python code calling the Runner
    WORKER = "worker"
    STEP = "step"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid without a name (containers)
        return str(os.getuid())


@dataclass(frozen=True)
class Invocation:
    """Who asked, and how: what the history records of the command that starts something.
    `arguments` are stored as given: the CLI redacts them (backfill.redaction) first."""

    origin: Origin = Origin.API
    arguments: tuple[str, ...] = ()
    environment: str | None = None
    user: str = field(default_factory=_user)

    def by(self, origin: Origin) -> Invocation:
        return replace(self, origin=origin)


def exit_code(outcome: State, row_at_fault: bool) -> int | None:
    """The contract's exit code of a run that ended in `outcome` (None: it has not ended)."""
    if outcome is State.SUCCESS or outcome is State.PENDING:
        return 0
    if outcome is State.CANCELED:
        return 3
    if outcome is State.FAILED:
        return 1 if row_at_fault else 4
    return None


@dataclass(frozen=True)
class HistoryEntry:
    id: int
    migration: str
    kind: Kind
    origin: Origin | None
    user: str | None
    host: str | None
    pid: int | None
    arguments: list[str] | None
    environment: str | None
    database: str | None
    started_at: float
    finished_at: float | None
    outcome: State | None
    exit_code: int | None
    processed: int | None = None
    changed: int | None = None
    skipped_errors: int | None = None
    holds: int = 0
    backup: str | None = None

    @property
    def ended(self) -> bool:
        return self.outcome is not None and self.outcome is not State.IN_PROGRESS

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "migration": self.migration,
            "kind": str(self.kind),
            "origin": None if self.origin is None else str(self.origin),
            "user": self.user,
            "host": self.host,
            "pid": self.pid,
            "arguments": self.arguments,
            "environment": self.environment,
            "database": self.database,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            # A run going on has no outcome yet.
            "outcome": None if not self.ended else str(self.outcome),
            "exit_code": self.exit_code,
            "processed": self.processed,
            "changed": self.changed,
            "skipped_errors": self.skipped_errors,
            "holds": self.holds,
            "backup": self.backup,
        }


def entry(
    row: Mapping[str, Any],
    *,
    current_run: int | None,
    held: bool,
    totals: Mapping[str, int],
) -> HistoryEntry:
    """One stored history row as people see it. A run that has not ended is `inProgress` while
    it is its migration's current run (`current_run`) and a live run or revert `held` it, with
    its counters so far (the migration's `totals` now, less those when it began); otherwise its
    runner died: `interrupted`. Rows written before the history existed say only what they
    stored then."""
    kind = Kind(row["kind"] or Kind.RUN)
    outcome = None if row["outcome"] is None else State(row["outcome"])
    counters: dict[str, int | None] = {c: row[c] for c in COUNTERS}
    recorded = row["origin"] is not None
    if recorded and outcome is None and kind in RUNNING_KINDS:
        live = current_run == row["id"] and held
        if current_run == row["id"]:
            before = [row["processed_before"], row["changed_before"], row["skipped_before"]]
            counters = {
                c: totals.get(c, 0) - (b or 0) for c, b in zip(COUNTERS, before, strict=True)
            }
        outcome = State.IN_PROGRESS if live else State.INTERRUPTED
    arguments = None if row["arguments"] is None else list(json.loads(row["arguments"]))
    return HistoryEntry(
        id=int(row["id"]),
        migration=row["migration"],
        kind=kind,
        origin=None if row["origin"] is None else Origin(row["origin"]),
        user=row["user_name"],
        host=row["runner_host"],
        pid=row["runner_pid"],
        arguments=arguments,
        environment=row["environment"],
        database=row["database_url"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        outcome=outcome,
        exit_code=row["exit_code"],
        processed=counters["processed"],
        changed=counters["changed"],
        skipped_errors=counters["skipped_errors"],
        holds=int(row["holds"] or 0),
        backup=row["backup"],
    )

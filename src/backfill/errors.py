"""The errors backfill raises, each carrying the exit code the CLI maps it to.

    BackfillError                  exit 2 unless stated
     ├── Refused                   exit 2: the request cannot be carried out as asked
     │    ├── UnknownMigration     no migration of that name
     │    ├── SchemaMismatch       table or column missing, scan changed under a half-done run
     │    ├── GateClosed           a prerequisite does not hold (cleanup too early)
     │    ├── LeaseHeld            a live runner holds the migration
     │    └── ConfigError          app, environment or URL cannot be resolved
     ├── LeaseLost                 exit 2: this runner was taken over; nothing more was committed
     ├── RowFailed                 exit 1: the migration raised on a row (batch rolled back)
     └── DatabaseUnavailable       exit 4: unreachable, or an error that is not about a row
          └── RetriesExhausted     a batch kept failing transiently (backfill.retry)

`BadValue` is not a BackfillError: migration functions raise it to name the field at fault.
Nor are the internal `store.expression.Rejected` (a batch the SQL path hands to the function),
`store.locks.Unneeded` and `state.TransitionRefused` (a bug if it ever reaches a user).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class BackfillError(Exception):
    """Base of every error backfill raises to its user; the CLI exits with its `exit_code`."""

    exit_code = 2


class Refused(BackfillError):
    """Raised by a command that will not do what was asked as asked: a CLI confirmation declined,
    a reset or table upgrade refused while a run holds a lease, a state changed meanwhile."""

    exit_code = 2


class UnknownMigration(Refused):
    """Raised by `Migrations[name]` (so by every command naming one) for a name not defined."""


class SchemaMismatch(Refused):
    """Raised by `Runner.run` (and the commands that read the table) when a table or column is
    missing, a half-done migration's scan changed, or backfill's own tables are too new."""


class GateClosed(Refused):
    """Raised by `Runner.run` when the migration's prerequisite does not hold: the one required
    has not succeeded, succeeded too recently, or `verify` still finds rows (unless `--force`)."""


class ConfigError(Refused):
    """Raised by `config` and the CLI's options, `Database()` and the `from_env` knobs when the
    app, an environment variable, the URL or its driver cannot be resolved."""


class LeaseHeld(Refused):
    """Raised by `Runner.run` and `Runner.reset` (lease.enter, records.transition) when a live
    runner holds the migration."""

    def __init__(
        self,
        migration: str,
        host: str | None,
        pid: int | None,
        others: Sequence[tuple[str, int]] = (),
        *,
        workers: bool = False,
    ) -> None:
        """`host` and `pid` name the holder (the first of the `workers` of a run with a plan;
        `others` are the rest)."""
        holders = [(host, pid), *others]
        named = "; ".join(f"host {h}, pid {p}" for h, p in holders)
        kind = "worker" if workers else "runner"
        who = f"a live {kind} ({named})" if len(holders) == 1 else f"live {kind}s ({named})"
        super().__init__(
            f"migration {migration!r} is being run by {who}; "
            "wait for it, or stop it with `backfill cancel`"
        )
        self.host = host
        self.pid = pid


class BeingReverted(Refused):
    """Raised by `run`, `reset` and the workers while a revert of the migration is unfinished."""

    def __init__(self, migration: str) -> None:
        super().__init__(
            f"migration {migration!r} is being reverted: finish it with `backfill revert "
            f"{migration}`, or drop the log with `backfill forget-undo {migration}`"
        )
        self.migration = migration


class LeaseLost(BackfillError):
    """Raised by a runner's batch, heartbeat or end when another runner took the migration over
    (a newer generation): this runner commits nothing more."""

    exit_code = 2

    def __init__(self, migration: str) -> None:
        super().__init__(
            f"migration {migration!r}: this runner lost its lease to another runner; "
            "it committed nothing more"
        )
        self.migration = migration


class DatabaseUnavailable(BackfillError):
    """Raised by every `Runner` command (`Database.unavailable_as_error`) when the database is
    unreachable or fails for a reason that is not about a row, and when backfill's tables stay
    locked by another process."""

    exit_code = 4


class RowFailed(BackfillError):
    """The migration function raised on one row; carries what the status shows."""

    exit_code = 1

    def __init__(
        self, migration: str, row_id: Any, field: str | None, message: str, error_type: str
    ) -> None:
        where = f"row {row_id!r}" + (f", field {field!r}" if field else "")
        super().__init__(f"migration {migration!r} failed on {where}: {message}")
        self.migration = migration
        self.row_id = row_id
        self.field = field
        self.message = message
        self.error_type = error_type


class BadValue(ValueError):
    """Raised by a migration function when a field holds a value it cannot accept."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field} {reason}")
        self.field = field
        self.reason = reason

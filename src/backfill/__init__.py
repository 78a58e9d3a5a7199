"""backfill: online, batched, resumable data migrations over a live database."""

from backfill.batch import OnError
from backfill.definition import (
    DELETE,
    Context,
    Existing,
    Keep,
    Migration,
    Prerequisite,
    Row,
    SqlChange,
)
from backfill.errors import (
    BackfillError,
    BadValue,
    ConfigError,
    DatabaseUnavailable,
    GateClosed,
    LeaseHeld,
    LeaseLost,
    Refused,
    RowFailed,
    SchemaMismatch,
    UnknownMigration,
)
from backfill.progress import MigrationStatus
from backfill.registry import Migrations
from backfill.retry import RetryPolicy
from backfill.runner import DryRun, Runner, RunResult, Verification
from backfill.state import State
from backfill.store.database import Limits
from backfill.store.values import MalformedJSON

__all__ = [
    "DELETE",
    "BackfillError",
    "BadValue",
    "ConfigError",
    "Context",
    "DatabaseUnavailable",
    "DryRun",
    "Existing",
    "GateClosed",
    "Keep",
    "LeaseHeld",
    "LeaseLost",
    "Limits",
    "MalformedJSON",
    "Migration",
    "MigrationStatus",
    "Migrations",
    "OnError",
    "Prerequisite",
    "Refused",
    "RetryPolicy",
    "Row",
    "RowFailed",
    "RunResult",
    "Runner",
    "SchemaMismatch",
    "SqlChange",
    "State",
    "UnknownMigration",
    "Verification",
]

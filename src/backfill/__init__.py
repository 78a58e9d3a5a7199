"""backfill: online, batched, resumable data migrations over a live database."""

import logging

from backfill.backups import RestoreResult
from backfill.decision import OnError, Sample
from backfill.definition import (
    DELETE,
    Context,
    Existing,
    Form,
    Keep,
    Migration,
    Prerequisite,
    Row,
    SqlChange,
)
from backfill.dry_run import DryRun
from backfill.errors import (
    BackfillError,
    BadValue,
    BeingReverted,
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
from backfill.history import HistoryEntry, Invocation, Kind, Origin
from backfill.progress import MigrationStatus, RevertStatus, RowError, ShardStatus, Verified
from backfill.registry import Migrations
from backfill.retry import RetriesExhausted, RetryPolicy, Transient
from backfill.revert import RevertResult
from backfill.run import RunResult
from backfill.runner import Runner
from backfill.state import ShardState, State
from backfill.store.backup import BackupInfo
from backfill.store.database import Limits
from backfill.store.values import MalformedJSON
from backfill.types import Identity
from backfill.verification import Verification
from backfill.views import BadRequest, NotFound, Page, View, ViewRequest
from backfill.worker import StepResult, WorkResult

# A library's records go where the application sends them: nowhere of ours by default.
logging.getLogger("backfill").addHandler(logging.NullHandler())

__all__ = [
    "BackfillError",
    "BackupInfo",
    "BadRequest",
    "BadValue",
    "BeingReverted",
    "ConfigError",
    "Context",
    "DELETE",
    "DatabaseUnavailable",
    "DryRun",
    "Existing",
    "Form",
    "GateClosed",
    "HistoryEntry",
    "Identity",
    "Invocation",
    "Keep",
    "Kind",
    "LeaseHeld",
    "LeaseLost",
    "Limits",
    "MalformedJSON",
    "Migration",
    "MigrationStatus",
    "Migrations",
    "NotFound",
    "OnError",
    "Origin",
    "Page",
    "Prerequisite",
    "Refused",
    "RestoreResult",
    "RetriesExhausted",
    "RetryPolicy",
    "RevertResult",
    "RevertStatus",
    "Row",
    "RowError",
    "RowFailed",
    "RunResult",
    "Runner",
    "Sample",
    "SchemaMismatch",
    "ShardState",
    "ShardStatus",
    "SqlChange",
    "State",
    "StepResult",
    "Transient",
    "UnknownMigration",
    "Verification",
    "Verified",
    "View",
    "ViewRequest",
    "WorkResult",
]

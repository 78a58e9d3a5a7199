"""The engine's one event stream: what a run did, as it happens, for whoever listens.

The Runner emits these to its listeners (`Runner(..., listeners=[...])`, each called with one
event object); the CLI's progress subscribes, `--events FILE` writes them as JSON lines
(`JsonLines`), and metrics, logs, history and the dashboard build on the same stream. Shapes
are the contract's ("Events"): every event has `event`, `time` and `migration`. A listener that
raises is logged and the run goes on: a full disk under `--events` must not stop a migration.
A run that fails or ends short is also logged, as a record of the `backfill.run` logger, whoever
listens. This module knows no database.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, ClassVar

from backfill.types import Key, row_id

log = logging.getLogger("backfill")
# Where a run's failure is logged as a record: under `backfill`, apart so that Sentry's logging
# integration can leave it out (the Sentry listener reports it, with its tags).
RUN_LOGGER = "backfill.run"
# Exit codes of a run that ended without failing (canceled; refused, e.g. its lease taken over).
_NOT_FAILED = (2, 3)


def iso_precise(seconds: float) -> str:
    """UTC ISO-8601 with milliseconds and a trailing Z."""
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def shown_key(key: Key | None) -> Any:
    """A key as the contract shows it (`row_id`: a list for composite keys), or None."""
    return None if key is None else row_id(key)


@dataclass(frozen=True)
class Event:
    """What every event has; `event` names its kind."""

    event: ClassVar[str]
    migration: str
    time: float

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "event": self.event,
            "time": iso_precise(self.time),
            "migration": self.migration,
        }
        for f in fields(self):
            if f.name not in ("migration", "time"):
                document[f.name.rstrip("_")] = _plain(getattr(self, f.name))
        return document


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class RunStarted(Event):
    """A claim started or resumed a run. `total` (rows in range) and `processed` (before this
    run: a resume carries them over) let a listener show progress without asking."""

    event: ClassVar[str] = "run_started"
    run_id: int
    workers: int = 1
    total: int | None = None
    processed: int = 0


@dataclass(frozen=True)
class BatchCommitted(Event):
    """A batch committed. `seconds` is from its BEGIN to its COMMIT; `processed` is the
    migration's count after it (so a listener need not add up)."""

    event: ClassVar[str] = "batch"
    shard: int | None
    first_key: Any
    last_key: Any
    rows_read: int
    rows_changed: int
    seconds: float
    batch_size: int
    processed: int = 0
    total: int | None = None


@dataclass(frozen=True)
class StateChanged(Event):
    event: ClassVar[str] = "state"
    from_: str
    to: str


@dataclass(frozen=True)
class RunError(Event):
    """Why a run failed: a row (its id and field) or the database (no row)."""

    event: ClassVar[str] = "error"
    message: str
    type: str
    row_id: Any = None
    field: str | None = None


@dataclass(frozen=True)
class RunFinished(Event):
    """The run ended in `state` and its command exits with `exit_code`."""

    event: ClassVar[str] = "run_finished"
    state: str | None  # None when the database could not say (it is what failed)
    exit_code: int
    run_id: int | None = None


Listener = Callable[[Event], None]


class Emitter:
    """Calls each listener with each event, in order."""

    def __init__(self, listeners: Iterable[Listener] = ()) -> None:
        self.listeners = list(listeners)

    def __call__(self, event: Event) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a listener's failure is not the run's
                log.exception("backfill: an event listener failed on a %s event", event.event)
        # After the listeners: a JSON log shows the event's line, then the record.
        log_outcome(event)

    def __bool__(self) -> bool:
        return bool(self.listeners)


def log_outcome(event: Event) -> None:
    """A run's failure (its `error` event) as an ERROR record, and a run that ended short of
    success (`run_finished` with a non-zero code) as an ERROR, or a WARNING when it did not
    fail (canceled, refused), on the `backfill.run` logger."""
    run_log = logging.getLogger(RUN_LOGGER)
    if isinstance(event, RunError):
        at = "" if event.row_id is None else f" at row {json.dumps(event.row_id, default=str)}"
        on = "" if event.field is None else f" ({event.field})"
        extra = {"migration": event.migration, "row_id": event.row_id, "field": event.field}
        run_log.error(
            "migration %r failed%s%s: %s: %s",
            event.migration, at, on, event.type, event.message,
            extra={**extra, "error_type": event.type},
        )  # fmt: skip
    elif isinstance(event, RunFinished) and event.exit_code != 0:
        run_log.log(
            logging.WARNING if event.exit_code in _NOT_FAILED else logging.ERROR,
            "migration %r ended %s (exit code %d)",
            event.migration, event.state or "in an unknown state", event.exit_code,
            extra={"migration": event.migration},
        )  # fmt: skip


class JsonLines:
    """A listener that appends each event to a file as one JSON object per line (`--events`),
    flushed at once so another process can follow it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] = self.path.open("a", encoding="utf-8")

    def __call__(self, event: Event) -> None:
        self._file.write(json.dumps(event.to_json(), default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

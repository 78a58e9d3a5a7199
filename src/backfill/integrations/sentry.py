"""Failed runs reported to Sentry: one event per failure, tagged with the migration, the row's id,
its field and the error's type, so an alert can say which row of which migration to look at.

Configured as the SDK always is: `SENTRY_DSN` (and `SENTRY_ENVIRONMENT`, `SENTRY_RELEASE`); without
it nothing is reported. A canceled run, or one that lost its lease to another runner, is not a
failure and is not reported. Only this module imports the SDK (`pip install 'backfill[sentry]'`),
and only when called: importing backfill never imports it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from backfill.events import Event, RunError, RunFinished, RunStarted
from backfill.logs import RUN_LOGGER

log = logging.getLogger("backfill")


def _failed(exit_code: int) -> bool:
    """A run that ended so failed: on a row (1), or the database (4). Canceled (3) and lease
    lost (2) are not failures."""
    return exit_code == 1 or exit_code >= 4


class RunFailures:
    """An events listener sending each failed run to Sentry once: its `error` event, or, when
    a run ends failed without one, its `run_finished`."""

    def __init__(self) -> None:
        self._reported: set[str] = set()  # migrations whose current run's failure was sent

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self._reported.discard(event.migration)
        elif isinstance(event, RunError):
            self._reported.add(event.migration)
            _send(event, _failure_message(event), _failure_tags(event), event.type, event.field)
        elif isinstance(event, RunFinished):
            if _failed(event.exit_code) and event.migration not in self._reported:
                tags = {"migration": event.migration, "exit_code": str(event.exit_code)}
                message = f"backfill: {event.migration} ended {event.state or 'failed'}"
                _send(event, message, tags, "RunFinished", None)
            self._reported.discard(event.migration)

    def flush(self, timeout: float = 2.0) -> None:
        """Send what is queued (a command ends soon after its run does)."""
        import sentry_sdk

        sentry_sdk.flush(timeout=timeout)


def _failure_message(error: RunError) -> str:
    on = "" if error.field is None else f" on {error.field}"
    return f"backfill: {error.migration} failed: {error.type}{on}: {error.message}"


def _failure_tags(error: RunError) -> dict[str, str]:
    tags = {"migration": error.migration, "error_type": error.type}
    if error.row_id is not None:
        tags["row_id"] = _tag(error.row_id)
    if error.field is not None:
        tags["field"] = error.field
    return tags


def _tag(value: Any) -> str:
    """A row id as a tag: the value itself, or JSON for a composite key's list."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _send(event: Event, message: str, tags: dict[str, str], kind: str, field: str | None) -> None:
    import sentry_sdk

    sentry_sdk.capture_event(
        {
            "message": message,
            "level": "error",
            "logger": "backfill",
            "timestamp": datetime.fromtimestamp(event.time, tz=UTC),
            "tags": tags,
            # One issue per migration, error type and field, however many rows fail alike.
            "fingerprint": ["backfill", event.migration, kind, field or ""],
            "contexts": {"backfill": event.to_json()},
        }
    )


def sentry_listener() -> RunFailures:
    """The listener reporting failed runs through the SDK as it is configured (call
    `sentry_sdk.init` first, or use `enable_from_environment`)."""
    return RunFailures()


def enable_from_environment(environ: Mapping[str, str] = os.environ) -> RunFailures | None:
    """With `SENTRY_DSN` set and the extra installed: the SDK initialised from the environment
    (unless the app already did) and the listener; otherwise None."""
    if not environ.get("SENTRY_DSN"):
        return None
    try:
        import sentry_sdk
        from sentry_sdk.integrations.logging import ignore_logger
    except ImportError:
        log.warning(
            "SENTRY_DSN is set but sentry-sdk is not installed "
            "(pip install 'backfill[sentry]'): failures are not reported"
        )
        return None
    if not sentry_sdk.is_initialized():
        sentry_sdk.init()  # reads SENTRY_DSN, SENTRY_ENVIRONMENT, SENTRY_RELEASE
    # The listener reports a run's failure with its tags; its log record would report it twice.
    ignore_logger(RUN_LOGGER)
    return sentry_listener()


__all__ = ["RunFailures", "enable_from_environment", "sentry_listener"]

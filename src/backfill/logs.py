"""`--log-format json`: the run's events and the `backfill` logger's records as one stream of
JSON lines, on stderr or appended to `--log-file`.

Each line is one JSON object: an event exactly as `--events` writes it, or a log record
(`"event": "log"`, with `level`, `logger`, `message`, and `migration`, `row_id`, `field` when the
record carries them). A run's failure is both: its `error` (and `run_finished`) event line, then
an ERROR record on `backfill.run`, so whatever reads the `backfill` logger hears of it.
This module knows neither the CLI nor any database.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

from backfill.events import Event, RunError, RunFinished, iso_precise

LOGGER = "backfill"
# Where a run's (or its command's) failure is logged as a record: under `backfill`, apart so that
# Sentry's logging integration can leave it out (the Sentry listener reports it, with its tags).
RUN_LOGGER = "backfill.run"

# Attributes a record may carry (`extra={...}`) that its line shows.
_EXTRAS = ("migration", "row_id", "field", "error_type")
# Exit codes of a run that ended without failing (canceled; refused, e.g. its lease taken over).
_NOT_FAILED = (2, 3)


class JsonFormatter(logging.Formatter):
    """One log record as one line of JSON, with the time as events show it."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "event": "log",
            "time": iso_precise(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _EXTRAS:
            value = record.__dict__.get(name)
            if value is not None:
                document[name] = list(value) if isinstance(value, tuple) else value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, default=str)


class JsonLog:
    """An events listener writing each event as a JSON line to the stream its `handler` (for
    the `backfill` logger) writes records to, one whole line at a time, flushed."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.handler = logging.StreamHandler(stream)
        self.handler.setFormatter(JsonFormatter())
        self.handler.setLevel(logging.INFO)

    def __call__(self, event: Event) -> None:
        self.write(json.dumps(event.to_json(), default=str))
        if isinstance(event, RunError):
            _log_failure(event)
        elif isinstance(event, RunFinished) and event.exit_code != 0:
            level = logging.WARNING if event.exit_code in _NOT_FAILED else logging.ERROR
            logging.getLogger(RUN_LOGGER).log(
                level,
                "migration %r ended %s (exit code %d)",
                event.migration,
                event.state or "in an unknown state",
                event.exit_code,
                extra={"migration": event.migration},
            )

    def write(self, line: str) -> None:
        """One line, under the handler's lock so that it never splits a record (or is split)."""
        self.handler.acquire()
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        finally:
            self.handler.release()


def _log_failure(error: RunError) -> None:
    at = "" if error.row_id is None else f" at row {json.dumps(error.row_id, default=str)}"
    on = "" if error.field is None else f" ({error.field})"
    logging.getLogger(RUN_LOGGER).error(
        "migration %r failed%s%s: %s: %s",
        error.migration,
        at,
        on,
        error.type,
        error.message,
        extra={
            "migration": error.migration,
            "row_id": error.row_id,
            "field": error.field,
            "error_type": error.type,
        },
    )


@contextmanager
def json_logs(path: str | Path | None = None) -> Iterator[JsonLog]:
    """While inside: the `backfill` logger's records (INFO and up) as JSON lines on stderr, or
    appended to `path`; yields the listener that writes the run's events between them."""
    with ExitStack() as stack:
        stream: IO[str] = (
            sys.stderr
            if path is None
            else stack.enter_context(Path(path).open("a", encoding="utf-8"))
        )
        writer = JsonLog(stream)
        stack.callback(writer.handler.close)
        logger = logging.getLogger(LOGGER)
        stack.callback(logger.setLevel, logger.level)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(writer.handler)
        stack.callback(logger.removeHandler, writer.handler)
        yield writer


__all__ = ["LOGGER", "RUN_LOGGER", "JsonFormatter", "JsonLog", "json_logs"]

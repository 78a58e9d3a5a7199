"""`--log-format json`: the run's events and the `backfill` logger's records as one stream of
JSON lines, on stderr or appended to `--log-file`.

Each line is one JSON object: an event exactly as `--events` writes it, or a log record
(`"event": "log"`, with `level`, `logger`, `message`, and `migration`, `row_id`, `field` when the
record carries them). A run's failure is both: its `error` (and `run_finished`) event line, then
the ERROR record the engine logs on `backfill.run` (backfill.events.log_outcome).
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

from backfill.events import RUN_LOGGER, Event, iso_precise

LOGGER = "backfill"

# Attributes a record may carry (`extra={...}`) that its line shows.
_EXTRAS = ("migration", "row_id", "field", "error_type")


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

    def write(self, line: str) -> None:
        """One line, under the handler's lock so that it never splits a record (or is split)."""
        self.handler.acquire()
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        finally:
            self.handler.release()


class _NotRunOutcomes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != RUN_LOGGER


# The handlers plain_warnings installed: silent while json_logs writes to stderr.
_plain: list[logging.Handler] = []


@contextmanager
def plain_warnings() -> Iterator[None]:
    """While inside (a command of the CLI): the `backfill` logger's warnings and errors as bare
    lines on stderr, as Python's last resort prints them, but for `backfill.run`'s (the command
    says itself how its runs ended); silent while `json_logs` writes."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.addFilter(_NotRunOutcomes())
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    _plain.append(handler)
    try:
        yield
    finally:
        _plain.remove(handler)
        logger.removeHandler(handler)


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
        for plain in _plain:  # one format on stderr at a time
            stack.callback(plain.setLevel, plain.level)
            plain.setLevel(logging.CRITICAL + 1)
        yield writer


__all__ = ["LOGGER", "RUN_LOGGER", "JsonFormatter", "JsonLog", "json_logs", "plain_warnings"]

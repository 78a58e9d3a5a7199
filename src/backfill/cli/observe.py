"""What a command that runs batches lets others see: `--log-format json` / `--log-file PATH` (its
events and the `backfill` logger's records as JSON lines), and the Sentry and OpenTelemetry
listeners when their environment asks for them."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar

import click
from rich.console import Console

from backfill import logs
from backfill.cli import render
from backfill.cli.options import current
from backfill.errors import BackfillError
from backfill.events import Listener
from backfill.integrations import otel, sentry
from backfill.redaction import scrub

F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS = [
    click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        help="text (the default), or json: every event and log record as one JSON object "
        "per line (implied by --log-file).",
    ),
    click.option(
        "--log-file",
        type=click.Path(dir_okay=False),
        help="Append the JSON lines to FILE rather than stderr.",
    ),
]


def observe_options(function: F) -> F:
    """`--log-format` and `--log-file`, passed as `log_format` and `log_file`."""
    for option in reversed(_OPTIONS):
        function = option(function)
    return function


def log_format_of(log_format: str | None, log_file: str | None) -> str:
    """The format asked for: json when only `--log-file` is given."""
    if log_format == "text" and log_file is not None:
        raise click.UsageError("--log-file writes JSON lines: use it with --log-format json")
    return log_format or ("json" if log_file is not None else "text")


def passed_on(log_format: str | None, log_file: str | None) -> list[str]:
    """The same options for a child `backfill` process (workers, a detached run)."""
    if log_format_of(log_format, log_file) == "text":
        return []
    return ["--log-format", "json"] + (
        [] if log_file is None else ["--log-file", os.path.abspath(log_file)]
    )


@contextmanager
def observed(log_format: str | None, log_file: str | None) -> Iterator[list[Listener]]:
    """The listeners to add to the command's runs. With JSON on stderr, Rich's messages and
    progress keep off it (the same news is in the events and records); an error leaving the
    block is logged as a record too."""
    with ExitStack() as stack:
        listeners: list[Listener] = []
        as_json = log_format_of(log_format, log_file) == "json"
        if as_json:
            try:
                listeners.append(stack.enter_context(logs.json_logs(log_file)))
            except OSError as error:
                raise click.FileError(str(log_file), error.strerror) from error
            if log_file is None:
                stack.enter_context(_quiet(render.err))
        for listener in (sentry.enable_from_environment(), otel.enable_from_environment()):
            if listener is not None:
                listeners.append(listener)
                stack.callback(listener.flush)
        try:
            yield listeners
        except Exception as error:
            if as_json and not isinstance(error, click.exceptions.Exit):
                _log_error(error)
            raise


@contextmanager
def _quiet(console: Console) -> Iterator[None]:
    was, console.quiet = console.quiet, True
    try:
        yield
    finally:
        console.quiet = was


def _log_error(error: Exception) -> None:
    """The command's error as `main` prints it (a refusal is a warning), never a password; on
    the run's logger (a failed run is reported to Sentry once, by its listener)."""
    code = error.exit_code if isinstance(error, BackfillError) else 1
    try:
        message = scrub(str(error), current().settings.database_url)
    except Exception:  # noqa: BLE001 - no settings, nothing to scrub
        message = str(error)
    logging.getLogger(logs.RUN_LOGGER).log(
        logging.WARNING if code in (2, 3) else logging.ERROR,
        "backfill: %s",
        message,
        extra={"error_type": type(error).__name__},
    )

"""The `backfill` command: a thin layer over the Runner. Errors become exit codes here, once."""

from __future__ import annotations

import sys
import traceback

import click
import sqlalchemy as sa

from backfill.cli.backup import backup_command, restore_command
from backfill.cli.commands import cli
from backfill.cli.dashboard import dashboard_command
from backfill.cli.history import history_command
from backfill.cli.metrics import metrics_command
from backfill.cli.options import current, forget
from backfill.cli.render import err
from backfill.cli.revert import forget_undo_command, revert_command
from backfill.errors import BackfillError
from backfill.logs import plain_warnings
from backfill.redaction import scrub

__all__ = ["cli", "main"]

for command in (
    history_command,
    revert_command,
    forget_undo_command,
    backup_command,
    restore_command,
    metrics_command,
    dashboard_command,
):
    cli.add_command(command)


def _scrub(message: str) -> str:
    """Never print a password, even inside a driver's error text."""
    try:
        url = current().settings.database_url
    except Exception:  # noqa: BLE001 - no settings, nothing to scrub
        return message
    return scrub(message, url)


def main(argv: list[str] | None = None) -> None:
    forget(sys.argv[1:] if argv is None else argv)
    try:
        with plain_warnings():
            code = cli.main(args=argv, prog_name="backfill", standalone_mode=False)
    except click.exceptions.Abort:
        err.print("backfill: aborted")
        code = 2
    except click.ClickException as error:
        error.show()
        code = 2
    except BackfillError as error:
        code = _fail(error, error.exit_code)
    except sa.exc.DBAPIError as error:
        code = _fail(error, 4, f"database error: {error.orig}")
    except Exception as error:  # noqa: BLE001 - a bug of ours: one line, traceback with --debug
        code = _fail(
            error,
            1,
            f"unexpected {type(error).__name__}: {error} "
            "(run again with --debug for the traceback)",
        )
    sys.exit(code if isinstance(code, int) else 0)


def _fail(error: Exception, code: int, message: str | None = None) -> int:
    if current().debug:
        sys.stderr.write(_scrub("".join(traceback.format_exception(error))))
    sys.stderr.write(f"backfill: {_scrub(message or str(error))}\n")
    return code

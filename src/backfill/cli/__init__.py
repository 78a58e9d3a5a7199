"""The `backfill` command: a thin layer over the Runner. Errors become exit codes here, once."""

from __future__ import annotations

import sys
import traceback

import click
import sqlalchemy as sa

from backfill.cli.commands import cli
from backfill.cli.options import current, forget
from backfill.cli.render import err
from backfill.errors import BackfillError

__all__ = ["cli", "main"]


def _scrub(message: str) -> str:
    """Never print a password, even inside a driver's error text."""
    try:
        password = sa.make_url(current().settings.database_url).password
    except Exception:  # noqa: BLE001 - no settings, nothing to scrub
        return message
    return message.replace(str(password), "***") if password else message


def main(argv: list[str] | None = None) -> None:
    forget()
    try:
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
        traceback.print_exception(error)
    sys.stderr.write(f"backfill: {_scrub(message or str(error))}\n")
    return code

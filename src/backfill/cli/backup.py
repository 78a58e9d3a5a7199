"""`backfill backup` and `backfill restore`: a snapshot of the tables migrations touch, and
putting one back."""

from __future__ import annotations

import click

from backfill.cli import render
from backfill.cli.options import confirm, current, global_options, interactive
from backfill.errors import Refused


@click.command(name="backup")
@click.argument("names", nargs=-1)
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    help="The backup's directory (new; default ./backfill-backups/DATABASE-TIME).",
)
@global_options
def backup_command(names: tuple[str, ...], output: str | None) -> None:
    """Back up, in one snapshot, the tables the migrations touch (every one's when no name)."""
    g = current()
    info = g.runner().backup(names, output)
    if g.json:
        render.print_json(info.to_json())
        return
    render.out.print(
        f"backed up {', '.join(info.tables)}: {info.rows:,} rows, {info.bytes:,} bytes, "
        f"in {info.path}"
    )


@click.command(name="restore")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--yes", is_flag=True, help="Do not ask.")
@global_options
def restore_command(path: str, yes: bool) -> None:
    """Put a backup's tables back; the migrations over them are pending after it."""
    g = current()
    runner = g.runner()
    settings = g.settings
    question = (
        f"Restore {path} into {runner.db.display_url}? Rows written since the backup are lost."
    )
    if settings.is_production and not yes:
        if not interactive():
            raise Refused(
                "restore in prod needs --yes or the environment's name typed at a terminal"
            )
        typed = click.prompt(f"{question} Type {settings.environment!r} to go on", err=True)
        if typed != settings.environment:
            raise Refused("environment name not confirmed; nothing was restored")
    else:
        confirm(question, yes, "restore needs confirmation: pass --yes or run from a terminal")
    result = runner.restore(path)
    if g.json:
        render.print_json(result.to_json())
        return
    render.out.print(
        f"restored {', '.join(result.tables)} ({result.rows:,} rows) from {result.path}; "
        f"now pending: {', '.join(result.migrations) or 'none'}"
    )

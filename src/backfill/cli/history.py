"""`backfill history`: what was done to the migrations, newest first."""

from __future__ import annotations

import click

from backfill.cli import render
from backfill.cli.options import current, global_options


@click.command(name="history")
@click.argument("name", required=False)
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@global_options
def history_command(name: str | None, limit: int) -> None:
    """Runs, reverts, restores, and resets and cancels by hand, newest first."""
    g = current()
    entries = g.runner().history(name, limit)
    if g.json:
        render.print_json({"runs": [entry.to_json() for entry in entries]})
    elif not entries:
        render.out.print("no history yet" + (f" for {name}" if name else ""))
    else:
        render.out.print(render.history_table(entries))

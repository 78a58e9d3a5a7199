"""`backfill revert` and `backfill forget-undo`: putting back what runs with `--undo` logged,
or dropping that log."""

from __future__ import annotations

import click

from backfill.cli import render
from backfill.cli.options import confirm, current, global_options
from backfill.cli.outputs import Asked, output_options, outputs
from backfill.revert import RevertResult
from backfill.state import State


@click.command(name="revert")
@click.argument("name")
@click.option(
    "--batch-size", type=click.IntRange(min=1), help="Log entries put back per transaction."
)
@click.option("--yes", is_flag=True, help="Do not ask.")
@output_options
@global_options
def revert_command(
    name: str,
    batch_size: int | None,
    yes: bool,
    asked: Asked,
) -> int:
    """Put back, newest first, what the migration's runs with --undo changed."""
    g = current()
    runner = g.runner()
    runner.migrations[name]
    where = f" on {g.settings.environment} ({runner.db.display_url})"
    confirm(
        f"Revert {name}{where}: put back every value it logged?",
        yes,
        "revert needs confirmation: pass --yes or run from a terminal",
    )
    with outputs(runner, [name], asked) as out:
        with render.RunProgress() as progress:
            shown = [] if g.json else [progress]
            result = runner.revert(name, batch_size=batch_size, listeners=[*out.listeners, *shown])
        _report(result, g.json)
    return result.exit_code


def _report(result: RevertResult, as_json: bool) -> None:
    name = result.name
    if as_json:
        render.print_json(
            {
                name: {
                    "state": str(result.state),
                    "reverted": result.reverted,
                    "kept_changed_by_app": result.kept,
                    "kept_ids": result.kept_ids,
                }
            }
        )
        return
    if result.state is State.SUCCESS:
        render.out.print(f"{name}: reverted ({result.reverted:,} changes put back); it is pending")
    else:
        render.out.print(
            f"{name}: revert {result.state} after {result.reverted:,} changes; "
            f"`backfill revert {name}` resumes it"
        )
    if result.kept:
        shown = ", ".join(map(repr, result.kept_ids))
        render.out.print(
            f"  kept {result.kept:,} values the app changed since the migration wrote them "
            f"(rows {shown})",
            soft_wrap=True,
        )
    if result.error is not None:
        render.err.print(f"backfill: {result.error}", soft_wrap=True)


@click.command(name="forget-undo")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask.")
@global_options
def forget_undo_command(name: str, yes: bool) -> None:
    """Drop the migration's undo log (a revert in progress cannot go on)."""
    runner = current().runner()
    runner.migrations[name]
    confirm(
        f"Drop the undo log of {name}? It can no longer be reverted.",
        yes,
        "forget-undo needs confirmation: pass --yes or run from a terminal",
    )
    if runner.forget_undo(name):
        render.out.print(f"{name}: undo log dropped")
    else:
        render.out.print(f"{name}: no undo log; nothing changed")

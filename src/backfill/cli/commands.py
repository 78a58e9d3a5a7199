"""The commands of the contract, each a few lines over the Runner."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import click
import sqlalchemy as sa

from backfill.cli import detach as detached
from backfill.cli import render
from backfill.cli.dashboard import demo_socket, port_option, serve_demo
from backfill.cli.options import (
    Duration,
    ask_before_running,
    confirm,
    current,
    global_options,
    undo_option,
)
from backfill.cli.outputs import Asked, output_options, outputs
from backfill.cli.workers import WorkOptions, run_with_workers, worker_command
from backfill.decision import OnError
from backfill.errors import Refused, RowFailed
from backfill.run import RunResult
from backfill.state import State


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@global_options
def cli() -> None:
    """Online, batched, resumable data migrations over a live database."""


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--watch", is_flag=True, help="Redraw until interrupted.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True)
@click.option("--shards", is_flag=True, help="One line per shard of a run with workers.")
@global_options
def status(names: tuple[str, ...], watch: bool, interval: float, shards: bool) -> None:
    """State and progress of each migration (every defined one when no name)."""
    g = current()
    runner = g.runner()
    if g.json:
        while True:
            report = runner.status(names)
            render.print_json({name: s.to_json() for name, s in report.items()}, compact=watch)
            if not watch:
                return
            time.sleep(interval)
    if not watch:
        report = runner.status(names)
        render.out.print(render.status_table(report))
        for line in render.status_details(report):
            render.out.print(line)
        if shards:
            for name, found in report.items():
                if found.shards:
                    render.out.print(render.shards_table(name, found))
        return
    from rich.live import Live

    try:
        with Live(
            render.status_table(runner.status(names)), console=render.out, auto_refresh=False
        ) as live:
            while True:
                time.sleep(interval)
                live.update(render.status_table(runner.status(names)), refresh=True)
    except KeyboardInterrupt:
        return


@cli.command()
@click.argument("names", nargs=-1, required=True)
@click.option("--batch-size", type=click.IntRange(min=1), help="Rows per batch (transaction).")
@click.option("--dry-run", is_flag=True, help="Run the first batch, show samples, save nothing.")
@click.option("--dry-run-batches", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--restart", is_flag=True, help="Start over even after success (zeroes counters).")
@click.option(
    "--on-error",
    type=click.Choice(["fail", "skip"]),
    default="fail",
    show_default=True,
    help="Stop at a bad row, or record it and go on.",
)
@click.option("--min-age", type=Duration(), help="Override a prerequisite's wait (7d, 36h, 0).")
@click.option("--force", is_flag=True, help="Skip the prerequisite gate (asks in prod).")
@click.option(
    "--pause",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Seconds to sleep between batches, to spare a busy database.",
)
@click.option(
    "--python-only",
    is_flag=True,
    help="Ignore the migration's declared SQL; run its Python function on every row.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Start N worker processes on this machine, each working range shards of the run.",
)
@undo_option
@click.option("--yes", is_flag=True, help="Do not ask before running in prod.")
@click.option(
    "--no-backup-check",
    is_flag=True,
    help="In prod, do not ask again when the tables have no backup from the last 24 hours.",
)
@click.option(
    "--detach",
    is_flag=True,
    help="Run in the background; return once the run has begun (`backfill wait` follows it).",
)
@click.option(
    "--log",
    type=click.Path(dir_okay=False),
    help="With --detach: where the run logs (default ./backfill-logs/NAME-TIME.log).",
)
@output_options
@global_options
def run(
    names: tuple[str, ...],
    batch_size: int | None,
    dry_run: bool,
    dry_run_batches: int,
    restart: bool,
    on_error: str,
    min_age: timedelta | None,
    force: bool,
    pause: float,
    python_only: bool,
    workers: int | None,
    undo: bool | None,
    yes: bool,
    no_backup_check: bool,
    detach: bool,
    log: str | None,
    asked: Asked,
) -> int:
    """Run the named migrations one after another, each resuming from its cursor."""
    g = current()
    runner = g.runner()
    for name in names:
        runner.migrations[name]  # unknown names are refused before anything runs
    if detach and dry_run:
        raise click.UsageError("--detach and --dry-run do not go together: a dry run saves nothing")
    # Started by `run --detach`: it reports its claim to its parent, which asked every question.
    report = detached.claim_report()
    claimed = [] if report is None else [report]
    settings = g.settings
    if report is None:  # (a detached run's parent asked them)
        ask_before_running(
            g, names, yes=yes, force=force, dry_run=dry_run, backup=not no_backup_check
        )
        if settings.is_production and undo is None and not dry_run:
            for name in names:
                cannot = runner.migrations[name].cannot_undo
                if cannot is not None:
                    render.err.print(f"{name}: runs without an undo log: {cannot}")
    work = WorkOptions(batch_size, on_error, pause, python_only, undo)
    if detach:
        options = detached.RunArguments(work, restart, min_age, force, workers, asked)
        return detached.start(g, names, options, log)
    plan = workers is not None and not dry_run
    with outputs(runner, names, asked, children=plan) as out:
        if workers is not None and plan:
            return run_with_workers(
                g,
                names,
                workers,
                work,
                restart=restart,
                min_age=min_age,
                force=force,
                events=asked.events,
                listeners=[*out.listeners, *claimed],
                besides=(out.env, out.passed),
            )
        started = time.monotonic()
        with render.RunProgress() as progress:
            results = runner.run(
                names,
                batch_size=batch_size,
                dry_run=dry_run,
                dry_run_batches=dry_run_batches,
                restart=restart,
                on_error=OnError(on_error),
                min_age=min_age,
                force=force,
                pause=pause,
                sql=not python_only,
                undo=undo,
                prefer_undo=settings.is_production,
                listeners=[*out.listeners, *claimed, *([] if g.json else [progress])],
            )
        _report(results, g.json, started)
    return _exit_code(results)


def _report(results: list[RunResult], as_json: bool, started: float) -> None:
    if as_json:
        document: dict[str, Any] = {}
        for result in results:
            document[result.name] = result.status.to_json()
            if result.dry_run is not None:
                document[result.name]["dry_run"] = result.dry_run.to_json()
        render.print_json(document)
        return
    for result in results:
        s = result.status
        if result.dry_run is not None:
            render.dry_run_report(result.dry_run)
        elif result.already_done:
            render.out.print(
                f"{result.name}: already succeeded; nothing to do (use --restart to run it again)"
            )
        else:
            render.out.print(
                f"{result.name}: {s.state} — {s.processed:,} processed, {s.changed:,} changed, "
                f"{s.skipped_errors:,} skipped, {s.kept:,} kept "
                f"({render.elapsed_since(started)})"
            )
            if s.skipped_errors or s.kept:
                render.out.print(f"  see `backfill verify {result.name}` for the rows left")
        if result.error is not None:
            # stderr carries the one sentence; the advice is ordinary output.
            render.err.print(f"backfill: {result.error}", soft_wrap=True)
            if isinstance(result.error, RowFailed):
                render.out.print(
                    f"  fix the row, then `backfill run {result.name}` resumes at "
                    "this batch (or use --on-error skip)"
                )
            else:
                render.out.print(f"  `backfill run {result.name}` resumes at this batch")
        if s.state is State.CANCELED:
            render.err.print(f"{result.name}: canceled; `backfill run {result.name}` resumes")


def _exit_code(results: list[RunResult]) -> int:
    # Runs stop at the first that fails or is canceled: at most one code is not 0.
    return max((r.exit_code for r in results), default=0)


@cli.command()
@click.argument("name")
@global_options
def cancel(name: str) -> None:
    """Ask a live run to stop after its current batch."""
    runner = current().runner()
    if runner.cancel(name):
        render.out.print(f"{name}: cancel requested; the runner stops after its current batch")
    else:
        render.out.print(f"{name}: no live run; nothing changed")


@cli.command()
@click.argument("name")
@global_options
def count(name: str) -> None:
    """How many rows the migration would still change (read-only)."""
    g = current()
    found = g.runner().count(name)
    if g.json:
        render.print_json({name: {"remaining": found.remaining, "raising": found.raising}})
    else:
        render.out.print(
            f"{name}: {found.remaining:,} rows left to change"
            + (f", {found.raising:,} rows it raises on" if found.raising else "")
        )


@cli.command()
@click.argument("name")
@global_options
def verify(name: str) -> int:
    """Full read-only scan: rows still to change and rows the migration raises on."""
    g = current()
    runner = g.runner()
    found = runner.verify(name)
    if g.json:
        render.print_json({name: found.to_json()})
    else:
        render.out.print(
            f"{name}: {found.remaining:,} rows left, {found.raising:,} raising, {found.kept:,} kept"
        )
        for label, ids in (
            ("left", found.sample_ids),
            ("raising", found.raising_ids),
            ("kept", found.kept_ids),
        ):
            if ids:
                render.out.print(f"  {label}: {', '.join(map(repr, ids))}", soft_wrap=True)
        for row in runner.skipped_rows(name, limit=5):
            field = f", field {row['field']!r}" if row["field"] else ""
            render.out.print(
                f"  skipped row {row['row_id']!r}{field}: {row['message']}", soft_wrap=True
            )
    return 0 if found.clean else 1


@cli.command()
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask.")
@global_options
def reset(name: str, yes: bool) -> None:
    """Forget progress so the next run starts from the beginning."""
    runner = current().runner()
    runner.migrations[name]
    confirm(
        f"Forget all progress of {name}?",
        yes,
        "reset needs confirmation: pass --yes or run from a terminal",
    )
    runner.reset(name)
    render.out.print(f"{name}: reset; the next run starts from the beginning")


@cli.command()
@click.option(
    "--messages",
    "count_",
    type=click.IntRange(min=0),
    default=100_000,
    show_default=True,
    help="How many legacy messages to create.",
)
@click.option("--seed-only", is_flag=True, help="Create the messages, do not migrate.")
@click.option(
    "--dashboard",
    "in_browser",
    is_flag=True,
    help="Watch and steer it in the browser: serve the dashboard (its URL and token printed) "
    "and run body_to_parts at a pace a person can follow.",
)
@port_option
@click.option("--yes", is_flag=True, help="Replace an existing messages table without asking.")
@output_options
@global_options
def demo(
    count_: int,
    seed_only: bool,
    in_browser: bool,
    port: int,
    yes: bool,
    asked: Asked,
) -> int:
    """Create realistic legacy chat messages, then migrate them with a progress bar (or, with
    --dashboard, in the browser)."""
    from chat_migrations import migrations
    from chat_migrations.generator import seed_messages

    g = current()
    if g.settings.is_production:
        raise Refused("demo refuses the prod environment")
    sock = demo_socket(port) if in_browser and not seed_only else None
    runner = g.runner(migrations)
    engine = runner.db.engine
    with runner.db.unavailable_as_error():
        exists = sa.inspect(engine).has_table("messages")
    if exists:
        confirm(
            f"Replace the messages table in {runner.db.display_url}?",
            yes,
            "a messages table already exists; pass --yes to replace it",
        )
    with (
        render.err.status(f"Creating {count_:,} legacy messages…"),
        runner.db.unavailable_as_error(),
    ):
        seed_messages(engine, count_)
        for name in migrations.names():
            runner.reset(name)  # progress recorded against the old table means nothing now
    render.err.print(f"Created {count_:,} legacy messages in {runner.db.display_url}")
    if seed_only:
        return 0
    if sock is not None:
        serve_demo(sock, asked.log_format, asked.log_file, migrations, "body_to_parts")
        return 0
    with outputs(runner, ["body_to_parts"], asked) as out:
        started = time.monotonic()
        with render.RunProgress() as progress:
            results = runner.run(["body_to_parts"], listeners=[*out.listeners, progress])
        _report(results, False, started)
        render.out.print(render.status_table(runner.status()))
    return _exit_code(results)


cli.add_command(worker_command)
cli.add_command(detached.wait_command)

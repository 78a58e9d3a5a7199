"""Many workers on one migration, from the command line: the `worker` command (any machine, any
number of them), and `run --workers N`, which starts the run here and N worker processes on this
machine, follows them and exits with the run's outcome."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType

import click

from backfill.cli import render
from backfill.cli.options import (
    Duration,
    Globals,
    confirm_production,
    current,
    global_options,
    undo_option,
)
from backfill.cli.outputs import Asked, output_options, outputs
from backfill.decision import OnError
from backfill.errors import DatabaseUnavailable
from backfill.events import Listener
from backfill.history import Origin
from backfill.runner import Runner
from backfill.state import State
from backfill.stop_signals import handled
from backfill.worker import WorkResult

# How often a command that follows workers reads their progress from the database.
_POLL_SECONDS = 0.5


def worker_options(command: Callable[..., int]) -> Callable[..., int]:
    """The options a worker shares with `run` (passed on by `run --workers N`)."""
    for option in reversed(
        [
            click.option("--batch-size", type=click.IntRange(min=1), help="Rows per batch."),
            click.option("--restart", is_flag=True, help="Start over even after success."),
            click.option(
                "--on-error",
                type=click.Choice(["fail", "skip"]),
                default="fail",
                show_default=True,
                help="Stop the run at a bad row, or record it and go on.",
            ),
            click.option(
                "--pause",
                type=click.FloatRange(min=0),
                default=0.0,
                help="Seconds to sleep between batches, to spare a busy database.",
            ),
            click.option(
                "--python-only", is_flag=True, help="Ignore the migration's declared SQL."
            ),
            undo_option,
        ]
    ):
        command = option(command)
    return command


@dataclass(frozen=True)
class WorkOptions:
    """How a worker works, as `run` and `worker` take it (`run --workers N` passes it on)."""

    batch_size: int | None
    on_error: str
    pause: float
    python_only: bool
    undo: bool | None = None

    def arguments(self) -> list[str]:
        """As options of `backfill worker` (and `run`)."""
        given = ["--on-error", self.on_error, "--pause", str(self.pause)]
        if self.batch_size is not None:
            given += ["--batch-size", str(self.batch_size)]
        if self.undo is not None:
            given.append("--undo" if self.undo else "--no-undo")
        return given + (["--python-only"] if self.python_only else [])


def work(
    g: Globals,
    names: tuple[str, ...],
    options: WorkOptions,
    *,
    restart: bool,
    wait: bool,
    min_age: timedelta | None,
    force: bool,
    quiet: bool,
    listeners: list[Listener],
    workers: int | None = None,
    origin: Origin = Origin.WORKER,
) -> int:
    """Be a worker of each migration in turn (the `worker` command); the run's outcome."""
    runner = g.runner(origin=origin)
    code = 0
    for name in names:
        with render.RunProgress() as progress, _following(runner, name, progress, quiet):
            result = runner.work(
                name,
                batch_size=options.batch_size,
                restart=restart,
                on_error=OnError(options.on_error),
                min_age=min_age,
                force=force,
                pause=options.pause,
                wait=wait,
                workers=workers,
                listeners=listeners,
                sql=not options.python_only,
                undo=options.undo,
                prefer_undo=g.settings.is_production,
            )
        code = _report(result, g.json)
        if code:
            break
    return code


def _report(result: WorkResult, as_json: bool) -> int:
    name, status = result.name, result.status
    if as_json:
        render.print_json({name: status.to_json()})
    elif result.already_done:
        render.out.print(f"{name}: already done; nothing to do (use --restart to run it again)")
    elif status.state is State.IN_PROGRESS and not result.left:
        render.out.print(
            f"{name}: nothing left to take here ({result.processed:,} rows done by this "
            f"worker); {status.workers} other worker(s) are finishing the run"
        )
    else:
        render.out.print(
            f"{name}: {status.state} — {status.processed:,} processed, {status.changed:,} "
            f"changed, {status.skipped_errors:,} skipped ({result.processed:,} by this worker)"
        )
    if result.error is not None:
        render.err.print(f"backfill: {result.error}", soft_wrap=True)
    elif status.state is State.FAILED and status.error is not None:
        render.err.print(f"backfill: {name} failed: {status.error.message}", soft_wrap=True)
    if result.left:
        render.err.print(f"{name}: this worker stopped; `backfill worker {name}` resumes")
    return result.exit_code


@contextmanager
def _following(
    runner: Runner, name: str, progress: render.RunProgress, quiet: bool
) -> Iterator[None]:
    """The run's progress, read from the database while this process works (each worker's
    batches count only its own shard)."""
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(_POLL_SECONDS):
            try:
                status = runner.status([name])[name]
            except DatabaseUnavailable:
                continue
            progress.show_status(status)

    thread = threading.Thread(target=follow, name=f"follow-{name}", daemon=True)
    if not quiet:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()


def run_with_workers(
    g: Globals,
    names: tuple[str, ...],
    workers: int,
    options: WorkOptions,
    *,
    restart: bool,
    min_age: timedelta | None,
    force: bool,
    events: str | None,
    listeners: list[Listener],
    besides: tuple[dict[str, str], list[str]] = ({}, []),
) -> int:
    """`run NAME --workers N`: start or resume each run here (gates, confirmation, `--restart`
    and refusals come back at once), then N `backfill worker` processes join it, with the
    environment and options `besides` (metrics, logs); exits with its outcome."""
    runner = g.runner()
    if runner.db.dialect == "sqlite":
        render.err.print(
            "SQLite lets one connection write at a time: running one worker, here "
            f"(--workers {workers} would only take turns)"
        )
        return work(
            g,
            names,
            options,
            restart=restart,
            wait=False,
            min_age=min_age,
            force=force,
            quiet=g.json,
            listeners=listeners,
            workers=1,
            origin=Origin.CLI,
        )
    code = 0
    for name in names:
        ready = runner.begin(
            name,
            workers,
            batch_size=options.batch_size,
            restart=restart,
            min_age=min_age,
            force=force,
            sql=not options.python_only,
            listeners=listeners,
            undo=options.undo,
            prefer_undo=g.settings.is_production,
        )
        if ready is not None:
            code = _report(ready, g.json)
        else:
            code = _follow_workers(g, runner, name, workers, options, events, besides)
        if code:
            break
    return code


def _follow_workers(
    g: Globals,
    runner: Runner,
    name: str,
    workers: int,
    options: WorkOptions,
    events: str | None,
    besides: tuple[dict[str, str], list[str]],
) -> int:
    settings = g.settings
    env_besides, passed = besides
    # They join the run begun here (never with --restart: it would refuse the run they join).
    command = [sys.executable, "-m", "backfill", "worker", name, "--yes", "--quiet"]
    command += [*options.arguments(), *passed]
    if events is not None:
        command += ["--events", os.path.abspath(events)]
    # The URL goes by the environment, never on a command line others can read (ps).
    env = dict(
        os.environ,
        BACKFILL_DATABASE_URL=settings.database_url,
        BACKFILL_ENV=settings.environment,
        BACKFILL_APP=settings.required_app(),
        **env_besides,
    )
    children = [
        subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C here cancels the run; it does not kill them
        )
        for _ in range(workers)
    ]
    if not g.json:
        pids = ", ".join(str(c.pid) for c in children)
        render.err.print(f"{name}: {workers} workers started (pids {pids})")
    with render.RunProgress() as progress, _cancel_on_signal(runner, name):
        while any(child.poll() is None for child in children):
            time.sleep(_POLL_SECONDS)
            try:
                status = runner.status([name])[name]
            except DatabaseUnavailable:
                continue
            if not g.json:
                progress.show_status(status)
    status = runner.status([name])[name]
    if g.json:
        render.print_json({name: status.to_json()})
    else:
        render.out.print(
            f"{name}: {status.state} — {status.processed:,} processed, {status.changed:,} "
            f"changed, {status.skipped_errors:,} skipped, by {workers} workers"
        )
    if status.state is State.SUCCESS:
        return 0
    if status.state is State.CANCELED:
        render.err.print(f"{name}: canceled; `backfill run {name} --workers {workers}` resumes")
        return 3
    if status.state is State.FAILED:
        error = status.error
        if error is not None:
            render.err.print(f"backfill: {name} failed: {error.message}", soft_wrap=True)
        return 1 if error is not None and error.row_id is not None else 4
    codes = sorted({c.returncode for c in children})
    render.err.print(
        f"backfill: {name}: the workers ended (exit codes {codes}) before the run did; it is "
        f"{status.state}: `backfill run {name} --workers {workers}` resumes it"
    )
    return 4


@contextmanager
def _cancel_on_signal(runner: Runner, name: str) -> Iterator[None]:
    """SIGINT and SIGTERM ask the run to stop: every worker ends its batch and lets its shard
    go, and the run ends `canceled`."""
    asked = threading.Event()

    def handle(_signum: int, _frame: FrameType | None) -> None:
        if not asked.is_set():
            asked.set()
            threading.Thread(target=runner.cancel, args=(name,), daemon=True).start()

    with handled(handle):
        yield


@click.command(name="worker")
@click.argument("names", nargs=-1, required=True)
@worker_options
@click.option("--wait", is_flag=True, help="When nothing is free, wait until a shard frees.")
@click.option("--min-age", type=Duration(), help="Override a prerequisite's wait (7d, 36h, 0).")
@click.option("--force", is_flag=True, help="Skip the prerequisite gate when starting the run.")
@click.option("--yes", is_flag=True, help="Do not ask before starting a run in prod.")
@click.option("--quiet", is_flag=True, hidden=True, help="No progress (run --workers' children).")
@output_options
@global_options
def worker_command(
    names: tuple[str, ...],
    batch_size: int | None,
    restart: bool,
    on_error: str,
    pause: float,
    python_only: bool,
    undo: bool | None,
    wait: bool,
    min_age: timedelta | None,
    force: bool,
    yes: bool,
    quiet: bool,
    asked: Asked,
) -> int:
    """Work the named migrations' runs from any machine: start, resume or join each one."""
    g = current()
    for name in names:
        g.runner().migrations[name]  # unknown names are refused before anything runs
    confirm_production(g, names, yes)
    with outputs(g.runner(), names, asked) as out:
        return work(
            g,
            names,
            WorkOptions(batch_size, on_error, pause, python_only, undo),
            restart=restart,
            wait=wait,
            min_age=min_age,
            force=force,
            quiet=quiet or g.json,
            listeners=out.listeners,
        )

"""Runs in the background, from the command line: `run --detach` starts the run in a process of
its own session (it outlives the terminal) and returns once that process has claimed the
migration; `wait` follows runs, detached or not, until they end and exits with their outcome.

The parent asks every question first; the child is `backfill run` with `--yes`, the database URL
in its environment (never on a command line others can read with `ps`), and the write end of a
pipe on which it reports its claim (`BACKFILL_DETACH_FD`). EOF without a claim means the child
was refused or had nothing to do: its exit code and what it said come back to the caller.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from backfill.cli import render
from backfill.cli.options import Globals, current, global_options
from backfill.cli.outputs import Asked
from backfill.cli.workers import WorkOptions
from backfill.errors import DatabaseUnavailable, Refused
from backfill.events import Event, RunStarted
from backfill.history import HistoryEntry
from backfill.history import exit_code as outcome_code
from backfill.runner import Runner
from backfill.state import State

# The number of the pipe's write end in a detached child (the parent passes it with pass_fds).
DETACH_FD = "BACKFILL_DETACH_FD"
# How often `wait` reads the runs from the database, and how often it shows their progress.
_POLL_SECONDS = 0.5
_SHOW_SECONDS = 5.0
# `wait` rides out a database that stops answering for this long before it gives up (exit 4).
_UNAVAILABLE_SECONDS = 60.0
# `wait`'s exit codes of its own (the contract's).
TIMED_OUT = 5
INTERRUPTED = 6


# -- the child: report the claim ------------------------------------------------------------------


class ClaimReport:
    """A listener, in a child started by `run --detach`: the first `run_started` (the claim of
    a run, or of a run with workers by `run --workers N`'s `begin`) is written to the parent as
    one line, `RUN_ID MIGRATION`, and the pipe is closed; the parent then lets go."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted) and self._fd is not None:
            # The parent may be gone (Ctrl-C): nobody to tell then, and the run goes on.
            with contextlib.suppress(OSError):
                os.write(self._fd, f"{event.run_id} {event.migration}\n".encode())
            self.close()

    def close(self) -> None:
        """EOF for the parent: a child that ends without a claim closes it too."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def claim_report() -> ClaimReport | None:
    """In a child started by `run --detach`, its ClaimReport (closed when the command ends,
    claim or not); None in any other process. A child's parent asked every question already."""
    # Popped, so that the processes this one starts (workers) never write to a number that
    # means another file to them.
    raw = os.environ.pop(DETACH_FD, None)
    if raw is None:
        return None
    report = ClaimReport(int(raw))
    context = click.get_current_context(silent=True)
    if context is not None:
        context.call_on_close(report.close)
    return report


# -- the parent: start the child, wait for its claim ----------------------------------------------


@dataclass(frozen=True)
class RunArguments:
    """The options of `run` a detached child is given, rebuilt from their parsed values."""

    work: WorkOptions
    restart: bool
    min_age: timedelta | None
    force: bool
    workers: int | None
    outputs: Asked

    def arguments(self) -> list[str]:
        """As options of `backfill run` (never `--detach`; the questions were asked: `--yes`)."""
        given = [*self.work.arguments(), "--yes"]
        if self.min_age is not None:
            given += ["--min-age", f"{self.min_age.total_seconds()}s"]
        if self.workers is not None:
            given += ["--workers", str(self.workers)]
        given += self.outputs.arguments()
        flags = [("--restart", self.restart), ("--force", self.force)]
        return given + [flag for flag, on in flags if on]


def default_log(name: str, now: datetime | None = None) -> Path:
    """`./backfill-logs/<name>-<UTC time>.log`."""
    moment = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return Path("backfill-logs") / f"{name}-{moment}.log"


def start(g: Globals, names: Sequence[str], options: RunArguments, log: str | None) -> int:
    """`run NAME... --detach`: start `backfill run NAME...` in a session of its own, logging to
    `log` (or `default_log`), and return once it has claimed a migration (exit 0, the child
    running on); if it ends first (refused, or nothing to do), its output and exit code."""
    settings = g.settings
    path = Path(log if log is not None else default_log(names[0])).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "backfill", "run", *names, *options.arguments()]
    if g.debug:
        command.append("--debug")
    read_end, write_end = os.pipe()
    # The URL goes by the environment, never on a command line others can read (ps).
    env = dict(
        os.environ,
        BACKFILL_DATABASE_URL=settings.database_url,
        BACKFILL_ENV=settings.environment,
        BACKFILL_APP=settings.required_app(),
        **{DETACH_FD: str(write_end)},
    )
    try:
        with path.open("ab") as output:
            offset = output.tell()  # a log named again with --log: show only this run's part
            child = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                pass_fds=(write_end,),
                start_new_session=True,  # no controlling terminal: closing it does not end it
            )
    finally:
        os.close(write_end)  # else this process would keep the pipe open: no EOF, ever
    with os.fdopen(read_end, "rb") as pipe:
        try:
            line = pipe.readline().decode().split()
        except KeyboardInterrupt:
            # Ctrl-C here stops the waiting, not the run: say where it goes on.
            render.err.print(
                f"backfill: stopped waiting; the background run goes on (pid {child.pid}, "
                f"log {path}): `backfill cancel {names[0]}` stops it",
                markup=False,
                soft_wrap=True,
            )
            raise click.Abort() from None
    if line:
        run_id, name = int(line[0]), line[1]
        if g.json:
            render.print_json({"pid": child.pid, "log": str(path), "run_id": run_id})
        else:
            render.out.print(
                f"{name}: running in the background (pid {child.pid}, run {run_id}); "
                f"log: {path}; follow it with `backfill wait {name}`",
                markup=False,
                soft_wrap=True,
            )
        return 0
    return _ended_unclaimed(g, child, path, offset)


def _ended_unclaimed(g: Globals, child: subprocess.Popen[bytes], path: Path, offset: int) -> int:
    """The child ended without a claim: what it said goes to this process's output (stderr
    when it refused, so the sentence is where a refusal's is), then its exit code."""
    code = child.wait()
    with path.open("rb") as log:
        log.seek(offset)
        said = log.read().decode(errors="replace")
    stream = sys.stdout if code == 0 and not g.json else sys.stderr
    stream.write(said)
    stream.flush()
    if code < 0:
        render.err.print(
            f"backfill: the background run was killed (signal {-code}) before it began"
        )
        return 1
    if code == 0 and g.json:
        render.print_json({"pid": child.pid, "log": str(path), "run_id": None})
    return code


# -- wait -----------------------------------------------------------------------------------------


def wait_code(entry: HistoryEntry) -> int:
    """What `wait` exits with for a run that ended: its stored exit code; 6 if it was
    interrupted (its runner died)."""
    if entry.outcome is State.INTERRUPTED:
        return INTERRUPTED
    if entry.exit_code is not None:
        return entry.exit_code
    assert entry.outcome is not None
    return outcome_code(entry.outcome, row_at_fault=False) or 0


class _Follower:
    """Reads the followed runs, riding out a database that stops answering for a while."""

    def __init__(self, runner: Runner, clock: Callable[[], float]) -> None:
        self.runner, self.clock = runner, clock
        self._failing_since: float | None = None

    def entry(self, name: str, run_id: int) -> HistoryEntry | None:
        """Run `run_id` of `name` now (None: the database did not answer this time)."""
        try:
            found = self.runner.run_entry(name)
            if found is None or found.id != run_id:  # a later run began: ours has ended
                found = next((e for e in self.runner.history(name, 500) if e.id == run_id), None)
        except DatabaseUnavailable:
            now = self.clock()
            self._failing_since = self._failing_since or now
            if now - self._failing_since > _UNAVAILABLE_SECONDS:
                raise
            return None
        self._failing_since = None
        if found is None:
            raise Refused(f"run {run_id} of {name} is no longer in the history")
        return found

    def progress(self, name: str) -> str:
        try:
            status = self.runner.status([name])[name]
        except DatabaseUnavailable:
            return f"{name}: the database does not answer; still waiting"
        total = status.total
        share = f" ({100 * status.processed // total}%)" if total else ""
        shown_total = "?" if total is None else f"{total:,}"
        return f"{name}: {status.state} {status.processed:,} / {shown_total} rows{share}"


def follow(
    runner: Runner,
    names: Sequence[str],
    timeout: float | None,
    *,
    as_json: bool,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """`wait NAME...`: follow each migration's run in progress (or its latest) until all have
    ended; the first non-zero exit code among them, in the order named (6 for one that was
    interrupted); 5 when `timeout` seconds pass first (the runs go on). Refused for a
    migration that never ran."""
    followed: dict[str, int] = {}
    for name in dict.fromkeys(names):
        found = runner.run_entry(name)
        if found is None:
            raise Refused(f"{name} has no run to wait for: start one with `backfill run {name}`")
        followed[name] = found.id
    reader = _Follower(runner, clock)
    ended: dict[str, HistoryEntry] = {}
    deadline = None if timeout is None else clock() + timeout
    shown: float | None = None
    while True:
        for name, run_id in followed.items():
            found = None if name in ended else reader.entry(name, run_id)
            if found is not None and found.ended:
                ended[name] = found
        waiting = [name for name in followed if name not in ended]
        if not waiting:
            break
        now = clock()
        if deadline is not None and now >= deadline:
            _timed_out(reader, followed, ended, waiting, timeout, as_json)
            return TIMED_OUT
        if not as_json and (shown is None or now - shown >= _SHOW_SECONDS):
            for name in waiting:
                render.out.print(reader.progress(name), markup=False, soft_wrap=True)
            shown = now
        sleep(_POLL_SECONDS if deadline is None else min(_POLL_SECONDS, deadline - now))
    runs = [ended[name] for name in followed]
    if as_json:
        render.print_json({e.migration: _shown(e, wait_code(e)) for e in runs})
    else:
        for found in runs:
            _say_ended(reader, found)
    return next((code for code in map(wait_code, runs) if code), 0)


def _shown(entry: HistoryEntry, code: int | None) -> dict[str, object]:
    outcome = str(entry.outcome) if entry.ended else None
    return {"run_id": entry.id, "outcome": outcome, "exit_code": code}


def _timed_out(
    reader: _Follower,
    followed: dict[str, int],
    ended: dict[str, HistoryEntry],
    waiting: list[str],
    timeout: float | None,
    as_json: bool,
) -> None:
    still = "; ".join(f"{reader.progress(name)} (run {followed[name]})" for name in waiting)
    render.err.print(
        f"backfill: gave up after {timeout:g}s still waiting for {still}; the run goes on",
        markup=False,
        soft_wrap=True,
    )
    if as_json:
        document = {
            name: (
                _shown(ended[name], wait_code(ended[name]))
                if name in ended
                else {"run_id": run_id, "outcome": None, "exit_code": None}
            )
            for name, run_id in followed.items()
        }
        render.print_json(document)


def _say_ended(reader: _Follower, entry: HistoryEntry) -> None:
    name, code = entry.migration, wait_code(entry)
    render.out.print(
        f"{name}: run {entry.id} ended {entry.outcome} (exit {code}) — "
        f"{entry.processed or 0:,} processed, {entry.changed or 0:,} changed, "
        f"{entry.skipped_errors or 0:,} skipped",
        markup=False,
        soft_wrap=True,
    )
    if entry.outcome is State.INTERRUPTED:
        render.err.print(
            f"backfill: {name}: run {entry.id} was interrupted (its runner died); "
            f"`backfill run {name}` resumes it",
            markup=False,
            soft_wrap=True,
        )
    elif entry.outcome is State.FAILED:
        error = reader.runner.status([name])[name].error
        if error is not None:
            where = "" if error.row_id is None else f" on row {error.row_id!r}"
            where += f", field {error.field!r}" if error.field else ""
            render.err.print(
                f"backfill: {name} failed{where}: {error.message}", markup=False, soft_wrap=True
            )


@click.command(name="wait")
@click.argument("names", nargs=-1, required=True)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    help="Give up after SECONDS (exit 5); the runs go on.",
)
@global_options
def wait_command(names: tuple[str, ...], timeout: float | None) -> int:
    """Follow the named migrations' runs until they end; exit with their outcome."""
    g = current()
    runner = g.runner()
    for name in names:
        runner.migrations[name]  # unknown names are refused before anything is read
    return follow(runner, names, timeout, as_json=g.json)

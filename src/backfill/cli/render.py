"""How results look on a terminal: status tables, the progress bar, dry-run samples.

Progress and messages go to stderr; stdout carries results (and nothing but JSON under --json).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from backfill.dry_run import DryRun
from backfill.events import BatchCommitted, Event, RunStarted
from backfill.history import HistoryEntry
from backfill.pacing import Ticker
from backfill.progress import MigrationStatus
from backfill.state import State
from backfill.types import iso, row_id

# Piped output is read by people later (logs, CI): do not squeeze it into 80 columns.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def print_json(document: Any, *, compact: bool = False) -> None:
    """One JSON document on stdout; compact (one line) for streams such as `status --watch`."""
    text = json.dumps(document, ensure_ascii=False, indent=None if compact else 2)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _number(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = round(seconds)
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
    )


_STATE_STYLE = {
    "success": "green",
    "failed": "red",
    "inProgress": "cyan",
    "interrupted": "yellow",
    "canceled": "yellow",
    "pending": "dim",
    "done": "green",
    "reverting": "magenta",
}


def status_table(report: Mapping[str, MigrationStatus]) -> Table:
    table = Table(title=None, show_lines=False)
    for header in (
        "migration",
        "state",
        "processed / total",
        "changed",
        "skipped",
        "rows/s",
        "ETA",
        "updated (UTC)",
    ):
        table.add_column(header)
    for name, status in report.items():
        total = status.total
        share = f" ({100 * status.processed / total:.0f}%)" if total else ""
        rate = status.rows_per_second
        state = str(status.state)
        table.add_row(
            name,
            f"[{_STATE_STYLE.get(state, '')}]{state}[/]",
            f"{_number(status.processed)} / {_number(total)}{share}",
            _number(status.changed),
            _number(status.skipped_errors),
            "—" if rate is None else f"{rate:,.0f}",
            _duration(status.eta_seconds),
            _when(status.updated_at),
        )
    return table


def _when(seconds: float | None) -> str:
    return (iso(seconds) or "—").replace("T", " ").rstrip("Z")


def history_table(entries: Sequence[HistoryEntry]) -> Table:
    table = Table(title=None, show_lines=False)
    for header in (
        "id",
        "migration",
        "kind",
        "origin",
        "by",
        "started (UTC)",
        "took",
        "outcome",
        "exit",
        "processed",
        "changed",
        "skipped",
    ):
        table.add_column(header)
    for entry in entries:
        outcome = "running" if entry.outcome is State.IN_PROGRESS else str(entry.outcome or "—")
        style = _STATE_STYLE.get(str(entry.outcome), "")
        took = None if entry.finished_at is None else entry.finished_at - entry.started_at
        table.add_row(
            str(entry.id),
            entry.migration,
            str(entry.kind),
            str(entry.origin or "—"),
            f"{entry.user or '?'}@{entry.host or '?'}",
            _when(entry.started_at),
            _duration(took),
            f"[{style}]{outcome}[/]" if style else outcome,
            "—" if entry.exit_code is None else str(entry.exit_code),
            _number(entry.processed),
            _number(entry.changed),
            _number(entry.skipped_errors),
        )
    return table


def status_details(report: Mapping[str, MigrationStatus]) -> list[str]:
    lines = []
    for name, status in report.items():
        if status.shards:
            done = sum(1 for s in status.shards if str(s.state) == "done")
            lines.append(
                f"{name}: {status.workers} workers, {done} of {len(status.shards)} shards done "
                "(`--shards` lists them)"
            )
        elif status.runner is not None:
            lines.append(f"{name}: runner host {status.runner.host}, pid {status.runner.pid}")
        if status.verified is not None:
            found = status.verified
            lines.append(
                f"{name}: verified {_when(found.at)} UTC: {found.remaining:,} rows left, "
                f"{found.raising:,} raising"
            )
        if status.revert is not None:
            r = status.revert
            lines.append(
                f"{name}: revert {r.state}: {r.processed:,} of {r.total:,} logged changes gone "
                f"through, {r.reverted:,} put back, {r.kept:,} kept (the app changed them)"
            )
        elif status.undo_rows:
            lines.append(
                f"{name}: undo log of {status.undo_rows:,} changes (`backfill revert {name}`)"
            )
        if status.allowed_at is not None:
            lines.append(f"{name}: its prerequisite's wait ends {_when(status.allowed_at)} UTC")
        if status.error is not None:
            where = f"row {status.error.row_id!r}"
            if status.error.field:
                where += f", field {status.error.field!r}"
            lines.append(f"{name}: failed on {where}: {status.error.message}")
    return lines


def shards_table(name: str, status: MigrationStatus) -> Table:
    """One line per shard of a run with workers (`status --shards`)."""
    table = Table(title=f"{name}: {len(status.shards)} shards, {status.workers} workers")
    for header in ("shard", "keys (lo, hi]", "cursor", "state", "worker", "processed", "changed"):
        table.add_column(header)
    for shard in status.shards:
        shown = shard.to_json()
        lo, hi = shown["range"]
        state = str(shard.state)
        table.add_row(
            str(shard.id),
            f"({'—' if lo is None else lo}, {'end' if hi is None else hi}]",
            "—" if shown["cursor"] is None else str(shown["cursor"]),
            f"[{_STATE_STYLE.get(state, '')}]{state}[/]",
            "—" if shard.runner is None else f"{shard.runner.host}:{shard.runner.pid}",
            _number(shard.processed),
            _number(shard.changed),
        )
    return table


class RunProgress:
    """A Rich bar on a terminal, a plain line every few seconds otherwise; fed by the run's
    events."""

    def __init__(self, console: Console = err, interval: float = 2.0) -> None:
        self.console = console
        self.live = console.is_terminal
        self.ticker = Ticker(interval)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} rows/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}
        self.runs: dict[str, _RunRate] = {}

    def __enter__(self) -> RunProgress:
        if self.live:
            self.progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.live:
            self.progress.stop()

    def __call__(self, event: Event) -> None:
        """A listener of the run's events: a run's start opens its bar, each batch moves it."""
        if isinstance(event, RunStarted):
            self.runs[event.migration] = _RunRate(event.time, event.processed)
            self._show(event.migration, event.processed, event.total, None, None)
        elif isinstance(event, BatchCommitted) and event.shard is None:
            run = self.runs.get(event.migration)
            rate = None if run is None else run.rate(event.time, event.processed)
            left = None if event.total is None else max(event.total - event.processed, 0)
            eta = None if rate is None or left is None else left / rate
            self._show(event.migration, event.processed, event.total, rate, eta)

    def show_status(self, status: MigrationStatus) -> None:
        """Progress read from the database (a run with workers, whose batch events each count
        one shard's rows)."""
        self._show(
            status.name, status.processed, status.total, status.rows_per_second, status.eta_seconds
        )

    def _show(
        self, name: str, processed: int, total: int | None, rate: float | None, eta: float | None
    ) -> None:
        if self.live:
            if name not in self.tasks:
                self.tasks[name] = self.progress.add_task(
                    name, total=total, completed=processed, rate="—"
                )
            self.progress.update(
                self.tasks[name],
                completed=processed,
                total=max(total or 0, processed),
                rate="—" if rate is None else f"{rate:,.0f}",
            )
        elif self.ticker.due():
            share = f" ({100 * processed / total:.1f}%)" if total else ""
            self.console.print(
                f"{name}: {processed:,}/{total or 0:,} rows{share}, "
                f"{0 if rate is None else rate:,.0f} rows/s, ETA {_duration(eta)}",
                soft_wrap=True,
            )


@dataclass(frozen=True)
class _RunRate:
    """Rows per second over the current run only, so a resume does not dilute it."""

    started: float
    processed: int

    def rate(self, now: float, processed: int) -> float | None:
        elapsed, done = now - self.started, processed - self.processed
        return done / elapsed if elapsed > 0 and done > 0 else None


def dry_run_report(report: DryRun) -> None:
    out.print(
        f"[bold]{report.name}[/] dry run: {report.batches} batch(es), {report.rows:,} rows "
        f"read, {report.would_change:,} would change, {report.would_skip:,} would be "
        f"skipped, {report.would_keep:,} kept. Nothing was saved."
    )
    for sample in report.samples:
        new = not sample.before  # a copy's row the target lacks
        heading = " (a new row of the target)" if new else ""
        out.print(f"  row {row_id(sample.key)!r}{heading}:")
        for field, after in sample.after.items():
            before = "" if new else f"{_short(sample.before.get(field))} → "
            out.print(f"    {field}: {before}{_short(after)}", soft_wrap=True)


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def elapsed_since(start: float) -> str:
    return _duration(time.monotonic() - start)

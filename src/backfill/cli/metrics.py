"""Prometheus metrics from the command line: `backfill metrics`, serving what the database knows,
and `--metrics-port` for the commands that run batches (`metrics_served` around the run).
Which series come from where is backfill.metrics's."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

import click
from prometheus_client import CollectorRegistry

from backfill import metrics
from backfill.cli import render
from backfill.cli.options import current, global_options
from backfill.events import Listener
from backfill.progress import MigrationStatus
from backfill.runner import Runner
from backfill.stop_signals import handled

metrics_option = click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    metavar="PORT",
    help="Serve Prometheus metrics of the run on http://127.0.0.1:PORT/metrics while it runs "
    "(0: a free port, printed).",
)


@dataclass(frozen=True)
class Served:
    """What a command adds around its run: `listeners` to its run's, and `env` to the
    environment of the `backfill worker` processes it starts."""

    listeners: list[Listener] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@contextmanager
def metrics_served(
    runner: Runner, port: int | None, names: Sequence[str], *, children: bool = False
) -> Iterator[Served]:
    """The run's metrics served on `port` while it goes on (none without one; `children`: the
    workers this command starts count in them). A worker started so by `run --workers N`
    writes its metrics for its parent instead."""
    if port is None:
        yield Served([metrics.RunMetrics(None)] if metrics.for_parent() else [])
        return

    def status() -> dict[str, MigrationStatus]:
        return runner.status(names)

    if not children:
        registry, listener = metrics.run_registry(status, runner.clock)
        with _serving(registry, port):
            yield Served([listener])
        return
    with tempfile.TemporaryDirectory(prefix="backfill-metrics-") as directory:
        registry, listener = metrics.children_registry(directory, status, runner.clock)
        with _serving(registry, port):
            yield Served([listener], metrics.children_env(directory))


@contextmanager
def _serving(registry: CollectorRegistry, port: int) -> Iterator[metrics.Serving]:
    with metrics.serving(registry, port) as served:
        render.err.print(f"serving /metrics on {served.url}", soft_wrap=True)
        yield served


@click.command(name="metrics")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=9464,
    show_default=True,
    help="The port to listen on (0: a free one, printed).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to bind.")
@global_options
def metrics_command(port: int, host: str) -> None:
    """Serve Prometheus metrics of every migration, as the database knows them, until
    interrupted."""
    runner = current().runner()
    registry = metrics.database_registry(lambda: runner.status(), runner.clock)
    with metrics.serving(registry, port, host) as served:
        render.out.print(f"serving /metrics on {served.url}", soft_wrap=True)
        _until_interrupted()


def _until_interrupted() -> None:
    """Wait for SIGINT or SIGTERM."""
    stop = threading.Event()

    def handle(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    with handled(handle):
        while not stop.wait(0.5):
            pass

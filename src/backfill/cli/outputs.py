"""What a command that runs batches gives out besides its result, in one place: `--events FILE`,
`--log-format json` / `--log-file PATH`, `--metrics-port PORT`, and Sentry and OpenTelemetry
when their environment asks for them; and what its child processes need of them."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from backfill.cli.metrics import metrics_option, metrics_served
from backfill.cli.observe import observe_options, observed, passed_on
from backfill.cli.options import events_file, events_option
from backfill.events import Listener
from backfill.runner import Runner

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Asked:
    """The output options as given to the command."""

    events: str | None = None
    log_format: str | None = None
    log_file: str | None = None
    metrics_port: int | None = None

    def arguments(self) -> list[str]:
        """As options of a `backfill` process that runs in this one's stead (a detached run):
        the same events file, logs and metrics port."""
        given = [] if self.events is None else ["--events", os.path.abspath(self.events)]
        given += passed_on(self.log_format, self.log_file)
        if self.metrics_port is not None:
            given += ["--metrics-port", str(self.metrics_port)]
        return given


def output_options(function: F) -> F:
    """`--events`, `--log-format`, `--log-file` and `--metrics-port`, passed to the command as
    one `asked: Asked`."""

    @functools.wraps(function)
    def command(*args: Any, **options: Any) -> Any:
        asked = Asked(
            options.pop("events"),
            options.pop("log_format"),
            options.pop("log_file"),
            options.pop("metrics_port"),
        )
        return function(*args, asked=asked, **options)

    return events_option(observe_options(metrics_option(cast(F, command))))


@dataclass(frozen=True)
class Outputs:
    """The listeners to add to the command's runs; for the `backfill` processes it starts,
    their environment (`env`: where workers write metrics) and options (`passed`: the logs)."""

    listeners: list[Listener]
    env: dict[str, str]
    passed: list[str]


@contextmanager
def outputs(
    runner: Runner, names: Sequence[str], asked: Asked, *, children: bool = False
) -> Iterator[Outputs]:
    """Around the command's runs (enter it before the progress bar: JSON logs on stderr keep
    Rich off it). `children`: the command starts workers, whose metrics it serves."""
    with (
        observed(asked.log_format, asked.log_file) as observers,
        metrics_served(runner, asked.metrics_port, names, children=children) as served,
        events_file(asked.events) as written,
    ):
        yield Outputs(
            [*written, *observers, *served.listeners],
            served.env,
            passed_on(asked.log_format, asked.log_file),
        )

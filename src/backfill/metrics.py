"""Prometheus metrics of migrations, through prometheus-client: what a run does, from its events,
and what the database knows, read at each scrape.

Two sources, and never one series name from both in one registry (prometheus-client refuses):

- `RunMetrics`, an events listener, keeps what this process runs: the batch series
  (`backfill_rows_processed_total`, `backfill_rows_changed_total`, `backfill_batches_total`,
  `backfill_batch_duration_seconds`, labelled `migration` and `shard`, "" outside a shard) and
  `backfill_batch_size`, `backfill_rows_total`, `backfill_state`. Its counters only go up.
- `DatabaseCollector` reads the status at each scrape: the counters (per shard: the rows of a
  run's shards under their id, the rest under ""), `backfill_rows_skipped_total`, `backfill_state`,
  `backfill_rows_total`, `backfill_batch_size`, `backfill_hold`, `backfill_workers` and
  `backfill_heartbeat_age_seconds`, or `only` some. Its counters go back to 0 when a migration
  is reset or restarted (a counter reset, which `rate()` copes with).

A run (`--metrics-port`) serves `run_registry`: its RunMetrics, and from the database only what
no event tells (`RUN_EXTRAS`: skipped, hold, workers, heartbeat age). `backfill metrics` serves
`database_registry`: everything, from the database.

`run --workers N` serves its children's RunMetrics through prometheus-client's multiprocess
mode: each `backfill worker` it starts gets `children_env(directory)`, so its metrics are
written to files there (the mode is chosen when prometheus-client is imported, hence by
environment, and `for_parent()` tells the child); `children_registry` reads them (counters and
histograms summed, gauges the most recently set) ahead of the parent's own (it runs the batches
itself on SQLite, and emits the run's start otherwise), plus `RUN_EXTRAS`.

A revert's events count undo-log entries, so its batch series do too. This module knows no
click and no Runner: it is given a status function and a clock.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from backfill.errors import BackfillError, Refused
from backfill.events import BatchCommitted, Event, RunFinished, RunStarted, StateChanged
from backfill.pacing import wall_clock
from backfill.progress import MigrationStatus
from backfill.state import ShardState, State
from backfill.types import Clock

log = logging.getLogger("backfill")

PROCESSED = "backfill_rows_processed_total"
CHANGED = "backfill_rows_changed_total"
SKIPPED = "backfill_rows_skipped_total"
BATCHES = "backfill_batches_total"
DURATION = "backfill_batch_duration_seconds"
BATCH_SIZE = "backfill_batch_size"
TOTAL = "backfill_rows_total"
STATE = "backfill_state"
HOLD = "backfill_hold"
WORKERS = "backfill_workers"
HEARTBEAT_AGE = "backfill_heartbeat_age_seconds"

# What a run serves from the database: what no event tells.
RUN_EXTRAS = frozenset({SKIPPED, HOLD, WORKERS, HEARTBEAT_AGE})
# A batch takes from a millisecond (a few rows, SQL path) to a minute (a big, slow one).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STATES = tuple(str(s) for s in State)
# Set in the environment of the workers `run --workers N` starts (prometheus-client's name).
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

_BATCH_LABELS = ("migration", "shard")


class RunMetrics:
    """An events listener keeping the series of what this process runs, in `registry` (None:
    registered nowhere, as a worker writing for its parent does)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        def counter(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, _BATCH_LABELS, registry=registry)

        self.processed = counter(PROCESSED, "Rows read by the batches committed here.")
        self.changed = counter(CHANGED, "Rows changed by the batches committed here.")
        self.batches = counter(BATCHES, "Batches committed here.")
        self.duration = Histogram(
            DURATION,
            "Seconds from a batch's BEGIN to its COMMIT.",
            _BATCH_LABELS,
            registry=registry,
            buckets=DURATION_BUCKETS,
        )
        # Gauges: in a worker writing for its parent, the value set last by any process.
        self.batch_size = Gauge(
            BATCH_SIZE,
            "Rows per batch.",
            ["migration"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.total = Gauge(
            TOTAL,
            "Rows in the migration's range.",
            ["migration"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.state = Gauge(
            STATE,
            "1 for the migration's current state, 0 for the others.",
            ["migration", "state"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self._states: dict[str, str] = {}

    def __call__(self, event: Event) -> None:
        name = event.migration
        if isinstance(event, BatchCommitted):
            shard = "" if event.shard is None else str(event.shard)
            self.processed.labels(name, shard).inc(event.rows_read)
            self.changed.labels(name, shard).inc(event.rows_changed)
            self.batches.labels(name, shard).inc()
            self.duration.labels(name, shard).observe(event.seconds)
            self.batch_size.labels(name).set(event.batch_size)
            if event.total is not None:
                self.total.labels(name).set(event.total)
        elif isinstance(event, StateChanged):
            self._set_state(name, event.to)
        elif isinstance(event, RunStarted):
            if event.total is not None:
                self.total.labels(name).set(event.total)
            if name not in self._states:  # a worker joining a run sees no state change
                self._set_state(name, str(State.IN_PROGRESS))
        elif isinstance(event, RunFinished) and event.state is not None:
            self._set_state(name, event.state)

    def _set_state(self, name: str, state: str) -> None:
        # Every state is written each time, so "the most recent" agrees across processes.
        self._states[name] = state
        for each in {*STATES, state}:
            self.state.labels(name, each).set(1 if each == state else 0)


Status = Callable[[], Mapping[str, MigrationStatus]]
_Family = CounterMetricFamily | GaugeMetricFamily


class DatabaseCollector:
    """The series the database knows, read with `status()` at each scrape (`only`: those of
    these names). A scrape while the database cannot answer has none of them (logged)."""

    def __init__(
        self, status: Status, clock: Clock = wall_clock, only: Collection[str] | None = None
    ) -> None:
        self._status, self._clock = status, clock
        self._only = None if only is None else frozenset(only)

    def describe(self) -> Iterable[Metric]:
        """The families, empty: their names, checked against the registry's others."""
        return self._chosen(_families())

    def collect(self) -> Iterable[Metric]:
        try:
            report = self._status()
        except (BackfillError, sa.exc.SQLAlchemyError) as error:
            log.warning("backfill: metrics: the database did not answer: %s", error)
            return []
        families = _families()
        now = self._clock()
        for status in report.values():
            _add(families, status, now)
        return self._chosen(families)

    def _chosen(self, families: dict[str, _Family]) -> list[Metric]:
        return [f for name, f in families.items() if self._only is None or name in self._only]


def _families() -> dict[str, _Family]:
    return {
        PROCESSED: CounterMetricFamily(
            PROCESSED, "Rows the migration processed.", labels=_BATCH_LABELS
        ),
        CHANGED: CounterMetricFamily(CHANGED, "Rows the migration changed.", labels=_BATCH_LABELS),
        SKIPPED: CounterMetricFamily(
            SKIPPED, "Rows skipped on error (--on-error skip).", labels=["migration"]
        ),
        TOTAL: GaugeMetricFamily(TOTAL, "Rows in the migration's range.", labels=["migration"]),
        BATCH_SIZE: GaugeMetricFamily(BATCH_SIZE, "Rows per batch.", labels=["migration"]),
        STATE: GaugeMetricFamily(
            STATE,
            "1 for the migration's current state, 0 for the others.",
            labels=["migration", "state"],
        ),
        HOLD: GaugeMetricFamily(
            HOLD,
            "1 while the migration is held, by `indicator`.",
            labels=["migration", "indicator"],
        ),
        WORKERS: GaugeMetricFamily(
            WORKERS, "Live runners holding the migration or its shards.", labels=["migration"]
        ),
        HEARTBEAT_AGE: GaugeMetricFamily(
            HEARTBEAT_AGE,
            "Seconds since a live run (or shard) last showed life in the database.",
            labels=_BATCH_LABELS,
        ),
    }


def _add(families: dict[str, _Family], status: MigrationStatus, now: float) -> None:
    def add(name: str, labels: list[str], value: float) -> None:
        families[name].add_metric(labels, value)

    name = status.name
    # The rows of a run's shards under their id; those committed outside any, under "".
    add(PROCESSED, [name, ""], status.processed - sum(s.processed for s in status.shards))
    add(CHANGED, [name, ""], status.changed - sum(s.changed for s in status.shards))
    for shard in status.shards:
        add(PROCESSED, [name, str(shard.id)], shard.processed)
        add(CHANGED, [name, str(shard.id)], shard.changed)
    add(SKIPPED, [name], status.skipped_errors)
    if status.total is not None:
        add(TOTAL, [name], status.total)
    if status.batch_size is not None:
        add(BATCH_SIZE, [name], status.batch_size)
    for state in STATES:
        add(STATE, [name, state], 1 if state == str(status.state) else 0)
    add(HOLD, [name, ""], 0)  # until holds exist
    add(WORKERS, [name], status.workers)
    for shard_label, at in _heartbeats(status):
        add(HEARTBEAT_AGE, [name, shard_label], max(now - at, 0.0))


def _heartbeats(status: MigrationStatus) -> list[tuple[str, float]]:
    """(shard label, when) of each live part of a run: its shards being worked, or the run
    itself. The status has no run's own heartbeat: its last write (a batch) stands for it."""
    live = (State.IN_PROGRESS, State.INTERRUPTED)
    reverting = status.revert is not None and status.revert.state in live
    if status.state not in live and not reverting:
        return []
    working = (ShardState.IN_PROGRESS, ShardState.INTERRUPTED)
    shards = [
        (str(s.id), s.heartbeat_at)
        for s in status.shards
        if s.state in working and s.heartbeat_at is not None
    ]
    if shards:
        return shards
    return [] if status.updated_at is None else [("", status.updated_at)]


def run_registry(status: Status, clock: Clock = wall_clock) -> tuple[CollectorRegistry, RunMetrics]:
    """What a run serves: its RunMetrics (the listener to add) and `RUN_EXTRAS`."""
    registry = CollectorRegistry()
    metrics = RunMetrics(registry)
    registry.register(DatabaseCollector(status, clock, RUN_EXTRAS))
    return registry, metrics


def database_registry(status: Status, clock: Clock = wall_clock) -> CollectorRegistry:
    """What `backfill metrics` serves: every series, from the database."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(status, clock))
    return registry


def children_env(directory: str) -> dict[str, str]:
    """The environment of a worker whose RunMetrics its parent serves (from `directory`)."""
    return {MULTIPROCESS_ENV: directory}


def for_parent() -> bool:
    """Whether this process was started to write its metrics for its parent to serve."""
    return bool(os.environ.get(MULTIPROCESS_ENV))


def children_registry(
    directory: str, status: Status, clock: Clock = wall_clock
) -> tuple[CollectorRegistry, RunMetrics]:
    """What `run --workers N` serves: its children's RunMetrics (written to `directory`), its
    own where they have none of the same series and labels, and `RUN_EXTRAS`."""
    own = CollectorRegistry()
    metrics = RunMetrics(own)
    registry = CollectorRegistry()
    children = MultiProcessCollector(None, directory)  # type: ignore[no-untyped-call]
    registry.register(_ChildrenFirst(children, own))
    registry.register(DatabaseCollector(status, clock, RUN_EXTRAS))
    return registry, metrics


class _ChildrenFirst:
    """The children's families, with the samples of this process's own that they lack."""

    def __init__(self, children: Collector, own: Collector) -> None:
        self._children, self._own = children, own

    def collect(self) -> Iterable[Metric]:
        merged = {family.name: family for family in self._children.collect()}
        for family in self._own.collect():
            theirs = merged.get(family.name)
            if theirs is None:
                merged[family.name] = family
                continue
            seen = {(s.name, _key(s.labels)) for s in theirs.samples}
            extra = [s for s in family.samples if (s.name, _key(s.labels)) not in seen]
            both = Metric(theirs.name, theirs.documentation, theirs.type)
            both.samples = [*theirs.samples, *extra]
            merged[family.name] = both
        return list(merged.values())


def _key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


@dataclass(frozen=True)
class Serving:
    """An HTTP server answering `GET /metrics` in a thread of its own; `stop()` ends it."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def serve(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> Serving:
    """Serve `registry` on `host`:`port` (0: a free port, told by the Serving) until stopped."""
    try:
        server, thread = start_http_server(port, host, registry)
    except OSError as error:
        raise Refused(f"cannot serve metrics on {host}:{port}: {error.strerror}") from error
    return Serving(host, server.server_port, server, thread)


@contextmanager
def serving(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> Iterator[Serving]:
    """`serve`, stopped on leaving."""
    served = serve(registry, port, host)
    try:
        yield served
    finally:
        served.stop()

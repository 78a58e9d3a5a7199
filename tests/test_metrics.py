"""Prometheus metrics: a run's events counted by RunMetrics, the database's view read by the
DatabaseCollector at each scrape, the two served side by side without a name twice, a worker's
metrics served by its parent (multiprocess mode), and a run's metrics scraped while it runs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import DuplicateTimeseries

from apps import counting
from backfill import Runner
from backfill.cli.metrics import metrics_served
from backfill.errors import DatabaseUnavailable
from backfill.events import BatchCommitted, Event, RunFinished, RunStarted, StateChanged
from backfill.metrics import (
    MULTIPROCESS_ENV,
    DatabaseCollector,
    RunMetrics,
    children_env,
    children_registry,
    database_registry,
    run_registry,
    serving,
)
from backfill.progress import MigrationStatus, ShardStatus
from backfill.state import ShardState, State
from support import ROOT, counting_url

NAME = counting.NAME
ROWS = 250
BATCH = 100


@pytest.fixture
def url(tmp_path: Path) -> str:
    return counting_url(tmp_path, "metrics.db", ROWS)


@pytest.fixture
def runner(url: str) -> Iterator[Runner]:
    runner = Runner(url, counting.migrations)
    yield runner
    runner.db.dispose()


def batch(rows: int, changed: int, seconds: float, shard: int | None = None) -> BatchCommitted:
    return BatchCommitted(NAME, 0.0, shard, 1, rows, rows, changed, seconds, BATCH, rows, ROWS)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"migration": NAME, **labels})


def states(registry: CollectorRegistry) -> dict[str, float | None]:
    return {s: value(registry, "backfill_state", state=s) for s in State}


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} of one GET of a /metrics page."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def labels(**given: str) -> frozenset[tuple[str, str]]:
    return frozenset({"migration": NAME, **given}.items())


# -- RunMetrics: what this process runs, from its events ------------------------------------------


def test_batches_count_rows_batches_and_durations_by_shard() -> None:
    registry = CollectorRegistry()
    metrics = RunMetrics(registry)
    for event in (batch(100, 90, 0.004), batch(100, 100, 0.2), batch(50, 0, 3.0, shard=2)):
        metrics(event)

    assert value(registry, "backfill_rows_processed_total", shard="") == 200
    assert value(registry, "backfill_rows_changed_total", shard="") == 190
    assert value(registry, "backfill_batches_total", shard="") == 2
    assert value(registry, "backfill_rows_processed_total", shard="2") == 50
    assert value(registry, "backfill_batches_total", shard="2") == 1
    assert value(registry, "backfill_batch_duration_seconds_count", shard="") == 2
    assert value(registry, "backfill_batch_duration_seconds_sum", shard="") == pytest.approx(0.204)
    assert value(registry, "backfill_batch_duration_seconds_bucket", shard="", le="0.005") == 1
    assert value(registry, "backfill_batch_duration_seconds_bucket", shard="", le="0.25") == 2
    assert value(registry, "backfill_batch_duration_seconds_bucket", shard="2", le="60.0") == 1
    assert value(registry, "backfill_batch_size") == BATCH
    assert value(registry, "backfill_rows_total") == ROWS


def test_the_state_gauge_is_one_for_the_current_state_only() -> None:
    registry = CollectorRegistry()
    metrics = RunMetrics(registry)
    metrics(StateChanged(NAME, 0.0, "pending", "inProgress"))
    assert states(registry) == {s: 1.0 if s is State.IN_PROGRESS else 0.0 for s in State}

    metrics(RunFinished(NAME, 1.0, "canceled", 3, 1))
    assert states(registry) == {s: 1.0 if s is State.CANCELED else 0.0 for s in State}

    metrics(RunFinished(NAME, 2.0, None, 4, 1))  # the database could not say: unchanged
    assert value(registry, "backfill_state", state="canceled") == 1


def test_a_worker_joining_a_run_sees_it_in_progress_from_its_start() -> None:
    registry = CollectorRegistry()
    metrics = RunMetrics(registry)
    metrics(RunStarted(NAME, 0.0, run_id=7, workers=4, total=ROWS, processed=120))

    assert value(registry, "backfill_state", state="inProgress") == 1
    assert value(registry, "backfill_rows_total") == ROWS


def test_counters_of_a_process_only_go_up_across_runs() -> None:
    registry = CollectorRegistry()
    metrics = RunMetrics(registry)
    for run in range(2):
        metrics(StateChanged(NAME, 0.0, "success" if run else "pending", "inProgress"))
        metrics(batch(100, 100, 0.01))
        metrics(StateChanged(NAME, 1.0, "inProgress", "success"))

    assert value(registry, "backfill_rows_processed_total", shard="") == 200
    assert value(registry, "backfill_batches_total", shard="") == 2


def test_a_run_counts_what_its_events_say(runner: Runner) -> None:
    registry = CollectorRegistry()
    metrics = RunMetrics(registry)
    [result] = runner.run([NAME], batch_size=BATCH, listeners=[metrics])

    assert result.state is State.SUCCESS
    assert value(registry, "backfill_rows_processed_total", shard="") == ROWS
    assert value(registry, "backfill_rows_changed_total", shard="") == ROWS
    assert value(registry, "backfill_batches_total", shard="") == 3
    assert value(registry, "backfill_batch_duration_seconds_count", shard="") == 3
    assert value(registry, "backfill_state", state="success") == 1
    assert value(registry, "backfill_state", state="inProgress") == 0


# -- DatabaseCollector: what the database knows, at each scrape -----------------------------------


def test_the_database_tells_counters_state_total_workers_and_hold(runner: Runner) -> None:
    with runner.db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE items SET source = 'bad:' || source WHERE id IN (3, 140)"))
    registry = database_registry(lambda: runner.status(), runner.clock)
    assert value(registry, "backfill_state", state="pending") == 1
    assert value(registry, "backfill_rows_processed_total", shard="") == 0

    runner.run([NAME], batch_size=BATCH, on_error="skip")

    assert value(registry, "backfill_rows_processed_total", shard="") == ROWS
    assert value(registry, "backfill_rows_changed_total", shard="") == ROWS - 2
    assert value(registry, "backfill_rows_skipped_total") == 2
    assert value(registry, "backfill_rows_total") == ROWS
    assert value(registry, "backfill_batch_size") == BATCH
    assert states(registry) == {s: 1.0 if s is State.SUCCESS else 0.0 for s in State}
    assert value(registry, "backfill_workers") == 0
    assert value(registry, "backfill_hold", indicator="") == 0
    # A finished run has no heartbeat to age.
    assert value(registry, "backfill_heartbeat_age_seconds", shard="") is None


def test_shards_count_what_their_workers_counted(runner: Runner) -> None:
    events = CollectorRegistry()
    work = runner.work(NAME, batch_size=10, workers=2, listeners=[RunMetrics(events)])
    database = database_registry(lambda: runner.status([NAME]), runner.clock)

    assert work.state is State.SUCCESS
    shards = runner.status([NAME])[NAME].shards
    assert len(shards) > 1
    for shard in shards:
        for name in ("backfill_rows_processed_total", "backfill_rows_changed_total"):
            counted = value(events, name, shard=str(shard.id))
            assert counted == value(database, name, shard=str(shard.id)), (name, shard.id)
    total = sum(
        value(database, "backfill_rows_processed_total", shard=str(s.id)) or 0 for s in shards
    )
    assert total + (value(database, "backfill_rows_processed_total", shard="") or 0) == ROWS


def test_heartbeat_age_is_of_live_runs_and_their_shards_only() -> None:
    def shard(id_: int, state: ShardState, at: float | None) -> ShardStatus:
        return ShardStatus(id_, None, None, None, state, None, 0, 0, at)

    report = {
        "plain": MigrationStatus("plain", State.IN_PROGRESS, updated_at=990.0),
        "dead": MigrationStatus("dead", State.INTERRUPTED, updated_at=900.0),
        "sharded": MigrationStatus(
            "sharded",
            State.IN_PROGRESS,
            updated_at=999.0,
            shards=(
                shard(0, ShardState.DONE, 950.0),
                shard(1, ShardState.IN_PROGRESS, 997.5),
                shard(2, ShardState.PENDING, None),
            ),
        ),
        "done": MigrationStatus("done", State.SUCCESS, updated_at=500.0),
    }
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(lambda: report, lambda: 1000.0))

    def age(name: str, shard: str) -> float | None:
        return registry.get_sample_value(
            "backfill_heartbeat_age_seconds", {"migration": name, "shard": shard}
        )

    assert age("plain", "") == 10
    assert age("dead", "") == 100
    assert (age("sharded", "0"), age("sharded", "1"), age("sharded", "")) == (None, 2.5, None)
    assert age("done", "") is None


def test_a_scrape_while_the_database_is_away_has_none_of_its_series() -> None:
    def away() -> dict[str, MigrationStatus]:
        raise DatabaseUnavailable("the database is unreachable")

    registry = CollectorRegistry()
    registry.register(DatabaseCollector(away))

    assert list(registry.collect()) == []


# -- served together ----------------------------------------------------------------------------


def test_a_run_serves_its_events_and_only_what_the_database_alone_knows(runner: Runner) -> None:
    registry, metrics = run_registry(lambda: runner.status([NAME]), runner.clock)
    runner.run([NAME], batch_size=BATCH, listeners=[metrics])

    names = {family.name for family in registry.collect()}
    assert names == {
        "backfill_rows_processed",
        "backfill_rows_changed",
        "backfill_batches",
        "backfill_batch_duration_seconds",
        "backfill_batch_size",
        "backfill_rows_total",
        "backfill_state",
        "backfill_rows_skipped",
        "backfill_hold",
        "backfill_workers",
        "backfill_heartbeat_age_seconds",
    }
    assert value(registry, "backfill_rows_skipped_total") == 0
    # The database's counters would clash with the events': the registry refuses them.
    with pytest.raises(DuplicateTimeseries):
        registry.register(DatabaseCollector(lambda: {}))


def test_metrics_are_scraped_over_http_while_the_run_goes_on(runner: Runner) -> None:
    registry, metrics = run_registry(lambda: runner.status([NAME]), runner.clock)
    seen: list[tuple[int, dict[tuple[str, frozenset[tuple[str, str]]], float]]] = []

    with serving(registry, 0) as served:
        assert served.port > 0 and served.url.endswith(f":{served.port}/metrics")

        def scrape_after(event: Event) -> None:
            if isinstance(event, BatchCommitted) and event.processed < ROWS:
                seen.append((event.processed, scrape(served.url)))

        runner.run([NAME], batch_size=BATCH, listeners=[metrics, scrape_after])

    assert [processed for processed, _ in seen] == [100, 200]
    for processed, samples in seen:
        assert samples[("backfill_rows_processed_total", labels(shard=""))] == processed
        assert samples[("backfill_state", labels(state="inProgress"))] == 1
        assert samples[("backfill_workers", labels())] == 1
        assert samples[("backfill_heartbeat_age_seconds", labels(shard=""))] >= 0
    with pytest.raises(OSError):
        urllib.request.urlopen(served.url, timeout=2)


def test_a_command_serves_its_run_on_the_port_it_is_given(runner: Runner) -> None:
    with metrics_served(runner, None, [NAME]) as served:
        assert served.listeners == [] and served.env == {}
    with metrics_served(runner, 0, [NAME]) as served:
        [metrics] = served.listeners
        runner.run([NAME], batch_size=BATCH, listeners=served.listeners)
        assert isinstance(metrics, RunMetrics) and served.env == {}
    with metrics_served(runner, 0, [NAME], children=True) as served:
        directory = Path(served.env[MULTIPROCESS_ENV])
        assert directory.is_dir()
    assert not directory.exists()


def test_a_worker_started_for_a_parent_writes_its_metrics_for_it(
    runner: Runner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(MULTIPROCESS_ENV, str(tmp_path))
    with metrics_served(runner, None, [NAME]) as served:
        [metrics] = served.listeners
        assert isinstance(metrics, RunMetrics)


# -- a parent serving its workers' metrics (multiprocess mode) ----------------------------------

WORKER = textwrap.dedent(
    """
    import sys
    from backfill.events import BatchCommitted, RunFinished, RunStarted
    from backfill.metrics import RunMetrics

    shard, rows, end = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    metrics = RunMetrics(None)
    metrics(RunStarted("derive", 0.0, 1, 2, 250, 0))
    for _ in range(2):
        metrics(BatchCommitted("derive", 0.0, shard, 1, 2, rows, rows, 0.01, 100, rows, None))
    metrics(RunFinished("derive", 0.0, end, 0, 1))
    """
)


def test_a_parent_serves_the_sums_of_its_workers_and_their_latest_state(tmp_path: Path) -> None:
    directory = tmp_path / "children"
    directory.mkdir()
    registry, own = children_registry(str(directory), lambda: {})
    own(StateChanged(NAME, 0.0, "pending", "inProgress"))  # the parent begins the run
    own(RunStarted(NAME, 0.0, 1, 2, ROWS, 0))
    assert value(registry, "backfill_state", state="inProgress") == 1

    env = {**os.environ, **children_env(str(directory))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    for shard, rows, end in ((0, 60, "inProgress"), (1, 40, "success")):
        command = [sys.executable, "-c", WORKER, str(shard), str(rows), end]
        subprocess.run(command, env=env, check=True, timeout=60)

    assert value(registry, "backfill_rows_processed_total", shard="0") == 120
    assert value(registry, "backfill_rows_processed_total", shard="1") == 80
    assert value(registry, "backfill_batches_total", shard="1") == 2
    assert value(registry, "backfill_batch_duration_seconds_count", shard="0") == 2
    assert value(registry, "backfill_rows_total") == ROWS
    # The worker that finished last says success; the parent's own inProgress gives way.
    assert states(registry) == {s: 1.0 if s is State.SUCCESS else 0.0 for s in State}
    assert len([f for f in registry.collect() if f.name == "backfill_state"]) == 1

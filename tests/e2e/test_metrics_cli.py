"""`backfill metrics` as users run it: a process serving what the database knows, scraped over
HTTP while a run goes on in another process."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import NAME, Harness, committed_by, wait_for
from prometheus_client.parser import text_string_to_metric_families

ROWS = 3_000
SLOW = {"COUNTING_ROW_DELAY": "0.002"}  # 0.2 s a batch of 100: a run of about 6 s


@pytest.fixture
def h(tmp_path: Path, sqlite_url: str) -> Iterator[Harness]:
    harness = Harness(tmp_path, sqlite_url)
    yield harness
    harness.cleanup()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
    """{(sample name, labels): value} of one GET of `url`; None while nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def of(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset({"migration": NAME, **labels}.items())


def test_metrics_follow_a_run_going_on_in_another_process(h: Harness) -> None:
    h.seed(ROWS)
    run = h.start("run", NAME, env=SLOW)
    wait_for(committed_by(h, run, 0), "the run's first batch", procs=(run,))
    port = free_port()
    served = h.start("metrics", "--port", str(port))
    url = f"http://127.0.0.1:{port}/metrics"

    first = wait_for(lambda: scrape(url), "the metrics to be served", procs=(served, run))
    time.sleep(0.5)
    second = scrape(url)

    assert first is not None and second is not None
    processed = ("backfill_rows_processed_total", of(shard=""))
    assert 0 < first[processed] < second[processed] < ROWS, (first[processed], second[processed])
    assert second[("backfill_state", of(state="inProgress"))] == 1
    assert second[("backfill_state", of(state="success"))] == 0
    assert second[("backfill_rows_total", of())] == ROWS
    assert second[("backfill_workers", of())] == 1
    assert second[("backfill_hold", of(indicator=""))] == 0
    assert 0 <= second[("backfill_heartbeat_age_seconds", of(shard=""))] < 5
    assert run.running(), run.output()

    served.send(signal.SIGTERM)
    assert served.wait(10) == 0, served.output()
    assert f"serving /metrics on {url}" in served.stdout()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_run_serves_its_metrics_and_with_workers_its_childrens(
    tmp_path: Path, sqlite_url: str, request: pytest.FixtureRequest, database: str
) -> None:
    url_of_db = sqlite_url if database == "sqlite" else request.getfixturevalue("postgres_url")
    h = Harness(tmp_path, url_of_db)
    try:
        h.seed(ROWS)
        port = free_port()
        url = f"http://127.0.0.1:{port}/metrics"
        args = ["run", NAME, "--metrics-port", str(port), "--yes"]
        if database == "postgresql":
            args += ["--workers", "2"]  # the parent serves what its workers write
        run = h.start(*args, env=SLOW)

        def batches() -> float | None:
            found = scrape(url)
            if found is None:
                return None
            done = sum(v for (name, _), v in found.items() if name == "backfill_batches_total")
            return done if done >= 2 else None

        wait_for(batches, "two batches counted in the run's own metrics", procs=(run,))
        during = scrape(url)
        assert during is not None
        assert during[("backfill_rows_total", of())] == ROWS
        hist = [k for k in during if k[0] == "backfill_batch_duration_seconds_count"]
        assert hist, sorted(during)
        if database == "postgresql":  # batches of shards: labelled with their shard
            shards = {dict(labels).get("shard") for name, labels in during if "batches" in name}
            assert shards - {""}, shards
        run.send(signal.SIGINT)
        assert run.wait() == 3
    finally:
        h.cleanup()


def test_json_logs_are_one_object_per_line_with_the_failure_named(h: Harness) -> None:
    h.seed(300)
    h.execute("UPDATE items SET source = 'bad:x' WHERE id = 150")
    done = h.cli("run", NAME, "--log-format", "json", "--batch-size", "100")
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert [e["event"] for e in lines if e["event"] != "log"][:3] == [
        "state",
        "run_started",
        "batch",
    ]
    error = next(e for e in lines if e["event"] == "error")
    assert (error["row_id"], error["field"]) == (150, "source")
    record = next(e for e in lines if e["event"] == "log" and e["level"] == "ERROR")
    assert (record["migration"], record["row_id"], record["field"]) == (NAME, 150, "source")
    logged = h.tmp_path / "run.jsonl"
    again = h.cli("run", NAME, "--log-file", str(logged), "--batch-size", "100")
    assert again.returncode == 1
    assert all(json.loads(line) for line in logged.read_text().splitlines())

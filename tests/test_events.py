"""The event stream: what a run emits, in order, to its listeners and as `--events` JSON lines."""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from apps import counting
from backfill import LeaseLost, Runner
from backfill.events import (
    BatchCommitted,
    Event,
    RunError,
    RunFinished,
    RunStarted,
    StateChanged,
)
from support import backfill_command, cli_env, counting_url

NAME = counting.NAME
ROWS = 250
BATCH = 100
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def url(tmp_path: Path) -> str:
    return counting_url(tmp_path, "events.db", ROWS)


def run(url: str, **options: object) -> tuple[list[Event], object]:
    seen: list[Event] = []
    runner = Runner(url, counting.migrations, listeners=[seen.append])
    [result] = runner.run([NAME], batch_size=BATCH, **options)  # type: ignore[arg-type]
    runner.db.dispose()
    return seen, result


def kinds(events: list[Event]) -> list[str]:
    return [e.event for e in events]


def test_a_run_emits_its_start_each_batch_its_states_and_its_end(url: str) -> None:
    events, _ = run(url)

    assert kinds(events) == [
        "state",
        "run_started",
        "batch",
        "batch",
        "batch",
        "state",
        "run_finished",
    ]
    claimed, started, *batches, done, finished = events
    assert isinstance(claimed, StateChanged) and (claimed.from_, claimed.to) == (
        "pending",
        "inProgress",
    )
    assert isinstance(started, RunStarted)
    assert (started.run_id, started.workers, started.total, started.processed) == (1, 1, ROWS, 0)
    assert all(isinstance(b, BatchCommitted) for b in batches)
    assert [(b.first_key, b.last_key, b.rows_read, b.rows_changed) for b in batches] == [
        (1, 100, 100, 100),
        (101, 200, 100, 100),
        (201, 250, 50, 50),
    ]
    assert [b.processed for b in batches] == [100, 200, 250]
    assert all(b.seconds > 0 and b.batch_size == BATCH and b.shard is None for b in batches)
    assert isinstance(done, StateChanged) and (done.from_, done.to) == ("inProgress", "success")
    assert isinstance(finished, RunFinished)
    assert (finished.state, finished.exit_code, finished.run_id) == ("success", 0, 1)
    assert all(e.migration == NAME for e in events)
    times = [e.time for e in events]
    assert times == sorted(times)


def test_each_claim_gets_the_next_run_id_and_says_where_it_came_from(url: str) -> None:
    def cancel_after_first_batch(runner: Runner) -> None:
        def listener(event: Event) -> None:
            if isinstance(event, BatchCommitted):
                runner.cancel(NAME)

        runner.listeners.append(listener)

    seen: list[Event] = []
    runner = Runner(url, counting.migrations, listeners=[seen.append])
    cancel_after_first_batch(runner)
    [canceled] = runner.run([NAME], batch_size=BATCH)
    assert kinds(seen)[-2:] == ["state", "run_finished"]
    assert (seen[-2].from_, seen[-2].to) == ("inProgress", "canceled")  # type: ignore[attr-defined]
    assert (seen[-1].state, seen[-1].exit_code) == ("canceled", 3)  # type: ignore[attr-defined]

    runner.listeners.pop()
    seen.clear()
    [resumed] = runner.run([NAME], batch_size=BATCH)
    claimed, started = seen[0], seen[1]
    assert (claimed.from_, claimed.to) == ("canceled", "inProgress")  # type: ignore[attr-defined]
    # Run 1, the cancel's history row 2, run 3: one sequence of ids for the history.
    assert isinstance(started, RunStarted) and (started.run_id, started.processed) == (3, BATCH)
    assert seen[-1].run_id == 3  # type: ignore[attr-defined]

    seen.clear()
    runner.reset(NAME)
    assert [(e.from_, e.to) for e in seen] == [("success", "pending")]  # type: ignore[attr-defined]
    runner.db.dispose()


def test_a_failed_row_is_an_error_event_then_the_failed_state(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE items SET source = 'bad:x' WHERE id = 150"))
    engine.dispose()

    events, _ = run(url)

    assert kinds(events)[-3:] == ["error", "state", "run_finished"]
    error, failed, finished = events[-3:]
    assert isinstance(error, RunError)
    assert (error.row_id, error.field, error.type) == (150, "source", "BadValue")
    assert error.message == "is marked bad"
    assert (failed.from_, failed.to) == ("inProgress", "failed")  # type: ignore[attr-defined]
    assert (finished.state, finished.exit_code) == ("failed", 1)  # type: ignore[attr-defined]


def test_a_runner_that_lost_its_lease_ends_with_exit_code_2(url: str) -> None:
    seen: list[Event] = []
    engine = sa.create_engine(url)

    def take_over(event: Event) -> None:
        seen.append(event)
        if isinstance(event, BatchCommitted):  # another runner claims it meanwhile
            with engine.begin() as conn:
                conn.execute(sa.text("UPDATE _migrations SET generation = generation + 1"))

    runner = Runner(url, counting.migrations, listeners=[take_over])
    with pytest.raises(LeaseLost):
        runner.run([NAME], batch_size=BATCH)
    assert kinds(seen) == ["state", "run_started", "batch", "run_finished"]
    assert seen[-1].exit_code == 2  # type: ignore[attr-defined]
    runner.db.dispose()
    engine.dispose()


def test_a_listener_that_raises_is_logged_and_the_run_goes_on(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: Event) -> None:
        raise OSError("disk full")

    seen: list[Event] = []
    runner = Runner(url, counting.migrations, listeners=[broken, seen.append])
    with caplog.at_level(logging.ERROR, logger="backfill"):
        [result] = runner.run([NAME], batch_size=BATCH)
    assert str(result.state) == "success" and kinds(seen)[-1] == "run_finished"
    assert "an event listener failed on a batch event" in caplog.text
    runner.db.dispose()


def cli(folder: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = backfill_command(*args, "--app", "apps.counting:migrations", "--database-url", url)
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, cwd=folder, env=cli_env()
    )


def test_events_file_has_one_json_object_per_line_in_the_contract_shape(
    url: str, tmp_path: Path
) -> None:
    path = tmp_path / "events.jsonl"
    done = cli(tmp_path, url, "run", NAME, "--batch-size", str(BATCH), "--events", str(path))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in lines] == [
        "state", "run_started", "batch", "batch", "batch", "state", "run_finished",
    ]  # fmt: skip
    assert all(e["migration"] == NAME and ISO_MS.match(e["time"]) for e in lines)
    assert lines[0] | {"time": None} == {
        "event": "state", "time": None, "migration": NAME, "from": "pending", "to": "inProgress",
    }  # fmt: skip
    assert set(lines[1]) == {
        "event",
        "time",
        "migration",
        "run_id",
        "workers",
        "total",
        "processed",
    }
    batch = lines[2]
    assert set(batch) >= {
        "event", "time", "migration", "shard", "first_key", "last_key", "rows_read",
        "rows_changed", "seconds", "batch_size",
    }  # fmt: skip
    assert sum(e["rows_read"] for e in lines if e["event"] == "batch") == ROWS
    assert lines[-1] | {"time": None} == {
        "event": "run_finished", "time": None, "migration": NAME, "state": "success",
        "exit_code": 0, "run_id": 1,
    }  # fmt: skip

    # A second command appends to the same file.
    again = cli(tmp_path, url, "run", NAME, "--restart", "--events", str(path))
    assert again.returncode == 0, again.stderr
    finished = [json.loads(line) for line in path.read_text().splitlines()][-1]
    assert (finished["event"], finished["run_id"]) == ("run_finished", 2)

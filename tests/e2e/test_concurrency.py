"""Several processes around one migration: a second runner, a killed runner, cancel and signals."""

from __future__ import annotations

import json
import signal

import pytest
from harness import (
    HOST,
    NAME,
    AppTraffic,
    Harness,
    committed_by,
    expected_derived,
    pid_exited_unreaped,
    wait_for,
)

ROWS = 3_000
BATCH = 100
# 2 ms a row, 500 rows/s at most: a run of 3,000 rows lasts several seconds.
SLOW = {"COUNTING_ROW_DELAY": "0.002"}


@pytest.fixture
def h(tmp_path, database_url):
    # A long lease: what these tests see as interrupted, they see through the pid, not the clock.
    harness = Harness(tmp_path, database_url, env={"BACKFILL_LEASE_SECONDS": "60"})
    yield harness
    harness.cleanup()


# A pause between batches, so that other commands get SQLite's write lock between batches even
# when a runner keeps it for the whole batch (test_commands_answer_while_a_runner_works_back_to_back
# checks the case without a pause).
PAUSED = ("--pause", "0.15")
PAUSED_ROWS = 1_500


def run_args(*extra: str) -> tuple[str, ...]:
    return ("run", NAME, "--batch-size", str(BATCH), *extra)


def test_second_runner_is_refused_at_once_naming_the_holder(h):
    sources = h.seed(PAUSED_ROWS)
    first = h.start(*run_args(*PAUSED), env=SLOW)
    held = wait_for(committed_by(h, first, 0), "the first runner to commit", procs=(first,))

    second = h.cli(*run_args(), timeout=60)

    assert second.returncode == 2, second.stdout + second.stderr
    assert f"host {HOST}" in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
    assert NAME in second.stderr
    assert "Traceback" not in second.stderr
    # The refused runner took nothing: the first still owns the same generation.
    now = h.record()
    assert (now["runner_pid"], now["generation"]) == (first.pid, held["generation"])
    # Nor can its progress be forgotten under it.
    reset = h.cli("reset", NAME, "--yes", timeout=60)
    assert reset.returncode == 2, reset.stdout + reset.stderr
    assert f"pid {first.pid}" in reset.stderr

    assert first.wait(timeout=90) == 0, first.output()
    h.assert_all_migrated_once(sources)


def test_killed_runner_is_interrupted_at_once_and_a_new_run_resumes_from_the_cursor(h):
    sources = h.seed(ROWS)
    victim = h.start(*run_args(), env=SLOW)
    wait_for(committed_by(h, victim, 2 * BATCH), "the runner to commit", procs=(victim,))
    victim.send(signal.SIGKILL)

    # Dead but not yet reaped by its parent (a zombie process): already seen as gone.
    pid_exited_unreaped(victim.pid)
    status = h.status()
    assert status["state"] == "interrupted", status
    assert status["runner"] == {"host": HOST, "pid": victim.pid}
    assert victim.wait() == -signal.SIGKILL
    status = h.status()
    assert status["state"] == "interrupted", status
    assert status["progress"]["completed"] is False
    assert 0 < status["progress"]["processed"] < ROWS

    record = h.assert_prefix_migrated()
    cursor = record["cursor"]
    # Undo the first row behind the cursor: a run that resumes from the cursor never reads it
    # again, a run that started over would migrate it a second time (counter 2).
    h.execute("UPDATE items SET derived = NULL WHERE id = 1")

    resumed = h.cli(*run_args(), timeout=90)
    assert resumed.returncode == 0, resumed.stderr

    rows = h.items()
    assert rows[0] == (1, sources[1], None, 1), "the resumed run went back behind its cursor"
    assert all(r[2] == expected_derived(sources[r[0]]) and r[3] == 1 for r in rows[1:])
    final = h.record()
    assert (final["state"], final["processed"], final["total"]) == ("success", ROWS, ROWS)
    assert final["changed"] == ROWS  # counters carried over from the killed run
    assert final["generation"] > record["generation"] and final["cursor"] != cursor


def test_cancel_from_another_process_stops_the_run_and_a_later_run_resumes(h):
    sources = h.seed(PAUSED_ROWS)
    runner = h.start(*run_args(*PAUSED), env=SLOW)
    wait_for(committed_by(h, runner, 0), "the runner to commit", procs=(runner,))

    cancel = h.cli("cancel", NAME)
    assert cancel.returncode == 0, cancel.stderr
    assert "cancel requested" in cancel.stdout

    assert runner.wait(timeout=60) == 3, runner.output()
    assert "canceled" in runner.stderr()
    status = h.status()
    assert status["state"] == "canceled" and status["runner"] is None, status
    assert 0 < status["progress"]["processed"] < PAUSED_ROWS
    h.assert_prefix_migrated()

    resumed = h.cli(*run_args(), timeout=90)
    assert resumed.returncode == 0, resumed.stderr
    h.assert_all_migrated_once(sources)

    # With no live run, cancel changes nothing and says so.
    again = h.cli("cancel", NAME)
    assert again.returncode == 0 and "no live run" in again.stdout
    assert h.status()["state"] == "success"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_finish_the_current_batch_then_cancel(h, signum):
    batch = 50
    sources = h.seed(ROWS)
    # 50 rows x 5 ms: a quarter of a second per batch. With the application writing meanwhile,
    # the runner calls the function inside its batch transaction (see AppTraffic).
    with AppTraffic(h):
        runner = h.start(
            "run", NAME, "--batch-size", str(batch), env={"COUNTING_ROW_DELAY": "0.005"}
        )
        wait_for(committed_by(h, runner, 0), "the runner to commit", procs=(runner,))

        def inside_a_batch() -> int | None:
            # Read first: if a batch is open just after, its commit will count beyond this.
            processed = h.record()["processed"]
            return processed if h.in_transaction(runner) else None

        before = wait_for(inside_a_batch, "the runner to be inside a batch", procs=(runner,))
        runner.send(signum)
        assert runner.wait(timeout=60) == 3, runner.output()

    assert "canceled" in runner.stderr()
    assert "Traceback" not in runner.stderr()
    record = h.assert_prefix_migrated()
    assert record["state"] == "canceled"
    # The batch under way when the signal came was finished and committed, not thrown away,
    # and the runner stopped right after it.
    assert before < record["processed"] <= before + 2 * batch, (before, record)
    assert record["processed"] % batch == 0
    assert h.status()["state"] == "canceled"

    resumed = h.cli("run", NAME, timeout=90)
    assert resumed.returncode == 0, resumed.stderr
    h.assert_all_migrated_once(sources)


# Each of these commands takes well under a second on its own.
RESPONSIVE = 10


def test_commands_answer_while_a_runner_works_back_to_back(h):
    """status, a second run and cancel answer at once while a runner works with no pause.

    On SQLite they must not wait for the write lock the runner takes batch after batch: a writer
    waiting in SQLite's busy handler retries only every 100 ms and rarely hits the gap between
    two batches (a runner that keeps the lock for whole batches starves them until the run ends,
    or until the 30 s busy timeout and exit 4)."""
    h.seed(10_000)
    # About 50 s of work, batch after batch with no pause (and, under --json, no progress reads).
    runner = h.start(*run_args("--json"), env={"COUNTING_ROW_DELAY": "0.005"})
    wait_for(committed_by(h, runner, 0), "the runner to commit", procs=(runner,))

    status = h.cli("status", NAME, "--json", timeout=RESPONSIVE)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)[NAME]["state"] == "inProgress"

    second = h.cli(*run_args(), timeout=RESPONSIVE)
    assert second.returncode == 2 and f"pid {runner.pid}" in second.stderr, second.stderr

    cancel = h.cli("cancel", NAME, timeout=RESPONSIVE)
    assert cancel.returncode == 0 and "cancel requested" in cancel.stdout, cancel.stderr
    assert runner.wait(timeout=60) == 3, runner.output()
    h.assert_prefix_migrated()

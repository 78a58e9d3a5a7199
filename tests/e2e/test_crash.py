"""Crash safety: SIGKILL a real `backfill run` at random moments, restart, repeat, then finish,
on SQLite and on PostgreSQL (where the server rolls back the dead client's open batch and releases
its row locks; the next runner may wait for them briefly).

Each batch commits its rows and the cursor in one transaction, so whatever the moment of the kill,
the committed state is a clean prefix, and the final result is every row migrated exactly once
(`counter` == 1) with exact counters.
"""

from __future__ import annotations

import os
import random
import signal
import time
from contextlib import nullcontext

import pytest
from harness import NAME, AppTraffic, Harness, committed_by, kill_moment, wait_for

ROWS = 20_000
KILLS = 12
BATCH = 100
# Upper bound on the rate while killing (about 2,500 rows/s): 12 runs, each killed at most ~0.4 s
# after its first commit, stay well short of the 20,000 rows, so every kill lands mid-run.
SLOW = {"COUNTING_ROW_DELAY": "0.0004"}
MAX_WAIT_AFTER_COMMIT = 0.4


@pytest.fixture
def h(tmp_path, database_url):
    harness = Harness(tmp_path, database_url)
    yield harness
    harness.cleanup()


def test_random_sigkills_lose_nothing_and_apply_nothing_twice(h):
    seed = int(os.environ.get("CRASH_SEED") or time.time_ns() % 1_000_000)
    rng = random.Random(seed)
    context = f"(CRASH_SEED={seed})"
    sources = h.seed(ROWS, seed=seed)
    mid_transaction = 0
    processed_before = 0

    for kill in range(KILLS):
        # Every other run meets the application writing meanwhile: then the runner cannot use
        # anything it read ahead of a transaction, and calls the function (spending the row
        # delay) inside its batch transaction, where a kill must roll the whole batch back.
        with AppTraffic(h) if kill % 2 == 0 else nullcontext():
            proc = h.start("run", NAME, "--batch-size", str(BATCH), env=SLOW)
            # This runner has claimed the migration and committed at least one batch of its own.
            wait_for(
                committed_by(h, proc, processed_before),
                f"run #{kill} to commit a batch {context}",
                procs=(proc,),
            )
            # Under the app's traffic the kill waits to land inside a transaction; else at random.
            inside = kill_moment(h, proc, rng, kill % 2 == 0, MAX_WAIT_AFTER_COMMIT)
            assert proc.running(), f"run #{kill} ended before the kill {context}\n{proc.output()}"
            mid_transaction += inside
            proc.send(signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL

        record = h.assert_prefix_migrated()
        assert record["state"] == "inProgress", f"{record} {context}"
        assert 0 < record["processed"] < ROWS, f"kill #{kill} not mid-run: {record} {context}"
        assert record["processed"] > processed_before, context
        assert record["processed"] % BATCH == 0, f"a partial batch was committed {context}"
        assert max(r[3] for r in h.items()) <= 1, context
        processed_before = record["processed"]

    # Every kill under the traffic waited for a transaction, and was seen to land in one.
    assert mid_transaction >= KILLS // 2, f"{mid_transaction} kills inside a transaction {context}"

    final = h.cli("run", NAME, "--batch-size", str(BATCH), timeout=120)
    assert final.returncode == 0, final.stderr
    assert "success" in final.stdout

    h.assert_all_migrated_once(sources)
    status = h.status()
    assert status["state"] == "success"
    assert status["progress"] == {"processed": ROWS, "total": ROWS, "completed": True}
    assert status["changed"] == ROWS and status["skipped_errors"] == 0

    verify = h.cli("verify", NAME, "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr

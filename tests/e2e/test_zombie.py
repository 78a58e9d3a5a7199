"""A zombie runner: stopped long enough to lose its lease, taken over, then revived.

Runner A is frozen with SIGSTOP outside any transaction: a runner frozen inside its batch would
hold SQLite's write lock and block everyone, or on PostgreSQL hold its batch's row locks (and
the `_migrations` row), so that the takeover would only meet lock timeouts; neither is the case
under test. On PostgreSQL "outside" is read from pg_stat_activity: no session of A is active or
idle in a transaction.
Once its lease has expired, runner B takes the migration over. When A is revived it must notice it
lost the lease and exit without writing a single row or counter.
"""

from __future__ import annotations

import random
import signal
import time

import pytest
import sqlalchemy as sa
from harness import (
    HOST,
    NAME,
    Harness,
    Proc,
    committed_by,
    freeze_outside_transaction,
    process_state,
    wait_for,
)

LEASE = "1.5"
ROWS = 600
BATCH = "20"
SLOW = {"COUNTING_ROW_DELAY": "0.002"}


@pytest.fixture
def h(tmp_path, database_url):
    harness = Harness(tmp_path, database_url, env={"BACKFILL_LEASE_SECONDS": LEASE})
    yield harness
    harness.cleanup()


@pytest.mark.parametrize("takeover", ["finished", "holding"])
def test_revived_zombie_runner_commits_nothing(h, takeover):
    sources = h.seed(ROWS)
    a = h.start("run", NAME, "--batch-size", BATCH, "--pause", "0.3", env=SLOW)
    wait_for(committed_by(h, a, 2 * int(BATCH)), "runner A to commit batches", procs=(a,))
    freeze_outside_transaction(h, a)
    frozen = h.record()
    assert frozen is not None and 0 < frozen["processed"] < ROWS

    # A is alive but silent: once its heartbeat is older than the lease, it is interrupted.
    status = wait_for(
        lambda: (s := h.status())["state"] == "interrupted" and s,
        "A's lease to expire",
        interval=0.2,
    )
    assert status["runner"] == {"host": HOST, "pid": a.pid}
    assert a.running()  # stopped, not dead: only the lease says it is gone

    if takeover == "finished":
        b = h.cli("run", NAME, "--batch-size", BATCH, timeout=60)
        assert b.returncode == 0, b.stderr
        assert h.record()["state"] == "success"
    else:
        b = h.start("run", NAME, "--batch-size", BATCH, "--pause", "0.1", env=SLOW)
        wait_for(
            committed_by(h, b, frozen["processed"] + int(BATCH)),
            "runner B to take over and commit",
            procs=(b,),
        )
        # Freeze B too, so that nothing but A can write while A is revived.
        freeze_outside_transaction(h, b)
    taken = h.record()
    assert taken["generation"] > frozen["generation"]
    assert taken["processed"] > frozen["processed"]

    before = h.snapshot()
    a.send(signal.SIGCONT)
    code = a.wait(timeout=60)
    assert code == 2, a.output()
    assert "lost its lease" in a.stderr() and NAME in a.stderr(), a.output()
    assert "Traceback" not in a.stderr()
    assert h.snapshot() == before, "the revived runner wrote after losing its lease"

    if takeover == "holding":
        assert h.record()["runner_pid"] == b.pid
        b.send(signal.SIGCONT)
        assert b.wait(timeout=60) == 0, b.output()

    assert max(r[3] for r in h.items()) == 1
    h.assert_all_migrated_once(sources)
    final = h.status()
    assert final["state"] == "success" and final["runner"] is None


def _migrations_row_locked(h: Harness) -> bool:
    """PostgreSQL: some session holds the lock on the migration's `_migrations` row."""
    with h.engine.connect() as conn:
        try:
            with conn.begin():
                conn.execute(
                    sa.text("SELECT 1 FROM _migrations WHERE name = :name FOR UPDATE NOWAIT"),
                    {"name": NAME},
                )
        except sa.exc.OperationalError as error:
            if getattr(error.orig, "sqlstate", None) == "55P03":
                return True
            raise
    return False


def freeze_inside_a_batch(h: Harness, proc: Proc, timeout: float = 30) -> None:
    """PostgreSQL: SIGSTOP `proc` while its batch holds row locks but not yet the `_migrations`
    row (it was deciding: the function runs between the locking read and the bookkeeping)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.running(), proc.output()
        proc.send(signal.SIGSTOP)
        wait_for(lambda: process_state(proc.pid) == "T", f"pid {proc.pid} to stop", timeout=10)
        if h.in_transaction(proc) and not _migrations_row_locked(h):
            return
        proc.send(signal.SIGCONT)
        time.sleep(random.uniform(0.005, 0.03))
    raise AssertionError(f"could not stop pid {proc.pid} inside a batch\n{proc.output()}")


def test_zombie_frozen_holding_row_locks_neither_blocks_forever_nor_writes(tmp_path, postgres_url):
    """On PostgreSQL a runner frozen inside a batch keeps its rows locked. A takeover waits for
    them only `lock_timeout` at a time, retries a bounded number of times and ends `failed` with
    the cause (exit 4) instead of hanging; the revived zombie still commits nothing; the next run
    finishes the work exactly once."""
    h = Harness(tmp_path, postgres_url, env={"BACKFILL_LEASE_SECONDS": LEASE})
    try:
        sources = h.seed(ROWS)
        a = h.start("run", NAME, "--batch-size", BATCH, env={"COUNTING_ROW_DELAY": "0.005"})
        wait_for(committed_by(h, a, 2 * int(BATCH)), "runner A to commit batches", procs=(a,))
        freeze_inside_a_batch(h, a)
        frozen = h.record()
        wait_for(lambda: h.status()["state"] == "interrupted", "A's lease to expire", interval=0.2)

        impatient = {
            "BACKFILL_LOCK_TIMEOUT": "0.3",
            "BACKFILL_RETRIES": "2",
            "BACKFILL_RETRY_DELAY": "0.05",
        }
        b = h.cli("run", NAME, "--batch-size", BATCH, env=impatient, timeout=60)
        assert b.returncode == 4, b.stdout + b.stderr
        assert "lock timeout" in b.stderr and "Traceback" not in b.stderr, b.stderr
        taken = h.record()
        assert taken["state"] == "failed" and taken["generation"] > frozen["generation"]
        assert taken["processed"] == frozen["processed"]

        before = h.snapshot()
        a.send(signal.SIGCONT)
        assert a.wait(timeout=60) == 2, a.output()
        assert "lost its lease" in a.stderr(), a.output()
        assert h.snapshot() == before, "the revived runner wrote after losing its lease"

        c = h.cli("run", NAME, "--batch-size", BATCH, timeout=60)
        assert c.returncode == 0, c.stdout + c.stderr
        h.assert_all_migrated_once(sources)
    finally:
        h.cleanup()

"""Many workers on one migration, as users run them: real `backfill worker` and `backfill run
--workers N` processes on one database, killed, frozen, canceled and failed, then every row
checked against the test's own expectation.

The app is apps.counting's `logged`: every migrated row's `counter` goes up by one and its
function writes one `item_log` row through its Context, so a row done twice, or a side effect
applied twice, shows.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from typing import Any

import pytest
from harness import (
    NAME,
    Harness,
    Proc,
    expected_derived,
    freeze_outside_transaction,
    kill_moment,
    logged_once,
    shard_holders,
    wait_for,
)

from apps.counting import logged
from backfill import Runner

LOGGED = "apps.counting:logged"


def harness(tmp_path: Any, url: str, **env: str) -> Harness:
    return Harness(tmp_path, url, env=env, app=LOGGED)


def assert_every_row_once(h: Harness, sources: dict[int, str]) -> dict[str, Any]:
    """Every row holds what the test expects, migrated once, logged once, and the status's
    counters (summed over the shards) are exact; the status."""
    rows = h.items()
    assert [r[0] for r in rows] == sorted(sources)
    wrong = [r for r in rows if r[2] != expected_derived(sources[r[0]]) or r[3] != 1]
    assert not wrong, f"{len(wrong)} rows wrong, e.g. {wrong[:5]}"
    logged_once(h)
    status = h.status()
    assert status["state"] == "success", status
    assert status["progress"] == {
        "processed": len(sources),
        "total": len(sources),
        "completed": True,
    }
    assert status["changed"] == len(sources) and status["skipped_errors"] == 0, status
    assert status["workers"] == 0 and status["runner"] is None, status
    assert status["shards"] and all(s["state"] == "done" for s in status["shards"]), status
    return status


def assert_nothing_twice(h: Harness) -> int:
    """No row was migrated or logged twice so far; how many rows are migrated."""
    rows = h.items()
    assert max(r[3] for r in rows) <= 1
    twice = h.query("SELECT item_id FROM item_log GROUP BY item_id HAVING COUNT(*) > 1")
    assert not twice, twice[:5]
    return sum(r[3] for r in rows)


def finish(h: Harness, procs: list[Proc], *extra: str, timeout: float = 120) -> None:
    """Wait for the workers still running; they exit 0 (the run succeeded, or others finish
    it); then, if the run is not done (its last workers were killed: a new worker then
    resumes it as a run of its own), one more worker finishes it."""
    for proc in procs:
        if proc.running():
            assert proc.wait(timeout) == 0, proc.output()
    if h.status()["state"] != "success":
        final = h.cli("worker", NAME, "--batch-size", "50", *extra, timeout=timeout)
        assert final.returncode == 0, final.stdout + final.stderr


# -- SIGKILL ------------------------------------------------------------------------------------

ROWS = 12_000
KILLS = 10
SLOW = {"COUNTING_ROW_DELAY": "0.002"}  # about 500 rows/s a worker: the run outlives the kills


@pytest.mark.parametrize("server", ["postgres_url", "mariadb_url"])
def test_sigkilled_workers_are_replaced_and_every_row_is_done_once(tmp_path, request, server):
    """A 4-worker run; ten times a random worker holding a shard is SIGKILLed (inside a
    transaction where it can be seen) and a new worker joins late; the others take its shard
    over at once (its process is gone, on this host). In the end every row and every Context
    side effect is there exactly once, with exact counters and one `success`."""
    h = harness(tmp_path, request.getfixturevalue(server))
    seed = int(os.environ.get("CRASH_SEED") or time.time_ns() % 1_000_000)
    rng = random.Random(seed)
    context = f"(CRASH_SEED={seed})"
    try:
        sources = h.seed(ROWS, seed=seed)
        events = tmp_path / "events.jsonl"
        worker = ("worker", NAME, "--batch-size", "50", "--events", str(events))
        workers = [h.start(*worker, env=SLOW) for _ in range(4)]
        inside = 0
        for kill in range(KILLS):
            live = {w.pid: w for w in workers if w.running()}
            held = wait_for(
                lambda live=live: [live[p] for p in shard_holders(h) if p in live],
                f"a worker to hold a shard before kill #{kill} {context}",
            )
            victim = rng.choice(held)
            inside += kill_moment(h, victim, rng, True, 0.3)
            victim.send(signal.SIGKILL)
            assert victim.wait() == -signal.SIGKILL
            status = h.status()
            assert status["state"] == "inProgress", f"kill #{kill}: {status} {context}"
            assert_nothing_twice(h)  # (the others go on committing: counters are checked last)
            assert 0 < status["progress"]["processed"] < ROWS, f"kill #{kill} {context}"
            workers.append(h.start(*worker, env=SLOW))
        assert inside >= KILLS // 2, f"{inside} kills inside a transaction {context}"
        finish(h, workers, "--events", str(events))
        assert_every_row_once(h, sources)
        # One `success`: one transition, by whichever worker got there.
        ended = [
            e
            for e in map(json.loads, events.read_text().splitlines())
            if e["event"] == "state" and e["to"] == "success"
        ]
        assert len(ended) == 1, ended
    finally:
        h.cleanup()


# -- a zombie worker ----------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["sqlite", "postgres_url", "mariadb_url"])
def test_a_frozen_worker_loses_its_shard_and_commits_nothing_when_revived(
    tmp_path, request, server
):
    url = (
        f"sqlite:///{tmp_path / 'chat.db'}"
        if server == "sqlite"
        else request.getfixturevalue(server)
    )
    h = harness(tmp_path, url, BACKFILL_LEASE_SECONDS="1.5")
    try:
        sources = h.seed(800)
        slow = {"COUNTING_ROW_DELAY": "0.002"}
        a = h.start("worker", NAME, "--batch-size", "10", "--pause", "0.2", env=slow)
        held = wait_for(lambda: shard_holders(h).get(a.pid), "A to hold a shard", procs=(a,))
        wait_for(
            lambda: (
                h.query(
                    "SELECT processed FROM _migration_shards WHERE migration = :n AND id = :i",
                    {"n": NAME, "i": held},
                )[0][0]
                > 0
            ),
            "A to commit a batch of its shard",
            procs=(a,),
        )
        c = h.start("worker", NAME, "--batch-size", "10", "--pause", "0.05", env=slow)
        freeze_outside_transaction(h, a)
        (frozen,) = h.query(
            "SELECT generation, processed FROM _migration_shards WHERE migration = :n AND id = :i",
            {"n": NAME, "i": held},
        )
        # A's heartbeat stops; once it is older than the lease, C takes A's shard over.
        wait_for(
            lambda: shard_holders(h).get(c.pid) == held, "C to take over A's shard", procs=(c,)
        )
        freeze_outside_transaction(h, c)
        (taken,) = h.query(
            "SELECT generation, processed FROM _migration_shards WHERE migration = :n AND id = :i",
            {"n": NAME, "i": held},
        )
        assert taken[0] > frozen[0]
        before = h.snapshot(), h.query("SELECT * FROM _migration_shards ORDER BY id")

        a.send(signal.SIGCONT)
        assert a.wait(60) == 2, a.output()
        assert "lost its lease" in a.stderr() and "Traceback" not in a.stderr(), a.output()
        after = h.snapshot(), h.query("SELECT * FROM _migration_shards ORDER BY id")
        assert after == before, "the revived worker wrote after losing its shard"

        c.send(signal.SIGCONT)
        assert c.wait(60) == 0, c.output()
        assert_every_row_once(h, sources)
    finally:
        h.cleanup()


# -- cancel, failure, refusals ------------------------------------------------------------------


def test_cancel_stops_every_worker_and_the_next_run_resumes_every_shard(tmp_path, postgres_url):
    h = harness(tmp_path, postgres_url)
    try:
        sources = h.seed(6_000)
        run = h.start("run", NAME, "--workers", "4", "--batch-size", "50", env=SLOW)
        wait_for(
            lambda: (s := h.status())["workers"] == 4 and s["progress"]["processed"] > 400,
            "four workers at work",
            procs=(run,),
        )
        canceled = h.cli("cancel", NAME)
        assert canceled.returncode == 0, canceled.stderr
        assert run.wait(60) == 3, run.output()
        status = h.status()
        assert status["state"] == "canceled" and status["workers"] == 0, status
        # Unfinished shards are pending, with their cursors kept.
        assert {s["state"] for s in status["shards"]} <= {"pending", "done"}, status["shards"]
        assert all(s["runner"] is None for s in status["shards"])
        done = assert_nothing_twice(h)
        assert status["progress"]["processed"] == done < len(sources)
        kept = {s["id"]: s["cursor"] for s in status["shards"] if s["cursor"] is not None}
        assert kept

        again = h.cli("run", NAME, "--workers", "2", "--batch-size", "50", timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
        final = assert_every_row_once(h, sources)
        assert len(final["shards"]) >= len(status["shards"])  # the same plan (and splits)
    finally:
        h.cleanup()


def test_a_row_failure_in_one_shard_stops_the_others_and_keeps_its_error(tmp_path, postgres_url):
    h = harness(tmp_path, postgres_url)
    try:
        h.seed(6_000)
        h.execute("UPDATE items SET source = 'bad:row' WHERE id = 4100")
        run = h.cli("run", NAME, "--workers", "4", "--batch-size", "50", env=SLOW, timeout=120)
        assert run.returncode == 1, run.stdout + run.stderr
        assert "4100" in run.stderr and "source" in run.stderr, run.stderr
        status = h.status()
        assert status["state"] == "failed" and status["workers"] == 0, status
        assert status["error"]["row_id"] == 4100 and status["error"]["field"] == "source"
        assert all(s["runner"] is None for s in status["shards"]), status["shards"]
        done = assert_nothing_twice(h)
        # The others stopped after their batch: most rows were never reached.
        assert status["progress"]["processed"] == done < 6_000 - 1_000, status
        bad = h.query("SELECT derived, counter FROM items WHERE id = 4100")
        assert tuple(bad[0]) == (None, 0)
    finally:
        h.cleanup()


def test_run_and_reset_are_refused_while_workers_hold_the_migration(tmp_path, postgres_url):
    h = harness(tmp_path, postgres_url)
    try:
        sources = h.seed(3_000)
        workers = [h.start("worker", NAME, "--batch-size", "50", env=SLOW) for _ in range(2)]
        holders = wait_for(
            lambda: len(found := shard_holders(h)) == 2 and found, "two workers holding shards"
        )
        refused = h.cli("run", NAME)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "live worker" in refused.stderr, refused.stderr
        assert all(str(pid) in refused.stderr for pid in holders), refused.stderr
        reset = h.cli("reset", NAME, "--yes")
        assert reset.returncode == 2 and "live worker" in reset.stderr, reset.stderr
        # Another worker joins the same run instead.
        late = h.start("worker", NAME, "--batch-size", "50", env=SLOW)
        finish(h, [*workers, late])
        assert_every_row_once(h, sources)
        runs = h.query("SELECT COUNT(*) FROM _migration_runs WHERE migration = :n", {"n": NAME})
        assert runs[0][0] == 1
    finally:
        h.cleanup()


def test_a_worker_with_nothing_to_claim_splits_the_largest_shard_under_load(tmp_path, postgres_url):
    h = harness(tmp_path, postgres_url)
    try:
        sources = h.seed(4_000)
        Runner(postgres_url, logged).begin(NAME, 1, batch_size=20)  # a plan of 4 shards
        first = [h.start("worker", NAME, "--batch-size", "20", env=SLOW) for _ in range(4)]
        wait_for(lambda: len(shard_holders(h)) == 4, "four workers, one shard each")
        fifth = h.start("worker", NAME, "--batch-size", "20", env=SLOW)
        wait_for(
            lambda: shard_holders(h).get(fifth.pid, -1) >= 4,
            "the fifth worker to split a shard and take its tail",
            procs=(fifth,),
        )
        shards = h.query(
            "SELECT id, lo, hi FROM _migration_shards WHERE migration = :n ORDER BY id",
            {"n": NAME},
        )
        bounds = [
            (json.loads(lo)[0] if lo else 0, json.loads(hi)[0] if hi else None)
            for _, lo, hi in shards
        ]
        # Still a partition of the keys: every key in exactly one shard.
        ranges = sorted(bounds, key=lambda b: b[0])
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False)), ranges
        finish(h, [*first, fifth])
        assert_every_row_once(h, sources)
    finally:
        h.cleanup()


def test_run_with_workers_on_sqlite_runs_one_and_says_so(tmp_path):
    h = harness(tmp_path, f"sqlite:///{tmp_path / 'chat.db'}")
    try:
        sources = h.seed(2_000)
        done = h.cli("run", NAME, "--workers", "4", "--batch-size", "50")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "running one worker" in done.stderr, done.stderr
        status = assert_every_row_once(h, sources)
        assert len(status["shards"]) == 4  # 4 x 1 worker
    finally:
        h.cleanup()


def test_status_json_shows_shards_as_the_contract_says(tmp_path, postgres_url):
    h = harness(tmp_path, postgres_url)
    try:
        h.seed(2_000)
        worker = h.start("worker", NAME, "--batch-size", "20", env=SLOW)
        wait_for(lambda: shard_holders(h).get(worker.pid) is not None, "a held shard")
        status = wait_for(lambda: (s := h.status())["progress"]["processed"] > 0 and s, "progress")
        assert status["workers"] == 1
        assert status["runner"] == {"host": os.uname().nodename, "pid": worker.pid}
        shard = next(s for s in status["shards"] if s["state"] == "inProgress")
        assert set(shard) == {
            "id", "range", "cursor", "state", "runner", "processed", "changed", "heartbeat_at"
        }  # fmt: skip
        assert shard["runner"] == {"host": os.uname().nodename, "pid": worker.pid}
        assert status["shards"][0]["range"][0] is None and status["shards"][-1]["range"][1] is None
        table = h.cli("status", NAME, "--shards")
        assert table.returncode == 0 and "16 shards" in table.stdout, table.stdout
        # Killed while it holds a shard: frozen first, so that it cannot let its shard go
        # between the look and the kill (a worker between two shards is, by design, in
        # progress for a lease's time: the next step of a job queue may follow).
        while True:
            worker.send(signal.SIGSTOP)
            if shard_holders(h).get(worker.pid) is not None:
                break
            worker.send(signal.SIGCONT)
            time.sleep(0.02)
        worker.send(signal.SIGKILL)
        worker.wait()
        # Its process is gone, on this host: seen at once.
        after = h.status()
        assert after["state"] == "interrupted" and after["workers"] == 0, after
        assert any(s["state"] == "interrupted" for s in after["shards"]), after["shards"]
    finally:
        h.cleanup()


def test_a_worker_with_nothing_to_take_says_so_or_waits_for_the_end(tmp_path, postgres_url):
    """A run of one shard (its range holds fewer than 16 batches), too small to split: a second
    worker exits at once (0, others are finishing it); one with --wait exits when the run ends,
    with its outcome."""
    h = harness(tmp_path, postgres_url)
    try:
        sources = h.seed(150)
        slow = {"COUNTING_ROW_DELAY": "0.01"}  # 1.5 s in all
        first = h.start("worker", NAME, "--batch-size", "50", env=slow)
        wait_for(lambda: shard_holders(h).get(first.pid) is not None, "the one shard held")
        waiting = h.start("worker", NAME, "--batch-size", "50", "--wait")
        idle = h.cli("worker", NAME, "--batch-size", "50")
        assert idle.returncode == 0 and "nothing left to take" in idle.stdout, idle.stdout
        assert first.running() and waiting.running()
        assert first.wait(60) == 0 and waiting.wait(60) == 0, waiting.output()
        assert "success" in waiting.stdout(), waiting.output()
        assert_every_row_once(h, sources)
    finally:
        h.cleanup()


def test_a_signal_stops_one_worker_and_the_last_one_cancels_the_run(tmp_path, postgres_url):
    """SIGTERM to one of two workers: it ends its batch, lets its shard go (exit 3) and the
    other finishes the run. SIGTERM to a lone worker: the run is canceled, as for `run`."""
    h = harness(tmp_path, postgres_url)
    try:
        sources = h.seed(1_500)
        a, b = (h.start("worker", NAME, "--batch-size", "50", env=SLOW) for _ in range(2))
        held = wait_for(lambda: shard_holders(h).get(a.pid), "A to hold a shard", procs=(a,))
        wait_for(lambda: b.pid in shard_holders(h), "B to hold a shard", procs=(b,))
        a.send(signal.SIGTERM)
        assert a.wait(60) == 3, a.output()
        assert "this worker stopped" in a.stderr(), a.output()
        (let_go,) = h.query(
            "SELECT state, runner_pid, cursor FROM _migration_shards WHERE migration = :n "
            "AND id = :i",
            {"n": NAME, "i": held},
        )
        assert let_go[1] != a.pid and let_go[0] in ("pending", "inProgress", "done"), let_go
        assert b.wait(120) == 0, b.output()
        assert_every_row_once(h, sources)

        h.seed(1_500, seed=1)
        lone = h.start("worker", NAME, "--batch-size", "50", "--restart", env=SLOW)
        wait_for(lambda: shard_holders(h).get(lone.pid) is not None, "a lone worker at work")
        lone.send(signal.SIGTERM)
        assert lone.wait(60) == 3, lone.output()
        status = h.status()
        assert status["state"] == "canceled" and status["workers"] == 0, status
    finally:
        h.cleanup()


def test_run_with_workers_restarts_a_finished_run_once(tmp_path, postgres_url):
    """`run --workers N --restart`: the run starts over here, once; its workers join it."""
    h = harness(tmp_path, postgres_url)
    try:
        sources = h.seed(1_500)
        first = h.cli("run", NAME, "--workers", "2", "--batch-size", "50")
        assert first.returncode == 0, first.stdout + first.stderr
        again = h.cli("run", NAME, "--workers", "2", "--batch-size", "50", "--restart")
        assert again.returncode == 0, again.stdout + again.stderr
        assert_nothing_twice(h)
        assert all(r[2] == expected_derived(sources[r[0]]) for r in h.items())
        status = h.status()  # every row was done before: processed again, changed by none
        assert (status["state"], status["progress"]["processed"], status["changed"]) == (
            "success",
            1_500,
            0,
        )
        runs = h.query("SELECT COUNT(*) FROM _migration_runs WHERE migration = :n", {"n": NAME})
        assert runs[0][0] == 2
    finally:
        h.cleanup()

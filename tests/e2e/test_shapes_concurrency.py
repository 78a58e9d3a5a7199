"""Several processes around a composite-key migration and a cross-table copy (apps.shapes): a
second runner, a killed runner, a zombie runner; on every dialect of `database_url`.

The copy's function logs each call in `copy_events` through the batch's connection, with the
runner's pid: which process committed which batch is read from there, so a runner that was
refused, or revived after losing its lease, is seen to have committed nothing.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from typing import Any

import pytest
from harness import (
    HOST,
    Proc,
    committed_by,
    freeze_outside_transaction,
    pid_exited_unreaped,
    wait_for,
)
from test_shapes_crash import (
    ShapesHarness,
    assert_copy_all_once,
    assert_copy_prefix,
    assert_pairs_all_once,
    assert_pairs_prefix,
    expected_pair,
)

from apps.shapes import COPY, PAIRS

BATCH = 100
# 2 ms a row, 500 rows/s at most: a run of 2,000 rows lasts seconds.
SLOW = {"SHAPES_ROW_DELAY": "0.002"}
ROWS = 2_000
# A pause between batches, so that on SQLite other commands get the write lock between batches.
PAUSED = ("--pause", "0.15")
PAUSED_ROWS = 1_000

both = pytest.mark.parametrize("migration", [PAIRS, COPY])


@pytest.fixture
def h(tmp_path, database_url):
    # A long lease: what these tests see as interrupted, they see through the pid, not the clock.
    harness = ShapesHarness(tmp_path, database_url, env={"BACKFILL_LEASE_SECONDS": "60"})
    yield harness
    harness.cleanup()


def seed(h: ShapesHarness, migration: str, count: int) -> Any:
    h.name = migration
    return h.seed_pairs(count) if migration == PAIRS else h.seed_notes(count)


def assert_all_once(h: ShapesHarness, migration: str, sources: Any) -> None:
    if migration == PAIRS:
        assert_pairs_all_once(h, sources)
    else:
        assert_copy_all_once(h, sources)


def assert_prefix(h: ShapesHarness, migration: str, sources: Any) -> dict[str, Any]:
    if migration == PAIRS:
        return assert_pairs_prefix(h, sources)
    return assert_copy_prefix(h, sources)


def events_by_pid(h: ShapesHarness) -> Counter[int]:
    return Counter(pid for _id, _note, pid in h.events())


def run_args(migration: str, *extra: str, batch: int = BATCH) -> tuple[str, ...]:
    return ("run", migration, "--batch-size", str(batch), *extra)


@both
def test_second_runner_is_refused_at_once_naming_the_holder(h, migration):
    sources = seed(h, migration, PAUSED_ROWS)
    first = h.start(*run_args(migration, *PAUSED), env=SLOW)
    held = wait_for(committed_by(h, first, 0), "the first runner to commit", procs=(first,))

    second = h.cli(*run_args(migration), timeout=60)

    assert second.returncode == 2, second.stdout + second.stderr
    assert f"host {HOST}" in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
    assert migration in second.stderr
    assert "Traceback" not in second.stderr
    # The refused runner took nothing: the first still owns the same generation.
    now = h.record()
    assert now is not None
    assert (now["runner_pid"], now["generation"]) == (first.pid, held["generation"])

    assert first.wait(timeout=90) == 0, first.output()
    assert_all_once(h, migration, sources)
    if migration == COPY:
        # Every batch was committed by the first runner: the refused one called nothing.
        assert events_by_pid(h) == {first.pid: PAUSED_ROWS}


@both
def test_killed_runner_is_interrupted_and_a_new_run_resumes_from_the_cursor(h, migration):
    sources = seed(h, migration, ROWS)
    victim = h.start(*run_args(migration), env=SLOW)
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

    record = assert_prefix(h, migration, sources)
    cursor = record["cursor"]
    if migration == PAIRS:
        # Undo the first row behind the cursor: a run that resumes from the cursor never reads
        # it again, a run that started over would migrate it a second time (counter 2).
        first = h.pairs()[0]
        h.execute(
            "UPDATE pairs SET derived = NULL WHERE chat_id = :c AND seq = :s",
            {"c": first[0], "s": first[1]},
        )
    # (The copy: a run that started over would call the function again on the rows behind the
    # cursor, and log a second event for each.)

    resumed = h.cli(*run_args(migration), timeout=90)
    assert resumed.returncode == 0, resumed.stderr

    final = h.record()
    assert final is not None
    assert (final["state"], final["processed"], final["total"]) == ("success", ROWS, ROWS)
    assert final["changed"] == ROWS  # counters carried over from the killed run
    assert final["generation"] > record["generation"] and final["cursor"] != cursor

    if migration == PAIRS:
        rows = h.pairs()
        assert {(r[0], r[1]): r[4] for r in rows} == sources
        assert rows[0] == (first[0], first[1], None, 1, first[4]), "the resumed run went back"
        wrong = [r for r in rows[1:] if r[2] != expected_pair(r[0], r[1], r[4]) or r[3] != 1]
        assert not wrong, wrong[:5]
        # The undone row stays undone: it is what verify must find (a composite key is
        # listed as its values).
        missing: Any = [first[0], first[1]]
    else:
        assert_copy_all_once(h, sources)
        by_pid = events_by_pid(h)
        assert by_pid[victim.pid] == record["processed"], by_pid
        assert sum(by_pid.values()) == ROWS
        # A target row gone missing is what verify reports for a copy.
        missing = 1
        h.execute("DELETE FROM notes_copy WHERE note_id = 1")

    # verify is not blind: the one row left to do is found, by its key.
    verify = h.cli("verify", migration, "--json")
    assert verify.returncode == 1, verify.stdout + verify.stderr
    found = json.loads(verify.stdout)[migration]
    assert found["remaining"] == 1, found
    assert found["sample_ids"] == [missing], found


# -- the zombie --------------------------------------------------------------------------------

LEASE = "1.5"
ZOMBIE_ROWS = 400
ZOMBIE_BATCH = 20


def snapshot(h: ShapesHarness, migration: str) -> tuple[Any, ...]:
    """Everything a runner of `migration` could write."""
    if migration == PAIRS:
        return h.pairs(), h.record()
    return h.notes(), h.copies(), h.events(), h.record()


@pytest.fixture
def zh(tmp_path, database_url):
    harness = ShapesHarness(tmp_path, database_url, env={"BACKFILL_LEASE_SECONDS": LEASE})
    yield harness
    harness.cleanup()


@pytest.mark.parametrize(
    ("migration", "takeover"),
    [(COPY, "finished"), (COPY, "holding"), (PAIRS, "holding")],
)
def test_revived_zombie_runner_commits_nothing(zh, migration, takeover):
    h = zh
    sources = seed(h, migration, ZOMBIE_ROWS)
    batch = str(ZOMBIE_BATCH)
    a = h.start("run", migration, "--batch-size", batch, "--pause", "0.3", env=SLOW)
    wait_for(committed_by(h, a, 2 * ZOMBIE_BATCH), "runner A to commit batches", procs=(a,))
    freeze_outside_transaction(h, a)
    frozen = h.record()
    assert frozen is not None and 0 < frozen["processed"] < ZOMBIE_ROWS

    # A is alive but silent: once its heartbeat is older than the lease, it is interrupted.
    status = wait_for(
        lambda: (s := h.status())["state"] == "interrupted" and s,
        "A's lease to expire",
        interval=0.2,
    )
    assert status["runner"] == {"host": HOST, "pid": a.pid}
    assert a.running()  # stopped, not dead: only the lease says it is gone

    b: Proc | None = None
    if takeover == "finished":
        done = h.cli("run", migration, "--batch-size", batch, timeout=60)
        assert done.returncode == 0, done.stderr
        assert h.record()["state"] == "success"
    else:
        b = h.start("run", migration, "--batch-size", batch, "--pause", "0.1", env=SLOW)
        wait_for(
            committed_by(h, b, frozen["processed"] + ZOMBIE_BATCH),
            "runner B to take over and commit",
            procs=(b,),
        )
        # Freeze B too, so that nothing but A can write while A is revived.
        freeze_outside_transaction(h, b)
    taken = h.record()
    assert taken["generation"] > frozen["generation"]
    assert taken["processed"] > frozen["processed"]

    before = snapshot(h, migration)
    a.send(signal.SIGCONT)
    code = a.wait(timeout=60)
    assert code == 2, a.output()
    assert "lost its lease" in a.stderr() and migration in a.stderr(), a.output()
    assert "Traceback" not in a.stderr()
    assert snapshot(h, migration) == before, "the revived runner wrote after losing its lease"

    if b is not None:
        assert h.record()["runner_pid"] == b.pid
        b.send(signal.SIGCONT)
        assert b.wait(timeout=60) == 0, b.output()

    assert_all_once(h, migration, sources)
    final = h.status()
    assert final["state"] == "success" and final["runner"] is None
    if migration == COPY:
        # A's events are those of the batches it committed before it was frozen, no more.
        by_pid = events_by_pid(h)
        assert by_pid[a.pid] == frozen["processed"], (by_pid, frozen)
        if b is not None:
            assert by_pid == {a.pid: frozen["processed"], b.pid: ZOMBIE_ROWS - frozen["processed"]}

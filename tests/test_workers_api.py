"""Runs with a plan through the Python API, in one process: the shards' status machine, how a
run with workers is observed, steps of a job queue, and how `run`, `--restart` and `reset`
treat a plan. (Processes racing, killed and frozen: tests/e2e/test_workers*.py.)"""

from __future__ import annotations

import itertools
import json
import time

import pytest
import sqlalchemy as sa

from apps.counting import NAME, create_items, logged, migrations
from backfill import Runner
from backfill.errors import LeaseHeld
from backfill.lease import observed_state
from backfill.state import SHARD_TRANSITIONS, ShardState, State, TransitionRefused, check_shard
from backfill.store import shards
from backfill.store.records import Record
from backfill.store.shards import ShardRecord
from backfill.types import Identity, Liveness
from support import after_each_batch

ROWS = 2_000


@pytest.fixture
def url(database_url):
    engine = sa.create_engine(database_url)
    create_items(engine, ROWS)
    engine.dispose()
    return database_url


def counters(url: str) -> tuple[int, int, int]:
    """(rows, rows migrated once, rows migrated more than once)."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        found = conn.execute(
            sa.text(
                "SELECT COUNT(*), SUM(CASE WHEN counter = 1 THEN 1 ELSE 0 END), "
                "SUM(CASE WHEN counter > 1 THEN 1 ELSE 0 END) FROM items"
            )
        ).one()
    engine.dispose()
    return int(found[0]), int(found[1] or 0), int(found[2] or 0)


# -- the shards' status machine ----------------------------------------------------------------

EXPECTED = {
    (ShardState.PENDING, ShardState.IN_PROGRESS),
    (ShardState.INTERRUPTED, ShardState.IN_PROGRESS),
    (ShardState.IN_PROGRESS, ShardState.DONE),
    (ShardState.IN_PROGRESS, ShardState.PENDING),
    (ShardState.INTERRUPTED, ShardState.PENDING),
    (ShardState.PENDING, ShardState.PENDING),
    (ShardState.IN_PROGRESS, ShardState.INTERRUPTED),
}


@pytest.mark.parametrize(
    ("source", "target"), list(itertools.product(ShardState, ShardState)), ids=str
)
def test_each_shard_state_pair_is_allowed_exactly_when_it_is_an_edge(source, target):
    assert set(SHARD_TRANSITIONS) == EXPECTED
    if (source, target) in EXPECTED:
        check_shard(source, target)
        assert SHARD_TRANSITIONS[(source, target)]  # every edge says when it happens
    else:
        with pytest.raises(TransitionRefused):
            check_shard(source, target)


def test_a_shard_write_from_a_stale_read_changes_nothing(url):
    runner = Runner(url, migrations)
    runner.begin(NAME, 1)
    here = Identity("host-a", 1)
    seen = Liveness(runner.clock(), 30.0, here, alive=lambda pid: True)
    with runner.db.write() as conn:
        [first, *_] = shards.load(conn, NAME)
        taken = shards.claim(conn, NAME, 1, here, seen)
        assert taken is not None and taken.id == first.id and taken.generation == 1
        # A second claimant that read the shard pending before: its compare-and-set misses.
        assert not shards.transition(
            conn, NAME, first, source=ShardState.PENDING, target=ShardState.IN_PROGRESS
        )
        # Its holder lets it go; a write at the old generation then changes nothing either.
        assert shards.let_go(conn, NAME, taken, 1.0)
        assert not shards.update_held(conn, NAME, first.id, taken.generation, cursor="[1]")
    runner.db.dispose()


# -- how a run with a plan is observed -----------------------------------------------------------

HERE = Identity("here", 100)
NOW = 1_000.0


def shard(state: str, **values: object) -> ShardRecord:
    row = {"id": 0, "state": state, "generation": 1, "runner_host": None, "runner_pid": None}
    row.update(heartbeat_at=None, released_at=None, lo=None, hi=None, cursor=None)
    row.update(values)
    return ShardRecord(row)


def record(*plan: ShardRecord, heartbeat_at: float | None = NOW - 60) -> Record:
    values = {"state": "inProgress", "heartbeat_at": heartbeat_at, "runner_host": "here"}
    values["runner_pid"] = 99  # the process that claimed the run
    return Record(values, plan)


def observed(found: Record, dead: frozenset[int] = frozenset()) -> State:
    return observed_state(found, NOW, 30.0, HERE, alive=lambda pid: pid not in dead)


def test_a_run_with_a_plan_is_in_progress_while_a_worker_holds_a_shard():
    held_here = shard("inProgress", runner_host="here", runner_pid=7, heartbeat_at=NOW - 1)
    held_there = shard("inProgress", runner_host="there", runner_pid=7, heartbeat_at=NOW - 1)
    assert observed(record(held_here)) is State.IN_PROGRESS
    # Its process gone, on this host: seen at once; on another host only its heartbeat tells.
    assert observed(record(held_here), dead=frozenset({7})) is State.INTERRUPTED
    assert observed(record(held_there), dead=frozenset({7})) is State.IN_PROGRESS
    stale = shard("inProgress", runner_host="there", runner_pid=7, heartbeat_at=NOW - 31)
    assert observed(record(stale, shard("pending"))) is State.INTERRUPTED


def test_a_shard_let_go_is_not_a_dead_one_for_the_lease_time():
    """Steps of a job queue, one after another: nothing is held between them."""
    released = shard("pending", released_at=NOW - 29)
    assert observed(record(released, shard("pending"))) is State.IN_PROGRESS
    long_ago = shard("pending", released_at=NOW - 31)
    assert observed(record(long_ago, shard("pending"))) is State.INTERRUPTED
    # Just claimed, before any worker took a shard: the claim's own heartbeat.
    assert observed(record(shard("pending"), heartbeat_at=NOW - 2)) is State.IN_PROGRESS
    assert observed(record(shard("pending"), heartbeat_at=NOW - 2), frozenset({99})) is (
        State.INTERRUPTED
    )


# -- steps --------------------------------------------------------------------------------------


def test_steps_drive_one_run_that_stays_in_progress_between_steps(url):
    runner = Runner(url, logged)
    seen: list[str] = []
    processed = 0
    for _ in range(300):
        step = runner.step(NAME, budget_seconds=0, batch_size=20)  # one batch a step
        processed += step.processed
        if not step.more:
            break
        seen.append(str(runner.status([NAME])[NAME].state))
        assert step.held_until is None and not step.done
    assert step.done and step.state is State.SUCCESS and not step.more
    assert len(seen) >= ROWS // 20 - 1 and set(seen) == {"inProgress"}
    assert processed == ROWS and counters(url) == (ROWS, ROWS, 0)
    status = runner.status([NAME])[NAME]
    assert (status.processed, status.changed, status.total) == (ROWS, ROWS, ROWS)
    with runner.db.read() as conn:
        runs = conn.execute(sa.text("SELECT COUNT(*) FROM _migration_runs")).scalar()
    assert runs == 1
    # A late duplicate step after the end changes nothing.
    late = runner.step(NAME, budget_seconds=1)
    assert (late.more, late.done, late.processed) == (False, True, 0)
    runner.db.dispose()


def test_a_late_step_does_not_undo_a_cancel(url):
    runner = Runner(url, migrations)
    runner.step(NAME, budget_seconds=0.05, batch_size=20)
    # Between two steps the run is in progress (a shard was let go just now): cancel it.
    assert runner.cancel(NAME) is True
    stopped = runner.step(NAME, budget_seconds=5, batch_size=20)
    assert stopped.state is State.CANCELED and not stopped.more
    late = runner.step(NAME, budget_seconds=5)
    assert (late.state, late.more, late.processed) == (State.CANCELED, False, 0)
    resumed = runner.step(NAME, budget_seconds=5, batch_size=20, resume=True)
    assert resumed.state is State.IN_PROGRESS and resumed.processed > 0
    runner.db.dispose()


# -- run, --restart and reset over a plan ---------------------------------------------------------


def test_run_resumes_every_shard_of_a_run_with_a_plan_from_its_cursor(url):
    runner = Runner(url, migrations)
    stopper = Runner(url, migrations)
    # A worker canceled after its fifth batch: shards part done, cursors kept.
    calls = []

    def cancel_after_five(event: object) -> None:
        calls.append(event)
        if len(calls) == 5:
            stopper.cancel(NAME)

    first = runner.work(NAME, batch_size=20, listeners=[after_each_batch(cancel_after_five)])
    assert first.state is State.CANCELED and first.exit_code == 3
    assert 0 < first.status.processed < ROWS
    [again] = runner.run([NAME], batch_size=20)  # a plain `run` works the plan's shards
    assert again.state is State.SUCCESS and again.exit_code == 0
    assert counters(url) == (ROWS, ROWS, 0)
    status = runner.status([NAME])[NAME]
    assert (status.processed, status.changed) == (ROWS, ROWS)
    assert all(s.state is ShardState.DONE for s in status.shards)
    for db in (runner.db, stopper.db):
        db.dispose()


def test_restart_and_reset_drop_the_plan(url):
    runner = Runner(url, migrations)
    assert runner.work(NAME, batch_size=20).state is State.SUCCESS
    assert len(runner.status([NAME])[NAME].shards) == 16
    [plain] = runner.run([NAME], restart=True)
    status = runner.status([NAME])[NAME]
    assert plain.state is State.SUCCESS and status.shards == () and status.processed == ROWS
    runner.work(NAME, batch_size=20, restart=True)
    runner.reset(NAME)
    status = runner.status([NAME])[NAME]
    assert status.state is State.PENDING and status.shards == () and status.processed == 0
    runner.db.dispose()


def test_workers_resume_a_run_without_a_plan_after_its_cursor(url):
    runner = Runner(url, migrations)
    stopper = Runner(url, migrations)
    listener = after_each_batch(lambda event: stopper.cancel(NAME))
    [half] = runner.run([NAME], batch_size=300, listeners=[listener])
    assert half.state is State.CANCELED and half.status.processed == 300
    done = runner.work(NAME, batch_size=20)
    assert done.state is State.SUCCESS
    status = runner.status([NAME])[NAME]
    assert (status.processed, status.changed, status.total) == (ROWS, ROWS, ROWS)
    assert json.loads(json.dumps(status.to_json()))["shards"][0]["range"][0] == 300
    assert counters(url) == (ROWS, ROWS, 0)
    for db in (runner.db, stopper.db):
        db.dispose()


def test_a_worker_does_not_join_a_run_without_a_plan(url):
    runner = Runner(url, migrations)
    other = Runner(url, migrations)
    refused = []

    def try_to_join(event: object) -> None:
        if not refused:
            with pytest.raises(LeaseHeld) as held:
                other.work(NAME)
            refused.append(str(held.value))

    runner.run([NAME], batch_size=500, listeners=[after_each_batch(try_to_join)])
    assert refused and "live runner" in refused[0]
    for db in (runner.db, other.db):
        db.dispose()


def test_a_run_whose_last_worker_died_before_saying_success_ends_with_success(url):
    """Every shard done, the migration still stored in progress (its last worker was killed
    between its commit and the run's end): the next `run` ends it, redoing nothing."""
    runner = Runner(url, migrations)
    assert runner.work(NAME, batch_size=20).state is State.SUCCESS
    with runner.db.write() as conn:
        conn.execute(
            sa.text(
                "UPDATE _migrations SET state = 'inProgress', heartbeat_at = 1, "
                "finished_at = NULL, generation = generation + 1"
            )
        )
        conn.execute(sa.text("UPDATE _migration_shards SET released_at = 1"))  # long ago
    assert runner.status([NAME])[NAME].state is State.INTERRUPTED
    [result] = runner.run([NAME], batch_size=20)
    assert result.state is State.SUCCESS
    status = runner.status([NAME])[NAME]
    assert (status.processed, status.changed, status.total) == (ROWS, ROWS, ROWS)
    assert counters(url) == (ROWS, ROWS, 0)
    runner.db.dispose()


def test_steps_far_apart_stay_one_run_after_the_claim_is_older_than_the_lease(url):
    """Each step finishes its shard and lets it go; the next comes after a pause, long after
    the claim's own heartbeat: the run is still one, in progress between steps."""
    runner = Runner(url, migrations, lease_seconds=0.6)
    states = []
    for _ in range(40):
        step = runner.step(NAME, budget_seconds=10, batch_size=50)
        if not step.more:
            break
        time.sleep(0.15)
        states.append(str(runner.status([NAME])[NAME].state))
    assert step.done and len(states) >= 8 and set(states) == {"inProgress"}, states
    with runner.db.read() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM _migration_runs")).scalar() == 1
    runner.db.dispose()


def test_a_worker_gone_here_ends_the_grace_of_a_shard_let_go():
    """Let go a moment ago, but another shard is held by a worker whose process is gone on this
    host: the run is interrupted at once (it crashed; it did not pause between steps)."""
    released = shard("done", released_at=NOW - 1)
    dead = shard("inProgress", id=1, runner_host="here", runner_pid=7, heartbeat_at=NOW - 1)
    assert observed(record(released, dead), dead=frozenset({7})) is State.INTERRUPTED
    assert observed(record(released, dead)) is State.IN_PROGRESS

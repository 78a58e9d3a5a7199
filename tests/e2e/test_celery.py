"""backfill.integrations.celery end to end: two real `celery worker` processes (prefork pool,
one pool process each, so one step at a time) step the `apps.counting` migration over the real
RabbitMQ broker, on PostgreSQL. Each test has a queue of its own (purged first, deleted after),
so messages left by other runs never reach its workers. The broker down is a failure, never a
skip.

The workers run `apps.celery_app`; the test sends with its own app on the same queue, and reads
the database directly (and through an in-process Runner, for the observed state). The step's
error handling (a refusal, the database unreachable) runs in this process, through `apply()`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from harness import Harness, Proc, expected_derived, wait_for

from apps.celery_app import BUDGET_ENV, COUNTDOWN_ENV, DATABASE_ENV, QUEUE_ENV, make_app
from apps.counting import NAME, ROW_DELAY_ENV, migrations
from backfill import Runner, State
from backfill.integrations.celery import Steps, backfill_steps
from backfill.store.database import application_name
from support import cli_env

BUDGET = 0.3  # seconds a step runs batches: many steps per run
COUNTDOWN = 0.5  # before the next step when one found nothing to take
ENDED = f"backfill: {NAME!r} is "  # the adapter's log line when a chain of steps ends
RECEIVED = re.compile(r"Task backfill\.step\[([0-9a-f-]+)\] received")


@dataclass
class Cluster:
    """The test's queue, its sending app, and the worker processes it starts."""

    h: Harness
    queue: str
    app: Any
    steps: Steps
    watcher: Runner
    workers: list[Proc] = field(default_factory=list)

    def start_workers(self, count: int = 2, *, row_delay: float = 0.0) -> list[Proc]:
        """`count` celery workers on the queue, each one step at a time; returns once all are
        ready to take messages."""
        env = cli_env(
            **{
                DATABASE_ENV: self.h.url,
                QUEUE_ENV: self.queue,
                BUDGET_ENV: str(BUDGET),
                COUNTDOWN_ENV: str(COUNTDOWN),
                ROW_DELAY_ENV: str(row_delay),
            }
        )
        started = []
        for _ in range(count):
            n = len(self.h.procs)
            out, err = self.h.tmp_path / f"worker{n}.out", self.h.tmp_path / f"worker{n}.err"
            command = [
                sys.executable,
                "-m",
                "celery",
                "--app",
                "apps.celery_app",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                "1",
                "--queues",
                self.queue,
                "--hostname",
                f"worker{n}-{self.queue}@%h",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "INFO",
            ]
            with out.open("wb") as stdout, err.open("wb") as stderr:
                popen = subprocess.Popen(
                    command,
                    stdout=stdout,
                    stderr=stderr,
                    stdin=subprocess.DEVNULL,
                    cwd=self.h.tmp_path,
                    env=env,
                )
            proc = Proc(popen, out, err, command)
            self.h.procs.append(proc)  # killed and reaped by the harness's cleanup
            started.append(proc)
        for proc in started:
            wait_for(lambda p=proc: " ready." in p.stderr(), "a celery worker", procs=(proc,))
        self.workers.extend(started)
        return started

    def live(self) -> tuple[Proc, ...]:
        """The workers not killed by the test (one that exits by itself fails a wait)."""
        return tuple(w for w in self.workers if w.popen.returncode != -signal.SIGKILL)

    def state(self) -> State:
        return self.watcher.status([NAME])[NAME].state

    def wait_until(self, state: State, timeout: float = 30) -> list[State]:
        """Poll the observed state until it is `state`; returns every state seen on the way."""
        seen: list[State] = []

        def reached() -> bool:
            now = self.state()
            if not seen or seen[-1] is not now:
                seen.append(now)
            return now is state

        wait_for(reached, f"the migration to be {state}", timeout=timeout, procs=self.live())
        return seen

    def wait_chains_ended(self, chains: int) -> None:
        """Until the workers have logged the end of `chains` chains of steps (none in flight)."""
        wait_for(
            lambda: sum(p.stderr().count(ENDED) for p in self.workers) >= chains,
            f"{chains} chains of steps to end",
            procs=self.live(),
        )

    def runs(self) -> list[int]:
        """The ids of the migration's runs (its history's other rows are commands by hand)."""
        rows = self.h.query(
            "SELECT id FROM _migration_runs WHERE migration = :m AND kind = 'run'", {"m": NAME}
        )
        return sorted(r[0] for r in rows)

    def snapshot(self) -> tuple[Any, ...]:
        """Everything a step could write: the items, the migration's row, its shards, its runs."""
        shards = self.h.query("SELECT * FROM _migration_shards WHERE migration = :m", {"m": NAME})
        return (*self.h.snapshot(), sorted(map(tuple, shards)), self.runs())


@pytest.fixture
def h(tmp_path, postgres_url):
    harness = Harness(tmp_path, postgres_url)
    yield harness
    harness.cleanup()


@pytest.fixture
def cluster(h) -> Iterator[Cluster]:
    queue = f"backfill-test-{uuid.uuid4().hex[:12]}"
    app, steps = make_app(queue)
    declared = app.amqp.queues[queue]
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=3)  # the broker down fails the test
        bound = declared(conn.default_channel)
        bound.declare()
        bound.purge()
    watcher = Runner(h.url, migrations)
    try:
        yield Cluster(h, queue, app, steps, watcher)
    finally:
        h.cleanup()  # the workers first, so none holds the queue
        watcher.db.dispose()
        with app.connection_for_write() as conn:
            declared(conn.default_channel).delete()
        app.close()


def assert_migrated_once(c: Cluster, sources: dict[int, str]) -> None:
    """Every row holds what the test expects, changed exactly once (`counter` 1), the run
    ended with success, and its counters (summed over its shards) are exact."""
    rows = c.h.items()
    assert [r[0] for r in rows] == sorted(sources)
    wrong = [
        r for r in rows if r[1] != sources[r[0]] or r[2] != expected_derived(r[1]) or r[3] != 1
    ]
    assert not wrong, f"{len(wrong)} rows wrong, e.g. {wrong[:5]}"
    status = c.watcher.status([NAME])[NAME].to_json()
    assert status["state"] == "success", status
    progress = status["progress"]
    assert progress["processed"] == progress["total"] == status["changed"] == len(sources), status
    assert status["skipped_errors"] == 0, status


def inside_a_transaction(h: Harness, pid: int) -> bool:
    """A PostgreSQL session of process `pid` is in a transaction or running a statement (looked
    at twice, a moment apart, as Harness.in_transaction does)."""

    def busy() -> bool:
        sessions = h.query(
            "SELECT state FROM pg_stat_activity WHERE application_name = :name",
            {"name": application_name(pid)},
        )
        return any(state != "idle" for (state,) in sessions)

    if busy():
        return True
    time.sleep(0.05)
    return busy()


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_steps_alone_drive_a_migration_to_success_in_one_run(h, cluster):
    sources = h.seed(2_000)  # 16 shards of 125 rows
    workers = cluster.start_workers(2, row_delay=0.002)  # 0.2 s a batch: a shard a step or so

    cluster.steps.start(NAME, parallel=2)
    seen = cluster.wait_until(State.SUCCESS)

    # Between steps (no shard held) the run is in progress, never interrupted.
    assert seen[-2:] == [State.IN_PROGRESS, State.SUCCESS], seen
    assert set(seen) <= {State.PENDING, State.IN_PROGRESS, State.SUCCESS}, seen
    assert_migrated_once(cluster, sources)
    # One run: one row in `_migration_runs`, the one the migration names.
    record = h.record()
    assert record is not None
    assert cluster.runs() == [record["run_id"]]
    # Many steps, on both workers.
    cluster.wait_chains_ended(2)
    steps = [len(RECEIVED.findall(w.stderr())) for w in workers]
    assert all(n >= 2 for n in steps) and sum(steps) >= 16, steps


@pytest.mark.parametrize("killed", ["worker", "pool process"])
def test_a_step_killed_inside_a_batch_is_redelivered_and_every_row_changes_once(h, cluster, killed):
    """SIGKILL while a step's batch transaction is open. `worker`: the worker and its pool
    process, as when a machine dies: the broker gives the message, never acknowledged
    (acks_late), to the other worker. `pool process`: that process alone, as the OOM killer
    does: its worker puts the message back on the queue (reject_on_worker_lost)."""
    sources = h.seed(2_000)  # 16 shards of 125 rows
    a, b = cluster.start_workers(2, row_delay=0.002)  # a step: 0.25 s, mostly inside batches
    by_pid = {a.pid: a, b.pid: b}

    # One chain of steps: were the killed step's message lost, the run would stop.
    cluster.steps.start(NAME)

    def a_step_inside_a_batch() -> tuple[Proc, int, str] | None:
        if h.record() is None:  # backfill's tables are not there yet
            return None
        shards = h.query("SELECT state, runner_pid FROM _migration_shards")
        if sum(state == "done" for state, _ in shards) < 2:  # past the first (resuming) step
            return None
        for state, pid in shards:
            worker = by_pid.get(parent_of(pid)) if state == "inProgress" and pid else None
            if worker is not None:
                step = RECEIVED.findall(worker.stderr())[-1]  # read before: it is still running
                if inside_a_transaction(h, pid):
                    return worker, pid, step
        return None

    victim, pool_pid, killed_step = wait_for(
        a_step_inside_a_batch, "a step inside a batch", procs=(a, b)
    )
    if killed == "worker":
        victim.send(signal.SIGKILL)
        assert victim.wait() == -signal.SIGKILL
    os.kill(pool_pid, signal.SIGKILL)
    assert f"{killed_step}] succeeded" not in victim.stderr()

    cluster.wait_until(State.SUCCESS)

    received = {w.pid: RECEIVED.findall(w.stderr()) for w in (a, b)}
    if killed == "worker":
        survivor = b if victim is a else a
        assert killed_step in received[survivor.pid], survivor.stderr()
    else:
        assert sum(ids.count(killed_step) for ids in received.values()) == 2, received
    assert_migrated_once(cluster, sources)


def test_a_duplicate_step_after_success_changes_nothing(h, cluster):
    sources = h.seed(500)
    cluster.start_workers(2)
    cluster.steps.start(NAME, parallel=2)
    cluster.wait_until(State.SUCCESS)
    cluster.wait_chains_ended(2)
    before = cluster.snapshot()

    late = [cluster.steps.task.delay(NAME), *cluster.steps.start(NAME)]  # plain, and resuming
    results = [r.get(timeout=30) for r in late]

    assert [(r["state"], r["processed"], r["more"]) for r in results] == [
        ("success", 0, False)
    ] * 2, results
    assert cluster.snapshot() == before
    assert_migrated_once(cluster, sources)


def test_a_late_step_after_a_cancel_does_not_restart_the_run_and_start_resumes_it(h, cluster):
    sources = h.seed(1_000)
    cluster.start_workers(2, row_delay=0.003)
    cluster.steps.start(NAME, parallel=2)
    wait_for(
        lambda: cluster.watcher.status([NAME])[NAME].processed > 0,
        "a first batch",
        procs=cluster.live(),
    )
    assert cluster.watcher.cancel(NAME)
    cluster.wait_until(State.CANCELED)
    cluster.wait_chains_ended(2)
    before = cluster.snapshot()
    assert 0 < sum(r[3] for r in h.items()) < len(sources)

    late = cluster.steps.task.delay(NAME).get(timeout=30)

    assert (late["state"], late["processed"], late["more"]) == ("canceled", 0, False), late
    assert cluster.snapshot() == before
    assert cluster.state() is State.CANCELED

    # `start` (its first step resumes) takes the run up again: a second run, every row once.
    cluster.steps.start(NAME, parallel=2)
    cluster.wait_until(State.SUCCESS)
    assert_migrated_once(cluster, sources)
    assert len(cluster.runs()) == 2


def local_steps(url: str) -> Steps:
    """The step task on an app of its own, for `task.apply()` (run here, no broker)."""
    app = Celery("backfill_local_test", broker="memory://")
    return backfill_steps(app, runner=lambda: Runner(url, migrations), retries=2, countdown=0.01)


def test_a_refused_step_ends_its_steps_without_raising(sqlite_url, caplog):
    result = local_steps(sqlite_url).task.apply(args=("no_such_migration",))

    assert result.successful()  # nothing for Celery to retry
    report = result.result
    assert (report["more"], report["next"]) == (False, None), report
    assert "unknown migration 'no_such_migration'" in report["error"]
    assert "its steps end here" in caplog.text


def test_a_step_retries_an_unreachable_database_a_bounded_number_of_times(caplog):
    result = local_steps("postgresql+psycopg://postgres@127.0.0.1:1/none").task.apply(args=(NAME,))

    assert result.successful()  # given up, logged, not raised
    assert result.result["more"] is False and "127.0.0.1:1" in result.result["error"]
    assert caplog.text.count("trying again in") == 2
    assert "step gave up after 3 tries" in caplog.text


def test_backfill_itself_never_imports_celery():
    """Celery is an extra: only backfill.integrations.celery imports it."""
    code = (
        "import sys, backfill, backfill.cli, backfill.integrations\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('celery', 'kombu')]"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

"""Driving a migration from the Celery a team already runs: one task is one `Runner.step` (a
time slice of the migration's run) and sends the next step while the run goes on.

Why it is safe over Celery's at-least-once delivery: a step's effect is exactly once however
often its message arrives. Each batch commits its rows with its shard's cursor in one
transaction, so a worker killed inside a step leaves nothing of that batch behind, and whichever
step comes next goes on from the cursor; a duplicate or late step finds nothing to take, or a run
that has ended, and changes nothing. The task is `acks_late` with `reject_on_worker_lost`, so the
message of a step whose worker died is redelivered rather than lost. Steps that follow one
another within the lease time (30 s by default) are one run, with one `run_id`.

Only this module imports Celery (`pip install 'backfill[celery]'`); backfill's core never does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from celery import Celery

from backfill.decision import OnError
from backfill.errors import (
    ConfigError,
    DatabaseUnavailable,
    GateClosed,
    LeaseHeld,
    LeaseLost,
    Refused,
    SchemaMismatch,
    UnknownMigration,
)
from backfill.runner import Runner, StepResult

log = logging.getLogger("backfill")

TASK_NAME = "backfill.step"

# Refusals the next step would meet again (the migration or its table is not what the code
# says, or another runner without a plan holds it): the steps end there, with an error logged.
_FINAL = (UnknownMigration, SchemaMismatch, ConfigError, GateClosed, LeaseHeld)


@dataclass(frozen=True)
class Steps:
    """The registered step task, and how to start a migration's steps.

    `task` is the Celery task (named `backfill.step` unless told otherwise): `task.delay(name)`
    sends one step that starts the run from pending or interrupted, or joins the run in
    progress, and never resumes a failed or canceled run, so a late message cannot undo a
    cancel."""

    task: Any

    def start(self, name: str, *, parallel: int = 1, **options: Any) -> list[Any]:
        """Send the first step of `name`'s run, which starts it, joins it, or resumes it from
        failed or canceled; each step sends the next until the run ends. `parallel` first steps
        work up to that many shards at once, on as many Celery workers. `options` go to
        `apply_async` (`queue=...`: the steps after it stay on that queue). Returns the
        messages' AsyncResults."""
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, not {parallel}")
        return [
            self.task.apply_async((name,), {"resume": True}, **options) for _ in range(parallel)
        ]


def backfill_steps(
    app: Celery,
    *,
    runner: Callable[[], Runner],
    budget_seconds: float = 60.0,
    countdown: float = 5.0,
    retries: int = 12,
    batch_size: int | None = None,
    on_error: OnError | str = OnError.FAIL,
    name: str = TASK_NAME,
    **task_options: Any,
) -> Steps:
    """Register the step task on `app` and return it with its `start`.

    `runner` makes the Runner, once per worker process, on its first step (so no connection
    crosses a fork). Each step runs batches for about `budget_seconds` (keep Celery's time
    limits above it plus one batch), then sends the next step at once, or after `countdown`
    seconds when it found nothing to take (other workers hold every shard). Keep `countdown`
    well below the lease time, or the run looks interrupted between steps and the next step
    resumes it as a new run. While the database is unreachable a step is retried every
    `countdown` seconds, `retries` times, then its steps end with an error logged; `start`
    them again. `task_options` go to `app.task` (`queue=`, `time_limit=`, ...); `acks_late`
    and `reject_on_worker_lost` are always on. (Under `task_always_eager` every step would run
    nested in the one before: in tests, call `Runner.step` or `Runner.run` directly.)"""
    stepper = _Stepper(runner, budget_seconds, countdown, retries, batch_size, OnError(on_error))

    def step(task: Any, migration: str, resume: bool = False) -> dict[str, Any]:
        return stepper.step(task, migration, resume)

    options = {**task_options, "acks_late": True, "reject_on_worker_lost": True}
    return Steps(app.task(bind=True, name=name, **options)(step))


class _Stepper:
    """What one step task does: the step, then the next one sent, or the end logged."""

    def __init__(
        self,
        make_runner: Callable[[], Runner],
        budget_seconds: float,
        countdown: float,
        retries: int,
        batch_size: int | None,
        on_error: OnError,
    ) -> None:
        self.make_runner = make_runner
        self.budget_seconds, self.countdown, self.retries = budget_seconds, countdown, retries
        self.batch_size, self.on_error = batch_size, on_error
        self._made: tuple[int, Runner] | None = None

    def runner(self) -> Runner:
        pid = os.getpid()
        if self._made is None or self._made[0] != pid:
            self._made = (pid, self.make_runner())
        return self._made[1]

    def step(self, task: Any, name: str, resume: bool) -> dict[str, Any]:
        request = task.request
        delivery: Mapping[str, Any] = request.delivery_info or {}
        if resume and delivery.get("redelivered"):
            # A start whose worker died may come back much later: resuming then could undo
            # a cancel made meanwhile. Its run, if it started, is joined all the same.
            log.warning("backfill: %r: a first step was redelivered; it does not resume", name)
            resume = False
        try:
            result = self.runner().step(
                name,
                self.budget_seconds,
                resume=resume,
                batch_size=self.batch_size,
                on_error=self.on_error,
            )
        except _FINAL as refusal:
            log.error("backfill: %r: step refused, its steps end here: %s", name, refusal)
            return _report(name, None, error=str(refusal))
        except LeaseLost as lost:
            # Another worker took this step's shard over; the run goes on without it.
            log.warning("backfill: %r: %s", name, lost)
            return _report(name, None, next_id=self._next(task, name, delivery, self.countdown))
        except (DatabaseUnavailable, Refused) as error:
            if request.retries >= self.retries:
                log.error(
                    "backfill: %r: step gave up after %d tries, its steps end here: %s",
                    name,
                    request.retries + 1,
                    error,
                )
                return _report(name, None, error=str(error))
            log.warning("backfill: %r: %s; trying again in %gs", name, error, self.countdown)
            raise task.retry(countdown=self.countdown, max_retries=self.retries) from error
        if not result.more:
            level = logging.INFO if result.done else logging.WARNING
            log.log(level, "backfill: %r is %s; its steps end here", name, result.state)
            return _report(name, result)
        wait = None if result.processed else self.countdown
        next_id = self._next(task, name, delivery, wait, result)
        log.info(
            "backfill: %r: step processed %d rows; next step %s",
            name,
            result.processed,
            "now" if wait is None else f"in {wait:g}s",
        )
        return _report(name, result, next_id=next_id)

    def _next(
        self,
        task: Any,
        name: str,
        delivery: Mapping[str, Any],
        wait: float | None,
        result: StepResult | None = None,
    ) -> str:
        """Send the next step (never resuming) to the queue this one came from."""
        when: dict[str, Any] = {"countdown": wait}
        if result is not None and result.held_until is not None:
            when = {"eta": result.held_until}
        sent = task.apply_async((name,), {"resume": False}, **when, **_route(delivery))
        return str(sent.id)


def _route(delivery: Mapping[str, Any]) -> dict[str, Any]:
    """Where a message came from, as `apply_async` options (none outside a worker)."""
    exchange, key = delivery.get("exchange"), delivery.get("routing_key")
    if not key:
        return {}
    if not exchange:  # the default exchange: the routing key is the queue's name
        return {"queue": key}
    return {"exchange": exchange, "routing_key": key}


def _report(
    name: str,
    result: StepResult | None,
    *,
    next_id: str | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The task's result (JSON): what the step did, and the id of the step it sent."""
    return {
        "migration": name,
        "state": None if result is None else str(result.state),
        "processed": 0 if result is None else result.processed,
        "more": next_id is not None,
        "next": next_id,
        "error": error,
    }


__all__ = ["TASK_NAME", "Steps", "backfill_steps"]

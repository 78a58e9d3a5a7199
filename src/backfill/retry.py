"""Retrying a batch after a transient database error, with backoff and jitter.

This module owns the policy (how many times in a row, how long to wait) and the loop; which errors
are transient is backfill.store.transient's to say, and nothing here knows a dialect or driver.

A batch is one transaction, so retrying it is safe: whatever failed rolled back (or died with its
connection), and the next try starts again from what is committed. A batch is retried a bounded
number of times in a row (`BACKFILL_RETRIES`, default 5), then the run fails naming the cause.

The delays are pure; `call` takes its classification, sleep and randomness from the caller, so
tests drive it without waiting.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from backfill.config import number_from_env
from backfill.errors import DatabaseUnavailable

# The classification's names, still importable from here, where callers and tests name them.
from backfill.store.transient import (
    CONNECTION_LOST,
    DEADLOCK,
    LOCK_TIMEOUT,
    SERIALIZATION_FAILURE,
    SERVER_RESTART,
    STATEMENT_TIMEOUT,
    Transient,
    classify,
)

__all__ = [
    "CONNECTION_LOST",
    "DEADLOCK",
    "DEFAULT_ATTEMPTS",
    "DEFAULT_BASE_DELAY",
    "DEFAULT_MAX_DELAY",
    "LOCK_TIMEOUT",
    "SERIALIZATION_FAILURE",
    "SERVER_RESTART",
    "STATEMENT_TIMEOUT",
    "RetriesExhausted",
    "RetryPolicy",
    "Transient",
    "call",
    "classify",
    "log_retry",
]

T = TypeVar("T")

DEFAULT_ATTEMPTS = 5
DEFAULT_BASE_DELAY = 0.25
DEFAULT_MAX_DELAY = 10.0


@dataclass(frozen=True)
class RetryPolicy:
    """How many times in a row a batch is tried again, and how long to wait before each try.

    The wait before retry n (1, 2, ...) is drawn from [c/2, c) with c = min(max_delay,
    base_delay * 2**(n-1)): exponential, with jitter so runners that failed together do not
    come back together. The defaults wait about 4 to 8 seconds over five retries, long enough
    for a PostgreSQL restart."""

    attempts: int = DEFAULT_ATTEMPTS
    base_delay: float = DEFAULT_BASE_DELAY
    max_delay: float = DEFAULT_MAX_DELAY

    def __post_init__(self) -> None:
        if self.attempts < 0 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("retry attempts and delays must not be negative")

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """`BACKFILL_RETRIES` (count) and `BACKFILL_RETRY_DELAY` (base seconds)."""
        return cls(
            attempts=int(number_from_env("BACKFILL_RETRIES", DEFAULT_ATTEMPTS)),
            base_delay=number_from_env("BACKFILL_RETRY_DELAY", DEFAULT_BASE_DELAY),
        )

    def delay(self, retry: int, jitter: float) -> float:
        """Seconds to wait before retry number `retry` (from 1), `jitter` in [0, 1)."""
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** (retry - 1))
        return ceiling / 2 + ceiling / 2 * jitter


class RetriesExhausted(DatabaseUnavailable):
    """Raised by `call` (so by `Runner.run`) when a batch kept failing for a transient reason
    past `RetryPolicy.attempts` retries in a row; the run ends `failed` with the cause."""

    def __init__(self, migration: str, transient: Transient, retries: int) -> None:
        super().__init__(
            f"migration {migration!r}: the database kept failing the batch, "
            f"{retries} retries exhausted; last: {transient.describe()}"
        )
        self.migration = migration
        self.transient = transient
        self.retries = retries

    @property
    def message(self) -> str:
        return str(self)

    @property
    def error_type(self) -> str:
        return self.transient.error_type


def call(
    attempt: Callable[[], T],
    *,
    migration: str,
    policy: RetryPolicy,
    classify: Callable[[BaseException], Transient | None],
    recover: Callable[[Transient], None],
    sleep: Callable[[float], None] = time.sleep,
    jitter: Callable[[], float] = random.random,
    on_retry: Callable[[Transient, int, float], None] | None = None,
) -> T:
    """`attempt()`, tried again after a transient error: wait, `recover` (which may fail
    transiently too, and then counts as a try), try again. RetriesExhausted after
    `policy.attempts` retries in a row; any other error is raised as it is."""
    retries = 0
    pending: Transient | None = None
    while True:
        try:
            if pending is not None:
                recover(pending)
                pending = None
            return attempt()
        except Exception as error:
            transient = classify(error)
            if transient is None:
                raise
            if retries >= policy.attempts:
                raise RetriesExhausted(migration, transient, retries) from error
            retries += 1
            wait = policy.delay(retries, jitter())
            if on_retry is not None:
                on_retry(transient, retries, wait)
            sleep(wait)
            pending = transient


def log_retry(name: str, attempts: int, transient: Transient, n: int, wait: float) -> None:
    logging.getLogger("backfill").warning(
        "migration %r: batch rolled back (%s); retry %d of %d in %.2f s",
        name,
        transient.describe(),
        n,
        attempts,
        wait,
    )

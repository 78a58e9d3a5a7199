"""backfill.retry on its own: which errors are transient, the backoff, and the retry loop, with a
fake sleep and fake jitter (no database, no waiting). Also the knobs' environment variables."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
import sqlalchemy as sa

from backfill import retry
from backfill.errors import ConfigError, DatabaseUnavailable, RowFailed
from backfill.store.database import Database, Limits


class FakeDriverError(Exception):
    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def is_fake(error: BaseException) -> bool:
    return isinstance(error, FakeDriverError | sa.exc.DBAPIError)


def classify(error: BaseException) -> retry.Transient | None:
    return retry.classify(error, is_database_error=is_fake)


@pytest.mark.parametrize(
    ("sqlstate", "message", "cause"),
    [
        ("40001", "could not serialize access", retry.SERIALIZATION_FAILURE),
        ("40P01", "deadlock detected", retry.DEADLOCK),
        ("55P03", "canceling statement due to lock timeout", retry.LOCK_TIMEOUT),
        ("57014", "canceling statement due to statement timeout", retry.STATEMENT_TIMEOUT),
        ("57P01", "terminating connection due to administrator command", retry.SERVER_RESTART),
        ("57P03", "the database system is starting up", retry.SERVER_RESTART),
        ("08006", "connection failure", retry.CONNECTION_LOST),
    ],
)
def test_transient_sqlstates(sqlstate, message, cause):
    found = classify(FakeDriverError(message, sqlstate))
    assert found is not None
    assert (found.cause, found.sqlstate, found.message) == (cause, sqlstate, message)
    assert found.error_type == "FakeDriverError"
    assert found.reconnect == (cause in (retry.SERVER_RESTART, retry.CONNECTION_LOST))
    assert found.shrink == (cause == retry.STATEMENT_TIMEOUT)
    assert sqlstate in found.describe() and message in found.describe()


@pytest.mark.parametrize(
    ("sqlstate", "message"),
    [
        ("23505", "duplicate key value violates unique constraint"),
        ("22P02", "invalid input syntax for type json"),
        ("42P01", 'relation "items" does not exist'),
        ("57014", "canceling statement due to user request"),  # pg_cancel_backend: not ours
        (None, "some driver error"),
    ],
)
def test_other_database_errors_are_not_transient(sqlstate, message):
    assert classify(FakeDriverError(message, sqlstate)) is None


def test_errors_that_do_not_come_from_the_database_are_never_retried():
    class UserError(Exception):
        sqlstate = "40P01"  # even when it looks like one

    assert classify(UserError("deadlock detected")) is None
    failure = RowFailed("m", 1, "body", "bad", "BadValue")
    failure.__cause__ = FakeDriverError("deadlock detected", "40P01")
    assert classify(failure) is None


def test_the_error_that_killed_the_batch_names_the_cause_not_the_failed_rollback():
    original = FakeDriverError("terminating connection due to administrator command", "57P01")
    rollback = sa.exc.OperationalError("ROLLBACK", {}, FakeDriverError("the connection is lost"))
    rollback.connection_invalidated = True
    rollback.__context__ = original
    found = classify(rollback)
    assert found is not None and (found.cause, found.sqlstate) == (retry.SERVER_RESTART, "57P01")


def test_a_connection_invalidated_by_sqlalchemy_or_a_disconnect_is_a_lost_connection():
    wrapped = sa.exc.OperationalError("SELECT 1", {}, FakeDriverError("server closed"))
    assert classify(wrapped) is None
    wrapped.connection_invalidated = True
    found = classify(wrapped)
    assert found is not None and found.cause == retry.CONNECTION_LOST and found.reconnect
    odd = FakeDriverError("the connection is closed")
    assert classify(odd) is None
    found = retry.classify(odd, is_database_error=is_fake, is_disconnect=lambda e: e is odd)
    assert found is not None and found.cause == retry.CONNECTION_LOST


def test_database_classifies_the_real_driver_classes():
    pg = Database("postgresql+psycopg://nobody@127.0.0.1:1/none")  # never connects
    lock = pg.transient(psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"))
    assert lock is not None and lock.cause == retry.LOCK_TIMEOUT
    assert lock.error_type == "LockNotAvailable" and lock.sqlstate == "55P03"
    deadlock = pg.transient(psycopg.errors.DeadlockDetected("deadlock detected"))
    assert deadlock is not None and deadlock.cause == retry.DEADLOCK
    lost = pg.transient(psycopg.OperationalError("consuming input failed: server closed"))
    assert lost is not None and lost.cause == retry.CONNECTION_LOST
    assert pg.transient(psycopg.errors.UniqueViolation("duplicate key")) is None
    assert pg.transient(ValueError("not a database error")) is None
    lite = Database("sqlite://")
    # SQLite waits for its lock itself (busy_timeout); nothing there is retried by us.
    assert lite.transient(sqlite3.OperationalError("database is locked")) is None


def test_delays_grow_exponentially_with_jitter_and_a_cap():
    policy = retry.RetryPolicy(attempts=8, base_delay=0.25, max_delay=2.0)
    assert [policy.delay(n, 0.0) for n in (1, 2, 3, 4, 5)] == [0.125, 0.25, 0.5, 1.0, 1.0]
    assert policy.delay(1, 0.999) == pytest.approx(0.25, abs=1e-3)
    assert policy.delay(3, 0.5) == pytest.approx(0.75)
    assert policy.delay(10, 0.999) < 2.0
    with pytest.raises(ValueError):
        retry.RetryPolicy(attempts=-1)


class Flaky:
    """Fails with the given errors, one per call, then returns "done"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def run(attempt, *, attempts=5, recover=None):
    sleeps: list[float] = []
    recovered: list[retry.Transient] = []
    seen: list[tuple[str, int]] = []
    result = retry.call(
        attempt,
        migration="m",
        policy=retry.RetryPolicy(attempts=attempts, base_delay=1.0, max_delay=60.0),
        classify=classify,
        recover=recover or recovered.append,
        sleep=sleeps.append,
        jitter=lambda: 0.0,
        on_retry=lambda t, n, _wait: seen.append((t.cause, n)),
    )
    return result, sleeps, recovered, seen


def test_transient_errors_are_retried_after_a_backoff_and_a_recovery():
    deadlock = FakeDriverError("deadlock detected", "40P01")
    lock = FakeDriverError("canceling statement due to lock timeout", "55P03")
    attempt = Flaky(deadlock, lock)
    result, sleeps, recovered, seen = run(attempt)
    assert result == "done" and attempt.calls == 3
    assert sleeps == [0.5, 1.0]
    assert [t.cause for t in recovered] == [retry.DEADLOCK, retry.LOCK_TIMEOUT]
    assert seen == [(retry.DEADLOCK, 1), (retry.LOCK_TIMEOUT, 2)]


def test_retries_are_bounded_and_then_name_the_last_cause():
    errors = [FakeDriverError("deadlock detected", "40P01") for _ in range(4)]
    attempt = Flaky(*errors)
    with pytest.raises(retry.RetriesExhausted) as raised:
        run(attempt, attempts=3)
    assert attempt.calls == 4  # the first try and three retries
    exhausted = raised.value
    assert isinstance(exhausted, DatabaseUnavailable) and exhausted.exit_code == 4
    assert exhausted.retries == 3 and exhausted.transient.cause == retry.DEADLOCK
    assert "'m'" in exhausted.message and "3 retries" in exhausted.message
    assert "deadlock detected" in exhausted.message and exhausted.error_type == "FakeDriverError"
    assert exhausted.__cause__ is errors[-1]


def test_zero_attempts_fails_at_the_first_transient_error():
    with pytest.raises(retry.RetriesExhausted) as raised:
        run(Flaky(FakeDriverError("deadlock detected", "40P01")), attempts=0)
    assert raised.value.retries == 0


def test_other_errors_pass_through_at_once():
    failure = RowFailed("m", 7, "body", "bad", "BadValue")
    attempt = Flaky(failure)
    with pytest.raises(RowFailed):
        run(attempt)
    assert attempt.calls == 1
    unique = FakeDriverError("duplicate key", "23505")
    with pytest.raises(FakeDriverError):
        run(Flaky(unique))


def test_a_recovery_that_fails_transiently_counts_as_a_try():
    restart = FakeDriverError("the database system is starting up", "57P03")
    failures = [restart, restart]

    def recover(_transient: retry.Transient) -> None:
        if failures:
            raise failures.pop()

    attempt = Flaky(FakeDriverError("terminating connection", "57P01"))
    result, sleeps, _recovered, _seen = run(attempt, recover=recover)
    assert result == "done" and attempt.calls == 2
    assert len(sleeps) == 3


def test_knobs_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("BACKFILL_RETRIES", "2")
    monkeypatch.setenv("BACKFILL_RETRY_DELAY", "0.5")
    assert retry.RetryPolicy.from_env() == retry.RetryPolicy(attempts=2, base_delay=0.5)
    monkeypatch.setenv("BACKFILL_LOCK_TIMEOUT", "0.75")
    monkeypatch.setenv("BACKFILL_STATEMENT_TIMEOUT", "0")
    monkeypatch.setenv("BACKFILL_ESTIMATE_ABOVE", "1000")
    limits = Limits.from_env()
    assert limits == Limits(lock_timeout=0.75, statement_timeout=0, estimate_above=1000)
    assert "'lock_timeout', '750'" in limits.batch_settings_sql()
    assert "'statement_timeout', '0'" in limits.batch_settings_sql()
    for name in ("BACKFILL_RETRIES", "BACKFILL_LOCK_TIMEOUT", "BACKFILL_ESTIMATE_ABOVE"):
        monkeypatch.delenv(name)
    assert retry.RetryPolicy.from_env().attempts == retry.DEFAULT_ATTEMPTS
    assert Limits.from_env().lock_timeout == 2.0
    assert Limits.from_env().estimate_above == 5_000_000


def test_a_malformed_knob_is_a_configuration_error(monkeypatch):
    monkeypatch.setenv("BACKFILL_LOCK_TIMEOUT", "two seconds")
    with pytest.raises(ConfigError, match="BACKFILL_LOCK_TIMEOUT"):
        Limits.from_env()
    monkeypatch.setenv("BACKFILL_LOCK_TIMEOUT", "1")
    monkeypatch.setenv("BACKFILL_RETRIES", "-3")
    with pytest.raises(ConfigError, match="BACKFILL_RETRIES"):
        retry.RetryPolicy.from_env()

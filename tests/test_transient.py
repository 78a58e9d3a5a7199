"""backfill.store.transient on real driver exception classes, built without a server: which
errors are worth a retry, whatever wraps them."""

from __future__ import annotations

import psycopg
import pymysql
import pytest
import sqlalchemy as sa

from backfill.store import transient
from backfill.store.transient import classify, sqlstate


def from_a_driver(error: BaseException) -> bool:
    return isinstance(error, psycopg.Error | pymysql.err.Error | sa.exc.DBAPIError)


def found(error: BaseException) -> transient.Transient | None:
    return classify(error, is_database_error=from_a_driver)


def wrapped(error: BaseException) -> sa.exc.DBAPIError:
    """As SQLAlchemy raises it: its own exception, with the driver's as `orig`."""
    return sa.exc.OperationalError("UPDATE items SET ...", {}, error)


@pytest.mark.parametrize("wrap", [lambda e: e, wrapped], ids=["driver", "sqlalchemy"])
def test_a_postgresql_deadlock_is_transient_and_a_duplicate_key_is_not(wrap):
    deadlock = found(wrap(psycopg.errors.DeadlockDetected("deadlock detected")))
    assert deadlock is not None
    assert (deadlock.cause, deadlock.sqlstate) == (transient.DEADLOCK, "40P01")
    assert deadlock.error_type == "DeadlockDetected" and not deadlock.reconnect
    assert found(wrap(psycopg.errors.UniqueViolation("duplicate key value"))) is None


@pytest.mark.parametrize("wrap", [lambda e: e, wrapped], ids=["driver", "sqlalchemy"])
def test_a_mysql_deadlock_is_transient_and_a_duplicate_entry_is_not(wrap):
    deadlock = found(wrap(pymysql.err.OperationalError(1213, "Deadlock found")))
    assert deadlock is not None
    # The error number names it, not MySQL's coarse SQLSTATE; the message loses the number.
    assert (deadlock.cause, deadlock.sqlstate) == (transient.DEADLOCK, "1213")
    assert deadlock.describe() == "deadlock (1213): Deadlock found"
    assert found(wrap(pymysql.err.IntegrityError(1062, "Duplicate entry '7'"))) is None


def test_a_statement_timeout_shrinks_the_batch_and_a_lost_connection_reconnects():
    timeout = found(psycopg.errors.QueryCanceled("canceling statement due to statement timeout"))
    assert timeout is not None and timeout.shrink and not timeout.reconnect
    gone = found(pymysql.err.OperationalError(2006, "MySQL server has gone away"))
    assert gone is not None and gone.cause == transient.CONNECTION_LOST
    assert gone.reconnect and not gone.shrink


def test_an_error_not_from_the_database_is_never_looked_at():
    class Lookalike(Exception):
        sqlstate = "40P01"

    assert found(Lookalike("deadlock detected")) is None


def test_sqlstate_reads_psycopg_3_and_psycopg2_attributes():
    class Psycopg2Style(Exception):
        pgcode = "40001"

    assert sqlstate(psycopg.errors.LockNotAvailable("lock timeout")) == "55P03"
    assert sqlstate(Psycopg2Style()) == "40001"
    assert sqlstate(pymysql.err.OperationalError(1213, "Deadlock found")) is None


def test_the_old_import_path_still_names_the_same_things():
    from backfill import Transient, retry

    assert retry.Transient is transient.Transient is Transient
    assert retry.classify is classify
    assert retry.DEADLOCK == transient.DEADLOCK

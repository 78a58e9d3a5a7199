"""Batches on a real MariaDB server that meet locks, timeouts and server errors.

As on PostgreSQL (tests/test_postgres_retries.py): each batch runs under its own
`innodb_lock_wait_timeout` and `max_statement_time`, set for the batch's session and put back when
the connection returns to the pool; a batch that meets a lock wait timeout (1205), a deadlock
(1213), its statement time (1969) or a killed connection rolls back and is tried again, a bounded
number of times, then the run ends `failed` with the cause (exit 4), resumable. Errors come from
the server itself: a row lock another session holds, triggers that sleep or SIGNAL a given error a
given number of times (counted by a SEQUENCE: it is not rolled back with the batch).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator

import pymysql
import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from apps import counting
from apps.counting import NAME, create_items
from backfill import RunResult, State, retry
from backfill.retry import RetriesExhausted, RetryPolicy
from backfill.store.database import Database, Limits
from support import after_each_batch
from support.retrying import (
    BATCH,
    ROWS,
    assert_all_once,
    cli,
    expected,
    make_runner,
    retries_logged,
    rows_the_app_holds_are_waited_for,
    stored,
)


@pytest.fixture
def app(mariadb_url: str) -> Iterator[sa.Engine]:
    """The application's own connections, never pooled."""
    engine = sa.create_engine(mariadb_url, poolclass=NullPool)
    yield engine
    engine.dispose()


def add_trigger(engine: sa.Engine, body: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE SEQUENCE IF NOT EXISTS faults")
        conn.exec_driver_sql(
            f"CREATE TRIGGER fault BEFORE UPDATE ON items FOR EACH ROW BEGIN {body} END"
        )


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (pymysql.err.OperationalError(1205, "Lock wait timeout exceeded"), retry.LOCK_TIMEOUT),
        (pymysql.err.OperationalError(1213, "Deadlock found"), retry.DEADLOCK),
        (
            pymysql.err.OperationalError(1969, "max_statement_time exceeded"),
            retry.STATEMENT_TIMEOUT,
        ),
        (pymysql.err.OperationalError(1053, "Server shutdown in progress"), retry.SERVER_RESTART),
        (pymysql.err.OperationalError(1927, "Connection was killed"), retry.CONNECTION_LOST),
        (pymysql.err.OperationalError(2006, "MySQL server has gone away"), retry.CONNECTION_LOST),
        (pymysql.err.OperationalError(2013, "Lost connection"), retry.CONNECTION_LOST),
        (pymysql.err.InterfaceError(0, ""), retry.CONNECTION_LOST),  # PyMySQL: already closed
        (pymysql.err.OperationalError(1317, "Query execution was interrupted"), None),  # KILL QUERY
        (pymysql.err.IntegrityError(1062, "Duplicate entry"), None),
        (pymysql.err.DataError(1366, "Incorrect integer value"), None),
    ],
)
def test_mysql_error_numbers_are_classified(error, cause):
    db = Database("mysql+pymysql://nobody@127.0.0.1:1/none")  # never connects
    found = db.transient(error)
    assert (found and found.cause) == cause, found
    if found is not None and error.args[0]:
        # The number names the error, not its coarse SQLSTATE (HY000 for most).
        assert found.sqlstate == str(error.args[0]) and found.message == error.args[1]
        assert found.describe() == f"{cause} ({error.args[0]}): {error.args[1]}"


def test_rows_the_app_holds_are_waited_for_briefly_then_retried(mariadb_url, app, caplog):
    # InnoDB waits whole seconds.
    rows_the_app_holds_are_waited_for(mariadb_url, app, caplog, 1, "lock timeout (1205)")


def test_a_lock_held_past_every_retry_fails_the_run_with_the_cause_then_it_resumes(
    mariadb_url, app
):
    engine = app
    create_items(engine, ROWS)
    holder = app.connect()
    held = holder.begin()
    holder.execute(sa.text("SELECT 1 FROM items WHERE id = 250 FOR UPDATE"))
    try:
        run = cli(
            mariadb_url,
            "run",
            NAME,
            "--batch-size",
            str(BATCH),
            BACKFILL_LOCK_TIMEOUT="0.2",  # InnoDB waits whole seconds: 1
            BACKFILL_RETRIES="2",
            BACKFILL_RETRY_DELAY="0.01",
        )
    finally:
        held.rollback()
        holder.close()
    assert run.returncode == 4, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    [sentence] = [line for line in run.stderr.splitlines() if line.startswith("backfill:")]
    assert NAME in sentence and "2 retries" in sentence and "lock timeout" in sentence, sentence

    status = json.loads(cli(mariadb_url, "status", NAME, "--json").stdout)[NAME]
    assert status["state"] == "failed"
    error = status["error"]
    assert error["type"] == "OperationalError" and "1205" in error["message"], error
    assert error["row_id"] is None and error["field"] is None
    assert status["progress"]["processed"] == 200  # batches 1 and 2; the third rolled back
    rows = stored(engine)
    assert all(r[3] == 1 for r in rows[:200]) and all(r[3] == 0 for r in rows[200:])

    resumed = cli(mariadb_url, "run", NAME, "--batch-size", str(BATCH), "--json")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    final = json.loads(resumed.stdout)[NAME]
    assert final["progress"] == {"processed": ROWS, "total": ROWS, "completed": True}
    assert final["changed"] == ROWS and final["error"] is None
    assert all(r[2] == expected(r[1]) and r[3] == 1 for r in stored(engine))


def test_deadlocks_are_retried(mariadb_url, caplog):
    caplog.set_level(logging.WARNING, logger="backfill")
    runner = make_runner(mariadb_url)
    create_items(runner.db.engine, ROWS)
    add_trigger(
        runner.db.engine,
        "IF NEXTVAL(faults) <= 3 THEN SIGNAL SQLSTATE '40001' "
        "SET MYSQL_ERRNO = 1213, MESSAGE_TEXT = 'Deadlock found when trying to get lock'; END IF;",
    )
    [result] = runner.run([NAME], batch_size=BATCH)
    assert result.state is State.SUCCESS, result
    assert retries_logged(caplog, "deadlock (1213): Deadlock found when trying to get lock") == 3
    assert_all_once(runner.db.engine, result.status)
    runner.db.dispose()


def test_a_deadlock_with_the_app_is_retried(mariadb_url, app, caplog):
    """The app holds row 2 and has written much; the runner's first batch locks row 1 and waits
    for row 2; the app then asks for row 1. InnoDB rolls back the lighter transaction, the
    runner's batch, which is tried again once the app commits."""
    caplog.set_level(logging.WARNING, logger="backfill")
    runner = make_runner(mariadb_url, lock_timeout=30)
    create_items(runner.db.engine, ROWS)
    with app.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE app_log (id INTEGER PRIMARY KEY AUTO_INCREMENT, at REAL)"
        )
    database = sa.make_url(mariadb_url).database
    holder = app.connect()
    held = holder.begin()
    holder.execute(sa.text("SELECT 1 FROM items WHERE id = 2 FOR UPDATE"))
    holder.execute(
        sa.text("INSERT INTO app_log (at) VALUES (:at)"), [{"at": i} for i in range(500)]
    )
    results: list[RunResult] = []
    thread = threading.Thread(
        target=lambda: results.extend(runner.run([NAME], batch_size=BATCH)), daemon=True
    )
    thread.start()
    try:
        wait_until(lambda: lock_waits(app, database) > 0, "the runner to wait for row 2")
        holder.execute(sa.text("SELECT 1 FROM items WHERE id = 1 FOR UPDATE"))
        held.commit()
    finally:
        holder.close()
        thread.join(timeout=60)
    [result] = results
    assert result.state is State.SUCCESS, result
    assert retries_logged(caplog, "deadlock (1213)") == 1
    assert_all_once(runner.db.engine, result.status)
    runner.db.dispose()


def lock_waits(app: sa.Engine, database: str | None) -> int:
    """Transactions waiting for a row lock in `database`. From SHOW ENGINE INNODB STATUS:
    information_schema.innodb_trx is a cache that frequent reads keep from refreshing."""
    with app.connect() as conn:
        status = conn.exec_driver_sql("SHOW ENGINE INNODB STATUS").one()[2]
    blocks = status.split("---TRANSACTION ")
    return sum("LOCK WAIT" in b and f"`{database}`.`items`" in b for b in blocks)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_batch_past_the_statement_time_is_retried_at_half_the_size(mariadb_url, caplog):
    caplog.set_level(logging.WARNING, logger="backfill")
    runner = make_runner(mariadb_url, statement_timeout=0.3)
    create_items(runner.db.engine, ROWS)
    add_trigger(runner.db.engine, "IF NEXTVAL(faults) = 1 THEN SET @slept = SLEEP(2); END IF;")
    seen: list[int] = []
    [result] = runner.run(
        [NAME], batch_size=BATCH, listeners=[after_each_batch(lambda s: seen.append(s.processed))]
    )
    assert result.state is State.SUCCESS, result
    assert retries_logged(caplog, "statement timeout (1969)") == 1
    assert seen[0] == BATCH // 2, seen
    assert_all_once(runner.db.engine, result.status)
    runner.db.dispose()


def test_timeouts_are_set_for_batch_transactions_only(mariadb_url, app):
    runner = make_runner(mariadb_url, lock_timeout=1.5, statement_timeout=45)
    create_items(runner.db.engine, ROWS)
    with runner.db.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE seen (lock_wait INTEGER, statement_time DOUBLE)")
    add_trigger(
        runner.db.engine,
        "INSERT INTO seen VALUES (@@session.innodb_lock_wait_timeout, "
        "@@session.max_statement_time);",
    )
    [result] = runner.run([NAME], batch_size=BATCH)
    assert result.state is State.SUCCESS
    with app.connect() as conn:
        settings = conn.execute(sa.text("SELECT * FROM seen")).all()
        assert len(settings) == ROWS
        assert {tuple(s) for s in settings} == {(2, 45.0)}  # whole seconds of lock wait
        defaults = "SELECT @@session.innodb_lock_wait_timeout, @@session.max_statement_time"
        server = tuple(conn.execute(sa.text(defaults)).one())
    # The runner's own pooled sessions are back to the server's defaults after each run.
    with runner.db.engine.connect() as conn:
        assert tuple(conn.execute(sa.text(defaults)).one()) == server
    runner.db.dispose()


def test_no_limits_means_none(mariadb_url):
    db = Database(mariadb_url, limits=Limits(lock_timeout=0, statement_timeout=0))
    with db.engine.connect() as conn:
        transaction = db.begin_batch(conn)
        found = conn.exec_driver_sql(
            "SELECT @@session.innodb_lock_wait_timeout, @@session.max_statement_time"
        ).one()
        transaction.rollback()
    assert tuple(found) == (100_000_000, 0.0)
    db.dispose()


def test_a_killed_connection_is_replaced_and_the_batch_retried(
    mariadb_url, app, caplog, monkeypatch
):
    """`KILL` on the runner's connection while its batch transaction is open: the batch rolls
    back with its connection and is done again on a new one, every row exactly once."""
    caplog.set_level(logging.WARNING, logger="backfill")
    monkeypatch.setattr(counting, "_row_delay", 0.002)  # 0.2 s a batch, mostly in a transaction
    runner = make_runner(mariadb_url)
    create_items(runner.db.engine, ROWS)
    results: list[RunResult] = []
    thread = threading.Thread(
        target=lambda: results.extend(runner.run([NAME], batch_size=BATCH)), daemon=True
    )
    thread.start()
    try:
        database = sa.make_url(mariadb_url).database

        def batch_connections() -> list[int]:
            with app.connect() as conn:
                found = conn.execute(
                    sa.text(
                        "SELECT t.trx_mysql_thread_id FROM information_schema.innodb_trx t "
                        "JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id "
                        "WHERE p.db = :db"
                    ),
                    {"db": database},
                )
                return [int(i) for i in found.scalars()]

        wait_until(lambda: runner.status([NAME])[NAME].processed >= BATCH, "a first commit")
        wait_until(lambda: bool(batch_connections()), "a batch transaction")
        with app.connect() as conn:
            for connection in batch_connections():
                conn.exec_driver_sql(f"KILL CONNECTION {connection}")
    finally:
        thread.join(timeout=60)
    [result] = results
    assert result.state is State.SUCCESS, result
    assert retries_logged(caplog, "connection lost") >= 1
    assert_all_once(runner.db.engine, result.status)
    runner.db.dispose()


def test_a_run_that_exhausts_its_retries_returns_the_cause_without_raising(mariadb_url):
    runner = make_runner(mariadb_url, RetryPolicy(attempts=1, base_delay=0.01))
    create_items(runner.db.engine, ROWS)
    add_trigger(
        runner.db.engine,
        "IF NEXTVAL(faults) <= 2 THEN SIGNAL SQLSTATE '40001' "
        "SET MYSQL_ERRNO = 1213, MESSAGE_TEXT = 'Deadlock found when trying to get lock'; END IF;",
    )
    [result] = runner.run([NAME], batch_size=BATCH)
    assert result.state is State.FAILED
    assert isinstance(result.error, RetriesExhausted) and result.error.retries == 1
    assert result.status.error is not None
    assert result.status.error.type == "OperationalError"
    assert "deadlock (1213)" in result.status.error.message
    assert result.status.processed == 0 and result.status.runner is None

    [resumed] = runner.run([NAME], batch_size=BATCH)
    assert resumed.state is State.SUCCESS and resumed.status.error is None
    assert_all_once(runner.db.engine, resumed.status)
    runner.db.dispose()

"""Batches on a real PostgreSQL server that meet locks, timeouts and server errors.

Each batch transaction sets its own `lock_timeout` and `statement_timeout`; a batch that times out
or meets a serialization failure or a deadlock rolls back and is tried again after a backoff, a
bounded number of times, and then the run ends `failed` with the cause (exit 4 from the CLI),
resumable. Server errors are produced by the server itself: a row lock another session holds, a
trigger that sleeps past the statement timeout, triggers that raise a given SQLSTATE a given number
of times (a sequence counts them: it is not rolled back with the batch).

`total` is the planner's estimate beyond a threshold, an exact count below it; status reads only
`_migrations`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from apps.counting import NAME, create_items, items
from backfill import State
from backfill.retry import RetriesExhausted, RetryPolicy
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
def app(postgres_url: str) -> Iterator[sa.Engine]:
    """The application's own connections, never pooled."""
    engine = sa.create_engine(postgres_url, poolclass=NullPool)
    yield engine
    engine.dispose()


def test_rows_the_app_holds_are_waited_for_briefly_then_retried(postgres_url, app, caplog):
    rows_the_app_holds_are_waited_for(postgres_url, app, caplog, 0.2, "lock timeout (55P03)")


def test_a_lock_held_past_every_retry_fails_the_run_with_the_cause_then_it_resumes(
    postgres_url, app
):
    engine = app
    create_items(engine, ROWS)
    holder = app.connect()
    held = holder.begin()
    holder.execute(sa.text("SELECT 1 FROM items WHERE id = 250 FOR UPDATE"))
    try:
        run = cli(
            postgres_url,
            "run",
            NAME,
            "--batch-size",
            str(BATCH),
            BACKFILL_LOCK_TIMEOUT="0.2",
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

    status = json.loads(cli(postgres_url, "status", NAME, "--json").stdout)[NAME]
    assert status["state"] == "failed"
    error = status["error"]
    assert error["type"] == "LockNotAvailable" and "55P03" in error["message"], error
    assert error["row_id"] is None and error["field"] is None
    assert status["progress"]["processed"] == 200  # batches 1 and 2; the third rolled back
    rows = stored(engine)
    assert all(r[3] == 1 for r in rows[:200]) and all(r[3] == 0 for r in rows[200:])

    resumed = cli(postgres_url, "run", NAME, "--batch-size", str(BATCH), "--json")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    final = json.loads(resumed.stdout)[NAME]
    assert final["progress"] == {"processed": ROWS, "total": ROWS, "completed": True}
    assert final["changed"] == ROWS and final["error"] is None
    assert all(r[2] == expected(r[1]) and r[3] == 1 for r in stored(engine))


def add_trigger(engine: sa.Engine, body: str, *, level: str = "ROW") -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE SEQUENCE IF NOT EXISTS faults")
        conn.exec_driver_sql(
            "CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"{body} RETURN NEW; END $$"
        )
        conn.exec_driver_sql(
            f"CREATE TRIGGER fault BEFORE UPDATE ON items FOR EACH {level} EXECUTE FUNCTION fault()"
        )


@pytest.mark.parametrize(
    ("sqlstate", "message", "cause"),
    [
        ("40001", "could not serialize access due to concurrent update", "serialization failure"),
        ("40P01", "deadlock detected", "deadlock"),
    ],
)
def test_serialization_failures_and_deadlocks_are_retried(
    postgres_url, caplog, sqlstate, message, cause
):
    caplog.set_level(logging.WARNING, logger="backfill")
    runner = make_runner(postgres_url)
    create_items(runner.db.engine, ROWS)
    add_trigger(
        runner.db.engine,
        f"IF nextval('faults') <= 3 THEN RAISE EXCEPTION '{message}' "
        f"USING ERRCODE = '{sqlstate}'; END IF;",
    )
    [result] = runner.run([NAME], batch_size=BATCH)
    assert result.state is State.SUCCESS, result
    assert retries_logged(caplog, f"{cause} ({sqlstate}): {message}") == 3
    assert_all_once(runner.db.engine, result.status)
    runner.db.dispose()


def test_a_batch_past_the_statement_timeout_is_retried_at_half_the_size(postgres_url, caplog):
    caplog.set_level(logging.WARNING, logger="backfill")
    runner = make_runner(postgres_url, statement_timeout=0.3)
    create_items(runner.db.engine, ROWS)
    add_trigger(runner.db.engine, "IF nextval('faults') = 1 THEN PERFORM pg_sleep(2); END IF;")
    seen: list[int] = []
    [result] = runner.run(
        [NAME], batch_size=BATCH, listeners=[after_each_batch(lambda s: seen.append(s.processed))]
    )
    assert result.state is State.SUCCESS, result
    assert retries_logged(caplog, "statement timeout (57014)") == 1
    assert seen[0] == BATCH // 2, seen
    assert_all_once(runner.db.engine, result.status)
    runner.db.dispose()


def test_timeouts_are_set_for_batch_transactions_only(postgres_url, app):
    runner = make_runner(postgres_url, lock_timeout=1.5, statement_timeout=45)
    create_items(runner.db.engine, ROWS)
    with runner.db.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE seen (lock_timeout text, statement_timeout text)")
    add_trigger(
        runner.db.engine,
        "INSERT INTO seen VALUES (current_setting('lock_timeout'), "
        "current_setting('statement_timeout'));",
        level="STATEMENT",
    )
    [result] = runner.run([NAME], batch_size=BATCH)
    assert result.state is State.SUCCESS
    with app.connect() as conn:
        settings = conn.execute(sa.text("SELECT * FROM seen")).all()
        assert len(settings) == ROWS // BATCH
        assert {tuple(s) for s in settings} == {("1500ms", "45s")}
        assert conn.execute(sa.text("SHOW lock_timeout")).scalar() == "0"
    # The runner's own pooled sessions are back to the server's defaults after each batch.
    with runner.db.engine.connect() as conn:
        assert conn.execute(sa.text("SHOW lock_timeout")).scalar() == "0"
        assert conn.execute(sa.text("SHOW statement_timeout")).scalar() == "0"
    runner.db.dispose()


def fill_unanalyzed(engine: sa.Engine, count: int) -> None:
    """`items` with `count` rows that neither ANALYZE nor autovacuum has looked at."""
    with engine.begin() as conn:
        items.drop(conn, checkfirst=True)
        items.create(conn)
        conn.exec_driver_sql("ALTER TABLE items SET (autovacuum_enabled = false)")
        conn.exec_driver_sql(
            "INSERT INTO items (id, source, counter) "
            f"SELECT i, 'item-' || i, 0 FROM generate_series(1, {count}) AS i"
        )


class Statements:
    """Every SQL statement an engine sends, while attached."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.sent: list[str] = []

    def _record(self, _conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        self.sent.append(statement.lower())

    def __enter__(self) -> Statements:
        sa.event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *_exc: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._record)

    def counts(self) -> int:
        """COUNTs of the table's rows (not the undo log's entries, which status counts)."""
        return sum("count(" in s and "_migration_undo" not in s for s in self.sent)


def test_total_is_the_planners_estimate_beyond_the_threshold_and_exact_below(postgres_url):
    runner = make_runner(postgres_url, estimate_above=1_000)
    engine = runner.db.engine
    fill_unanalyzed(engine, 3_000)

    # Never analyzed: the planner knows nothing (reltuples -1), so the total is counted.
    with Statements(engine) as sent:
        [first] = runner.run([NAME], batch_size=1_000)
    assert (first.status.total, first.status.total_is_estimate) == (3_000, False)
    assert sent.counts() == 1

    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE items")
    with Statements(engine) as sent:
        [estimated] = runner.run([NAME], batch_size=1_000, restart=True)
    assert estimated.status.total_is_estimate is True
    assert estimated.status.to_json()["total_is_estimate"] is True
    assert estimated.status.total == 3_000  # ANALYZE reads all of a table this small
    assert estimated.status.processed == 3_000 and estimated.status.completed
    assert sent.counts() == 0

    exact = make_runner(postgres_url, estimate_above=5_000)
    with Statements(exact.db.engine) as sent:
        [counted] = exact.run([NAME], batch_size=1_000, restart=True)
    assert (counted.status.total, counted.status.total_is_estimate) == (3_000, False)
    assert sent.counts() == 1

    # Status reads `_migrations` only, whatever the size of the table.
    with Statements(exact.db.engine) as sent:
        for _ in range(3):
            assert exact.status([NAME])[NAME].total == 3_000
    assert sent.sent and not any("items" in s for s in sent.sent), sent.sent
    runner.db.dispose()
    exact.db.dispose()


def test_a_run_that_exhausts_its_retries_returns_the_cause_without_raising(postgres_url):
    runner = make_runner(postgres_url, RetryPolicy(attempts=1, base_delay=0.01))
    create_items(runner.db.engine, ROWS)
    add_trigger(
        runner.db.engine,
        "IF nextval('faults') <= 2 THEN RAISE EXCEPTION 'deadlock detected' "
        "USING ERRCODE = '40P01'; END IF;",
    )
    [result] = runner.run([NAME], batch_size=BATCH)
    assert result.state is State.FAILED
    assert isinstance(result.error, RetriesExhausted) and result.error.retries == 1
    assert result.status.error is not None
    assert result.status.error.type == "DeadlockDetected"
    assert "deadlock (40P01)" in result.status.error.message
    assert result.status.processed == 0 and result.status.runner is None

    [resumed] = runner.run([NAME], batch_size=BATCH)
    assert resumed.state is State.SUCCESS and resumed.status.error is None
    assert_all_once(runner.db.engine, resumed.status)
    runner.db.dispose()

"""The undo log and revert, through the Python API, on SQLite, PostgreSQL and MariaDB: values put
back exactly (the flagship's legacy fields after its cleanup), rows the app changed since kept
and listed, the refused orders, each edge into and out of `reverting`, a copy's revert deleting
only the rows it inserted. (A SIGKILL in the middle of each revert: tests/e2e/test_revert_crash.)
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from apps import counting
from backfill import BeingReverted, Refused, Runner, State
from backfill.events import BatchCommitted, Event
from chat_migrations import migrations as flagship
from chat_migrations import new_table
from chat_migrations.generator import seed_messages
from chat_migrations.schema import messages_v2

NAME = counting.NAME
ROWS = 250


@pytest.fixture
def engine(database_url):
    engine = sa.create_engine(database_url, poolclass=NullPool)
    yield engine
    engine.dispose()


def rows(engine: sa.Engine, table: str = "messages") -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY id"))]


def execute(engine: sa.Engine, sql: str, **params: object) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(sql), params)


def test_backfill_cleanup_and_both_reverts_put_every_value_back(database_url, engine):
    seed_messages(engine, 400)
    original = rows(engine)
    runner = Runner(database_url, flagship)
    [done] = runner.run(["body_to_parts"], undo=True, batch_size=64)
    assert done.state is State.SUCCESS and done.status.undo is True
    assert runner.status(["body_to_parts"])["body_to_parts"].undo_rows == 400
    [cleaned] = runner.run(
        ["cleanup_legacy_fields"], undo=True, batch_size=64, min_age=timedelta(0)
    )
    assert cleaned.state is State.SUCCESS
    with engine.connect() as conn:
        assert (
            conn.execute(sa.text("SELECT count(*) FROM messages WHERE body IS NOT NULL")).scalar()
            == 0
        )
    # The app writes a body again on one row after the cleanup: the revert keeps it.
    execute(engine, "UPDATE messages SET body = 'written by the app' WHERE id = 7")

    with pytest.raises(Refused, match="revert 'cleanup_legacy_fields' first"):
        runner.revert("body_to_parts")
    first = runner.revert("cleanup_legacy_fields", batch_size=50)
    assert (first.state, first.kept, first.kept_ids) == (State.SUCCESS, 1, [7])
    second = runner.revert("body_to_parts", batch_size=50)
    assert (second.state, second.reverted, second.kept) == (State.SUCCESS, 400, 0)

    expected = [
        (*row[:3], "written by the app", *row[4:]) if row[0] == 7 else row for row in original
    ]
    body = list(sa.inspect(engine).get_columns("messages"))
    assert [c["name"] for c in body][3] == "body"
    assert rows(engine) == expected
    report = runner.status()
    for name in ("body_to_parts", "cleanup_legacy_fields"):
        assert report[name].state is State.PENDING and report[name].revert is None
        assert report[name].undo_rows == 0 and report[name].processed == 0
    kinds = [(e.kind, e.migration, e.outcome) for e in runner.history()][:2]
    assert kinds == [
        ("revert", "body_to_parts", State.SUCCESS),
        ("revert", "cleanup_legacy_fields", State.SUCCESS),
    ]
    runner.db.dispose()


@pytest.fixture
def items(engine):
    counting.create_items(engine, ROWS)
    return rows(engine, "items")


def counting_runner(url: str, **kwargs: object) -> Runner:
    return Runner(url, counting.migrations, **kwargs)  # type: ignore[arg-type]


def cancel_after(runner: Runner, batches: int) -> None:
    seen = []

    def listener(event: Event) -> None:
        if isinstance(event, BatchCommitted):
            seen.append(event)
            if len(seen) == batches:
                runner.cancel(NAME)

    runner.listeners.append(listener)


def test_a_failed_run_is_reverted(database_url, engine, items):
    execute(engine, "UPDATE items SET source = 'bad:x' WHERE id = 120")
    before = rows(engine, "items")
    runner = counting_runner(database_url)
    [failed] = runner.run([NAME], undo=True, batch_size=50)
    assert failed.state is State.FAILED and failed.status.processed == 100
    result = runner.revert(NAME)
    assert (result.state, result.reverted) == (State.SUCCESS, 2 * 100)  # derived and counter
    assert rows(engine, "items") == before
    assert runner.status([NAME])[NAME].state is State.PENDING
    runner.db.dispose()


def test_a_canceled_revert_stays_reverting_and_resumes(database_url, engine, items):
    runner = counting_runner(database_url)
    cancel_after(runner, 2)
    [canceled] = runner.run([NAME], undo=True, batch_size=50)
    assert canceled.state is State.CANCELED and canceled.status.processed == 100
    runner.listeners.clear()

    cancel_after(runner, 1)
    stopped = runner.revert(NAME, batch_size=30)
    assert (stopped.state, stopped.exit_code) == (State.CANCELED, 3)
    status = runner.status([NAME])[NAME]
    assert status.state is State.REVERTING
    assert status.revert is not None and str(status.revert.state) == "canceled"
    assert status.to_json()["revert"]["progress"] == {
        "processed": 30,
        "total": 200,
        "completed": False,
    }
    with pytest.raises(BeingReverted, match="finish it with `backfill revert derive`"):
        runner.run([NAME])
    with pytest.raises(BeingReverted):
        runner.reset(NAME)
    runner.listeners.clear()

    resumed = runner.revert(NAME, batch_size=30)
    assert (resumed.state, resumed.reverted) == (State.SUCCESS, 200)
    assert rows(engine, "items") == items
    outcomes = [(e.kind, e.outcome) for e in runner.history(NAME)]
    assert outcomes[:3] == [
        ("revert", State.SUCCESS),
        ("cancel", None),
        ("revert", State.CANCELED),
    ]
    runner.db.dispose()


def test_an_interrupted_run_and_a_reset_run_are_reverted(database_url, engine, items):
    runner = counting_runner(database_url)
    cancel_after(runner, 1)
    runner.run([NAME], undo=True, batch_size=50)
    runner.listeners.clear()
    # Its runner died mid-run: a stale heartbeat on a row left in progress.
    execute(engine, "UPDATE _migrations SET state = 'inProgress', heartbeat_at = 1.0")
    assert runner.status([NAME])[NAME].state is State.INTERRUPTED
    assert runner.revert(NAME).reverted == 100
    assert rows(engine, "items") == items

    runner.run([NAME], undo=True)
    runner.reset(NAME)  # forgets progress, keeps the log
    status = runner.status([NAME])[NAME]
    assert status.state is State.PENDING and status.undo_rows == 2 * ROWS
    assert runner.revert(NAME).reverted == 2 * ROWS
    assert rows(engine, "items") == items
    runner.db.dispose()


def test_forget_undo_ends_a_revert_and_a_run_without_the_log_cannot_be_reverted(
    database_url, engine, items
):
    runner = counting_runner(database_url)
    runner.run([NAME], undo=True, batch_size=50)
    cancel_after(runner, 1)
    runner.revert(NAME, batch_size=40)
    runner.listeners.clear()
    assert runner.status([NAME])[NAME].state is State.REVERTING
    assert runner.forget_undo(NAME) is True
    status = runner.status([NAME])[NAME]
    assert (status.state, status.undo_rows, status.revert) == (State.PENDING, 0, None)
    assert runner.forget_undo(NAME) is False

    runner.run([NAME], restart=True)  # no log
    with pytest.raises(Refused, match="batches of its run were not logged"):
        runner.revert(NAME)
    assert runner.status([NAME])[NAME].state is State.SUCCESS
    runner.db.dispose()


def test_one_run_one_choice_and_what_cannot_be_undone_is_refused(database_url, engine, items):
    runner = counting_runner(database_url)
    cancel_after(runner, 1)
    runner.run([NAME], undo=True, batch_size=50)
    runner.listeners.clear()
    with pytest.raises(Refused, match="was run with --undo; resume it with --undo"):
        runner.run([NAME], undo=False)
    [resumed] = runner.run([NAME], batch_size=50)  # inherits the log
    assert resumed.status.undo is True and resumed.status.undo_rows == 2 * ROWS

    logged = Runner(database_url, counting.logged)
    with pytest.raises(Refused, match="takes a Context: what its function writes"):
        logged.run([NAME], undo=True, restart=True)
    # In prod (prefer_undo), one that cannot be undone runs without a log.
    [plain] = logged.run([NAME], restart=True, prefer_undo=True)
    assert plain.state is State.SUCCESS and plain.status.undo is False
    runner.db.dispose()
    logged.db.dispose()


def test_a_revert_clears_what_verify_found_and_reverting_a_copy_deletes_only_its_rows(
    database_url, engine
):
    seed_messages(engine, 120)
    messages_v2.create(engine)
    # A row the new code wrote first (the copy keeps it), and one the app edits after the copy.
    execute(
        engine,
        "INSERT INTO messages_v2 (id, conversation_id, role, parts, created_at) "
        "SELECT id, conversation_id, role, '[]', created_at FROM messages WHERE id = 3",
    )
    before = rows(engine, "messages_v2")
    runner = Runner(database_url, new_table.migrations)
    [copied] = runner.run(["copy_to_messages_v2"], undo=True, batch_size=50)
    assert copied.status.changed == 119
    runner.verify("copy_to_messages_v2")
    assert runner.status()["copy_to_messages_v2"].verified is not None
    execute(engine, "UPDATE messages_v2 SET role = 'system' WHERE id = 11")

    result = runner.revert("copy_to_messages_v2", batch_size=40)
    assert (result.reverted, result.kept, result.kept_ids) == (118, 1, [11])
    left = rows(engine, "messages_v2")
    assert [r[0] for r in left] == [3, 11] and left[0] == before[0]
    status = runner.status()["copy_to_messages_v2"]
    assert status.verified is None and status.state is State.PENDING
    assert len(rows(engine)) == 120  # the source is never written
    runner.db.dispose()


def test_a_revert_is_refused_while_a_run_holds_the_migration(database_url, engine, items):
    runner = counting_runner(database_url)
    runner.run([NAME], undo=True)
    execute(
        engine,
        "UPDATE _migrations SET state = 'inProgress', heartbeat_at = :t, runner_host = 'elsewhere'",
        t=time.time(),
    )
    with pytest.raises(Refused, match="elsewhere"):
        runner.revert(NAME)
    runner.db.dispose()


def test_forget_undo_closes_a_dead_reverts_history_row(database_url, engine, items):
    runner = counting_runner(database_url)
    runner.run([NAME], undo=True, batch_size=50)
    cancel_after(runner, 2)
    runner.revert(NAME, batch_size=40)
    runner.listeners.clear()
    # As if that revert had been killed after its second batch instead.
    execute(engine, "UPDATE _migrations SET revert_state = 'inProgress', heartbeat_at = 1.0")
    execute(
        engine,
        "UPDATE _migration_runs SET finished_at = NULL, outcome = NULL, exit_code = NULL, "
        "processed = NULL, changed = NULL WHERE kind = 'revert'",
    )
    status = runner.status([NAME])[NAME]
    assert status.revert is not None and status.revert.state is State.INTERRUPTED
    [dead] = [e for e in runner.history(NAME) if e.kind == "revert"]
    assert (dead.outcome, dead.processed, dead.changed) == (State.INTERRUPTED, 80, 80)

    assert runner.forget_undo(NAME)
    runner.run([NAME], restart=True)
    [closed] = [e for e in runner.history(NAME) if e.kind == "revert"]
    assert closed.finished_at is not None and (closed.processed, closed.changed) == (80, 80)
    runner.db.dispose()


def test_a_revert_going_on_is_seen_going_on_in_the_history(database_url, engine, items):
    runner = counting_runner(database_url)
    runner.run([NAME], undo=True, batch_size=50)
    seen = []

    def look(event: Event) -> None:
        if isinstance(event, BatchCommitted) and not seen:
            seen.append(runner.run_entry(NAME))

    runner.listeners.append(look)
    runner.revert(NAME, batch_size=100)
    [entry] = seen
    assert entry is not None and (entry.kind, entry.outcome) == ("revert", State.IN_PROGRESS)
    assert entry.processed == 100 and entry.to_json()["outcome"] is None
    runner.db.dispose()

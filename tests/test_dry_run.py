"""Dry run: real batches on the real code path, rolled back; nothing persists, not even state."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from backfill import RowFailed, State
from backfill.store.database import Database
from chat_migrations import derive_parts
from support import after_each_batch, rows

ROWS = 1000
ENGINE_TABLES = ("_migrations", "_migration_errors")


def snapshot(db: Database) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table, the engine's own included (absent ones read as empty: creating
    the engine's empty tables on first use is not saving anything)."""
    present = set(sa.inspect(db.engine).get_table_names()) - {"_backfill_schema"}
    return {
        name: rows(db.engine, f'SELECT * FROM "{name}" ORDER BY 1') if name in present else []
        for name in sorted(present | set(ENGINE_TABLES))
    }


def engine_tables(db: Database) -> dict[str, list[tuple[object, ...]]]:
    found = snapshot(db)
    return {name: found[name] for name in ENGINE_TABLES}


def legacy(db: Database) -> dict[int, tuple[Any, Any]]:
    return {
        r[0]: (r[1], r[2])
        for r in rows(db.engine, "SELECT id, body, thinking_content FROM messages")
    }


def execute(db: Database, sql: str, *params: Any) -> None:
    with db.engine.begin() as conn:
        conn.exec_driver_sql(sql, params)


def test_dry_run_persists_nothing_and_reports_samples(seeded, runner):
    db = seeded(ROWS)
    messages_before = snapshot(db)["messages"]
    engine_before = engine_tables(db)
    fields = legacy(db)

    [result] = runner.run(["body_to_parts"], dry_run=True, batch_size=100)

    report = result.dry_run
    assert report is not None
    assert (report.batches, report.rows, report.would_change) == (1, 100, 100)
    assert (report.would_skip, report.would_keep) == (0, 0)
    assert [s.key for s in report.samples] == [(i,) for i in range(1, 11)]
    for sample in report.samples:
        assert sample.before == {"parts": None}
        assert sample.after == {"parts": derive_parts(*fields[sample.key[0]])}
    assert result.state is State.PENDING and result.status.processed == 0
    assert snapshot(db)["messages"] == messages_before
    assert engine_tables(db) == engine_before
    assert "_migrations" not in sa.inspect(db.engine).get_table_names()
    assert runner.status()["body_to_parts"].state is State.PENDING
    assert runner.count("body_to_parts").remaining == ROWS


def test_would_change_counts_only_rows_that_would_change(seeded, runner):
    db = seeded(ROWS)
    # New code already wrote parts for a third of the first batch: those rows stay as they are.
    execute(db, "UPDATE messages SET parts = '[]' WHERE id <= 100 AND id % 3 = 0")
    before = snapshot(db)

    [result] = runner.run(["body_to_parts"], dry_run=True, batch_size=100)

    report = result.dry_run
    assert report is not None
    assert (report.rows, report.would_change) == (100, 67)
    assert len(report.samples) == 10
    assert all(s.key[0] % 3 != 0 for s in report.samples)
    assert snapshot(db) == before


def test_dry_run_batches_reads_that_many_batches_and_stops_at_the_end(seeded, runner):
    db = seeded(ROWS)
    before = snapshot(db)

    [three] = runner.run(["body_to_parts"], dry_run=True, dry_run_batches=3, batch_size=100)
    assert three.dry_run is not None
    assert (three.dry_run.batches, three.dry_run.rows, three.dry_run.would_change) == (3, 300, 300)
    assert len(three.dry_run.samples) == 10

    [past_the_end] = runner.run(["body_to_parts"], dry_run=True, dry_run_batches=5, batch_size=400)
    assert past_the_end.dry_run is not None
    assert (past_the_end.dry_run.batches, past_the_end.dry_run.rows) == (3, ROWS)
    assert past_the_end.dry_run.would_change == ROWS
    assert snapshot(db) == before


def test_dry_run_of_a_half_done_migration_starts_at_its_cursor_and_keeps_its_state(seeded, runner):
    db = seeded(ROWS)

    def cancel_after_three_batches(status):
        if status.processed >= 300:
            runner.cancel("body_to_parts")

    [canceled] = runner.run(
        ["body_to_parts"], batch_size=100, listeners=[after_each_batch(cancel_after_three_batches)]
    )
    assert canceled.state is State.CANCELED and canceled.status.processed == 300
    before = snapshot(db)

    [result] = runner.run(["body_to_parts"], dry_run=True, dry_run_batches=2, batch_size=100)

    report = result.dry_run
    assert report is not None
    assert report.samples[0].key == (301,)
    assert (report.rows, report.would_change) == (200, 200)
    assert result.state is State.CANCELED
    assert snapshot(db) == before  # the `_migrations` row too: cursor, counters, timestamps

    # The real run resumes at the same cursor and changes what the dry run only showed.
    [resumed] = runner.run(["body_to_parts"], batch_size=100)
    assert resumed.state is State.SUCCESS
    assert (resumed.status.processed, resumed.status.changed) == (ROWS, ROWS)


def test_dry_run_after_success_would_change_nothing(seeded, runner):
    db = seeded(300)
    runner.run(["body_to_parts"], batch_size=100)
    before = snapshot(db)

    [result] = runner.run(["body_to_parts"], dry_run=True, batch_size=100)

    assert result.dry_run is not None
    assert (result.dry_run.rows, result.dry_run.would_change, result.dry_run.samples) == (
        100,
        0,
        [],
    )
    assert result.state is State.SUCCESS
    assert snapshot(db) == before


def test_dry_run_records_no_skipped_rows_and_no_failure(seeded, runner):
    db = seeded(ROWS)
    execute(db, "UPDATE messages SET body = ? WHERE id = 5", b"\x00blob")
    before = snapshot(db)

    [skipping] = runner.run(["body_to_parts"], dry_run=True, on_error="skip", batch_size=100)
    assert skipping.dry_run is not None
    assert (skipping.dry_run.would_skip, skipping.dry_run.would_change) == (1, 99)
    assert 5 not in [s.key[0] for s in skipping.dry_run.samples]
    assert snapshot(db) == before

    try:
        results = runner.run(["body_to_parts"], dry_run=True, on_error="fail", batch_size=100)
    except RowFailed as error:
        failure = error
    else:
        failure = results[0].error
    assert failure is not None and (failure.row_id, failure.field) == (5, "body")
    assert snapshot(db) == before
    assert runner.status()["body_to_parts"].state is State.PENDING


def test_dry_run_of_a_failed_migration_keeps_its_error(seeded, runner):
    db = seeded(ROWS)
    execute(db, "UPDATE messages SET body = ? WHERE id = 250", b"\x00blob")
    [failed] = runner.run(["body_to_parts"], batch_size=100)
    assert failed.state is State.FAILED
    execute(db, "UPDATE messages SET body = 'fixed' WHERE id = 250")
    before = snapshot(db)

    [result] = runner.run(["body_to_parts"], dry_run=True, batch_size=100)

    assert result.dry_run is not None and result.dry_run.samples[0].key == (201,)
    assert result.dry_run.would_change == 100
    assert result.state is State.FAILED
    assert result.status.error is not None and result.status.error.row_id == 250
    assert snapshot(db) == before


def test_dry_run_of_cleanup_shows_what_it_would_clear_and_keep(seeded, runner):
    db = seeded(300)
    runner.run(["body_to_parts"], batch_size=100)
    execute(db, "UPDATE messages SET body = body || ' (edited)' WHERE id = 4")
    fields = legacy(db)
    before = snapshot(db)

    [result] = runner.run(
        ["cleanup_legacy_fields"], dry_run=True, batch_size=100, min_age=timedelta(0)
    )

    report = result.dry_run
    assert report is not None
    assert (report.rows, report.would_change, report.would_keep) == (100, 99, 1)
    assert 4 not in [s.key[0] for s in report.samples] and len(report.samples) == 10
    for sample in report.samples:
        body, thinking = fields[sample.key[0]]
        cleared = {"body": body} | ({"thinking_content": thinking} if thinking is not None else {})
        assert sample.before == cleared
        assert sample.after == {name: None for name in cleared}
    assert result.state is State.PENDING
    assert snapshot(db) == before


# -- the CLI -------------------------------------------------------------------------------------


def test_cli_dry_run_says_nothing_was_saved_and_exits_0(seeded, runner, cli):
    db = seeded(300)
    before = snapshot(db)

    dry = cli("run", "body_to_parts", "--dry-run", "--batch-size", "50")

    assert dry.returncode == 0, dry.stderr
    assert "nothing was saved" in dry.stdout.lower()
    assert "50 would change" in dry.stdout
    assert "row 1:" in dry.stdout and "row 10:" in dry.stdout and "row 11:" not in dry.stdout
    assert snapshot(db) == before
    status = json.loads(cli("status", "body_to_parts", "--json").stdout)["body_to_parts"]
    assert status["state"] == "pending" and status["progress"]["processed"] == 0

    as_json = cli(
        "run",
        "body_to_parts",
        "--dry-run",
        "--dry-run-batches",
        "3",
        "--json",
        "--batch-size",
        "50",
    )
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)["body_to_parts"]
    assert document["state"] == "pending"
    report = document["dry_run"]
    assert (report["batches"], report["rows"], report["would_change"]) == (3, 150, 150)
    assert len(report["samples"]) == 10
    fields = legacy(db)
    for sample in report["samples"]:
        assert sample["before"] == {"parts": None}
        assert sample["after"] == {"parts": derive_parts(*fields[sample["row_id"]])}
    assert snapshot(db) == before
    assert runner.status()["body_to_parts"].state is State.PENDING


@pytest.mark.parametrize("batches", ["0", "-1"])
def test_cli_refuses_fewer_than_one_dry_run_batch(seeded, cli, batches):
    seeded(10)
    refused = cli("run", "body_to_parts", "--dry-run", "--dry-run-batches", batches)
    assert refused.returncode == 2
    assert "Traceback" not in refused.stderr


def test_dry_run_and_status_on_a_fresh_database_create_no_tables(seeded, runner):
    db = seeded(50)
    before = set(sa.inspect(db.engine).get_table_names())
    [result] = runner.run(["body_to_parts"], dry_run=True)
    assert result.dry_run is not None and result.dry_run.would_change == 50
    assert runner.status()["body_to_parts"].state is State.PENDING
    assert runner.verify("body_to_parts").remaining == 50
    assert set(sa.inspect(db.engine).get_table_names()) == before

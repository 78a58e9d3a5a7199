"""Work on the next batch is done ahead on SQLite: on the Python path its rows are read and
decided while the current batch commits; on the SQL path its rows are prepared (counted, their
text decoded, the guard checked) while the current batch's UPDATE runs. That work may only be
used when nothing else committed in between. These tests commit in between, from a listener
of each batch's event (called after it commits, when the next batch has already been worked
ahead), as the application would from another connection, and check that no stale work is used.
"""

from __future__ import annotations

import json
import math
import sqlite3

import pytest
import sqlalchemy as sa

from backfill import Migrations, Runner, State
from chat_migrations import derive_parts
from support import after_each_batch, rows

BATCH = 100


@pytest.fixture(params=["sql", "python"])
def path(request: pytest.FixtureRequest) -> bool:
    """Whether the flagship's batches are decided by its SQL (the default) or its function."""
    return bool(request.param == "sql")


def app_write(db_path: str, sql: str, *params: object) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute(sql, params)
    finally:
        conn.close()


def path_of(db) -> str:
    return db.engine.url.database


def test_an_edit_after_the_read_ahead_is_migrated_from_the_edited_row(seeded, runner, path):
    db = seeded(3 * BATCH)
    edited = BATCH + 50  # in the second batch, read ahead while the first one commits

    def edit_once(status):
        if status.processed == BATCH:
            app_write(
                path_of(db),
                "UPDATE messages SET body = 'edited', thinking_content = NULL WHERE id = ?",
                edited,
            )

    [result] = runner.run(
        ["body_to_parts"], batch_size=BATCH, listeners=[after_each_batch(edit_once)], sql=path
    )

    assert result.state is State.SUCCESS and result.status.changed == 3 * BATCH
    [(parts,)] = rows(db.engine, f"SELECT parts FROM messages WHERE id = {edited}")
    assert json.loads(parts) == [{"type": "text", "text": "edited"}]


def test_parts_written_by_new_code_after_the_read_ahead_are_left_alone(seeded, runner, path):
    db = seeded(3 * BATCH)
    dual_written = BATCH + 1
    new_parts = [{"type": "text", "text": "written by the new code"}]

    def dual_write_once(status):
        if status.processed == BATCH:
            app_write(
                path_of(db),
                "UPDATE messages SET parts = ? WHERE id = ?",
                json.dumps(new_parts),
                dual_written,
            )

    [result] = runner.run(
        ["body_to_parts"], batch_size=BATCH, listeners=[after_each_batch(dual_write_once)], sql=path
    )

    assert result.state is State.SUCCESS
    assert result.status.changed == 3 * BATCH - 1
    [(parts,)] = rows(db.engine, f"SELECT parts FROM messages WHERE id = {dual_written}")
    assert json.loads(parts) == new_parts


def test_every_batch_is_written_exactly_once_across_read_aheads(seeded, runner, path):
    db = seeded(10 * BATCH + 7)
    before = rows(db.engine, "SELECT id, body, thinking_content FROM messages ORDER BY id")

    [result] = runner.run(
        ["body_to_parts"],
        batch_size=BATCH,
        listeners=[after_each_batch(lambda status: None)],
        sql=path,
    )

    assert (result.status.processed, result.status.changed) == (10 * BATCH + 7,) * 2
    after = dict(rows(db.engine, "SELECT id, parts FROM messages"))
    for message_id, body, thinking in before:
        assert json.loads(after[message_id]) == derive_parts(body, thinking)
    [again] = runner.run(["body_to_parts"], restart=True, sql=path)
    assert (again.status.processed, again.status.changed) == (10 * BATCH + 7, 0)


def test_a_row_made_bad_after_the_read_ahead_fails_naming_it(seeded, runner, path):
    # TEXT that is not UTF-8: SQLite's JSON functions would copy its bytes into parts, so on
    # the SQL path the batch's text is decoded first (done ahead): that check must not be
    # trusted after the app's write, or the bad row would be migrated instead of named.
    db = seeded(3 * BATCH)
    made_bad = BATCH + 30

    def write_bad_text_once(status):
        if status.processed == BATCH:
            app_write(
                path_of(db), "UPDATE messages SET body = CAST(x'80' AS TEXT) WHERE id = ?", made_bad
            )

    [result] = runner.run(
        ["body_to_parts"],
        batch_size=BATCH,
        listeners=[after_each_batch(write_bad_text_once)],
        sql=path,
    )

    assert result.state is State.FAILED
    assert result.error is not None
    assert (result.error.row_id, result.error.field) == (made_bad, "body")
    assert result.status.processed == BATCH
    assert rows(db.engine, "SELECT count(*) FROM messages WHERE parts IS NULL") == [(2 * BATCH,)]


@pytest.mark.parametrize("change", ["delete", "insert"])
def test_rows_deleted_or_inserted_after_the_read_ahead_are_counted_as_they_are(
    seeded, runner, path, change
):
    # The next batch's rows were counted ahead: after the app deletes one of them, or inserts
    # a legacy message among them, the batch counts (and migrates) the rows it finds.
    db = seeded(3 * BATCH)
    moved = BATCH + 20
    if change == "insert":
        app_write(path_of(db), "DELETE FROM messages WHERE id = ?", moved)  # a gap to fill

    def change_once(status):
        if status.processed != BATCH:
            return
        if change == "delete":
            app_write(path_of(db), "DELETE FROM messages WHERE id = ?", moved)
        else:
            app_write(
                path_of(db),
                "INSERT INTO messages (id, conversation_id, role, body, created_at)"
                " VALUES (?, 1, 'user', 'inserted', '2026-01-01 00:00:00')",
                moved,
            )

    [result] = runner.run(
        ["body_to_parts"], batch_size=BATCH, listeners=[after_each_batch(change_once)], sql=path
    )

    [(count,)] = rows(db.engine, "SELECT count(*) FROM messages")
    assert count == (3 * BATCH - 1 if change == "delete" else 3 * BATCH)
    assert result.state is State.SUCCESS
    assert (result.status.processed, result.status.changed) == (count, count)
    assert rows(db.engine, "SELECT count(*) FROM messages WHERE parts IS NULL") == [(0,)]


# -- values that cannot be stored as JSON are errors on their own row -------------------------

documents = sa.Table(
    "documents",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("doc", sa.JSON),
)
storing = Migrations()


@storing.migration(table=documents, batch_size=4)
def fill(row):
    if row["id"] == 6:
        return {"doc": {"ratio": math.nan}}
    if row["id"] == 7:
        return {"doc": {"when": object()}}
    return {"doc": {"id": row["id"]}}


@storing.migration(table=documents, batch_size=4)
def fill_then_raise(row):
    """Row 6 cannot be stored; row 7 raises in the function, after it in the same batch."""
    if row["id"] == 6:
        return {"doc": {"ratio": math.inf}}
    if row["id"] == 7:
        raise ValueError("row 7 is broken")
    return {"doc": {"id": row["id"]}}


@pytest.fixture
def documents_db(db):
    documents.create(db.engine)
    with db.engine.begin() as conn:
        conn.execute(documents.insert(), [{"id": i} for i in range(1, 11)])
    return db


def test_an_unstorable_value_fails_its_row_naming_the_field(documents_db):
    [result] = Runner(documents_db, storing).run(["fill"])

    assert result.state is State.FAILED
    assert result.error is not None
    assert (result.error.row_id, result.error.field) == (6, "doc")
    assert "JSON" in result.error.message
    stored = rows(documents_db.engine, "SELECT id, doc FROM documents ORDER BY id")
    assert [doc for _, doc in stored[4:]] == [None] * 6  # the failing batch rolled back whole


def test_unstorable_values_are_skipped_and_the_rest_written(documents_db):
    [result] = Runner(documents_db, storing).run(["fill"], on_error="skip")

    assert result.state is State.SUCCESS
    assert (result.status.changed, result.status.skipped_errors) == (8, 2)
    stored = dict(rows(documents_db.engine, "SELECT id, doc FROM documents"))
    assert stored[6] is None and stored[7] is None  # SQL NULL, never the text 'NaN'
    assert json.loads(stored[5]) == {"id": 5}


def test_the_first_bad_row_is_reported_even_when_it_fails_only_in_encoding(documents_db):
    # Rows 5..8 are decided ahead, while rows 1..4 commit, and encoded later: the batch is done
    # again in order, so the failure is row 6's (unstorable), not row 7's (raised first).
    [result] = Runner(documents_db, storing).run(["fill_then_raise"])

    assert result.state is State.FAILED
    assert result.error is not None
    assert (result.error.row_id, result.error.field) == (6, "doc")
    assert result.status.processed == 4

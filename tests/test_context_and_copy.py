"""A function given the batch's connection, batch functions, and copies into another table: what
they write commits or rolls back with the batch, bad rows are still named, copies never duplicate.
On every dialect."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from backfill import BadValue, Context, Migrations, Runner, State

metadata = sa.MetaData()

notes = sa.Table(
    "notes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("body", sa.Text),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("done", sa.Boolean, nullable=False, default=False),
)
audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("note_id", sa.Integer, nullable=False),
)
notes_v2 = sa.Table(
    "notesV2",
    metadata,
    sa.Column("noteId", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("parts", sa.JSON(none_as_null=True)),
    sa.Column("kind", sa.String(20), nullable=False),
)

ROWS = 40
BAD = 23  # the row whose body is NULL: every function here refuses it

app = Migrations()


def checked_body(row: dict[str, object]) -> str:
    if row["body"] is None:
        raise BadValue("body", "is missing")
    return str(row["body"])


def parts_of(body: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": body}]


@app.migration(table=notes, batch_size=5)
def mark_with_audit(row, ctx: Context):
    """Writes an audit row per note through the batch's connection."""
    ctx.conn.execute(sa.insert(audit).values(note_id=row["id"]))
    checked_body(row)  # after the write: a refused row must take its audit row with it
    return {"done": True}


@app.batch_migration(table=notes, batch_size=6)
def mark_in_sql(rows, ctx: Context):
    """One set-based UPDATE per batch; returns how many rows it changed."""
    ids = [r["id"] for r in rows]
    for row in rows:
        checked_body(row)
    result = ctx.conn.execute(
        sa.update(notes).where(notes.c.id.in_(ids), notes.c.done.is_(False)).values(done=True)
    )
    return result.rowcount


@app.batch_migration(table=notes, batch_size=6)
def mark_each(rows):
    """A batch function returning a change per row."""
    return [{"done": True} if checked_body(r) else None for r in rows]


@app.copy(source=notes, target=notes_v2, batch_size=7, where=lambda t: t.c.kind != "draft")
def copy_notes(row):
    return {"noteId": row["id"], "parts": parts_of(checked_body(row)), "kind": row["kind"]}


@app.copy(source=notes, target=notes_v2, batch_size=7, existing="update", name="copy_update")
def copy_notes_update(row):
    return {"noteId": row["id"], "parts": parts_of(checked_body(row)), "kind": row["kind"]}


@pytest.fixture
def engine(database_url):
    engine = sa.create_engine(database_url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(notes),
            [
                {
                    "id": i,
                    "body": None if i == BAD else f"note {i}",
                    "kind": "draft" if i % 4 == 0 else "final",
                    "done": False,
                }
                for i in range(1, ROWS + 1)
            ],
        )
    yield engine
    engine.dispose()


def fetch(engine: sa.Engine, *columns) -> list[tuple[object, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(*columns).order_by(*columns[:1]))]


def done_ids(engine: sa.Engine) -> list[object]:
    return [i for i, done in fetch(engine, notes.c.id, notes.c.done) if done]


def audited(engine: sa.Engine) -> list[object]:
    return sorted(i for (i,) in fetch(engine, audit.c.note_id))


def without(row: int) -> list[int]:
    return [i for i in range(1, ROWS + 1) if i != row]


def test_what_the_function_writes_commits_with_its_batch_or_rolls_back_with_it(
    engine, database_url
):
    runner = Runner(database_url, app)

    [failed] = runner.run(["mark_with_audit"])

    assert failed.state is State.FAILED and failed.status.error is not None
    assert (failed.status.error.row_id, failed.status.error.field) == (BAD, "body")
    # Batches of 5: rows 1..20 committed with their audit rows; the failing batch left none.
    assert done_ids(engine) == list(range(1, 21))
    assert audited(engine) == list(range(1, 21))

    [skipped] = runner.run(["mark_with_audit"], on_error="skip")

    assert skipped.state is State.SUCCESS and skipped.status.skipped_errors == 1
    assert done_ids(engine) == without(BAD)
    # The skipped row's audit row went with it (a savepoint per row); the others' stayed.
    assert audited(engine) == without(BAD)


def test_verify_and_dry_runs_roll_back_what_the_function_writes(engine, database_url):
    runner = Runner(database_url, app)

    check = runner.verify("mark_with_audit")
    [dry] = runner.run(["mark_with_audit"], dry_run=True, dry_run_batches=2, on_error="skip")

    assert check.remaining == ROWS - 1 and check.raising_ids == [BAD]
    assert dry.dry_run is not None and dry.dry_run.would_change == 10
    assert audited(engine) == [] and done_ids(engine) == []


def test_a_batch_function_may_change_rows_itself_in_one_statement(engine, database_url):
    runner = Runner(database_url, app)

    [failed] = runner.run(["mark_in_sql"])

    # The batch raised; called again row by row, the bad row is named.
    assert failed.state is State.FAILED and failed.status.error is not None
    assert (failed.status.error.row_id, failed.status.error.field) == (BAD, "body")
    assert done_ids(engine) == list(range(1, 19))  # three batches of 6

    [skipped] = runner.run(["mark_in_sql"], on_error="skip")

    assert skipped.state is State.SUCCESS
    assert done_ids(engine) == without(BAD)
    assert skipped.status.changed == ROWS - 1 and skipped.status.skipped_errors == 1


def test_a_batch_function_may_return_a_change_per_row(engine, database_url):
    runner = Runner(database_url, app)

    [result] = runner.run(["mark_each"], on_error="skip")

    assert result.state is State.SUCCESS
    assert result.status.changed == ROWS - 1 and result.status.skipped_errors == 1
    assert done_ids(engine) == without(BAD)


def copied(engine: sa.Engine) -> list[tuple[object, ...]]:
    return fetch(engine, notes_v2.c.noteId, notes_v2.c.parts, notes_v2.c.kind)


def expected_copy(ids: list[int]) -> list[tuple[object, ...]]:
    kinds = {i: "draft" if i % 4 == 0 else "final" for i in ids}
    return [(i, [{"type": "text", "text": f"note {i}"}], kinds[i]) for i in ids]


def test_a_copy_fills_the_target_once_and_leaves_the_source_alone(engine, database_url):
    source_before = fetch(engine, *notes.columns)
    runner = Runner(database_url, app)
    finals = [i for i in without(BAD) if i % 4 != 0]

    assert runner.verify("copy_notes").remaining == len(finals)
    [result] = runner.run(["copy_notes"], on_error="skip")

    assert result.state is State.SUCCESS
    assert result.status.total == 30 and result.status.processed == 30  # drafts not in range
    assert result.status.changed == len(finals) and result.status.skipped_errors == 1
    assert copied(engine) == expected_copy(finals)
    assert fetch(engine, *notes.columns) == source_before
    assert runner.verify("copy_notes").remaining == 0

    # Re-running from the beginning duplicates nothing and changes nothing.
    [again] = runner.run(["copy_notes"], restart=True, on_error="skip")
    assert again.status.changed == 0
    assert copied(engine) == expected_copy(finals)


def test_a_copy_keeps_rows_the_app_wrote_unless_told_to_update_them(engine, database_url):
    with engine.begin() as conn:  # new code dual-wrote row 2 already, with newer text
        conn.execute(sa.insert(notes_v2).values(noteId=2, parts=parts_of("edited"), kind="final"))
    runner = Runner(database_url, app)

    [kept] = runner.run(["copy_notes"], on_error="skip")
    assert kept.state is State.SUCCESS
    assert dict((i, p) for i, p, _ in copied(engine))[2] == parts_of("edited")

    assert runner.verify("copy_update").remaining == 1 + 10  # row 2 differs; drafts missing
    [dry] = runner.run(["copy_update"], dry_run=True, on_error="skip")
    assert dry.dry_run is not None
    sample = next(s for s in dry.dry_run.samples if s.key == (2,))
    assert sample.before["parts"] == parts_of("edited") and sample.after["parts"] == parts_of(
        "note 2"
    )
    [updated] = runner.run(["copy_update"], on_error="skip")
    assert updated.status.changed == 11
    assert copied(engine) == expected_copy(without(BAD))


def test_a_copy_row_must_name_its_target_key(database_url, engine):
    broken = Migrations()
    broken.copy(source=notes, target=notes_v2, name="no_key")(lambda row: {"kind": row["kind"]})

    [failed] = Runner(database_url, broken).run(["no_key"])

    assert failed.state is State.FAILED and failed.status.error is not None
    assert (failed.status.error.row_id, failed.status.error.field) == (1, "noteId")
    assert "must be set" in failed.status.error.message
    assert copied(engine) == []

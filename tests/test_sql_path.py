"""The SQL path (a migration's declared SqlChange) against the Python path, on PostgreSQL.

The flagship declares `body_to_parts` in SQL for PostgreSQL; the Python function stays the
truth. On the generated corpus and on a corpus of bad input PostgreSQL can hold, running it in
the database and running it in Python must leave every row identical, with the same counters.
A batch the database rejects is done again in Python: rows named under `fail`, recorded under
`skip`. And the declaration API refuses what it cannot do.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from backfill import BadValue, Migrations, Row, Runner, SqlChange, State
from backfill.store import expression
from backfill.store.database import Database
from chat_migrations import derive_parts, messages, migrations
from chat_migrations.generator import seed_messages
from conftest import backfill_command, cli_env

GENERATED = 3_000
NOW = datetime(2025, 1, 1, tzinfo=UTC)
LONG = "long text, " * 100_000 + "é😊"  # about 1.1 MB
NO_PARTS = object()  # a row the old code wrote: parts SQL NULL

# Legacy (body, thinking_content, parts) that PostgreSQL can hold, chosen to trip up a SQL
# translation of derive_parts: empty vs NULL vs whitespace, Unicode and escapes, JSON-looking
# text, very long text, rows with only thinking, and rows that already have parts of any shape
# (including a JSON `null`, which the driver hands to the function as None).
BAD_CORPUS: list[tuple[Any, Any, Any]] = [
    ("", None, NO_PARTS),
    ("", "", NO_PARTS),
    (None, None, NO_PARTS),
    (None, "", NO_PARTS),
    (" ", None, NO_PARTS),
    ("   ", "\t", NO_PARTS),
    ("\n", "\n\n", NO_PARTS),
    (None, "only thinking", NO_PARTS),
    ("", "only thinking, empty body", NO_PARTS),
    ("😊 emoji 👩‍👩‍👧‍👦 and flags 🇫🇷", None, NO_PARTS),
    ("e\u0301 combining, \u05e2\u05d1\u05e8\u05d9\u05ea rtl \u200f", "zero\u200bwidth", NO_PARTS),
    ("line\u2028separator\u2029paragraph", "control \x01\x07\x1b\x1f chars", NO_PARTS),
    ('quotes " and \\ backslash \\u0000 \\n', "'single' \"double\"", NO_PARTS),
    ('{"type": "text", "text": "json-looking"}', "[1, 2]", NO_PARTS),
    ("null", "true", NO_PARTS),
    ("\ud7ff \ue000 \U0010ffff \ufeff", "\u00a0", NO_PARTS),
    ("%s %(name)s {} $1 ?", "%%", NO_PARTS),
    (LONG, None, NO_PARTS),
    (LONG, LONG[:300_000], NO_PARTS),
    ("old body", None, [{"type": "text", "text": "new code wrote this"}]),
    ("old body", "old thinking", []),
    ("", None, {"not": "a list"}),
    (None, None, "a JSON string"),
    ("body", None, 0),
    ("body", "thinking", None),  # JSON null: the function sees None and writes parts
    (None, "thinking", None),
]


def _corpus_rows(first_id: int) -> list[dict[str, Any]]:
    rows = []
    for offset, (body, thinking, parts) in enumerate(BAD_CORPUS):
        row = {
            "id": first_id + offset,
            "conversation_id": 1,
            "role": "assistant",
            "body": body,
            "thinking_content": thinking,
            "created_at": NOW,
        }
        if parts is not NO_PARTS:
            row["parts"] = sa.JSON.NULL if parts is None else parts
        rows.append(row)
    return rows


def _insert_corpus(engine: sa.Engine, first_id: int) -> None:
    with engine.begin() as conn:
        for row in _corpus_rows(first_id):  # one by one: rows differ in the columns they set
            conn.execute(messages.insert().values(**row))


SNAPSHOT = (
    "SELECT id, conversation_id, role, body, thinking_content, parts, parts::text, created_at "
    "FROM messages ORDER BY id"
)


def _snapshot(engine: sa.Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.exec_driver_sql(SNAPSHOT)]


class _Spy:
    """Counts the batches decided in the database, and those it rejected."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.applied = 0
        self.rejected = 0
        original = expression.SqlBatch.apply

        def apply(batch: expression.SqlBatch, *args: Any, **kwargs: Any) -> Any:
            try:
                result = original(batch, *args, **kwargs)
            except expression.Rejected:
                self.rejected += 1
                raise
            self.applied += 1
            return result

        monkeypatch.setattr(expression.SqlBatch, "apply", apply)


def _both_paths(
    url: str, batch_size: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[Any], list[Any], Any, Any, _Spy]:
    """Run body_to_parts in SQL, put the legacy parts back, run it in Python; both results."""
    db = Database(url)
    try:
        with db.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE legacy AS SELECT id, parts FROM messages")
        before = _snapshot(db.engine)
        runner = Runner(db, migrations)
        spy = _Spy(monkeypatch)
        [in_sql] = runner.run(["body_to_parts"], batch_size=batch_size)
        assert in_sql.state is State.SUCCESS
        sql_rows = _snapshot(db.engine)
        assert spy.applied > 0 and spy.rejected == 0  # it did run in the database
        assert runner.verify("body_to_parts").clean  # and the function agrees with every row

        with db.engine.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE messages SET parts = legacy.parts FROM legacy WHERE messages.id = legacy.id"
            )
        assert _snapshot(db.engine) == before
        applied = spy.applied
        [in_python] = runner.run(["body_to_parts"], batch_size=batch_size, restart=True, sql=False)
        assert in_python.state is State.SUCCESS
        assert spy.applied == applied  # not a single batch in SQL this time
        python_rows = _snapshot(db.engine)
        return sql_rows, python_rows, in_sql.status, in_python.status, spy
    finally:
        db.dispose()


def _counters(status: Any) -> tuple[int, int, int, int]:
    return status.processed, status.changed, status.skipped_errors, status.total


def _expected(row: tuple[Any, ...], original_parts: Any) -> Any:
    """What the Python function leaves in `parts`, said independently of both paths."""
    if original_parts is None:
        return derive_parts(row[3], row[4])
    return original_parts


def test_generated_corpus_identical_in_sql_and_python(postgres_url, monkeypatch):
    db = Database(postgres_url)
    seed_messages(db.engine, GENERATED)
    db.dispose()
    sql_rows, python_rows, in_sql, in_python, _spy = _both_paths(postgres_url, 250, monkeypatch)
    assert sql_rows == python_rows
    assert len(sql_rows) == GENERATED
    assert _counters(in_sql) == _counters(in_python) == (GENERATED, GENERATED, 0, GENERATED)
    for row in sql_rows:
        assert row[5] == derive_parts(row[3], row[4])
    # The generated corpus has every shape the rule distinguishes.
    shapes = {tuple(part["type"] for part in row[5]) for row in sql_rows}
    assert shapes == {("text",), ("reasoning", "text"), ("reasoning",), ()}


@pytest.mark.parametrize("batch_size", [3, 1000])
def test_bad_input_corpus_identical_in_sql_and_python(postgres_url, monkeypatch, batch_size):
    db = Database(postgres_url)
    seed_messages(db.engine, 200)
    _insert_corpus(db.engine, 201)
    with db.engine.connect() as conn:
        original = dict(conn.execute(sa.select(messages.c.id, messages.c.parts)).all())
    db.dispose()
    sql_rows, python_rows, in_sql, in_python, _spy = _both_paths(
        postgres_url, batch_size, monkeypatch
    )
    assert sql_rows == python_rows
    total = 200 + len(BAD_CORPUS)
    already = sum(1 for *_, parts in BAD_CORPUS if parts is not NO_PARTS and parts is not None)
    assert _counters(in_sql) == _counters(in_python) == (total, total - already, 0, total)
    for row in sql_rows:
        assert row[5] == _expected(row, original[row[0]]), row[0]
    by_id = {row[0]: row for row in sql_rows}
    assert by_id[201][5] == []  # "" and NULL
    assert by_id[208][5] == [{"type": "reasoning", "text": "only thinking"}]
    assert by_id[205][5] == [{"type": "text", "text": " "}]  # whitespace is not empty
    assert by_id[201 + BAD_CORPUS.index((None, None, "a JSON string"))][6] == '"a JSON string"'


def test_flagship_runs_in_sql_from_the_cli(postgres_url, tmp_path: Path):
    db = Database(postgres_url)
    seed_messages(db.engine, 3_000)
    db.dispose()
    timings = tmp_path / "batches.txt"
    done = subprocess.run(
        backfill_command("run", "body_to_parts", "--json", "--database-url", postgres_url),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=cli_env(BACKFILL_BATCH_TIMINGS=str(timings)),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)["body_to_parts"]
    assert (status["state"], status["progress"]["processed"], status["changed"]) == (
        "success",
        3_000,
        3_000,
    )
    # Batches of the SQL path's own size, not the Python path's.
    assert status["batch_size"] == 2_500
    lines = [line.split() for line in timings.read_text().splitlines()]
    assert [int(rows) for _seconds, rows in lines] == [2_500, 500]
    assert all(float(seconds) > 0 for seconds, _rows in lines)


# -- a batch the database rejects ----------------------------------------------------------------

metadata = sa.MetaData()
readings = sa.Table(
    "readings",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("raw", sa.Text, nullable=False),
    sa.Column("value", sa.Integer),
)
BAD_IDS = (6, 13)
readings_migrations = Migrations()


@readings_migrations.migration(
    table=readings,
    batch_size=4,
    sql={
        "postgresql": lambda t: SqlChange(
            values={"value": sa.cast(sa.func.trim(t.c.raw), sa.Integer)},
            where=t.c.value.is_(None),
        )
    },
)
def parse_value(row: Row) -> dict[str, Any] | None:
    """Parse `raw` into `value`; the database's cast and this function reject the same text."""
    if row["value"] is not None:
        return None
    text = row["raw"].strip()
    if not text.lstrip("-").isdigit():
        raise BadValue("raw", f"is not an integer ({row['raw']!r})")
    return {"value": int(text)}


def _readings(url: str) -> Database:
    db = Database(url)
    metadata.create_all(db.engine)
    with db.engine.begin() as conn:
        conn.execute(
            readings.insert(),
            [
                {"id": i, "raw": "not a number" if i in BAD_IDS else f" {i * 10 - 50} "}
                for i in range(1, 19)
            ],
        )
    return db


def _values(db: Database) -> dict[int, int | None]:
    with db.engine.connect() as conn:
        return dict(conn.execute(sa.select(readings.c.id, readings.c.value)).all())  # type: ignore[arg-type]


def test_rejected_batches_are_redone_in_python_under_skip(postgres_url, monkeypatch):
    db = _readings(postgres_url)
    spy = _Spy(monkeypatch)
    try:
        runner = Runner(db, readings_migrations)
        [result] = runner.run(["parse_value"], on_error="skip")
        assert result.state is State.SUCCESS
        s = result.status
        assert (s.processed, s.changed, s.skipped_errors) == (18, 16, 2)
        # 5 batches of 4: the two holding a bad row were rejected, then done in Python.
        assert (spy.applied, spy.rejected) == (3, 2)
        values = _values(db)
        assert {i for i, v in values.items() if v is None} == set(BAD_IDS)
        assert all(values[i] == i * 10 - 50 for i in values if i not in BAD_IDS)
        skipped = runner.skipped_rows("parse_value")
        assert sorted(r["row_id"] for r in skipped) == list(BAD_IDS)
        assert {r["field"] for r in skipped} == {"raw"}
    finally:
        db.dispose()


def test_rejected_batch_names_the_row_under_fail(postgres_url, monkeypatch):
    db = _readings(postgres_url)
    spy = _Spy(monkeypatch)
    try:
        [result] = Runner(db, readings_migrations).run(["parse_value"])
        assert result.state is State.FAILED
        assert result.error is not None
        assert (result.error.row_id, result.error.field) == (6, "raw")
        assert "not an integer" in result.error.message
        assert (spy.applied, spy.rejected) == (1, 1)
        # The first batch committed in SQL; the failing batch left no trace.
        values = _values(db)
        assert [values[i] for i in range(1, 9)] == [-40, -30, -20, -10, None, None, None, None]
        assert result.status.processed == 4
    finally:
        db.dispose()


def test_python_only_never_uses_the_sql(postgres_url, monkeypatch):
    db = _readings(postgres_url)
    spy = _Spy(monkeypatch)
    try:
        [result] = Runner(db, readings_migrations).run(["parse_value"], on_error="skip", sql=False)
        assert (result.status.processed, result.status.changed) == (18, 16)
        assert (spy.applied, spy.rejected) == (0, 0)
    finally:
        db.dispose()


def test_sqlite_ignores_a_postgresql_declaration(sqlite_url, monkeypatch):
    db = _readings(sqlite_url)
    spy = _Spy(monkeypatch)
    try:
        [result] = Runner(db, readings_migrations).run(["parse_value"], on_error="skip")
        assert (result.status.processed, result.status.changed) == (18, 16)
        assert spy.applied == 0
    finally:
        db.dispose()


# -- declaring SQL -------------------------------------------------------------------------------


def test_sql_change_needs_values_and_where():
    with pytest.raises(ValueError, match="at least one column"):
        SqlChange(values={}, where=sa.true())
    with pytest.raises(ValueError, match="needs `where`"):
        SqlChange(values={"value": 1}, where=None)
    with pytest.raises(ValueError, match="at least 1"):
        SqlChange(values={"value": 1}, where=sa.true(), batch_size=0)


def test_batch_size_of_the_sql_path_applies_only_where_it_runs():
    flagship = migrations["body_to_parts"]
    assert flagship.default_batch_size("postgresql") == 2_500
    assert flagship.batch_size != 2_500
    assert flagship.default_batch_size("postgresql", sql=False) == flagship.batch_size
    assert flagship.default_batch_size("sqlite") == flagship.batch_size
    assert readings_migrations["parse_value"].default_batch_size("postgresql") == 4


def _register(sql: Any) -> Migrations:
    registry = Migrations()
    registry.migration(table=readings, sql=sql)(parse_value)
    return registry


def test_declared_columns_are_checked():
    with pytest.raises(ValueError, match="'nope', which is not a column"):
        _register({"postgresql": SqlChange(values={"nope": 1}, where=sa.true())})
    with pytest.raises(ValueError, match="may not write key column 'id'"):
        _register({"postgresql": SqlChange(values={"id": 1}, where=sa.true())})
    # A function of the table is checked when first used.
    lazy = _register({"postgresql": lambda t: SqlChange(values={"nope": 1}, where=sa.true())})
    with pytest.raises(ValueError, match="not a column"):
        lazy["parse_value"].sql_change("postgresql")
    wrong = _register({"postgresql": lambda t: {"value": 1}})
    with pytest.raises(TypeError, match="not a SqlChange"):
        wrong["parse_value"].sql_change("postgresql")
    assert wrong["parse_value"].sql_change("sqlite") is None

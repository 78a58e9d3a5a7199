"""The SQL path (a migration's declared SqlChange) against the Python path, on PostgreSQL and
SQLite.

The flagship declares `body_to_parts` in SQL for both; the Python function stays the truth. On
the generated corpus and on a corpus of tricky input both can hold, running it in the database
and running it in Python must leave every row identical, byte for byte, with the same counters.
On SQLite, which lets blobs, numbers and TEXT that is not UTF-8 into any column, a corpus of
such rows must be named under `fail` and recorded under `skip` exactly as in Python. A batch
the SQL cannot decide faithfully is done again in Python. And the declaration API refuses what
it cannot do.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from backfill import BadValue, Migrations, Row, Runner, SqlChange, State, batch
from backfill.store import expression
from backfill.store.database import Database
from backfill.store.expression import declared_change
from chat_migrations import derive_parts, messages, migrations
from chat_migrations.generator import generate_messages, seed_messages
from support import backfill_command, cli_env, rows

GENERATED = 3_000
NOW = datetime(2025, 1, 1, tzinfo=UTC)
LONG = "long text, " * 100_000 + "é😊"  # about 1.1 MB
NO_PARTS = object()  # a row the old code wrote: parts SQL NULL

# Legacy (body, thinking_content, parts) that PostgreSQL and SQLite can both hold, chosen to trip
# up a SQL translation of derive_parts: empty vs NULL vs whitespace, Unicode and escapes,
# JSON-looking text, very long text, rows with only thinking, and rows that already have parts
# of any shape (including a JSON `null`, which the driver hands to the function as None).
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


# Every row as stored: decoded parts (for the assertions), then parts as stored (jsonb's text;
# SQLite's storage class and bytes), so that both paths must write the very same bytes.
SNAPSHOT = {
    "postgresql": "SELECT id, conversation_id, role, body, thinking_content, parts, parts::text, "
    "created_at FROM messages ORDER BY id",
    "sqlite": "SELECT id, conversation_id, role, body, thinking_content, parts, "
    "typeof(parts) || ':' || hex(parts), created_at FROM messages ORDER BY id",
}


def _snapshot(engine: sa.Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        found = [list(row) for row in conn.exec_driver_sql(SNAPSHOT[engine.dialect.name])]
    if engine.dialect.name == "sqlite":  # the driver hands back JSON text
        for row in found:
            row[5] = json.loads(row[5]) if isinstance(row[5], str) else row[5]
    return [tuple(row) for row in found]


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Both dialects the flagship declares its SQL for."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'chat.db'}"
    return str(request.getfixturevalue("postgres_url"))


class _Spy:
    """Counts the batches decided in the database, and those it rejected (then done again in
    Python)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.applied = 0
        self.rejected = 0
        apply, next_batch = expression.SqlBatch.apply, batch.Batches._next

        def counted_apply(batch: expression.SqlBatch, *args: Any, **kwargs: Any) -> Any:
            result = apply(batch, *args, **kwargs)
            self.applied += 1
            return result

        def counted_next(batches: batch.Batches, in_database: Any) -> Any:
            try:
                return next_batch(batches, in_database)
            except expression.Rejected:
                self.rejected += 1
                raise

        monkeypatch.setattr(expression.SqlBatch, "apply", counted_apply)
        monkeypatch.setattr(batch.Batches, "_next", counted_next)


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


def test_generated_corpus_identical_in_sql_and_python(url, monkeypatch):
    db = Database(url)
    seed_messages(db.engine, GENERATED)
    db.dispose()
    sql_rows, python_rows, in_sql, in_python, _spy = _both_paths(url, 250, monkeypatch)
    assert sql_rows == python_rows
    assert len(sql_rows) == GENERATED
    assert _counters(in_sql) == _counters(in_python) == (GENERATED, GENERATED, 0, GENERATED)
    for row in sql_rows:
        assert row[5] == derive_parts(row[3], row[4])
    # The generated corpus has every shape the rule distinguishes.
    shapes = {tuple(part["type"] for part in row[5]) for row in sql_rows}
    assert shapes == {("text",), ("reasoning", "text"), ("reasoning",), ()}


@pytest.mark.parametrize("batch_size", [3, 1000])
def test_bad_input_corpus_identical_in_sql_and_python(url, monkeypatch, batch_size):
    db = Database(url)
    seed_messages(db.engine, 200)
    _insert_corpus(db.engine, 201)
    with db.engine.connect() as conn:
        original = dict(conn.execute(sa.select(messages.c.id, messages.c.parts)).all())
    db.dispose()
    sql_rows, python_rows, in_sql, in_python, _spy = _both_paths(url, batch_size, monkeypatch)
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
    assert by_id[201 + BAD_CORPUS.index((None, None, "a JSON string"))][5] == "a JSON string"


def test_flagship_runs_in_sql_from_the_cli(url, tmp_path: Path):
    db = Database(url)
    flagship = migrations["body_to_parts"]
    size = flagship.default_batch_size(declared_change(flagship, db.dialect))
    count = size + size // 5
    seed_messages(db.engine, count)
    db.dispose()
    events = tmp_path / "events.jsonl"
    done = subprocess.run(
        backfill_command(
            "run", "body_to_parts", "--json", "--events", str(events), "--database-url", url
        ),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)["body_to_parts"]
    assert (status["state"], status["progress"]["processed"], status["changed"]) == (
        "success",
        count,
        count,
    )
    # Batches of the SQL path's own size, not the Python path's.
    assert status["batch_size"] == size != migrations["body_to_parts"].batch_size
    batches = [e for e in map(json.loads, events.read_text().splitlines()) if e["event"] == "batch"]
    assert [b["rows_read"] for b in batches] == [size, size // 5]
    assert [b["rows_changed"] for b in batches] == [size, size // 5]
    assert [(b["first_key"], b["last_key"]) for b in batches] == [(1, size), (size + 1, count)]
    assert all(b["seconds"] > 0 and b["batch_size"] == size for b in batches)


# -- SQLite's bad input --------------------------------------------------------------------------

# A legacy table as loosely typed as SQLite allows: the legacy columns have no declared type, so
# numbers stay numbers there.
LOOSE_MESSAGES = """
CREATE TABLE messages (
    id INTEGER PRIMARY KEY, conversation_id INTEGER NOT NULL, role VARCHAR(16) NOT NULL,
    body, thinking_content, parts JSON, created_at DATETIME NOT NULL
)
"""
# (body, thinking_content, parts) as SQL, and the field the function names, if any.
SQLITE_CORPUS: list[tuple[str, str, str, str | None]] = [
    ("x'00ff6e6f74'", "NULL", "NULL", "body"),  # a blob
    ("'fine'", "x'89504e470d0a1a0a'", "NULL", "thinking_content"),
    ("CAST(x'80ff41' AS TEXT)", "NULL", "NULL", "body"),  # stray bytes, not UTF-8
    ("'ok'", "CAST(x'41c328' AS TEXT)", "NULL", "thinking_content"),  # a character cut short
    ("CAST(x'eda080' AS TEXT)", "NULL", "NULL", "body"),  # an encoded UTF-16 surrogate
    ("CAST(x'c0af' AS TEXT)", "NULL", "NULL", "body"),  # an overlong encoding
    ("'before a NUL' || char(0) || CAST(x'ff' AS TEXT)", "NULL", "NULL", "body"),
    ("42", "NULL", "NULL", "body"),  # a number
    ("'text'", "3.5", "NULL", "thinking_content"),
    ("CAST(x'ff' AS TEXT)", "NULL", "'[]'", "body"),  # undecodable even in a migrated row
    ("'body'", "NULL", "CAST(x'5bff5d' AS TEXT)", "parts"),
    # Not bad, but beyond the SQL (done in Python) or easy to get wrong in it:
    ("x'00ff'", "NULL", "'[]'", None),  # a blob in a migrated row: the function never looks
    ("'blob parts'", "NULL", "x'6e756c6c'", None),  # parts, a blob Python reads as JSON null
    ("'a' || char(0) || 'b'", "char(0)", "NULL", None),  # NUL is a character like any other
    ("'whitespace'", "NULL", "' null' || char(10, 13, 9)", None),  # JSON null: migrated
    ("'after null'", "NULL", "'null' || char(0)", None),  # malformed JSON: left alone
    ("'vertical tab'", "NULL", "char(11) || 'null'", None),  # not JSON whitespace
    ("'number parts'", "NULL", "0", None),
    ("'42'", "'3.5'", "NULL", None),  # numbers written as text are text
    ("'é 😊 中文'", "'\u2028'", "NULL", None),
]
GOOD_FIRST = 40  # generated rows before the corpus: batches the SQL decides
SQLITE_ROWS = GOOD_FIRST + len(SQLITE_CORPUS) + 10
LEFT_ALONE = 4  # rows of the corpus whose parts the function keeps (not bad, not null)
SQLITE_RAW = (
    "SELECT id, typeof(body), hex(body), typeof(thinking_content), hex(thinking_content), "
    "typeof(parts), hex(parts) FROM messages ORDER BY id"
)


def _sqlite_corpus(tmp_path: Path) -> tuple[str, str, dict[int, str]]:
    """Two identical SQLite files of generated rows with the corpus after them; the URL of
    each and, per bad row, the field the function names."""
    first = tmp_path / "sql.db"
    db = Database(f"sqlite:///{first}")
    generated = generate_messages(SQLITE_ROWS)
    with db.engine.begin() as conn:
        conn.exec_driver_sql(LOOSE_MESSAGES)
        conn.execute(
            messages.insert(), [{k: v for k, v in m.items() if k != "parts"} for m in generated]
        )
        for offset, (body, thinking, parts, _) in enumerate(SQLITE_CORPUS):
            conn.exec_driver_sql(
                f"UPDATE messages SET body = {body}, thinking_content = {thinking}, "
                f"parts = {parts} WHERE id = ?",
                (GOOD_FIRST + 1 + offset,),
            )
    db.dispose()
    second = tmp_path / "python.db"
    shutil.copyfile(first, second)
    bad = {GOOD_FIRST + 1 + i: f for i, (*_, f) in enumerate(SQLITE_CORPUS) if f is not None}
    return f"sqlite:///{first}", f"sqlite:///{second}", bad


def _skipped(runner: Runner) -> list[tuple[Any, ...]]:
    found = runner.skipped_rows("body_to_parts")
    return [(r["row_id"], r["field"], r["type"], r["message"]) for r in found]


@pytest.mark.parametrize("batch_size", [4, 1000])
def test_sqlite_bad_input_is_recorded_as_in_python_under_skip(tmp_path, monkeypatch, batch_size):
    in_sql_url, in_python_url, bad = _sqlite_corpus(tmp_path)
    spy = _Spy(monkeypatch)
    outcomes = []
    for url, sql in ((in_sql_url, True), (in_python_url, False)):
        db = Database(url)
        runner = Runner(db, migrations)
        [result] = runner.run(["body_to_parts"], batch_size=batch_size, on_error="skip", sql=sql)
        assert result.state is State.SUCCESS
        s = result.status
        outcomes.append(((s.processed, s.changed, s.skipped_errors, s.kept), _skipped(runner)))
        outcomes[-1] += (rows(db.engine, SQLITE_RAW),)
        db.dispose()
    assert outcomes[0] == outcomes[1]  # counters, recorded rows and every stored byte
    (_, changed, skipped, _), recorded, _raw = outcomes[0]
    assert [(row, field) for row, field, *_ in recorded] == sorted(bad.items())
    assert skipped == len(bad) and changed == SQLITE_ROWS - len(bad) - LEFT_ALONE
    assert spy.rejected >= 1 and (spy.applied >= 1 if batch_size < GOOD_FIRST else True)


def test_sqlite_bad_input_is_named_as_in_python_under_fail(tmp_path, monkeypatch):
    in_sql_url, in_python_url, bad = _sqlite_corpus(tmp_path)
    spy = _Spy(monkeypatch)
    named: list[list[tuple[Any, ...]]] = []
    stored = []
    for url, sql in ((in_sql_url, True), (in_python_url, False)):
        db = Database(url)
        runner = Runner(db, migrations)
        named.append([])
        while True:  # each run stops at the next bad row, which is then fixed
            [result] = runner.run(["body_to_parts"], batch_size=4, sql=sql)
            if result.state is State.SUCCESS:
                break
            error = result.error
            assert result.state is State.FAILED and error is not None
            named[-1].append((error.row_id, error.field, error.message, result.status.processed))
            with db.engine.begin() as conn:
                conn.exec_driver_sql(
                    f"UPDATE messages SET {error.field} = 'fixed' WHERE id = ?", (error.row_id,)
                )
        stored.append(rows(db.engine, SQLITE_RAW))
        db.dispose()
    assert named[0] == named[1]
    assert [(row, field) for row, field, *_ in named[0]] == sorted(bad.items())
    assert stored[0] == stored[1]
    assert spy.applied >= GOOD_FIRST // 4 and spy.rejected >= len(bad)


# A migration of our own without a guard: a SQLite JSON function given a blob fails, and TEXT
# that is not UTF-8 is caught by the engine; both batches are done in Python.
notes = sa.Table(
    "notes",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("body", sa.Text),
    sa.Column("doc", sa.JSON),
)
notes_migrations = Migrations()


@notes_migrations.migration(
    table=notes,
    batch_size=2,
    sql={
        "sqlite": lambda t: SqlChange(
            values={"doc": sa.func.json_array(t.c.body)}, where=t.c.doc.is_(None)
        )
    },
)
def wrap_body(row: Row) -> dict[str, Any] | None:
    if row["doc"] is not None:
        return None
    if not isinstance(row["body"], str):
        raise BadValue("body", "is not text")
    return {"doc": [row["body"]]}


def test_sqlite_without_a_guard_rejects_blobs_and_invalid_utf8(sqlite_url, monkeypatch):
    db = Database(sqlite_url)
    notes.create(db.engine)
    with db.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO notes (id, body) VALUES (1, 'a'), (2, 'b'), (3, x'00'), (4, 'd'), "
            "(5, CAST(x'ff' AS TEXT)), (6, 'f'), (7, 'g'), (8, 'h')"
        )
    spy = _Spy(monkeypatch)
    try:
        [result] = Runner(db, notes_migrations).run(["wrap_body"], on_error="skip")
        assert result.state is State.SUCCESS
        assert (result.status.processed, result.status.changed) == (8, 6)
        assert result.status.skipped_errors == 2
        # Batches of 2: the two holding a bad row were rejected and done in Python; each next
        # batch went back to SQL (the last, empty one included).
        assert (spy.applied, spy.rejected) == (3, 2)
        assert rows(db.engine, "SELECT id, doc FROM notes WHERE doc IS NOT NULL ORDER BY id") == [
            (i, f'["{c}"]') for i, c in zip((1, 2, 4, 6, 7, 8), "abdfgh", strict=True)
        ]
    finally:
        db.dispose()


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
    assert flagship.default_batch_size(declared_change(flagship, "postgresql")) == 2_500
    assert flagship.batch_size != 2_500
    assert flagship.default_batch_size() == flagship.batch_size  # in Python
    assert flagship.default_batch_size(declared_change(flagship, "sqlite")) == 10_000
    assert declared_change(flagship, "oracle") is None  # declares none
    parse = readings_migrations["parse_value"]
    assert parse.default_batch_size(declared_change(parse, "postgresql")) == 4


def test_sql_declared_under_mysql_serves_mariadb_and_the_other_way_round():
    one = _register({"mysql": SqlChange(values={"value": 1}, where=sa.true())})["parse_value"]
    other = _register({"mariadb": SqlChange(values={"value": 2}, where=sa.true())})["parse_value"]
    assert declared_change(one, "mariadb") is declared_change(one, "mysql") is not None
    assert declared_change(other, "mysql") is declared_change(other, "mariadb") is not None
    assert declared_change(one, "postgresql") is None


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
        declared_change(lazy["parse_value"], "postgresql")
    wrong = _register({"postgresql": lambda t: {"value": 1}})
    with pytest.raises(TypeError, match="not a SqlChange"):
        declared_change(wrong["parse_value"], "postgresql")
    assert declared_change(wrong["parse_value"], "sqlite") is None

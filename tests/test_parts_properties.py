"""Properties of the flagship rule: a legacy message and its migrated twin read the same.

The database properties write generated legacy rows to a real SQLite file, migrate them with a
real `Runner.run` in small batches, and read them back. One file serves every example: each
example replaces the table's rows and resets the migration.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from backfill import BadValue, Runner, State
from backfill.store.database import Database
from chat_migrations import InvalidMessage, derive_parts, message_parts, migrations
from chat_migrations.generator import create_messages_table
from chat_migrations.schema import messages

# Any text SQLite can store as UTF-8: everything but lone surrogates, NUL included, with a bias
# towards the characters most likely to break an encoder.
storable = st.characters(exclude_categories=("Cs",))
tricky = st.sampled_from(["\x00", "\n", '"', "\\", "é", "🌸", "\u2028", "\ufeff", "中", " "])
texts = st.text(alphabet=st.one_of(storable, tricky), max_size=40)
legacy_values = st.one_of(st.none(), st.just(""), texts)
bad_values = st.one_of(
    st.binary(max_size=20),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)
CREATED = datetime(2024, 1, 1, tzinfo=UTC)
LEGACY = ("body", "thinking_content", "parts")


@st.composite
def legacy_rows(draw: st.DrawFn) -> list[dict[str, Any]]:
    pairs = draw(st.lists(st.tuples(legacy_values, legacy_values), max_size=12))
    return [
        {
            "id": i,
            "conversation_id": 1,
            "role": "assistant",
            "body": body,
            "thinking_content": thinking,
            "parts": None,
            "created_at": CREATED,
        }
        for i, (body, thinking) in enumerate(pairs, start=1)
    ]


@pytest.fixture(scope="module")
def database() -> Iterator[Database]:
    with tempfile.TemporaryDirectory() as directory:
        db = Database(f"sqlite:///{Path(directory) / 'properties.db'}")
        create_messages_table(db.engine)
        yield db
        db.dispose()


@pytest.fixture(scope="module")
def loose_database() -> Iterator[Database]:
    """A legacy table whose text columns carry no declared type: SQLite keeps blobs as blobs and
    numbers as numbers there, as a loosely typed legacy database may hold them."""
    with tempfile.TemporaryDirectory() as directory:
        db = Database(f"sqlite:///{Path(directory) / 'loose.db'}")
        with db.engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation_id INTEGER NOT NULL, "
                "role VARCHAR(16) NOT NULL, body, thinking_content, parts JSON, "
                "created_at DATETIME NOT NULL)"
            )
        yield db
        db.dispose()


def _replace_rows(db: Database, legacy: list[dict[str, Any]]) -> None:
    # sa.null(): SQLAlchemy's JSON type would store a Python None as the JSON text `null`.
    stored = [m | {"parts": sa.null() if m["parts"] is None else m["parts"]} for m in legacy]
    with db.engine.begin() as conn:
        conn.execute(messages.delete())
        if stored:
            conn.execute(messages.insert(), stored)
        kinds = conn.exec_driver_sql("SELECT typeof(parts) FROM messages ORDER BY id").scalars()
        assert list(kinds) == ["null" if m["parts"] is None else "text" for m in legacy]


def _read_back(db: Database) -> list[dict[str, Any]]:
    with db.engine.connect() as conn:
        found = conn.execute(sa.select(messages).order_by(messages.c.id)).mappings()
        return [dict(r) for r in found]


def _stored_parts(db: Database) -> list[Any]:
    with db.engine.connect() as conn:
        texts = conn.exec_driver_sql("SELECT parts FROM messages ORDER BY id").scalars()
        return [None if t is None else json.loads(t) for t in texts]


def _raw(db: Database) -> dict[int, tuple[object, ...]]:
    with db.engine.connect() as conn:
        found = conn.exec_driver_sql(
            "SELECT id, typeof(body), hex(body), typeof(thinking_content), "
            "hex(thinking_content), typeof(parts), hex(parts) FROM messages"
        )
        return {r[0]: tuple(r) for r in found}


def _is_bad(message: dict[str, Any]) -> bool:
    try:
        derive_parts(message["body"], message["thinking_content"])
    except BadValue:
        return True
    return False


# -- through the database ---------------------------------------------------------------------


@settings(deadline=None, max_examples=60)
@given(legacy=legacy_rows(), batch_size=st.integers(min_value=1, max_value=5))
def test_migrated_rows_read_the_same_as_legacy_rows(database, legacy, batch_size):
    _replace_rows(database, legacy)
    runner = Runner(database, migrations)
    runner.reset("body_to_parts")

    [result] = runner.run(["body_to_parts"], batch_size=batch_size)

    assert result.state is State.SUCCESS
    assert result.status.processed == result.status.changed == len(legacy)
    migrated = _read_back(database)
    assert [m["id"] for m in migrated] == [m["id"] for m in legacy]
    for before, after in zip(legacy, migrated, strict=True):
        # The legacy fields are kept exactly; parts say the same thing.
        assert (after["body"], after["thinking_content"]) == (
            before["body"],
            before["thinking_content"],
        )
        assert after["parts"] is not None
        assert message_parts(before) == message_parts(after)
        assert after["parts"] == derive_parts(before["body"], before["thinking_content"])
    assert _stored_parts(database) == [m["parts"] for m in migrated]
    assert runner.verify("body_to_parts").clean

    [again] = runner.run(["body_to_parts"], batch_size=batch_size, restart=True)

    assert again.state is State.SUCCESS
    assert (again.status.processed, again.status.changed) == (len(legacy), 0)
    assert _read_back(database) == migrated


@settings(deadline=None, max_examples=30)
@given(legacy=legacy_rows(), data=st.data())
def test_rows_new_code_wrote_are_left_exactly_as_they_are(database, legacy, data):
    """Dual-written rows (body and parts together) are never rewritten by the migration."""
    written = data.draw(
        st.sets(st.sampled_from([m["id"] for m in legacy])) if legacy else st.just(set())
    )
    for message in legacy:
        if message["id"] in written:
            # New code may write parts that say something else (an edit, richer parts).
            message["parts"] = [{"type": "text", "text": f"new {message['id']}"}]
    _replace_rows(database, legacy)
    runner = Runner(database, migrations)
    runner.reset("body_to_parts")

    [result] = runner.run(["body_to_parts"], batch_size=3)

    assert result.status.changed == len(legacy) - len(written)
    for before, after in zip(legacy, _read_back(database), strict=True):
        if before["id"] in written:
            assert {k: after[k] for k in LEGACY} == {k: before[k] for k in LEGACY}
        assert message_parts(after) == message_parts(before)


mixed_values = st.one_of(legacy_values, bad_values.filter(lambda v: not isinstance(v, list)))


@st.composite
def mixed_rows(draw: st.DrawFn) -> list[dict[str, Any]]:
    rows = draw(legacy_rows())
    for row in rows:
        row["body"], row["thinking_content"] = draw(mixed_values), draw(mixed_values)
    return rows


@settings(deadline=None, max_examples=40)
@given(
    legacy=mixed_rows(),
    batch_size=st.integers(min_value=1, max_value=4),
    policy=st.sampled_from(["fail", "skip"]),
)
def test_bad_rows_are_skipped_or_stop_the_run_and_good_rows_still_read_the_same(
    loose_database, legacy, batch_size, policy
):
    db = loose_database
    _replace_rows(db, legacy)
    stored = _raw(db)
    runner = Runner(db, migrations)
    runner.reset("body_to_parts")
    bad = [m["id"] for m in legacy if _is_bad(m)]

    [result] = runner.run(["body_to_parts"], batch_size=batch_size, on_error=policy)

    if policy == "fail" and bad:
        # Everything before the failing batch is committed; that batch and after are untouched.
        assert result.state is State.FAILED
        assert result.error is not None and result.error.row_id == bad[0]
        committed = (bad[0] - 1) // batch_size * batch_size
        assert result.status.processed == committed
    else:
        assert result.state is State.SUCCESS
        assert result.status.skipped_errors == len(bad)
        assert [s["row_id"] for s in runner.skipped_rows("body_to_parts", limit=100)] == bad
        committed = len(legacy)
    now = _raw(db)
    for before, after in zip(legacy, _read_back(db), strict=True):
        if before["id"] > committed or before["id"] in bad:
            assert now[before["id"]] == stored[before["id"]]
        else:
            assert message_parts(after) == message_parts(before)
            assert after["parts"] == derive_parts(before["body"], before["thinking_content"])
    assert runner.verify("body_to_parts").raising_ids == bad[:20]


# -- pure properties of derive_parts ------------------------------------------------------------


@given(body=legacy_values, thinking=legacy_values)
def test_reasoning_comes_first_then_text_and_empties_are_omitted(body, thinking):
    parts = derive_parts(body, thinking)

    expected = []
    if thinking:
        expected.append({"type": "reasoning", "text": thinking})
    if body:
        expected.append({"type": "text", "text": body})
    assert parts == expected
    assert all(set(p) == {"type", "text"} and p["text"] for p in parts)
    assert [p["type"] for p in parts] in ([], ["text"], ["reasoning"], ["reasoning", "text"])
    # Pure and JSON-safe: the same answer twice, and it survives the JSON the engine writes.
    assert derive_parts(body, thinking) == parts
    assert json.loads(json.dumps(parts, ensure_ascii=False)) == parts


@given(body=legacy_values, thinking=legacy_values)
def test_message_parts_of_a_legacy_row_is_derive_parts(body, thinking):
    message = {"id": 1, "body": body, "thinking_content": thinking, "parts": None}
    assert message_parts(message) == derive_parts(body, thinking)


@given(
    body=legacy_values,
    thinking=legacy_values,
    parts=st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "reasoning"]), "text": texts}),
        max_size=3,
    ),
)
def test_stored_parts_win_over_legacy_fields(body, thinking, parts):
    message = {"id": 1, "body": body, "thinking_content": thinking, "parts": parts}
    assert message_parts(message) == parts
    assert message_parts(message | {"parts": json.dumps(parts)}) == parts


@given(value=bad_values, other=legacy_values)
def test_values_that_are_not_text_are_bad_input_naming_the_field(value, other):
    with pytest.raises(BadValue) as in_body:
        derive_parts(value, other)
    assert in_body.value.field == "body"
    with pytest.raises(BadValue) as in_thinking:
        derive_parts(other, value)
    assert in_thinking.value.field == "thinking_content"
    with pytest.raises(InvalidMessage, match=r"message 5: field 'body'"):
        message_parts({"id": 5, "body": value, "thinking_content": other, "parts": None})

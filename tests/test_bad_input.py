"""Bad input among good rows, through the Python API on a real SQLite file.

Blobs and numbers in the legacy text fields, TEXT that is not UTF-8, NUL characters, a 10 MB body
and malformed JSON in `parts`, under both error policies: a failing batch rolls back whole and
names its row and field; a skipped row is recorded, left byte for byte as it was, and every good
row around it is migrated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from backfill import MalformedJSON, Runner, State
from backfill.store.database import Database
from chat_migrations import InvalidMessage, derive_parts, message_parts, migrations
from chat_migrations.generator import generate_messages
from chat_migrations.schema import messages
from support import rows

ROWS = 60
BATCH = 10
BAD = 25  # in the third batch (21..30): rows 21..24 come before it in the same batch

# A table as a loosely typed legacy database may have it: the legacy columns carry no declared
# type, so SQLite keeps numbers as numbers there (a TEXT column would turn them into text).
LOOSE_MESSAGES = """
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL,
    role VARCHAR(16) NOT NULL,
    body,
    thinking_content,
    parts JSON,
    created_at DATETIME NOT NULL
)
"""

# Every stored byte of the columns a migration may touch, with its SQLite storage class.
RAW = (
    "SELECT id, typeof(body), hex(body), typeof(thinking_content), hex(thinking_content), "
    "typeof(parts), hex(parts) FROM messages"
)


@dataclass(frozen=True)
class Bad:
    name: str
    field: str
    expression: str  # the SQL value written into `field`
    value: Any = None
    loose: bool = False
    says: str = ""  # what the error message must mention

    def __str__(self) -> str:
        return self.name


CASES = [
    Bad("blob-body", "body", "?", b"\x00\xffnot text", says="blob"),
    Bad("blob-thinking", "thinking_content", "?", b"\x89PNG\r\n\x1a\n", says="blob"),
    Bad("invalid-utf8-body", "body", "CAST(x'80ff41' AS TEXT)", says="UTF-8"),
    Bad("invalid-utf8-thinking", "thinking_content", "CAST(x'41c328' AS TEXT)", says="UTF-8"),
    Bad("integer-body", "body", "?", 42, loose=True, says="not text"),
    Bad("real-thinking", "thinking_content", "?", 3.5, loose=True, says="not text"),
]
MIXED = [CASES[0], CASES[3], CASES[4], CASES[5]]  # one of each kind, both fields


def seed(db: Database, count: int, *, loose: bool = False) -> None:
    with db.engine.begin() as conn:
        if loose:
            conn.exec_driver_sql(LOOSE_MESSAGES)
        else:
            messages.create(conn)
        # Legacy rows: `parts` left out, so it is SQL NULL (not the JSON text `null`).
        legacy = [{k: v for k, v in m.items() if k != "parts"} for m in generate_messages(count)]
        conn.execute(messages.insert(), legacy)
    assert rows(db.engine, "SELECT DISTINCT typeof(parts) FROM messages") == [("null",)]


def execute(db: Database, sql: str, *params: Any) -> None:
    with db.engine.begin() as conn:
        conn.exec_driver_sql(sql, params)


def inject(db: Database, bad: Bad, message_id: int) -> None:
    params = (bad.value, message_id) if bad.expression == "?" else (message_id,)
    execute(db, f"UPDATE messages SET {bad.field} = {bad.expression} WHERE id = ?", *params)


def fix(db: Database, bad: Bad, message_id: int) -> None:
    execute(db, f"UPDATE messages SET {bad.field} = ? WHERE id = ?", "fixed text", message_id)


def raw(db: Database, where: str = "1 = 1") -> dict[int, tuple[object, ...]]:
    return {r[0]: r for r in rows(db.engine, f"{RAW} WHERE {where} ORDER BY id")}


def legacy(db: Database, skip: tuple[int, ...] = ()) -> dict[int, tuple[Any, Any, Any]]:
    """id -> (body, thinking_content, parts as stored) of every row not in `skip`."""
    where = f"WHERE id NOT IN ({','.join(map(str, skip))})" if skip else ""
    found = rows(
        db.engine, f"SELECT id, body, thinking_content, parts FROM messages {where} ORDER BY id"
    )
    return {r[0]: r[1:] for r in found}


def assert_migrated(db: Database, before: dict[int, tuple[Any, Any, Any]]) -> None:
    assert before
    after = legacy(db, skip=tuple(set(range(1, ROWS + 1)) - set(before)))
    for message_id, (body, thinking, _) in before.items():
        assert after[message_id][:2] == (body, thinking), message_id
        assert json.loads(after[message_id][2]) == derive_parts(body, thinking), message_id


# -- under --on-error fail ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", CASES, ids=str)
def test_fail_rolls_back_the_batch_names_the_row_and_resumes_after_a_fix(db, bad):
    seed(db, ROWS, loose=bad.loose)
    inject(db, bad, BAD)
    good = legacy(db, skip=(BAD,))
    stored = raw(db)
    runner = Runner(db, migrations)

    [result] = runner.run(["body_to_parts"], batch_size=BATCH, on_error="fail")

    assert result.state is State.FAILED
    assert result.error is not None
    assert (result.error.row_id, result.error.field) == (BAD, bad.field)
    assert "body_to_parts" in str(result.error) and f"row {BAD}" in str(result.error)
    error = result.status.error
    assert error is not None and (error.row_id, error.field) == (BAD, bad.field)
    assert bad.says in error.message
    as_json = result.status.to_json()
    assert as_json["state"] == "failed"
    assert as_json["error"]["row_id"] == BAD and as_json["error"]["field"] == bad.field
    # The two batches before the bad one committed; the bad row's whole batch rolled back.
    assert result.status.processed == 20 and result.status.changed == 20
    assert_migrated(db, {i: good[i] for i in range(1, 21)})
    assert raw(db, "id > 20") == {i: stored[i] for i in range(21, ROWS + 1)}
    assert rows(db.engine, "SELECT count(*) FROM _migration_errors") == [(0,)]

    # Nothing moved on: a second run stops at the same row, with the same counters.
    [again] = runner.run(["body_to_parts"], batch_size=BATCH, on_error="fail")
    assert again.state is State.FAILED
    assert again.error is not None and (again.error.row_id, again.error.field) == (BAD, bad.field)
    assert again.status.processed == 20
    assert raw(db, "id > 20") == {i: stored[i] for i in range(21, ROWS + 1)}

    fix(db, bad, BAD)
    [resumed] = runner.run(["body_to_parts"], batch_size=BATCH, on_error="fail")
    assert resumed.state is State.SUCCESS and resumed.status.error is None
    assert (resumed.status.processed, resumed.status.changed) == (ROWS, ROWS)
    assert resumed.status.skipped_errors == 0
    assert_migrated(db, legacy(db) | good)
    assert runner.verify("body_to_parts").clean


# -- under --on-error skip ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", CASES, ids=str)
def test_skip_records_bad_rows_leaves_them_untouched_and_migrates_the_rest(db, bad):
    seed(db, ROWS, loose=bad.loose)
    bad_ids = (3, BAD)
    for message_id in bad_ids:
        inject(db, bad, message_id)
    good = legacy(db, skip=bad_ids)
    stored = raw(db, f"id IN {bad_ids}")
    runner = Runner(db, migrations)

    [result] = runner.run(["body_to_parts"], batch_size=BATCH, on_error="skip")

    assert result.state is State.SUCCESS and result.status.error is None
    assert result.status.processed == ROWS
    assert result.status.changed == ROWS - 2
    assert result.status.skipped_errors == 2
    assert result.status.to_json()["skipped_errors"] == 2
    assert raw(db, f"id IN {bad_ids}") == stored  # byte for byte, storage class included
    assert_migrated(db, good)

    skipped = runner.skipped_rows("body_to_parts")
    assert [(s["row_id"], s["field"]) for s in skipped] == [(3, bad.field), (BAD, bad.field)]
    assert all(bad.says in s["message"] for s in skipped)
    recorded = rows(
        db.engine,
        "SELECT migration, row_id, field, message FROM _migration_errors ORDER BY id",
    )
    assert [(m, json.loads(r), f) for m, r, f, _ in recorded] == [
        ("body_to_parts", [3], bad.field),
        ("body_to_parts", [BAD], bad.field),
    ]

    found = runner.verify("body_to_parts")
    assert found.remaining == 0 and found.raising == 2
    assert found.raising_ids == [3, BAD]
    assert not found.clean

    # A fixed row is retried by a restart, and its record goes away.
    for message_id in bad_ids:
        fix(db, bad, message_id)
    [again] = runner.run(["body_to_parts"], batch_size=BATCH, on_error="skip", restart=True)
    assert again.state is State.SUCCESS
    assert (again.status.changed, again.status.skipped_errors) == (2, 0)
    assert runner.skipped_rows("body_to_parts") == []
    assert runner.verify("body_to_parts").clean


def test_verify_and_a_skipping_run_name_the_same_bad_rows(db):
    """verify (read-only) and a skipping run name the same rows, before anything is written."""
    seed(db, ROWS, loose=True)
    for message_id, bad in zip((2, 11, 37, 59), MIXED, strict=True):
        inject(db, bad, message_id)
    runner = Runner(db, migrations)
    before = runner.verify("body_to_parts")
    assert before.raising_ids == [2, 11, 37, 59] and before.remaining == ROWS - 4
    [result] = runner.run(["body_to_parts"], batch_size=7, on_error="skip")
    assert result.status.skipped_errors == 4
    assert [s["row_id"] for s in runner.skipped_rows("body_to_parts")] == [2, 11, 37, 59]


# -- valid input that looks unusual -------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_nul_characters_are_text_and_round_trip_exactly(db, policy):
    seed(db, 30)
    texts = {
        4: ("a\x00b", None),
        5: ("\x00", "\x00thinking\x00"),
        6: ("trailing\x00", ""),
        17: ("", "x\x00\x00y 🌸"),
    }
    for message_id, (body, thinking) in texts.items():
        execute(
            db,
            "UPDATE messages SET body = ?, thinking_content = ? WHERE id = ?",
            body,
            thinking,
            message_id,
        )
    before = legacy(db)
    stored = raw(db)
    runner = Runner(db, migrations)

    [result] = runner.run(["body_to_parts"], batch_size=BATCH, on_error=policy)

    assert result.state is State.SUCCESS
    assert (result.status.changed, result.status.skipped_errors) == (30, 0)
    assert_migrated(db, before)
    after = legacy(db)
    for message_id, (body, thinking) in texts.items():
        assert after[message_id][:2] == (body, thinking)
        parts = json.loads(after[message_id][2])
        assert [p["text"] for p in parts] == [t for t in (thinking, body) if t]
        migrated = {"id": message_id, "body": body, "thinking_content": thinking, "parts": parts}
        assert message_parts(migrated) == message_parts(migrated | {"parts": None})
    # The legacy bytes themselves were not rewritten.
    assert {i: r[:5] for i, r in raw(db).items()} == {i: r[:5] for i, r in stored.items()}


def test_a_10_mb_body_migrates(db):
    seed(db, 12)
    huge = ("Ünïcödé 🌸 line of a very long answer\n" * 300_000)[: 10 * 1024 * 1024]
    assert len(huge) >= 10_000_000
    execute(db, "UPDATE messages SET body = ? WHERE id = ?", huge, 7)
    runner = Runner(db, migrations)

    [result] = runner.run(["body_to_parts"], batch_size=5)

    assert result.state is State.SUCCESS and result.status.changed == 12
    [(body, parts)] = rows(db.engine, "SELECT body, parts FROM messages WHERE id = 7")
    assert body == huge
    assert json.loads(parts)[-1] == {"type": "text", "text": huge}
    assert runner.verify("body_to_parts").clean


# -- malformed JSON in parts ----------------------------------------------------------------------

MALFORMED = '[{"type": "text", "text": "unterminated'


def test_malformed_parts_are_left_alone_kept_by_cleanup_and_refused_by_message_parts(db):
    seed(db, 40)
    execute(db, "UPDATE messages SET parts = ? WHERE id = ?", MALFORMED, 9)
    stored = raw(db, "id = 9")
    runner = Runner(db, migrations)

    # body_to_parts: the row already has parts (new code wrote something), so it is not touched.
    [result] = runner.run(["body_to_parts"], batch_size=BATCH)
    assert result.state is State.SUCCESS
    assert (result.status.changed, result.status.skipped_errors) == (39, 0)
    assert raw(db, "id = 9") == stored
    assert runner.verify("body_to_parts").clean

    # cleanup_legacy_fields: parts do not say what the legacy fields say, so the text stays.
    check = runner.verify("cleanup_legacy_fields")
    assert check.kept == 1 and check.kept_ids == [9] and check.raising == 0
    [cleanup] = runner.run(["cleanup_legacy_fields"], batch_size=BATCH, min_age=timedelta(0))
    assert cleanup.state is State.SUCCESS
    assert (cleanup.status.changed, cleanup.status.kept) == (39, 1)
    assert raw(db, "id = 9") == stored
    assert runner.verify("cleanup_legacy_fields").kept_ids == [9]

    # Readers get a clear error naming the message and the field, however parts reach them.
    [(body, thinking, parts)] = rows(
        db.engine, "SELECT body, thinking_content, parts FROM messages WHERE id = 9"
    )
    message = {"id": 9, "body": body, "thinking_content": thinking, "parts": parts}
    for value in (parts, MalformedJSON(parts, "Unterminated string")):
        with pytest.raises(InvalidMessage, match=r"message 9\b.*'parts'.*malformed JSON"):
            message_parts(message | {"parts": value})
    assert isinstance(InvalidMessage("x"), ValueError)


def test_message_parts_names_the_message_and_field_of_bad_legacy_values():
    for field, value, says in (
        ("body", b"\x00\x01", "blob of 2 bytes"),
        ("thinking_content", 42, "42"),
        ("body", 3.5, "3.5"),
    ):
        message = {"id": 77, "body": "ok", "thinking_content": None, "parts": None}
        with pytest.raises(InvalidMessage) as caught:
            message_parts(message | {field: value})
        text = str(caught.value)
        assert "message 77" in text and repr(field) in text and says in text
        assert "not text" in text


def test_cleanup_never_clears_bad_legacy_values(db):
    """Forced past its gate, cleanup leaves rows with bad legacy values exactly as they were."""
    seed(db, 30, loose=True)
    runner = Runner(db, migrations)
    assert runner.run(["body_to_parts"], batch_size=BATCH)[0].state is State.SUCCESS
    bad_ids = (4, 12, 13, 22)
    for message_id, bad in zip(bad_ids, MIXED, strict=True):
        inject(db, bad, message_id)
    stored = raw(db, f"id IN {bad_ids}")

    [result] = runner.run(["cleanup_legacy_fields"], batch_size=BATCH, on_error="skip", force=True)

    assert result.state is State.SUCCESS
    assert result.status.changed == 30 - len(bad_ids)
    assert result.status.kept + result.status.skipped_errors == len(bad_ids)
    assert raw(db, f"id IN {bad_ids}") == stored
    found = runner.verify("cleanup_legacy_fields")
    assert sorted(found.kept_ids + found.raising_ids) == list(bad_ids)
    assert found.remaining == 0


# -- the CLI's sentence --------------------------------------------------------------------------


def test_cli_names_migration_row_and_field_in_one_sentence_and_exits_1(db, cli):
    seed(db, ROWS)
    inject(db, CASES[0], BAD)

    failed = cli("run", "body_to_parts", "--batch-size", str(BATCH))

    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("backfill:")]
    assert len(errors) == 1, failed.stderr
    [sentence] = errors
    assert "'body_to_parts'" in sentence and f"row {BAD}" in sentence
    assert "'body'" in sentence and "blob" in sentence

    as_json = cli("run", "body_to_parts", "--batch-size", str(BATCH), "--json")
    assert as_json.returncode == 1
    document = json.loads(as_json.stdout)["body_to_parts"]
    assert document["state"] == "failed"
    assert document["error"]["row_id"] == BAD and document["error"]["field"] == "body"
    assert document["progress"]["processed"] == 20

    status = json.loads(cli("status", "body_to_parts", "--json").stdout)["body_to_parts"]
    assert status["error"]["row_id"] == BAD and status["error"]["field"] == "body"

    skipped = cli("run", "body_to_parts", "--on-error", "skip", "--json")
    assert skipped.returncode == 0, skipped.stderr
    assert json.loads(skipped.stdout)["body_to_parts"]["skipped_errors"] == 1
    verify = cli("verify", "body_to_parts", "--json")
    assert verify.returncode == 1
    assert json.loads(verify.stdout)["body_to_parts"]["raising_ids"] == [BAD]

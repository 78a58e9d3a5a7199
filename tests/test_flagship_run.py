"""The flagship end to end through the Python API: migrate, verify, re-run, read back."""

from __future__ import annotations

import json

from backfill import State
from chat_migrations import derive_parts, message_parts
from support import rows


def test_run_migrates_every_message_and_rerun_changes_nothing(seeded, runner):
    db = seeded(3_000)
    before = rows(db.engine, "SELECT id, body, thinking_content FROM messages ORDER BY id")

    [result] = runner.run(["body_to_parts"], batch_size=250)

    assert result.state is State.SUCCESS
    assert (result.status.processed, result.status.total, result.status.changed) == (3000,) * 3
    after = dict(rows(db.engine, "SELECT id, parts FROM messages"))
    for message_id, body, thinking in before:
        expected = []
        if thinking:
            expected.append({"type": "reasoning", "text": thinking})
        if body:
            expected.append({"type": "text", "text": body})
        assert json.loads(after[message_id]) == expected
    assert runner.verify("body_to_parts").clean
    [again] = runner.run(["body_to_parts"])
    assert again.already_done and again.status.changed == 3000
    [restarted] = runner.run(["body_to_parts"], restart=True)
    assert (restarted.status.processed, restarted.status.changed) == (3000, 0)


def test_legacy_and_migrated_messages_read_the_same(seeded, runner):
    db = seeded(500)
    legacy = rows(db.engine, "SELECT id, body, thinking_content FROM messages ORDER BY id")
    runner.run(["body_to_parts"])
    migrated = rows(db.engine, "SELECT id, body, thinking_content, parts FROM messages ORDER BY id")
    for (i, body, thinking), (_, _, _, parts) in zip(legacy, migrated, strict=True):
        old = message_parts({"id": i, "body": body, "thinking_content": thinking, "parts": None})
        new = message_parts({"id": i, "body": body, "thinking_content": thinking, "parts": parts})
        assert old == new == derive_parts(body, thinking)

"""Realistic legacy chat data: conversations of user/assistant turns, as the old code stored them.

Varied lengths, Unicode, code blocks, some empty bodies; about a third of assistant turns carry
thinking content; `parts` is always SQL NULL (the key is left out of each row: SQLAlchemy's JSON
type would store `None` as the JSON text `null`). Deterministic for a given seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from chat_migrations.schema import messages

_QUESTIONS = [
    "How do I reverse a list in Python?",
    "Can you explain what a database index does?",
    "¿Cómo puedo optimizar esta consulta SQL?",
    "Write a haiku about migrations 🌸",
    "What's the difference between TCP and UDP?",
    "这个错误是什么意思？",
    "Please summarise the meeting notes below.",
    "Why does my React component render twice?",
    "Пожалуйста, переведи этот текст на английский.",
    "Is it safe to run ALTER TABLE on a live database?",
    "Give me three ideas for a team offsite 🎉",
    "What does `SELECT ... FOR UPDATE SKIP LOCKED` do?",
]
_SENTENCES = [
    "Sure, here is a short explanation.",
    "The key idea is to process the work in small batches so each transaction stays short.",
    "An index lets the database find rows without scanning the whole table.",
    "Ça dépend du volume de données et de la charge actuelle.",
    "You can use slicing: `items[::-1]` returns a reversed copy.",
    "TCP guarantees ordered delivery; UDP trades that guarantee for lower latency.",
    "结论：先备份，再迁移，最后验证。",
    "Let me know if you want a more detailed walkthrough! 😊",
    "Keep the legacy fields until the new ones are verified in production.",
    "In short: measure first, then optimise the part that dominates.",
]
_CODE = [
    "```python\nfor i, item in enumerate(items):\n    print(i, item)\n```",
    "```sql\nCREATE INDEX CONCURRENTLY idx_messages_conv ON messages (conversation_id);\n```",
    "```ts\nconst parts = msg.parts ?? legacyParts(msg);\n```",
    "```bash\nbackfill run body_to_parts --batch-size 500\n```",
]
_THOUGHTS = [
    "The user wants a concise answer; start with the direct solution.",
    "Consider edge cases: empty input, Unicode, very long lists.",
    "They might be on PostgreSQL; mention locking behaviour.",
    "Check whether the question is about performance or correctness first.",
    "翻訳の前に文脈を確認する。",
]
_START = datetime(2024, 1, 1, tzinfo=UTC)


def _assistant_body(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.03:
        return ""  # a reply that was only reasoning, or a stream that never produced text
    paragraphs = [
        " ".join(rng.choices(_SENTENCES, k=rng.randint(1, 6))) for _ in range(rng.randint(1, 4))
    ]
    if roll < 0.25:
        paragraphs.insert(rng.randint(0, len(paragraphs)), rng.choice(_CODE))
    if roll > 0.995:
        paragraphs.append(" ".join(rng.choices(_SENTENCES, k=400)))  # a very long answer
    return "\n\n".join(paragraphs)


def generate_messages(count: int, seed: int = 42) -> Iterator[dict[str, Any]]:
    """Yield `count` legacy messages in id order, grouped in conversations of alternating turns."""
    rng = random.Random(seed)
    message_id = 0
    conversation = 0
    moment = _START
    while message_id < count:
        conversation += 1
        turns = rng.randint(1, 12)
        for turn in range(turns * 2):
            if message_id >= count:
                return
            message_id += 1
            moment += timedelta(seconds=rng.randint(1, 600))
            if turn % 2 == 0:
                role, thinking = "user", None
                body = rng.choice(_QUESTIONS)
                if rng.random() < 0.01:
                    body = ""
            else:
                role = "assistant"
                body = _assistant_body(rng)
                thinking = None
                if rng.random() < 1 / 3:
                    thinking = " ".join(rng.choices(_THOUGHTS, k=rng.randint(1, 3)))
            yield {
                "id": message_id,
                "conversation_id": conversation,
                "role": role,
                "body": body,
                "thinking_content": thinking,
                "created_at": moment,
            }


def create_messages_table(engine: sa.Engine, *, replace: bool = False) -> None:
    with engine.begin() as conn:
        if replace:
            messages.drop(conn, checkfirst=True)
        messages.create(conn, checkfirst=True)


def seed_messages(engine: sa.Engine, count: int, *, seed: int = 42, chunk: int = 10_000) -> int:
    """Replace the `messages` table with `count` generated legacy messages."""
    create_messages_table(engine, replace=True)
    batch: list[dict[str, Any]] = []
    with engine.begin() as conn:
        for message in generate_messages(count, seed):
            batch.append(message)
            if len(batch) == chunk:
                conn.execute(messages.insert(), batch)
                batch = []
        if batch:
            conn.execute(messages.insert(), batch)
    return count

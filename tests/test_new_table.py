"""The runbook's "new table" variant on every dialect: messages copied into messages_v2 read
exactly as their originals, once, with the source intact and rows the new code wrote kept."""

from __future__ import annotations

import sqlalchemy as sa

from backfill import Runner, State
from chat_migrations import message_parts
from chat_migrations.generator import seed_messages
from chat_migrations.new_table import migrations
from chat_migrations.schema import messages, messages_v2

COUNT = 600


def read(engine: sa.Engine, table: sa.Table) -> dict[int, dict[str, object]]:
    with engine.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(sa.select(table)).mappings()}


def test_every_message_is_copied_once_and_reads_the_same(database_url):
    engine = sa.create_engine(database_url)
    seed_messages(engine, COUNT)
    messages_v2.create(engine)
    with engine.begin() as conn:
        # New code already migrated message 5 in place, and dual-wrote message 7 to v2.
        conn.execute(
            sa.update(messages)
            .where(messages.c.id == 5)
            .values(parts=[{"type": "text", "text": "new"}])
        )
        seven = dict(conn.execute(sa.select(messages).where(messages.c.id == 7)).mappings().one())
        conn.execute(
            sa.insert(messages_v2).values(
                id=7, conversation_id=seven["conversation_id"], role=seven["role"],
                parts=[{"type": "text", "text": "written by new code"}],
                created_at=seven["created_at"],
            )
        )  # fmt: skip
    source_before = read(engine, messages)
    runner = Runner(database_url, migrations)
    assert runner.verify("copy_to_messages_v2").remaining == COUNT - 1

    [result] = runner.run(["copy_to_messages_v2"])

    assert result.state is State.SUCCESS
    assert result.status.processed == COUNT and result.status.changed == COUNT - 1
    copies = read(engine, messages_v2)
    assert read(engine, messages) == source_before
    assert sorted(copies) == sorted(source_before)
    for id_, original in source_before.items():
        copy = copies[id_]
        if id_ == 7:
            assert copy["parts"] == [{"type": "text", "text": "written by new code"}]
            continue
        assert copy["parts"] == message_parts(original), id_
        for column in ("conversation_id", "role", "created_at"):
            assert copy[column] == original[column], (id_, column)
    assert runner.verify("copy_to_messages_v2").clean

    [again] = runner.run(["copy_to_messages_v2"], restart=True)
    assert again.status.changed == 0 and read(engine, messages_v2) == copies
    engine.dispose()

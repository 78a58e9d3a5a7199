"""The flagship on both dialects through the Python API: same rows, same counters."""

from __future__ import annotations

import sqlalchemy as sa

from backfill import Runner, State
from backfill.store.database import Database
from chat_migrations import derive_parts, message_parts, messages, migrations
from chat_migrations.generator import seed_messages


def test_run_verify_rerun_on_each_dialect(database_url):
    db = Database(database_url)
    try:
        seed_messages(db.engine, 2_500)
        runner = Runner(db, migrations)
        assert runner.count("body_to_parts").remaining == 2_500
        [result] = runner.run(["body_to_parts"], batch_size=300)
        assert result.state is State.SUCCESS
        assert (result.status.processed, result.status.changed, result.status.total) == (2500,) * 3
        with db.engine.connect() as conn:
            stored = conn.execute(sa.select(messages).order_by(messages.c.id)).mappings().all()
        for row in stored:
            assert row["parts"] == derive_parts(row["body"], row["thinking_content"])
            legacy = dict(row, parts=None)
            assert message_parts(legacy) == message_parts(row)
        assert runner.verify("body_to_parts").clean
        [again] = runner.run(["body_to_parts"], restart=True)
        assert (again.status.processed, again.status.changed) == (2500, 0)
    finally:
        db.dispose()

"""Migrations over schemas we did not design, on every dialect: UUID, text and composite keys,
mixed-case and spaced identifiers, JSON, tables reflected by name, ranges and another key to walk.
"""

from __future__ import annotations

import json
import uuid

import pytest
import sqlalchemy as sa

from backfill import Migrations, Runner, SchemaMismatch, SqlChange, State
from backfill.store import tables
from support import after_each_batch

metadata = sa.MetaData()

# camelCase names, a space, a table name with a capital: all must be quoted everywhere.
messages = sa.Table(
    "Message",
    metadata,
    sa.Column("chatId", sa.Uuid, primary_key=True),
    sa.Column("Body Text", sa.Text),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("createdAt", sa.Integer, nullable=False),
    sa.Column("Parts", sa.JSON(none_as_null=True)),
)
pairs = sa.Table(
    "Pairs",
    metadata,
    sa.Column("chatId", sa.String(40), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("body", sa.Text),
    sa.Column("upper", sa.Text),
)
events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("createdAt", sa.Integer, nullable=False),
    sa.Column("note", sa.String(40)),
    sa.UniqueConstraint("createdAt", "id", name="uq_events_created_id"),
)

shapes = Migrations()


def text_parts(body: str | None) -> list[dict[str, str]]:
    return [{"type": "text", "text": body}] if body else []


@shapes.migration(table=messages, batch_size=7)
def fill_parts(row):
    if row["Parts"] is not None:
        return None
    return {"Parts": text_parts(row["Body Text"])}


@shapes.migration(table=messages, batch_size=5, where=lambda t: t.c.role == "assistant")
def assistant_only(row):
    return {"Body Text": row["Body Text"].upper()}


def exclaimed_in_sql(t: sa.Table) -> SqlChange:
    return SqlChange(values={"Body Text": t.c["Body Text"] + "!"}, where=sa.true())


@shapes.migration(
    table=messages,
    batch_size=4,
    where=lambda t: t.c.role == "assistant",
    sql={d: exclaimed_in_sql for d in ("sqlite", "postgresql", "mysql")},
)
def exclaim_assistant(row):
    return {"Body Text": row["Body Text"] + "!"}


@shapes.migration(table=pairs, batch_size=4)
def upper_pairs(row):
    return {"upper": row["body"].upper()}


@shapes.migration(table=events, batch_size=3, key=("createdAt", "id"))
def by_time(row):
    return {"note": f"seen {row['createdAt']}"}


@shapes.migration(table=events, batch_size=3, key=("createdAt",), name="by_time_alone")
def by_time_alone(row):
    return None


# The same table by name, as a user with an existing schema writes it: reflected at run time.
by_name = Migrations()


@by_name.migration(table="Message", batch_size=6)
def fill_parts_reflected(row):
    if row["Parts"] is not None:
        return None
    return {"Parts": text_parts(row["Body Text"])}


def uuids(count: int) -> list[uuid.UUID]:
    return sorted(uuid.UUID(int=(i * 7919 + 13) << 64 | i) for i in range(count))


@pytest.fixture
def engine(database_url):
    engine = sa.create_engine(database_url)
    metadata.create_all(engine)
    ids = uuids(30)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(messages),
            [
                {
                    "chatId": chat,
                    "Body Text": "" if i % 5 == 0 else f"hello {i} ünïcode",
                    "role": "assistant" if i % 2 else "user",
                    "createdAt": 1000 + i,
                    "Parts": None,
                }
                for i, chat in enumerate(ids)
            ],
        )
        conn.execute(
            sa.insert(pairs),
            [
                {"chatId": f"chat-{c}", "seq": s, "body": f"b{c}.{s}", "upper": None}
                for c in range(5)
                for s in range(6)
            ],
        )
        # createdAt repeats: only (createdAt, id) is unique.
        conn.execute(sa.insert(events), [{"createdAt": 100 + i // 3} for i in range(20)])
    yield engine
    engine.dispose()


def select(engine: sa.Engine, *columns: sa.Column[object]) -> list[tuple[object, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(*columns))]


def count(engine: sa.Engine, table: sa.Table, where: sa.ColumnElement[bool]) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(table).where(where)).scalar()
        )


def stored_parts(engine: sa.Engine) -> dict[str, object]:
    with engine.connect() as conn:
        found = conn.execute(sa.select(messages.c["chatId"], messages.c["Parts"])).all()
    return {str(chat): parts for chat, parts in found}


def test_uuid_keys_camel_case_and_spaced_names_with_json(engine, database_url):
    runner = Runner(database_url, shapes)
    assert runner.verify("fill_parts").remaining == 30

    [result] = runner.run(["fill_parts"])

    assert result.state is State.SUCCESS
    assert result.status.processed == 30 and result.status.changed == 30
    with engine.connect() as conn:
        for body, parts in conn.execute(sa.select(messages.c["Body Text"], messages.c["Parts"])):
            assert parts == text_parts(body)  # decoded JSON, SQL NULL never written as null
    assert runner.verify("fill_parts").clean
    [again] = runner.run(["fill_parts"], restart=True)
    assert again.status.changed == 0


def test_a_table_given_by_name_is_reflected_with_its_json_columns(engine, database_url):
    runner = Runner(database_url, by_name)
    [result] = runner.run(["fill_parts_reflected"])

    assert result.state is State.SUCCESS and result.status.changed == 30
    parts = stored_parts(engine)
    assert all(isinstance(p, list) for p in parts.values())
    assert runner.verify("fill_parts_reflected").clean


def test_a_missing_table_given_by_name_is_one_clear_sentence(database_url):
    runner = Runner(database_url, by_name)
    with pytest.raises(SchemaMismatch, match="table 'Message' does not exist"):
        runner.run(["fill_parts_reflected"])


def test_composite_keys_walk_in_order_and_name_the_failing_row(engine, database_url):
    with engine.begin() as conn:
        conn.execute(
            sa.update(pairs).where(pairs.c.chatId == "chat-3", pairs.c.seq == 2).values(body=None)
        )
    runner = Runner(database_url, shapes)

    [failed] = runner.run(["upper_pairs"])

    assert failed.state is State.FAILED
    assert failed.status.error is not None
    assert failed.status.error.row_id == ["chat-3", 2]
    # Row 21 of 30 in key order: the five whole batches before it committed, none of its own.
    assert failed.status.processed == 20
    assert count(engine, pairs, pairs.c.upper.is_not(None)) == 20

    [skipped] = runner.run(["upper_pairs"], on_error="skip")
    assert skipped.state is State.SUCCESS
    assert skipped.status.skipped_errors == 1 and skipped.status.changed == 29
    assert [s["row_id"] for s in runner.skipped_rows("upper_pairs")] == [["chat-3", 2]]


def test_a_range_leaves_rows_outside_it_untouched(engine, database_url):
    before = dict(select(engine, messages.c["createdAt"], messages.c["Body Text"]))
    runner = Runner(database_url, shapes)

    [result] = runner.run(["assistant_only"])

    assert result.state is State.SUCCESS
    assert result.status.total == 15 and result.status.processed == 15
    after = select(engine, messages.c["createdAt"], messages.c.role, messages.c["Body Text"])
    for created, role, body in after:
        expected = before[created].upper() if role == "assistant" else before[created]
        assert body == expected


@pytest.mark.parametrize("in_sql", [True, False], ids=["sql-path", "python-path"])
def test_a_range_holds_on_the_sql_path_too(engine, database_url, in_sql):
    before = dict(select(engine, messages.c["createdAt"], messages.c["Body Text"]))
    runner = Runner(database_url, shapes)

    [result] = runner.run(["exclaim_assistant"], sql=in_sql)

    assert result.state is State.SUCCESS and result.status.processed == 15
    assert result.status.changed == 15
    after = select(engine, messages.c["createdAt"], messages.c.role, messages.c["Body Text"])
    for created, role, body in after:
        assert body == before[created] + ("!" if role == "assistant" else "")


def test_a_changed_range_under_a_half_done_migration_is_refused_with_how_to_restart(
    engine, database_url
):
    runner = Runner(database_url, shapes)
    runner.run(["assistant_only"], dry_run=True)  # persists nothing: not half done yet
    [canceled] = _run_two_batches_then_cancel(runner, "assistant_only")
    assert canceled.state is State.CANCELED and canceled.status.processed == 10

    narrower = Migrations()
    narrower.migration(
        table=messages,
        batch_size=5,
        name="assistant_only",
        where=lambda t: sa.and_(t.c.role == "assistant", t.c["createdAt"] < 1020),
    )(lambda row: {"Body Text": row["Body Text"].upper()})
    changed = Runner(database_url, narrower)

    with pytest.raises(SchemaMismatch) as refused:
        changed.run(["assistant_only"])
    message = str(refused.value)
    assert "half done (10 rows)" in message
    assert "backfill run assistant_only --restart" in message and "backfill reset" in message
    assert '"role" = ' in message or "role = " in message
    # Nothing moved: the stored progress is the canceled run's.
    assert changed.status(["assistant_only"])["assistant_only"].processed == 10

    [restarted] = changed.run(["assistant_only"], restart=True)
    assert restarted.state is State.SUCCESS and restarted.status.total == 10


def _run_two_batches_then_cancel(runner: Runner, name: str):
    seen = []

    def listener(status):
        seen.append(status.processed)
        if status.processed >= 10:
            runner.cancel(name)

    return runner.run([name], listeners=[after_each_batch(listener)])


def test_another_unique_key_is_walked_in_its_order(engine, database_url):
    runner = Runner(database_url, shapes)
    [result] = runner.run(["by_time"])

    assert result.state is State.SUCCESS and result.status.changed == 20
    assert count(engine, events, events.c.note.is_(None)) == 0
    with engine.connect() as conn:
        cursor = conn.execute(
            sa.select(tables.migrations.c.cursor).where(tables.migrations.c.name == "by_time")
        ).scalar()
    assert json.loads(str(cursor)) == [106, 20]  # (createdAt, id) of the last row


def test_a_key_that_is_not_unique_is_refused(engine, database_url):
    runner = Runner(database_url, shapes)
    with pytest.raises(SchemaMismatch, match=r"key \(createdAt\) .* not backed by a unique"):
        runner.run(["by_time_alone"])

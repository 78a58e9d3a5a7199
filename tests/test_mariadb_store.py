"""What MariaDB does differently, against a real server: JSON that is LONGTEXT, identifiers that
need backquotes (reserved words, spaces, and a `%` the driver would read as a placeholder; not a
backquote itself, which SQLAlchemy's MySQL reflection reads back doubled), matched-versus-changed
row counts, row locks under READ COMMITTED, both of SQLAlchemy's dialect names, the engine
tables' bounded key column, and the SQL path.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from backfill import DELETE, BadValue, Migrations, Row, Runner, SqlChange, State
from backfill.store import records, skipped, tables
from backfill.store.database import Database
from chat_migrations import derive_parts, message_parts, messages, migrations
from chat_migrations.generator import seed_messages

UNICODE = [
    "😊 emoji 👩‍👩‍👧‍👦 and flags 🇫🇷",
    "e\u0301 combining, \u05e2\u05d1\u05e8\u05d9\u05ea rtl \u200f",
    "line\u2028separator\u2029paragraph, control \x01\x07\x1b\x1f, NUL \x00 inside",
    "quotes \" and \\ backslash \\u0000 \\n, 'single'",
    "%s %(name)s {} $1 ? %%",
    '{"type": "text", "text": "json-looking"}',
    "\ud7ff \ue000 \U0010ffff \ufeff \u00a0",
    "long " * 40_000 + "end",  # 200 KB: beyond MySQL's TEXT (64 KB), the column is LONGTEXT
]


def test_the_flagship_round_trips_its_json_exactly(mariadb_url):
    db = Database(mariadb_url)
    seed_messages(db.engine, 600)
    with db.engine.begin() as conn:
        for i, text in enumerate(UNICODE, start=1):
            conn.execute(messages.update().where(messages.c.id == i).values(body=text, parts=None))
        conn.execute(
            messages.update().where(messages.c.id == 20).values(body=None, thinking_content=None)
        )
        before = conn.execute(sa.select(messages).order_by(messages.c.id)).mappings().all()
    runner = Runner(db, migrations)
    [result] = runner.run(["body_to_parts"])
    assert result.state is State.SUCCESS
    assert (result.status.processed, result.status.total) == (600, 600)
    with db.engine.connect() as conn:
        after = conn.execute(sa.select(messages).order_by(messages.c.id)).mappings().all()
        stored = dict(conn.execute(sa.text("SELECT id, parts FROM messages")).all())
    for old, new in zip(before, after, strict=True):
        assert (new["body"], new["thinking_content"]) == (old["body"], old["thinking_content"])
        assert new["parts"] == derive_parts(old["body"], old["thinking_content"]), old["id"]
        assert message_parts(dict(old)) == message_parts(dict(new))
        # Stored as compact JSON text, UTF-8 as is.
        assert json.loads(stored[old["id"]]) == new["parts"]
    assert after[19]["parts"] == []
    assert "😊" in stored[1] and "\\ud83d" not in stored[1]
    assert runner.verify("body_to_parts").clean
    db.dispose()


docs_metadata = sa.MetaData()
docs = sa.Table(
    "docs",
    docs_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("doc", sa.JSON),
    sa.Column("note", sa.Text),
)
docs_migrations = Migrations()


@docs_migrations.migration(table=docs, batch_size=3)
def reshape(row: Row) -> dict[str, Any] | None:
    """Wrap each document; clear it (SQL NULL) when its note says so."""
    if row["note"] == "clear":
        return {"doc": DELETE, "note": None}
    if row["note"] == "none":
        return {"doc": None, "note": None}
    if row["note"] is None:
        return None
    return {"doc": {"wrapped": row["doc"], "é": "😊", "n": [1, -2.5, True, None, {}]}, "note": None}


def test_json_values_reach_the_function_decoded_and_none_is_sql_null(mariadb_url):
    db = Database(mariadb_url)
    docs_metadata.create_all(db.engine)
    values = [{"a": [1, 2]}, "a string", 42, [None], None, {"x": "y"}, {"k": 1}]
    notes = ["wrap", "wrap", "wrap", "wrap", "wrap", "clear", "none"]
    with db.engine.begin() as conn:
        conn.execute(
            docs.insert(),
            [
                {"id": i, "doc": v, "note": n}
                for i, (v, n) in enumerate(zip(values, notes, strict=True), 1)
            ],
        )
    [result] = Runner(db, docs_migrations).run(["reshape"])
    assert result.state is State.SUCCESS and result.status.changed == 7
    with db.engine.connect() as conn:
        found = dict(conn.execute(sa.select(docs.c.id, docs.c.doc)).all())
        nulls = conn.execute(sa.text("SELECT id FROM docs WHERE doc IS NULL ORDER BY id")).all()
        valid = conn.execute(sa.text("SELECT count(*) FROM docs WHERE JSON_VALID(doc)")).scalar()
    extra = {"é": "😊", "n": [1, -2.5, True, None, {}]}
    for i, value in enumerate(values[:4], 1):
        assert found[i] == {"wrapped": value, **extra}
    # sa.JSON without none_as_null stores None as JSON null; the engine's writes never do.
    assert found[5] == {"wrapped": None, **extra}
    assert [r[0] for r in nulls] == [6, 7] and valid == 5
    db.dispose()


odd_metadata = sa.MetaData()
odd = sa.Table(
    "order items%",
    odd_metadata,
    sa.Column("group", sa.Integer, primary_key=True),
    sa.Column("key", sa.String(20), primary_key=True),
    sa.Column("select", sa.Text),
    sa.Column("100% done", sa.Text),
)
odd_migrations = Migrations()


@odd_migrations.migration(table=odd, batch_size=4)
def shout(row: Row) -> dict[str, Any] | None:
    if row["100% done"] is not None:
        return None
    return {"100% done": row["select"].upper()}


def test_identifiers_are_quoted_and_percent_signs_survive(mariadb_url):
    db = Database(mariadb_url)
    odd_metadata.create_all(db.engine)
    rows = [
        {"group": g, "key": f"k%{k}", "select": f"v{g}-{k} 100%", "100% done": None}
        for g in range(1, 4)
        for k in ("a", "b", "c", "%s")
    ]
    with db.engine.begin() as conn:
        conn.execute(odd.insert(), rows)
    runner = Runner(db, odd_migrations)
    [result] = runner.run(["shout"])
    assert result.state is State.SUCCESS
    assert (result.status.processed, result.status.changed) == (12, 12)
    with db.engine.connect() as conn:
        found = conn.execute(sa.select(odd)).mappings().all()
    assert {(r["group"], r["key"]): r["100% done"] for r in found} == {
        (r["group"], r["key"]): r["select"].upper() for r in rows
    }
    assert runner.verify("shout").clean
    db.dispose()


def test_a_compare_and_set_that_changes_nothing_still_counts_its_row(mariadb_url):
    """MySQL reports changed rows unless asked for matched ones (CLIENT_FOUND_ROWS, which
    SQLAlchemy sets): a lease check writing the same values must still find its row."""
    db = Database(mariadb_url)
    db.ensure_schema()
    with db.write() as conn:
        records.ensure_record(conn, "m")
    with db.write() as conn:  # the state it already has
        records.transition(conn, "m", at_generation=0, source=State.PENDING, target=State.PENDING)
    with db.write() as conn:
        records.transition(
            conn, "m", at_generation=0, source=State.PENDING, target=State.IN_PROGRESS
        )
        assert records.update_live(conn, "m", 0, cancel_requested=False)  # the value it has
        assert not records.update_live(conn, "m", 1, cancel_requested=False)  # another one
    ledger = records.Ledger(db.engine.dialect, "m", 0)
    with db.write() as conn:
        assert ledger.advance(conn, {"processed": 0, "changed": 0})
        assert ledger.check(conn) == (True, False)
    with db.write() as conn:
        assert not records.Ledger(db.engine.dialect, "m", 7).advance(conn, {"processed": 0})
    db.dispose()


def test_engine_tables_bound_the_skipped_row_key_for_the_unique_constraint(mariadb_url):
    db = Database(mariadb_url)
    db.ensure_schema()
    with db.engine.connect() as conn:
        kind = conn.execute(
            sa.text(
                "SELECT data_type, character_maximum_length FROM information_schema.columns "
                "WHERE table_schema = DATABASE() AND table_name = '_migration_errors' "
                "AND column_name = 'row_id'"
            )
        ).one()
    assert tuple(kind) == ("varchar", 512)
    with db.write() as conn:
        rows = [((i, "x" * 400), "f", "BadValue", "bad") for i in range(3)]
        skipped.record(conn, "m", rows, 1.0)
        skipped.record(conn, "m", rows[:1], 2.0)  # replaces, never duplicates
    with db.read() as conn:
        assert len(skipped.rows(conn, "m")) == 3
    assert tables.SCHEMA_VERSION == 4
    db.dispose()


def test_a_batch_locks_its_rows_and_read_only_scans_take_no_locks(mariadb_url):
    """The function runs inside the batch transaction, after its `SELECT ... FOR UPDATE`: an
    app that edits a row of the batch then waits (here: times out). `verify` and `count`
    read past a row the app holds."""
    db = Database(mariadb_url)
    docs_metadata.create_all(db.engine)
    with db.engine.begin() as conn:
        conn.execute(docs.insert(), [{"id": i, "doc": i, "note": "wrap"} for i in range(1, 7)])
    app = sa.create_engine(
        mariadb_url, poolclass=NullPool, connect_args={"init_command": LOCK_WAIT_ONE_SECOND}
    )
    app_saw: list[str] = []
    lock = Migrations()

    @lock.migration(table=docs, batch_size=3)
    def reshape(row: Row) -> dict[str, Any] | None:
        if row["id"] == 1:
            # Another thread: the function's own thread holds no connection of the app's.
            thread = threading.Thread(target=app_saw.append, args=(app_edit(app, 3),))
            thread.start()
            thread.join()
        return {"note": None}

    [result] = Runner(db, lock).run(["reshape"])
    assert result.state is State.SUCCESS
    assert app_saw == ["lock wait timeout"]
    assert app_edit(app, 3) == "updated"  # once the batch committed

    # Only row 3 (the app's note) is left to change; the app holds it while they look.
    with app.connect() as holder, holder.begin():
        holder.execute(sa.text("SELECT 1 FROM docs WHERE id = 3 FOR UPDATE"))
        runner = Runner(db, docs_migrations)
        assert runner.verify("reshape").sample_ids == [3]
        assert runner.count("reshape").remaining == 1
    app.dispose()
    db.dispose()


LOCK_WAIT_ONE_SECOND = "SET SESSION innodb_lock_wait_timeout = 1"


def app_edit(app: sa.Engine, row_id: int) -> str:
    try:
        with app.begin() as conn:
            conn.execute(sa.text("UPDATE docs SET note = 'app' WHERE id = :id"), {"id": row_id})
    except sa.exc.OperationalError as error:
        assert error.orig is not None and error.orig.args[0] == 1205, error
        return "lock wait timeout"
    return "updated"


@pytest.mark.parametrize("driver", ["mysql+pymysql", "mariadb+pymysql"])
def test_both_dialect_names_run_the_flagship(mariadb_url, driver):
    url = sa.make_url(mariadb_url).set(drivername=driver)
    db = Database(url)
    assert db.dialect == driver.split("+")[0]
    seed_messages(db.engine, 300)
    runner = Runner(db, migrations)
    [result] = runner.run(["body_to_parts"])
    assert result.state is State.SUCCESS
    assert (result.status.processed, result.status.total, result.status.changed) == (300,) * 3
    assert runner.verify("body_to_parts").clean
    db.dispose()


readings_metadata = sa.MetaData()
readings = sa.Table(
    "readings",
    readings_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("raw", sa.Text, nullable=False),
    sa.Column("value", sa.Integer),
)
BAD_IDS = (6, 13)


def parse_in_sql(t: sa.Table) -> SqlChange:
    # MariaDB's strict mode refuses text that is not an integer (1292/1366), as PostgreSQL's cast.
    return SqlChange(values={"value": sa.func.trim(t.c.raw)}, where=t.c.value.is_(None))


readings_migrations = Migrations()


@readings_migrations.migration(
    table=readings, batch_size=4, sql={"mysql": parse_in_sql, "mariadb": parse_in_sql}
)
def parse_value(row: Row) -> dict[str, Any] | None:
    if row["value"] is not None:
        return None
    text = row["raw"].strip()
    if not text.lstrip("-").isdigit():
        raise BadValue("raw", f"is not an integer ({row['raw']!r})")
    return {"value": int(text)}


def test_the_sql_path_runs_and_a_rejected_batch_is_redone_in_python(mariadb_url):
    db = Database(mariadb_url)
    readings_metadata.create_all(db.engine)
    with db.engine.begin() as conn:
        conn.execute(
            readings.insert(),
            [
                {"id": i, "raw": "not a number" if i in BAD_IDS else f" {i * 10 - 50} "}
                for i in range(1, 19)
            ],
        )
    runner = Runner(db, readings_migrations)
    [result] = runner.run(["parse_value"], on_error="skip")
    assert result.state is State.SUCCESS
    s = result.status
    assert (s.processed, s.changed, s.skipped_errors) == (18, 16, 2)
    with db.engine.connect() as conn:
        values = dict(conn.execute(sa.select(readings.c.id, readings.c.value)).all())
    assert {i for i, v in values.items() if v is None} == set(BAD_IDS)
    assert all(values[i] == i * 10 - 50 for i in values if i not in BAD_IDS)
    assert sorted(r["row_id"] for r in runner.skipped_rows("parse_value")) == list(BAD_IDS)
    db.dispose()

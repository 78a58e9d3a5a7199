"""The Python path's set-based write on PostgreSQL: one `UPDATE ... FROM unnest(...)` per batch
(and per set of columns changed), storing exactly what row-by-row updates would store.

A composite text/integer key, every common column type, DELETE and SQL NULL, JSON encoded in
Python; a value too long for its VARCHAR raises as an assignment does (the arrays are cast to
TEXT, not VARCHAR(n), which would truncate silently); values psycopg cannot put in one array
(ints and floats mixed) and array columns (which unnest would flatten) go row by row instead.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from backfill import DELETE, Migrations, Row, Runner, State
from backfill.store import writes
from backfill.store.database import Database

metadata = sa.MetaData()
things = sa.Table(
    "things",
    metadata,
    sa.Column("region", sa.Text, primary_key=True),
    sa.Column("n", sa.Integer, primary_key=True),
    sa.Column("label", sa.String(5)),
    sa.Column("score", sa.Float),
    sa.Column("amount", sa.Numeric(10, 2)),
    sa.Column("doc", JSONB(none_as_null=True)),
    sa.Column("note", sa.Text),
    sa.Column("seen", sa.DateTime(timezone=True)),
    sa.Column("flag", sa.Boolean),
    sa.Column("tags", ARRAY(sa.Integer)),
)
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
REGIONS = ("eu", "us", "ap")
registry = Migrations()


def _fill(row: Row) -> dict[str, Any]:
    n = row["n"]
    return {
        "label": f"{row['region']}{n % 100}",
        "score": n / 4,
        "amount": Decimal(n) / 3 if n % 5 else Decimal("12.345"),
        "doc": DELETE if n % 7 == 0 else {"n": n, "text": f'é 😊 " \\ \n{n}', "list": [1, None]},
        "note": DELETE if n % 3 == 0 else f"note {n}",
        "seen": T0 + timedelta(seconds=n),
        "flag": n % 2 == 0,
    }


@registry.migration(table=things, batch_size=50)
def fill(row: Row) -> dict[str, Any]:
    """Every kind of column at once, in two column sets (note is not written on some rows)."""
    change = _fill(row)
    if row["n"] % 11 == 0:
        del change["note"]
    return change


@registry.migration(table=things, batch_size=50)
def mixed_scores(row: Row) -> dict[str, Any]:
    """Ints and floats in one float column: psycopg cannot make one array of them."""
    return {"score": row["n"] if row["n"] % 2 else row["n"] + 0.5}


@registry.migration(table=things, batch_size=50)
def tag(row: Row) -> dict[str, Any]:
    """An array column: written row by row, whole arrays intact."""
    return {"tags": [row["n"], row["n"] + 1]}


@registry.migration(table=things, batch_size=50)
def too_long(row: Row) -> dict[str, Any]:
    return {"label": "toolong" if row["n"] == 17 else "ok"}


def _seed(url: str, per_region: int = 40) -> Database:
    db = Database(url)
    metadata.create_all(db.engine)
    with db.engine.begin() as conn:
        conn.execute(
            things.insert(),
            [
                {"region": r, "n": n, "note": "old", "doc": {"old": True}}
                for r in REGIONS
                for n in range(1, per_region + 1)
            ],
        )
    return db


def _stored(db: Database) -> dict[tuple[str, int], dict[str, Any]]:
    with db.engine.connect() as conn:
        found = conn.execute(sa.select(things)).mappings().all()
    return {(r["region"], r["n"]): dict(r) for r in found}


class _Spy:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.set_based = 0
        self.row_by_row = 0
        original = writes.TableWrites._write_unnest

        def write(self_: writes.TableWrites, *args: Any) -> bool:
            done = original(self_, *args)
            if done:
                self.set_based += 1
            else:
                self.row_by_row += 1
            return done

        monkeypatch.setattr(writes.TableWrites, "_write_unnest", write)


def test_every_column_type_stored_as_row_by_row_updates_would(postgres_url, monkeypatch):
    db = _seed(postgres_url)
    spy = _Spy(monkeypatch)
    try:
        [result] = Runner(db, registry).run(["fill"])
        assert result.state is State.SUCCESS
        assert (result.status.processed, result.status.changed) == (120, 120)
        assert spy.set_based > 0 and spy.row_by_row == 0
        stored = _stored(db)
        for (region, n), row in stored.items():
            change = fill({"region": region, "n": n})
            expected = {"region": region, "n": n, "tags": None, "note": "old"}
            for name, value in change.items():
                expected[name] = None if value is DELETE else value
            expected["amount"] = expected["amount"].quantize(Decimal("0.01"), ROUND_HALF_UP)
            assert row == expected, (region, n)
        with db.engine.connect() as conn:
            nulls = conn.exec_driver_sql(
                "SELECT count(*) FILTER (WHERE doc IS NULL), count(*) FILTER (WHERE doc = "
                "'null'::jsonb) FROM things"
            ).one()
        assert tuple(nulls) == (3 * 5, 0)  # DELETE is SQL NULL, never JSON null
    finally:
        db.dispose()


def test_mixed_python_types_and_array_columns_go_row_by_row(postgres_url, monkeypatch):
    db = _seed(postgres_url)
    spy = _Spy(monkeypatch)
    try:
        runner = Runner(db, registry)
        assert [r.state for r in runner.run(["mixed_scores", "tag"])] == [State.SUCCESS] * 2
        assert spy.set_based == 0 and spy.row_by_row == 3  # mixed_scores' batches
        for (_region, n), row in _stored(db).items():
            assert row["score"] == (n if n % 2 else n + 0.5)
            assert row["tags"] == [n, n + 1]
    finally:
        db.dispose()


def test_a_value_too_long_raises_instead_of_being_truncated(postgres_url):
    db = _seed(postgres_url)
    try:
        with pytest.raises((psycopg.DataError, sa.exc.DataError), match="too long"):
            Runner(db, registry).run(["too_long"])
        labels = {row["label"] for row in _stored(db).values()}
        assert labels == {None}  # the batch rolled back: nothing written, nothing cut short
    finally:
        db.dispose()


def test_a_percent_sign_in_a_table_or_column_name(postgres_url):
    """psycopg's `format` placeholders: a `%` in a name is doubled once, never twice."""
    odd = sa.MetaData()
    table = sa.Table(
        "items 100%",
        odd,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("done %", sa.Text),
    )
    registry = Migrations()

    @registry.migration(table=table, batch_size=10)
    def mark(row: Row) -> dict[str, Any]:
        return {"done %": f"{row['id']}%"}

    engine = sa.create_engine(postgres_url)
    odd.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(table), [{"id": i} for i in range(1, 26)])
    [result] = Runner(postgres_url, registry).run(["mark"])
    assert result.state is State.SUCCESS and result.status.changed == 25
    with engine.connect() as conn:
        stored = conn.execute(sa.select(table.c["done %"]).order_by(table.c.id)).scalars().all()
    engine.dispose()
    assert stored == [f"{i}%" for i in range(1, 26)]

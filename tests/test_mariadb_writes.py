"""The Python path's set-based write on MariaDB: one `UPDATE ... JOIN (<rows>) AS _changes` per
batch (and per set of columns changed), storing exactly what row-by-row updates would store.

Each migration runs twice on the same seeded rows, set-based and with the set-based write
turned off (PyMySQL's `executemany`, an UPDATE per row), and every stored value is compared.
The rows are laid out against the derived table's column typing: NULL in a batch's first row,
a short string then a 70,000-character one, a JSON document, small integers then large ones,
strings of digits, a composite text/integer key, an integer key (walked first), identifiers
with capitals, spaces and `%`, UUID keys. A value too long for its VARCHAR raises as an
assignment does; columns mixing kinds of values, key changes and keys the server cannot
compare (a latin1 key given non-ASCII keys) go row by row instead; a group larger than the
statement budget is split, a value larger than it goes alone.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pymysql
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.dialects.mysql import pymysql as mysql_pymysql

from backfill import DELETE, Migrations, Row, Runner, State
from backfill.store import writes as table_writes_module
from backfill.store.database import Database
from backfill.store.values import ENCODE
from backfill.store.writes import TableWrites

LONG = "long é😊 " * 10_000  # 70,000 characters: a LONGTEXT value, after short ones
DOC = {"text": 'é 😊 " \\ \n\x00 end', "list": [1, None, True, 2.5], "nested": {"k": []}}
T0 = datetime(2025, 3, 1, 12, 0)
REGIONS = ("ap", "eu", "us")
PER_REGION = 40
# Stored before: nothing NULL, nothing a migration writes, so every row changes every column.
OLD = {
    "label": "old",
    "code": "old",
    "note": "old",
    "doc": {"old": True},
    "count": 0,
    "score": -1.0,
    "amount": Decimal(0),
    "seen": T0 - timedelta(days=1),
    "flag": False,
}

metadata = sa.MetaData()
things = sa.Table(
    "things",
    metadata,
    sa.Column("region", sa.String(8), primary_key=True),
    sa.Column("n", sa.Integer, primary_key=True),
    sa.Column("label", sa.String(5)),
    sa.Column("code", sa.String(10)),
    sa.Column("note", sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")),
    sa.Column("doc", sa.JSON(none_as_null=True)),
    sa.Column("count", sa.BigInteger),
    sa.Column("score", sa.Double),
    sa.Column("amount", sa.Numeric(10, 2)),
    sa.Column("seen", sa.DateTime),
    sa.Column("flag", sa.Boolean),
    sa.Column("big", sa.Numeric(65, 5)),
)
registry = Migrations()


def _fill(row: Row) -> dict[str, Any]:
    n = row["n"]
    if n == 1:  # each batch (one region) starts with NULL in every column it sets
        names = ("label", "code", "note", "doc", "count", "score", "amount", "seen", "flag")
        return dict.fromkeys(names, DELETE)
    return {
        "label": f"{row['region']}{n}",
        "code": f"{n:03d}",  # digits, not a number: "007" stays "007"
        "note": DELETE if n % 3 == 0 else (f"{LONG}{n}" if n % 4 == 1 else f"note {n}"),
        "doc": DELETE if n % 7 == 0 else {**DOC, "n": n},
        "count": 2**40 + n if n % 5 == 0 else -n if n % 6 == 0 else n,
        "score": n / 3,
        "amount": Decimal("12.345") if n % 5 == 0 else Decimal(n) / 3,
        "seen": T0 + timedelta(seconds=n, microseconds=n * 7),
        "flag": True,
    }


@registry.migration(table=things, batch_size=PER_REGION)
def fill(row: Row) -> dict[str, Any]:
    """Every kind of column at once, in two column sets (note is not written on some rows)."""
    change = _fill(row)
    if row["n"] % 11 == 0:
        del change["note"]
    return change


@registry.migration(table=things, batch_size=PER_REGION)
def mixed(row: Row) -> dict[str, Any]:
    """An integer on some rows and a string or a float on others, in one column: a derived
    table's column would make them all strings, or all DOUBLE (2**60 + 1 would lose its 1);
    row by row each is its own literal."""
    n = row["n"]
    if n % 2:
        return {"code": n, "count": 2**60 + n}
    return {"code": f"{n:03d}", "count": n + 0.25}


@registry.migration(table=things, batch_size=PER_REGION)
def wide(row: Row) -> dict[str, Any]:
    """Decimals with 60 digits before the point on some rows, 10 after it on others: a derived
    table's DECIMAL of both would need 70 digits, out of range (99...9 outside strict mode)."""
    n = row["n"]
    return {"big": Decimal(10**59 + n) if n % 2 else Decimal(n).scaleb(-10)}


@registry.migration(table=things, batch_size=PER_REGION)
def renumber(row: Row) -> dict[str, Any]:
    """A key column changed: row by row, in key order, as before (each row moves before the
    cursor, so the scan does not meet it again)."""
    return {"n": -row["n"], "label": "moved"}


@registry.migration(table=things, batch_size=PER_REGION)
def clear(row: Row) -> dict[str, Any]:
    """Only NULL in every column of the derived table."""
    return {"note": DELETE, "doc": DELETE, "count": None}


@registry.migration(table=things, batch_size=PER_REGION)
def too_long(row: Row) -> dict[str, Any]:
    return {"label": "toolong" if row["n"] == 17 else "ok"}


docs = sa.Table(
    "docs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("body", sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")),
    sa.Column("parts", sa.JSON(none_as_null=True)),
    sa.Column("size", sa.Integer),
)
DOC_IDS = [i * 3 for i in range(1, 101)]  # gaps between the keys a batch walks


@registry.migration(table=docs, batch_size=30, where=lambda t: t.c.id % 2 == 0)
def wrap(row: Row) -> dict[str, Any]:
    """An integer key, walked first, over a range with gaps (odd ids are left out)."""
    body = row["body"]
    parts = None if body is None else [{"type": "text", "text": body}, DOC]
    return {"parts": parts, "size": None if body is None else len(body)}


def _body(i: int) -> str | None:
    return None if i % 30 == 0 else f"{LONG}{i}" if i % 4 == 0 else f"short {i}"


def _seed(db: Database) -> None:
    with db.engine.begin() as conn:
        metadata.drop_all(conn)
        metadata.create_all(conn)
        conn.execute(
            things.insert(),
            [{"region": r, "n": n, **OLD} for r in REGIONS for n in range(1, PER_REGION + 1)],
        )
        conn.execute(docs.insert(), [{"id": i, "body": _body(i)} for i in DOC_IDS])


def _stored(db: Database, table: sa.Table) -> list[tuple[Any, ...]]:
    """Every row as the driver hands it back: text as stored, JSON as its text."""
    key = ", ".join(f"`{c.name}`" for c in table.primary_key.columns)
    with db.engine.connect() as conn:
        return [
            tuple(r) for r in conn.exec_driver_sql(f"SELECT * FROM {table.name} ORDER BY {key}")
        ]


class _Updates:
    """The UPDATE statements PyMySQL sends for a table (its `executemany` sends one per row)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, table: str) -> None:
        self.statements: list[str] = []
        original = pymysql.cursors.Cursor.execute

        def execute(cursor: Any, query: str, args: Any = None) -> Any:
            if query.startswith(f"UPDATE {table}"):
                self.statements.append(query)
            return original(cursor, query, args)

        monkeypatch.setattr(pymysql.cursors.Cursor, "execute", execute)

    @property
    def set_based(self) -> int:
        return sum("AS _changes" in s for s in self.statements)

    @property
    def row_by_row(self) -> int:
        return len(self.statements) - self.set_based


def _row_by_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TableWrites, "_write_derived", lambda *_: False)


def _both_ways(
    url: str, names: list[str], monkeypatch: pytest.MonkeyPatch, table: str
) -> tuple[Database, _Updates, dict[str, list[tuple[Any, ...]]]]:
    """Run `names` on freshly seeded rows row by row, then set-based; the rows stored each
    time, and the statements of the set-based run."""
    db = Database(url)
    stored: dict[str, list[tuple[Any, ...]]] = {}
    with monkeypatch.context() as patched:
        _row_by_row(patched)
        _seed(db)
        assert {r.state for r in Runner(db, registry).run(names)} == {State.SUCCESS}
        stored["row_by_row"] = _stored(db, metadata.tables[table])
    _seed(db)
    updates = _Updates(monkeypatch, table)
    assert {r.state for r in Runner(db, registry).run(names, restart=True)} == {State.SUCCESS}
    stored["set_based"] = _stored(db, metadata.tables[table])
    return db, updates, stored


def test_every_column_type_stored_as_row_by_row_updates_would(mariadb_url, monkeypatch):
    db, updates, stored = _both_ways(mariadb_url, ["fill"], monkeypatch, "things")
    try:
        assert stored["set_based"] == stored["row_by_row"]
        # One statement per batch (a region) and column set: two sets in each of 3 batches.
        assert (updates.set_based, updates.row_by_row) == (6, 0)
        with db.engine.connect() as conn:
            rows = conn.execute(sa.select(things)).mappings()
            found = {(r["region"], r["n"]): dict(r) for r in rows}
            query = sa.text("SELECT n, doc FROM things WHERE region = 'eu'")
            texts = dict(conn.execute(query).all())
        for (region, n), row in found.items():
            change = fill({"region": region, "n": n})
            expected: dict[str, Any] = {"region": region, "n": n, "note": "old", "big": None}
            for name, value in change.items():
                expected[name] = None if value is DELETE else value
            if expected["amount"] is not None:
                expected["amount"] = expected["amount"].quantize(Decimal("0.01"), ROUND_HALF_UP)
            if expected["seen"] is not None:
                expected["seen"] = expected["seen"].replace(microsecond=0)  # DATETIME(0)
            assert row == expected, (region, n)
        # JSON as the Python path encodes it (compact, UTF-8 as is), SQL NULL for DELETE.
        assert texts[2] == ENCODE({**DOC, "n": 2}) and texts[7] is None and texts[1] is None
    finally:
        db.dispose()


def test_an_integer_key_walked_first_over_a_range_with_gaps(mariadb_url, monkeypatch):
    db, updates, stored = _both_ways(mariadb_url, ["wrap"], monkeypatch, "docs")
    try:
        assert stored["set_based"] == stored["row_by_row"]
        assert (updates.set_based, updates.row_by_row) == (2, 0)  # 50 even ids, 30 a batch
        assert all(" BETWEEN " in s and "STRAIGHT_JOIN" in s for s in updates.statements)
        with db.engine.connect() as conn:
            found = {r.id: r for r in conn.execute(sa.select(docs))}
        for i in DOC_IDS:
            body, row = _body(i), found[i]
            if i % 2:
                assert (row.parts, row.size) == (None, None)  # outside the range: untouched
            elif body is None:
                assert (row.parts, row.size) == (None, None)
            else:
                assert row.parts == [{"type": "text", "text": body}, DOC]
                assert row.size == len(body)
    finally:
        db.dispose()


def test_mixed_kinds_wide_decimals_and_key_changes_go_row_by_row(mariadb_url, monkeypatch):
    names = ["mixed", "wide", "renumber"]
    db, updates, stored = _both_ways(mariadb_url, names, monkeypatch, "things")
    try:
        assert stored["set_based"] == stored["row_by_row"]
        assert updates.set_based == 0 and updates.row_by_row == 3 * len(REGIONS) * PER_REGION
        with db.engine.connect() as conn:
            query = sa.text("SELECT n, code, count, big FROM things WHERE region = 'us'")
            codes = {n: (code, count, big) for n, code, count, big in conn.execute(query)}
        assert codes[-3] == ("3", 2**60 + 3, Decimal(10**59 + 3))
        assert codes[-4] == ("004", 4, Decimal("0.00000"))
    finally:
        db.dispose()


def test_a_group_of_nulls_only(mariadb_url, monkeypatch):
    db, updates, stored = _both_ways(mariadb_url, ["clear"], monkeypatch, "things")
    try:
        assert stored["set_based"] == stored["row_by_row"]
        assert (updates.set_based, updates.row_by_row) == (3, 0)
        assert {(r[4], r[5], r[6]) for r in stored["set_based"]} == {(None, None, None)}
    finally:
        db.dispose()


def test_a_value_too_long_raises_instead_of_being_truncated(mariadb_url, monkeypatch):
    db = Database(mariadb_url)
    _seed(db)
    updates = _Updates(monkeypatch, "things")
    try:
        with pytest.raises((pymysql.err.DataError, sa.exc.DataError), match="too long"):
            Runner(db, registry).run(["too_long"])
        assert updates.set_based == 1
        with db.engine.connect() as conn:
            labels = set(conn.execute(sa.select(things.c.label)).scalars())
        assert labels == {"old"}  # the batch rolled back: nothing written, nothing cut short
    finally:
        db.dispose()


odd_metadata = sa.MetaData()
odd = sa.Table(
    "Order Items%",
    odd_metadata,
    sa.Column("itemId", sa.Uuid, primary_key=True),
    sa.Column("Body Text", sa.Text),
    sa.Column("100% Done", sa.Text),
    sa.Column("v0", sa.Integer),  # a name the derived table's columns must not shadow
)
odd_migrations = Migrations()


@odd_migrations.migration(table=odd, batch_size=25)
def shout(row: Row) -> dict[str, Any] | None:
    body = row["Body Text"]
    return {"100% Done": None if body is None else body.upper() + " 100%", "v0": len(body or "")}


def test_quoted_identifiers_and_uuid_keys(mariadb_url, monkeypatch):
    db = Database(mariadb_url)
    odd_metadata.create_all(db.engine)
    ids = [uuid.UUID(int=i * 7919) for i in range(60)]
    bodies = {u: None if i % 9 == 0 else f"%s é {i} " * (1 + i % 5) for i, u in enumerate(ids)}
    with db.engine.begin() as conn:
        conn.execute(
            odd.insert(),
            [{"itemId": u, "Body Text": b, "100% Done": "old"} for u, b in bodies.items()],
        )
    updates = _Updates(monkeypatch, "`Order Items%")
    try:
        [result] = Runner(db, odd_migrations).run(["shout"])
        assert result.state is State.SUCCESS and result.status.changed == 60
        assert (updates.set_based, updates.row_by_row) == (3, 0)
        with db.engine.connect() as conn:
            found = {r[0]: r[1:] for r in conn.execute(sa.select(odd.c.itemId, *odd.c[2:]))}
        for u, body in bodies.items():
            assert found[u] == (None if body is None else body.upper() + " 100%", len(body or ""))
    finally:
        db.dispose()


latin_metadata = sa.MetaData()
latin = sa.Table(
    "latin",
    latin_metadata,
    sa.Column("code", mysql.VARCHAR(20, charset="latin1"), primary_key=True),
    sa.Column("note", sa.Text),
)
latin_migrations = Migrations()


@latin_migrations.migration(table=latin, batch_size=100)
def annotate(row: Row) -> dict[str, Any]:
    return {"note": f"{row['code']} 😊"}


def test_keys_the_server_cannot_compare_in_a_derived_table_go_row_by_row(mariadb_url, monkeypatch):
    """A latin1 key column given non-ASCII keys: "Illegal mix of collations" in the JOIN,
    before anything is written; the batch goes on row by row, as `WHERE code = 'é'` works."""
    db = Database(mariadb_url)
    latin_metadata.create_all(db.engine)
    codes = [f"{c}{i}" for i in range(10) for c in ("a", "é", "Z")]
    with db.engine.begin() as conn:
        conn.execute(latin.insert(), [{"code": c} for c in codes])
    updates = _Updates(monkeypatch, "latin")
    try:
        [result] = Runner(db, latin_migrations).run(["annotate"])
        assert result.state is State.SUCCESS and result.status.changed == 30
        assert (updates.set_based, updates.row_by_row) == (1, 30)  # refused, then row by row
        with db.engine.connect() as conn:
            notes = dict(conn.execute(sa.select(latin.c.code, latin.c.note)).all())
        assert notes == {c: f"{c} 😊" for c in codes}
    finally:
        db.dispose()


def test_a_group_is_split_into_statements_of_at_most_so_many_rows(mariadb_url, monkeypatch):
    db = Database(mariadb_url)
    _seed(db)
    monkeypatch.setattr(table_writes_module, "_ROWS_PER_STATEMENT", 7)
    updates = _Updates(monkeypatch, "docs")
    try:
        [result] = Runner(db, registry).run(["wrap"])
        assert result.state is State.SUCCESS and result.status.changed == 40
        # 24 rows changed in the first batch (7, 7, 7, 3), 16 in the second (7, 7, 2).
        assert (updates.set_based, updates.row_by_row) == (7, 0)
        _check_wrapped(db)
    finally:
        db.dispose()


def test_statements_stay_under_the_budget_and_a_larger_value_goes_alone(mariadb_url, monkeypatch):
    db = Database(mariadb_url)
    _seed(db)
    original = TableWrites._derived_limits
    budget = 200_000  # under a long row's literal (LONG in hex: 240,000 bytes)

    def small(self: TableWrites, raw: Any) -> tuple[int, bool]:
        return budget, original(self, raw)[1]

    monkeypatch.setattr(TableWrites, "_derived_limits", small)
    updates = _Updates(monkeypatch, "docs")
    try:
        [result] = Runner(db, registry).run(["wrap"])
        assert result.state is State.SUCCESS and result.status.changed == 40
        set_based = [s for s in updates.statements if "AS _changes" in s]
        row_by_row = [s for s in updates.statements if "AS _changes" not in s]
        assert set_based and max(map(len, set_based)) < budget + 1_000
        assert len(row_by_row) >= 10  # the ten long bodies among the even ids, at least
        assert all("long é" not in s and "6c6f6e6720" not in s for s in set_based)
        _check_wrapped(db)
    finally:
        db.dispose()


def _check_wrapped(db: Database) -> None:
    with db.engine.connect() as conn:
        parts = dict(conn.execute(sa.select(docs.c.id, docs.c.parts)).all())
    for i in DOC_IDS:
        body = _body(i)
        wrapped = i % 2 == 0 and body is not None
        assert parts[i] == ([{"type": "text", "text": body}, DOC] if wrapped else None), i


def test_the_union_form_for_mysql_servers_stores_the_same(mariadb_url, monkeypatch):
    """MySQL has no `VALUES (...), (...)` in a UNION (8.0.19 spells it `VALUES ROW(...)`):
    there the derived table is a chain of `UNION ALL SELECT`, typed the same way. Run here on
    MariaDB, through a scan that takes the server for MySQL."""
    db = Database(mariadb_url)
    _seed(db)
    table_writes = TableWrites(db.engine, Runner(db, registry).migration("fill"))
    table_writes.dialect = mysql_pymysql.dialect(paramstyle="format")  # not MariaDB
    writes = table_writes.writes()
    for n in range(1, PER_REGION + 1):
        change = _fill({"region": "eu", "n": n})
        writes.add(("eu", n), {k: None if v is DELETE else v for k, v in change.items()})
    updates = _Updates(monkeypatch, "things")
    try:
        with db.engine.begin() as conn:
            table_writes.write(conn, writes)
        [update] = updates.statements
        assert " UNION ALL SELECT " in update and " VALUES " not in update
        assert " STRAIGHT_JOIN " not in update
        with db.engine.connect() as conn:
            query = sa.select(things).where(things.c.region == "eu")
            found = {r.n: r for r in conn.execute(query)}
        assert found[1].note is None and found[1].count is None and found[1].doc is None
        assert found[5].note == f"{LONG}5" and found[2].note == "note 2"
        assert (found[30].count, found[6].count, found[7].count) == (2**40 + 30, -6, 7)
        assert found[7].code == "007" and found[2].doc == {**DOC, "n": 2}
        assert found[2].amount == Decimal("0.67") and found[5].amount == Decimal("12.35")
    finally:
        db.dispose()

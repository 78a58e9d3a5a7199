"""The undo log in `_migration_undo`: what a batch with `--undo` changed, written in the batch's
own transaction, and read back newest first by a revert (backfill.revert).

Values are stored as tagged JSON so that each comes back as the very Python value it was (text,
numbers, JSON documents, bytes, times, decimals, UUIDs): `{"v": value}` for what JSON holds as
it is, `{"bytes": base64}`, `{"datetime": iso}` and so on for the rest.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from backfill.store.tables import migration_undo
from backfill.types import Key, decode_key, encode_key

undo = migration_undo

UPDATE = "update"
INSERT = "insert"

_TAGS: dict[str, tuple[type, Callable[[Any], Any], Callable[[Any], Any]]] = {
    "bytes": (
        bytes,
        lambda v: base64.b64encode(v).decode("ascii"),
        lambda s: base64.b64decode(s),
    ),
    "datetime": (dt.datetime, lambda v: v.isoformat(), dt.datetime.fromisoformat),
    "date": (dt.date, lambda v: v.isoformat(), dt.date.fromisoformat),
    "time": (dt.time, lambda v: v.isoformat(), dt.time.fromisoformat),
    "timedelta": (dt.timedelta, lambda v: v.total_seconds(), lambda s: dt.timedelta(seconds=s)),
    "decimal": (decimal.Decimal, str, decimal.Decimal),
    "uuid": (uuid.UUID, str, uuid.UUID),
}


def encode_value(value: Any) -> dict[str, Any]:
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    for tag, (kind, encode, _) in _TAGS.items():
        # datetime is a date: the first tag that matches exactly wins.
        if type(value) is kind or (kind is dt.datetime and isinstance(value, dt.datetime)):
            return {tag: encode(value)}
    return {"v": value}


def decode_value(tagged: dict[str, Any]) -> Any:
    ((tag, value),) = tagged.items()
    if tag == "v":
        return value
    return _TAGS[tag][2](value)


def dumps(value: Any) -> str:
    return json.dumps(encode_value(value), ensure_ascii=False)


def loads(stored: str | None) -> Any:
    return None if stored is None else decode_value(json.loads(stored))


def dumps_row(values: dict[str, Any]) -> str:
    return json.dumps({n: encode_value(v) for n, v in values.items()}, ensure_ascii=False)


def loads_row(stored: str) -> dict[str, Any]:
    return {n: decode_value(v) for n, v in json.loads(stored).items()}


@dataclass(frozen=True)
class Entry:
    """One logged change: to `column` of the row `key` (`update`), or the row a copy inserted
    with its `after` values (`insert`)."""

    id: int
    action: str
    key: Key
    column: str | None
    before: Any
    after: Any


class UndoLog:
    """A run's log: what it appends for each batch, with its run id."""

    def __init__(self, name: str, run_id: int | None) -> None:
        self.name, self.run_id = name, run_id

    def updates(
        self,
        conn: sa.Connection,
        changes: Iterable[tuple[Key, dict[str, Any], dict[str, Any]]],
    ) -> int:
        """Log (key, before, after) of each changed row, one entry per changed column."""
        rows = [
            self._row(UPDATE, key, column, dumps(before.get(column)), dumps(value))
            for key, before, after in changes
            for column, value in after.items()
        ]
        return self._insert(conn, rows)

    def inserts(self, conn: sa.Connection, rows: Iterable[tuple[Key, dict[str, Any]]]) -> int:
        """Log the rows a copy inserted: their keys and values."""
        entries = [self._row(INSERT, key, None, None, dumps_row(values)) for key, values in rows]
        return self._insert(conn, entries)

    def _row(
        self, action: str, key: Key, column: str | None, before: str | None, after: str
    ) -> dict[str, Any]:
        return {
            "migration": self.name,
            "run_id": self.run_id,
            "action": action,
            "row_key": encode_key(key),
            "column_name": column,
            "before": before,
            "after": after,
            "kept": False,
        }

    @staticmethod
    def _insert(conn: sa.Connection, rows: list[dict[str, Any]]) -> int:
        if rows:
            conn.execute(sa.insert(undo), rows)
        return len(rows)


def kept_here(conn: sa.Connection) -> bool:
    """Whether the tables have an undo log (layout 4 and later)."""
    return sa.inspect(conn).has_table(undo.name)


def newest(conn: sa.Connection, name: str, limit: int) -> list[Entry]:
    """The newest `limit` entries not yet reverted nor kept, newest first."""
    query = (
        sa.select(undo)
        .where(undo.c.migration == name, undo.c.kept.is_(False))
        .order_by(undo.c.id.desc())
        .limit(limit)
    )
    found = []
    for row in conn.execute(query).mappings():
        key = decode_key(row["row_key"])
        assert key is not None
        after = loads_row(row["after"]) if row["action"] == INSERT else loads(row["after"])
        found.append(
            Entry(row["id"], row["action"], key, row["column_name"], loads(row["before"]), after)
        )
    return found


def settle(conn: sa.Connection, reverted: list[int], kept: list[int]) -> None:
    """Entries done by a revert batch: `reverted` ones go, `kept` ones stay, marked."""
    for ids, statement in (
        (reverted, sa.delete(undo)),
        (kept, sa.update(undo).values(kept=True)),
    ):
        for start in range(0, len(ids), 500):
            conn.execute(statement.where(undo.c.id.in_(ids[start : start + 500])))


def count(conn: sa.Connection, name: str) -> int:
    """Entries still to revert."""
    query = sa.select(sa.func.count()).where(undo.c.migration == name, undo.c.kept.is_(False))
    return int(conn.execute(query).scalar_one())


def counts(conn: sa.Connection) -> dict[str, int]:
    """Entries still to revert, by migration (those with any)."""
    query = (
        sa.select(undo.c.migration, sa.func.count())
        .where(undo.c.kept.is_(False))
        .group_by(undo.c.migration)
    )
    return {name: int(n) for name, n in conn.execute(query).all()}


def kept_keys(conn: sa.Connection, name: str, limit: int = 20) -> list[Key]:
    """Rows a revert kept because the app changed them since (first ones, by log order)."""
    query = (
        sa.select(undo.c.row_key)
        .where(undo.c.migration == name, undo.c.kept.is_(True))
        .group_by(undo.c.row_key)
        .order_by(sa.func.min(undo.c.id))
        .limit(limit)
    )
    return [k for (stored,) in conn.execute(query).all() if (k := decode_key(stored))]


def forget(conn: sa.Connection, name: str) -> None:
    conn.execute(sa.delete(undo).where(undo.c.migration == name))

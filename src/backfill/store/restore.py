"""Putting logged values back into a table (a revert's batch, backfill.revert): the rows the
entries name, locked and read as the driver gives them; each value still the one the migration
wrote is restored (or a row a copy inserted is deleted), each other one kept."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import sqlalchemy as sa

from backfill.definition import Migration
from backfill.store import undo as log
from backfill.store.dialects import LOCKING
from backfill.store.values import decode_json
from backfill.store.writes import TableWrites
from backfill.types import Key, decode_key, encode_key


class Restore:
    """The restoring of `migration`'s logged changes: in its table, or a copy's target."""

    def __init__(self, engine: sa.Engine, migration: Migration) -> None:
        written = migration
        if not migration.in_place:  # a copy's rows are its target's, by the target's own key
            assert migration.target is not None
            written = replace(
                migration, table=migration.target, target=None, key_columns=(), where=None
            )
        self.table, self.key = written.table, written.key
        self.dialect = engine.dialect
        self.writes = TableWrites(engine, written)

    def __call__(
        self, conn: sa.Connection, entries: list[log.Entry]
    ) -> tuple[list[int], list[int]]:
        """Put back what `entries` (newest first) wrote where it is still there; the ids of the
        entries restored, and of those kept (the row holds another value now)."""
        current = self._rows(conn, {e.key for e in entries})
        restored: dict[Key, dict[str, Any]] = {}
        deleted: list[Key] = []
        reverted, kept = [], []
        for entry in entries:
            row = current.get(entry.key)
            if entry.action == log.UPDATE and entry.column is not None:
                if row is not None and self._same(entry.column, row.get(entry.column), entry.after):
                    row[entry.column] = entry.before
                    restored.setdefault(entry.key, {})[entry.column] = entry.before
                    reverted.append(entry.id)
                    continue
            elif row is not None and all(
                self._same(n, row.get(n), v) for n, v in entry.after.items()
            ):
                current[entry.key] = None
                deleted.append(entry.key)
                restored.pop(entry.key, None)
                reverted.append(entry.id)
                continue
            kept.append(entry.id)
        if restored:
            writes = self.writes.writes()
            for key, values in restored.items():
                writes.add(key, values)
            self.writes.write(conn, writes)
        for start in range(0, len(deleted), 500):
            chosen = deleted[start : start + 500]
            conn.execute(sa.delete(self.table).where(sa.tuple_(*self.key).in_(chosen)))
        return reverted, kept

    def _rows(self, conn: sa.Connection, keys: set[Key]) -> dict[Key, dict[str, Any] | None]:
        """The rows with `keys` as they are now, locked where the dialect locks rows: values as
        the driver gives them (as the migration's scan read them, and the log kept them)."""
        found: dict[Key, dict[str, Any] | None] = {}
        names = [c.name for c in self.key]
        raw = [sa.type_coerce(c, sa.types.NullType()).label(c.name) for c in self.table.columns]
        ordered = sorted(keys, key=repr)
        for start in range(0, len(ordered), 500):
            query = sa.select(*raw).where(sa.tuple_(*self.key).in_(ordered[start : start + 500]))
            if conn.dialect.name in LOCKING:
                query = query.with_for_update()
            for row in conn.execute(query).mappings():
                # Keyed as the log keeps keys (JSON): a UUID or a time as text.
                key = decode_key(encode_key(tuple(row[n] for n in names)))
                assert key is not None
                found[key] = dict(row)
        return found

    def _same(self, column: str, current: Any, written: Any) -> bool:
        """Whether the value now (as the driver gives it) is the value the migration wrote: the
        same, or the same once the column's type makes it the driver's (a time written as a
        datetime, stored as text), or the same JSON document read back as text."""
        if current == written:
            return True
        if column in self.table.c and written is not None and not isinstance(written, str):
            processor = self.table.c[column].type.bind_processor(self.dialect)
            try:
                if processor is not None and processor(written) == current:
                    return True
            except (TypeError, ValueError):
                pass
        return (
            isinstance(current, str | bytes)
            and not isinstance(written, str | bytes)
            and (decode_json(current) == written)
        )

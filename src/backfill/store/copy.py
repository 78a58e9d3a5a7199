"""The target table of a copy: which of a batch's rows it still lacks, and putting them there.

A copy migration's function turns each source row into a target row. Inside the batch's
transaction this module reads the target rows with the same keys (locked where the dialect
locks), keeps in the batch's outcome only the rows to insert (or, with `existing="update"`, to
update because they differ), and writes them with an INSERT that ignores a key the application
inserted meanwhile. So a resumed or restarted copy never duplicates a row, and the source is
never written.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from backfill.definition import Existing, Migration
from backfill.store.database import driver
from backfill.store.dialects import JSON_AS_TEXT, LOCKING, insert_ignoring_conflicts
from backfill.store.statement import Statement
from backfill.store.values import Writes, decode_json, is_json
from backfill.types import Key

_KEYS_PER_READ = 500


class CopyTarget:
    def __init__(self, engine: sa.Engine, migration: Migration) -> None:
        assert migration.target is not None
        self.migration = migration
        self.table = migration.target
        self.dialect = engine.dialect
        self.key = tuple(self.table.primary_key.columns)
        self.key_names = tuple(c.name for c in self.key)
        self.names = [c.name for c in self.table.columns]
        decoded = self.dialect.name in JSON_AS_TEXT
        self._decoded = [c.name for c in self.table.columns if decoded and is_json(c)]
        self._reads: dict[tuple[int, bool], Statement] = {}
        self._inserts: dict[tuple[str, ...], Statement] = {}
        self._updates: dict[tuple[str, ...], Statement] = {}

    def writes(self) -> Writes:
        """Where decide encodes the target rows (JSON columns of the target, not the source)."""
        return Writes(frozenset(c.name for c in self.table.columns if is_json(c)))

    def settle(
        self,
        conn: sa.Connection,
        changes: list[tuple[Key, dict[str, Any]]],
        writes: Writes | None,
        *,
        lock: bool,
        write: bool,
    ) -> tuple[list[tuple[Key, dict[str, Any]]], dict[Key, dict[str, Any]]]:
        """Of `changes` (source key, target row), the rows the target lacks or, with
        existing="update", holds otherwise, written when `write`; and the target's current
        rows by source key. `writes` has the rows encoded for the driver by decide (which
        named any value that cannot be stored)."""
        if not changes:
            return [], {}
        width = len(self.migration.key)
        encoded: dict[Key, tuple[Any, ...]] = {}
        if writes is not None:
            for group in writes.groups.values():
                for driver_row in group:
                    encoded[tuple(driver_row[-width:])] = tuple(driver_row[:-width])
        present = self._present(
            conn, [tuple(r[n] for n in self.key_names) for _, r in changes], lock
        )
        inserts: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        updates: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        kept: list[tuple[Key, dict[str, Any]]] = []
        before: dict[Key, dict[str, Any]] = {}
        seen: set[Key] = set()
        for source_key, row in changes:
            target_key = tuple(row[n] for n in self.key_names)
            if target_key in seen:
                continue  # two source rows for one target row: the first one's stands
            seen.add(target_key)
            existing = present.get(target_key)
            values = encoded.get(source_key) or tuple(row.values())
            if existing is None:
                inserts.setdefault(tuple(row), []).append(values)
            elif self.migration.existing is Existing.UPDATE and any(
                existing.get(n) != v for n, v in row.items()
            ):
                updates.setdefault(tuple(row), []).append(values + target_key)
                before[source_key] = existing
            else:
                continue
            kept.append((source_key, row))
        if write:
            raw = driver(conn).cursor()
            try:
                for names, rows in inserts.items():
                    statement = self._insert_statement(names)
                    raw.executemany(statement.sql, [statement.params(r) for r in rows])
                for names, rows in updates.items():
                    statement = self._update_statement(names)
                    raw.executemany(statement.sql, [statement.params(r) for r in rows])
            finally:
                raw.close()
        return kept, before

    def _present(
        self, conn: sa.Connection, keys: list[Key], lock: bool
    ) -> dict[Key, dict[str, Any]]:
        """The target rows with these keys, decoded as the function's rows are."""
        found: dict[Key, dict[str, Any]] = {}
        raw = driver(conn).cursor()
        try:
            for start in range(0, len(keys), _KEYS_PER_READ):
                chunk = keys[start : start + _KEYS_PER_READ]
                statement = self._read_statement(len(chunk), lock)
                raw.execute(statement.sql, statement.params([v for k in chunk for v in k]))
                for stored in raw.fetchall():
                    row = dict(zip(self.names, stored, strict=True))
                    for name in self._decoded:
                        if row[name] is not None:
                            row[name] = decode_json(row[name])
                    found[tuple(row[n] for n in self.key_names)] = row
        finally:
            raw.close()
        # Keys as the function gave them: a driver may hand back another type (a UUID for a
        # str); match on text then.
        if found and not set(found).issuperset(keys):
            by_text = {_text(k): row for k, row in found.items()}
            return {k: by_text[_text(k)] for k in keys if _text(k) in by_text}
        return found

    def _read_statement(self, count: int, lock: bool) -> Statement:
        cached = self._reads.get((count, lock))
        if cached is None:
            width = len(self.key)
            names = [f"k{i}" for i in range(count * width)]
            params = [sa.bindparam(n, type_=self.key[i % width].type) for i, n in enumerate(names)]
            if width == 1:
                match = self.key[0].in_(params)
            else:
                rows = [sa.tuple_(*params[i : i + width]) for i in range(0, len(params), width)]
                match = sa.tuple_(*self.key).in_(rows)
            statement = sa.select(*self.table.columns).where(match)
            if lock and self.dialect.name in LOCKING:
                statement = statement.with_for_update()
            cached = Statement.compile(statement, self.dialect, names)
            if len(self._reads) < 16:  # full chunks recur; the last, shorter one may not
                self._reads[(count, lock)] = cached
        return cached

    def _insert_statement(self, names: tuple[str, ...]) -> Statement:
        cached = self._inserts.get(names)
        if cached is None:
            params = [f"v{i}" for i in range(len(names))]
            values: dict[sa.Column[Any], Any] = {
                self.table.c[n]: sa.bindparam(p) for n, p in zip(names, params, strict=True)
            }
            cached = Statement.compile(
                insert_ignoring_conflicts(self.dialect, self.table, values, self.key[0]),
                self.dialect,
                params,
            )
            self._inserts[names] = cached
        return cached

    def _update_statement(self, names: tuple[str, ...]) -> Statement:
        cached = self._updates.get(names)
        if cached is None:
            params = [f"v{i}" for i in range(len(names))]
            keys = [f"k{i}" for i in range(len(self.key))]
            statement = sa.update(self.table).values(
                {self.table.c[n]: sa.bindparam(p) for n, p in zip(names, params, strict=True)}
            )
            for column, key in zip(self.key, keys, strict=True):
                statement = statement.where(column == sa.bindparam(key, type_=column.type))
            cached = Statement.compile(statement, self.dialect, params + keys)
            self._updates[names] = cached
        return cached


def _text(key: Key) -> tuple[str, ...]:
    return tuple(str(v) for v in key)

"""Rows skipped under `--on-error skip`, in `_migration_errors`: recorded with their batch,
listed by `verify`, forgotten when a run starts over."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa

from backfill.store.tables import migration_errors
from backfill.types import Key, encode_key, row_id


def record(
    conn: sa.Connection, name: str, skipped: list[tuple[Key, str | None, str, str]], now: float
) -> None:
    """Remember rows skipped under --on-error skip (replacing an older entry for the same row)."""
    if not skipped:
        return
    ids = [encode_key(key) for key, *_ in skipped]
    conn.execute(
        sa.delete(migration_errors).where(
            migration_errors.c.migration == name, migration_errors.c.row_id.in_(ids)
        )
    )
    conn.execute(
        sa.insert(migration_errors),
        [
            {
                "migration": name,
                "row_id": encoded,
                "field": field,
                "error_type": kind,
                "message": message,
                "at": now,
            }
            for encoded, (_key, field, kind, message) in zip(ids, skipped, strict=True)
        ],
    )


def forget(conn: sa.Connection, name: str) -> None:
    conn.execute(sa.delete(migration_errors).where(migration_errors.c.migration == name))


def rows(
    conn: sa.Connection, name: str, limit: int = 20, *, newest: bool = False
) -> list[dict[str, Any]]:
    order = migration_errors.c.id.desc() if newest else migration_errors.c.id
    rows = conn.execute(
        sa.select(migration_errors)
        .where(migration_errors.c.migration == name)
        .order_by(order)
        .limit(limit)
    ).mappings()
    return [
        {
            "row_id": row_id(tuple(json.loads(r["row_id"]))),
            "field": r["field"],
            "type": r["error_type"],
            "message": r["message"],
            "at": r["at"],
        }
        for r in rows
    ]

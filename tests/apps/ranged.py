"""A test app whose range is read from the environment, as if a deploy changed it: `RANGED_BELOW`
keeps rows with `id` below it (unset: every row). A `source` of "bad" makes the function raise.

Uses only backfill's public API, as a user's application would.
"""

from __future__ import annotations

import os

import sqlalchemy as sa

from backfill import BadValue, Migrations, Row

metadata = sa.MetaData()
items = sa.Table(
    "ranged items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("derived", sa.Text),
)

migrations = Migrations()
_below = os.environ.get("RANGED_BELOW")


@migrations.migration(
    table=items, batch_size=10, where=None if _below is None else items.c.id < int(_below)
)
def fill(row: Row) -> dict[str, object]:
    if row["source"] == "bad":
        raise BadValue("source", "is bad")
    return {"derived": row["source"] * 2}

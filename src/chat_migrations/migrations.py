"""The flagship migrations: legacy `body`/`thinking_content` become `parts`, then are removed."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from backfill import DELETE, BadValue, Keep, Migrations, Prerequisite, Row, Runner
from chat_migrations.parts import derive_parts
from chat_migrations.schema import messages

CLEANUP_WAIT = timedelta(days=7)
_LEGACY = ("body", "thinking_content", "parts")

migrations = Migrations()


@migrations.migration(table=messages, batch_size=1000, columns=_LEGACY)
def body_to_parts(row: Row) -> dict[str, Any] | None:
    """Write `parts` from the legacy fields on rows that have none."""
    if row["parts"] is not None:
        return None  # written by the new code, or already migrated
    return {"parts": derive_parts(row["body"], row["thinking_content"])}


@migrations.migration(
    table=messages,
    batch_size=1000,
    columns=_LEGACY,
    requires=Prerequisite("body_to_parts", min_age=CLEANUP_WAIT, verified=True),
)
def cleanup_legacy_fields(row: Row) -> dict[str, Any] | Keep | None:
    """Clear the legacy fields where `parts` says exactly the same thing."""
    if row["body"] is None and row["thinking_content"] is None:
        return None
    try:
        expected = derive_parts(row["body"], row["thinking_content"])
    except BadValue as error:
        return Keep(f"legacy field {error.field} {error.reason}")
    if row["parts"] != expected:
        # Old code edited the row after it was migrated (or parts are broken): keep the text.
        return Keep("parts differ from what the legacy fields give")
    return {"body": DELETE, "thinking_content": DELETE}


def count_legacy_messages(database: str | sa.Engine) -> int:
    """Messages still without parts: those body_to_parts would write, plus those it rejects."""
    found = Runner(database, migrations).count("body_to_parts")
    return found.remaining + found.raising

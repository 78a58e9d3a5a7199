"""The chat application's `messages` table, as its legacy code and its new code both see it."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("conversation_id", sa.Integer, nullable=False, index=True),
    sa.Column("role", sa.String(16), nullable=False),
    # Legacy fields, written by the old code; removed by cleanup_legacy_fields.
    sa.Column("body", sa.Text),
    sa.Column("thinking_content", sa.Text),
    # The AI SDK's message parts; NULL until body_to_parts (or the new code) writes them.
    # none_as_null: app code that writes None means "no parts" (SQL NULL), not the JSON `null`.
    sa.Column(
        "parts", sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
    ),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

"""The chat application's `messages` table, as its legacy code and its new code both see it."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.mysql import LONGTEXT
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()
# MySQL's TEXT holds 64 KB; a message may be longer (its JSON already is LONGTEXT on MariaDB).
MESSAGE_TEXT = sa.Text().with_variant(LONGTEXT(), "mysql", "mariadb")

messages = sa.Table(
    "messages",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("conversation_id", sa.Integer, nullable=False, index=True),
    sa.Column("role", sa.String(16), nullable=False),
    # Legacy fields, written by the old code; removed by cleanup_legacy_fields.
    sa.Column("body", MESSAGE_TEXT),
    sa.Column("thinking_content", MESSAGE_TEXT),
    # The AI SDK's message parts; NULL until body_to_parts (or the new code) writes them.
    # none_as_null: app code that writes None means "no parts" (SQL NULL), not the JSON `null`.
    sa.Column(
        "parts", sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
    ),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

# The runbook's "new table" variant: new code reads and writes only this table, with parts and
# no legacy fields; `copy_to_messages_v2` fills it from `messages`, which it leaves intact.
messages_v2 = sa.Table(
    "messages_v2",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("conversation_id", sa.Integer, nullable=False, index=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column(
        "parts",
        sa.JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql"),
        nullable=False,
    ),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

"""The runbook's "new table" variant: every message is copied into `messages_v2`, with parts.

Instead of adding `parts` to `messages` and later clearing the legacy fields, the new code
reads and writes `messages_v2`. The copy inserts each message once (re-running or resuming
never duplicates), keeps a row the new code wrote there first, and never writes `messages`,
so the old code keeps working on it until it is retired. Its own registry:
`backfill run copy_to_messages_v2 --app chat_migrations.new_table:migrations`.
"""

from __future__ import annotations

from typing import Any

from backfill import BadValue, MalformedJSON, Migrations, Row
from chat_migrations.parts import derive_parts
from chat_migrations.schema import messages, messages_v2

migrations = Migrations()


@migrations.copy(source=messages, target=messages_v2, batch_size=1000)
def copy_to_messages_v2(row: Row) -> dict[str, Any]:
    """Copy a message into messages_v2 with its parts (as stored, else from the legacy fields)."""
    parts = row["parts"]
    if isinstance(parts, MalformedJSON):
        raise BadValue("parts", f"holds malformed JSON ({parts.error})")
    if parts is None:
        parts = derive_parts(row["body"], row["thinking_content"])
    return {
        "id": row["id"],
        "conversation_id": row["conversation_id"],
        "role": row["role"],
        "parts": parts,
        "created_at": row["created_at"],
    }

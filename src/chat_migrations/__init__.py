"""The chat application of the runbook: messages move from body/thinking_content to parts."""

from chat_migrations.migrations import (
    body_to_parts,
    cleanup_legacy_fields,
    count_legacy_messages,
    migrations,
)
from chat_migrations.parts import InvalidMessage, derive_parts, message_parts
from chat_migrations.schema import messages, metadata
from chat_migrations.viewer import MessageViewer

__all__ = [
    "InvalidMessage",
    "MessageViewer",
    "body_to_parts",
    "cleanup_legacy_fields",
    "count_legacy_messages",
    "derive_parts",
    "message_parts",
    "messages",
    "metadata",
    "migrations",
]

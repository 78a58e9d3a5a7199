"""Message parts in the AI SDK's convention, derived from the legacy fields. Pure: no database.

`derive_parts` is the single source of truth: the migration writes what it returns, and readers
fall back to it for rows not migrated yet, so a legacy row and its migrated twin read the same.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from backfill import BadValue, MalformedJSON

Part = dict[str, str]


class InvalidMessage(ValueError):
    """A stored message that cannot be read as parts; names the message and the field."""


def _text(field: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        raise BadValue(field, f"is a blob of {len(bytes(value))} bytes, not text")
    raise BadValue(field, f"is of type {type(value).__name__} ({value!r}), not text")


def derive_parts(body: Any, thinking_content: Any) -> list[Part]:
    """Reasoning first, then text; empty or NULL values omitted; [] when neither."""
    parts: list[Part] = []
    thinking = _text("thinking_content", thinking_content)
    if thinking is not None:
        parts.append({"type": "reasoning", "text": thinking})
    text = _text("body", body)
    if text is not None:
        parts.append({"type": "text", "text": text})
    return parts


def message_parts(msg: Mapping[str, Any]) -> list[Part]:
    """What to render: the stored parts when present, else those the legacy fields give."""
    who = f"message {msg.get('id')!r}"
    parts = msg.get("parts")
    if parts is None:
        try:
            return derive_parts(msg.get("body"), msg.get("thinking_content"))
        except BadValue as error:
            raise InvalidMessage(f"{who}: field {error.field!r} {error.reason}") from error
    if isinstance(parts, MalformedJSON):
        raise InvalidMessage(f"{who}: field 'parts' holds malformed JSON ({parts.error})")
    if isinstance(parts, str | bytes):
        try:
            parts = json.loads(parts)
        except ValueError as error:
            raise InvalidMessage(f"{who}: field 'parts' holds malformed JSON ({error})") from None
    if not isinstance(parts, list):
        raise InvalidMessage(f"{who}: field 'parts' is of type {type(parts).__name__}, not a list")
    return parts

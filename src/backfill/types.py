"""The domain's small shared names: a row's key, how a key is stored and shown, a clock, and
who a runner is.

A key is a tuple of the key columns' values, in key order, even for a one-column key. It is
stored (the cursor, skipped rows) as a JSON list, and shown to people as `row_id`: the value
itself, or a list for a composite key. This module imports nothing of ours.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Key = tuple[Any, ...]
# Seconds since the epoch; injected where tests need to move time by hand.
Clock = Callable[[], float]


def encode_key(key: Key) -> str:
    """A key as stored in the cursor and error tables: a JSON list of its values."""
    return json.dumps(list(key), default=str)


def decode_key(stored: str | None) -> Key | None:
    """A stored key (or no cursor) back as a key, exactly as a resumed run reads it."""
    return None if stored is None else tuple(json.loads(stored))


def row_id(key: Key) -> Any:
    """A key as shown to people: the value itself, or a list for a composite key."""
    return key[0] if len(key) == 1 else list(key)


@dataclass(frozen=True)
class Identity:
    """A runner: the host and process that hold (or held) a migration's lease."""

    host: str
    pid: int

    @classmethod
    def current(cls) -> Identity:
        return cls(socket.gethostname(), os.getpid())

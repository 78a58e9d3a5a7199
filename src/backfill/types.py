"""The domain's small shared names: a row's key, how a key is stored and shown, a clock, and
who a runner is and whether it is still there.

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
from datetime import UTC, datetime
from pathlib import Path
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


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed process its parent has not reaped yet still answers kill(0): look at /proc.
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class Liveness:
    """Whether a lease holder (of a migration, or of a shard) is still there, as seen from
    `here` at `now`: its heartbeat is at most `lease` seconds old and, when it runs on this
    host, `alive(pid)` says its process exists (a process gone here is seen at once)."""

    now: float
    lease: float
    here: Identity
    alive: Callable[[int], bool] = process_alive

    def holds(self, heartbeat_at: float | None, host: str | None, pid: int | None) -> bool:
        if heartbeat_at is None or self.now - heartbeat_at > self.lease:
            return False
        return not self.gone(host, pid)

    def gone(self, host: str | None, pid: int | None) -> bool:
        """Known to be gone: it ran on this host and its process no longer exists."""
        return host == self.here.host and pid is not None and not self.alive(pid)

    def recent(self, moment: float | None) -> bool:
        """`moment` lies less than the lease time ago."""
        return moment is not None and self.now - moment <= self.lease


def iso(seconds: float | None) -> str | None:
    """UTC ISO-8601 with a trailing Z, or None."""
    if seconds is None:
        return None
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")

"""Helpers the tests share (imported as `support`; tests/ is on the path)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backfill.events import BatchCommitted, Event


def after_each_batch(callback: Callable[[BatchCommitted], Any]) -> Callable[[Event], None]:
    """A run listener calling `callback` with each committed batch's event (its `processed`:
    the migration's rows so far), after the commit and before the next batch begins."""

    def listener(event: Event) -> None:
        if isinstance(event, BatchCommitted):
            callback(event)

    return listener

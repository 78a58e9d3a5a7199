"""The public API is what __all__ says, and every name in it exists."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import backfill
import chat_migrations


def test_backfill_exports_exactly_its_all() -> None:
    public = {
        name
        for name in dir(backfill)
        if not name.startswith("_") and not isinstance(getattr(backfill, name), ModuleType)
    }
    assert public == set(backfill.__all__)
    assert backfill.__all__ == sorted(backfill.__all__)
    for name in ("Migrations", "DELETE", "Runner", "State", "BadValue", "Keep", "OnError"):
        assert name in backfill.__all__


def _classes_in(hint: Any) -> Iterator[type]:
    if isinstance(hint, type) and not typing.get_args(hint):
        yield hint
    for argument in typing.get_args(hint):
        yield from _classes_in(argument)
    origin = typing.get_origin(hint)
    if isinstance(origin, type):
        yield origin


def test_the_types_in_public_results_are_exported() -> None:
    """What the Runner's methods return, and every type those results hold, can be named from
    `backfill` (walking the dataclasses' fields)."""
    methods = [
        getattr(backfill.Runner, name) for name in dir(backfill.Runner) if not name.startswith("_")
    ]
    pending = [
        c
        for m in methods
        if callable(m)
        for c in _classes_in(typing.get_type_hints(m).get("return"))
    ]
    seen: set[type] = set()
    while pending:
        cls = pending.pop()
        if cls in seen or not cls.__module__.startswith("backfill"):
            continue
        seen.add(cls)
        if dataclasses.is_dataclass(cls):
            for hint in typing.get_type_hints(cls).values():
                pending.extend(_classes_in(hint))
    unexported = {c for c in seen if getattr(backfill, c.__name__, None) is not c}
    assert not unexported, unexported
    for expected in ("RunResult", "MigrationStatus", "RowError", "DryRun", "Sample", "Identity"):
        assert getattr(backfill, expected) in seen
    # An attribute of RetriesExhausted (RunResult.error), not a dataclass field.
    assert backfill.RetriesExhausted in seen and "Transient" in backfill.__all__


def test_chat_migrations_uses_only_backfills_public_api() -> None:
    from pathlib import Path

    for path in Path(chat_migrations.__file__).parent.glob("*.py"):
        for line in path.read_text().splitlines():
            if line.startswith(("from backfill", "import backfill")):
                assert line.startswith("from backfill import"), f"{path.name}: {line}"
    assert chat_migrations.migrations.names() == ["body_to_parts", "cleanup_legacy_fields"]

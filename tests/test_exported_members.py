"""The public API is what __all__ says, and every name in it exists."""

from __future__ import annotations

import backfill
import chat_migrations


def test_backfill_exports_exactly_its_all() -> None:
    public = {name for name in dir(backfill) if not name.startswith("_")}
    assert set(backfill.__all__) <= public
    for name in ("Migrations", "DELETE", "Runner", "State", "BadValue", "Keep", "OnError"):
        assert name in backfill.__all__


def test_chat_migrations_uses_only_backfills_public_api() -> None:
    from pathlib import Path

    for path in Path(chat_migrations.__file__).parent.glob("*.py"):
        for line in path.read_text().splitlines():
            if line.startswith(("from backfill", "import backfill")):
                assert line.startswith("from backfill import"), f"{path.name}: {line}"
    assert chat_migrations.migrations.names() == ["body_to_parts", "cleanup_legacy_fields"]

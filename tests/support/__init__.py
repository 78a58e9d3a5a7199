"""Helpers the tests share (imported as `support`; tests/ is on the path): the servers' URLs and
a fresh database on each, the CLI as a user runs it, the rows of a query, a batch listener.
Also support.retrying (the server retry tests) and support.layouts (earlier engine layouts).

(Not in conftest.py: a module the tests import by name is better not pytest's own plugin.)"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from backfill.events import BatchCommitted, Event

ROOT = Path(__file__).resolve().parent.parent.parent
# The PostgreSQL and MariaDB servers the tests use (CI starts them); each test gets a database
# of its own.
POSTGRES_ADMIN_URL = os.environ.get(
    "BACKFILL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
MARIADB_ADMIN_URL = os.environ.get(
    "BACKFILL_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/"
)


def fresh_database(admin_url: str, create: str, drop: str, **engine: object) -> Iterator[str]:
    """A new, empty database on the server at `admin_url` (`create` and `drop` with `{name}`),
    dropped afterwards. Fails, never skips, when the server is down: server tests run in CI."""
    admin = sa.create_engine(admin_url, **engine)  # type: ignore[arg-type]
    name = f"backfill_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(create.format(name=name))
    try:
        yield str(sa.make_url(admin_url).set(database=name).render_as_string(False))
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(drop.format(name=name))
        admin.dispose()


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: the flagship app (BACKFILL_APP; `extra` may override
    it), no database URL from the caller's environment, the test apps importable."""
    env = dict(os.environ)
    env.pop("BACKFILL_DATABASE_URL", None)
    env["BACKFILL_APP"] = "chat_migrations:migrations"
    # Test apps (tests/apps) are importable by the subprocess, as a user's own module would be.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def backfill_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "backfill", *args]


def rows(engine: sa.Engine, sql: str) -> list[tuple[object, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(sql)]


def after_each_batch(callback: Callable[[BatchCommitted], Any]) -> Callable[[Event], None]:
    """A run listener calling `callback` with each committed batch's event (its `processed`:
    the migration's rows so far), after the commit and before the next batch begins."""

    def listener(event: Event) -> None:
        if isinstance(event, BatchCommitted):
            callback(event)

    return listener


def counting_url(directory: Path, name: str, rows: int) -> str:
    """A SQLite database in `directory` holding the counting app's `items`, `rows` of them."""
    from apps import counting

    url = f"sqlite:///{directory / name}"
    engine = sa.create_engine(url)
    counting.create_items(engine, rows)
    engine.dispose()
    return url

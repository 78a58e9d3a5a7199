"""Shared fixtures: a fresh SQLite database file (or PostgreSQL or MariaDB database) per test,
seeded chat data, the CLI in a subprocess exactly as a user runs it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backfill import Runner
from backfill.store.database import Database
from chat_migrations import migrations
from chat_migrations.generator import seed_messages
from support import (
    MARIADB_ADMIN_URL,
    POSTGRES_ADMIN_URL,
    backfill_command,
    cli_env,
    fresh_database,
)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped after the test."""
    yield from fresh_database(
        POSTGRES_ADMIN_URL,
        'CREATE DATABASE "{name}"',
        'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
        isolation_level="AUTOCOMMIT",
    )


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """A fresh, empty MariaDB database, dropped after the test."""
    yield from fresh_database(
        MARIADB_ADMIN_URL,
        "CREATE DATABASE `{name}` CHARACTER SET utf8mb4",
        "DROP DATABASE IF EXISTS `{name}`",
    )


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on an embedded SQLite file, a real PostgreSQL server and a real MariaDB."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'chat.db'}"
    if request.param == "mariadb":
        return str(request.getfixturevalue("mariadb_url"))
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'chat.db'}"


@pytest.fixture
def db(sqlite_url: str) -> Database:
    database = Database(sqlite_url)
    yield database
    database.dispose()


@pytest.fixture
def seeded(db: Database) -> Callable[[int], Database]:
    def seed(count: int) -> Database:
        seed_messages(db.engine, count)
        return db

    return seed


@pytest.fixture
def runner(db: Database) -> Runner:
    return Runner(db, migrations)


@pytest.fixture
def cli(sqlite_url: str, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `backfill ARGS --database-url URL` in a subprocess; returns the completed process."""

    def run(
        *args: str, url: str | None = None, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            backfill_command(*args, "--database-url", url or sqlite_url),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp_path,
            env=env or cli_env(),
            stdin=subprocess.DEVNULL,
        )

    return run

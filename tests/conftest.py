"""Shared fixtures: a fresh SQLite database file (or PostgreSQL or MariaDB database) per test,
seeded chat data, the CLI in a subprocess exactly as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from backfill import Runner
from backfill.store.database import Database
from chat_migrations import migrations
from chat_migrations.generator import seed_messages

ROOT = Path(__file__).resolve().parent.parent
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


def rows(engine: sa.Engine, sql: str) -> list[tuple[object, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(sql)]

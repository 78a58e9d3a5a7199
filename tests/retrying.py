"""What the server retry tests share (tests/test_postgres_retries.py, test_mariadb_retries.py):
the counting app's rows checked migrated exactly once, a quick retry policy, the CLI."""

from __future__ import annotations

import subprocess

import pytest
import sqlalchemy as sa

from apps.counting import migrations
from backfill import MigrationStatus, Runner
from backfill.retry import RetryPolicy
from backfill.store.database import Database, Limits
from conftest import backfill_command, cli_env

ROWS = 500
BATCH = 100
QUICK = RetryPolicy(attempts=5, base_delay=0.01)


def expected(source: str) -> str:
    return source[::-1].upper() + "#" + str(len(source))


def make_runner(url: str, policy: RetryPolicy = QUICK, **limits: float) -> Runner:
    return Runner(Database(url, limits=Limits(**limits)), migrations, retry_policy=policy)


def stored(engine: sa.Engine) -> list[tuple[int, str, str | None, int]]:
    with engine.connect() as conn:
        found = conn.execute(sa.text("SELECT id, source, derived, counter FROM items ORDER BY id"))
        return [(r[0], r[1], r[2], r[3]) for r in found]


def assert_all_once(engine: sa.Engine, status: MigrationStatus) -> None:
    rows = stored(engine)
    assert len(rows) == ROWS
    assert all(r[2] == expected(r[1]) and r[3] == 1 for r in rows), [
        r for r in rows if r[2] != expected(r[1]) or r[3] != 1
    ][:5]
    assert (status.processed, status.total, status.changed) == (ROWS, ROWS, ROWS)


def retries_logged(caplog: pytest.LogCaptureFixture, what: str) -> int:
    return sum(what in r.getMessage() for r in caplog.records if r.name == "backfill")


def cli(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        backfill_command(*args, "--app", "apps.counting:migrations", "--database-url", url),
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(**env),
        stdin=subprocess.DEVNULL,
    )

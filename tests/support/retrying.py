"""What the server retry tests share (tests/test_postgres_retries.py, test_mariadb_retries.py):
the counting app's rows checked migrated exactly once, a quick retry policy, the CLI."""

from __future__ import annotations

import logging
import subprocess

import pytest
import sqlalchemy as sa

from apps.counting import NAME, create_items, migrations
from backfill import MigrationStatus, Runner, State
from backfill.retry import RetryPolicy
from backfill.store.database import Database, Limits
from support import backfill_command, cli_env

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


def rows_the_app_holds_are_waited_for(
    url: str, app: sa.Engine, caplog: pytest.LogCaptureFixture, lock_timeout: float, logged: str
) -> None:
    """A row the app holds across two of the runner's tries: the batch times out on its lock,
    backs off, is retried, and migrates what the app committed."""
    caplog.set_level(logging.WARNING, logger="backfill")
    runner = make_runner(url, lock_timeout=lock_timeout)
    create_items(runner.db.engine, ROWS)
    # The app edits row 250 and keeps its transaction open across two of the runner's tries.
    holder = app.connect()
    held = holder.begin()
    holder.execute(sa.text("UPDATE items SET source = 'edited by the app' WHERE id = 250"))
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            held.commit()

    runner.sleep = sleep
    try:
        [result] = runner.run([NAME], batch_size=BATCH)
    finally:
        holder.close()
    assert result.state is State.SUCCESS, result
    assert len(sleeps) == 2
    assert retries_logged(caplog, logged) == 2
    assert_all_once(runner.db.engine, result.status)
    # The batch waited for the app's edit and migrated what the app committed.
    assert stored(runner.db.engine)[249][1:3] == (
        "edited by the app",
        expected("edited by the app"),
    )
    runner.db.dispose()

"""A first use that finds another process creating or upgrading backfill's tables waits for it, at
most the lease time, then exits 4 with one sentence; on every dialect. (Processes racing through
first use: tests/e2e/test_claim_race.py.)"""

from __future__ import annotations

import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from apps import counting
from backfill.store import locks
from support import backfill_command, cli_env


@contextmanager
def tables_locked(url: str) -> Iterator[None]:
    """Hold the lock that serializes creating backfill's tables, as another process would."""
    dialect = sa.make_url(url).get_backend_name()
    if dialect == "sqlite":
        conn = sqlite3.connect(str(sa.make_url(url).database), isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    engine = sa.create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        if dialect == "postgresql":
            with conn.begin():
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": locks.POSTGRES_KEY})
                yield
        else:
            database = conn.execute(sa.text("SELECT DATABASE()")).scalar()
            name = locks.mysql_lock_name(str(database))
            assert conn.execute(sa.text("SELECT GET_LOCK(:n, 0)"), {"n": name}).scalar() == 1
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": name})
    engine.dispose()


def run(url: str, folder: Path) -> subprocess.CompletedProcess[str]:
    command = backfill_command(
        "run", counting.NAME, "--app", "apps.counting:migrations", "--database-url", url
    )
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=folder,
        env=cli_env(BACKFILL_LEASE_SECONDS="1"),
        stdin=subprocess.DEVNULL,
    )


def test_first_use_waits_for_the_tables_lock_at_most_the_lease_then_exits_4(
    database_url: str, tmp_path: Path
) -> None:
    engine = sa.create_engine(database_url, poolclass=NullPool)
    counting.create_items(engine, 50)
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:  # as the engine leaves it: readers go on during a write
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    engine.dispose()

    with tables_locked(database_url):
        started = time.monotonic()
        waited = run(database_url, tmp_path)
        took = time.monotonic() - started
    assert waited.returncode == 4, waited.stdout + waited.stderr
    assert waited.stderr.splitlines() == [
        "backfill: another process has been creating or upgrading backfill's tables for over 1 s "
        "(it holds their lock); try again once it is done"
    ]
    assert took < 15, took

    done = run(database_url, tmp_path)  # the lock is free: the normal path
    assert done.returncode == 0, done.stderr

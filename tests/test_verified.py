"""verify records what it found, and status shows it with its time (no scan at status time);
where the database is read-only for this user, verify works the same and records nothing.
A migration with a prerequisite shows when its gate opens (`allowed_at`)."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from apps import counting
from backfill import Runner, State
from chat_migrations import migrations as flagship

NAME = counting.NAME


def _clock(start: float = 1_800_000_000.0):
    now = [start]
    return now, lambda: now[0]


def test_verify_is_recorded_and_status_shows_it(database_url):
    engine = sa.create_engine(database_url, poolclass=NullPool)
    counting.create_items(engine, 120)
    now, clock = _clock()
    runner = Runner(database_url, counting.migrations, clock=clock)
    runner.run([NAME], batch_size=50)
    assert runner.status([NAME])[NAME].verified is None
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE items SET derived = NULL WHERE id IN (3, 4)"))
        conn.execute(sa.text("UPDATE items SET derived = NULL, source = 'bad:' WHERE id = 9"))

    found = runner.verify(NAME)
    shown = runner.status([NAME])[NAME].to_json()["verified"]
    assert (found.remaining, found.raising) == (2, 1)
    assert shown == {"at": "2027-01-15T08:00:00Z", "remaining": 2, "raising": 1}

    now[0] += 60
    runner.run([NAME], restart=True, batch_size=50, on_error="skip")
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE items SET source = 'fixed', derived = 'x' WHERE id = 9"))
    runner.verify(NAME)
    # A run in between keeps it: status says when it was found, and what.
    assert runner.status([NAME])[NAME].to_json()["verified"] == {
        "at": "2027-01-15T08:01:00Z",
        "remaining": 0,
        "raising": 0,
    }
    runner.db.dispose()
    engine.dispose()


@pytest.fixture
def read_only_url(database_url, tmp_path):
    """`database_url` as a user that may read and not write (SQLite: the file opened read-only)."""
    url = sa.make_url(database_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        yield f"sqlite:///file:{url.database}?mode=ro&uri=true"
        return
    admin = sa.create_engine(database_url, poolclass=NullPool)
    user = f"reader_{url.database[-8:]}"
    with admin.begin() as conn:
        if backend == "postgresql":
            conn.exec_driver_sql(f'CREATE ROLE "{user}" LOGIN')
            conn.exec_driver_sql(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{user}"')
        else:
            conn.execute(sa.text(f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'"))
            conn.execute(sa.text(f"GRANT SELECT ON `{url.database}`.* TO '{user}'@'%'"))
    yield url.set(username=user, password=None if backend == "postgresql" else "pw")
    with admin.begin() as conn:
        if backend == "postgresql":
            conn.exec_driver_sql(f'DROP OWNED BY "{user}"')
            conn.exec_driver_sql(f'DROP ROLE "{user}"')
        else:
            conn.execute(sa.text(f"DROP USER '{user}'@'%'"))
    admin.dispose()


@pytest.fixture
def migrated(database_url):
    engine = sa.create_engine(database_url, poolclass=NullPool)
    counting.create_items(engine, 80)
    runner = Runner(database_url, counting.migrations)
    runner.run([NAME])
    runner.db.dispose()
    yield engine
    engine.dispose()


def test_a_read_only_user_verifies_as_before_and_records_nothing(migrated, read_only_url, caplog):
    reader = Runner(read_only_url, counting.migrations)
    with caplog.at_level(logging.WARNING, logger="backfill"):
        found = reader.verify(NAME)
    assert (found.remaining, found.raising) == (0, 0)
    assert "its result was not recorded" in caplog.text
    status = reader.status([NAME])[NAME]
    assert status.state is State.SUCCESS and status.verified is None
    reader.db.dispose()


def test_allowed_at_is_when_the_prerequisites_wait_ends(seeded, db):
    seeded(30)
    now, clock = _clock()
    runner = Runner(db, flagship, clock=clock)
    assert runner.status()["cleanup_legacy_fields"].allowed_at is None
    runner.run(["body_to_parts"])
    finished = runner.status()["body_to_parts"].finished_at
    assert finished is not None
    opens = runner.status()["cleanup_legacy_fields"].to_json()["allowed_at"]
    assert opens == "2027-01-22T08:00:00Z"
    assert finished + timedelta(days=7).total_seconds() == now[0] + 7 * 86400
    assert runner.status()["body_to_parts"].to_json()["allowed_at"] is None

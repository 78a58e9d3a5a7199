"""backfill's own tables across versions: every earlier layout is upgraded in place keeping
progress, an upgrade waits until no run holds a lease, a newer layout is refused; on every
dialect. (Concurrent first use and upgrades: tests/e2e/test_claim_race.py.)"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from apps import counting
from backfill import Refused, Runner, SchemaMismatch
from backfill.store import tables
from support.layouts import LAYOUTS, create_layout

NAME = counting.NAME
ROWS = 300
DONE = 100


@pytest.fixture
def engine(database_url):
    engine = sa.create_engine(database_url, poolclass=NullPool)
    counting.create_items(engine, ROWS)
    yield engine
    engine.dispose()


def half_done(engine: sa.Engine, **values: object) -> None:
    """`derive` canceled after its first DONE rows, recorded in an older layout's tables, and
    one row it skipped."""
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE items SET derived = 'old', counter = 1 WHERE id <= :done"),
            {"done": DONE},
        )
        record = {
            "name": NAME,
            "state": "canceled",
            "cursor": json.dumps([DONE]),
            "processed": DONE,
            "changed": DONE,
            "skipped_errors": 1,
            "kept": 0,
            "total": ROWS,
            "total_is_estimate": False,
            "generation": 3,
            "cancel_requested": False,
            "started_at": time.time() - 60,
            **values,
        }
        # Only the columns every layout has (`cursor` is quoted where it is a keyword).
        table = sa.table("_migrations", *(sa.column(c) for c in record))
        conn.execute(sa.insert(table).values(record))
        conn.execute(
            sa.text(
                "INSERT INTO _migration_errors (migration, row_id, error_type, message, at) "
                "VALUES (:m, '[7]', 'BadValue', 'bad', 1.0)"
            ),
            {"m": NAME},
        )


def layout(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.text("SELECT version FROM _backfill_schema"))]


def counters(engine: sa.Engine) -> dict[int, int]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT id, counter FROM items")).all())


@pytest.mark.parametrize("version", sorted(LAYOUTS))
def test_every_earlier_layout_is_upgraded_in_place_and_the_run_resumes(
    engine, database_url, version
):
    create_layout(engine, version)
    half_done(engine)
    runner = Runner(database_url, counting.migrations)

    [result] = runner.run([NAME])

    assert layout(engine) == [tables.SCHEMA_VERSION]
    assert str(result.state) == "success"
    # Resumed at the cursor: the rows done before the upgrade were not migrated again.
    assert set(counters(engine).values()) == {1}
    status = result.status
    assert (status.processed, status.changed, status.skipped_errors) == (ROWS, ROWS, 1)
    assert [s["row_id"] for s in runner.skipped_rows(NAME)] == [7]
    with engine.connect() as conn:
        run_id, generation = conn.execute(
            sa.text("SELECT run_id, generation FROM _migrations WHERE name = :n"), {"n": NAME}
        ).one()
        runs = conn.execute(sa.text("SELECT id, migration FROM _migration_runs")).all()
    assert generation == 4 and [tuple(r) for r in runs] == [(run_id, NAME)]
    # The upgraded tables are those a first use creates, column for column.
    inspector = sa.inspect(engine)
    for table in tables.metadata.sorted_tables:
        found = {c["name"] for c in inspector.get_columns(table.name)}
        assert found == {c.name for c in table.columns}, table.name
    runner.db.dispose()


@pytest.mark.parametrize("version", sorted(LAYOUTS))
def test_an_upgrade_is_refused_while_a_live_run_holds_a_lease(engine, database_url, version):
    create_layout(engine, version)
    host = socket.gethostname()
    # An older backfill's run of `derive`, alive on this host (this very process) and beating.
    half_done(
        engine,
        state="inProgress",
        runner_host=host,
        runner_pid=os.getpid(),
        heartbeat_at=time.time(),
    )
    runner = Runner(database_url, counting.migrations)
    for attempt in (lambda: runner.run([NAME]), lambda: runner.reset(NAME)):
        with pytest.raises(Refused) as refused:
            attempt()
        message = str(refused.value)
        assert f"{NAME} (host {host}, pid {os.getpid()})" in message, message
        assert f"from layout {version} to {tables.SCHEMA_VERSION}" in message
        assert layout(engine) == [version]
    # The status is still read, from the older layout.
    assert str(runner.status([NAME])[NAME].state) == "inProgress"

    # Once its runner is gone (here: its heartbeat is older than the lease), the upgrade runs
    # and the new run takes the interrupted one over.
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE _migrations SET heartbeat_at = :t"), {"t": time.time() - 999})
    [result] = runner.run([NAME])
    assert layout(engine) == [tables.SCHEMA_VERSION]
    assert str(result.state) == "success" and result.status.processed == ROWS
    runner.db.dispose()


def test_a_newer_layout_is_refused_with_one_sentence(engine, database_url):
    runner = Runner(database_url, counting.migrations)
    runner.run([NAME])
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE _backfill_schema SET version = 99"))
    newer = Runner(database_url, counting.migrations)
    with pytest.raises(SchemaMismatch, match=r"at version 99, newer than this backfill") as error:
        newer.run([NAME], restart=True)
    assert "\n" not in str(error.value)
    assert layout(engine) == [99]
    runner.db.dispose()
    newer.db.dispose()


def test_an_upgrade_is_refused_while_a_worker_holds_a_shard(engine, database_url):
    # Layout 3's run with workers: the migration's own heartbeat is old (the runner that
    # claimed it went away), and a live worker, this very process, holds a shard.
    create_layout(engine, 3)
    host = socket.gethostname()
    half_done(engine, state="inProgress", runner_host=host, runner_pid=1, heartbeat_at=0.0)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO _migration_shards (migration, id, state, generation, runner_host, "
                "runner_pid, heartbeat_at, processed, changed, skipped_errors, kept) "
                "VALUES (:m, 0, 'inProgress', 1, :h, :p, :t, 0, 0, 0, 0)"
            ),
            {"m": NAME, "h": host, "p": os.getpid(), "t": time.time()},
        )
    runner = Runner(database_url, counting.migrations)
    with pytest.raises(Refused, match=rf"{NAME} \(host {host}, pid {os.getpid()}\)"):
        runner.reset(NAME)
    assert layout(engine) == [3]
    runner.db.dispose()

"""On SQLite a run checkpoints the WAL on a thread of its own (store.checkpoints): the WAL stays
near its bound during the run, every frame is checkpointed when the run ends, and the batch
connection goes back to the pool checkpointing as before."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from backfill import Runner, State
from backfill.store import checkpoints
from backfill.store.checkpoints import WalCheckpointer
from backfill.store.database import Database
from support import after_each_batch

BATCH = 100
MESSAGES = 4000
BOUND = 256 * 1024
BATCH_WAL = 200 * 1024  # the most a batch of BATCH generated messages writes (measured: 175 KB)


def wal_path(db: Database) -> Path:
    return Path(f"{db.engine.url.database}-wal")


def frames_in_wal_and_checkpointed(db: Database) -> tuple[int, int]:
    """mxFrame and nBackfill from the WAL index (the -shm file; sqlite.org/walformat.html):
    without checkpointing anything, how many frames the WAL holds and how many were copied."""
    shm = Path(f"{db.engine.url.database}-shm").read_bytes()
    (frames,) = struct.unpack_from("=I", shm, 16)
    (copied,) = struct.unpack_from("=I", shm, 96)
    return frames, copied


def run_flagship(db: Database, bound: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """Migrate the seeded messages in batches of BATCH; the largest the WAL file grew."""
    from chat_migrations import migrations

    monkeypatch.setattr(checkpoints, "WAL_BOUND_BYTES", bound)
    raw = db.engine.raw_connection()  # the WAL file as seeding left it would be larger
    try:
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        raw.close()
    assert os.path.getsize(wal_path(db)) == 0
    largest = 0

    def measure(_status: object) -> None:
        nonlocal largest
        largest = max(largest, os.path.getsize(wal_path(db)))

    [result] = Runner(db, migrations).run(
        ["body_to_parts"], batch_size=BATCH, listeners=[after_each_batch(measure)]
    )
    assert result.state is State.SUCCESS and result.status.changed == MESSAGES
    return largest


def test_the_wal_stays_near_its_bound_during_a_run(seeded, monkeypatch):
    db = seeded(MESSAGES)

    largest = run_flagship(db, BOUND, monkeypatch)

    assert largest < BOUND + 2 * BATCH_WAL, largest  # the bound and two batches at most


def test_without_a_bound_the_wal_would_grow_with_the_table(seeded, monkeypatch):
    # The counterpart of the test above: it is the bound that keeps the WAL small.
    db = seeded(MESSAGES)

    largest = run_flagship(db, 1 << 40, monkeypatch)

    assert largest > 4 * (BOUND + 2 * BATCH_WAL), largest


def test_every_frame_is_checkpointed_when_a_run_ends(seeded, monkeypatch):
    db = seeded(MESSAGES)

    run_flagship(db, BOUND, monkeypatch)

    frames, copied = frames_in_wal_and_checkpointed(db)
    assert frames > 0 and copied == frames


def test_the_batch_connection_checkpoints_again_after_the_run(db):
    with db.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        with WalCheckpointer(db.engine, conn):
            assert raw.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        assert raw.execute("PRAGMA wal_autocheckpoint").fetchone() == (1000,)

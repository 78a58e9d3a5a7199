"""Crash safety beyond the flagship's shape: a composite-key table and a cross-table copy.

A real `backfill run --app apps.shapes:migrations` is SIGKILLed at random moments after it
committed a batch, at least ten times, and resumed each time; on every dialect of the
`database_url` fixture.

- `derive_pairs` walks `pairs` in (chat_id, seq) order: after every kill the committed state is a
  clean prefix of that order (each row up to the cursor migrated exactly once, the rest
  untouched), and at the end every row is migrated exactly once (`counter` == 1).
- `copy_items` copies `notes` into `notes_copy` and logs each call in `copy_events` through the
  batch's connection: after every kill the target holds exactly the notes up to the cursor and
  `copy_events` exactly one event for each of them (the context's writes committed with their
  batch, or rolled back with it); at the end one target row and one event per note, and `notes`
  unchanged.

Expected values are computed here, independently of the app's functions.

The helpers for these tables (`ShapesHarness`, the expectations and the prefix checks) live here
and are imported by test_shapes_concurrency.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from harness import AppTraffic, Harness, committed_by, kill_moment, wait_for

from apps.shapes import (
    COPY,
    PAIRS,
    copy_events,
    create_notes,
    create_pairs,
    notes,
    notes_copy,
    pairs,
)
from support import backfill_command

SHAPES_APP = "apps.shapes:migrations"

PairKey = tuple[str, int]


# -- the test's own statement of what the migrations must write -----------------------------------


def expected_pair(chat_id: str, seq: int, source: str) -> str:
    return chat_id + "/" + str(seq) + ":" + "".join(reversed(source))


def expected_copy(note: dict[str, Any]) -> dict[str, Any]:
    words = note["body"].split(" ")
    return {
        "note_id": note["id"],
        "author": note["author"],
        "title": " ".join(w[:1].upper() + w[1:] for w in words),
        "words": {"count": len(words), "first": words[0]},
    }


# -- a harness over apps.shapes --------------------------------------------------------------------


@dataclass
class ShapesHarness(Harness):
    """Harness for apps.shapes: commands get `--app apps.shapes:migrations`, and `record`,
    `status` (hence harness.committed_by) look at the migration `name`."""

    name: str = PAIRS

    def _command(self, *args: str) -> list[str]:
        return backfill_command(*args, "--app", SHAPES_APP, "--database-url", self.url)

    def record(self) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("_migrations"):
                return None
            found = conn.execute(
                sa.text("SELECT * FROM _migrations WHERE name = :name"), {"name": self.name}
            )
            row = found.mappings().first()
        return None if row is None else dict(row)

    def status(self, env: dict[str, str] | None = None) -> dict[str, Any]:
        done = self.cli("status", self.name, "--json", env=env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)[self.name]

    def cursor(self) -> list[Any] | None:
        record = self.record()
        assert record is not None
        return None if record["cursor"] is None else json.loads(record["cursor"])

    def _engine_for_seed(self) -> sa.Engine:
        return sa.create_engine(self.url)

    # pairs

    def seed_pairs(self, count: int, seed: int = 0) -> dict[PairKey, str]:
        """`count` unmigrated pairs; returns {(chat_id, seq): source} as stored."""
        engine = self._engine_for_seed()
        try:
            create_pairs(engine, count, seed=seed)
        finally:
            engine.dispose()
        self.wal()
        rows = self.pairs()
        assert len(rows) == count and all(r[2] is None and r[3] == 0 for r in rows)
        return {(r[0], r[1]): r[4] for r in rows}

    def pairs(self) -> list[tuple[str, int, str | None, int, str]]:
        """(chat_id, seq, derived, counter, source), in key order as Python sorts it."""
        with self.engine.connect() as conn:
            c = pairs.c
            found = conn.execute(sa.select(c.chat_id, c.seq, c.derived, c.counter, c.source))
            rows = [(r[0], r[1], r[2], r[3], r[4]) for r in found]
        return sorted(rows)

    # the copy

    def seed_notes(self, count: int, seed: int = 0) -> dict[int, dict[str, Any]]:
        """`count` notes, an empty target and an empty event log; returns the notes by id."""
        engine = self._engine_for_seed()
        try:
            create_notes(engine, count, seed=seed)
        finally:
            engine.dispose()
        self.wal()
        source = self.notes()
        assert len(source) == count and not self.copies() and not self.events()
        return source

    def notes(self) -> dict[int, dict[str, Any]]:
        return {r["id"]: r for r in self._rows(notes)}

    def copies(self) -> dict[int, dict[str, Any]]:
        return {r["note_id"]: r for r in self._rows(notes_copy)}

    def events(self) -> list[tuple[int, int, int]]:
        """(id, note_id, pid) of every event, in insertion order."""
        return [
            (r["id"], r["note_id"], r["pid"]) for r in self._rows(copy_events, copy_events.c.id)
        ]

    def _rows(self, table: sa.Table, *order: Any) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.select(table).order_by(*order)).mappings()]


# -- checks ----------------------------------------------------------------------------------------


def assert_pairs_prefix(h: ShapesHarness, sources: dict[PairKey, str]) -> dict[str, Any]:
    """Rows up to the cursor (in (chat_id, seq) order) migrated exactly once, the rest untouched,
    `processed` counting exactly the rows up to the cursor."""
    record = h.record()
    assert record is not None
    cursor = h.cursor()
    upto: PairKey | None = None if cursor is None else (cursor[0], cursor[1])
    rows = h.pairs()
    assert {(r[0], r[1]): r[4] for r in rows} == sources, "pairs' keys or sources changed"
    done = [r for r in rows if upto is not None and (r[0], r[1]) <= upto]
    rest = rows[len(done) :]
    wrong = [r for r in done if r[2] != expected_pair(r[0], r[1], r[4]) or r[3] != 1]
    assert not wrong, f"{len(wrong)} rows behind cursor {upto} wrong, e.g. {wrong[:5]}"
    touched = [r for r in rest if r[2] is not None or r[3] != 0]
    assert not touched, f"{len(touched)} rows beyond cursor {upto} touched, e.g. {touched[:5]}"
    assert record["processed"] == len(done) == record["changed"], (record, len(done))
    return record


def assert_pairs_all_once(h: ShapesHarness, sources: dict[PairKey, str]) -> None:
    rows = h.pairs()
    assert {(r[0], r[1]): r[4] for r in rows} == sources
    wrong = [r for r in rows if r[2] != expected_pair(r[0], r[1], r[4]) or r[3] != 1]
    assert not wrong, f"{len(wrong)} rows wrong, e.g. {wrong[:5]}"
    record = h.record()
    assert record is not None and record["state"] == "success", record
    assert record["processed"] == record["total"] == record["changed"] == len(sources), record


def assert_copy_prefix(h: ShapesHarness, source: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The target holds exactly the notes up to the cursor, as expected; `copy_events` exactly
    one event for each of them and none beyond; `notes` unchanged."""
    record = h.record()
    assert record is not None
    cursor = h.cursor()
    upto = 0 if cursor is None else cursor[0]
    assert h.notes() == source, "the copy wrote its source"
    copies = h.copies()
    assert sorted(copies) == [i for i in sorted(source) if i <= upto], (
        f"target rows are not the notes up to the cursor {upto}: "
        f"{len(copies)} rows, {sorted(set(copies) ^ {i for i in source if i <= upto})[:10]}"
    )
    wrong = [
        (c, expected_copy(source[i])) for i, c in copies.items() if c != expected_copy(source[i])
    ]
    assert not wrong, f"{len(wrong)} target rows wrong, e.g. {wrong[:3]}"
    assert_events_once(h, [i for i in source if i <= upto])
    assert record["processed"] == len(copies) == record["changed"], (record, len(copies))
    return record


def assert_events_once(h: ShapesHarness, ids: list[int]) -> None:
    per_note: dict[int, int] = {}
    for _id, note_id, _pid in h.events():
        per_note[note_id] = per_note.get(note_id, 0) + 1
    wanted = dict.fromkeys(ids, 1)
    if per_note != wanted:
        extra = {k: v for k, v in per_note.items() if wanted.get(k) != v}
        missing = [k for k in wanted if k not in per_note]
        raise AssertionError(
            f"copy_events is not one event per copied note: {len(per_note)} notes logged, "
            f"{len(wanted)} expected; wrong counts {dict(list(extra.items())[:10])}, "
            f"missing {missing[:10]}"
        )


def assert_copy_all_once(h: ShapesHarness, source: dict[int, dict[str, Any]]) -> None:
    assert h.notes() == source, "the copy wrote its source"
    copies = h.copies()
    assert sorted(copies) == sorted(source)
    wrong = [i for i, c in copies.items() if c != expected_copy(source[i])]
    assert not wrong, f"{len(wrong)} target rows wrong, e.g. {[copies[i] for i in wrong[:3]]}"
    assert_events_once(h, list(source))
    record = h.record()
    assert record is not None and record["state"] == "success", record
    assert record["processed"] == record["total"] == record["changed"] == len(source), record


# -- the crash loop --------------------------------------------------------------------------------

ROWS = 5_000
KILLS = 10
BATCH = 100
# At most 1,000 rows/s while killing (1 ms a row, 0.1 s a batch): a run is killed at most
# ~0.15 s (plus a poll) after its first commit, so ten runs commit at most ~3,500 rows, short of
# the 5,000, and every kill lands mid-run; the final run, at full speed, does the rest.
SLOW = {"SHAPES_ROW_DELAY": "0.001"}
MAX_WAIT_AFTER_COMMIT = 0.15


@pytest.fixture
def h(tmp_path, database_url):
    harness = ShapesHarness(tmp_path, database_url)
    yield harness
    harness.cleanup()


@pytest.mark.parametrize("migration", [PAIRS, COPY])
def test_random_sigkills_lose_nothing_and_apply_nothing_twice(h, migration):
    h.name = migration
    seed = int(os.environ.get("CRASH_SEED") or time.time_ns() % 1_000_000)
    rng = random.Random(seed)
    context = f"({migration}, CRASH_SEED={seed})"
    if migration == PAIRS:
        pair_sources = h.seed_pairs(ROWS, seed=seed)

        def check_prefix() -> dict[str, Any]:
            return assert_pairs_prefix(h, pair_sources)
    else:
        note_sources = h.seed_notes(ROWS, seed=seed)

        def check_prefix() -> dict[str, Any]:
            return assert_copy_prefix(h, note_sources)

    mid_transaction = 0
    processed_before = 0
    for kill in range(KILLS):
        # Every other run meets the application writing meanwhile, so that even the function
        # without a context runs inside its batch transaction (see harness.AppTraffic).
        with AppTraffic(h) if kill % 2 == 0 else nullcontext():
            proc = h.start("run", migration, "--batch-size", str(BATCH), env=SLOW)
            wait_for(
                committed_by(h, proc, processed_before),
                f"run #{kill} to commit a batch {context}",
                procs=(proc,),
            )
            # Under the app's traffic the kill waits to land inside a transaction; else at random.
            inside = kill_moment(h, proc, rng, kill % 2 == 0, MAX_WAIT_AFTER_COMMIT)
            assert proc.running(), f"run #{kill} ended before the kill {context}\n{proc.output()}"
            mid_transaction += inside
            proc.send(signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL

        record = check_prefix()
        assert record["state"] == "inProgress", f"{record} {context}"
        assert 0 < record["processed"] < ROWS, f"kill #{kill} not mid-run: {record} {context}"
        assert record["processed"] > processed_before, context
        assert record["processed"] % BATCH == 0, f"a partial batch was committed {context}"
        processed_before = record["processed"]

    # Every kill under the traffic waited for a transaction, and was seen to land in one.
    assert mid_transaction >= KILLS // 2, f"{mid_transaction} kills inside a transaction {context}"

    final = h.cli("run", migration, "--batch-size", str(BATCH), timeout=120)
    assert final.returncode == 0, final.stderr
    assert "success" in final.stdout

    if migration == PAIRS:
        assert_pairs_all_once(h, pair_sources)
    else:
        assert_copy_all_once(h, note_sources)
    status = h.status()
    assert status["state"] == "success", status
    assert status["progress"] == {"processed": ROWS, "total": ROWS, "completed": True}
    assert status["changed"] == ROWS and status["skipped_errors"] == 0, status

    verify = h.cli("verify", migration, "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout)[migration]["remaining"] == 0, verify.stdout
    if migration == COPY:
        # verify ran the function (and its context write) in a transaction it rolled back.
        assert_events_once(h, list(note_sources))

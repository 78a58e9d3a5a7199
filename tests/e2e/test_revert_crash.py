"""Crash safety of the safety net: the flagship migrated with `--undo`, then cleaned up with
`--undo`, then both reverted through the real CLI, each revert SIGKILLed in the middle and
resumed, gives back every row of `messages` exactly as it was before (every column, SQL NULL
and JSON included), on SQLite, PostgreSQL and MariaDB.

A revert batch restores values and deletes the log entries it restored in one transaction, so
at any kill the log still holds exactly the oldest entries and every value is either the one
the migration wrote (its entry is still there) or the one from before (its entry is gone).
"""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest
import sqlalchemy as sa

from chat_migrations import derive_parts
from chat_migrations.generator import seed_messages
from e2e.harness import Harness, Proc, wait_for

APP = "chat_migrations:migrations"
MIGRATE, CLEANUP = "body_to_parts", "cleanup_legacy_fields"
ROWS = 6_000
BATCH = 20
# Log entries a revert has put back when it is killed: 50 batches, about a sixth of its log
# (6,000 rows log about 5,900 `parts` entries and 6,900 legacy-field entries), far short of its
# last batch however long the kill takes to follow.
KILL_AFTER = 50 * BATCH
# Rows whose parts the new code wrote (body_to_parts leaves them; the cleanup clears them), and
# rows an old client edited after that (stale parts: the cleanup keeps their legacy fields).
NEW_CODE, STALE = 97, 89
LEGACY = ("body", "thinking_content")
# A column as compared: its value as the driver reads it, and (for JSON) whether it is SQL NULL.
COLUMNS = {"body": ("body",), "thinking_content": ("thinking_content",)}
COLUMNS["parts"] = ("parts", "parts_is_sql_null")

Rows = dict[int, dict[str, Any]]


@pytest.fixture
def h(tmp_path, database_url):
    harness = Harness(tmp_path, database_url, app=APP)
    yield harness
    harness.cleanup()


@pytest.fixture
def sqlite_h(tmp_path):
    harness = Harness(tmp_path, f"sqlite:///{tmp_path / 'chat.db'}", app=APP)
    yield harness
    harness.cleanup()


# -- the database ------------------------------------------------------------------------------


def seed(h: Harness, count: int) -> None:
    """Legacy messages, a few of them with parts already written by the new code (equal to
    what the legacy fields give) and a few whose parts an old client made stale."""
    engine = sa.create_engine(h.url)
    try:
        seed_messages(engine, count)
    finally:
        engine.dispose()
    h.wal()
    messages = sa.table(
        "messages", sa.column("id"), *(sa.column(c) for c in LEGACY), sa.column("parts", sa.JSON)
    )
    with h.engine.begin() as conn:
        rows = conn.execute(sa.select(messages.c.id, *(messages.c[c] for c in LEGACY))).all()
        for id_, body, thinking in rows:
            if id_ % NEW_CODE == 0:
                parts = derive_parts(body, thinking)
            elif id_ % STALE == 0:
                parts = [{"type": "text", "text": f"edited by an old client ({id_})"}]
            else:
                continue
            conn.execute(sa.update(messages).where(messages.c.id == id_).values(parts=parts))


def snapshot(h: Harness) -> Rows:
    """Every row of `messages`, every column exactly as the driver reads it (JSON as stored
    text on SQLite and MariaDB), and whether `parts` is SQL NULL (not the JSON `null`)."""
    found = h.query(
        "SELECT m.*, CASE WHEN m.parts IS NULL THEN 1 ELSE 0 END AS parts_is_sql_null "
        "FROM messages m ORDER BY m.id"
    )
    return {row.id: dict(row._mapping) for row in found}


def record(h: Harness, name: str) -> dict[str, Any] | None:
    found = h.query("SELECT * FROM _migrations WHERE name = :name", {"name": name})
    return dict(found[0]._mapping) if found else None


def log_entries(h: Harness, name: str) -> list[tuple[int, int, str]]:
    """(entry id, row id, column) of the entries of `name`'s undo log, oldest first."""
    found = h.query(
        "SELECT id, row_key, column_name FROM _migration_undo WHERE migration = :name ORDER BY id",
        {"name": name},
    )
    return [(r[0], json.loads(r[1])[0], r[2]) for r in found]


def status(h: Harness, name: str) -> dict[str, Any]:
    done = h.cli("status", name, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)[name]


def history_rows(h: Harness, name: str) -> list[dict[str, Any]]:
    done = h.cli("history", name, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["runs"]


def history(h: Harness, name: str) -> list[tuple[str, str | None, int | None]]:
    return [(r["kind"], r["outcome"], r["exit_code"]) for r in history_rows(h, name)]


def ok(h: Harness, *args: str) -> str:
    done = h.cli(*args, timeout=120)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}{done.stderr}"
    return done.stdout


# -- the checks --------------------------------------------------------------------------------


def differences(current: Rows, expected: Rows) -> list[tuple[int, str, Any, Any]]:
    assert current.keys() == expected.keys()
    return [
        (id_, column, current[id_][column], expected[id_][column])
        for id_ in expected
        for column in expected[id_]
        if current[id_][column] != expected[id_][column]
    ]


def assert_half_reverted(current: Rows, before: Rows, after: Rows, left: set[tuple[int, str]]):
    """Every value is the one from before the migration, or (its entry still in the log) the
    one the migration wrote; no value is anything else."""
    wrong = []
    for id_, row in current.items():
        for column, fields in COLUMNS.items():
            expected = after if (id_, column) in left else before
            if any(row[f] != expected[id_][f] for f in fields):
                wrong.append((id_, column, [row[f] for f in fields], (id_, column) in left))
    assert not wrong, f"{len(wrong)} values neither restored nor logged, e.g. {wrong[:5]}"


def kill_mid_revert(h: Harness, name: str) -> tuple[dict[str, Any], list[tuple[int, int, str]]]:
    """Start `revert NAME --batch-size 20`, SIGKILL it once it has put back KILL_AFTER entries, and
    check the kill landed mid-way: the log lost exactly its newest entries, batch by batch, and
    the revert's counter says so. Returns the record after the kill and the entries left."""
    logged = log_entries(h, name)
    assert len(logged) > 5 * KILL_AFTER, f"{name}: {len(logged)} entries: too few to kill"
    proc: Proc = h.start("revert", name, "--yes", "--batch-size", str(BATCH))

    def going() -> bool:
        found = record(h, name)
        return (
            found is not None
            and found["runner_pid"] == proc.pid
            and found["revert_state"] == "inProgress"
            and (found["revert_processed"] or 0) >= KILL_AFTER
        )

    wait_for(going, f"the revert of {name} to commit batches", procs=(proc,), interval=0.005)
    proc.send(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.output()

    after_kill = record(h, name)
    assert after_kill is not None
    assert after_kill["state"] == "reverting", after_kill
    assert after_kill["revert_state"] == "inProgress", after_kill  # as the dead process left it
    processed, total = after_kill["revert_processed"], after_kill["revert_total"]
    assert total == len(logged), after_kill
    assert KILL_AFTER <= processed < total, f"the kill did not land mid-revert: {after_kill}"
    assert processed % BATCH == 0, f"a partial batch was committed: {after_kill}"
    left = log_entries(h, name)
    # The log is its own cursor: exactly the newest `processed` entries are gone.
    assert left == logged[: len(logged) - processed]
    return after_kill, left


def assert_seen_interrupted(h: Harness, name: str, after_kill: dict[str, Any], left: list[Any]):
    """The killed revert, as status and history show it at once (its process is gone)."""
    seen = status(h, name)
    assert seen["state"] == "reverting", seen
    assert seen["runner"] is None or seen["runner"]["pid"] == after_kill["runner_pid"], seen
    revert = seen["revert"]
    assert revert is not None, seen
    assert revert["state"] == "interrupted", seen
    assert revert["progress"]["processed"] == after_kill["revert_processed"], seen
    assert revert["progress"]["total"] == after_kill["revert_total"], seen
    assert revert["reverted"] == after_kill["revert_processed"], seen
    assert revert["kept_changed_by_app"] == 0, seen
    assert seen["undo_rows"] == len(left), seen
    killed = history_rows(h, name)[0]
    assert (killed["kind"], killed["outcome"], killed["exit_code"]) == (
        "revert",
        "interrupted",
        None,
    )
    # Its own counters so far, before any other revert closed it.
    assert killed["processed"] == killed["changed"] == after_kill["revert_processed"], killed


def assert_reverted(h: Harness, name: str, after_kill: dict[str, Any]) -> None:
    """The resumed revert finished: nothing left in the log, the migration `pending`, and the
    history has both reverts with their own counters (together: every entry, each once)."""
    seen = status(h, name)
    assert seen["state"] == "pending", seen
    assert seen["revert"] is None and seen["undo_rows"] == 0, seen
    assert log_entries(h, name) == []
    rows = history_rows(h, name)
    assert [(r["kind"], r["outcome"], r["exit_code"]) for r in rows] == [
        ("revert", "success", 0),
        ("revert", "interrupted", None),  # closed by the revert that resumed it
        ("run", "success", 0),
    ]
    resumed, killed, _run = rows
    total, before_kill = after_kill["revert_total"], after_kill["revert_processed"]
    assert killed["finished_at"] is not None, killed
    assert killed["processed"] == killed["changed"] == before_kill, killed
    assert resumed["processed"] == resumed["changed"] == total - before_kill, resumed


# -- the tests ---------------------------------------------------------------------------------


def test_killed_reverts_resume_and_give_back_every_row_exactly(h):
    seed(h, ROWS)
    original = snapshot(h)
    assert len(original) == ROWS
    assert all(r["parts_is_sql_null"] for i, r in original.items() if i % NEW_CODE and i % STALE)

    ok(h, "run", MIGRATE, "--undo", "--yes")
    migrated = snapshot(h)
    assert not any(r["parts_is_sql_null"] for r in migrated.values())
    ok(h, "run", CLEANUP, "--undo", "--min-age", "0", "--yes")
    cleaned = snapshot(h)
    for id_, row in cleaned.items():
        if id_ % STALE == 0 and id_ % NEW_CODE:
            assert row == migrated[id_], f"a stale row lost its legacy fields: {row}"
        else:
            assert row["body"] is None and row["thinking_content"] is None, row
            assert row["parts"] == migrated[id_]["parts"], row
    assert status(h, CLEANUP)["undo_rows"] > ROWS

    # The cleanup's revert, killed mid-way: each legacy value is back or still logged.
    after_kill, left = kill_mid_revert(h, CLEANUP)
    assert_half_reverted(snapshot(h), migrated, cleaned, {(i, c) for _, i, c in left})
    assert_seen_interrupted(h, CLEANUP, after_kill, left)
    # body_to_parts cannot be reverted under what the cleanup wrote on top of it.
    refused = h.cli("revert", MIGRATE, "--yes")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert CLEANUP in refused.stderr and "first" in refused.stderr, refused.stderr
    assert log_entries(h, CLEANUP) == left

    ok(h, "revert", CLEANUP, "--yes")
    assert_reverted(h, CLEANUP, after_kill)
    assert not differences(snapshot(h), migrated)

    # The backfill's revert, killed mid-way: each row has its parts or SQL NULL as before.
    after_kill, left = kill_mid_revert(h, MIGRATE)
    assert_half_reverted(snapshot(h), original, migrated, {(i, c) for _, i, c in left})
    assert_seen_interrupted(h, MIGRATE, after_kill, left)

    ok(h, "revert", MIGRATE, "--yes")
    assert_reverted(h, MIGRATE, after_kill)

    # Every row exactly as before, every column, SQL NULL and JSON included.
    wrong = differences(snapshot(h), original)
    assert not wrong, f"{len(wrong)} values differ from the copy, e.g. {wrong[:5]}"


def test_a_revert_left_unfinished_blocks_runs_until_forgotten_and_unlogged_runs_are_refused(
    sqlite_h,
):
    h = sqlite_h
    seed(h, 1_000)
    ok(h, "run", MIGRATE, "--undo", "--yes")
    total = status(h, MIGRATE)["undo_rows"]
    assert total == 1_000 - 1_000 // NEW_CODE - (1_000 // STALE)

    # A revert stopped by SIGTERM after its current batch: canceled, still `reverting`.
    proc = h.start("revert", MIGRATE, "--yes", "--batch-size", "1")
    wait_for(
        lambda: ((record(h, MIGRATE) or {}).get("revert_processed") or 0) >= 5,
        "the revert to commit batches",
        procs=(proc,),
        interval=0.005,
    )
    proc.send(signal.SIGTERM)
    assert proc.wait() == 3, proc.output()
    seen = status(h, MIGRATE)
    assert seen["state"] == "reverting" and seen["revert"]["state"] == "canceled", seen
    assert 5 <= seen["revert"]["progress"]["processed"] < total, seen
    assert history(h, MIGRATE)[0] == ("revert", "canceled", 3)

    refused = h.cli("run", MIGRATE, "--yes")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "is being reverted" in refused.stderr, refused.stderr
    assert f"backfill forget-undo {MIGRATE}" in refused.stderr, refused.stderr
    assert record(h, MIGRATE)["state"] == "reverting"

    assert f"{MIGRATE}: undo log dropped" in ok(h, "forget-undo", MIGRATE, "--yes")
    seen = status(h, MIGRATE)
    assert (seen["state"], seen["revert"], seen["undo_rows"]) == ("pending", None, 0), seen
    assert log_entries(h, MIGRATE) == []

    # Run again without the log: it cannot be reverted, and refusing changes nothing.
    ok(h, "run", MIGRATE, "--no-undo", "--yes")
    before = snapshot(h)
    refused = h.cli("revert", MIGRATE, "--yes")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "were not logged" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert status(h, MIGRATE)["state"] == "success"
    assert snapshot(h) == before

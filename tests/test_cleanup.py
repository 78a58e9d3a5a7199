"""cleanup_legacy_fields: its gate, and that it clears legacy text only where parts say the same.

The gate: body_to_parts must have succeeded (its latest success) at least 7 days before, and
`verify body_to_parts` must find nothing left; `min_age` changes the wait, `force` skips the gate,
and in prod `--force` must be confirmed at a terminal.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from backfill import GateClosed, Runner, State
from backfill.store.database import Database
from chat_migrations import derive_parts, message_parts, migrations
from chat_migrations.schema import messages
from support import rows

DAY = 86_400.0
ROWS = 300


class Clock:
    """The wall clock, moved forward (or back) by `offset` seconds: days pass in a test."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def timed(db: Database, clock: Clock) -> Runner:
    return Runner(db, migrations, clock=clock)


def execute(db: Database, sql: str, *params: Any) -> None:
    with db.engine.begin() as conn:
        conn.exec_driver_sql(sql, params)


def read_messages(db: Database) -> dict[int, dict[str, Any]]:
    with db.engine.connect() as conn:
        found = conn.execute(sa.select(messages).order_by(messages.c.id)).mappings()
        return {r["id"]: dict(r) for r in found}


def raw_messages(db: Database) -> list[tuple[object, ...]]:
    return rows(db.engine, "SELECT * FROM messages ORDER BY id")


def migrate(runner: Runner) -> None:
    [result] = runner.run(["body_to_parts"], batch_size=100)
    assert result.state is State.SUCCESS


# -- the gate -------------------------------------------------------------------------------------


def test_refused_while_body_to_parts_has_not_succeeded(seeded, timed, clock):
    db = seeded(ROWS)
    before = raw_messages(db)
    clock.advance(30 * DAY)
    with pytest.raises(GateClosed, match=r"'body_to_parts'.*success.*pending"):
        timed.run(["cleanup_legacy_fields"])

    execute(db, "UPDATE messages SET body = ? WHERE id = 150", b"\x00blob")
    [failed] = timed.run(["body_to_parts"], batch_size=100)
    assert failed.state is State.FAILED
    clock.advance(30 * DAY)
    with pytest.raises(GateClosed, match=r"'body_to_parts'.*failed"):
        timed.run(["cleanup_legacy_fields"], min_age=timedelta(0))

    assert timed.status(["cleanup_legacy_fields"])["cleanup_legacy_fields"].state is State.PENDING
    after = raw_messages(db)
    assert [r for r in after if r[0] != 150 and r[0] > 100] == [
        r for r in before if r[0] != 150 and r[0] > 100
    ]
    assert all(r[3] is not None or r[4] is not None for r in after)  # no legacy text cleared


def test_refused_less_than_7_days_after_success_then_allowed(seeded, timed, clock):
    db = seeded(ROWS)
    migrate(timed)
    before = raw_messages(db)

    for days in (0, 1, 6, 6.99):
        clock.offset = days * DAY
        with pytest.raises(GateClosed, match=r"--min-age"):
            timed.run(["cleanup_legacy_fields"])
    assert raw_messages(db) == before

    clock.offset = 7 * DAY + 60
    [result] = timed.run(["cleanup_legacy_fields"])
    assert result.state is State.SUCCESS and result.status.changed == ROWS


def test_the_latest_success_of_body_to_parts_counts(seeded, timed, clock):
    seeded(ROWS)
    migrate(timed)
    clock.advance(8 * DAY)
    [again] = timed.run(["body_to_parts"], restart=True)
    assert again.state is State.SUCCESS
    with pytest.raises(GateClosed, match=r"--min-age"):
        timed.run(["cleanup_legacy_fields"])
    clock.advance(7 * DAY + 1)
    assert timed.run(["cleanup_legacy_fields"])[0].state is State.SUCCESS


def test_refused_when_verify_finds_rows_left_or_rows_that_raise(seeded, timed, clock):
    db = seeded(ROWS)
    migrate(timed)
    clock.advance(8 * DAY)
    # Old code still running wrote one more legacy message after the migration finished.
    execute(
        db,
        "INSERT INTO messages (id, conversation_id, role, body, created_at) "
        "VALUES (1000, 1, 'user', 'late legacy write', '2024-06-01 00:00:00')",
    )
    with pytest.raises(GateClosed, match=r"verify body_to_parts.* 1 rows? left and 0 that raise"):
        timed.run(["cleanup_legacy_fields"])
    with pytest.raises(GateClosed, match=r"verify body_to_parts"):
        timed.run(["cleanup_legacy_fields"], min_age=timedelta(0))

    # A second run picks it up, but one row it cannot migrate still closes the gate.
    execute(db, "UPDATE messages SET parts = NULL, thinking_content = ? WHERE id = 7", b"\xff")
    [skipping] = timed.run(["body_to_parts"], restart=True, on_error="skip")
    assert skipping.state is State.SUCCESS and skipping.status.skipped_errors == 1
    clock.advance(8 * DAY)
    with pytest.raises(GateClosed, match=r" 0 rows? left and 1 that raise"):
        timed.run(["cleanup_legacy_fields"])
    assert read_messages(db)[1000]["body"] == "late legacy write"


def test_min_age_changes_the_wait(seeded, timed, clock):
    seeded(ROWS)
    migrate(timed)
    clock.advance(2 * DAY)
    with pytest.raises(GateClosed):
        timed.run(["cleanup_legacy_fields"], min_age=timedelta(days=30))
    with pytest.raises(GateClosed):
        timed.run(["cleanup_legacy_fields"], min_age=timedelta(days=3))
    [result] = timed.run(["cleanup_legacy_fields"], min_age=timedelta(hours=36))
    assert result.state is State.SUCCESS


def test_min_age_zero_right_after_success(seeded, runner):
    seeded(ROWS)
    migrate(runner)
    [result] = runner.run(["cleanup_legacy_fields"], min_age=timedelta(0))
    assert result.state is State.SUCCESS and result.status.changed == ROWS


def test_force_skips_the_gate_but_still_loses_no_text(seeded, runner):
    db = seeded(ROWS)
    before = raw_messages(db)
    # body_to_parts never ran: no row has parts, so no row's parts match its legacy fields.
    [result] = runner.run(["cleanup_legacy_fields"], force=True, batch_size=64)
    assert result.state is State.SUCCESS
    assert (result.status.changed, result.status.kept) == (0, ROWS)
    assert raw_messages(db) == before


# -- the gate through the CLI -------------------------------------------------------------------


def _one_sentence(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_cli_refuses_with_exit_2_until_the_wait_or_min_age(seeded, runner, cli):
    db = seeded(ROWS)
    migrate(runner)

    refused = cli("run", "cleanup_legacy_fields")
    assert refused.returncode == 2
    sentence = _one_sentence(refused.stderr)
    assert "cleanup_legacy_fields" in sentence and "body_to_parts" in sentence
    refused_7d = cli("run", "cleanup_legacy_fields", "--min-age", "7d")
    assert refused_7d.returncode == 2

    allowed = cli("run", "cleanup_legacy_fields", "--min-age", "0", "--json")
    assert allowed.returncode == 0, allowed.stderr
    document = json.loads(allowed.stdout)["cleanup_legacy_fields"]
    assert document["state"] == "success" and document["changed"] == ROWS
    assert rows(db.engine, "SELECT count(*) FROM messages WHERE body IS NOT NULL") == [(0,)]


def test_cli_allows_cleanup_once_body_to_parts_succeeded_7_days_ago(seeded, runner, cli):
    db = seeded(ROWS)
    migrate(runner)
    execute(
        db,
        "UPDATE _migrations SET finished_at = finished_at - ? WHERE name = 'body_to_parts'",
        2 * DAY,
    )
    assert cli("run", "cleanup_legacy_fields").returncode == 2
    assert cli("run", "cleanup_legacy_fields", "--min-age", "3d").returncode == 2
    assert cli("run", "cleanup_legacy_fields", "--min-age", "36h", "--dry-run").returncode == 0

    execute(
        db,
        "UPDATE _migrations SET finished_at = finished_at - ? WHERE name = 'body_to_parts'",
        5 * DAY + 60,
    )
    done = cli("run", "cleanup_legacy_fields")
    assert done.returncode == 0, done.stderr
    assert runner.status()["cleanup_legacy_fields"].state is State.SUCCESS


def test_cli_force_skips_the_gate_outside_prod(seeded, cli):
    db = seeded(50)
    before = raw_messages(db)
    forced = cli("run", "cleanup_legacy_fields", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["cleanup_legacy_fields"]["kept"] == 50
    assert raw_messages(db) == before


def test_cli_force_in_prod_without_a_terminal_is_refused(seeded, runner, cli):
    db = seeded(50)
    before = raw_messages(db)
    for extra in ((), ("--yes",)):
        refused = cli(
            "run", "cleanup_legacy_fields", "--force", "--prod", "--no-backup-check", *extra
        )
        assert refused.returncode == 2, refused.stderr
        _one_sentence(refused.stderr)
    # With --yes the run itself is confirmed, but --force still wants the environment typed.
    assert "environment name" in refused.stderr
    assert raw_messages(db) == before
    assert runner.status()["cleanup_legacy_fields"].state is State.PENDING


# -- what cleanup does to rows -------------------------------------------------------------------


def test_cleanup_clears_matching_rows_keeps_stale_ones_and_loses_no_text(seeded, timed, clock, cli):
    db = seeded(ROWS)
    migrate(timed)
    # After the migration, old code still running edits legacy fields only (stale parts) ...
    execute(db, "UPDATE messages SET body = body || ' (edited)' WHERE id IN (10, 20, 30)")
    execute(db, "UPDATE messages SET thinking_content = 'second thoughts' WHERE id = 40")
    execute(db, "UPDATE messages SET body = '' WHERE id = 60")
    # ... while new code writes body and parts together.
    execute(
        db,
        "UPDATE messages SET body = 'rewritten', thinking_content = NULL, parts = ? WHERE id = 50",
        json.dumps(derive_parts("rewritten", None)),
    )
    execute(
        db,
        "INSERT INTO messages (id, conversation_id, role, body, parts, created_at) "
        "VALUES (?, 1, 'user', 'dual write', ?, '2024-06-01 00:00:00')",
        ROWS + 1,
        json.dumps(derive_parts("dual write", None)),
    )
    stale = [10, 20, 30, 40, 60]
    before = read_messages(db)
    raw_before = {r[0]: r for r in raw_messages(db)}
    shown_before = {i: message_parts(m) for i, m in before.items()}
    assert timed.verify("body_to_parts").clean  # verify cannot see stale rows: they have parts

    check = timed.verify("cleanup_legacy_fields")
    assert check.kept_ids == stale and check.remaining == ROWS + 1 - len(stale)
    clock.advance(7 * DAY + 1)
    [result] = timed.run(["cleanup_legacy_fields"], batch_size=32)

    assert result.state is State.SUCCESS
    assert (result.status.processed, result.status.changed) == (ROWS + 1, ROWS + 1 - len(stale))
    assert result.status.kept == len(stale)
    after = read_messages(db)
    raw_after = {r[0]: r for r in raw_messages(db)}
    for message_id, old in before.items():
        new = after[message_id]
        if message_id in stale:
            assert raw_after[message_id] == raw_before[message_id]
            continue
        assert new["body"] is None and new["thinking_content"] is None
        assert new["parts"] == old["parts"] == derive_parts(old["body"], old["thinking_content"])
        # No text lost: whatever the legacy fields said is now said by parts.
        said = [p["text"] for p in new["parts"]]
        assert said == [t for t in (old["thinking_content"], old["body"]) if t]
    assert {i: message_parts(m) for i, m in after.items()} == shown_before
    assert after[10]["body"].endswith(" (edited)")

    found = timed.verify("cleanup_legacy_fields")
    assert (found.remaining, found.raising, found.kept) == (0, 0, len(stale))
    assert found.kept_ids == stale
    listed = json.loads(cli("verify", "cleanup_legacy_fields", "--json").stdout)
    assert listed["cleanup_legacy_fields"]["kept_ids"] == stale
    [again] = timed.run(["cleanup_legacy_fields"], restart=True)
    assert (again.status.changed, again.status.kept) == (0, len(stale))
    assert {r[0]: r for r in raw_messages(db)} == raw_after

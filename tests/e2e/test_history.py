"""`backfill history`: a row for every run, with its own counters and stored exit code, for runs
that succeeded, failed, were canceled and were killed (SIGKILL: `interrupted`, closed by the run
that takes it over); a row for a reset and a cancel by hand; the workers and steps of one run
share its row; a password never reaches a row. On SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import json
import signal
import time

import pytest
import sqlalchemy as sa

from apps import counting
from backfill import Runner
from e2e.harness import Harness

NAME = counting.NAME
ROWS = 600


@pytest.fixture
def h(tmp_path, database_url):
    harness = Harness(tmp_path, database_url)
    yield harness
    harness.cleanup()


def history(h: Harness, *args: str) -> list[dict]:
    done = h.cli("history", *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["runs"]


def test_rows_for_success_failure_cancel_and_a_killed_run(h):
    h.seed(ROWS)
    h.execute("UPDATE items SET source = 'bad:x' WHERE id = 250")
    failed = h.cli("run", NAME, "--batch-size", "100")
    assert failed.returncode == 1, failed.stderr
    h.execute("UPDATE items SET source = 'fixed' WHERE id = 250")

    # Killed mid-run, then seen interrupted: its runner is gone.
    slow = h.start("run", NAME, "--batch-size", "10", env={counting.ROW_DELAY_ENV: "0.01"})
    deadline = time.monotonic() + 60
    while (h.record() or {}).get("processed", 0) <= 260 and time.monotonic() < deadline:
        time.sleep(0.05)
    slow.send(signal.SIGKILL)
    slow.wait()
    [killed, first] = history(h, NAME)
    assert (killed["outcome"], killed["exit_code"], killed["finished_at"]) == (
        "interrupted",
        None,
        None,
    )

    canceled = h.start("run", NAME, "--batch-size", "10", env={counting.ROW_DELAY_ENV: "0.01"})
    while (h.record() or {}).get("state") != "inProgress" or h.record()["processed"] <= 300:
        time.sleep(0.05)
    assert h.cli("cancel", NAME).returncode == 0
    assert canceled.wait() == 3
    assert h.cli("run", NAME).returncode == 0
    assert h.cli("reset", NAME, "--yes").returncode == 0

    rows = history(h, NAME)
    assert [(r["kind"], r["outcome"], r["exit_code"]) for r in rows] == [
        ("reset", "pending", 0),
        ("run", "success", 0),
        ("cancel", None, 0),
        ("run", "canceled", 3),
        ("run", "interrupted", None),  # closed by the run that took it over
        ("run", "failed", 1),
    ]
    reset, done, _cancel, stopped, killed, first = rows
    # Each run's own counters: together they are every row, each once.
    assert first["processed"] == 200 and first["changed"] == 200
    assert killed["processed"] > 60 and killed["finished_at"] is not None
    assert killed["processed"] + stopped["processed"] + done["processed"] == ROWS - 200
    assert first["changed"] + killed["changed"] + stopped["changed"] + done["changed"] == ROWS
    for row in rows:
        assert (row["origin"], row["migration"], row["environment"]) == ("cli", NAME, "dev")
        assert row["host"] and row["pid"] and row["user"] and row["started_at"]
        assert row["arguments"][0] in ("run", "cancel", "reset")
    assert history(h, "--limit", "2") == rows[:2]
    assert h.query("SELECT count(*) FROM items WHERE counter <> 1")[0][0] == 0
    # As a table: the cancel's row, which has no outcome, too.
    table = h.cli("history", NAME)
    assert table.returncode == 0, table.stderr
    assert len([line for line in table.stdout.splitlines() if f" {NAME} " in line]) == len(rows)


def test_a_run_going_on_has_no_outcome_yet_and_counts_so_far(h):
    h.seed(300)
    proc = h.start("run", NAME, "--batch-size", "10", env={counting.ROW_DELAY_ENV: "0.01"})
    while (h.record() or {}).get("processed", 0) < 50:
        time.sleep(0.05)
    [running] = history(h)
    assert running["outcome"] is None and running["finished_at"] is None
    assert running["processed"] >= 50 and running["pid"] == proc.pid
    assert h.cli("cancel", NAME).returncode == 0
    assert proc.wait() == 3


def test_steps_share_one_row_and_passwords_never_reach_it(h, tmp_path):
    h.seed(300)
    url = sa.make_url(h.url)
    if h.postgresql:  # the server trusts local connections: any password is accepted
        url = url.set(password="s3cret-pw")
    elif h.mysql:  # a user of the test's own, with a password
        user = f"u{url.database[-10:]}"
        h.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY 's3cret-pw'")
        h.execute(f"GRANT ALL ON `{url.database}`.* TO '{user}'@'%'")
        url = url.set(username=user, password="s3cret-pw")
    shown = url.render_as_string(hide_password=False)
    try:
        runner = Runner(shown, counting.migrations)
        while not runner.step(NAME, budget_seconds=0.05, batch_size=50).done:
            pass
        runner.db.dispose()
        done = h.cli("run", NAME, "--restart", "--database-url", shown, "--batch-size", "100")
        assert done.returncode == 0, done.stderr
        text = h.cli("history", "--json", "--database-url", shown).stdout
    finally:
        if h.mysql:
            h.execute(f"DROP USER '{url.username}'@'%'")
    assert "s3cret-pw" not in text
    [again, steps] = json.loads(text)["runs"]
    assert (steps["origin"], steps["outcome"], steps["processed"]) == ("step", "success", 300)
    assert (again["origin"], again["outcome"], again["processed"]) == ("cli", "success", 300)
    assert "--restart" in again["arguments"]

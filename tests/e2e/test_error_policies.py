"""Error policies through the real CLI, on SQLite and on PostgreSQL, with bad input both can hold:
rows whose `source` the test app rejects (`bad:...` raises BadValue on `source`).

Under `--on-error fail` the batch holding the bad row rolls back whole, the run ends `failed`
naming the row and field, and once the row is fixed a new run resumes at that batch. Under
`--on-error skip` every other row is migrated, the bad rows are left as they were, counted and
listed, and `run --restart` retries them once fixed.
"""

from __future__ import annotations

import json

import pytest
from harness import NAME, Harness, expected_derived

from apps.counting import BAD_PREFIX

ROWS = 1_000
BATCH = "100"


@pytest.fixture
def h(tmp_path, database_url):
    harness = Harness(tmp_path, database_url)
    yield harness
    harness.cleanup()


def spoil(h: Harness, *ids: int) -> None:
    for i in ids:
        h.execute(
            "UPDATE items SET source = :prefix || source WHERE id = :id",
            {"prefix": BAD_PREFIX, "id": i},
        )


def fix(h: Harness, sources: dict[int, str], *ids: int) -> None:
    for i in ids:
        h.execute(
            "UPDATE items SET source = :source WHERE id = :id", {"source": sources[i], "id": i}
        )


def test_fail_policy_rolls_back_the_batch_names_the_row_and_resumes_once_fixed(h):
    sources = h.seed(ROWS)
    spoil(h, 250, 730)

    first = h.cli("run", NAME, "--batch-size", BATCH)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "Traceback" not in first.stderr
    # (stderr also carries the progress bar)
    [sentence] = [line for line in first.stderr.splitlines() if line.startswith("backfill:")]
    assert NAME in sentence and "250" in sentence and "'source'" in sentence, sentence
    status = h.status()
    assert status["state"] == "failed"
    assert status["error"]["row_id"] == 250 and status["error"]["field"] == "source"
    assert status["error"]["type"] == "BadValue" and "marked bad" in status["error"]["message"]
    # Batches 1 and 2 committed; the third (201..300) rolled back whole, rows before 250 too.
    assert status["progress"]["processed"] == 200
    h.assert_prefix_migrated()

    fix(h, sources, 250)
    second = h.cli("run", NAME, "--batch-size", BATCH)
    assert second.returncode == 1, second.stdout + second.stderr
    assert "730" in second.stderr
    assert h.status()["progress"]["processed"] == 700
    h.assert_prefix_migrated()

    fix(h, sources, 730)
    third = h.cli("run", NAME, "--batch-size", BATCH)
    assert third.returncode == 0, third.stdout + third.stderr
    h.assert_all_migrated_once(sources)
    final = h.status()
    assert final["error"] is None and final["skipped_errors"] == 0


def test_skip_policy_migrates_the_rest_lists_the_bad_rows_and_restart_retries_them(h):
    sources = h.seed(ROWS)
    bad = (1, 444, 1_000)
    spoil(h, *bad)

    run = h.cli("run", NAME, "--batch-size", BATCH, "--on-error", "skip")
    assert run.returncode == 0, run.stdout + run.stderr
    status = h.status()
    assert status["state"] == "success"
    assert status["progress"] == {"processed": ROWS, "total": ROWS, "completed": True}
    assert (status["changed"], status["skipped_errors"]) == (ROWS - 3, 3)
    for row_id, source, derived, counter in h.items():
        if row_id in bad:
            assert (source, derived, counter) == (BAD_PREFIX + sources[row_id], None, 0)
        else:
            assert (derived, counter) == (expected_derived(sources[row_id]), 1), row_id

    verify = h.cli("verify", NAME, "--json")
    assert verify.returncode == 1, verify.stdout + verify.stderr
    found = json.loads(verify.stdout)[NAME]
    assert (found["remaining"], found["raising"]) == (0, 3)
    assert sorted(found["raising_ids"]) == list(bad)

    fix(h, sources, *bad)
    again = h.cli("run", NAME, "--batch-size", BATCH)
    assert again.returncode == 0 and "already succeeded" in again.stdout, again.stdout
    restart = h.cli("run", NAME, "--batch-size", BATCH, "--restart")
    assert restart.returncode == 0, restart.stdout + restart.stderr
    final = h.status()
    assert final["progress"] == {"processed": ROWS, "total": ROWS, "completed": True}
    assert (final["changed"], final["skipped_errors"]) == (3, 0)
    assert all(r[2] == expected_derived(sources[r[0]]) and r[3] == 1 for r in h.items())
    clean = h.cli("verify", NAME, "--json")
    assert clean.returncode == 0, clean.stdout + clean.stderr

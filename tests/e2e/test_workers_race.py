"""Workers that start one migration at the same instant, on every dialect of `database_url`.

Eight `backfill worker` processes, started first and released together at a barrier
(tests/e2e/racing.py), meet a migration never run: one of them starts the run and makes its
plan, and each of the others, having lost that claim, joins the run instead of being refused;
then all of them claim shards at the same moments (`FOR UPDATE SKIP LOCKED` where the dialect
locks rows, a compare-and-set on the shard's generation everywhere). No shard is ever worked by
two, and (where claims run side by side: PostgreSQL, MariaDB) none finds nothing while a shard
is free: every racer does rows; every row and every Context side effect is there exactly once,
in one run.
"""

from __future__ import annotations

import re

from harness import NAME, Harness, logged_once
from racing import Race
from test_claim_race import forget_backfill
from test_workers import LOGGED, assert_every_row_once

TRIALS = 3
RACERS = 8
ROWS = 1_000


def test_workers_starting_together_share_one_run_and_never_one_shard(tmp_path, database_url):
    h = Harness(tmp_path, database_url, app=LOGGED)
    command = ["worker", NAME, "--batch-size", "20", "--app", LOGGED, "--database-url", h.url]
    env = {"COUNTING_ROW_DELAY": "0.001"}
    try:
        with Race(RACERS, [[command] * RACERS] * TRIALS, tmp_path, env=env,
                  app_module="apps.counting") as race:  # fmt: skip
            for trial in range(TRIALS):
                sources = h.seed(ROWS, seed=trial)
                forget_backfill(h)
                outcomes = race.release(trial)
                failed = [o for o in outcomes if o.exit_code != 0]
                assert not failed, f"trial {trial}: " + "; ".join(
                    f"racer {o.racer} exit {o.exit_code}: {o.stderr.strip()[-400:]}" for o in failed
                )
                done = [_rows_done(o.stdout) for o in outcomes]
                assert sum(done) == ROWS, f"trial {trial}: rows by racer {done}"
                if h.dialect != "sqlite":
                    # Each took shards: a claim never finds nothing while a shard is free. (On
                    # SQLite writers take turns: one left waiting may find the run done.)
                    assert all(done), f"trial {trial}: rows by racer {done}"
                assert_every_row_once(h, sources)
                logged_once(h)
                runs = h.query("SELECT COUNT(*) FROM _migration_runs")
                assert runs[0][0] == 1, f"trial {trial}: the racers made {runs[0][0]} runs"
    finally:
        h.cleanup()


def _rows_done(stdout: str) -> int:
    """The rows a worker says it did ("... (1,234 by this worker)")."""
    found = re.search(r"\(([\d,]+) (?:rows done )?by this worker\)", stdout)
    assert found, stdout
    return int(found.group(1).replace(",", ""))

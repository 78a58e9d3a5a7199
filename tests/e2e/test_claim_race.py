"""Runners that claim one migration at the same instant, on every dialect of `database_url`.

2 and 8 processes, started first and released together at a barrier (tests/e2e/racing.py), run
`backfill run copy_items`: on a database backfill has never seen (its tables, and the
migration's record, are created by whoever gets there first), and with `--restart` over a
finished run. In every trial exactly one runs the migration and the others are refused at once
(exit 2) naming it; and over an older layout of backfill's tables, which one of them upgrades,
once. The copy's function logs each call through the batch's connection
(`ctx.conn`, with the runner's pid): every note is logged exactly once, by the one that ran.
"""

from __future__ import annotations

from collections import Counter

import pytest
import sqlalchemy as sa
from harness import HOST
from racing import AFTER, Outcome, Race
from test_shapes_crash import SHAPES_APP, ShapesHarness

from apps import counting
from apps.counting import BAD_PREFIX
from apps.shapes import COPY
from backfill import Runner
from backfill.store.tables import SCHEMA_VERSION
from support import after_each_batch
from support.layouts import create_layout

TRIALS = 10
ROWS = 150
# 4 ms a row: a run lasts 0.6 s, far longer than the racers take to claim, so a refused racer
# is refused because the winner holds the migration, never because it already finished.
DELAY = {"SHAPES_ROW_DELAY": "0.004"}
ENGINE_TABLES = (
    "_migration_errors",
    "_migration_runs",
    "_migration_shards",
    "_migrations",
    "_backfill_schema",
)


@pytest.fixture
def h(tmp_path, database_url):
    harness = ShapesHarness(tmp_path, database_url)
    harness.name = COPY
    yield harness
    harness.cleanup()


def forget_backfill(h: ShapesHarness) -> None:
    """The database as before backfill's first use: none of its tables."""
    with h.engine.begin() as conn:
        inspector = sa.inspect(conn)
        for table in ENGINE_TABLES:
            if inspector.has_table(table):
                conn.execute(sa.text(f"DROP TABLE {table}"))


def command(*extra: str) -> list[str]:
    return ["run", COPY, "--app", SHAPES_APP, "--database-url", "{url}", *extra]


def assert_one_ran(h: ShapesHarness, outcomes: list[Outcome], trial: str) -> None:
    winners = [o for o in outcomes if o.exit_code == 0]
    assert len(winners) == 1, f"{trial}: " + "; ".join(
        f"racer {o.racer} (pid {o.pid}) exit {o.exit_code}: {o.stderr.strip()[-300:]}"
        for o in outcomes
    )
    [winner] = winners
    for loser in outcomes:
        if loser is winner:
            continue
        assert loser.exit_code == 2, (trial, loser)
        assert f"host {HOST}" in loser.stderr and f"pid {winner.pid}" in loser.stderr, (
            trial,
            loser,
        )
        assert COPY in loser.stderr and "Traceback" not in loser.stderr, (trial, loser)
    # Every note's function call was committed exactly once, by the winner.
    events = h.events()
    assert Counter(note for _id, note, _pid in events) == Counter(range(1, ROWS + 1)), trial
    assert {pid for _id, _note, pid in events} == {winner.pid}, trial
    record = h.record()
    assert record is not None
    assert (record["state"], record["processed"], record["total"]) == ("success", ROWS, ROWS)
    assert record["runner_pid"] == winner.pid, (trial, record)
    assert len(h.copies()) == ROWS


@pytest.mark.parametrize("racers", [2, 8])
def test_racing_runners_give_one_run_and_clean_refusals(h, tmp_path, racers):
    url = h.url
    first = [[a.format(url=url) for a in command()]] * racers
    restart = [[a.format(url=url) for a in command("--restart")]] * racers
    plan = [first] * TRIALS + [restart] * TRIALS
    with Race(racers, plan, tmp_path, env=DELAY, app_module="apps.shapes") as race:
        for trial in range(TRIALS):
            h.seed_notes(ROWS, seed=trial)
            forget_backfill(h)
            assert_one_ran(h, race.release(trial), f"first run, trial {trial}")
        for trial in range(TRIALS, 2 * TRIALS):
            # Over a finished run (the previous trial's): only the log of calls is cleared.
            h.execute("DELETE FROM copy_events")
            assert_one_ran(h, race.release(trial), f"--restart, trial {trial}")


UPGRADE_TRIALS = 5


def test_racing_runners_over_an_older_layout_upgrade_it_once(h, tmp_path):
    """Eight racers meet backfill's tables in an older layout: one upgrades it while the
    others wait for its lock, then they race for the claim as above."""
    racers = 8
    run = [[a.format(url=h.url) for a in command()]] * racers
    with Race(
        racers, [run] * UPGRADE_TRIALS, tmp_path, env=DELAY, app_module="apps.shapes"
    ) as race:
        for trial in range(UPGRADE_TRIALS):
            h.seed_notes(ROWS, seed=trial)
            forget_backfill(h)
            create_layout(h.engine, 1)
            assert_one_ran(h, race.release(trial), f"over layout 1, trial {trial}")
            versions = h.query("SELECT version FROM _backfill_schema")
            assert [v[0] for v in versions] == [SCHEMA_VERSION]


RESET_TRIALS = 10
BAD_IDS = (7, 30)  # rows the counting app rejects, both in the first batch


def canceled_with_skipped_rows(h: ShapesHarness) -> list[tuple[str, float]]:
    """`derive` canceled after its first batch under --on-error skip, with two skipped rows
    recorded; returns those records (row_id, at)."""
    counting.create_items(h.engine, ROWS)
    for bad in BAD_IDS:
        h.execute(
            "UPDATE items SET source = :s WHERE id = :id", {"s": f"{BAD_PREFIX}{bad}", "id": bad}
        )
    runner = Runner(h.url, counting.migrations)

    def cancel(event: object) -> None:
        runner.cancel(counting.NAME)

    [result] = runner.run(
        [counting.NAME], batch_size=50, on_error="skip", listeners=[after_each_batch(cancel)]
    )
    runner.db.dispose()
    assert str(result.state) == "canceled", result
    return skipped_records(h)


def skipped_records(h: ShapesHarness) -> list[tuple[str, float]]:
    rows = h.query("SELECT row_id, at FROM _migration_errors ORDER BY row_id")
    return [(r[0], r[1]) for r in rows]


def test_a_reset_racing_a_run_is_refused_or_resets_but_never_forgets_a_run_it_did_not_stop(
    h, tmp_path
):
    url = h.url
    app = ("--app", "apps.counting:migrations", "--database-url", url)
    run = ["run", counting.NAME, "--on-error", "skip", *app]
    # The reset starts 0 to 45 ms after the run, so the trials sweep over the run's claim.
    plan = [
        [run, [f"{AFTER}{0.005 * k:.3f}", "reset", counting.NAME, "--yes", *app]]
        for k in range(RESET_TRIALS)
    ]
    env = {"COUNTING_ROW_DELAY": "0.004"}
    h.name = counting.NAME
    outcomes: Counter[str] = Counter()
    with Race(2, plan, tmp_path, env=env, app_module="apps.counting") as race:
        for trial in range(RESET_TRIALS):
            forget_backfill(h)
            before = canceled_with_skipped_rows(h)
            run, reset = race.release(trial)
            assert run.exit_code == 0, (trial, run)
            record = h.record()
            assert record is not None and record["state"] == "success", (trial, record)
            good = ROWS - len(BAD_IDS)
            if reset.exit_code == 2:
                # The run claimed first: the reset forgot nothing, the run resumed at its
                # cursor (its counters carry over) and its skipped rows are still recorded.
                assert f"pid {run.pid}" in reset.stderr, (trial, reset)
                assert record["changed"] == good, (trial, record)
                assert skipped_records(h) == before, trial
                outcomes["refused"] += 1
            else:
                # The reset came first: the run started over (the first batch's rows were
                # already done, so they count as processed, not changed).
                assert reset.exit_code == 0, (trial, reset)
                assert record["changed"] == good - (50 - len(BAD_IDS)), (trial, record)
                assert len(skipped_records(h)) == len(BAD_IDS), trial
                outcomes["reset"] += 1
            assert record["processed"] == ROWS, (trial, record)
    print(dict(outcomes))

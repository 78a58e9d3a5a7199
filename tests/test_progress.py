"""backfill.progress.MigrationStatus on its own: the rate and ETA of the current run, and the
status JSON of the contract (docs: "Status JSON")."""

from __future__ import annotations

import pytest

from backfill.progress import MigrationStatus, RowError
from backfill.state import State
from backfill.types import Identity

T0 = 1_764_064_800.0  # 2025-11-25T10:00:00Z


def status(**values) -> MigrationStatus:
    return MigrationStatus(name="m", **{"state": State.IN_PROGRESS, **values})


def test_the_rate_is_measured_over_the_current_run_only():
    # 1,000 rows done by earlier runs, 500 more in the 10 s since this run started.
    resumed = status(
        processed=1_500,
        total=3_000,
        run_started_at=T0,
        run_processed_start=1_000,
        updated_at=T0 + 10,
    )
    assert resumed.rows_per_second == pytest.approx(50.0)
    assert resumed.eta_seconds == pytest.approx(30.0)  # 1,500 rows left at 50 rows/s


@pytest.mark.parametrize(
    "values",
    [
        {"run_started_at": None, "updated_at": T0 + 10},
        {"run_started_at": T0, "updated_at": None},
        {"run_started_at": T0, "updated_at": T0},  # no time elapsed
        {"run_started_at": T0 + 1, "updated_at": T0},  # clocks that disagree
        {"run_started_at": T0, "updated_at": T0 + 10, "run_processed_start": 100},  # none done
    ],
)
def test_no_rate_without_elapsed_time_or_rows_done(values):
    found = status(processed=100, total=1_000, **values)
    assert found.rows_per_second is None
    assert found.eta_seconds is None


@pytest.mark.parametrize(
    "state", [State.SUCCESS, State.FAILED, State.CANCELED, State.INTERRUPTED, State.PENDING]
)
def test_an_eta_only_while_in_progress(state):
    found = status(state=state, processed=100, total=1_000, run_started_at=T0, updated_at=T0 + 1)
    assert found.rows_per_second == pytest.approx(100.0)
    assert found.eta_seconds is None


def test_no_eta_without_a_total():
    found = status(processed=100, total=None, run_started_at=T0, updated_at=T0 + 1)
    assert found.rows_per_second == pytest.approx(100.0)
    assert found.eta_seconds is None


def test_the_eta_is_never_negative_when_more_rows_were_processed_than_counted():
    # The total is counted when a run starts; rows inserted since make processed exceed it.
    found = status(processed=1_200, total=1_000, run_started_at=T0, updated_at=T0 + 1)
    assert found.eta_seconds == 0.0


CONTRACT_KEYS = {
    "state",
    "progress",
    "changed",
    "skipped_errors",
    "total_is_estimate",
    "batch_size",
    "rows_per_second",
    "eta_seconds",
    "started_at",
    "updated_at",
    "finished_at",
    "runner",
    "error",
    "workers",
    "shards",
}


def test_to_json_has_the_contract_keys_and_times_in_utc_with_z():
    found = status(
        processed=1_234,
        total=5_678,
        changed=1_200,
        batch_size=100,
        started_at=T0,
        run_started_at=T0,
        updated_at=T0 + 1,
        runner=Identity("web-1", 4242),
    )
    shown = found.to_json()
    assert set(shown) >= CONTRACT_KEYS
    assert (shown["workers"], shown["shards"]) == (0, [])  # none given: no live holder
    assert status(workers=1).to_json()["workers"] == 1
    assert shown["state"] == "inProgress"
    assert shown["progress"] == {"processed": 1_234, "total": 5_678, "completed": False}
    assert (shown["changed"], shown["skipped_errors"], shown["batch_size"]) == (1_200, 0, 100)
    assert shown["total_is_estimate"] is False
    assert shown["rows_per_second"] == 1_234.0
    assert shown["eta_seconds"] == pytest.approx((5_678 - 1_234) / 1_234, abs=0.05)
    assert shown["started_at"] == "2025-11-25T10:00:00Z"
    assert shown["updated_at"] == "2025-11-25T10:00:01Z"
    assert shown["finished_at"] is None
    assert shown["runner"] == {"host": "web-1", "pid": 4242}
    assert shown["error"] is None


def test_to_json_of_a_failure_carries_the_error():
    error = RowError(message="body is not text", type="BadValue", row_id=[7, "a"], field="body")
    shown = status(state=State.FAILED, error=error, finished_at=T0 + 0.4).to_json()
    assert shown["error"] == {
        "message": "body is not text",
        "type": "BadValue",
        "row_id": [7, "a"],
        "field": "body",
    }
    assert shown["finished_at"] == "2025-11-25T10:00:00Z"  # whole seconds
    assert shown["runner"] is None and shown["rows_per_second"] is None


@pytest.mark.parametrize("state", list(State), ids=str)
def test_completed_is_true_exactly_on_success(state):
    found = status(state=state)
    assert found.completed is (state is State.SUCCESS)
    assert found.to_json()["progress"]["completed"] is (state is State.SUCCESS)

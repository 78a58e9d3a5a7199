"""backfill.lease.observed_state on records built by hand, with an injected liveness probe: when a
stored inProgress is seen as interrupted (no database, no processes)."""

from __future__ import annotations

import pytest

from backfill.lease import Identity, observed_state
from backfill.state import State
from backfill.store.records import Record

NOW = 10_000.0
LEASE = 30.0
HERE = Identity("here", 100)


def record(state: State, *, heartbeat: float | None = NOW - 1, host: str = "here", pid: int = 42):
    return Record(
        {"state": str(state), "heartbeat_at": heartbeat, "runner_host": host, "runner_pid": pid}
    )


def alive(pid: int) -> bool:
    return True


def dead(pid: int) -> bool:
    return False


def observe(found: Record | None, probe=alive) -> State:
    return observed_state(found, NOW, LEASE, HERE, alive=probe)


def test_no_record_is_pending():
    assert observe(None) is State.PENDING


@pytest.mark.parametrize(
    "state", [State.PENDING, State.SUCCESS, State.FAILED, State.CANCELED], ids=str
)
def test_stored_states_other_than_in_progress_are_returned_as_they_are(state):
    # Even with a stale heartbeat and a dead process: only inProgress is ever derived.
    assert observe(record(state, heartbeat=NOW - 10 * LEASE), dead) is state


def test_a_fresh_heartbeat_and_a_live_process_is_in_progress():
    asked: list[int] = []

    def probe(pid: int) -> bool:
        asked.append(pid)
        return True

    assert observe(record(State.IN_PROGRESS, pid=42), probe) is State.IN_PROGRESS
    assert asked == [42]


def test_a_heartbeat_older_than_the_lease_is_interrupted():
    assert observe(record(State.IN_PROGRESS, heartbeat=NOW - LEASE - 0.001)) is State.INTERRUPTED


def test_no_heartbeat_is_interrupted():
    assert observe(record(State.IN_PROGRESS, heartbeat=None)) is State.INTERRUPTED


def test_a_heartbeat_exactly_the_lease_old_is_still_in_progress():
    # The lease has run out only once the heartbeat is strictly older than it (now - hb > lease).
    assert observe(record(State.IN_PROGRESS, heartbeat=NOW - LEASE)) is State.IN_PROGRESS


def test_a_gone_process_on_this_host_is_interrupted_at_once():
    assert observe(record(State.IN_PROGRESS, heartbeat=NOW), dead) is State.INTERRUPTED


def test_a_process_on_another_host_is_not_probed():
    asked: list[int] = []

    def probe(pid: int) -> bool:
        asked.append(pid)
        return False

    found = record(State.IN_PROGRESS, host="elsewhere", pid=42)
    assert observe(found, probe) is State.IN_PROGRESS  # its pid means nothing here
    assert asked == []
    stale = record(State.IN_PROGRESS, host="elsewhere", heartbeat=NOW - LEASE - 1)
    assert observe(stale, probe) is State.INTERRUPTED  # only its heartbeat tells

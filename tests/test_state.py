"""The status machine: every pair of states is either an edge of the table or refused."""

from __future__ import annotations

import itertools

import pytest

from backfill.state import (
    TRANSITIONS,
    State,
    TransitionRefused,
    allowed,
    check,
    sources_of,
    stored,
)

EXPECTED = {
    (State.PENDING, State.IN_PROGRESS),
    (State.INTERRUPTED, State.IN_PROGRESS),
    (State.FAILED, State.IN_PROGRESS),
    (State.CANCELED, State.IN_PROGRESS),
    (State.SUCCESS, State.IN_PROGRESS),
    (State.IN_PROGRESS, State.SUCCESS),
    (State.IN_PROGRESS, State.FAILED),
    (State.IN_PROGRESS, State.CANCELED),
    (State.IN_PROGRESS, State.INTERRUPTED),
    (State.INTERRUPTED, State.PENDING),
    (State.FAILED, State.PENDING),
    (State.CANCELED, State.PENDING),
    (State.SUCCESS, State.PENDING),
    (State.PENDING, State.PENDING),
    (State.SUCCESS, State.REVERTING),
    (State.FAILED, State.REVERTING),
    (State.CANCELED, State.REVERTING),
    (State.INTERRUPTED, State.REVERTING),
    (State.PENDING, State.REVERTING),
    (State.REVERTING, State.REVERTING),
    (State.REVERTING, State.PENDING),
}


@pytest.mark.parametrize(
    ("source", "target"), list(itertools.product(State, State)), ids=lambda s: str(s)
)
def test_each_pair_is_allowed_exactly_when_it_is_an_edge(source: State, target: State) -> None:
    assert allowed(source, target) == ((source, target) in EXPECTED)
    if (source, target) in EXPECTED:
        check(source, target)
        assert TRANSITIONS[(source, target)]  # every edge says when it happens
    else:
        with pytest.raises(TransitionRefused):
            check(source, target)


def test_only_success_is_completed_and_interrupted_is_stored_in_progress() -> None:
    assert [s for s in State if s.completed] == [State.SUCCESS]
    assert {stored(s) for s in State} == set(State) - {State.INTERRUPTED}
    assert stored(State.INTERRUPTED) is State.IN_PROGRESS
    assert sources_of(State.IN_PROGRESS) == {
        State.PENDING,
        State.INTERRUPTED,
        State.FAILED,
        State.CANCELED,
        State.SUCCESS,
    }


def test_state_names_are_the_contract_spelling() -> None:
    assert [str(s) for s in State] == [
        "pending",
        "inProgress",
        "interrupted",
        "success",
        "failed",
        "canceled",
        "reverting",
    ]

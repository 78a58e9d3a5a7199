"""The status machines: a migration's states and every allowed transition, in one table, and
the same for the shards of a run with workers (`SHARD_TRANSITIONS`).

`interrupted` is never stored: it is what a stored `inProgress` is called once its runner is gone
(`backfill.lease.observed_state` derives it; for a shard, `backfill.store.shards.observed`). The
tables are enforced on every write of a state, by `backfill.store.records.transition` and
`backfill.store.shards.transition`. This module imports nothing of ours and knows no database.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "inProgress"
    INTERRUPTED = "interrupted"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELED = "canceled"
    # A revert started and has not finished (its own state, running, canceled, failed or
    # interrupted, is the status's `revert.state`).
    REVERTING = "reverting"

    @property
    def completed(self) -> bool:
        return self is State.SUCCESS


# (from, to): when it happens.
TRANSITIONS: dict[tuple[State, State], str] = {
    (State.PENDING, State.IN_PROGRESS): "run starts from the beginning",
    (
        State.INTERRUPTED,
        State.IN_PROGRESS,
    ): "run takes over a dead runner's lease, resumes at cursor",
    (State.FAILED, State.IN_PROGRESS): "run resumes at the batch that failed",
    (State.CANCELED, State.IN_PROGRESS): "run resumes after a cancel",
    (State.SUCCESS, State.IN_PROGRESS): "run --restart zeroes counters and starts over",
    (State.IN_PROGRESS, State.SUCCESS): "the range is exhausted and the last batch committed",
    (State.IN_PROGRESS, State.FAILED): "a batch raised under --on-error fail and rolled back",
    (State.IN_PROGRESS, State.CANCELED): "cancel, SIGINT or SIGTERM, honoured between batches",
    (
        State.IN_PROGRESS,
        State.INTERRUPTED,
    ): "the runner died: stale heartbeat or pid gone (derived)",
    (State.INTERRUPTED, State.PENDING): "reset forgets a dead runner's progress",
    (State.FAILED, State.PENDING): "reset",
    (State.CANCELED, State.PENDING): "reset",
    (State.SUCCESS, State.PENDING): "reset",
    (State.PENDING, State.PENDING): "reset of a migration never run changes nothing",
    (State.SUCCESS, State.REVERTING): "revert starts, newest logged change first",
    (State.FAILED, State.REVERTING): "revert starts",
    (State.CANCELED, State.REVERTING): "revert starts",
    (State.INTERRUPTED, State.REVERTING): "revert starts after the runner died",
    (State.PENDING, State.REVERTING): "revert starts after a reset kept the undo log",
    (
        State.REVERTING,
        State.REVERTING,
    ): "revert resumes (after a cancel, a failure, its runner's death), or stops unfinished",
    (State.REVERTING, State.PENDING): "the revert finished, or forget-undo dropped its log",
}


# Where a run ends (from inProgress).
ENDS = frozenset({State.SUCCESS, State.FAILED, State.CANCELED})


def allowed(source: State, target: State) -> bool:
    return (source, target) in TRANSITIONS


def sources_of(target: State) -> frozenset[State]:
    """Every state a transition into `target` may start from."""
    return frozenset(src for (src, dst) in TRANSITIONS if dst is target)


def stored(state: State) -> State:
    """How `state` is stored: a derived `interrupted` is a stored `inProgress`."""
    return State.IN_PROGRESS if state is State.INTERRUPTED else state


class TransitionRefused(Exception):
    """A state change the table does not allow; raised by `check`. A bug of ours if it ever
    reaches a user: every command checks the observed state before it asks for a change."""

    def __init__(self, source: State | ShardState, target: State | ShardState) -> None:
        super().__init__(f"cannot go from {source} to {target}")
        self.source = source
        self.target = target


def check(source: State, target: State) -> None:
    if not allowed(source, target):
        raise TransitionRefused(source, target)


class ShardState(StrEnum):
    """A range shard of a run with workers (store.plan, store.shards)."""

    PENDING = "pending"
    IN_PROGRESS = "inProgress"
    DONE = "done"
    INTERRUPTED = "interrupted"  # derived: held, but its worker is gone


# (from, to): when it happens to a shard.
SHARD_TRANSITIONS: dict[tuple[ShardState, ShardState], str] = {
    (ShardState.PENDING, ShardState.IN_PROGRESS): "a worker claims a free shard",
    (
        ShardState.INTERRUPTED,
        ShardState.IN_PROGRESS,
    ): "a worker takes over a shard whose worker is gone (lease expired, or pid gone here)",
    (ShardState.IN_PROGRESS, ShardState.DONE): "the shard's last batch committed",
    (
        ShardState.IN_PROGRESS,
        ShardState.PENDING,
    ): "its worker let it go, cursor kept: a step's budget spent, a cancel, a failure, a "
    "signal; or a claim resuming the run frees it",
    (ShardState.INTERRUPTED, ShardState.PENDING): "a claim resuming the run frees it",
    (ShardState.PENDING, ShardState.PENDING): "a claim resuming the run keeps it free",
    (
        ShardState.IN_PROGRESS,
        ShardState.INTERRUPTED,
    ): "its worker died: stale heartbeat or pid gone (derived)",
}


def stored_shard(state: ShardState) -> ShardState:
    """How a shard's `state` is stored: a derived `interrupted` is a stored `inProgress`."""
    return ShardState.IN_PROGRESS if state is ShardState.INTERRUPTED else state


def check_shard(source: ShardState, target: ShardState) -> None:
    if (source, target) not in SHARD_TRANSITIONS:
        raise TransitionRefused(source, target)

"""What the runs, reverts and commands by hand of one Runner share: its database, clock, lease,
identity, retry policy, and who asks (for the history)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from backfill import lease as leases
from backfill.history import Invocation
from backfill.retry import RetryPolicy
from backfill.state import State
from backfill.store.database import Database
from backfill.store.records import Record
from backfill.types import Clock, Identity, Liveness


@dataclass(frozen=True)
class Setting:
    db: Database
    clock: Clock
    lease_seconds: float
    me: Identity  # this process
    retry_policy: RetryPolicy
    sleep: Callable[[float], None]  # between retries
    invocation: Invocation

    def observed(self, record: Record | None) -> State:
        """The state as people see it now (lease.observed_state)."""
        return leases.observed_state(record, self.clock(), self.lease_seconds, self.me)

    def held(self, record: Record | None) -> bool:
        """Whether a live run, or a live revert, holds the migration now."""
        return self.observed(record) is State.IN_PROGRESS or leases.reverting_live(
            record, self.seen()
        )

    def seen(self) -> Liveness:
        """Who is alive, as seen from here now."""
        return Liveness(self.clock(), self.lease_seconds, self.me)

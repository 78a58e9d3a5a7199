"""Ownership of a migration by one runner: claim, heartbeat and release, with a generation number.

A runner owns a migration while its generation is the stored one. Taking over a dead runner's
migration bumps the generation, so every later commit of the old runner (which compares its
generation in the same transaction) is refused: a revived zombie can write nothing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backfill.errors import LeaseHeld
from backfill.state import State
from backfill.store import records
from backfill.store.database import Database
from backfill.store.records import Record
from backfill.types import Clock, Identity

DEFAULT_LEASE_SECONDS = 30.0


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed process its parent has not reaped yet still answers kill(0): look at /proc.
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def observed_state(
    record: Record | None,
    now: float,
    lease: float,
    here: Identity,
    alive: Callable[[int], bool] = process_alive,
) -> State:
    """The state as people see it: a stored inProgress whose runner is gone is interrupted:
    its heartbeat is older than `lease` seconds, or it ran on this host and `alive(pid)` says
    its process is gone."""
    if record is None:
        return State.PENDING
    stored = record.state
    if stored is not State.IN_PROGRESS:
        return stored
    heartbeat = record["heartbeat_at"]
    if heartbeat is None or now - heartbeat > lease:
        return State.INTERRUPTED
    if record["runner_host"] == here.host and not alive(record["runner_pid"]):
        return State.INTERRUPTED
    return State.IN_PROGRESS


def refuse_if_live(name: str, record: Record | None, observed: State) -> None:
    if observed is State.IN_PROGRESS and record is not None:
        raise LeaseHeld(name, record["runner_host"], record["runner_pid"])


def refuse_if_held(db: Database, name: str, *, now: float, lease: float, me: Identity) -> None:
    """Refuse at once, from a read transaction, when a live runner holds the migration.

    On SQLite that very runner takes the write lock batch after batch, and a waiting writer is
    starved by SQLite's busy handler (it retries every 100 ms and rarely hits the gap between two
    batches): a refusal must not wait for the write lock. Callers check again under it."""
    with db.read() as conn:
        record = records.load(conn, name)
    refuse_if_live(name, record, observed_state(record, now, lease, me))


@dataclass(frozen=True)
class Claim:
    """A migration this runner now holds: its record as claimed, and the state it came from."""

    record: Record
    source: State

    @property
    def generation(self) -> int:
        return self.record.generation

    @property
    def run_id(self) -> int:
        return int(self.record["run_id"])


def enter(
    db: Database,
    name: str,
    *,
    now: float,
    lease: float,
    me: Identity,
    restart: bool,
    scan: str,
    total: int | None,
    batch_size: int,
    total_is_estimate: bool = False,
) -> Claim | None:
    """Claim the migration for this runner, in one transaction: a new generation and a new run
    (its `run_id`). None when it already succeeded and no restart.
    Two claimants at the same instant: one wins the compare-and-set of `records.transition`,
    the other gets LeaseHeld naming it, and its transaction leaves nothing behind."""

    def refuse_if_taken() -> None:
        refuse_if_held(db, name, now=now, lease=lease, me=me)

    refuse_if_taken()
    with db.write(meanwhile=refuse_if_taken) as conn:
        record = records.ensure_record(conn, name)
        observed = observed_state(record, now, lease, me)
        refuse_if_live(name, record, observed)
        if observed is State.SUCCESS and not restart:
            return None
        fresh = restart or observed is State.PENDING or record.cursor is None
        values: dict[str, object] = {}
        if fresh:
            values.update(
                cursor=None, processed=0, changed=0, skipped_errors=0, kept=0, started_at=now
            )
        values.update(
            scan=scan,
            generation=record.generation + 1,
            run_id=records.start_run(conn, name, now, me.host, me.pid),
            runner_host=me.host,
            runner_pid=me.pid,
            heartbeat_at=now,
            updated_at=now,
            run_started_at=now,
            run_processed_start=0 if fresh else record["processed"],
            finished_at=None,
            cancel_requested=False,
            error_message=None,
            error_type=None,
            error_row_id=None,
            error_field=None,
            total=total,
            total_is_estimate=total_is_estimate,
            batch_size=batch_size,
        )
        records.transition(
            conn,
            name,
            at_generation=record.generation,
            source=observed,
            target=State.IN_PROGRESS,
            **values,
        )
        if fresh:
            records.forget_skipped(conn, name)
        claimed = records.load(conn, name)
        assert claimed is not None
        return Claim(claimed, observed)


def leave(
    db: Database, name: str, generation: int, target: State, now: float, **values: object
) -> None:
    """Record the end of a run (success, failed, canceled); LeaseLost if this runner no longer
    owns it."""
    with db.write() as conn:
        records.transition(
            conn,
            name,
            at_generation=generation,
            source=State.IN_PROGRESS,
            target=target,
            finished_at=now,
            updated_at=now,
            heartbeat_at=None,
            **values,
        )


class Heartbeat:
    """Beats in a background thread so a slow batch or a pause never looks like a dead runner."""

    def __init__(
        self, db: Database, name: str, generation: int, interval: float, clock: Clock
    ) -> None:
        self._db, self._name, self._generation = db, name, generation
        self._interval = interval
        self._clock = clock
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{name}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                with self._db.write() as conn:
                    owned = records.update_live(
                        conn, self._name, self._generation, heartbeat_at=self._clock()
                    )
            except Exception:  # noqa: BLE001 - a missed beat is retried; the lease absorbs it
                continue
            if not owned:
                self.lost.set()
                return

"""Reading and writing a migration's row in `_migrations`: every write of its state goes through
`transition`, which enforces the table of backfill.state with a compare-and-set; the owner's
other writes (batches, heartbeats, a cancel request) through `update_live` and `Ledger`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from backfill import state as machine
from backfill.errors import LeaseHeld, LeaseLost, Refused
from backfill.state import State
from backfill.store import history, shards, skipped
from backfill.store.database import Database, driver
from backfill.store.dialects import LOCKING, insert_ignoring_conflicts
from backfill.store.shards import ShardRecord
from backfill.store.tables import migrations
from backfill.types import Key, decode_key


@dataclass(frozen=True)
class Record:
    """A `_migrations` row as stored (state is the stored one: never `interrupted`), with the
    shards of its run's plan when it has one (workers)."""

    values: Mapping[str, Any]
    plan: tuple[ShardRecord, ...] = ()

    @property
    def state(self) -> State:
        return State(self.values["state"])

    @property
    def generation(self) -> int:
        return int(self.values["generation"])

    @property
    def cursor(self) -> Key | None:
        return decode_key(self.values["cursor"])

    def __getitem__(self, column: str) -> Any:
        return self.values[column]

    def totals(self) -> dict[str, int]:
        """The migration's counters: its own and its plan's shards' (where they live)."""
        summed = shards.sums(self.plan)
        return {c: int(self.values[c] or 0) + summed[c] for c in shards.COUNTERS}

    def revert_totals(self) -> dict[str, int]:
        """A revert's counters, as the history counts a run's: log entries gone through, and
        values put back."""
        return {
            "processed": int(self.values.get("revert_processed") or 0),
            "changed": int(self.values.get("revert_reverted") or 0),
            "skipped_errors": 0,
        }

    def last_seen(self) -> float | None:
        """The last sign of life of its run: a heartbeat, a batch, a shard let go."""
        moments = [self.values["heartbeat_at"], self.values["updated_at"]]
        for shard in self.plan:
            moments += [shard["heartbeat_at"], shard["released_at"]]
        return max((m for m in moments if m is not None), default=None)


def tables_exist(conn: sa.Connection) -> bool:
    return sa.inspect(conn).has_table(migrations.name)


def _select_rows() -> sa.Select[Any]:
    # Every column there is: a read-only command also reads an older layout (a run of an older
    # backfill may hold it, so it cannot be upgraded yet).
    return sa.select(sa.text("*")).select_from(migrations)


def load(conn: sa.Connection, name: str, *, with_plan: bool = True) -> Record | None:
    """The migration's row and (`with_plan`: the tables are in the current layout) its plan."""
    row = conn.execute(_select_rows().where(migrations.c.name == name)).mappings().first()
    if row is None:
        return None
    return Record(dict(row), shards.load(conn, name) if with_plan else ())


def load_all(conn: sa.Connection) -> dict[str, Record]:
    rows = conn.execute(_select_rows()).mappings()
    # An older layout (read by status while an older backfill's run holds it) has no plans.
    plans = shards.load_all(conn) if sa.inspect(conn).has_table(shards.shards.name) else {}
    return {row["name"]: Record(dict(row), plans.get(row["name"], ())) for row in rows}


def has_plan_to_finish(db: Database, name: str) -> bool:
    """Whether the migration's run has a plan (workers) and has not succeeded."""
    with db.read() as conn:
        record = load(conn, name)
    return record is not None and bool(record.plan) and record.state is not State.SUCCESS


def lock(conn: sa.Connection, name: str) -> None:
    """Hold the migration's row until this transaction ends, where the dialect locks rows
    (SQLite's writers take turns anyway): writers that must not interleave, such as two
    workers splitting shards, wait for one another. A batch's read of the row does not wait."""
    if conn.dialect.name in LOCKING:
        conn.execute(
            sa.select(migrations.c.name).where(migrations.c.name == name).with_for_update()
        )


def ensure_record(conn: sa.Connection, name: str) -> Record:
    """The migration's row, created `pending` if it has none. Two processes creating it at the
    same instant: the second waits for the first's transaction and keeps its row."""
    values = {migrations.c.name: name, migrations.c.state: str(State.PENDING)}
    conn.execute(insert_ignoring_conflicts(conn.dialect, migrations, values, migrations.c.name))
    record = load(conn, name)
    assert record is not None
    return record


def stored_sources(target: State) -> frozenset[State]:
    """The stored states a transition into `target` may start from: those of the table, with
    a derived `interrupted` stored as `inProgress`."""
    return frozenset(machine.stored(source) for source in machine.sources_of(target))


def transition(
    conn: sa.Connection,
    name: str,
    *,
    at_generation: int,
    source: State,
    target: State,
    **values: Any,
) -> None:
    """The one write of a migration's state. Checks the transition table (`source` as observed,
    so `interrupted` where the runner is gone), then compare-and-sets on the generation read or
    held (`at_generation`) and on the stored states the table allows: a process overtaken since
    it read the row writes nothing. On a miss (its transaction should roll back): LeaseLost for
    the runner that held the migration (`source` inProgress), else LeaseHeld naming the runner
    that got there first, or Refused when a reset did.

    The history follows in the same transaction: a run found dead (`source` interrupted) is
    closed as interrupted, and a run that ends is closed with its outcome and exit code."""
    machine.check(source, target)
    dead = load(conn, name) if source is State.INTERRUPTED else None
    allowed = sorted(str(s) for s in stored_sources(target))
    statement = (
        sa.update(migrations)
        .where(migrations.c.name == name)
        .where(migrations.c.generation == at_generation)
        .where(migrations.c.state.in_(allowed))
        .values(state=str(target), **values)
    )
    if conn.execute(statement).rowcount == 1:
        _close_history(conn, name, dead, source, target, values)
        return
    if source is State.IN_PROGRESS:
        raise LeaseLost(name)
    now = load(conn, name)
    if now is not None and now.state is State.IN_PROGRESS:
        raise LeaseHeld(name, now["runner_host"], now["runner_pid"])
    raise Refused(
        f"migration {name!r} was changed by another command at the same moment (it is now "
        f"{'gone' if now is None else now.state}); nothing was done: look at `backfill status "
        f"{name}` and try again"
    )


def _close_history(
    conn: sa.Connection,
    name: str,
    dead: Record | None,
    source: State,
    target: State,
    values: dict[str, Any],
) -> None:
    if dead is not None and dead["run_id"] is not None:
        history.close(
            conn,
            dead["run_id"],
            outcome=State.INTERRUPTED,
            at=dead.last_seen(),
            totals=dead.totals(),
        )
    if source is State.IN_PROGRESS and target in machine.ENDS:
        ended = load(conn, name)
        assert ended is not None
        history.close(
            conn,
            ended["run_id"],
            outcome=target,
            at=values.get("finished_at"),
            totals=ended.totals(),
            row_at_fault=values.get("error_row_id") is not None,
        )


def forget(conn: sa.Connection, record: Record, source: State, now: float, **values: Any) -> None:
    """Make the migration `pending` from `source` (observed), forgetting its progress, its
    skipped rows and its plan (a reset, the end of a revert, a restore); `values` to write
    besides."""
    name = record["name"]
    transition(
        conn,
        name,
        at_generation=record.generation,
        source=source,
        target=State.PENDING,
        **forgotten_progress(now),
        **values,
    )
    skipped.forget(conn, name)
    shards.forget(conn, name)


def update_live(
    conn: sa.Connection,
    name: str,
    generation: int,
    *,
    state: State = State.IN_PROGRESS,
    **values: Any,
) -> bool:
    """A write to the live run holding `generation` (a heartbeat, a cancel request, a revert's
    progress), never to its state: False when no run at that generation is in `state` (a
    revert: `reverting`, its own state inProgress) any more."""
    assert "state" not in values, "state changes go through transition()"
    statement = (
        sa.update(migrations)
        .where(migrations.c.name == name)
        .where(migrations.c.generation == generation)
        .where(migrations.c.state == str(state))
        .values(**values)
    )
    if state is State.REVERTING:
        statement = statement.where(migrations.c.revert_state == str(State.IN_PROGRESS))
    return conn.execute(statement).rowcount == 1


def forgotten_progress(now: float) -> dict[str, Any]:
    """What `reset` leaves of a migration's row: no cursor, counters, times, runner or error.
    The generation is kept, so a zombie of the forgotten run still cannot commit."""
    return {
        "cursor": None,
        "processed": 0,
        "changed": 0,
        "skipped_errors": 0,
        "kept": 0,
        "total": None,
        "started_at": None,
        "updated_at": now,
        "finished_at": None,
        "run_started_at": None,
        "run_processed_start": 0,
        "runner_host": None,
        "runner_pid": None,
        "heartbeat_at": None,
        "cancel_requested": False,
        "error_message": None,
        "error_type": None,
        "error_row_id": None,
        "error_field": None,
    }


class Ledger:
    """The two `_migrations` statements of every batch, for one run: is the migration still
    ours (and not asked to stop), and advance it. Compiled once and sent to the driver: through
    SQLAlchemy Core they cost about 0.6 ms a batch, more than the rest of the bookkeeping."""

    def __init__(self, dialect: sa.Dialect, name: str, generation: int) -> None:
        self.dialect, self.name, self.generation = dialect, name, generation
        check = sa.select(
            migrations.c.generation, migrations.c.state, migrations.c.cancel_requested
        ).where(migrations.c.name == sa.bindparam("name"))
        self._check = self._compile(check)
        self._advances: dict[tuple[str, ...], tuple[str, tuple[str, ...]] | None] = {}

    def _compile(self, statement: sa.ClauseElement) -> tuple[str, tuple[str, ...]] | None:
        compiled: Any = statement.compile(dialect=self.dialect)
        if not compiled.positional:
            return None  # named parameter styles: let SQLAlchemy bind them
        return compiled.string, tuple(compiled.positiontup or ())

    def read(self, conn: sa.Connection) -> tuple[int, State, bool] | None:
        """The migration's (generation, stored state, cancel requested); None if it has no row."""
        if self._check is None:
            record = load(conn, self.name, with_plan=False)
            found = (
                None
                if record is None
                else (record.generation, record["state"], record["cancel_requested"])
            )
        else:
            found = _driver_one(conn, self._check[0], (self.name,))
        return None if found is None else (int(found[0]), State(found[1]), bool(found[2]))

    def check(self, conn: sa.Connection) -> tuple[bool, bool]:
        """(still owned by this runner's generation and in progress, cancel requested)."""
        found = self.read(conn)
        if found is None or found[0] != self.generation or found[1] is not State.IN_PROGRESS:
            return False, False
        return True, found[2]

    def advance(self, conn: sa.Connection, values: dict[str, Any]) -> bool:
        """`update_live` under this runner's generation (cursor, counters, heartbeat; never the
        state); False when it no longer owns the row."""
        names = tuple(values)
        if names not in self._advances:
            assert "state" not in names, "state changes go through transition()"
            statement = (
                sa.update(migrations)
                .where(migrations.c.name == sa.bindparam("owner_name"))
                .where(migrations.c.generation == sa.bindparam("owner_generation"))
                .where(migrations.c.state == sa.bindparam("owner_state"))
                .values({migrations.c[n]: sa.bindparam(n) for n in names})
            )
            self._advances[names] = self._compile(statement)
        compiled = self._advances[names]
        if compiled is None:
            return update_live(conn, self.name, self.generation, **values)
        sql, order = compiled
        given = dict(
            values,
            owner_name=self.name,
            owner_generation=self.generation,
            owner_state=str(State.IN_PROGRESS),
        )
        raw = driver(conn).cursor()
        try:
            raw.execute(sql, tuple(given[n] for n in order))
            return int(raw.rowcount) == 1
        finally:
            raw.close()


def _driver_one(conn: sa.Connection, sql: str, params: tuple[Any, ...]) -> Any:
    raw = driver(conn).cursor()
    try:
        raw.execute(sql, params)
        return raw.fetchone()
    finally:
        raw.close()


def record_verified(
    conn: sa.Connection, name: str, at: float, remaining: int, raising: int
) -> None:
    """What `verify` found, on the migration's row (created `pending` if it has none). Not a
    state: it is written whatever the state, and a run in progress keeps it."""
    ensure_record(conn, name)
    annotate(conn, name, verified_at=at, verified_remaining=remaining, verified_raising=raising)


def annotate(conn: sa.Connection, name: str, **values: Any) -> None:
    """A write to the migration's row that is neither its state nor a live run's progress
    (what verify found; that the undo log no longer covers its run)."""
    assert "state" not in values, "state changes go through transition()"
    conn.execute(sa.update(migrations).where(migrations.c.name == name).values(**values))

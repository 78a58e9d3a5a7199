"""The history's rows in `_migration_runs`: written when a run is claimed (`begin`), when it ends
or is found dead (`close`, from `records.transition`, in the same transaction as the state it
records), and once for a command by hand (`record`); read newest first (`read`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa

from backfill.history import COUNTERS, HistoryEntry, Invocation, Kind, entry, exit_code
from backfill.state import State
from backfill.store import records
from backfill.store.tables import migration_runs
from backfill.types import Identity

runs = migration_runs


def _asked(
    name: str, kind: Kind, invocation: Invocation, database: str, now: float, me: Identity
) -> dict[str, Any]:
    return {
        "migration": name,
        "kind": str(kind),
        "origin": str(invocation.origin),
        "user_name": invocation.user,
        "arguments": json.dumps(list(invocation.arguments)),
        "environment": invocation.environment,
        "database_url": database,
        "started_at": now,
        "runner_host": me.host,
        "runner_pid": me.pid,
        "holds": 0,
    }


def _insert(conn: sa.Connection, values: dict[str, Any]) -> int:
    key = conn.execute(sa.insert(runs).values(values)).inserted_primary_key
    assert key is not None
    return int(key[0])


def begin(
    conn: sa.Connection,
    name: str,
    *,
    kind: Kind,
    invocation: Invocation,
    database: str,
    now: float,
    me: Identity,
    before: Mapping[str, int],
    backup: str | None = None,
) -> int:
    """A new run's row; its id is the run's number. `before`: the migration's counters as the
    run begins (its own are the difference, when it ends); `backup`: its latest backup."""
    values = _asked(name, kind, invocation, database, now, me)
    values["backup"] = backup
    values.update(
        processed_before=before.get("processed", 0),
        changed_before=before.get("changed", 0),
        skipped_before=before.get("skipped_errors", 0),
    )
    return _insert(conn, values)


def record(
    conn: sa.Connection,
    name: str,
    *,
    kind: Kind,
    invocation: Invocation,
    database: str,
    now: float,
    me: Identity,
    outcome: State | None,
    backup: str | None = None,
) -> int:
    """The row of a command that is over once written (a reset, a cancel request, a restore
    of `backup`)."""
    values = _asked(name, kind, invocation, database, now, me)
    values["backup"] = backup
    values.update(
        finished_at=now,
        outcome=None if outcome is None else str(outcome),
        exit_code=0,
        processed=0,
        changed=0,
        skipped_errors=0,
    )
    return _insert(conn, values)


def close(
    conn: sa.Connection,
    run_id: int,
    *,
    outcome: State,
    at: float | None,
    totals: Mapping[str, int],
    row_at_fault: bool = False,
) -> None:
    """The end of run `run_id` in `outcome` (`interrupted`: found dead; `at` is its last sign
    of life), with its own counters: the migration's `totals` now less those it began with.
    A row already closed, or written before the history existed, is left as it is."""
    own = {
        c: totals.get(c, 0) - sa.func.coalesce(runs.c[f"{_short(c)}_before"], 0) for c in COUNTERS
    }
    conn.execute(
        sa.update(runs)
        .where(runs.c.id == run_id, runs.c.finished_at.is_(None), runs.c.origin.is_not(None))
        .values(
            finished_at=at,
            outcome=str(outcome),
            exit_code=exit_code(outcome, row_at_fault),
            **own,
        )
    )


def _short(counter: str) -> str:
    return "skipped" if counter == "skipped_errors" else counter


def written(conn: sa.Connection) -> bool:
    """Whether the tables keep a history (layout 4 and later; an older layout may be read while
    an older backfill's run holds it)."""
    columns = {c["name"] for c in sa.inspect(conn).get_columns(runs.name)}
    return "origin" in columns


def read(conn: sa.Connection, name: str | None, limit: int) -> list[dict[str, Any]]:
    """History rows, newest first (of `name` only, when given)."""
    query = sa.select(runs).order_by(runs.c.id.desc()).limit(limit)
    if name is not None:
        query = query.where(runs.c.migration == name)
    return [dict(row) for row in conn.execute(query).mappings()]


def one(conn: sa.Connection, run_id: int) -> dict[str, Any] | None:
    row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).mappings().first()
    return None if row is None else dict(row)


# Whether a live run (or revert) holds the stored migration now, as seen from here.
Held = Callable[["records.Record | None"], bool]


def entries(conn: sa.Connection, name: str | None, limit: int, held: Held) -> list[HistoryEntry]:
    """The history as people see it (runs whose runner died: interrupted), newest first."""
    if not records.tables_exist(conn) or not written(conn):
        return []
    stored = records.load_all(conn)
    return [_seen(row, stored.get(row["migration"]), held) for row in read(conn, name, limit)]


def latest(conn: sa.Connection, name: str, held: Held) -> HistoryEntry | None:
    """The entry of `name`'s run in progress, or of its latest run; None before any."""
    if not records.tables_exist(conn) or not written(conn):
        return None
    record = records.load(conn, name)
    if record is None or record["run_id"] is None:
        return None
    row = one(conn, record["run_id"])
    return None if row is None else _seen(row, record, held)


def _seen(row: dict[str, Any], record: records.Record | None, held: Held) -> HistoryEntry:
    totals: dict[str, int] = {}
    if record is not None:
        totals = record.revert_totals() if row["kind"] == Kind.REVERT else record.totals()
    return entry(
        row,
        current_run=None if record is None else record["run_id"],
        held=held(record),
        totals=totals,
    )

"""Deciding a batch: call the migration function on each row read and work out what to write.

`decide` is pure per row (the function, its errors under each policy, the changes encoded for
the driver); `Decider` runs it on the connection of a transaction, with a Context for functions
that take one and, for a copy, what its target lacks. Runs (backfill.batch), dry runs and
verify all decide through `Decider`; the transaction around it is theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from backfill.definition import DELETE, Context, Form, Keep, Migration
from backfill.errors import BadValue, RowFailed
from backfill.store.copy import CopyTarget
from backfill.store.database import Database
from backfill.store.scan import TableScan
from backfill.store.values import Rows, Writes
from backfill.types import Key, row_id


class OnError(StrEnum):
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Skipped:
    key: Key
    field: str | None
    error_type: str
    message: str


@dataclass(frozen=True)
class Sample:
    key: Key
    before: dict[str, Any]
    after: dict[str, Any]


@dataclass
class Outcome:
    """What one batch did to its rows, before anything is written."""

    processed: int = 0
    changes: list[tuple[Key, dict[str, Any]]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    kept: list[Key] = field(default_factory=list)
    last_key: Key | None = None
    first_key: Key | None = None
    samples: list[Sample] = field(default_factory=list)
    # The changes encoded for the driver, when decide was given somewhere to encode them.
    writes: Writes | None = None
    # Some change sets a key column: the rows after this batch are not known before it commits.
    moves_keys: bool = False
    # Rows the batch changed in the database itself (a declared SqlChange), not one by one.
    changed_in_database: int = 0
    # For the undo log (decide's `keep_before`): each change's columns as they were, in order;
    # for a copy, the target rows it overwrites, by source key (the rest it inserts).
    befores: list[dict[str, Any]] = field(default_factory=list)
    replaced: dict[Key, dict[str, Any]] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        return len(self.changes) + self.changed_in_database

    def narrow(
        self, changes: list[tuple[Key, dict[str, Any]]], before: dict[Key, dict[str, Any]]
    ) -> None:
        """Keep only `changes` (a copy's rows its target lacks): the rest change nothing.
        `before` has, by source key, the target rows that these changes overwrite."""
        self.changes = changes
        chosen = {key for key, _ in changes}
        samples = []
        for sample in self.samples:
            if sample.key in chosen:
                old = before.get(sample.key)
                shown = {} if old is None else {n: old.get(n) for n in sample.after}
                samples.append(Sample(sample.key, shown, sample.after))
        self.samples = samples
        self.writes = None  # written by the copy's target, not into the scanned table
        self.befores = []
        self.replaced = {key: before[key] for key in chosen if key in before}


def _failure(migration: Migration, key: Key, error: Exception) -> RowFailed:
    field_name = error.field if isinstance(error, BadValue) else None
    message = error.reason if isinstance(error, BadValue) else str(error) or type(error).__name__
    return RowFailed(migration.name, row_id(key), field_name, message, type(error).__name__)


_ABSENT: Any = object()


def decide(
    migration: Migration,
    rows: Rows,
    on_error: OnError,
    samples: int = 0,
    writes: Writes | None = None,
    context: Context | None = None,
    passthrough: Callable[[BaseException], bool] | None = None,
    keep_before: bool = False,
) -> Outcome:
    """Run the function over `rows`; raise RowFailed on the first bad row under OnError.FAIL.
    With `keep_before` (a run that logs its changes to undo them) each change's values before
    are kept in the outcome, and a column written but not read is an error on its row.

    With `writes`, each change is also encoded there for the driver, so a value that cannot be
    stored is an error on its own row rather than a failure of the whole write. A function that
    takes a Context gets `context`; errors `passthrough` accepts (a deadlock in what the function
    wrote through the connection, say) are not the row's and propagate as they are.
    """
    first = rows.keys[0] if rows.keys else None
    outcome = Outcome(len(rows), last_key=rows.last_key, first_key=first, writes=writes)
    call = _caller(migration, rows, on_error, context, passthrough)
    # This loop runs once per row of the table: names are bound to locals once, and a change is
    # told from "no change" by cheap checks first (a type differs) before comparing values.
    function = migration.function
    written = migration.table if migration.in_place else migration.target
    assert written is not None
    columns = frozenset(c.name for c in written.columns)
    keys = frozenset(c.name for c in migration.key) if migration.in_place else frozenset()
    # A copy's row is whole (every column it sets), not a difference from the row read, and
    # must say which target row it is.
    compare = migration.in_place
    required = () if written is migration.table else tuple(written.primary_key.columns.keys())
    changes, faults = outcome.changes, rows.faults
    encode = None if writes is None else writes.add
    for position, (key, values) in enumerate(zip(rows.keys, rows.values, strict=True)):
        try:
            if faults and position in faults:
                fault = faults[position]
                raise BadValue(fault.field, fault.reason)
            result = function(values) if call is None else call(position, values)
            if result is None:
                continue
            if isinstance(result, Keep):
                outcome.kept.append(key)
                continue
            if isinstance(result, Changed):
                if keep_before:
                    raise TypeError(
                        "the batch function returned how many rows it changed itself: "
                        "what it wrote cannot be undone; run it without --undo"
                    )
                outcome.changed_in_database += result.rows
                continue
            for name in required:
                if result.get(name) is None:
                    raise BadValue(name, f"is the key of table {written.name!r} and must be set")
            diff: dict[str, Any] = {}
            for name, value in result.items():
                if name not in columns:
                    raise BadValue(name, f"is not a column of table {written.name!r}")
                if name in keys:
                    outcome.moves_keys = True
                new = None if value is DELETE else value
                old = values.get(name, _ABSENT) if compare else _ABSENT
                if type(old) is not type(new) or old is _ABSENT or old != new:
                    diff[name] = new
                    if keep_before and compare and old is _ABSENT:
                        raise BadValue(
                            name,
                            "is written but not read (add it to the migration's columns=): "
                            "its value before cannot be logged for --undo",
                        )
            if diff and encode is not None:
                encode(key, diff)
        except Exception as error:  # noqa: BLE001 - any error in user code is about this row
            if passthrough is not None and passthrough(error):
                raise
            failure = _failure(migration, key, error)
            if on_error is OnError.FAIL:
                raise failure from error
            outcome.skipped.append(Skipped(key, failure.field, failure.error_type, failure.message))
            continue
        if diff:
            changes.append((key, diff))
            if keep_before and compare:
                outcome.befores.append({name: values[name] for name in diff})
            if len(outcome.samples) < samples:
                before = {name: values.get(name) for name in diff} if compare else {}
                outcome.samples.append(Sample(key, before, diff))
    return outcome


Caller = Callable[[int, dict[str, Any]], Any]


def _caller(
    migration: Migration,
    rows: Rows,
    on_error: OnError,
    context: Context | None,
    passthrough: Callable[[BaseException], bool] | None,
) -> Caller | None:
    """How decide gets a row's result: None for a plain row function (called directly, the hot
    path); otherwise a function of (position, row) that passes the Context, in a savepoint under
    OnError.SKIP, or hands out the results of one call of a batch function."""
    function = migration.function
    takes_context = migration.takes_context
    if takes_context and context is None:
        raise TypeError(f"migration {migration.name!r} takes a Context; none was given")
    args: tuple[Any, ...] = (context,) if takes_context else ()

    def isolated(argument: Any) -> Any:
        """The call in a savepoint: if it raises, what it wrote through the connection goes."""
        assert context is not None
        with context.conn.begin_nested():
            return function(argument, *args)

    def plain(argument: Any) -> Any:
        return function(argument, *args)

    # A skipped row must leave nothing behind; a failed one rolls the whole batch back anyway.
    guarded = isolated if takes_context and on_error is OnError.SKIP else plain
    if migration.form is Form.ROW:
        if not takes_context:
            return None
        return lambda _position, values: guarded(values)
    whole = isolated if takes_context else plain
    results = _batch_results(migration, rows, whole, guarded, passthrough)

    def result_at(position: int, _values: dict[str, Any]) -> Any:
        result = results[position]
        if isinstance(result, _Raised):
            raise result.error
        return result

    return result_at


@dataclass(frozen=True)
class _Raised:
    error: Exception


@dataclass(frozen=True)
class Changed:
    """A batch function's count of rows it changed itself (carried by the batch's first row)."""

    rows: int


def _batch_results(
    migration: Migration,
    rows: Rows,
    whole: Callable[[Any], Any],
    single: Callable[[Any], Any],
    passthrough: Callable[[BaseException], bool] | None,
) -> list[Any]:
    """One call of a batch function over the rows the engine could decode, as a result per row.
    If it raises, it is called again one row at a time (`whole` ran in a savepoint when the
    function writes, so nothing of the failed call stays), and only the rows at fault fail."""
    positions = [p for p in range(len(rows)) if p not in rows.faults]

    def call(chosen: list[int], function: Callable[[Any], Any]) -> list[Any]:
        result = function([rows.values[p] for p in chosen])
        if isinstance(result, int) and not isinstance(result, bool):
            return [Changed(result)] + [None] * (len(chosen) - 1)
        listed = list(result)
        if len(listed) != len(chosen):
            raise TypeError(
                f"the batch function returned {len(listed)} changes for {len(chosen)} rows "
                "(one per row, in order, or the number of rows it changed)"
            )
        return listed

    results: list[Any] = [None] * len(rows)
    if not positions:
        return results
    try:
        for position, result in zip(positions, call(positions, whole), strict=True):
            results[position] = result
        return results
    except Exception as error:  # noqa: BLE001 - narrowed below, row by row
        if passthrough is not None and passthrough(error):
            raise
    for position in positions:
        try:
            (results[position],) = call([position], single)
        except Exception as error:  # noqa: BLE001 - this row's
            if passthrough is not None and passthrough(error):
                raise
            results[position] = _Raised(error)
    return results


class Decider:
    """A migration's decisions on the rows of a batch, on the connection of its transaction:
    the function (given a Context if it takes one) and, for a copy, what its target lacks.
    Runs, dry runs and read-only scans (verify) all decide through it."""

    def __init__(
        self, db: Database, migration: Migration, scan: TableScan, *, keep_before: bool = False
    ) -> None:
        self.db = db
        self.migration = migration
        self.scan = scan
        self.keep_before = keep_before
        self.copier = None if migration.in_place else CopyTarget(db.engine, migration)
        # Only a plain function of a row, written back in place, may be decided outside the
        # batch's transaction (read ahead): the others need its connection.
        self.needs_transaction = (
            migration.takes_context or migration.form is Form.BATCH or not migration.in_place
        )

    def _transient(self, error: BaseException) -> bool:
        return self.db.transient(error) is not None

    def __call__(
        self,
        conn: sa.Connection,
        rows: Rows,
        policy: OnError,
        *,
        samples: int = 0,
        write: bool = True,
        dry_run: bool = False,
    ) -> Outcome:
        """Decide `rows`; with `write`, a copy's rows are written (in place changes are written
        by the caller, from `outcome.writes`)."""
        migration, copier = self.migration, self.copier
        context = Context(conn, migration.name, dry_run) if migration.takes_context else None
        writes = self.scan.writes() if copier is None else copier.writes()
        outcome = decide(
            migration,
            rows,
            policy,
            samples,
            writes,
            context=context,
            passthrough=self._transient,
            keep_before=self.keep_before,
        )
        if copier is not None:
            kept, before = copier.settle(
                conn, outcome.changes, outcome.writes, lock=write, write=write
            )
            outcome.narrow(kept, before)
        return outcome

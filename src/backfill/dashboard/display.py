"""How the pages show a migration's status: each field of the status JSON as one short text.
static/dashboard.js says the same in the browser when the event stream brings new numbers
(keep the two alike); and a migration's definition. Pure: no web framework."""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from backfill.definition import Migration

NOTHING = "—"


def number(value: int | None) -> str:
    return NOTHING if value is None else f"{value:,}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return NOTHING
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def when(moment: str | None) -> str:
    """An ISO time of the status JSON, as `2026-12-06 04:00:19Z`."""
    return NOTHING if moment is None else moment.replace("T", " ")


def progress(status: Mapping[str, Any]) -> str:
    done, total = status["progress"]["processed"], status["progress"]["total"]
    if total is None:
        return f"{done:,} / ?"
    share = f" ({100 * done // total}%)" if total else ""
    about = "~" if status.get("total_is_estimate") else ""
    return f"{done:,} / {about}{total:,}{share}"


def error(found: Mapping[str, Any] | None) -> str:
    if found is None:
        return ""
    where = "" if found["row_id"] is None else f"row {found['row_id']!r}"
    if found["field"]:
        where += f", field {found['field']!r}"
    return f"{where}: {found['message']} ({found['type']})" if where else found["message"]


def revert(found: Mapping[str, Any] | None) -> str:
    if found is None:
        return NOTHING
    done = found["progress"]
    return (
        f"{found['state']} {done['processed']:,} / {done['total']:,} "
        f"(reverted {found['reverted']:,}, kept {found['kept_changed_by_app']:,})"
    )


def verified(found: Mapping[str, Any] | None) -> str:
    if found is None:
        return NOTHING
    return f"{found['remaining']:,} left, {found['raising']:,} raising ({when(found['at'])})"


def undo(status: Mapping[str, Any]) -> str:
    logged = {None: "", True: "logged, ", False: "not logged, "}[status["undo"]]
    return f"{logged}{status['undo_rows']:,} rows"


def workers(status: Mapping[str, Any]) -> str:
    shards = len(status["shards"])
    return f"{status['workers']} / {shards} shards" if shards else str(status["workers"])


def shown(status: Mapping[str, Any]) -> dict[str, str]:
    """Every field the pages show of one migration's status JSON, by the name the page's
    elements carry (`data-field`)."""
    rate = status["rows_per_second"]
    return {
        "state": status["state"],
        "progress": progress(status),
        "changed": number(status["changed"]),
        "skipped": number(status["skipped_errors"]),
        "kept": number(status["kept"]),
        "rate": NOTHING if rate is None else f"{rate:,.1f} rows/s",
        "eta": duration(status["eta_seconds"]),
        "started": when(status["started_at"]),
        "updated": when(status["updated_at"]),
        "error": error(status["error"]),
        "undo": undo(status),
        "revert": revert(status["revert"]),
        "workers": workers(status),
        "verified": verified(status["verified"]),
    }


def _table(table: sa.Table) -> str:
    return table.name if table.schema is None else f"{table.schema}.{table.name}"


def scan_range(migration: Migration) -> str:
    """The predicate restricting its scan, as SQL with its values where they can be shown."""
    predicate = migration.range
    if predicate is None:
        return "the whole table"
    try:
        return str(predicate.compile(compile_kwargs={"literal_binds": True}))
    except (sa.exc.SQLAlchemyError, NotImplementedError, TypeError, ValueError):
        return str(predicate)  # a value SQLAlchemy cannot render as a literal: its placeholder


def source(migration: Migration) -> str:
    try:
        return textwrap.dedent(inspect.getsource(migration.function))
    except (OSError, TypeError):  # defined in a REPL, or a callable object of C
        return "(the source of its function is not available)"


def definition(migration: Migration) -> dict[str, str]:
    """What a migration is, as its page shows it: each item a label and a text."""
    requires = migration.requires
    shown_requires = NOTHING
    if requires is not None:
        shown_requires = f"{requires.migration}, succeeded at least {requires.min_age} ago"
        if requires.verified:
            shown_requires += ", verified clean"
    found = {
        "table": _table(migration.table),
        "key": ", ".join(c.name for c in migration.key) or NOTHING,
        "range": scan_range(migration),
        "batch size": number(migration.batch_size),
        "description": migration.description or NOTHING,
        "function": f"{migration.form} function"
        + (", takes a Context" if migration.takes_context else ""),
        "columns read": ", ".join(migration.columns) or "every column",
        "requires": shown_requires,
        "declared SQL": ", ".join(migration.sql) or NOTHING,
    }
    if migration.target is not None:
        found["copies into"] = f"{_table(migration.target)} (existing rows: {migration.existing})"
    return found

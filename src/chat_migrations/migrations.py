"""The flagship migrations: legacy `body`/`thinking_content` become `parts`, then are removed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from backfill import DELETE, BadValue, Keep, Migrations, Prerequisite, Row, Runner, SqlChange
from chat_migrations.parts import derive_parts
from chat_migrations.schema import messages
from chat_migrations.viewer import MessageViewer

CLEANUP_WAIT = timedelta(days=7)
_LEGACY = ("body", "thinking_content", "parts")

migrations = Migrations()
# The dashboard's pages of the messages themselves (`backfill dashboard`, under /views/messages/).
migrations.add_view(MessageViewer())


def _derived_parts(
    table: sa.Table, build_object: Callable[..., Any], build_array: Callable[..., Any]
) -> sa.ColumnElement[Any]:
    """`derive_parts` in SQL: reasoning then text, an empty or NULL value omitted, `[]` when
    neither, with the dialect's JSON object and array constructors."""
    thinking, body = table.c.thinking_content, table.c.body
    label: sa.ColumnElement[str] = sa.literal_column("'type'")
    text: sa.ColumnElement[str] = sa.literal_column("'text'")
    reasoning_part = build_object(label, sa.literal_column("'reasoning'"), text, thinking)
    text_part = build_object(label, text, text, body)
    has_thinking = sa.func.coalesce(thinking, "") != ""
    has_body = sa.func.coalesce(body, "") != ""
    return sa.case(
        (sa.and_(has_thinking, has_body), build_array(reasoning_part, text_part)),
        (has_thinking, build_array(reasoning_part)),
        (has_body, build_array(text_part)),
        else_=build_array(),
    )


def parts_in_sqlite(table: sa.Table) -> SqlChange:
    """`body_to_parts` in SQLite: the same parts as `derive_parts`, built with json_array and
    json_object, whose text is byte for byte what the Python path writes (same escapes,
    compact, UTF-8 as is).

    The rows changed are those whose parts the function sees as None: SQL NULL, and TEXT that
    Python's JSON decoder reads as `null` (JSON whitespace around it, exactly). SQLite lets any
    value into any column, so the guard keeps to the rows this SQL handles as the function
    does: legacy fields that are TEXT or NULL (json_object would write a number as a JSON
    number, and fails on a blob, where the function names the row) and parts that are not a
    blob (Python decodes a blob as JSON in UTF-16 or 32 too). A batch with any other row, or
    with TEXT that is not UTF-8, is done by the function (see SqlChange).
    """
    thinking, body, parts = table.c.thinking_content, table.c.body, table.c.parts
    json_whitespace = sa.func.char(32, 9, 10, 13)
    return SqlChange(
        values={"parts": _derived_parts(table, sa.func.json_object, sa.func.json_array)},
        where=sa.or_(parts.is_(None), sa.func.trim(parts, json_whitespace) == "null"),
        # Said with `=` and IS NULL: measured, a quarter cheaper per row than typeof IN (...).
        guard=sa.and_(
            sa.or_(sa.func.typeof(body) == "text", body.is_(None)),
            sa.or_(sa.func.typeof(thinking) == "text", thinking.is_(None)),
            sa.func.typeof(parts) != "blob",
        ),
        # Measured on 300,000 messages: 10,000 rows per batch ran about 5% faster than 5,000
        # (fewer commits, each of which checkpoints the WAL); a batch holds the write lock for
        # about a tenth of a second, which the app's writers wait out (busy timeout).
        batch_size=10_000,
    )


def parts_in_postgresql(table: sa.Table) -> SqlChange:
    """`body_to_parts` in PostgreSQL: the same parts as `derive_parts`, built with jsonb.

    PostgreSQL text is always valid UTF-8 without NUL, so none of the bad input `derive_parts`
    rejects can be stored there. The rows changed are those whose parts the function sees as
    None: SQL NULL, and also a JSON `null` (the driver hands both to Python as None).
    """
    parts = table.c.parts
    derived = _derived_parts(table, sa.func.jsonb_build_object, sa.func.jsonb_build_array)
    return SqlChange(
        values={"parts": derived},
        where=sa.or_(parts.is_(None), sa.func.jsonb_typeof(parts) == "null"),
        # Measured on 1M messages: 2,500 rows per batch write a row in about three quarters of
        # the time 1,000 do (fewer commits and round trips), and a batch still lasts ~60 ms.
        batch_size=2_500,
    )


@migrations.migration(
    table=messages,
    # Measured on SQLite with 1M messages (bench/sqlite_bench.py): 2,000 rows per batch ran
    # about a fifth faster than 1,000 (fewer commits, GIL hand-overs and WAL checkpoints) and
    # no slower than 4,000; a batch holds the write lock for about 30 ms.
    batch_size=2000,
    columns=_LEGACY,
    sql={"postgresql": parts_in_postgresql, "sqlite": parts_in_sqlite},
)
def body_to_parts(row: Row) -> dict[str, Any] | None:
    """Write `parts` from the legacy fields on rows that have none."""
    if row["parts"] is not None:
        return None  # written by the new code, or already migrated
    return {"parts": derive_parts(row["body"], row["thinking_content"])}


@migrations.migration(
    table=messages,
    batch_size=1000,
    columns=_LEGACY,
    requires=Prerequisite("body_to_parts", min_age=CLEANUP_WAIT, verified=True),
)
def cleanup_legacy_fields(row: Row) -> dict[str, Any] | Keep | None:
    """Clear the legacy fields where `parts` says exactly the same thing."""
    if row["body"] is None and row["thinking_content"] is None:
        return None
    try:
        expected = derive_parts(row["body"], row["thinking_content"])
    except BadValue as error:
        return Keep(f"legacy field {error.field} {error.reason}")
    if row["parts"] != expected:
        # Old code edited the row after it was migrated (or parts are broken): keep the text.
        return Keep("parts differ from what the legacy fields give")
    return {"body": DELETE, "thinking_content": DELETE}


def count_legacy_messages(database: str | sa.Engine) -> int:
    """Messages still without parts: those body_to_parts would write, plus those it rejects."""
    found = Runner(database, migrations).count("body_to_parts")
    return found.remaining + found.raising

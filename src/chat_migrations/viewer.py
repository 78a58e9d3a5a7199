"""The message viewer: the dashboard's pages about the chat app's `messages` (a backfill view).

Conversations listed, one conversation's messages rendered as the app's readers see them
(through `message_parts`: a legacy row falls back to its old fields), and a sample of migrated
rows checked: their stored parts and the parts their legacy fields give must render the same.
It reads with SQLAlchemy Core, the same queries on every dialect, and imports no web library:
the dashboard renders its templates (templates/, one `_message.html` for every message shown).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa

from backfill import BackfillError, BadRequest, MalformedJSON, NotFound, Page, ViewRequest
from chat_migrations.parts import InvalidMessage, message_parts
from chat_migrations.schema import messages

PAGE_SIZE = 50  # conversations a page
CONVERSATION_LIMIT = 500  # messages shown of one conversation
SAMPLE_SIZE, SAMPLE_LIMIT = 10, 50
_MISSING = "there is no messages table in this database: `backfill demo --seed-only` creates one"
# A message's columns; its parts read as text (see _decoded).
_COLUMNS = (
    messages.c.id,
    messages.c.conversation_id,
    messages.c.role,
    messages.c.body,
    messages.c.thinking_content,
    sa.type_coerce(messages.c.parts, sa.Text).label("parts"),
    messages.c.created_at,
)
# Migrated rows that still carry a legacy field: those cleanup_legacy_fields would look at.
_CARRYING = sa.and_(
    messages.c.parts.is_not(None),
    sa.or_(messages.c.body.is_not(None), messages.c.thinking_content.is_not(None)),
)


# A fence opens with three or more backticks and an optional info string (its first word is
# the language), and closes with at least as many backticks alone on their line.
_OPENING = re.compile(r"[ \t]*(`{3,})[ \t]*([^`\s]*)[^`]*")
_CLOSING = re.compile(r"[ \t]*(`{3,})[ \t]*")


@dataclass(frozen=True)
class Block:
    """A paragraph of text, or a fenced code block with its language ("" when none is given)."""

    kind: Literal["paragraph", "code"]
    text: str
    language: str = ""


def blocks(text: str) -> list[Block]:
    """`text` as its paragraphs (separated by blank lines) and fenced ``` code blocks, in order.

    A code block keeps its lines as they are; a fence never closed runs to the end of the text,
    as CommonMark has it (a reply cut off mid-stream)."""
    found: list[Block] = []
    paragraph: list[str] = []
    code: list[str] | None = None
    fence = language = ""

    def end_paragraph() -> None:
        if paragraph:
            found.append(Block("paragraph", "\n".join(paragraph)))
            paragraph.clear()

    for line in text.replace("\r\n", "\n").split("\n"):
        if code is not None:
            closing = _CLOSING.fullmatch(line)
            if closing and len(closing[1]) >= len(fence):
                found.append(Block("code", "\n".join(code), language))
                code = None
            else:
                code.append(line)
        elif opening := _OPENING.fullmatch(line):
            end_paragraph()
            code, fence, language = [], opening[1], opening[2]
        elif line.strip():
            paragraph.append(line)
        else:
            end_paragraph()
    if code is not None:
        found.append(Block("code", "\n".join(code).rstrip("\n"), language))
    end_paragraph()
    return found


@dataclass(frozen=True)
class ShownPart:
    """One part as the template shows it: reasoning or text as blocks, any other part (a tool
    call, a file, a text that is not a string) as its pretty JSON."""

    type: str
    blocks: tuple[Block, ...] = ()
    json: str = ""


@dataclass(frozen=True)
class Message:
    """One message as `_message.html` renders it; `error` when `message_parts` cannot read it."""

    id: Any
    conversation_id: Any
    role: str
    source: Literal["legacy", "migrated"]
    created_at: str
    parts: tuple[ShownPart, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class Unreadable:
    """A stored value the driver cannot hand back (SQLite's TEXT that is not UTF-8)."""

    reason: str

    def __str__(self) -> str:
        return f"cannot be read ({self.reason})"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _shown_parts(parts: Sequence[Any]) -> Iterator[ShownPart]:
    for part in parts:
        if isinstance(part, Mapping):
            kind, text = str(part.get("type")), part.get("text")
            if kind in ("reasoning", "text") and isinstance(text, str):
                yield ShownPart(kind, tuple(blocks(text)))
                continue
        else:
            kind = type(part).__name__
        yield ShownPart(kind, json=_pretty(part))


def _decoded(raw: Any) -> Any:
    """Stored parts as the app's JSON column gives them. Read as text (SQLAlchemy's JSON type
    would raise on malformed JSON and lose the whole page); PostgreSQL's driver decodes jsonb."""
    if not isinstance(raw, str | bytes):
        return raw
    try:
        return json.loads(raw)
    except ValueError as error:
        text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
        return MalformedJSON(text, str(error))


def _moment(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if isinstance(value, datetime) else str(value)


def read_message(row: Mapping[str, Any], *, derived: bool = False) -> Message:
    """The row as readers see it, through `message_parts`; with `derived`, the same row with the
    parts its legacy fields give (what body_to_parts would write) instead of its own."""
    stored = _decoded(row["parts"])
    shown = Message(
        row["id"],
        row["conversation_id"],
        str(row["role"]),
        "legacy" if stored is None else "migrated",
        _moment(row["created_at"]),
    )
    used = None if derived else stored
    for field in ("body", "thinking_content") if used is None else ("parts",):
        if isinstance(row[field], Unreadable):
            return replace(shown, error=f"message {row['id']!r}: field {field!r} {row[field]}")
    try:
        parts = message_parts({**row, "parts": used})
    except InvalidMessage as error:
        return replace(shown, error=str(error))
    return replace(shown, parts=tuple(_shown_parts(parts)))


@dataclass(frozen=True)
class Conversation:
    id: int
    messages: int
    legacy: int
    migrated: int
    latest: str


@dataclass(frozen=True)
class Check:
    """A sampled row: its legacy fields and parts as stored, and its two renderings."""

    message: Message
    body: str | None
    thinking_content: str | None
    parts: str
    stored: str  # markup: the row rendered with its stored parts
    derived: str  # markup: the row rendered with the parts its legacy fields give

    @property
    def verdict(self) -> Literal["identical", "differs"]:
        return "identical" if self.stored == self.derived else "differs"


def _as_stored(value: Any) -> str | None:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"(a blob of {len(bytes(value))} bytes)"
    return None if value is None else str(value)


def _as_json(raw: Any) -> str:
    parts = _decoded(raw)
    if isinstance(parts, MalformedJSON):
        return parts.text
    return str(parts) if isinstance(parts, Unreadable) else _pretty(parts)


def _rows(connection: sa.Connection, query: sa.Select[Any]) -> list[dict[str, Any]]:
    """What `query` (of _COLUMNS) selects. SQLite fails a whole fetch on one TEXT that is not
    UTF-8: then each row is read alone, and one that fails again field by field."""
    try:
        return [dict(row) for row in connection.execute(query).mappings()]
    except sa.exc.DBAPIError:
        connection.rollback()  # PostgreSQL: a failed statement ends the transaction
    keys = connection.scalars(query.with_only_columns(messages.c.id)).all()
    return [_row(connection, key) for key in keys]


def _row(connection: sa.Connection, key: Any) -> dict[str, Any]:
    this = messages.c.id == key
    try:
        return dict(connection.execute(sa.select(*_COLUMNS).where(this)).mappings().one())
    except sa.exc.DBAPIError:
        connection.rollback()
    row: dict[str, Any] = {}
    for column in _COLUMNS:
        try:
            row[column.key] = connection.scalar(sa.select(column).where(this))
        except sa.exc.DBAPIError as error:
            connection.rollback()
            # Its text may hold the undecodable bytes as surrogates: shown escaped.
            said = f"{type(error.orig).__name__}: {error.orig}"[:160]
            row[column.key] = Unreadable(said.encode("utf-8", "backslashreplace").decode())
    return row


def _whole_number(raw: str, what: str, bad: type[BackfillError] = BadRequest) -> int:
    # At most 18 digits: every database here compares it with an integer column.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise bad(f"{what} is a whole number, not {raw!r}")
    return int(raw)


class MessageViewer:
    """The `messages` view: /views/messages/ (conversations), /views/messages/conversations/ID
    (one conversation) and /views/messages/sample (migrated rows checked against their legacy
    fields). `rng` picks the sample (a seeded one in tests)."""

    name = "messages"
    title = "Messages"
    templates = Path(__file__).resolve().parent / "templates"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def page(self, request: ViewRequest) -> Page:
        path = request.path.strip("/")
        if not sa.inspect(request.engine).has_table(messages.name):
            raise NotFound(_MISSING)
        if path == "":
            return self.conversations(request)
        if path == "sample":
            return self.sample(request)
        head, _, conversation = path.partition("/")
        if head == "conversations" and conversation:
            return self.conversation(request, conversation)
        raise NotFound(f"the messages view has no page {path!r}")

    def conversations(self, request: ViewRequest) -> Page:
        raw = request.query.get("after")
        after = None if raw is None else _whole_number(raw, "`after` (a conversation id)")
        conversation_id = messages.c.conversation_id
        ids = sa.select(conversation_id).group_by(conversation_id).order_by(conversation_id)
        if after is not None:
            ids = ids.where(conversation_id > after)
        legacy = sa.func.sum(sa.case((messages.c.parts.is_(None), 1), else_=0))
        latest = sa.func.max(messages.c.created_at)
        with request.engine.connect() as connection:
            found = connection.scalars(ids.limit(PAGE_SIZE + 1)).all()
            shown, more = found[:PAGE_SIZE], len(found) > PAGE_SIZE
            # The page's conversations are those between its first and its last.
            counts = (
                connection.execute(
                    sa.select(conversation_id, sa.func.count(), legacy, latest)
                    .where(conversation_id.between(shown[0], shown[-1]))
                    .group_by(conversation_id)
                    .order_by(conversation_id)
                ).all()
                if shown
                else []
            )
        listed = [
            # MariaDB sums to a Decimal.
            Conversation(cid, int(total), int(old), int(total) - int(old), _moment(latest))
            for cid, total, old, latest in counts
        ]
        return Page(
            "conversations.html",
            {"conversations": listed, "after": after, "next_after": shown[-1] if more else None},
            title="Conversations",
        )

    def conversation(self, request: ViewRequest, raw: str) -> Page:
        conversation_id = _whole_number(raw, "a conversation id", NotFound)
        query = (
            sa.select(*_COLUMNS)
            .where(messages.c.conversation_id == conversation_id)
            .order_by(messages.c.created_at, messages.c.id)
            .limit(CONVERSATION_LIMIT + 1)
        )
        with request.engine.connect() as connection:
            rows = _rows(connection, query)
        if not rows:
            raise NotFound(f"there is no conversation {conversation_id}: no message has it")
        shown = [read_message(row) for row in rows[:CONVERSATION_LIMIT]]
        return Page(
            "conversation.html",
            {
                "conversation_id": conversation_id,
                "messages": shown,
                "legacy": sum(message.source == "legacy" for message in shown),
                "unreadable": sum(message.error is not None for message in shown),
                "truncated": len(rows) > CONVERSATION_LIMIT,
                "limit": CONVERSATION_LIMIT,
            },
            title=f"Conversation {conversation_id}",
        )

    def sample(self, request: ViewRequest) -> Page:
        raw = request.query.get("n")
        wanted = SAMPLE_SIZE if not raw else _whole_number(raw, "`n` (how many messages)")
        wanted = max(1, min(wanted, SAMPLE_LIMIT))
        with request.engine.connect() as connection:
            ids = self._sampled(connection, wanted)
            query = sa.select(*_COLUMNS).where(messages.c.id.in_(ids)).order_by(messages.c.id)
            rows = _rows(connection, query)
            checks = [self._check(request, row) for row in rows]
        return Page(
            "sample.html",
            {
                "checks": checks,
                "identical": sum(check.verdict == "identical" for check in checks),
                "wanted": wanted,
                "limit": SAMPLE_LIMIT,
            },
            title="Sample of migrated messages",
        )

    def _sampled(self, connection: sa.Connection, wanted: int) -> list[int]:
        """Up to `wanted` ids of migrated rows carrying legacy fields, picked at random: ids
        drawn between the least and the greatest, each the first such row at or after its
        draw (portable, where ORDER BY random() is not, and each draw reads one row)."""
        first = sa.select(messages.c.id).where(_CARRYING).order_by(messages.c.id)
        few = connection.scalars(first.limit(wanted + 1)).all()
        if len(few) <= wanted:
            return list(few)
        low = few[0]
        high = connection.scalar(sa.select(sa.func.max(messages.c.id)).where(_CARRYING))
        assert high is not None  # there are more than `wanted` such rows
        picked: set[int] = set()
        for _ in range(wanted * 4):  # draws landing on a row already picked are retried
            at = self._rng.randint(low, high)
            found = connection.scalar(first.where(messages.c.id >= at).limit(1))
            picked.add(low if found is None else found)
            if len(picked) == wanted:
                break
        if len(picked) < wanted:  # the draws fell mostly after long gaps: topped up in order
            rest = first.where(messages.c.id.not_in(picked)).limit(wanted - len(picked))
            picked.update(connection.scalars(rest))
        return sorted(picked)

    def _check(self, request: ViewRequest, row: Mapping[str, Any]) -> Check:
        stored, derived = read_message(row), read_message(row, derived=True)
        return Check(
            stored,
            _as_stored(row["body"]),
            _as_stored(row["thinking_content"]),
            _as_json(row["parts"]),
            # The same template as the conversation page's, for both.
            request.render("_message.html", {"message": stored}),
            request.render("_message.html", {"message": derived}),
        )

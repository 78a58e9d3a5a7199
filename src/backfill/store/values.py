"""A batch's values between the driver and the migration function, in both directions.

Rows as read (decoded for the function: JSON text parsed, faults kept per row) and changes as
written (JSON encoded, grouped by the columns they set, as plain tuples for the driver). Pure:
no connection, no SQL.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from backfill.errors import BadValue
from backfill.types import Key


@dataclass(frozen=True)
class MalformedJSON:
    """A JSON column whose stored text does not parse; handed to the function instead of raising."""

    text: str
    error: str

    def __str__(self) -> str:
        return f"malformed JSON ({self.error})"


@dataclass(frozen=True)
class Fault:
    """A stored value the engine could not even decode (invalid UTF-8 in TEXT)."""

    field: str
    reason: str


class Rows:
    """One batch as read, in key order: each row's key and the dict handed to the function.

    Kept as two parallel lists rather than an object per row: at a million rows, building a
    frozen dataclass per row cost more than reading the row.
    """

    __slots__ = ("keys", "values", "faults")

    def __init__(
        self, keys: list[Key], values: list[dict[str, Any]], faults: dict[int, Fault] | None = None
    ) -> None:
        self.keys = keys
        self.values = values
        self.faults = faults or {}  # by position; only rows the engine could not decode

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def last_key(self) -> Key | None:
        return self.keys[-1] if self.keys else None


def is_json(column: sa.Column[Any]) -> bool:
    return isinstance(column.type, sa.JSON)


DECODER = json.JSONDecoder()


def decode_json(raw: Any) -> Any:
    if not isinstance(raw, str | bytes):
        return raw
    try:
        return DECODER.decode(raw) if isinstance(raw, str) else json.loads(raw)
    except ValueError as error:
        text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
        return MalformedJSON(text, str(error))


def _json_encoder() -> Callable[[Any], str]:
    """The encoder for JSON columns: compact, UTF-8 as is, no NaN or Infinity (not JSON).

    `json.dumps(value, **options)` builds a JSONEncoder per call, and `JSONEncoder.encode` builds
    its C encoder per call: measured, a quarter of the time of encoding a row's parts. So the C
    encoder is built once, when this Python has the one `JSONEncoder` itself would build (it
    must encode a probe exactly like it); otherwise the public encoder is used."""
    public = json.JSONEncoder(
        ensure_ascii=False, separators=(",", ":"), check_circular=False, allow_nan=False
    )
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return public.encode
    try:
        # (markers, default, string encoder, indent, separators, sort_keys, skipkeys, allow_nan)
        string = json.encoder.encode_basestring
        chunks = make(None, public.default, string, None, ":", ",", False, False, False)
    except TypeError:
        return public.encode
    join = "".join

    def encode(value: Any) -> str:
        return join(chunks(value, 0))

    probe = [{"text": 'é\n"😊', "n": [1, -2.5, True, None, {}]}, "x"]
    try:
        same = encode(probe) == public.encode(probe)
    except Exception:  # noqa: BLE001 - anything unexpected: use the public encoder
        same = False
    return encode if same else public.encode


ENCODE = _json_encoder()
Encoder = Callable[[Any], str] | None


def encode_json(value: Any) -> str | None:
    # SQL NULL where the function means "nothing", never the JSON literal null.
    return None if value is None else ENCODE(value)


class Writes:
    """The changes of one batch encoded for the driver, grouped by the columns they set: for
    each group, one tuple per row of the new values then the key."""

    def __init__(self, json_columns: frozenset[str]) -> None:
        self._json = json_columns
        self.groups: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        # Per group: its rows and, per column, the JSON encoder or None (stored as is).
        self._plans: dict[tuple[str, ...], tuple[list[tuple[Any, ...]], tuple[Encoder, ...]]]
        self._plans = {}

    def __len__(self) -> int:
        return sum(len(rows) for rows in self.groups.values())

    def add(self, key: Key, changes: dict[str, Any]) -> None:
        """Encode one row's changes; BadValue naming the field when a value cannot be stored."""
        names = tuple(changes)
        plan = self._plans.get(names)
        if plan is None:
            encoders = tuple(ENCODE if n in self._json else None for n in names)
            plan = self._plans[names] = [], encoders
            self.groups[names] = plan[0]
        rows, encoders = plan
        try:
            if len(encoders) == 1:  # the common case, without the loop
                (value,) = changes.values()
                encode = encoders[0]
                rows.append((value if encode is None or value is None else encode(value), *key))
                return
            encoded = [
                value if encode is None or value is None else encode(value)
                for encode, value in zip(encoders, changes.values(), strict=True)
            ]
        except (TypeError, ValueError, RecursionError) as error:
            raise self._unstorable(changes, error) from error
        rows.append((*encoded, *key))

    def _unstorable(self, changes: dict[str, Any], error: Exception) -> BadValue:
        for name, value in changes.items():
            if name in self._json:
                try:
                    encode_json(value)
                except (TypeError, ValueError, RecursionError) as own:
                    return BadValue(name, f"cannot be stored as JSON ({own})")
        return BadValue(next(iter(changes)), f"cannot be stored as JSON ({error})")

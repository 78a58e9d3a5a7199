"""What every benchmark prints the same way: the machine it ran on, the best of repeated runs,
and all their rates; and the row-by-row check that two outputs hold the same parts."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, TypeVar


class Rated(Protocol):
    @property
    def rate(self) -> float: ...


R = TypeVar("R", bound=Rated)


def opening(server: str) -> str:
    """The first line of a report: the server, Python, CPUs and the load when it started."""
    return (
        f"{server}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )


def best(timings: Sequence[R]) -> R:
    """The fastest of repeated runs: other work on the machine only ever slows a run down."""
    return max(timings, key=lambda t: t.rate)


def rates(timings: Iterable[Rated]) -> str:
    return ", ".join(f"{t.rate:,.0f}" for t in timings)


def same_parts(left: Iterable[tuple[Any, Any]], right: Iterable[tuple[Any, Any]]) -> int:
    """Rows compared, (id, decoded parts) by id; raises on the first that differs (or has no
    parts)."""
    compared = 0
    for (lid, lparts), (rid, rparts) in zip(left, right, strict=True):
        if lid != rid or lparts != rparts or lparts is None:
            raise SystemExit(f"outputs differ at id {lid}/{rid}: {lparts!r} != {rparts!r}")
        compared += 1
    return compared

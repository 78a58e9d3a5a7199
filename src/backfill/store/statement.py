"""A SQL statement compiled once by SQLAlchemy and then sent straight to the driver.

The hot statements of a batch skip SQLAlchemy's execution (measured: its per-row result and
JSON processing cost a third of a run: docs/architecture.md, "Where the time goes"). A
Statement keeps the compiled text and the order in which the driver takes its parameters, with
the values SQLAlchemy bound itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa


@dataclass(frozen=True)
class Statement:
    """SQL compiled once for the driver, with the order in which it takes its parameters."""

    sql: str
    # Per driver parameter, an index into the given values followed by `constants`; None: the
    # given values then the constants, as they are.
    order: tuple[int, ...] | None
    constants: tuple[Any, ...]  # values SQLAlchemy bound itself (LIMIT, a range's literals)

    @classmethod
    def compile(
        cls, statement: sa.ClauseElement, dialect: sa.Dialect, names: Sequence[str]
    ) -> Statement:
        compiled: Any = statement.compile(dialect=dialect)
        if not compiled.positional:
            raise NotImplementedError(
                f"{dialect.name}: named parameter styles are not supported yet"
            )
        wanted = list(compiled.positiontup or ())
        theirs = [n for n in wanted if n not in names]
        # A range's literals go to the driver as SQLAlchemy would send them (a datetime as
        # SQLite's text, say): the hot statements skip SQLAlchemy's execution.
        processors = getattr(compiled, "_bind_processors", {})
        constants = tuple(
            processors[n](compiled.params[n]) if n in processors else compiled.params[n]
            for n in theirs
        )
        order = tuple(
            names.index(n) if n in names else len(names) + theirs.index(n) for n in wanted
        )
        identity = order == tuple(range(len(names) + len(theirs)))
        return cls(compiled.string, None if identity else order, constants)

    def params(self, values: Sequence[Any]) -> tuple[Any, ...]:
        if self.order is None:
            return tuple(values) + self.constants
        given = tuple(values) + self.constants
        return tuple(given[i] for i in self.order)

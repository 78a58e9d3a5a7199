"""Who asked for a run the dashboard started: `BACKFILL_ORIGIN` in the detached child's
environment (`api` or `dashboard`, or `cli` for the demo's own run), so its history row says
who asked. Knows nothing of the web: `Globals.runner()` reads it."""

from __future__ import annotations

import os
from collections.abc import Mapping

from backfill.errors import ConfigError
from backfill.history import Origin

ORIGIN_ENV = "BACKFILL_ORIGIN"
# The origins a child may be given; the others are the CLI's own to say.
_GIVEN = (Origin.CLI, Origin.API, Origin.DASHBOARD)


def origin_from_env(default: Origin, environ: Mapping[str, str] | None = None) -> Origin:
    """`BACKFILL_ORIGIN`'s origin when set (and not empty), else `default`. A value other than
    `cli`, `api` or `dashboard` is a ConfigError (one sentence, exit 2)."""
    raw = (os.environ if environ is None else environ).get(ORIGIN_ENV, "").strip()
    if not raw:
        return default
    for origin in _GIVEN:
        if raw == origin.value:
            return origin
    allowed = ", ".join(o.value for o in _GIVEN[:-1]) + f" or {_GIVEN[-1].value}"
    raise ConfigError(f"{ORIGIN_ENV}={raw!r} must be {allowed}")

"""The dashboard: a web page and an HTTP API over the Runner (`backfill dashboard`).

    app.py         create_app: the pages, the status and history reads, the event stream
    guard.py       the check before every route (Host, Origin, token), the security headers
    auth.py        the rules: the token, the Origin and Host, the SameSite cookie
    actions.py     POST /api/migrations/{name}/{action}: options, answers, refusals
    background.py  detached `backfill run|revert` children, and their claim
    origin.py      BACKFILL_ORIGIN: what such a child records as its history row's origin
    display.py     how statuses and definitions are shown on the pages
    templates/, static/   the pages (Jinja2, autoescaped) and their script and style

Only app.py and guard.py import Starlette and Jinja2 (the `dashboard` extra), so `backfill`
itself never needs them: this `__init__` imports origin.py alone.
"""

from __future__ import annotations

from backfill.dashboard.origin import ORIGIN_ENV, origin_from_env

__all__ = ["ORIGIN_ENV", "origin_from_env"]

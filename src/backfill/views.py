"""Pages an application adds to the dashboard: the extension point.

A view is a few read-only pages about the application's own data (the chat example's message
viewer is one). It is registered on the app's registry, `migrations.add_view(view)`, and
`backfill dashboard` then links it in its header and serves it under `/views/{view.name}/`,
with the dashboard's reading rules (open on loopback, the token elsewhere). A view answers GET
only; acting stays the migrations' business.

    class Orders:
        name = "orders"                        # its address: /views/orders/...
        title = "Orders"                       # its link in the header
        templates = Path(__file__).parent / "templates"

        def page(self, request: ViewRequest) -> Page:
            with request.engine.connect() as connection:
                rows = connection.execute(sa.select(orders).limit(50)).mappings().all()
            return Page("orders.html", {"rows": rows}, title="Orders")

Its templates are Jinja2 with autoescape on, found as "{name}/{template}": one may extend the
dashboard's "base.html" (its block `main`), and includes another of its own by that full name.
They are given the page's context, plus `view_root` (the view's address, "/views/{name}/", for
its links) and the dashboard's own names, which a page's context may not use: RESERVED.
`request.render` renders one of them to markup (a str the templates show as it is), to compare
two renderings say. A page raises NotFound (404) or BadRequest (400) with a sentence. Nothing
here imports a web library: an application defines its view without the `dashboard` extra.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa

from backfill.errors import BackfillError

# A view's name is one segment of its address.
NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


# What the dashboard gives every template: a view's page context may not use these names.
RESERVED = frozenset(
    ("environment", "production", "database", "token", "shown", "views", "notice", "view_root")
    + ("title", "request")  # the tab's title (Page.title), and Starlette's own
)


class NotFound(BackfillError):
    """What a view raises for a page it does not have: a 404 with this sentence."""


class BadRequest(BackfillError):
    """What a view raises for a question it cannot take (a bad parameter): a 400."""


@dataclass(frozen=True)
class ViewRequest:
    """What a view's page is asked: `path` after `/views/{name}/` ("" for its first page),
    the query's fields, the database to read, and how to render one of its templates (to
    markup: a str subclass its templates do not escape again)."""

    path: str
    query: Mapping[str, str]
    engine: sa.Engine
    render: Callable[[str, Mapping[str, Any]], str]


@dataclass(frozen=True)
class Page:
    """A view's answer: its template (a name in its own folder), what that template is given,
    and the title of the browser's tab."""

    template: str
    context: Mapping[str, Any] = field(default_factory=dict)
    title: str = ""


class View(Protocol):
    name: str
    title: str
    templates: Path

    def page(self, request: ViewRequest) -> Page: ...


def checked(view: View) -> View:
    """`view`, once its name can be an address segment and its templates are a folder."""
    if not view.name or not set(view.name) <= NAME_CHARACTERS:
        raise ValueError(
            f"a view's name is its address: lowercase letters, digits, - and _ (not {view.name!r})"
        )
    if not Path(view.templates).is_dir():
        raise ValueError(f"view {view.name!r}: its templates folder {view.templates} is missing")
    return view

"""A toy dashboard view (backfill.views) that is not about messages, for tests/test_views.py.

`NotesView` ("notes", title "Notes") reads a `notes` table of its own through `request.engine`
and keeps every ViewRequest it was given (`asked`), so a test can see what the dashboard passed.
Its pages:

    ""            every note (notes.html: extends base.html, includes "notes/_note.html", shows
                  a badge rendered by `request.render`, and echoes its path and query)
    items/ID      one note; NotFound when there is none, BadRequest when ID is not a number
    reserved      a page whose context uses a RESERVED name (`?name=`, "database" when none is
                  given): the view's bug

`migrations` is a registry with one migration over `notes` (`shout`), so the dashboard has a
migration page too, and the view added.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from backfill import BadRequest, Migrations, NotFound, Page, Row, ViewRequest

TEMPLATES = Path(__file__).resolve().parent / "toy_templates"

metadata = sa.MetaData()

notes = sa.Table(
    "notes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("title", sa.Text, nullable=False),
)


class NotesView:
    name = "notes"
    title = "Notes"
    templates = TEMPLATES

    def __init__(self) -> None:
        self.asked: list[ViewRequest] = []

    def page(self, request: ViewRequest) -> Page:
        self.asked.append(request)
        path = request.path
        badge = request.render("_badge.html", {"label": "<new>"})
        if path == "":
            with request.engine.connect() as connection:
                rows = connection.execute(sa.select(notes).order_by(notes.c.id)).mappings().all()
            context = {"notes": rows, "badge": badge, "path": path, "query": request.query}
            return Page("notes.html", context, title="All notes")
        head, _, rest = path.partition("/")
        if head == "items" and rest:
            if not rest.isdigit():
                raise BadRequest(f"a note's id is a whole number, not {rest!r}")
            with request.engine.connect() as connection:
                row = connection.execute(sa.select(notes).where(notes.c.id == int(rest)))
                note = row.mappings().one_or_none()
            if note is None:
                raise NotFound(f"there is no note {rest}")
            context = {"notes": [note], "badge": badge, "path": path, "query": request.query}
            return Page("notes.html", context, title=f"Note {rest}")
        if path == "reserved":
            taken = request.query.get("name", "database")
            return Page("notes.html", {"notes": [], "badge": badge, taken: "shadowed"})
        raise NotFound(f"the notes view has no page {path!r}")


migrations = Migrations()


@migrations.migration(table=notes, batch_size=10)
def shout(row: Row) -> dict[str, object]:
    """Every note's title in capitals."""
    return {"title": row["title"].upper()}


migrations.add_view(NotesView())

"""The dashboard's extension point (backfill.views), through Starlette's TestClient over
`create_app(..., views=[...])` with a toy view that is not about messages (tests/apps/toy_view:
"notes", over a table of its own):

- every dashboard page's header links each view (and shows no such nav without views);
- a view's page renders inside base.html, is given `view_root`, its path and query, and reads
  the database through `request.engine`;
- what the database holds is escaped, markup from `request.render` is not escaped again;
- NotFound is a 404, BadRequest a 400, each with its sentence; an unknown view is a 404; the
  view's address without its slash reaches its first page;
- a page whose context takes one of the dashboard's own names (RESERVED) fails loudly;
- beyond loopback a view's page needs the token, as every read does;
- `Migrations.add_view` refuses a bad name, a missing templates folder and a name added twice;
- backfill.views (and an app defining a view) imports no web library.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from apps import toy_view
from apps.toy_view import TEMPLATES, NotesView, notes
from backfill import Migrations
from backfill.views import RESERVED, View
from support.clients import TestClient, dashboard_clients
from support.serving import web_libraries_imported

TOKEN = "a-token-for-tests"
SHOWN = "sqlite:///notes-for-tests.db"  # what the header shows as the database
NAV = '<nav><a href="/views/notes/">Notes</a></nav>'
HOSTILE = "<script>alert('x')</script> & <b>bold</b>"
Make = Callable[..., TestClient]


@pytest.fixture
def url(tmp_path: Path) -> str:
    """A SQLite file holding the toy view's `notes`: 1 and 3 plain, 2 with HTML in its title."""
    found = f"sqlite:///{tmp_path / 'notes.db'}"
    engine = sa.create_engine(found)
    toy_view.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(
            notes.insert(),
            [
                {"id": 1, "title": "first note"},
                {"id": 2, "title": HOSTILE},
                {"id": 3, "title": "third note"},
            ],
        )
    engine.dispose()
    return found


@pytest.fixture
def make(url: str) -> Iterator[Make]:
    """`make(views=[...], **create_app's keywords)`: a TestClient of a dashboard over `url` with
    the toy registry (reads open, as on loopback, unless overridden); closed after the test."""
    with dashboard_clients(
        url,
        toy_view.migrations,
        token=TOKEN,
        environment="staging",
        database_display=SHOWN,
        require_token_for_reads=False,
    ) as make_client:

        def client(views: Sequence[View] = (), **overrides: Any) -> TestClient:
            return make_client(views=views, **overrides)

        yield client


def named(name: str = "notes", templates: Path = TEMPLATES) -> NotesView:
    """A NotesView under another name or templates folder."""
    view = NotesView()
    view.name, view.templates = name, templates
    return view


# -- the header ------------------------------------------------------------------------------


def test_every_dashboard_page_links_the_view_and_none_without_views(make: Make) -> None:
    client = make([NotesView()])
    for path in ("/", "/migrations/shout", "/views/notes/", "/views/notes/items/1"):
        page = client.get(path)
        assert page.status_code == 200, path
        header = page.text.split("<header>")[1].split("</header>")[0]
        assert NAV in header, path
    bare = make()
    for path in ("/", "/migrations/shout"):
        page = bare.get(path)
        assert page.status_code == 200 and "<nav>" not in page.text, path
        assert "/views/" not in page.text, path
    assert bare.get("/views/notes/").status_code == 404


# -- a page ----------------------------------------------------------------------------------


def test_a_page_renders_in_base_html_with_its_root_path_query_and_database(
    make: Make, url: str
) -> None:
    view = NotesView()
    client = make([view])
    page = client.get("/views/notes/items/3?x=1")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # base.html's: the tab's title, the environment and the database in the header.
    assert "<title>Note 3 · staging</title>" in page.text
    assert '<span class="environment" title="environment">staging</span>' in page.text
    assert f'<span class="database" title="database">{SHOWN}</span>' in page.text
    assert '<link rel="stylesheet" href="/static/dashboard.css">' in page.text
    # What page() was asked, and what its template was given.
    [asked] = view.asked
    assert asked.path == "items/3" and dict(asked.query) == {"x": "1"}
    assert asked.engine.url.render_as_string(False) == url
    assert '<p class="asked" data-path="items/3" data-root="/views/notes/">' in page.text
    assert '<span data-key="x">1</span>' in page.text
    # The note read through request.engine, shown by the included partial, linked by view_root.
    note = '<li class="note" data-note-id="3"><a href="/views/notes/items/3">third note</a></li>'
    assert note in page.text and 'data-note-id="1"' not in page.text
    # The first page: path "", every note, in the database's order.
    first = client.get("/views/notes/")
    assert first.status_code == 200 and "<title>All notes · staging</title>" in first.text
    assert view.asked[-1].path == "" and dict(view.asked[-1].query) == {}
    assert first.text.count('<li class="note"') == 3
    assert first.text.index('data-note-id="1"') < first.text.index('data-note-id="3"')


def test_the_databases_text_is_escaped_and_rendered_markup_is_not_escaped_again(
    make: Make,
) -> None:
    page = make([NotesView()]).get("/views/notes/items/2").text
    assert "<script>alert" not in page and "<b>bold</b>" not in page
    title = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;"
    assert f'<a href="/views/notes/items/2">{title}</a>' in page
    # request.render's markup (its own text escaped once, by its template) shown as it is.
    assert '<p class="badge-holder"><span class="badge">&lt;new&gt;</span></p>' in page
    assert "&lt;span" not in page and "&amp;lt;new" not in page


# -- errors ----------------------------------------------------------------------------------


def test_not_found_bad_request_and_an_unknown_view(make: Make) -> None:
    client = make([NotesView()])
    missing = client.get("/views/notes/items/99")
    assert missing.status_code == 404 and missing.text == "there is no note 99"
    assert missing.headers["content-type"].startswith("text/plain")
    bad = client.get("/views/notes/items/x")
    assert bad.status_code == 400 and bad.text == "a note's id is a whole number, not 'x'"
    assert client.get("/views/notes/nothing/here").status_code == 404
    unknown = client.get("/views/nope/")
    assert unknown.status_code == 404
    assert unknown.text == "no view 'nope' (this app's views: notes)"
    assert make().get("/views/nope/").text == "no view 'nope' (this app's views: none)"


def test_the_views_address_without_its_slash_reaches_its_first_page(make: Make) -> None:
    client = make([NotesView()])
    answer = client.get("/views/notes")
    assert answer.status_code == 200 and answer.url.path == "/views/notes/"
    assert "<title>All notes · staging</title>" in answer.text
    assert [step.status_code for step in answer.history] in ([], [307], [308])


def test_a_page_using_a_reserved_name_fails_loudly(make: Make) -> None:
    client = make([NotesView()])
    assert {"database", "token", "view_root"} <= RESERVED
    for name in sorted(RESERVED):
        with pytest.raises(TypeError, match=rf"view 'notes' .* dashboard's own names \['{name}'\]"):
            client.get(f"/views/notes/reserved?name={name}")
    # Served: an error, never the page with the dashboard's database silently shadowed.
    answer = make([NotesView()], raise_server_exceptions=False).get("/views/notes/reserved")
    assert answer.status_code == 500 and "shadowed" not in answer.text


def test_beyond_loopback_a_views_page_needs_the_token(make: Make) -> None:
    client = make([NotesView()], require_token_for_reads=True)
    for path in ("/views/notes/", "/views/notes/items/1", "/views/nope/"):
        assert client.get(path).status_code == 401, path
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/views/notes/", headers=bearer).status_code == 200
    assert client.get("/views/notes/items/1", headers=bearer).status_code == 200
    assert client.get("/views/notes/", headers={"Authorization": "Bearer wrong"}).status_code == 401


# -- registering -----------------------------------------------------------------------------


def test_add_view_refuses_bad_names_missing_templates_and_a_name_twice(tmp_path: Path) -> None:
    registry = Migrations()
    assert registry.views == []
    for bad in ("Notes", "a/b", ""):
        with pytest.raises(ValueError, match=r"a view's name is its address: lowercase letters"):
            registry.add_view(named(bad))
    with pytest.raises(ValueError, match=r"view 'notes': its templates folder .* is missing"):
        registry.add_view(named(templates=tmp_path / "nowhere"))
    assert registry.views == []  # nothing refused was kept
    view = NotesView()
    assert registry.add_view(view) is view
    with pytest.raises(ValueError, match=r"view 'notes' is added twice"):
        registry.add_view(NotesView())
    other = named("notes-2_b")
    registry.add_view(other)
    assert registry.views == [view, other]
    assert [found.name for found in toy_view.migrations.views] == ["notes"]


def test_backfill_views_and_an_app_defining_a_view_import_no_web_library() -> None:
    assert web_libraries_imported("backfill.views", "apps.toy_view") == []

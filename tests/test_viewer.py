"""The message viewer (chat_migrations.viewer), through Starlette's TestClient over the dashboard
(`create_app` with the chat app's views): the conversations and their pages, a legacy message
and its migrated twin rendered alike, what is escaped, what cannot be read, the sample's check,
the 404s; the listing and a conversation on SQLite, PostgreSQL and MariaDB. And the pure
splitting of text into paragraphs and code blocks."""

from __future__ import annotations

import ast
import contextlib
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from backfill import Runner, State
from backfill.views import View
from chat_migrations import MessageViewer, migrations, viewer
from chat_migrations.generator import create_messages_table, generate_messages, seed_messages
from chat_migrations.schema import messages
from chat_migrations.viewer import Block, blocks
from support.clients import TestClient, dashboard_clients

START = datetime(2024, 3, 1, tzinfo=UTC)
THINKING = "The user wants <em>code</em>; keep it short."
BODY = (
    "Here is how:\n\n```python\nprint('<b>hi</b>')\n\nprint(2)\n```\n\n"
    "Not <script>alert('x')</script> nor <img src=x onerror=alert(1)>.\nSame paragraph."
)
Client = Callable[..., TestClient]


@pytest.fixture
def client_for() -> Iterator[Client]:
    """`client_for(url)`: a TestClient of a dashboard over `url` with the chat app's views (or
    `views`), reads open as on loopback; closed at the end of the test."""
    with contextlib.ExitStack() as stack:

        def make(url: str, views: Sequence[View] = migrations.views) -> TestClient:
            make_client = stack.enter_context(
                dashboard_clients(
                    url,
                    migrations,
                    token="a-token-for-tests",
                    environment="dev",
                    database_display="chat",
                    require_token_for_reads=False,
                )
            )
            return make_client(views=views)

        yield make


def message(id: int, conversation_id: int = 1, **fields: Any) -> dict[str, Any]:
    """A legacy row as the old code wrote it (no `parts` key: SQL NULL)."""
    row = {"role": "assistant", "body": None, "thinking_content": None, **fields}
    created_at = START + timedelta(minutes=id)
    return {"id": id, "conversation_id": conversation_id, "created_at": created_at, **row}


def insert(engine: sa.Engine, *rows: dict[str, Any]) -> None:
    with engine.begin() as connection:
        connection.execute(messages.insert(), list(rows))


def migrate(url: str) -> None:
    runner = Runner(url, migrations)
    try:
        [result] = runner.run(["body_to_parts"])
    finally:
        runner.db.dispose()
    assert result.state is State.SUCCESS


def articles(page: str) -> dict[str, str]:
    """Each message's <article> (its inner HTML) by its data-message-id."""
    found = re.findall(
        r'<article class="message" data-message-id="([^"]*)"[^>]*>(.*?)</article>', page, re.S
    )
    return dict(found)


def parts_html(article: str) -> str:
    """The article's `<div class="parts">` element, nested divs counted."""
    start, depth = article.index('<div class="parts">'), 0
    for tag in re.compile(r"<div\b|</div>").finditer(article, start):
        depth += 1 if tag[0] == "<div" else -1
        if depth == 0:
            return article[start : tag.end()]
    raise AssertionError("the parts element is not closed")


def source(page: str, message_id: int) -> str:
    found = re.search(rf'data-message-id="{message_id}" data-source="(\w+)"', page)
    assert found, f"message {message_id} is not on the page"
    return found[1]


@pytest.fixture
def twins(sqlite_url: str) -> str:
    """Conversation 1: a question and an answer migrated by body_to_parts, then the answer's
    legacy copy (id 3) inserted as the old code would, after the migration."""
    engine = sa.create_engine(sqlite_url)
    create_messages_table(engine)
    insert(engine, message(1, role="user", body="Show me <b>code</b>"))
    insert(engine, message(2, body=BODY, thinking_content=THINKING))
    migrate(sqlite_url)
    insert(engine, message(3, body=BODY, thinking_content=THINKING))
    engine.dispose()
    return sqlite_url


# -- splitting text ----------------------------------------------------------------------------


def test_text_splits_into_paragraphs_and_fenced_code() -> None:
    text = "First line\nsame paragraph\n\n\n```sql\nSELECT 1;\n\n  -- indented\n```\nAfter."
    assert blocks(text) == [
        Block("paragraph", "First line\nsame paragraph"),
        Block("code", "SELECT 1;\n\n  -- indented", "sql"),
        Block("paragraph", "After."),
    ]
    assert blocks("") == [] and blocks("\n \n") == []
    assert blocks("a\r\n\r\nb") == [Block("paragraph", "a"), Block("paragraph", "b")]


def test_a_fence_without_language_longer_fences_and_inline_backticks() -> None:
    assert blocks("```\nx\n```") == [Block("code", "x")]
    # A four-backtick fence holds a three-backtick line; ``` x ``` on one line is no fence.
    assert blocks("````md\n```\ninner\n```\n````") == [Block("code", "```\ninner\n```", "md")]
    assert blocks("say ```x``` here\n```y```") == [Block("paragraph", "say ```x``` here\n```y```")]
    assert blocks("```python title=a.py\npass\n```") == [Block("code", "pass", "python")]


def test_an_unclosed_fence_runs_to_the_end() -> None:
    assert blocks("Start:\n```ts\nconst a = 1;\n\nconst b = 2;\n") == [
        Block("paragraph", "Start:"),
        Block("code", "const a = 1;\n\nconst b = 2;", "ts"),
    ]


def test_the_viewer_imports_no_web_library() -> None:
    tree = ast.parse(Path(viewer.__file__).read_text(encoding="utf-8"))
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in (
            [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
        )
        if name
    }
    assert not imported & {"starlette", "jinja2", "markupsafe", "uvicorn"}, imported
    assert [view.name for view in migrations.views] == ["messages"]


# -- the pages ---------------------------------------------------------------------------------


def test_the_listing_pages_through_conversations_with_their_counts(
    sqlite_url: str, client_for: Client
) -> None:
    engine = sa.create_engine(sqlite_url)
    seed_messages(engine, 1000)
    with engine.begin() as connection:  # one message of conversation 2 migrated
        first = connection.scalar(
            sa.select(sa.func.min(messages.c.id)).where(messages.c.conversation_id == 2)
        )
        connection.execute(
            messages.update()
            .where(messages.c.id == first)
            .values(parts=[{"type": "text", "text": "x"}])
        )
    engine.dispose()
    sizes = Counter(row["conversation_id"] for row in generate_messages(1000))
    client = client_for(sqlite_url)
    first_page = client.get("/views/messages/")
    assert first_page.status_code == 200
    listed = re.findall(r'<tr data-conversation-id="(\d+)">', first_page.text)
    assert listed == [str(n) for n in range(1, 51)]
    assert '<a href="/views/messages/conversations/1">1</a>' in first_page.text
    row = first_page.text.split('<tr data-conversation-id="2">')[1].split("</tr>")[0]
    assert f'data-field="messages">{sizes[2]}<' in row
    assert f'data-field="legacy">{sizes[2] - 1}<' in row and 'data-field="migrated">1<' in row
    assert '<a class="next" rel="next" href="/views/messages/?after=50">next</a>' in first_page.text
    assert 'href="/views/messages/">Messages</a>' in first_page.text  # the header's link
    last_page = client.get("/views/messages/?after=50")
    listed = re.findall(r'<tr data-conversation-id="(\d+)">', last_page.text)
    assert listed == [str(n) for n in range(51, len(sizes) + 1)]
    assert 'class="next"' not in last_page.text and 'class="first"' in last_page.text
    assert "No conversations after 999" in client.get("/views/messages/?after=999").text
    assert client.get("/views/messages/?after=x").status_code == 400


def test_a_legacy_message_and_its_migrated_twin_render_the_same_parts(
    twins: str, client_for: Client
) -> None:
    page = client_for(twins).get("/views/messages/conversations/1")
    assert page.status_code == 200
    shown = articles(page.text)
    assert list(shown) == ["1", "2", "3"]  # in order of created_at
    assert [source(page.text, n) for n in (1, 2, 3)] == ["migrated", "migrated", "legacy"]
    assert '<span class="badge badge-legacy"' in shown["3"]
    assert '<span class="badge badge-migrated"' in shown["2"]
    assert parts_html(shown["2"]) == parts_html(shown["3"])
    assert '<span class="role">assistant</span>' in shown["2"]


def test_reasoning_is_collapsed_above_the_text_and_code_preformatted(
    twins: str, client_for: Client
) -> None:
    parts = parts_html(articles(client_for(twins).get("/views/messages/conversations/1").text)["3"])
    reasoning = parts.index('<details class="part part-reasoning"><summary>Reasoning</summary>')
    assert reasoning < parts.index('<section class="part part-text">')
    assert "<p>The user wants &lt;em&gt;code&lt;/em&gt;; keep it short.</p></details>" in parts
    code = "print(&#39;&lt;b&gt;hi&lt;/b&gt;&#39;)\n\nprint(2)"
    opening = '<pre class="code" data-language="python"><code class="language-python">'
    assert f"{opening}{code}</code></pre>" in parts
    assert "<p>Here is how:</p>" in parts


def test_html_in_a_message_is_shown_as_text(twins: str, client_for: Client) -> None:
    page = client_for(twins).get("/views/messages/conversations/1").text
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;.\nSame paragraph.</p>" in page
    assert "Show me &lt;b&gt;code&lt;/b&gt;" in page


def test_a_message_that_cannot_be_read_is_named_and_the_others_render(
    sqlite_url: str, client_for: Client
) -> None:
    engine = sa.create_engine(sqlite_url)
    create_messages_table(engine)
    insert(engine, message(1, body="fine"), message(2, body="x"), message(3, body=b"\xff\x00"))
    insert(engine, message(4, thinking_content="fine too"), message(5, body="y"))
    insert(engine, message(6, body="z", parts=[{"type": "text", "text": "z"}]))
    with engine.begin() as connection:  # written by hand, as a buggy writer could
        connection.exec_driver_sql("UPDATE messages SET parts = '[{\"type\": ' WHERE id = 2")
        # TEXT that is not UTF-8: SQLite's driver fails the whole fetch on it.
        connection.exec_driver_sql("UPDATE messages SET body = CAST(x'ff41' AS TEXT) WHERE id > 4")
    engine.dispose()
    client = client_for(sqlite_url)
    page = client.get("/views/messages/conversations/1")
    assert page.status_code == 200
    shown = articles(page.text)
    assert list(shown) == ["1", "2", "3", "4", "5", "6"]
    assert "message 2: field &#39;parts&#39; holds malformed JSON" in shown["2"]
    assert "message 3: field &#39;body&#39; is a blob of 2 bytes" in shown["3"]
    assert "message 5: field &#39;body&#39; cannot be read (" in shown["5"]
    assert 'class="parts"' not in shown["2"] + shown["3"] + shown["5"]
    assert "<p>fine</p>" in shown["1"] and "<p>fine too</p></details>" in shown["4"]
    assert "<p>z</p>" in shown["6"]  # its parts are readable, and what it shows
    assert "3 cannot be shown" in page.text
    # In the sample, each renders one way and not the other.
    sample = client.get("/views/messages/sample").text
    assert "0 of 2 identical" in sample and sample.count('data-verdict="differs"') == 2
    row = sample.split('<tr class="check" data-message-id="6"')[1].split("</tr>")[0]
    assert '<dd data-field="body"><pre class="stored">cannot be read (' in row


def test_the_sample_checks_migrated_messages_against_their_legacy_fields(
    sqlite_url: str, client_for: Client
) -> None:
    engine = sa.create_engine(sqlite_url)
    seed_messages(engine, 30)
    migrate(sqlite_url)
    insert(engine, message(31, conversation_id=99, body="still legacy"))  # not sampled
    client = client_for(sqlite_url, [MessageViewer(random.Random(7))])
    page = client.get("/views/messages/sample?n=50").text
    assert '<p class="summary" data-identical="30" data-total="30">30 of 30 identical</p>' in page
    assert page.count('data-verdict="identical"') == 30 and 'data-message-id="31"' not in page
    row = page.split('<tr class="check" data-message-id="2"')[1].split("</tr>")[0]
    assert '<dd data-field="body"><pre class="stored">' in row
    assert "&#34;type&#34;: &#34;text&#34;" in row and 'data-rendering="stored"' in row
    with engine.begin() as connection:  # the new code edits message 2 after its migration
        connection.execute(
            messages.update()
            .where(messages.c.id == 2)
            .values(parts=[{"type": "text", "text": "edited"}])
        )
    engine.dispose()
    page = client.get("/views/messages/sample?n=50").text
    assert "29 of 30 identical" in page
    row = page.split('<tr class="check" data-message-id="2" data-verdict="differs">')[1]
    row = row.split("</tr>")[0]
    assert '<p class="verdict verdict-differs">differs</p>' in row
    assert 'data-rendering="derived"' in row and "<p>edited</p>" in row
    # Ten by default, each once, picked at random; at most 50; n is a whole number.
    default = client.get("/views/messages/sample").text
    picked = re.findall(r'<tr class="check" data-message-id="(\d+)"', default)
    assert len(set(picked)) == len(picked) == 10 and 'data-total="10"' in default
    assert 'data-total="1"' in client.get("/views/messages/sample?n=0").text
    assert client.get("/views/messages/sample?n=ten").status_code == 400


def test_the_sample_says_when_there_is_nothing_to_check(
    sqlite_url: str, client_for: Client
) -> None:
    engine = sa.create_engine(sqlite_url)
    seed_messages(engine, 5)
    engine.dispose()
    page = client_for(sqlite_url).get("/views/messages/sample")
    assert page.status_code == 200 and "No migrated message carries legacy fields" in page.text


def test_pages_that_are_not_there_are_404s(twins: str, tmp_path: Path, client_for: Client) -> None:
    client = client_for(twins)
    for path in (
        "conversations/2",
        "conversations/x",
        "conversations/1.5",
        "conversations/",
        "conversations/" + "9" * 30,
        "nope",
        "conversations/1/more",
    ):
        answer = client.get(f"/views/messages/{path}")
        assert answer.status_code == 404, path
    assert "no conversation 2" in client.get("/views/messages/conversations/2").text
    assert client.get("/views/nope/").status_code == 404
    empty = client_for(f"sqlite:///{tmp_path / 'empty.db'}")
    for path in ("", "conversations/1", "sample"):
        answer = empty.get(f"/views/messages/{path}")
        assert answer.status_code == 404 and "backfill demo --seed-only" in answer.text


def test_the_listing_and_a_conversation_on_every_database(
    database_url: str, client_for: Client
) -> None:
    engine = sa.create_engine(database_url)
    seed_messages(engine, 40)
    insert(engine, message(100, conversation_id=1, body=BODY, thinking_content=THINKING))
    migrate(database_url)
    insert(engine, message(101, conversation_id=1, body=BODY, thinking_content=THINKING))
    engine.dispose()
    sizes = Counter(row["conversation_id"] for row in generate_messages(40))
    client = client_for(database_url)
    listing = client.get("/views/messages/").text
    assert re.findall(r'<tr data-conversation-id="(\d+)">', listing) == [
        str(n) for n in sorted(sizes)
    ]
    row = listing.split('<tr data-conversation-id="1">')[1].split("</tr>")[0]
    assert f'data-field="messages">{sizes[1] + 2}<' in row
    assert 'data-field="legacy">1<' in row and f'data-field="migrated">{sizes[1] + 1}<' in row
    page = client.get("/views/messages/conversations/1").text
    shown = articles(page)
    assert list(shown)[-2:] == ["100", "101"] and len(shown) == sizes[1] + 2
    assert (source(page, 100), source(page, 101)) == ("migrated", "legacy")
    assert parts_html(shown["100"]) == parts_html(shown["101"])
    assert "<script>alert" not in page and 'class="language-python"' in page
    total = sizes.total() + 1
    assert f"{total} of {total} identical" in client.get(f"/views/messages/sample?n={total}").text
    # Fewer than there are: drawn at random (ids 41 to 99 are a gap), five all the same.
    assert "5 of 5 identical" in client.get("/views/messages/sample?n=5").text

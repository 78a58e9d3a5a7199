"""The chat app's message viewer (chat_migrations.viewer) in a real browser (headless chromium),
served by `backfill dashboard` over a SQLite file: messages inserted by hand, body_to_parts run,
then legacy copies (parts NULL) of migrated messages inserted as the old code would write them.

- a legacy message and its migrated twin render the same DOM (their `.parts`' innerHTML), the
  reasoning collapsed until its summary is clicked;
- HTML in a message's body is shown as text: the tags are visible, no element is made of them,
  no script of theirs runs; a fenced ```python block is preformatted;
- the sample page finds every migrated message identical to what its legacy fields give, and
  says `differs` for the one whose parts are then edited by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from playwright.sync_api import Locator, Page, expect

import chat_migrations
from backfill import Runner, State
from chat_migrations.schema import messages, metadata
from support.serving import Dashboard

APP = "chat_migrations:migrations"
ServeDashboard = Callable[..., Dashboard]
START = datetime(2024, 3, 1, tzinfo=UTC)
THINKING = "The user wants code.\n\nKeep it short."
CODE = "def greet(name):\n    return f'<b>{name}</b>'"
ANSWER = f"Here is how:\n\n```python\n{CODE}\n```\n\nCall it once."
IMG = '<img src=x onerror="window.__pwned=1"><b>bold</b>'
SCRIPT = "<script>window.__pwned=2</script>"
# Conversation 1: a question (1) and its answer (2), migrated; 3 is 2's legacy copy.
# Conversation 2: hostile bodies, 4 and 5 migrated; 6 and 7 their legacy copies.
MIGRATED = {
    1: {"conversation_id": 1, "role": "user", "body": "Show me code"},
    2: {"conversation_id": 1, "role": "assistant", "body": ANSWER, "thinking_content": THINKING},
    4: {"conversation_id": 2, "role": "user", "body": IMG},
    5: {"conversation_id": 2, "role": "assistant", "body": f"{SCRIPT}\n\n{ANSWER}"},
}
LEGACY_COPIES = {3: 2, 6: 4, 7: 5}  # legacy id: the migrated message it copies


def message(id: int, **fields: Any) -> dict[str, Any]:
    """A row as the old code wrote it (no `parts`: SQL NULL)."""
    row = {"body": None, "thinking_content": None, **fields}
    return {"id": id, "created_at": START + timedelta(minutes=id), **row}


def chat_database(tmp_path: Path) -> str:
    """The SQLite file of the module's messages: MIGRATED inserted and migrated by body_to_parts,
    then LEGACY_COPIES inserted (parts NULL), each in its original's conversation."""
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    engine = sa.create_engine(url)
    try:
        metadata.create_all(engine, tables=[messages])
        with engine.begin() as connection:
            connection.execute(messages.insert(), [message(n, **f) for n, f in MIGRATED.items()])
        runner = Runner(url, chat_migrations.migrations)
        try:
            [result] = runner.run(["body_to_parts"])
        finally:
            runner.db.dispose()
        assert result.state is State.SUCCESS
        with engine.begin() as connection:
            copies = [message(n, **MIGRATED[of]) for n, of in LEGACY_COPIES.items()]
            connection.execute(messages.insert(), copies)
            stored = dict(connection.execute(sa.select(messages.c.id, messages.c.parts)).all())
        assert {n for n, parts in stored.items() if parts is None} == set(LEGACY_COPIES)
    finally:
        engine.dispose()
    return url


def article(page: Page, message_id: int) -> Locator:
    return page.locator(f'article.message[data-message-id="{message_id}"]')


def test_a_legacy_message_and_its_migrated_twin_render_the_same(
    dashboard: ServeDashboard, page: Page, tmp_path: Path
) -> None:
    served = dashboard(chat_database(tmp_path), APP)
    page.goto(served.address("views/messages/conversations/1"))
    expect(page.locator("article.message")).to_have_count(3)
    migrated, legacy = article(page, 2), article(page, 3)
    assert migrated.get_attribute("data-source") == "migrated"
    assert legacy.get_attribute("data-source") == "legacy"
    twin = legacy.locator(".parts").inner_html()
    assert twin == migrated.locator(".parts").inner_html()
    assert '<details class="part part-reasoning"><summary>Reasoning</summary>' in twin
    assert "<p>Here is how:</p>" in twin and "<p>Call it once.</p>" in twin
    assert legacy.locator(".parts").inner_text() == migrated.locator(".parts").inner_text()
    # The reasoning is collapsed; a click on its summary opens it (its twin stays closed).
    for shown in (migrated, legacy):
        reasoning = shown.locator("details.part-reasoning")
        expect(reasoning).to_have_count(1)
        expect(reasoning.get_by_text("Keep it short.")).to_be_hidden()
    opened = migrated.locator("details.part-reasoning")
    opened.locator("summary").click()
    expect(opened.get_by_text("Keep it short.")).to_be_visible()
    expect(opened.get_by_text("The user wants code.")).to_be_visible()
    assert opened.evaluate("details => details.open") is True
    expect(legacy.locator("details.part-reasoning").get_by_text("Keep it short.")).to_be_hidden()
    # Its text, and the code block, are shown, with no click.
    expect(migrated.locator(".part-text").get_by_text("Call it once.")).to_be_visible()


def test_html_in_a_message_is_shown_as_text(
    dashboard: ServeDashboard, page: Page, tmp_path: Path
) -> None:
    served = dashboard(chat_database(tmp_path), APP)
    page.goto(served.address("views/messages/conversations/2"))
    expect(page.locator("article.message")).to_have_count(4)
    for message_id in (4, 6):  # migrated, and its legacy copy
        expect(article(page, message_id).locator(".parts")).to_have_text(IMG)
    for message_id in (5, 7):
        parts = article(page, message_id).locator(".parts")
        expect(parts.locator("p").first).to_have_text(SCRIPT)
        # The fenced block: preformatted, its lines and its tags as they were written.
        code = parts.locator('pre.code[data-language="python"] > code.language-python')
        expect(code).to_have_count(1)
        assert code.text_content() == CODE
    shown = page.locator("main").inner_text()
    assert shown.count(IMG) == 2 and shown.count(SCRIPT) == 2
    # No element is made of a body's tags, and none of their scripts ran. (The dashboard's
    # Content-Security-Policy would also stop inline scripts: the element checks are the test.)
    expect(page.locator(".parts img, .parts b, .parts script")).to_have_count(0)
    expect(page.locator(".parts pre")).to_have_count(2)
    assert page.evaluate("typeof window.__pwned") == "undefined"


def test_the_sample_finds_migrated_messages_identical_until_one_is_edited(
    dashboard: ServeDashboard, page: Page, tmp_path: Path
) -> None:
    url = chat_database(tmp_path)
    served = dashboard(url, APP)
    page.goto(served.address("views/messages/sample"))
    total = len(MIGRATED)  # every migrated message still carries its legacy fields
    expect(page.locator("p.summary")).to_have_text(f"{total} of {total} identical")
    checks = page.locator("tr.check")
    expect(checks).to_have_count(total)
    assert sorted(int(c.get_attribute("data-message-id") or 0) for c in checks.all()) == sorted(
        MIGRATED
    )
    expect(page.locator('tr.check[data-verdict="identical"] .verdict')).to_have_text(
        ["identical"] * total
    )
    # The new code edits message 2's parts after its migration: its legacy fields say otherwise.
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql(
                """UPDATE messages SET parts = '[{"type": "text", "text": "edited"}]' """
                "WHERE id = 2"
            )
    finally:
        engine.dispose()
    page.reload()
    expect(page.locator("p.summary")).to_have_text(f"{total - 1} of {total} identical")
    edited = page.locator('tr.check[data-message-id="2"]')
    expect(edited).to_have_attribute("data-verdict", "differs")
    expect(edited.locator(".verdict")).to_have_text("differs")
    expect(edited.locator('[data-rendering="stored"] .parts')).to_have_text("edited")
    expect(edited.locator('[data-rendering="derived"] .parts')).to_contain_text("Call it once.")
    expect(page.locator('tr.check[data-verdict="differs"]')).to_have_count(1)

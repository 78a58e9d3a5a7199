"""`backfill dashboard` in a real browser (headless chromium), served as a user runs it, over a
SQLite database of the counting app (every migrated row's `counter` goes up by one):

- the progress bar and state of a run going on in another process move on the page, from the
  server-sent events, without a reload, to `success` and a full bar;
- from the page opened with the token: run (a paced run, its batch size from the migration's own
  page), cancel, run again, which resumes where the canceled run stopped and migrates every row
  exactly once;
- a dry run's before/after samples, shown on the result page, with nothing saved;
- the refusals a browser meets: no buttons on a page opened without the token, 401 for a POST
  from that page, 403 for a form another origin posts (even holding the token), nothing changed.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from playwright.sync_api import Page, expect

from apps import counting
from apps.counting import NAME, ROW_DELAY_ENV
from backfill import Runner, State
from browser.conftest import open_to_act
from support import backfill_command, cli_env, counting_url, rows
from support.serving import Dashboard

APP = "apps.counting:migrations"
ServeDashboard = Callable[..., Dashboard]
# The migration's row on a page (its error row, also marked data-migration, has neither).
STATE = f'tr[data-migration="{NAME}"] [data-field="state"]'
BAR = f'tr[data-migration="{NAME}"] [data-field="bar"]'
PROGRESS = f'tr[data-migration="{NAME}"] [data-field="progress"]'
# The event stream sends the status about once a second: a run's end shows within seconds.
WAIT_MS = 30_000

# Every value the bar takes from now on, read in the page: `window.barValues`.
RECORD_BAR = """(selector) => {
  const bar = document.querySelector(selector);
  window.barValues = [bar.value];
  new MutationObserver(() => window.barValues.push(bar.value))
    .observe(bar, {attributes: true});
}"""
# The bar's value once it is above `above` and below its end (the run still going on).
BAR_ABOVE = """([selector, above]) => {
  const bar = document.querySelector(selector);
  return bar.value > above && bar.value < bar.max ? bar.value : false;
}"""


def derived(source: str) -> str:
    """What the counting app's `derive` writes (computed here, not with its own code)."""
    return f"{source[::-1].upper()}#{len(source)}"


def items(url: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    try:
        return rows(engine, "SELECT id, source, derived, counter FROM items ORDER BY id")
    finally:
        engine.dispose()


def state_and_history(url: str) -> tuple[State, int]:
    runner = Runner(url, counting.migrations)
    try:
        return runner.status([NAME])[NAME].state, len(runner.history())
    finally:
        runner.db.dispose()


def bar(page: Page) -> tuple[int, int]:
    """The bar's value and max."""
    found = page.eval_on_selector(BAR, "bar => [bar.value, bar.max]")
    return int(found[0]), int(found[1])


def act(page: Page, action: str, **fields: str) -> None:
    """Submit the page's form of `action` (its fields filled in), as a click does."""
    form = page.locator(f'form[action="/api/migrations/{NAME}/{action}"]')
    for name, value in fields.items():
        form.locator(f'[name="{name}"]').fill(value)
    form.get_by_role("button").click()


def test_the_bar_moves_while_a_run_goes_on_in_another_process(
    dashboard: ServeDashboard, page: Page, tmp_path: Path
) -> None:
    total = 400
    url = counting_url(tmp_path, "items.db", total)
    served = dashboard(url, APP)
    page.goto(served.address())  # no token: reading is open on loopback
    expect(page.locator(STATE)).to_have_text("pending")
    expect(page.locator("#live")).to_have_text("live")  # the event stream is connected
    page.evaluate("window.notReloaded = true")
    page.evaluate(RECORD_BAR, BAR)
    # 40 batches, 0.1 s apart: several events come while it goes on.
    with (tmp_path / "run.log").open("w") as log:
        run = subprocess.Popen(
            backfill_command("run", NAME, "--batch-size", "10", "--pause", "0.1"),
            env=cli_env(BACKFILL_DATABASE_URL=url, BACKFILL_APP=APP),
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        expect(page.locator(STATE)).to_have_text("inProgress", timeout=WAIT_MS)
        first = page.wait_for_function(BAR_ABOVE, arg=[BAR, 0], timeout=WAIT_MS).json_value()
        expect(page.locator(PROGRESS)).to_have_text(re.compile(rf"^[\d,]+ / {total} \(\d+%\)$"))
        # A later event, the run still going on: the bar has moved on.
        second = page.wait_for_function(BAR_ABOVE, arg=[BAR, first], timeout=WAIT_MS).json_value()
        assert 0 < first < second < total
        expect(page.locator(STATE)).to_have_text("success", timeout=WAIT_MS)
        assert run.wait(timeout=30) == 0, (tmp_path / "run.log").read_text()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        print(f"the run's output:\n{(tmp_path / 'run.log').read_text()}")  # shown on failure
    assert bar(page) == (total, total)
    expect(page.locator(PROGRESS)).to_have_text(f"{total} / {total} (100%)")
    seen = page.evaluate("window.barValues")
    assert seen == sorted(seen) and seen[-1] == total, seen
    assert page.evaluate("window.notReloaded") is True  # the same page all along


def test_run_cancel_and_resume_from_the_page(
    dashboard: ServeDashboard, page: Page, tmp_path: Path
) -> None:
    total = 300
    url = counting_url(tmp_path, "items.db", total)
    # The runs it starts inherit its environment: 20 ms a row, 0.2 s a batch of 10, 6 s in all.
    served = dashboard(url, APP, env={ROW_DELAY_ENV: "0.02"})
    migration_page = served.address(f"migrations/{NAME}")
    open_to_act(page, served, f"migrations/{NAME}")
    answer = page.locator("p.answer")

    # Run, with the full form's batch size (the migration's own is 100: one 2 s batch).
    act(page, "run", batch_size="10")
    expect(answer).to_contain_text(f"{NAME}: running in the background")
    expect(answer).to_have_class(re.compile(r"\banswer-202\b"))
    page.get_by_role("link", name=NAME, exact=True).click()  # back to its page
    expect(page).to_have_url(migration_page)
    expect(page.locator(STATE)).to_have_text("inProgress")
    # Canceled once a batch is in, so that the run to resume has done something.
    page.wait_for_function(BAR_ABOVE, arg=[BAR, 0], timeout=WAIT_MS)

    act(page, "cancel")
    expect(answer).to_have_text(
        f"{NAME}: cancel requested; the runner stops after its current batch"
    )
    page.get_by_role("link", name=NAME, exact=True).click()
    expect(page.locator(STATE)).to_have_text("canceled", timeout=WAIT_MS)
    stopped, maximum = bar(page)
    assert 0 < stopped < total and maximum == total
    expect(page.locator(PROGRESS)).to_contain_text(f"{stopped} / {total}")

    act(page, "run", batch_size="10")
    expect(answer).to_contain_text(f"{NAME}: running in the background")
    page.get_by_role("link", name=NAME, exact=True).click()
    page.evaluate(RECORD_BAR, BAR)
    expect(page.locator(STATE)).to_have_text("success", timeout=WAIT_MS)
    # Resumed from its cursor, its counters kept: never back below where it stopped.
    seen = page.evaluate("window.barValues")
    assert seen == sorted(seen) and seen[0] >= stopped and seen[-1] == total, (stopped, seen)
    row = f'tr[data-migration="{NAME}"]'
    expect(page.locator(f'{row} [data-field="changed"]')).to_have_text(str(total))
    # (A restart would have zeroed the counters and counted the rows done before as kept.)
    expect(page.locator(f'{row} [data-field="kept"]')).to_have_text("0")

    # Every row migrated exactly once.
    migrated = items(url)
    assert [(i, d, c) for i, _s, d, c in migrated] == [(i, derived(s), 1) for i, s, *_ in migrated]
    # Its history, newest first: the two runs and the cancel, each asked from the page.
    page.reload()
    history = page.locator("table.history tbody tr")
    expect(history).to_have_count(3)
    cells = [[c.strip() for c in r.locator("td").all_inner_texts()] for r in history.all()]
    assert [(c[2], c[3]) for c in cells] == [
        ("run", "dashboard"),
        ("cancel", "dashboard"),
        ("run", "dashboard"),
    ]
    assert (cells[0][8], cells[2][8]) == ("success", "canceled")
    assert (cells[0][10], cells[2][10]) == (str(total - stopped), str(stopped))


def test_a_dry_runs_samples_are_shown_and_nothing_is_saved(
    dashboard: ServeDashboard, page: Page, tmp_path: Path
) -> None:
    url = counting_url(tmp_path, "items.db", 40)
    served = dashboard(url, APP)
    open_to_act(page, served)
    page.locator(f'tr[data-migration="{NAME}"] form[action$="/dry-run"] button').click()
    answer = page.locator("p.answer")
    expect(answer).to_have_text(
        f"{NAME}: a dry run of 1 batch(es) read 40 rows: 40 would change, 0 would be skipped, "
        "0 kept; nothing was saved"
    )
    expect(answer).to_have_class(re.compile(r"\banswer-200\b"))
    samples = page.locator("table.samples tbody tr")
    expect(samples).to_have_count(10)  # up to ten
    before = items(url)
    shown = [[c.strip() for c in r.locator("td").all_inner_texts()] for r in samples.all()]
    assert [(int(i), json.loads(b), json.loads(a)) for i, b, a in shown] == [
        (i, {"counter": 0, "derived": None}, {"counter": 1, "derived": derived(s)})
        for i, s, _d, _c in before[:10]
    ]
    assert all(d is None and c == 0 for _i, _s, d, c in before)  # nothing saved
    page.get_by_role("link", name="all migrations").click()
    expect(page.locator(STATE)).to_have_text("pending")


@contextlib.contextmanager
def another_site(html: str) -> Iterator[str]:
    """A second local HTTP server, on a port of its own (another origin), serving `html`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_without_the_token_or_from_another_origin_the_browser_is_refused(
    dashboard: ServeDashboard, page: Page, tmp_path: Path
) -> None:
    url = counting_url(tmp_path, "items.db", 40)
    served = dashboard(url, APP)
    action = served.address(f"api/migrations/{NAME}/run")

    # Opened without the token: reading only, not one button.
    for path in ("", f"migrations/{NAME}"):
        page.goto(served.address(path))
        expect(page.locator(".note").first).to_contain_text("Reading only")
        expect(page.locator("form")).to_have_count(0)
        expect(page.get_by_role("button")).to_have_count(0)
    expect(page.locator(STATE)).to_have_text("pending")
    posted = page.evaluate(
        """async (action) => {
          const answer = await fetch(action, {method: "POST",
            headers: {"content-type": "application/json"}, body: "{}"});
          return [answer.status, await answer.json()];
        }""",
        action,
    )
    assert posted[0] == 401 and "token" in posted[1]["error"], posted

    # Another origin's form, even one holding the token, posted from a browser that has the
    # cookie (the ports differ, the site is the same: SameSite lets it go; Origin does not).
    page.goto(served.address(token=True))
    expect(page.get_by_role("button", name="run", exact=True)).to_have_count(1)
    forged = (
        f'<form method="post" action="{action}">'
        f'<input type="hidden" name="token" value="{served.token}">'
        '<input type="hidden" name="batch_size" value="5">'
        "<button>win a prize</button></form>"
    )
    with another_site(forged) as site:
        page.goto(site)
        with page.expect_response(action) as answered:
            page.get_by_role("button", name="win a prize").click()
        assert answered.value.status == 403
        # It did carry the cookie: the Origin check alone refused it.
        cookie = answered.value.request.all_headers().get("cookie", "")
        assert f"backfill_token={served.token}" in cookie
        expect(page.locator("body")).to_contain_text(
            "requests from another site's pages are refused"
        )
    assert state_and_history(url) == (State.PENDING, 0)  # nothing started, nothing recorded
    page.goto(served.address())
    expect(page.locator(STATE)).to_have_text("pending")
    expect(page.locator("table.history")).to_have_count(0)

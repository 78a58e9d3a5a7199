"""Fixtures of the browser tests: one headless Debian chromium for the whole session (Playwright's
sync API), a fresh browser context and page per test, and `backfill dashboard` served as a user
runs it (`dashboard`: support.serving's serve_dashboard, interrupted after the test)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Error, Page, expect, sync_playwright

from support.serving import Dashboard, serve_dashboard

# Debian's chromium: Playwright's own download is not reachable here, nor needed (.ci/run
# installs this one).
CHROMIUM = "/usr/bin/chromium"
# The network is closed: without these, chromium waits on connections it is refused.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # we run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# How long a page's wait may last before a test fails (milliseconds).
TIMEOUT_MS = 15_000


def open_to_act(page: Page, served: Dashboard, path: str = "") -> None:
    """Open `path` of the dashboard with its token, as the command says to: the page sets its
    cookie and drops the token from its address, ready to act from its forms."""
    page.goto(served.address(path, token=True))
    expect(page).to_have_url(served.address(path))


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[Callable[..., Dashboard]]:
    """Serves a dashboard: `dashboard(database_url, app, env={...})`, in the test's tmp_path;
    each is interrupted at the end of the test. (Ask for this fixture before `page`, so the
    page, and its event stream, is closed first.)"""
    with contextlib.ExitStack() as stack:

        def serve(
            database_url: str, app: str, *, env: Mapping[str, str] | None = None
        ) -> Dashboard:
            return stack.enter_context(serve_dashboard(database_url, app, cwd=tmp_path, env=env))

        yield serve


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """One chromium for the session: starting it is the slow part, contexts are cheap."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page in a context of its own (no cookie from another test). A script error on the
    page fails the test."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    found = context.new_page()
    errors: list[Error] = []

    def failed(error: Error) -> None:  # (Playwright cannot take a builtin as a handler)
        errors.append(error)

    found.on("pageerror", failed)
    yield found
    context.close()
    assert not errors, f"the page's script failed: {errors}"

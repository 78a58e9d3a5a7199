"""`make screenshots`: the README's pictures of the dashboard and the message viewer, taken in
Debian's chromium (Playwright's Python API) while `backfill demo --dashboard` runs, mid-way,
in a scratch directory. Writes docs/screenshots/*.png; the test suite never does. (Debian's
fonts-noto-cjk and fonts-noto-color-emoji show the demo's Chinese and emoji.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import sqlalchemy as sa
from playwright.sync_api import sync_playwright

from chat_migrations.schema import messages

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "screenshots"
MESSAGES = 20_000
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def processed(address: str) -> int:
    with urllib.request.urlopen(f"{address}api/status", timeout=10) as answer:
        return int(json.load(answer)["body_to_parts"]["progress"]["processed"])


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="backfill-screenshots-") as scratch:
        demo = subprocess.Popen(
            [sys.executable, "-m", "backfill", "--database-url", f"sqlite:///{scratch}/demo.db",
             "demo", "--dashboard", "--messages", str(MESSAGES), "--port", "0", "--yes"],
            stdout=subprocess.PIPE, text=True, cwd=scratch,
        )  # fmt: skip
        try:
            assert demo.stdout is not None
            line = ""
            while " on http://" not in line:
                line = demo.stdout.readline()
                if not line:
                    sys.exit(f"backfill demo ended with {demo.wait()}")
            address = line.split(" on ")[-1].strip()
            token = demo.stdout.readline().removeprefix("token: ").strip()
            while processed(address) < MESSAGES * 0.4:  # mid-way: a bar, legacy and migrated
                time.sleep(0.2)
            shoot(address, token, half_migrated(f"sqlite:///{scratch}/demo.db"))
        finally:
            demo.send_signal(signal.SIGINT)
            demo.wait(timeout=30)


def half_migrated(url: str) -> int:
    """A conversation the run is in the middle of: legacy and migrated messages in one page."""
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        last = sa.select(sa.func.max(messages.c.id)).where(messages.c.parts.is_not(None))
        found = sa.select(messages.c.conversation_id).where(messages.c.id == last.scalar_subquery())
        conversation = int(connection.execute(found).scalar_one())
    engine.dispose()
    return conversation


def shoot(address: str, token: str, conversation: int) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{address}?token={token}")
        page.wait_for_timeout(1500)  # a few server-sent updates: rate and ETA filled in
        page.screenshot(path=OUT / "dashboard.png", full_page=True)
        page.goto(f"{address}migrations/body_to_parts")
        page.screenshot(path=OUT / "migration.png", full_page=True)
        page.goto(f"{address}views/messages/conversations/{conversation}")
        page.locator("details.part-reasoning summary").first.click()
        page.screenshot(path=OUT / "conversation.png", full_page=True)
        page.goto(f"{address}views/messages/sample?n=3")
        page.screenshot(path=OUT / "sample.png", full_page=True)
        browser.close()
    for name in ("dashboard", "migration", "conversation", "sample"):
        print(OUT / f"{name}.png")


if __name__ == "__main__":
    main()

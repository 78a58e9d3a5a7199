"""`backfill dashboard` and `backfill demo --dashboard` as a user runs them, in a process of their
own: the dashboard's /metrics parsed by prometheus-client's own parser while a run it started
goes on, its `--log-file` JSON lines (its actions, and the events of the runs it starts) parsed
and checked; the demo's page, pace, message viewer, and its run canceled when it ends."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from apps.counting import NAME, ROW_DELAY_ENV
from backfill import Runner
from backfill.cli.dashboard import DEMO_APP
from chat_migrations import migrations
from chat_migrations.generator import seed_messages
from support import cli_env, counting_url
from support.serving import serve_dashboard

ROWS = 120
APP = "apps.counting:migrations"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def state(address: str, name: str) -> Any:
    return httpx.get(f"{address}api/status", timeout=10).json()[name]


def samples(address: str) -> dict[tuple[str, str], float]:
    """/metrics, parsed by prometheus-client: (series name, migration) -> value."""
    text = httpx.get(f"{address}metrics", timeout=10).text
    return {
        (sample.name, sample.labels.get("migration", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels.get("state") or sample.value == 1  # the current state only
    }


def test_metrics_while_a_run_goes_on_and_json_lines_of_actions_and_runs(tmp_path: Path) -> None:
    url = counting_url(tmp_path, "items.db", ROWS)
    log = tmp_path / "dashboard.jsonl"
    arguments = ["dashboard", "--port", "0", "--log-file", str(log)]
    with serve_dashboard(
        url, APP, cwd=tmp_path, env={ROW_DELAY_ENV: "0.01"}, arguments=arguments
    ) as served:
        address, token = served.url, served.token
        started = httpx.post(
            f"{address}api/migrations/{NAME}/run",
            json={"batch_size": 10},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert started.status_code == 202, started.text
        wait_for(lambda: 0 < state(address, NAME)["progress"]["processed"] < ROWS, "a batch")
        during = samples(address)
        assert during[("backfill_rows_total", NAME)] == ROWS
        assert 0 < during[("backfill_rows_processed_total", NAME)] < ROWS
        wait_for(lambda: state(address, NAME)["state"] == "success", "the run's end")
        after = samples(address)
        assert after[("backfill_rows_processed_total", NAME)] == ROWS
        assert after[("backfill_rows_changed_total", NAME)] == ROWS

    assert served.process.returncode == 0
    lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    asked = [line for line in lines if line.get("logger") == "backfill" and line["event"] == "log"]
    assert [(line["level"], line["migration"]) for line in asked] == [("INFO", NAME)]
    assert asked[0]["message"].startswith(f"dashboard: run of {NAME} asked from the api: 202 ")
    # The run it started wrote its events to the same file, as `--log-format json` writes them.
    events = [line["event"] for line in lines if line.get("migration") == NAME]
    assert events[events.index("run_started")] == "run_started" and events[-1] == "run_finished"
    assert sum(line["rows_changed"] for line in lines if line["event"] == "batch") == ROWS
    [finished] = [line for line in lines if line["event"] == "run_finished"]
    assert (finished["state"], finished["exit_code"]) == ("success", 0)


def test_demo_in_the_browser_runs_at_its_pace_shows_messages_and_cancels_at_the_end(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    arguments = ["demo", "--dashboard", "--messages", "3000", "--port", "0", "--yes"]
    with serve_dashboard(url, DEMO_APP, cwd=tmp_path, arguments=arguments) as served:
        address = served.url
        page = httpx.get(address, timeout=10).text
        assert "runs at a pace a person can follow (250 rows per batch" in page
        assert 'href="/views/messages/"' in page
        wait_for(lambda: state(address, "body_to_parts")["progress"]["processed"] > 0, "a batch")
        now = state(address, "body_to_parts")
        assert now["state"] == "inProgress" and now["progress"]["processed"] < 3000
        assert now["progress"]["processed"] % 250 == 0  # the demo's batches
        conversations = httpx.get(f"{address}views/messages/", timeout=10)
        assert conversations.status_code == 200 and "data-conversation-id" in conversations.text
    assert served.process.returncode == 0  # Ctrl-C ends it, cleanly
    # Interrupted: the demo leaves nothing running; `backfill run` resumes where it stopped.
    runner = Runner(url, migrations)
    wait_for(
        lambda: str(runner.status(["body_to_parts"])["body_to_parts"].state) == "canceled", "cancel"
    )
    found = runner.status(["body_to_parts"])["body_to_parts"]
    assert 0 < found.processed < 3000
    [result] = runner.run(["body_to_parts"])
    assert str(result.state) == "success"
    with runner.db.engine.connect() as connection:
        legacy = connection.execute(sa.text("SELECT count(*) FROM messages WHERE parts IS NULL"))
        assert legacy.scalar_one() == 0
    runner.db.dispose()


def test_the_demo_refuses_a_port_in_use_before_it_replaces_any_message(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    engine = sa.create_engine(url)
    seed_messages(engine, 40)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "backfill", "--database-url", url, "demo", "--dashboard",
             "--port", str(port), "--messages", "10", "--yes"],
            capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=60,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"backfill: cannot listen on 127.0.0.1:{port}: "), done.stderr
    with engine.connect() as connection:  # the messages as they were
        assert connection.execute(sa.text("SELECT count(*) FROM messages")).scalar_one() > 10
    engine.dispose()

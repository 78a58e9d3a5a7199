"""The dashboard (backfill.dashboard) through Starlette's TestClient over a SQLite database of the
counting app (every migrated row's `counter` goes up by one): the pages and what they escape,
the reads, who may act (token, Origin, Host, the form's cookie), each action's answer, runs and
reverts started in the background and followed to their end, the event stream; and `backfill
dashboard` itself (its extra missing, a bind beyond loopback without a token, serving until
interrupted)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from apps import counting
from apps.counting import NAME
from backfill import Migrations, MigrationStatus, Runner, State
from backfill.cli import cli, main
from backfill.cli.dashboard import TOKEN_ENV, dashboard_command
from backfill.dashboard import ORIGIN_ENV, display, origin_from_env
from backfill.dashboard.app import HERE
from backfill.dashboard.auth import COOKIE
from backfill.dashboard.background import Background
from backfill.errors import ConfigError, LeaseHeld
from backfill.history import Origin
from support import cli_env, counting_url, rows
from support.clients import TestClient, dashboard_clients
from support.serving import serve_dashboard, web_libraries_imported

ROWS = 40
TOKEN = "a-token-for-tests"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
# What the header shows is given to create_app already redacted (the CLI passes redact_url's).
SHOWN_URL = "postgresql://app:***@db.example/chat"
APP = "apps.counting:migrations"
STATIC = HERE / "static"

hostile = Migrations()


@hostile.migration(table=counting.items, batch_size=10)
def derive(row: dict[str, Any]) -> None:
    """<script>alert('description')</script>"""
    raise ValueError("<img src=x onerror=alert('error')>")


@pytest.fixture
def url(tmp_path: Path) -> str:
    return counting_url(tmp_path, "items.db", ROWS)


@pytest.fixture
def runner(url: str) -> Iterator[Runner]:
    found = Runner(url, counting.migrations)
    yield found
    found.db.dispose()


@pytest.fixture
def make(url: str, tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """A TestClient of a dashboard over `url` (loopback's: reads open), `create_app`'s keyword
    arguments overridden by the call's; closed at the end of the test."""
    background = Background(url, APP, "dev", env=cli_env(), logs=tmp_path / "logs")
    with dashboard_clients(
        url,
        counting.migrations,
        token=TOKEN,
        environment="staging",
        database_display=SHOWN_URL,
        require_token_for_reads=False,
        background=background,
    ) as make_client:

        def client(registry: Migrations = counting.migrations, **overrides: Any) -> TestClient:
            return make_client(registry=registry, **overrides)

        yield client


@pytest.fixture
def client(make: Callable[..., TestClient]) -> TestClient:
    return make()


def status_json(runner: Runner) -> dict[str, Any]:
    return {name: found.to_json() for name, found in runner.status().items()}


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def items(runner: Runner) -> list[tuple[Any, ...]]:
    return rows(runner.db.engine, "SELECT id, derived, counter FROM items ORDER BY id")


# -- pages ----------------------------------------------------------------------------------------


def test_the_page_names_the_environment_and_database_and_shows_states_and_history(
    client: TestClient, runner: Runner
) -> None:
    before = client.get("/")
    assert before.status_code == 200
    assert "state-pending" in before.text and "No history yet" in before.text
    runner.run([NAME], batch_size=10)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    header = page.text.split("</header>")[0]
    assert "staging" in header and SHOWN_URL in header
    assert 'class="state state-success"' in page.text
    assert f"{ROWS} / {ROWS} (100%)" in page.text
    assert f'<progress data-field="bar" max="{ROWS}" value="{ROWS}">' in page.text
    assert '<span class="state state-success">success</span>' in page.text  # its history row
    # Opened without the token: reading only, no form carries a token.
    assert 'name="token"' not in page.text and "Reading only" in page.text
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    detail = client.get(f"/migrations/{NAME}")
    assert detail.status_code == 200
    assert "def derive(row: Row)" in detail.text  # its source, from inspect.getsource
    assert "<dd>items</dd>" in detail.text and "<dd>id</dd>" in detail.text
    assert client.get("/migrations/nope").status_code == 404
    script = client.get("/static/dashboard.js")
    assert script.status_code == 200 and "EventSource" in script.text


def test_html_in_a_description_or_an_error_is_escaped(
    make: Callable[..., TestClient], url: str
) -> None:
    runner = Runner(url, hostile)
    [result] = runner.run([NAME])
    runner.db.dispose()
    assert result.state is State.FAILED
    client = make(hostile)
    page = client.get("/").text
    assert "<img src=x" not in page
    assert "row 1, field" not in page  # a ValueError names no field
    assert "row 1: &lt;img src=x onerror=alert(&#39;error&#39;)&gt; (ValueError)" in page
    detail = client.get(f"/migrations/{NAME}").text
    assert "<script>alert" not in detail and "<img src=x" not in detail
    assert "<dd>&lt;script&gt;alert(&#39;description&#39;)&lt;/script&gt;</dd>" in detail


def test_the_script_shows_a_status_as_the_page_does() -> None:
    """dashboard.js's texts (the numbers it updates in place) are display.py's."""
    node = shutil.which("node")
    assert node is not None, "node runs the page's script here (.ci/run installs it if missing)"
    base = MigrationStatus(NAME, State.PENDING).to_json()
    statuses = [
        base,
        {
            **base,
            "state": "inProgress",
            "progress": {"processed": 1234, "total": 5000, "completed": False},
            "changed": 1200,
            "skipped_errors": 3,
            "total_is_estimate": True,
            "rows_per_second": 1523.4,
            "eta_seconds": 3725.2,
            "started_at": "2026-12-06T04:00:19Z",
            "updated_at": "2026-12-06T04:01:19Z",
            "error": {"message": "<b>", "type": "ValueError", "row_id": "a", "field": "source"},
            "workers": 2,
            "shards": [{}, {}, {}],
            "verified": {"at": "2026-12-06T04:00:19Z", "remaining": 1000, "raising": 2},
            "undo": True,
            "undo_rows": 12345,
            "revert": {
                "state": "inProgress",
                "progress": {"processed": 10, "total": 2000, "completed": False},
                "reverted": 9,
                "kept_changed_by_app": 1,
            },
        },
        {
            **base,
            "progress": {"processed": 0, "total": 0, "completed": True},
            "error": {"message": "m", "type": "T", "row_id": 7, "field": None},
            "eta_seconds": 59.6,
            "undo": False,
        },
    ]
    script = (
        "const vm = require('vm'), fs = require('fs');"
        "const window = {}, document = {addEventListener() {}, readyState: 'complete',"
        " querySelector() { return null; }};"
        "vm.runInNewContext(fs.readFileSync(process.argv[1], 'utf8'), {window, document});"
        "const statuses = JSON.parse(fs.readFileSync(0, 'utf8'));"
        "console.log(JSON.stringify(statuses.map(window.backfillDashboard.shown)));"
    )
    found = subprocess.run(
        [node, "-e", script, str(STATIC / "dashboard.js")],
        input=json.dumps(statuses),
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(found.stdout) == [display.shown(status) for status in statuses]


# -- reads ----------------------------------------------------------------------------------------


def test_the_reads_are_the_runners_status_and_history(client: TestClient, runner: Runner) -> None:
    assert client.get("/api/status").json() == status_json(runner)
    runner.run([NAME], batch_size=10)
    found = client.get("/api/status")
    assert found.headers["content-type"] == "application/json"
    assert found.json() == status_json(runner)
    history = client.get("/api/history").json()
    assert history == {"runs": [entry.to_json() for entry in runner.history(limit=20)]}
    assert client.get(f"/api/history?migration={NAME}&limit=1").json()["runs"][0]["kind"] == "run"
    assert client.get("/api/history?migration=nope").status_code == 404
    assert client.get("/api/history?limit=0").status_code == 400


def test_the_event_stream_sends_the_status_json(
    client: TestClient, make: Callable[..., TestClient], runner: Runner
) -> None:
    with client.stream("GET", "/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        first = next(line for line in stream.iter_lines() if line.startswith("data: "))
    assert json.loads(first.removeprefix("data: ")) == status_json(runner)
    # The test hook: a stream that ends after N events.
    limited = make(events_limit=2, events_interval=0.01)
    text = limited.get("/events").text
    assert [line.startswith("data: {") for line in text.splitlines() if line] == [True, True]


# -- who may act ----------------------------------------------------------------------------------


def test_an_action_needs_the_token_and_this_servers_own_origin(
    client: TestClient, runner: Runner
) -> None:
    path = f"/api/migrations/{NAME}/run"
    missing = client.post(path, json={})
    assert missing.status_code == 401 and "token" in missing.json()["error"]
    wrong = client.post(path, json={}, headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    foreign = client.post(path, json={}, headers={**BEARER, "Origin": "http://evil.example"})
    assert foreign.status_code == 403 and "another site" in foreign.json()["error"]
    # A form's token without the SameSite cookie is not enough.
    form = client.post(path, data={"token": TOKEN})
    assert form.status_code == 401
    assert runner.history() == [] and runner.status()[NAME].state is State.PENDING
    own = client.post(
        f"/api/migrations/{NAME}/dry-run",
        json={},
        headers={**BEARER, "Origin": "http://testserver"},
    )
    assert own.status_code == 200


def test_reads_need_the_token_beyond_loopback_and_a_page_opened_with_it_can_act(
    make: Callable[..., TestClient], runner: Runner
) -> None:
    client = make(require_token_for_reads=True)
    for path in ("/", f"/migrations/{NAME}", "/api/status", "/api/history", "/events"):
        assert client.get(path).status_code == 401, path
    assert client.get("/static/dashboard.js").status_code == 401
    assert client.get("/api/status", headers=BEARER).status_code == 200
    assert client.get("/?token=wrong").status_code == 401
    opened = client.get(f"/?token={TOKEN}", follow_redirects=False)
    assert opened.status_code == 303 and opened.headers["location"] == "/"
    cookie = opened.headers["set-cookie"].lower()
    assert "backfill_token=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    page = client.get("/")  # the cookie is sent now
    assert page.status_code == 200
    assert f'<input type="hidden" name="token" value="{TOKEN}">' in page.text
    dry = client.post(f"/api/migrations/{NAME}/dry-run", data={"token": TOKEN, "batch_size": "5"})
    assert dry.status_code == 200 and dry.headers["content-type"].startswith("text/html")
    assert "5 would change" in dry.text
    forged = client.post(f"/api/migrations/{NAME}/dry-run", data={"token": "guess"})
    assert forged.status_code == 401
    assert runner.history() == []


def test_on_loopback_a_host_that_is_not_a_loopback_name_is_refused(
    make: Callable[..., TestClient],
) -> None:
    client = make(hosts=("127.0.0.1", "localhost", "::1"), base_url="http://127.0.0.1:8765")
    assert client.get("/api/status").status_code == 200
    rebound = client.get("/api/status", headers={"Host": "evil.example:8765"})
    assert rebound.status_code == 400


# -- actions --------------------------------------------------------------------------------------


def test_run_starts_a_detached_run_that_migrates_every_row_once(
    client: TestClient, runner: Runner
) -> None:
    answer = client.post(f"/api/migrations/{NAME}/run", json={"batch_size": 10}, headers=BEARER)
    assert answer.status_code == 202, answer.text
    assert answer.json()[NAME]["state"] in ("inProgress", "success")
    wait_for(lambda: runner.status()[NAME].state is State.SUCCESS, "the detached run")
    assert items(runner) == [(i, counting.transform(s), 1) for i, s in sources(runner)]
    [entry] = runner.history()
    assert entry.pid != os.getpid() and entry.exit_code == 0
    assert entry.arguments is not None and "--batch-size" in entry.arguments
    assert entry.arguments[entry.arguments.index("--batch-size") + 1] == "10"
    # Nothing left to do: the child says so and ends without a claim.
    again = client.post(f"/api/migrations/{NAME}/run", headers=BEARER)
    assert again.status_code == 200 and again.json()[NAME]["state"] == "success"


def sources(runner: Runner) -> list[tuple[int, str]]:
    return [(r[0], str(r[1])) for r in rows(runner.db.engine, "SELECT id, source FROM items")]


def test_a_detached_runs_history_row_says_whether_the_api_or_a_page_asked(
    client: TestClient, runner: Runner
) -> None:
    answer = client.post(f"/api/migrations/{NAME}/run", headers=BEARER)
    assert answer.status_code == 202
    wait_for(lambda: runner.status()[NAME].state is State.SUCCESS, "the run")
    client.cookies.set(COOKIE, TOKEN)  # as a page opened with the token has it
    form = client.post(f"/api/migrations/{NAME}/run", data={"token": TOKEN, "restart": "true"})
    assert form.status_code == 202, form.text
    wait_for(lambda: runner.history()[0].finished_at is not None, "the second run")
    assert [entry.origin for entry in runner.history()] == [Origin.DASHBOARD, Origin.API]


def test_a_child_is_told_its_origin_and_the_url_through_its_environment(url: str) -> None:
    background = Background(url, APP, "dev")
    env = background.environment_of(Origin.DASHBOARD)
    assert env[ORIGIN_ENV] == "dashboard" and env["BACKFILL_DATABASE_URL"] == url
    assert env["BACKFILL_APP"] == APP
    command = background.command("run", NAME, ["--batch-size", "5"])
    assert url not in " ".join(command) and command[-1] == "--yes"
    assert origin_from_env(Origin.CLI, {}) is Origin.CLI
    assert origin_from_env(Origin.CLI, {ORIGIN_ENV: "api"}) is Origin.API
    with pytest.raises(ConfigError, match="must be cli, api or dashboard"):
        origin_from_env(Origin.CLI, {ORIGIN_ENV: "worker"})


def test_a_run_with_undo_then_revert_both_detached_put_every_row_back(
    client: TestClient, runner: Runner
) -> None:
    run = client.post(
        f"/api/migrations/{NAME}/run", json={"batch_size": 10, "undo": True}, headers=BEARER
    )
    assert run.status_code == 202, run.text
    wait_for(lambda: runner.status()[NAME].state is State.SUCCESS, "the run")
    assert runner.status()[NAME].undo_rows > 0
    revert = client.post(f"/api/migrations/{NAME}/revert", json={"batch_size": 7}, headers=BEARER)
    assert revert.status_code == 202, revert.text
    # (Its row is closed when it ends: while it goes on, the history reads it `interrupted`.)
    wait_for(lambda: runner.history()[0].finished_at is not None, "the revert")
    assert runner.history()[0].kind == "revert" and runner.history()[0].outcome is State.SUCCESS
    assert runner.status()[NAME].state is State.PENDING
    assert items(runner) == [(i, None, 0) for i in range(1, ROWS + 1)]


def test_a_dry_run_answers_its_samples_and_saves_nothing(
    client: TestClient, runner: Runner
) -> None:
    answer = client.post(f"/api/migrations/{NAME}/dry-run", json={"batch_size": 5}, headers=BEARER)
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert (report["batches"], report["rows"], report["would_change"]) == (1, 5, 5)
    assert [s["row_id"] for s in report["samples"]] == [1, 2, 3, 4, 5]
    assert report["samples"][0]["before"]["derived"] is None
    assert report["samples"][0]["after"]["counter"] == 1
    assert items(runner) == [(i, None, 0) for i in range(1, ROWS + 1)]
    assert not sa.inspect(runner.db.engine).has_table("_migrations")  # not even its tables


def test_cancel_without_a_live_run_is_refused(client: TestClient) -> None:
    answer = client.post(f"/api/migrations/{NAME}/cancel", headers=BEARER)
    assert answer.status_code == 409
    assert answer.json() == {"error": f"{NAME}: no live run; nothing changed"}


def test_a_run_while_a_live_runner_holds_the_lease_is_409_with_the_sentence(
    client: TestClient, runner: Runner
) -> None:
    runner.run([NAME], batch_size=10)
    with runner.db.engine.begin() as conn:  # a runner on another host, its heartbeat fresh
        conn.execute(
            sa.text(
                "UPDATE _migrations SET state = 'inProgress', runner_host = 'elsewhere', "
                "runner_pid = 4242, heartbeat_at = :now WHERE name = :name"
            ),
            {"now": time.time(), "name": NAME},
        )
    answer = client.post(f"/api/migrations/{NAME}/run", json={"restart": True}, headers=BEARER)
    assert answer.status_code == 409, answer.text
    assert answer.json() == {"error": str(LeaseHeld(NAME, "elsewhere", 4242))}
    # That live run can be asked to stop: accepted.
    cancel = client.post(f"/api/migrations/{NAME}/cancel", headers=BEARER)
    assert cancel.status_code == 202 and cancel.json()[NAME]["state"] == "inProgress"
    assert runner.history()[0].kind == "cancel" and runner.history()[0].origin is Origin.API


def test_in_prod_a_run_without_a_recent_backup_is_refused_unless_asked_not_to_check(
    make: Callable[..., TestClient],
) -> None:
    client = make(environment="prod", background=None)
    refused = client.post(f"/api/migrations/{NAME}/run", headers=BEARER)
    assert refused.status_code == 409
    assert refused.json()["error"] == (
        f"{NAME}: no backup of its tables in the last 24 hours (never backed up): take one "
        f"with `backfill backup {NAME}`, or ask again with no_backup_check"
    )
    # Not checked when asked: then this dashboard (no background) cannot start it.
    skipped = client.post(
        f"/api/migrations/{NAME}/run", json={"no_backup_check": True}, headers=BEARER
    )
    assert skipped.json() == {"error": "this dashboard starts no runs in the background"}
    assert '<body class="production">' in client.get("/").text


def test_later_actions_unknown_names_and_bad_bodies(client: TestClient) -> None:
    def post(path: str, **kwargs: Any) -> httpx.Response:
        return client.post(path, headers={**BEARER, **kwargs.pop("headers", {})}, **kwargs)

    for action in ("tune", "hold", "release"):
        later = post(f"/api/migrations/{NAME}/{action}")
        assert later.status_code == 409
        assert later.json()["error"].startswith(f"{action} comes with a later version")
    assert post(f"/api/migrations/{NAME}/explode").status_code == 404
    unknown = post("/api/migrations/nope/run")
    assert unknown.status_code == 404 and "unknown migration 'nope'" in unknown.json()["error"]
    path = f"/api/migrations/{NAME}/run"
    assert post(path, content=b"{not json").json() == {"error": "the body is not JSON"}
    for body, said in (
        ([], "the body must be a JSON object of options"),
        ({"batch_size": "many"}, "batch_size must be a whole number of at least 1"),
        ({"batch_size": 0}, "batch_size must be a whole number of at least 1"),
        ({"on_error": "ignore"}, "on_error must be fail or skip"),
        ({"workers": 4}, "run takes no option 'workers'"),
    ):
        bad = post(path, json=body)
        assert bad.status_code == 400 and bad.json()["error"].startswith(said), body


# -- the command ----------------------------------------------------------------------------------


def command(*args: str) -> int:
    """`backfill ARGS` in this process (the dashboard command added if the CLI lacks it)."""
    if "dashboard" not in cli.commands:
        cli.add_command(dashboard_command)
    with pytest.raises(SystemExit) as ended:
        main(list(args))
    return int(ended.value.code or 0)


def test_without_the_extra_the_command_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert command("dashboard", "--database-url", url, "--app", APP) == 2
    assert "pip install 'backfill[dashboard]'" in capsys.readouterr().err


def test_beyond_loopback_the_command_needs_a_token_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert command("dashboard", "--host", "0.0.0.0", "--database-url", url, "--app", APP) == 2
    assert f"set {TOKEN_ENV}" in capsys.readouterr().err


def test_the_command_serves_until_interrupted_and_backfill_imports_no_web_library(
    url: str, tmp_path: Path
) -> None:
    modules = ("backfill", "backfill.cli", "backfill.cli.dashboard", "backfill.dashboard")
    assert web_libraries_imported(*modules) == []
    with serve_dashboard(url, APP, cwd=tmp_path) as served:
        address, token = served.url, served.token
        assert httpx.get(f"{address}api/status", timeout=10).json()[NAME]["state"] == "pending"
        with httpx.stream("GET", f"{address}events", timeout=10) as events:
            first = next(line for line in events.iter_lines() if line.startswith("data: "))
        assert json.loads(first.removeprefix("data: "))[NAME]["state"] == "pending"
        refused = httpx.post(f"{address}api/migrations/{NAME}/dry-run", json={}, timeout=10)
        assert refused.status_code == 401
        dry = httpx.post(
            f"{address}api/migrations/{NAME}/dry-run",
            json={"batch_size": 3},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert dry.status_code == 200 and dry.json()["rows"] == 3
    assert served.process.returncode == 0  # interrupted (SIGINT): a clean end


def test_a_migrations_page_shows_its_shards_and_its_latest_skipped_rows(
    client: TestClient, runner: Runner
) -> None:
    with runner.db.engine.begin() as connection:
        connection.execute(sa.text("UPDATE items SET source = 'bad:<b>x</b>' WHERE id = 7"))
    before = client.get(f"/migrations/{NAME}").text
    assert "<h2>Shards</h2>" not in before and "Skipped rows" not in before
    runner.begin(NAME, 2)
    assert runner.work(NAME, batch_size=5, on_error="skip").state is State.SUCCESS
    planned = runner.status([NAME])[NAME].shards
    assert planned  # (40 rows make one shard)
    page = client.get(f"/migrations/{NAME}").text
    shards = page.split("<h2>Shards</h2>")[1].split("</table>")[0]
    assert shards.count("<tr data-shard=") == len(planned)
    assert shards.count('<span class="state state-done">done</span>') == len(planned)
    assert "<td>(null, null]</td>" in shards  # the whole table's range
    skipped = page.split("Skipped rows (the latest 1)</h2>")[1].split("</table>")[0]
    assert "<td>7</td><td>source</td>" in skipped and "BadValue" in skipped
    assert "<b>" not in skipped  # the row's text is escaped where it is shown

"""Runs in the background, as users start and follow them: `backfill run --detach` returns once
the run has claimed the migration (a refusal comes back at once, with its exit code) and the run
outlives the shell that started it; `backfill wait` follows it and exits with its stored outcome.

The app is apps.counting's: every migrated row's `counter` goes up by one, so a row done twice
shows. A pause between batches makes a run last a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from harness import NAME, Harness, expected_derived, wait_for

from backfill.types import process_alive
from support import backfill_command, cli_env

ROWS = 300
# 15 batches, 0.2 s apart: a run of about three seconds, long enough to be followed, canceled,
# killed or refused while it goes on.
SLOW = ("--batch-size", "20", "--pause", "0.2")
QUICK = ("--batch-size", "50")


@pytest.fixture
def h(tmp_path: Path, sqlite_url: str) -> Iterator[Harness]:
    harness = Harness(tmp_path, sqlite_url)
    yield harness
    harness.cleanup()


@pytest.fixture
def children() -> Iterator[list[int]]:
    """The pids of detached runs a test started; any still running at its end is killed (they
    are not this process's children: nothing else would stop them)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if process_alive(pid) and b"backfill" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)


def detach(h: Harness, children: list[int], *args: str) -> dict[str, Any]:
    """`backfill run derive --detach --json ARGS`: the document it printed, once the run has
    claimed the migration."""
    started = h.cli("run", NAME, "--detach", "--json", *args)
    assert started.returncode == 0, started.stdout + started.stderr
    document = json.loads(started.stdout)
    children.append(document["pid"])
    return document


def wait(h: Harness, *args: str) -> Any:
    return h.cli("wait", NAME, *args, timeout=60)


def assert_every_row_once(h: Harness, sources: dict[int, str]) -> None:
    rows = h.items()
    assert [r[0] for r in rows] == sorted(sources)
    wrong = [r for r in rows if r[2] != expected_derived(sources[r[0]]) or r[3] != 1]
    assert not wrong, f"{len(wrong)} rows wrong, e.g. {wrong[:5]}"


def test_a_detached_run_outlives_the_shell_that_started_it(h, children):
    """Typed at a terminal; then the terminal goes away: its shell is hung up and killed. The
    run goes on in its own session and finishes every row."""
    sources = h.seed(ROWS)
    shell = pexpect.spawn(
        "bash",
        ["--norc", "--noprofile"],
        cwd=str(h.tmp_path),
        env=cli_env(PS1="$ "),
        encoding="utf-8",
        timeout=30,
        dimensions=(24, 400),
    )
    try:
        command = backfill_command("run", NAME, "--detach", *SLOW, "--app", h.app)
        shell.sendline(f"{shlex.join(command)} --database-url {shlex.quote(h.url)}")
        shell.expect(r"running in the background \(pid (\d+), run (\d+)\)")
        pid = int(shell.match.group(1))
        children.append(pid)
        assert os.getsid(pid) == pid != os.getsid(shell.pid)  # a session of its own
        # The terminal goes away: its process group is hung up, the pty closed, the shell
        # killed (close(force=True) ends with SIGKILL).
        os.killpg(shell.pid, signal.SIGHUP)
        shell.close(force=True)
    finally:
        if shell.isalive():
            shell.terminate(force=True)
    time.sleep(0.3)
    assert process_alive(pid), "the detached run died with its shell"
    waited = wait(h)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert f"{NAME}: run " in waited.stdout and "ended success (exit 0)" in waited.stdout
    assert_every_row_once(h, sources)


@pytest.mark.parametrize("server", ["sqlite_url", "postgres_url"])
def test_detach_returns_at_the_claim_and_wait_follows_the_run_to_success(
    tmp_path, request, children, server
):
    url = request.getfixturevalue(server)
    h = Harness(tmp_path, url)
    try:
        sources = h.seed(ROWS)
        started = detach(h, children, *SLOW)
        pid = started["pid"]
        # Nothing on the child's command line names the database (a password would show in ps).
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert url not in cmdline and "--database-url" not in cmdline
        assert "--detach" not in cmdline and "--yes" in cmdline
        assert set(started) == {"pid", "log", "run_id"}
        assert isinstance(started["run_id"], int)
        # The run had claimed the migration when the command returned.
        assert h.record()["run_id"] == started["run_id"]
        log = Path(started["log"])
        assert log.parent == tmp_path / "backfill-logs"
        assert re.fullmatch(rf"{NAME}-\d{{8}}T\d{{6}}Z\.log", log.name), log.name

        waited = wait(h, "--json")
        assert waited.returncode == 0, waited.stdout + waited.stderr
        assert json.loads(waited.stdout) == {
            NAME: {"run_id": started["run_id"], "outcome": "success", "exit_code": 0}
        }
        assert_every_row_once(h, sources)
        assert f"{NAME}: success — {ROWS} processed" in log.read_text()
    finally:
        h.cleanup()


def test_wait_exits_1_when_a_row_fails(h, children):
    h.seed(ROWS)
    h.execute("UPDATE items SET source = 'bad:x' WHERE id = 150")
    started = detach(h, children, *QUICK)
    waited = wait(h)
    assert waited.returncode == 1, waited.stdout + waited.stderr
    assert "ended failed (exit 1)" in waited.stdout
    assert "row 150, field 'source'" in waited.stderr
    assert h.record()["run_id"] == started["run_id"]


def test_wait_exits_3_after_a_cancel(h, children):
    h.seed(ROWS)
    started = detach(h, children, *SLOW)
    canceled = h.cli("cancel", NAME)
    assert canceled.returncode == 0 and "cancel requested" in canceled.stdout, canceled.stdout
    waited = wait(h, "--json")
    assert waited.returncode == 3, waited.stdout + waited.stderr
    assert json.loads(waited.stdout) == {
        NAME: {"run_id": started["run_id"], "outcome": "canceled", "exit_code": 3}
    }


def test_wait_exits_6_when_the_detached_run_is_killed(h, children):
    h.seed(ROWS)
    started = detach(h, children, *SLOW)
    wait_for(lambda: (h.record() or {}).get("processed", 0) > 0, "a batch to commit")
    os.kill(started["pid"], signal.SIGKILL)
    waited = wait(h, "--json")
    assert waited.returncode == 6, waited.stdout + waited.stderr
    assert json.loads(waited.stdout) == {
        NAME: {"run_id": started["run_id"], "outcome": "interrupted", "exit_code": 6}
    }


def test_wait_exits_5_when_its_timeout_passes_first_and_shows_progress(h, children):
    h.seed(ROWS)
    detach(h, children, *SLOW)
    before = time.monotonic()
    waited = wait(h, "--timeout", "0.5")
    assert time.monotonic() - before < 10
    assert waited.returncode == 5, waited.stdout + waited.stderr
    assert re.search(rf"^{NAME}: inProgress [\d,]+ / {ROWS} rows \(\d+%\)$", waited.stdout, re.M)
    assert "still waiting for derive" in waited.stderr and "the run goes on" in waited.stderr
    assert h.record()["state"] == "inProgress"  # the run went on


def test_refusals_come_back_at_once_with_their_exit_code(h, children):
    nothing = wait(h)
    assert nothing.returncode == 2 and "derive has no run to wait for" in nothing.stderr

    h.seed(ROWS)
    first = detach(h, children, *SLOW)
    before = time.monotonic()
    second = h.cli("run", NAME, "--detach", *SLOW)
    assert time.monotonic() - before < 10
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"being run by a live runner (host {os.uname().nodename}" in second.stderr
    assert f"pid {first['pid']})" in second.stderr
    assert "Traceback" not in second.stderr

    dry = h.cli("run", NAME, "--detach", "--dry-run")
    assert dry.returncode == 2 and "--detach and --dry-run do not go together" in dry.stderr

    assert wait(h).returncode == 0
    done = h.cli("run", NAME, "--detach")
    assert done.returncode == 0 and "already succeeded" in done.stdout, done.stdout + done.stderr


def test_a_closed_gate_is_refused_at_once(cli, tmp_path):
    seeded = cli("demo", "--messages", "20", "--seed-only", "--yes")
    assert seeded.returncode == 0, seeded.stderr
    gated = cli("run", "cleanup_legacy_fields", "--detach", "--log", "logs/cleanup.log")
    assert gated.returncode == 2, gated.stdout + gated.stderr
    assert "body_to_parts" in gated.stderr
    assert "body_to_parts" in (tmp_path / "logs" / "cleanup.log").read_text()


def test_run_with_workers_detached_reports_the_claim_of_its_begin(tmp_path, postgres_url, children):
    h = Harness(tmp_path, postgres_url)
    try:
        sources = h.seed(1000)
        started = detach(h, children, "--workers", "2", *QUICK)
        assert h.record()["run_id"] == started["run_id"]
        waited = wait(h, "--json")
        assert waited.returncode == 0, waited.stdout + waited.stderr
        assert json.loads(waited.stdout)[NAME]["run_id"] == started["run_id"]
        assert_every_row_once(h, sources)
        assert "2 workers started" in Path(started["log"]).read_text()
    finally:
        h.cleanup()

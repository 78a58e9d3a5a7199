"""scripts/production-migration.sh: the runbook over backfill's commands (target, status and
count; in prod the checklist and the environment's name typed; backup, dry run, run with an undo
log, verify and status), driven at a terminal (pexpect), by a pipe, and with no terminal."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import sqlalchemy as sa

from backfill import Runner, State
from support import ROOT, backfill_command, cli_env, rows

SCRIPT = ROOT / "scripts" / "production-migration.sh"
MESSAGES = 1200
CHECKLIST = 5  # the runbook's pre-production checklist, one question each
QUESTION = r"\[y/N\] "
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _env() -> dict[str, str]:
    return cli_env(BACKFILL_BIN=str(Path(sys.executable).parent / "backfill"))


class Terminal:
    """The script at a terminal (a pty); `output` is everything it printed, colours removed."""

    def __init__(self, url: str, *args: str, cwd: Path) -> None:
        self.log = io.StringIO()
        self.child = pexpect.spawn(
            "bash",
            [str(SCRIPT), *args, "--database-url", url],
            env=_env(),
            cwd=str(cwd),
            encoding="utf-8",
            timeout=60,
            dimensions=(50, 200),
        )
        self.child.logfile_read = self.log

    def answer(self, prompt: str, reply: str) -> None:
        self.child.expect(prompt)
        self.child.sendline(reply)

    def checklist(self, replies: list[str]) -> None:
        for reply in replies:
            self.answer(QUESTION, reply)

    def finish(self) -> int:
        self.child.expect(pexpect.EOF)
        self.child.close()
        assert self.child.exitstatus is not None, self.output
        return self.child.exitstatus

    @property
    def output(self) -> str:
        return ANSI.sub("", self.log.getvalue()).replace("\r", "")


def _pipe(url: str, *args: str, answers: str | None, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The script with its answers from a pipe (or, with `answers` None, no stdin at all)."""
    return subprocess.run(
        ["bash", str(SCRIPT), *args, "--database-url", url],
        input=answers,
        stdin=subprocess.DEVNULL if answers is None else None,
        capture_output=True,
        text=True,
        env=_env(),
        cwd=cwd,
        timeout=60,
    )


@pytest.fixture(scope="module")
def seeded_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One database seeded by `backfill demo --seed-only` for the module; each test copies it."""
    path = tmp_path_factory.mktemp("seed") / "chat.db"
    seeded = subprocess.run(
        backfill_command(
            *f"demo --messages {MESSAGES} --seed-only --yes".split(),
            "--database-url",
            f"sqlite:///{path}",
        ),
        capture_output=True,
        text=True,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert seeded.returncode == 0, seeded.stderr
    return path


@pytest.fixture
def seeded(seeded_file: Path, sqlite_url: str) -> str:
    """The test's database (`sqlite_url`), seeded with MESSAGES legacy messages."""
    shutil.copyfile(seeded_file, sa.make_url(sqlite_url).database)
    return sqlite_url


def _status(cli) -> dict:
    return json.loads(cli("status", "--json").stdout)["body_to_parts"]


def _assert_unchanged(runner: Runner, tmp_path: Path) -> None:
    """Nothing changed: the migration pending and never run, its rows untouched, no backup."""
    status = runner.status(["body_to_parts"])["body_to_parts"]
    assert status.state is State.PENDING and status.processed == 0
    assert status.undo_rows == 0 and status.backup is None
    assert rows(runner.db.engine, "SELECT count(*) FROM messages WHERE parts IS NULL") == [
        (MESSAGES,)
    ]
    assert not (tmp_path / "backfill-backups").exists()


def _assert_migrated(cli) -> dict:
    status = _status(cli)
    assert status["state"] == "success" and status["progress"]["processed"] == MESSAGES
    assert status["undo"] is True and status["undo_rows"] > 0  # run with --undo
    assert status["verified"] is not None and status["verified"]["remaining"] == 0
    return status


def _backups(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "backfill-backups").glob("*/manifest.json"))


def test_prod_yes_at_every_step_backs_up_migrates_and_verifies(cli, seeded, tmp_path):
    term = Terminal(seeded, "--prod", cwd=tmp_path)
    term.checklist(["y"] * CHECKLIST)
    term.answer(r"Type the environment's name \(prod\) to go on: ", "prod")
    term.answer(r"Back up the tables body_to_parts changes now.*" + QUESTION, "y")
    term.answer(r"Run body_to_parts now on prod, with an undo log\? " + QUESTION, "y")
    code = term.finish()
    out = term.output
    assert code == 0, out
    assert f"Database:    {seeded}" in out  # the target (no password to hide here)
    assert "body_to_parts: 1,200 rows left to change" in out  # count, before anything
    assert "Nothing was saved" in out  # the dry run
    assert "1200/1200" in out  # the run's live progress, at a terminal
    assert (
        out.index("backed up messages")
        < out.index("Nothing was saved")
        < out.index("body_to_parts: success")
    )
    assert "body_to_parts: 0 rows left, 0 raising" in out  # verify
    assert "backfill revert body_to_parts --prod" in out
    assert _assert_migrated(cli)["backup"] is not None
    assert len(_backups(tmp_path)) == 1


def test_prod_backup_declined_answers_backfills_own_question(cli, seeded, tmp_path):
    """Declining the backup is the answer to `run`'s "no backup in 24 hours" question: the script
    passes --no-backup-check, so backfill does not ask it again (a prompt would time out here)."""
    term = Terminal(seeded, "--prod", cwd=tmp_path)
    term.checklist(["y"] * CHECKLIST)
    term.answer("to go on: ", "prod")
    term.answer(r"Back up the tables.*" + QUESTION, "n")
    term.answer(r"with an undo log\? " + QUESTION, "y")
    code = term.finish()
    assert code == 0, term.output
    assert "--no-backup-check" in term.output and "Run anyway?" not in term.output
    _assert_migrated(cli)
    assert not (tmp_path / "backfill-backups").exists()


@pytest.mark.parametrize("refused", range(CHECKLIST))
def test_prod_no_at_a_checklist_step_changes_nothing(seeded, runner, tmp_path, refused):
    term = Terminal(seeded, "--prod", cwd=tmp_path)
    term.checklist(["y"] * refused + ["n"])
    code = term.finish()
    assert code == 2, term.output
    assert "finish the checklist first. Nothing was changed." in term.output
    assert "to go on" not in term.output and "Back up" not in term.output
    _assert_unchanged(runner, tmp_path)


def test_prod_wrong_environment_name_changes_nothing(seeded, runner, tmp_path):
    term = Terminal(seeded, "--prod", cwd=tmp_path)
    term.checklist(["y"] * CHECKLIST)
    term.answer("to go on: ", "production")
    code = term.finish()
    assert code == 2, term.output
    assert "'production' is not 'prod'. Nothing was changed." in term.output
    assert "Back up" not in term.output
    _assert_unchanged(runner, tmp_path)


def test_prod_without_a_terminal_refuses_before_anything(seeded, runner, tmp_path):
    refused = _pipe(seeded, "--prod", answers=None, cwd=tmp_path)
    assert refused.returncode == 2
    assert "pass --yes" in refused.stderr and "terminal" in refused.stderr
    assert refused.stdout == ""  # not even the status: it stops first
    _assert_unchanged(runner, tmp_path)


def test_prod_yes_without_a_terminal_answers_everything_and_detached_run_is_waited_for(
    cli, seeded, tmp_path
):
    """A deploy script's use: no terminal, --yes (every answer printed), --detach (the run in the
    background, followed by `backfill wait`, whose exit code the script keeps)."""
    done = _pipe(seeded, "--prod", "--yes", "--detach", answers=None, cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    answered = [line for line in done.stdout.splitlines() if line.endswith("[y/N] yes (--yes)")]
    assert len(answered) == CHECKLIST + 2  # the checklist, the backup, the run
    assert "Type the environment's name (prod) to go on: prod (--yes)" in done.stdout
    assert "running in the background" in out and "ended success (exit 0)" in out
    assert "body_to_parts: 0 rows left, 0 raising" in done.stdout
    _assert_migrated(cli)
    assert len(_backups(tmp_path)) == 1
    runs = json.loads(cli("history", "--json").stdout)["runs"]
    assert [(r["kind"], r["outcome"], r["backup"] is not None) for r in runs] == [
        ("run", "success", True)
    ]
    assert list((tmp_path / "backfill-logs").glob("body_to_parts-*.log"))


def test_dev_reads_answers_from_a_pipe(cli, seeded, tmp_path):
    done = _pipe(seeded, answers="n\ny\n", cwd=tmp_path)  # no backup; run
    assert done.returncode == 0, done.stdout + done.stderr
    assert "checklist" not in done.stdout and "to go on" not in done.stdout  # prod only
    assert "Environment: dev" in done.stdout and "Nothing was saved" in done.stdout
    assert "body_to_parts: 0 rows left, 0 raising" in done.stdout
    assert "cleanup_legacy_fields\n" in done.stdout  # the hint, without --prod
    _assert_migrated(cli)


def test_dev_declining_the_run_keeps_the_data(seeded, runner, tmp_path):
    declined = _pipe(seeded, answers="n\nn\n", cwd=tmp_path)
    assert declined.returncode == 2 and "Not run. Nothing was changed." in declined.stdout
    assert "Nothing was saved" in declined.stdout  # the dry run came before the question
    _assert_unchanged(runner, tmp_path)


def test_a_failing_command_stops_with_its_code_and_no_password_is_printed(tmp_path):
    url = "postgresql+psycopg://app:s3cret-pw@127.0.0.1:1/chat"  # nothing listens on port 1
    failed = _pipe(url, answers="", cwd=tmp_path)
    out = failed.stdout + failed.stderr
    assert "Database:    postgresql+psycopg://app:***@127.0.0.1:1/chat" in out
    assert "s3cret-pw" not in out
    assert failed.returncode == 4 and "`backfill status` failed (exit 4)" in out

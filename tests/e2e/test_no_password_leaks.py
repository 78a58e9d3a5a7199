"""A database password reaches nothing backfill prints, writes or stores: the flagship app's
commands, run as a user runs them against PostgreSQL and MariaDB URLs with a password (given as
`--database-url URL`, or in `BACKFILL_DATABASE_URL`), successes, refusals and errors alike.

Every stdout and stderr is collected, with the events file, the detached run's log, the backup's
manifest and file names, `history --json`, every column of backfill's own tables (read with SQL),
the command lines of the detached run and of the workers (read from /proc while they run; their
environment legitimately holds the URL) and what the confirmation prompts show at a terminal;
then the password is looked for in each. The URL shown instead (`user:***@host`) is asserted
where the database is named, so the test proves those fields are there.

PostgreSQL here trusts local connections, so any password is accepted; on MariaDB the test
creates a user of its own with the password (and a wrong password is refused by the server: its
error text must not hold that one either).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from backfill.types import process_alive
from support import backfill_command, cli_env

SECRET = "pw-9f3Kq7-leak"
# Given where the server refuses it (MariaDB: a wrong password); looked for on its own.
WRONG = "wr0ng-Hd52x-leak"
NAME = "body_to_parts"
ROWS = 500


@pytest.fixture
def server_url(request: pytest.FixtureRequest) -> str:
    """A fresh database (no password: the servers' admin user) on PostgreSQL or MariaDB."""
    fixture = "postgres_url" if request.param == "postgresql" else "mariadb_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def secret_url(server_url: str) -> Iterator[sa.URL]:
    """The database's URL with SECRET as its password: on MariaDB, a user of the test's own."""
    url = sa.make_url(server_url)
    if url.get_backend_name() == "postgresql":
        yield url.set(password=SECRET)  # trusted: any password is accepted
        return
    user = f"u{url.database[-10:]}"
    admin = sa.create_engine(url, poolclass=NullPool)
    # sa.text, not exec_driver_sql: pymysql reads the `%` of a host as a format.
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{SECRET}'"))
        conn.execute(sa.text(f"GRANT ALL ON `{url.database}`.* TO '{user}'@'%'"))
    try:
        yield url.set(username=user, password=SECRET)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP USER IF EXISTS '{user}'@'%'"))
        admin.dispose()


class Collected:
    """Runs `backfill` with the URL given one way (`via`), and keeps every text it produced,
    by a label naming the command and where the text came from."""

    def __init__(self, cwd: Path, url: sa.URL, via: str) -> None:
        self.cwd = cwd
        self.url = url
        self.via = via
        self.texts: dict[str, str] = {}

    def text(self, label: str, text: str) -> None:
        key, n = label, 1
        while key in self.texts:
            n += 1
            key = f"{label} (#{n})"
        self.texts[key] = text

    def command(
        self, args: tuple[str, ...], url: sa.URL | None
    ) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of `backfill ARGS` over `url` (else the test's)."""
        shown = (url or self.url).render_as_string(hide_password=False)
        if self.via == "option":
            return backfill_command(*args, "--database-url", shown), cli_env()
        return backfill_command(*args), cli_env(BACKFILL_DATABASE_URL=shown)

    def cli(
        self, *args: str, expect: int | None = 0, url: sa.URL | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """`backfill ARGS` to completion, stdin closed; its exit code `expect`ed (None: any)."""
        command, env = self.command(args, url)
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        label = f"`backfill {' '.join(args)}`" + ("" if url is None else " (another URL)")
        self.text(f"{label} stdout", done.stdout)
        self.text(f"{label} stderr", done.stderr)
        if expect is not None:
            assert done.returncode == expect, (
                f"{label} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
            )
        return done

    def start(self, *args: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
        """`backfill ARGS` in the background, its stdout and stderr to files."""
        command, env = self.command(args, None)
        n = len(self.texts)
        out, err = self.cwd / f"bg{n}.out", self.cwd / f"bg{n}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            popen = subprocess.Popen(
                command,
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env=env,
            )
        return popen, out, err

    def at_terminal(self, *args: str, answer: str = "n") -> str:
        """`backfill ARGS` at a terminal: the question it asks is answered `answer`; all it
        showed, collected. Declining is a refusal: exit 2."""
        command, env = self.command(args, None)
        seen = io.StringIO()
        child = pexpect.spawn(
            command[0], command[1:], cwd=str(self.cwd), env=env, encoding="utf-8", timeout=60
        )
        child.logfile_read = seen  # everything the terminal showed
        try:
            child.expect(r"\[y/N\]")
            child.sendline(answer)
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
        shown = seen.getvalue()
        label = f"`backfill {' '.join(args)}` at a terminal"
        self.text(label, shown)
        assert child.exitstatus == 2, f"{label} exited {child.exitstatus}\n{shown}"
        return shown

    def leaks(self, secret: str) -> dict[str, str]:
        """{label: the text around it} of each text holding `secret`."""
        found = {}
        for label, text in self.texts.items():
            at = text.find(secret)
            if at >= 0:
                found[label] = text[max(0, at - 120) : at + len(secret) + 120]
        return found


def cmdline(pid: int) -> str | None:
    """The command line of process `pid`, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace") or None


def children_of(pid: int) -> list[int]:
    """The pids of the processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def rows(server_url: str, sql: str) -> list[tuple[object, ...]]:
    """The rows of `sql`, read by the admin user (no password)."""
    engine = sa.create_engine(server_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql))]
    finally:
        engine.dispose()


def engine_tables(server_url: str) -> dict[str, str]:
    """Every row of backfill's own tables, as text."""
    engine = sa.create_engine(server_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            names = sa.inspect(conn).get_table_names()
    finally:
        engine.dispose()
    return {
        name: "\n".join(repr(row) for row in rows(server_url, f"SELECT * FROM {name}"))
        for name in names
        if name.startswith(("_migration", "_backfill"))
    }


# Each server once, and each way of giving the URL once (the suite's time is counted).
@pytest.mark.parametrize(
    ("server_url", "via"),
    [("postgresql", "option"), ("mariadb", "environment")],
    indirect=["server_url"],
)
def test_no_password_reaches_any_output(
    tmp_path: Path, server_url: str, secret_url: sa.URL, via: str
) -> None:
    mariadb = secret_url.get_backend_name() != "postgresql"
    shown = f"{secret_url.username}:***@{secret_url.host}"  # the URL as backfill shows it
    c = Collected(tmp_path, secret_url, via)
    detached: list[int] = []
    workers_run: subprocess.Popen[bytes] | None = None
    try:
        # -- the flagship, from the seed to a run with workers --------------------------------
        demo = c.cli("demo", "--messages", str(ROWS), "--seed-only", "--yes")
        assert shown in demo.stdout + demo.stderr
        c.cli("status")
        c.cli("status", "--json")
        c.cli("count", NAME)
        c.cli("run", NAME, "--dry-run")
        # Taken before the first run, so that the restore below brings back rows to migrate.
        backup = json.loads(c.cli("backup", "--output", "bk", "--json").stdout)
        manifest = (tmp_path / "bk" / "manifest.json").read_text()
        c.text("backup's manifest.json", manifest)
        c.text("backup's file names", "\n".join(sorted(os.listdir(tmp_path / "bk"))))
        assert shown in json.loads(manifest)["database"] and backup["rows"] == ROWS
        # At a terminal, the questions name the database (declined: nothing happens).
        assert shown in c.at_terminal("restore", "bk")
        assert shown in c.at_terminal("run", NAME, "--prod")

        c.cli("run", NAME, "--undo", "--events", "ev.jsonl", "--yes")
        c.text("--events file", (tmp_path / "ev.jsonl").read_text())
        c.cli("verify", NAME, "--json")
        c.cli("history", "--json")

        # In the background: the child's command line, while it runs, holds no URL.
        slow = ("--batch-size", "50", "--pause", "0.1")
        started = c.cli("run", NAME, "--detach", "--restart", "--undo", "--yes", *slow)
        found = re.search(r"pid (\d+)", started.stdout)
        assert found, started.stdout
        pid = int(found.group(1))
        detached.append(pid)
        child_line = cmdline(pid)
        assert child_line is not None and "backfill" in child_line, (pid, child_line)
        c.text(f"detached run's /proc/{pid}/cmdline", child_line)
        c.cli("wait", NAME)
        logs = sorted((tmp_path / "backfill-logs").iterdir())
        assert logs
        c.text("backfill-logs file names", "\n".join(p.name for p in logs))
        for log in logs:
            c.text(f"detach log {log.name}", log.read_text(errors="replace"))

        c.cli("revert", NAME, "--yes", "--events", "revert.jsonl")
        c.text("revert's --events file", (tmp_path / "revert.jsonl").read_text())
        c.cli("restore", "bk", "--yes")
        c.cli("reset", NAME, "--yes")

        # Workers: their command lines, read while they run, hold no URL either.
        workers_run, out, err = c.start(
            "run", NAME, "--workers", "2", "--batch-size", "20", "--pause", "0.05", "--yes"
        )
        seen: dict[int, str] = {}
        # A child between fork and exec still shows this command line (the URL given here, in
        # the option round): a worker's own is the one it shows once it differs. (Read from
        # /proc at once, the parent's may still be empty: it is rebuilt from its arguments.)
        own = " ".join(map(str, workers_run.args)) + " "  # type: ignore[arg-type]
        while workers_run.poll() is None:
            for child in children_of(workers_run.pid):
                line = cmdline(child)
                if child not in seen and line and line != own:
                    seen[child] = line
            time.sleep(0.01)
        c.text("`backfill run --workers 2` stdout", out.read_text())
        c.text("`backfill run --workers 2` stderr", err.read_text())
        assert workers_run.returncode == 0, out.read_text() + err.read_text()
        assert any(" worker " in line for line in seen.values()), seen
        for child, line in seen.items():
            c.text(f"worker's /proc/{child}/cmdline", line)

        # -- refusals and errors ---------------------------------------------------------------
        c.cli("run", "nope", "--yes", expect=2)  # unknown migration
        c.cli("run", "cleanup_legacy_fields", "--yes", expect=2)  # the cleanup's gate
        assert "Traceback" in c.cli("--debug", "run", "nope", "--yes", expect=2).stderr
        elsewhere = secret_url.set(database="backfill_no_such_db")
        for args in (("status",), ("--debug", "status"), ("run", NAME, "--yes")):
            failed = c.cli(*args, url=elsewhere, expect=4)
            assert shown in failed.stderr, failed.stderr  # the database the error is about
            assert ("Traceback" in failed.stderr) == ("--debug" in args), failed.stderr
        # A wrong password: PostgreSQL trusts this host (accepted); MariaDB refuses it.
        wrong = secret_url.set(password=WRONG)
        for args in (("status",), ("--debug", "status")):
            refused = c.cli(*args, url=wrong, expect=4 if mariadb else 0)
            if mariadb:
                assert shown in refused.stderr and "denied" in refused.stderr, refused.stderr

        # -- what stays: history and backfill's tables -----------------------------------------
        runs = json.loads(c.cli("history", "--json", "--limit", "100").stdout)["runs"]
        assert {r["kind"] for r in runs} >= {"run", "revert", "restore", "reset"}, runs
        for run in runs:
            assert shown in run["database"], run
            arguments = run["arguments"]
            given = [
                arguments[i + 1] for i, a in enumerate(arguments[:-1]) if a == "--database-url"
            ]
            assert all(shown in a for a in given), run
        # The URL given on the command line is stored shown so (a detached run's own command
        # line has none: the URL reaches it by its environment).
        assert (via == "option") == any("--database-url" in r["arguments"] for r in runs), runs
        for table, text in engine_tables(server_url).items():
            c.text(f"table {table}", text)
        database_urls = [r[0] for r in rows(server_url, "SELECT database_url FROM _migration_runs")]
        assert database_urls and all(shown in u for u in database_urls), database_urls
    finally:
        if workers_run is not None and workers_run.poll() is None:
            workers_run.kill()
            workers_run.wait()
        for pid in detached:
            line = cmdline(pid)
            if process_alive(pid) and line and "backfill" in line:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    leaks = c.leaks(SECRET)
    assert not leaks, f"the password {SECRET!r} reached:\n" + "\n".join(
        f"- {label}: ...{around}..." for label, around in leaks.items()
    )
    wrong_leaks = c.leaks(WRONG)
    assert not wrong_leaks, f"the wrong password {WRONG!r} reached:\n" + "\n".join(
        f"- {label}: ...{around}..." for label, around in wrong_leaks.items()
    )

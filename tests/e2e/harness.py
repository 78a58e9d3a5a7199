"""Helpers for the end-to-end tests: the real `backfill` CLI in subprocesses over one database.

A `Harness` owns a database (a SQLite file in tmp_path, or a PostgreSQL or MariaDB database of its
own: the `database_url` fixture) seeded with the `apps.counting` table, starts runners in the
background (output to files, so a full pipe never blocks them), runs short commands to completion,
and reads the database directly (SQLAlchemy on the same URL, no pooling) to see what was
committed. Every process it started is killed and reaped when the test ends, even a stopped one.

(Not a conftest.py: tests/conftest.py is imported as the module `conftest`, which a second
conftest.py in this directory would shadow.)
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from apps.counting import NAME, create_items
from backfill.store.database import application_name
from support import backfill_command, cli_env

APP = "apps.counting:migrations"
HOST = socket.gethostname()
T = TypeVar("T")


def expected_derived(source: str) -> str:
    """The test's own statement of what `derive` must write (independent of the app's code)."""
    reversed_upper = "".join(reversed(source)).upper()
    return reversed_upper + "#" + str(len(source))


@dataclass
class Proc:
    """A backgrounded `backfill` process whose output goes to files."""

    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    args: list[str]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def send(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.args} did not exit within {timeout}s\n{self.output()}"
            ) from None

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        return f"--- stdout ---\n{self.stdout()}\n--- stderr ---\n{self.stderr()}"


@dataclass
class Harness:
    tmp_path: Path
    url: str  # sqlite:///FILE, a PostgreSQL or a MariaDB URL (the `database_url` fixture)
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every command
    app: str = APP  # the registry the commands are given (apps.counting's, or its `logged`)
    procs: list[Proc] = field(default_factory=list)
    # Held by this process's own writers (AppTraffic) and probes, so a probe never takes this
    # process's own transaction for a runner's.
    own_lock: threading.Lock = field(default_factory=threading.Lock)
    _engine: sa.Engine | None = None

    @property
    def dialect(self) -> str:
        return sa.make_url(self.url).get_backend_name()

    @property
    def postgresql(self) -> bool:
        return self.dialect == "postgresql"

    @property
    def mysql(self) -> bool:
        """MariaDB (or MySQL), by either of SQLAlchemy's names."""
        return self.dialect in ("mysql", "mariadb")

    @property
    def db_path(self) -> Path:
        """The SQLite file (SQLite only)."""
        assert self.dialect == "sqlite", self.url
        database = sa.make_url(self.url).database
        assert database
        return Path(database)

    @property
    def engine(self) -> sa.Engine:
        """The test's own connections: one per use, never pooled (a pooled PostgreSQL session
        would outlive the test's database otherwise, and nothing of ours lingers in a lock)."""
        if self._engine is None:
            args: dict[str, Any] = {"timeout": 10} if self.dialect == "sqlite" else {}
            if self.mysql:
                # The tests' own SQL is standard: `||` concatenates (in MySQL it means OR).
                args["init_command"] = "SET sql_mode = CONCAT(@@sql_mode, ',PIPES_AS_CONCAT')"
            self._engine = sa.create_engine(self.url, poolclass=NullPool, connect_args=args)
        return self._engine

    # -- set-up -------------------------------------------------------------------------------

    def seed(self, count: int, seed: int = 0) -> dict[int, str]:
        """Create `count` unmigrated items; returns {id: source} as stored, read back."""
        engine = sa.create_engine(self.url)
        try:
            create_items(engine, count, seed=seed)
        finally:
            engine.dispose()
        self.wal()
        sources = {i: s for i, s, _, _ in self.items()}
        assert len(sources) == count
        return sources

    def wal(self) -> None:
        """SQLite: WAL from the start, as the engine leaves it after its first use (in rollback
        journal mode, AppTraffic's commits would fail against the runner's reads)."""
        if self.dialect == "sqlite":
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=WAL")

    # -- processes ----------------------------------------------------------------------------

    def _command(self, *args: str) -> list[str]:
        return backfill_command(*args, "--app", self.app, "--database-url", self.url)

    def _env(self, extra: dict[str, str] | None) -> dict[str, str]:
        return cli_env(**self.env, **(extra or {}))

    def start(self, *args: str, env: dict[str, str] | None = None) -> Proc:
        """Start `backfill ARGS` in the background."""
        n = len(self.procs)
        out, err = self.tmp_path / f"proc{n}.out", self.tmp_path / f"proc{n}.err"
        command = self._command(*args)
        with out.open("wb") as stdout, err.open("wb") as stderr:
            popen = subprocess.Popen(
                command,
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                cwd=self.tmp_path,
                env=self._env(env),
            )
        proc = Proc(popen, out, err, command)
        self.procs.append(proc)
        return proc

    def cli(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run `backfill ARGS` to completion."""
        return subprocess.run(
            self._command(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.tmp_path,
            env=self._env(env),
            stdin=subprocess.DEVNULL,
        )

    def status(self, env: dict[str, str] | None = None) -> dict[str, Any]:
        """`backfill status derive --json` for the test migration."""
        done = self.cli("status", NAME, "--json", env=env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)[NAME]

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.running():
                proc.send(signal.SIGCONT)
                proc.send(signal.SIGKILL)
            proc.popen.wait(timeout=30)
        if self._engine is not None:
            self._engine.dispose()

    # -- looking at the database --------------------------------------------------------------

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[sa.Row[Any]]:
        """Rows of one SELECT (SQLAlchemy `:name` parameters), in a short transaction of its own."""
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params or {}))

    def execute(self, sql: str, params: dict[str, Any] | None = None) -> None:
        """One statement, committed."""
        with self.engine.begin() as conn:
            conn.execute(sa.text(sql), params or {})

    def record(self) -> dict[str, Any] | None:
        """The committed `_migrations` row of the test migration (None before the first run)."""
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("_migrations"):
                return None
            found = conn.execute(
                sa.text("SELECT * FROM _migrations WHERE name = :name"), {"name": NAME}
            )
            row = found.mappings().first()
        return None if row is None else dict(row)

    def items(self) -> list[tuple[int, str, str | None, int]]:
        rows = self.query("SELECT id, source, derived, counter FROM items ORDER BY id")
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def snapshot(self) -> tuple[list[Any], dict[str, Any] | None]:
        """Everything a runner could write: the items and the migration's record."""
        return self.items(), self.record()

    def in_transaction(self, proc: Proc) -> bool:
        """True when `proc` is (or may be) inside a transaction.

        SQLite: some connection holds the write lock (only runners write). PostgreSQL and
        MariaDB: a session of `proc` is not idle: in a transaction, or running a statement.
        Looked at twice, a moment apart, so a statement sent just before the look (not yet
        picked up by its server process) is not missed."""
        if self.dialect == "sqlite":
            return self.write_locked()
        if self._busy_sessions(proc):
            return True
        time.sleep(0.05)
        return self._busy_sessions(proc)

    def sessions(self, proc: Proc) -> list[tuple[int, str | None]]:
        """(server pid, state) of each PostgreSQL session `proc` has open (told by its
        application_name); on MariaDB (connection id, state), the state "idle" or not as on
        PostgreSQL."""
        if self.mysql:
            return self._mysql_sessions(proc)
        rows = self.query(
            "SELECT pid, state FROM pg_stat_activity WHERE application_name = :name",
            {"name": application_name(proc.pid)},
        )
        return [(r[0], r[1]) for r in rows]

    def _mysql_sessions(self, proc: Proc) -> list[tuple[int, str | None]]:
        """MariaDB shows connect attributes (the runner's `program_name`) only with
        performance_schema, off by default: a connection of `proc` is told by its client port,
        one of the TCP sockets the process holds. Idle: asleep with no InnoDB transaction.

        Open transactions come from SHOW ENGINE INNODB STATUS: information_schema.innodb_trx
        is a cache refreshed only after 100 ms without a read, so polling it sees a frozen
        past."""
        ports = _local_ports(proc.pid)
        with self.engine.connect() as conn:
            status = conn.exec_driver_sql("SHOW ENGINE INNODB STATUS").one()[2]
            rows = conn.exec_driver_sql(
                "SELECT id, host, command FROM information_schema.processlist"
            ).all()
        in_transaction = {
            int(found.group(1))
            for block in status.split("---TRANSACTION ")
            if ", ACTIVE " in block.splitlines()[0]
            and (found := re.search(r"(?:MariaDB|MySQL) thread id (\d+)", block))
        }
        sessions = []
        for connection, host, command in rows:
            port = str(host or "").rpartition(":")[2]
            if port.isdigit() and int(port) in ports:
                if command != "Sleep":
                    state = "active"
                else:
                    state = "idle in transaction" if connection in in_transaction else "idle"
                sessions.append((int(connection), state))
        return sessions

    def _busy_sessions(self, proc: Proc) -> bool:
        return any(state != "idle" for _pid, state in self.sessions(proc))

    def write_locked(self) -> bool:
        """SQLite: True when some connection holds the write lock (a runner inside a
        transaction). Takes the lock for an instant when it is free (and commits nothing)."""
        with self.own_lock:
            conn = sqlite3.connect(self.db_path, timeout=0, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as error:
                if "locked" in str(error) or "busy" in str(error):
                    return True
                raise
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                conn.close()
        return False

    # -- checks -------------------------------------------------------------------------------

    def assert_prefix_migrated(self) -> dict[str, Any]:
        """Committed state is atomic: rows up to the cursor are migrated exactly once, the rest
        untouched, and `processed` counts exactly the rows up to the cursor."""
        record = self.record()
        assert record is not None
        cursor = None if record["cursor"] is None else json.loads(record["cursor"])[0]
        upto = 0 if cursor is None else cursor
        rows = self.items()
        done = [r for r in rows if r[0] <= upto]
        rest = [r for r in rows if r[0] > upto]
        assert all(r[2] == expected_derived(r[1]) and r[3] == 1 for r in done), [
            r for r in done if r[2] != expected_derived(r[1]) or r[3] != 1
        ][:5]
        assert all(r[2] is None and r[3] == 0 for r in rest), [
            r for r in rest if r[2] is not None or r[3] != 0
        ][:5]
        assert record["processed"] == len(done) == record["changed"], record
        return record

    def assert_all_migrated_once(self, sources: dict[int, str]) -> None:
        """Every row holds what the test expects, with counter exactly 1, and the counters agree."""
        rows = self.items()
        assert [r[0] for r in rows] == sorted(sources)
        wrong = [
            r for r in rows if r[1] != sources[r[0]] or r[2] != expected_derived(r[1]) or r[3] != 1
        ]
        assert not wrong, f"{len(wrong)} rows wrong, e.g. {wrong[:5]}"
        record = self.record()
        assert record is not None
        assert record["state"] == "success", record
        assert record["processed"] == record["total"] == record["changed"] == len(sources), record


class AppTraffic:
    """The application at work during the migration: a small committed write to its own table
    every few milliseconds, skipped (never waited for) while a runner holds the write lock.

    Besides being what an online migration meets, it means a runner cannot trust anything it
    read or decided before its batch transaction began: it reads and decides inside it."""

    def __init__(self, h: Harness, interval: float = 0.005) -> None:
        self._h = h
        self._interval = interval
        self._stop = threading.Event()
        target = self._write if h.dialect == "sqlite" else self._write_server
        self._thread = threading.Thread(target=target, name="app-traffic", daemon=True)
        self.commits = 0
        key = {"postgresql": "SERIAL PRIMARY KEY", "sqlite": "INTEGER PRIMARY KEY"}.get(
            h.dialect, "INTEGER PRIMARY KEY AUTO_INCREMENT"
        )
        h.execute(f"CREATE TABLE IF NOT EXISTS app_log (id {key}, at REAL)")

    def __enter__(self) -> AppTraffic:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _write_server(self) -> None:
        # PostgreSQL, MariaDB: no database-wide lock to step around, the application simply
        # commits.
        with self._h.engine.connect() as conn:
            while not self._stop.wait(self._interval):
                with conn.begin():
                    conn.execute(
                        sa.text("INSERT INTO app_log (at) VALUES (:at)"), {"at": time.time()}
                    )
                self.commits += 1

    def _write(self) -> None:
        conn = sqlite3.connect(self._h.db_path, timeout=0, isolation_level=None)
        try:
            while not self._stop.wait(self._interval):
                with self._h.own_lock:
                    try:
                        conn.execute("BEGIN IMMEDIATE")
                    except sqlite3.OperationalError:
                        continue  # a runner is inside a batch; try again later
                    conn.execute("INSERT INTO app_log (at) VALUES (?)", (time.time(),))
                    conn.execute("COMMIT")
                    self.commits += 1
        finally:
            conn.close()


def _local_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets process `pid` holds (its database connections)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def wait_for(
    predicate: Callable[[], T],
    what: str,
    *,
    timeout: float = 30,
    interval: float = 0.02,
    procs: tuple[Proc, ...] = (),
) -> T:
    """Poll until `predicate()` is truthy; fail (with the processes' output) on the deadline or
    when one of `procs` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for proc in procs:
            if not proc.running():
                raise AssertionError(
                    f"waiting for {what}: {proc.args} exited with {proc.popen.returncode}\n"
                    f"{proc.output()}"
                )
        if time.monotonic() > deadline:
            details = "\n".join(p.output() for p in procs)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{details}")
        time.sleep(interval)


def committed_by(h: Harness, proc: Proc, more_than: int) -> Callable[[], dict[str, Any] | None]:
    """A predicate: `proc` holds the migration and has committed beyond `more_than` rows."""

    def check() -> dict[str, Any] | None:
        record = h.record()
        if (
            record is not None
            and record["runner_pid"] == proc.pid
            and record["state"] == "inProgress"
            and record["processed"] > more_than
        ):
            return record
        return None

    return check


def pid_exited_unreaped(pid: int, timeout: float = 30) -> None:
    """Wait until the child `pid` has died, leaving it a zombie (not reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        if info is not None:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not die within {timeout}s")


__all__ = [
    "APP",
    "AppTraffic",
    "HOST",
    "NAME",
    "Harness",
    "Proc",
    "committed_by",
    "expected_derived",
    "pid_exited_unreaped",
    "wait_for",
]


def kill_moment(h: Harness, proc: Proc, rng: random.Random, inside: bool, wait: float) -> bool:
    """Wait for the moment to SIGKILL `proc`: a random one up to `wait` seconds, or (`inside`)
    the first moment it is seen inside a transaction, looked for at random intervals for up to
    ten seconds, so that every run of a crash test has kills that must roll a batch back.
    Whether the moment is inside a transaction, as far as can be seen."""
    if not inside:
        time.sleep(rng.uniform(0, wait))
        return h.in_transaction(proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.running():
        if h.in_transaction(proc):
            return True
        time.sleep(rng.uniform(0, 0.02))
    return False


def shard_holders(h: Harness) -> dict[int, int]:
    """{pid: shard id} of the shards held (stored inProgress) in the test migration's plan."""
    with h.engine.connect() as conn:
        if not sa.inspect(conn).has_table("_migration_shards"):
            return {}
    rows = h.query(
        "SELECT id, runner_pid FROM _migration_shards WHERE migration = :name "
        "AND state = 'inProgress' AND runner_pid IS NOT NULL",
        {"name": NAME},
    )
    return {int(r[1]): int(r[0]) for r in rows}


def logged_once(h: Harness) -> None:
    """Every item was logged through the Context exactly once (apps.counting's `logged`)."""
    rows = h.query(
        "SELECT i.id, COUNT(l.id) FROM items i LEFT JOIN item_log l ON l.item_id = i.id "
        "GROUP BY i.id HAVING COUNT(l.id) <> 1"
    )
    assert not rows, f"{len(rows)} items logged other than once, e.g. {rows[:5]}"


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def freeze_outside_transaction(h: Harness, proc: Proc, timeout: float = 30) -> None:
    """SIGSTOP `proc` at a moment it holds no write lock (retrying while it does)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.running(), proc.output()
        proc.send(signal.SIGSTOP)
        wait_for(lambda: process_state(proc.pid) == "T", f"pid {proc.pid} to stop", timeout=10)
        if not h.in_transaction(proc):
            return
        proc.send(signal.SIGCONT)
        time.sleep(random.uniform(0.01, 0.08))
    raise AssertionError(f"could not stop pid {proc.pid} outside a transaction\n{proc.output()}")

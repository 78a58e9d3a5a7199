"""Runs and reverts the dashboard starts in the background: `backfill run|revert NAME --yes` in
a process of its own session (it outlives the dashboard), with the database URL, app,
environment and origin in its environment (never on its command line, which `ps` shows), its
output in a log under ./backfill-logs. The caller learns whether the child claimed the migration
(its history row appears, found by the child's pid: `revert` reports no claim of its own) or
ended without one (refused, or nothing to do: its exit code and its one sentence).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from backfill.cli.detach import DETACH_FD, default_log
from backfill.dashboard.origin import ORIGIN_ENV
from backfill.errors import DatabaseUnavailable
from backfill.history import Kind, Origin
from backfill.runner import Runner
from backfill.types import Identity

# The commands a dashboard starts in the background, and the history kind of the row each
# writes when it claims the migration.
VERBS = {"run": Kind.RUN, "revert": Kind.REVERT}


@dataclass(frozen=True)
class Started:
    """A child started: `claimed` once its history row is there; otherwise `code` is its exit
    code when it ended first (None: still starting when the wait ran out) and `said` what it
    said last."""

    pid: int
    log: Path
    claimed: bool
    code: int | None = None
    said: str = ""


@dataclass(frozen=True)
class Background:
    """How this dashboard starts children: over `database_url` with `app`, in `environment`;
    `env` is added to their environment (tests make their apps importable with it); `passed`
    to their options (the dashboard's `--log-format json`, `--log-file`); `run_options` to a
    run's, before those the page gives (which win: the demo's pace)."""

    database_url: str
    app: str
    environment: str
    env: Mapping[str, str] = field(default_factory=dict)
    passed: Sequence[str] = ()
    run_options: Sequence[str] = ()
    logs: Path = Path("backfill-logs")
    claim_timeout: float = 30.0
    poll_seconds: float = 0.1

    def command(self, verb: str, name: str, arguments: Sequence[str]) -> list[str]:
        """`backfill VERB NAME ARGUMENTS --yes`: the questions were answered by the token."""
        if verb not in VERBS:
            raise ValueError(f"the dashboard starts run or revert, not {verb!r}")
        defaults = self.run_options if verb == "run" else ()
        given = [*defaults, *arguments, *self.passed]
        return [sys.executable, "-m", "backfill", verb, name, *given, "--yes"]

    def environment_of(self, origin: Origin) -> dict[str, str]:
        env = {**os.environ, **self.env}
        env.pop(DETACH_FD, None)  # never a number that means another file to the child
        env.update(
            BACKFILL_DATABASE_URL=self.database_url,
            BACKFILL_APP=self.app,
            BACKFILL_ENV=self.environment,
            **{ORIGIN_ENV: origin.value},
        )
        return env

    def start(
        self, runner: Runner, verb: str, name: str, arguments: Sequence[str], origin: Origin
    ) -> Started:
        """Start the child and wait (at most `claim_timeout` seconds) for its claim or its end;
        `runner` reads the history."""
        command = self.command(verb, name, arguments)
        path = (self.logs / default_log(name).name).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        began = time.time()
        with path.open("ab") as output:
            offset = output.tell()
            child = subprocess.Popen(
                command,
                env=self.environment_of(origin),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not stopped with the dashboard, nor by its Ctrl-C
            )
        claimed = self._wait_for_claim(runner, VERBS[verb], name, child, began)
        if claimed is None:
            return Started(child.pid, path, False, child.returncode, _said(path, offset))
        # Reaped when it ends: a child left a zombie would look alive to the lease checks here.
        reaper = threading.Thread(target=child.wait, name=f"backfill-{child.pid}", daemon=True)
        reaper.start()
        return Started(child.pid, path, claimed)

    def _wait_for_claim(
        self, runner: Runner, kind: Kind, name: str, child: subprocess.Popen[bytes], began: float
    ) -> bool | None:
        """True once the child's history row is there; None when it ended without one; False
        when `claim_timeout` ran out first."""
        deadline = time.monotonic() + self.claim_timeout
        while True:
            ended = child.poll() is not None  # read before the history: a claim, then an end
            if _claimed(runner, name, kind, child.pid, began):
                return True
            if ended:
                return None
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_seconds)


def _claimed(runner: Runner, name: str, kind: Kind, pid: int, began: float) -> bool:
    """The history holds a row of `kind` for `name` written by process `pid` of this host."""
    host = Identity.current().host
    with contextlib.suppress(DatabaseUnavailable):  # asked again at the next poll
        return any(
            entry.kind is kind and entry.pid == pid and entry.host == host
            and entry.started_at >= began - 1.0
            for entry in runner.history(name, limit=5)
        )  # fmt: skip
    return False


def _said(path: Path, offset: int) -> str:
    """The sentence a child said last: its last `backfill: ...` line (the CLI's refusals and
    errors), else its last line."""
    with path.open("rb") as log:
        log.seek(offset)
        lines = [line.strip() for line in log.read().decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if line.startswith("backfill: "):
            return line.removeprefix("backfill: ")
    return lines[-1] if lines else ""

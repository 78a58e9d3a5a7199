"""Processes that race: each is started first, imports everything it needs, then waits at one
barrier with the others and runs its `backfill` command (the CLI's own `main`) the moment the
test releases them all together, once per trial.

The racers live for all the trials of a test (a Python start-up is half a second, and eight of
them on this machine's two cores would cost more than the trials themselves): between trials
they wait at the barrier again while the test resets the database. Each command's exit code,
stdout and stderr are collected per trial.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A command that starts with "@after=S" waits S seconds after the release.
AFTER = "@after="
# The barrier waits at most this long for everyone (a racer stuck in a command fails the test).
BARRIER_SECONDS = 120


@dataclass(frozen=True)
class Outcome:
    racer: int
    pid: int
    exit_code: int
    stdout: str
    stderr: str


def _racer(
    index: int,
    commands: Sequence[Sequence[str]],
    env: dict[str, str],
    app_module: str,
    folder: str,
    barrier: Any,
    results: Any,
) -> None:
    os.environ.update(env)
    from backfill.cli import main  # every import is done before the first release

    importlib.import_module(app_module)
    for trial, argv in enumerate(commands):
        barrier.wait(BARRIER_SECONDS)
        if argv and argv[0].startswith(AFTER):
            # This racer starts a moment after the others (a sweep over the race's window).
            time.sleep(float(argv[0][len(AFTER) :]))
            argv = argv[1:]
        out = Path(folder) / f"trial{trial}-racer{index}.out"
        err = Path(folder) / f"trial{trial}-racer{index}.err"
        code = _captured(main, list(argv), out, err)
        results.put((trial, index, os.getpid(), code))


def _captured(main: Any, argv: list[str], out: Path, err: Path) -> int:
    """`main(argv)` with file descriptors 1 and 2 sent to files; its exit code."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with out.open("wb") as stdout, err.open("wb") as stderr:
        os.dup2(stdout.fileno(), 1)
        os.dup2(stderr.fileno(), 2)
        try:
            main(argv)
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
    return code


class Race:
    """`count` racer processes; trial k runs `command(k, racer)` in each of them."""

    def __init__(
        self,
        count: int,
        commands: list[list[list[str]]],
        folder: Path,
        *,
        env: dict[str, str],
        app_module: str,
    ) -> None:
        context = multiprocessing.get_context("spawn")  # fresh interpreters, as `backfill` is
        self.count = count
        self.folder = folder
        self.trials = len(commands)
        self._barrier = context.Barrier(count + 1)
        self._results = context.Queue()
        self._procs = [
            context.Process(
                target=_racer,
                args=(
                    i,
                    [trial[i] for trial in commands],
                    env,
                    app_module,
                    str(folder),
                    self._barrier,
                    self._results,
                ),
                daemon=True,
            )
            for i in range(count)
        ]

    def __enter__(self) -> Race:
        for proc in self._procs:
            proc.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._barrier.abort()
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
            proc.join(10)

    def release(self, trial: int) -> list[Outcome]:
        """Release every racer at once into trial `trial`; their outcomes, by racer."""
        self._barrier.wait(BARRIER_SECONDS)
        found: dict[int, Outcome] = {}
        while len(found) < self.count:
            got_trial, index, pid, code = self._results.get(timeout=BARRIER_SECONDS)
            assert got_trial == trial, (got_trial, trial)
            out = (self.folder / f"trial{trial}-racer{index}.out").read_text(errors="replace")
            err = (self.folder / f"trial{trial}-racer{index}.err").read_text(errors="replace")
            found[index] = Outcome(index, pid, code, out, err)
        return [found[i] for i in range(self.count)]

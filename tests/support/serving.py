"""`backfill dashboard` (or `backfill demo --dashboard`) served as a user runs it, for the tests
that talk to it over HTTP or in a browser: a subprocess on a free port, its address and token
read from what it prints, interrupted (SIGINT, as Ctrl-C) after."""

from __future__ import annotations

import ast
import contextlib
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from support import backfill_command, cli_env


@dataclass
class Dashboard:
    """A `backfill dashboard` being served: its address (`http://127.0.0.1:PORT/`), the token
    it printed, its process and what it said on stdout so far."""

    url: str
    token: str
    process: subprocess.Popen[str]
    said: list[str] = field(default_factory=list)

    def address(self, path: str = "", *, token: bool = False) -> str:
        """The address of `path` (no leading slash); with `token`, as the command prints it
        for acting from the page (`?token=`: the page sets its cookie and drops it)."""
        found = self.url + path.lstrip("/")
        return f"{found}?token={self.token}" if token else found


def _lines(stream: IO[str], into: queue.Queue[str | None]) -> None:
    """Every line of `stream` into `into`, then None at its end (the pipe never fills)."""
    for line in stream:
        into.put(line)
    into.put(None)


def web_libraries_imported(*modules: str) -> list[str]:
    """The dashboard extra's libraries that importing `modules` imports, in a fresh Python."""
    probe = (
        f"import sys, {', '.join(modules)}; "
        "print([m for m in ('starlette', 'jinja2', 'markupsafe', 'uvicorn') if m in sys.modules])"
    )
    imported = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=cli_env(), check=True
    )
    return list(ast.literal_eval(imported.stdout.strip()))


@contextlib.contextmanager
def serve_dashboard(
    database_url: str,
    app: str,
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    arguments: Sequence[str] = ("dashboard", "--port", "0"),
    startup_seconds: float = 60.0,
) -> Iterator[Dashboard]:
    """`backfill ARGUMENTS` (`dashboard --port 0`) over `database_url` with the registry `app`
    (module:attr; tests/ is importable), `env` added to its environment, in `cwd` (where the
    runs it starts leave their logs, and where its stderr is kept, as dashboard-stderr.log).
    Yields once it has printed its address and token; interrupted (SIGINT, as Ctrl-C; then
    killed) after: its exit code is then `process.returncode`."""
    environment = cli_env(BACKFILL_DATABASE_URL=database_url, BACKFILL_APP=app, **(env or {}))
    environment.pop("BACKFILL_DASHBOARD_TOKEN", None)  # a token of its own, printed
    stderr_path = cwd / "dashboard-stderr.log"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            backfill_command(*arguments),
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env=environment,
            cwd=cwd,
        )
    try:
        assert process.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
        said: list[str] = []
        # It prints `dashboard of ENV (URL) on http://127.0.0.1:PORT/`, `token: T`, then
        # `act from the page: open ...?token=T` (the demo says what it started first).
        while len(said) < 3:
            try:
                line = lines.get(timeout=startup_seconds)
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(
                    f"backfill dashboard did not start: said {said!r}, "
                    f"stderr {stderr_path.read_text()!r}"
                )
            if said or " on http://" in line:
                said.append(line.rstrip("\n"))
        url = said[0].rpartition(" on ")[2].strip()
        token = said[1].removeprefix("token: ").strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/"), said
        assert said[2] == f"act from the page: open {url}?token={token}", said
        yield Dashboard(url, token, process, said)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # Shown by pytest when the test failed: what the dashboard said went wrong.
        print(f"backfill dashboard's stderr:\n{stderr_path.read_text()}")

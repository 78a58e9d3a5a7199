"""A real `backfill run` on PostgreSQL losing its connections mid-run.

- `pg_terminate_backend` on every session of the runner (what a DBA, a failover or a restart does
  to it), several times, mostly while a batch is open: the runner rolls back, reconnects and
  carries on; the run ends `success` with every row migrated once and exact counters.
- The same with retries turned off: the run ends `failed` with the cause (exit 4), nothing of the
  interrupted batch is kept, and the next run resumes to `success`.
- A restart as clients see it, through a TCP proxy: every connection dropped without a word and
  new ones turned away for a second, twice; the run rides it out.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from contextlib import suppress

import pytest
import sqlalchemy as sa
from harness import NAME, Harness, Proc, committed_by, wait_for

ROWS = 6_000
BATCH = "100"
# 0.5 ms a row: about 50 ms of function calls inside each batch transaction, a few seconds a run.
SLOW = {"COUNTING_ROW_DELAY": "0.0005"}


@pytest.fixture
def h(tmp_path, postgres_url):
    harness = Harness(tmp_path, postgres_url)
    yield harness
    harness.cleanup()


def terminate(h: Harness, proc: Proc) -> int:
    """pg_terminate_backend on every session of `proc`; how many there were."""
    pids = [pid for pid, _state in h.sessions(proc)]
    for pid in pids:
        h.query("SELECT pg_terminate_backend(:pid)", {"pid": pid})
    return len(pids)


def terminate_inside_a_batch(h: Harness, proc: Proc, after: int) -> None:
    wait_for(committed_by(h, proc, after), f"the runner to pass {after} rows", procs=(proc,))
    wait_for(lambda: h.in_transaction(proc), "a batch to be open", procs=(proc,), interval=0.005)
    assert terminate(h, proc) >= 1


def test_terminated_sessions_are_replaced_and_the_run_succeeds_exactly(h):
    sources = h.seed(ROWS)
    runner = h.start("run", NAME, "--batch-size", BATCH, env=SLOW)
    for after in (1_000, 2_500, 4_000):
        terminate_inside_a_batch(h, runner, after)
    assert runner.wait(timeout=120) == 0, runner.output()

    assert "retry 1 of" in runner.stderr(), runner.output()
    assert "Traceback" not in runner.stderr(), runner.output()
    h.assert_all_migrated_once(sources)
    status = h.status()
    assert status["progress"] == {"processed": ROWS, "total": ROWS, "completed": True}
    assert status["changed"] == ROWS and status["error"] is None


def test_without_retries_a_lost_connection_fails_cleanly_and_the_next_run_resumes(h):
    sources = h.seed(ROWS)
    runner = h.start("run", NAME, "--batch-size", BATCH, env={**SLOW, "BACKFILL_RETRIES": "0"})
    terminate_inside_a_batch(h, runner, 1_000)
    assert runner.wait(timeout=60) == 4, runner.output()
    assert "Traceback" not in runner.stderr(), runner.output()
    assert NAME in runner.stderr() and "0 retries" in runner.stderr(), runner.output()

    status = h.status()
    assert status["state"] == "failed", status
    error = status["error"]
    assert error["row_id"] is None and error["field"] is None, error
    assert "administrator command" in error["message"] or "connection" in error["message"], error
    record = h.assert_prefix_migrated()  # the interrupted batch left nothing behind
    assert 1_000 < record["processed"] < ROWS

    resumed = h.cli("run", NAME, "--batch-size", BATCH, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    h.assert_all_migrated_once(sources)
    final = h.status()
    assert final["changed"] == ROWS and final["error"] is None


class Outage:
    """A TCP proxy in front of PostgreSQL that can cut every connection at once and turn new ones
    away for a while: what clients see of a server restart (no goodbye, then refused)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self, seconds: float) -> None:
        self.up.clear()
        with self.lock:
            cut, self.sockets = self.sockets, set()
        for s in cut:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.cuts += 1
        time.sleep(seconds)
        self.up.set()

    def close(self) -> None:
        self.server.close()
        self.cut(0)


def test_a_restart_as_clients_see_it_is_ridden_out(tmp_path, postgres_url):
    url = sa.make_url(postgres_url)
    outage = Outage(url.host or "127.0.0.1", url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=outage.port).render_as_string(hide_password=False)
    h = Harness(tmp_path, proxied)
    try:
        sources = h.seed(ROWS)
        runner = h.start("run", NAME, "--batch-size", BATCH, env=SLOW)
        for after in (1_500, 3_500):
            wait_for(committed_by(h, runner, after), f"{after} rows", procs=(runner,))
            h.engine.dispose()
            outage.cut(1.0)
        assert runner.wait(timeout=120) == 0, runner.output()
        assert "retry 1 of" in runner.stderr(), runner.output()
        assert "Traceback" not in runner.stderr(), runner.output()
        h.assert_all_migrated_once(sources)
        assert h.status()["changed"] == ROWS
    finally:
        for proc in h.procs:
            if proc.running():
                proc.send(signal.SIGKILL)
        h.cleanup()
        outage.close()

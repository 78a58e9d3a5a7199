"""SQLite benchmark of the flagship migration: backfill against the floor and a naive loop.

Builds a database of N generated legacy messages once (kept under bench/data/, reused by later
runs with the same N), then times on a fresh copy of it for each contender:

- backfill: `backfill run body_to_parts` as a whole subprocess (interpreter start-up included),
  default batch size: batches decided in SQLite by the migration's declared SQL;
- (a) the floor: one set-based `UPDATE messages SET parts = <the same parts built with SQLite's
  JSON functions> WHERE parts IS NULL` in a single transaction;
- (b) a naive per-row loop, as hand-written migration code does it: select one row, compute its
  parts in Python, update it, commit; timed on the first rows only and extrapolated;
- (c) `backfill run body_to_parts --python-only`: every row through the Python function.

Every contender uses the engine's connection settings (WAL, synchronous=NORMAL, busy_timeout).
Outputs are checked equal row by row as decoded JSON. Peak memory (max RSS of the backfill
process) is measured at two table sizes to show it stays flat.

    python bench/sqlite_bench.py                 # 1,000,000 rows (several minutes)
    python bench/sqlite_bench.py --rows 100000   # quick iteration
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from report import best, opening, rates, same_parts
from run_events import RunFigures, read_run

from backfill.store.database import SQLITE_BUSY_TIMEOUT_MS
from chat_migrations.generator import seed_messages
from chat_migrations.parts import derive_parts

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"

# Parts computed in SQL, exactly as derive_parts does: reasoning then text, empty or NULL
# values omitted, [] when neither.
_REASONING = "json_object('type', 'reasoning', 'text', thinking_content)"
_TEXT = "json_object('type', 'text', 'text', body)"
_HAS_THINKING = "coalesce(thinking_content, '') <> ''"
_HAS_BODY = "coalesce(body, '') <> ''"
FLOOR_SQL = f"""
UPDATE messages SET parts = CASE
    WHEN {_HAS_THINKING} AND {_HAS_BODY} THEN json_array({_REASONING}, {_TEXT})
    WHEN {_HAS_THINKING} THEN json_array({_REASONING})
    WHEN {_HAS_BODY} THEN json_array({_TEXT})
    ELSE json_array()
END
WHERE parts IS NULL
"""


def connect(path: Path) -> sqlite3.Connection:
    """A driver connection set up as the engine sets up each of its own (store/database.py)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


# -- the database -------------------------------------------------------------------------------


def build(rows: int, data: Path, rebuild: bool) -> Path:
    """The seeded database for `rows` messages, built once and reused (WAL checkpointed)."""
    path = data / f"messages-{rows}.db"
    if path.exists() and not rebuild:
        return path
    data.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".building")
    for stale in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
        stale.unlink(missing_ok=True)
    started = time.perf_counter()
    engine = sa.create_engine(f"sqlite:///{partial}")
    seed_messages(engine, rows, chunk=20_000)
    engine.dispose()
    with connect(partial) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    Path(f"{partial}-wal").unlink(missing_ok=True)
    Path(f"{partial}-shm").unlink(missing_ok=True)
    partial.rename(path)
    print(f"built {path} ({rows:,} rows) in {time.perf_counter() - started:.1f} s", flush=True)
    return path


def copy(source: Path, workdir: Path, label: str) -> Path:
    """A fresh copy, flushed to disk: otherwise the first fsync of the contender (SQLite syncs
    the database file at each WAL checkpoint) would pay for writing out the whole copy."""
    target = workdir / f"{label}.db"
    shutil.copyfile(source, target)
    with open(target, "rb+") as written:
        os.fsync(written.fileno())
    return target


# -- the contenders ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    rows: int
    seconds: float
    max_rss_kib: int | None = None
    run: RunFigures | None = None  # from the runner's own events

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def run_backfill(
    path: Path, rows: int, batch_size: int | None = None, *, python_only: bool = False
) -> Timing:
    """`backfill run body_to_parts` in a subprocess: wall time and its own peak RSS (wait4)."""
    command = [
        sys.executable,
        "-m",
        "backfill",
        "run",
        "body_to_parts",
        "--database-url",
        f"sqlite:///{path}",
        "--app",
        "chat_migrations:migrations",
    ]
    if batch_size is not None:
        command += ["--batch-size", str(batch_size)]
    if python_only:
        command.append("--python-only")
    events = path.with_suffix(".events.jsonl")
    events.unlink(missing_ok=True)
    command += ["--events", str(events)]
    # Start-up as a user's: with the bytecode cache Python writes, even where this shell says
    # not to (it would recompile backfill's modules on every start).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=path.parent, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    output = process.stdout.read()
    # wait4 gives the resources of this one child, unlike RUSAGE_CHILDREN (max over all).
    _pid, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"backfill exited {process.returncode}:\n{output.decode()}")
    run = read_run(events)
    events.unlink()
    return Timing(rows, seconds, usage.ru_maxrss, run)


def run_floor(path: Path, rows: int) -> Timing:
    conn = connect(path)
    started = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    updated = conn.execute(FLOOR_SQL).rowcount
    conn.execute("COMMIT")
    seconds = time.perf_counter() - started
    conn.close()
    assert updated == rows, (updated, rows)
    return Timing(rows, seconds)


def run_naive(path: Path, limit: int) -> Timing:
    """One row per transaction: select the next row, derive its parts in Python, update, commit."""
    conn = connect(path)
    select = (
        "SELECT id, body, thinking_content FROM messages"
        " WHERE id > ? AND parts IS NULL ORDER BY id LIMIT 1"
    )
    update = "UPDATE messages SET parts = ? WHERE id = ?"
    last, done = 0, 0
    started = time.perf_counter()
    while done < limit:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute(select, (last,)).fetchone()
        if row is None:
            conn.execute("COMMIT")
            break
        last, body, thinking = row
        parts = json.dumps(derive_parts(body, thinking), ensure_ascii=False)
        conn.execute(update, (parts, last))
        conn.execute("COMMIT")
        done += 1
    seconds = time.perf_counter() - started
    conn.close()
    return Timing(done, seconds)


# -- checking -----------------------------------------------------------------------------------


def _parts(path: Path, limit: int | None) -> Iterator[tuple[int, object]]:
    conn = sqlite3.connect(path)
    sql = "SELECT id, parts FROM messages ORDER BY id"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    try:
        for message_id, parts in conn.execute(sql):
            yield message_id, None if parts is None else json.loads(parts)
    finally:
        conn.close()


def check_equal(left: Path, right: Path, limit: int | None = None) -> int:
    """Rows compared; raises on the first row whose decoded parts differ (or are missing)."""
    return same_parts(_parts(left, limit), _parts(right, limit))


# -- the report ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="messages (default 1M)")
    parser.add_argument("--naive-rows", type=int, default=20_000, help="rows the naive loop does")
    parser.add_argument(
        "--memory-rows",
        type=int,
        help="smaller table for the memory comparison (default 100,000, or rows/10 below that)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the second table size")
    parser.add_argument("--batch-size", type=int, help="override the migration's batch size")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each contender, interleaved; best is kept"
    )
    parser.add_argument("--data", type=Path, default=DATA, help="where built databases are kept")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the seeded database")
    args = parser.parse_args(argv)
    rows = args.rows
    small = args.memory_rows or (100_000 if rows > 100_000 else max(rows // 10, 1))
    print(opening(f"SQLite {sqlite3.sqlite_version}"), flush=True)

    source = build(rows, args.data, args.rebuild)
    ours: list[Timing] = []
    floors: list[Timing] = []
    naives: list[Timing] = []
    pythons: list[Timing] = []
    with tempfile.TemporaryDirectory(dir=args.data, prefix="run-") as work:
        workdir = Path(work)
        for _ in range(args.repeat):
            backfilled = copy(source, workdir, "backfill")
            ours.append(run_backfill(backfilled, rows, args.batch_size))
            print(
                f"backfill  {ours[-1].seconds:8.2f} s  {ours[-1].rate:>10,.0f} rows/s", flush=True
            )

            floored = copy(source, workdir, "floor")
            floors.append(run_floor(floored, rows))
            print(f"(a) floor {floors[-1].seconds:8.2f} s  {floors[-1].rate:>10,.0f} rows/s")

            naive_db = copy(source, workdir, "naive")
            naives.append(run_naive(naive_db, min(args.naive_rows, rows)))
            print(
                f"(b) naive {naives[-1].seconds:8.2f} s  {naives[-1].rate:>10,.0f} rows/s"
                f"  (first {naives[-1].rows:,} rows, extrapolated: "
                f"{rows / naives[-1].rate:,.0f} s)",
                flush=True,
            )

            in_python = copy(source, workdir, "python")
            pythons.append(run_backfill(in_python, rows, args.batch_size, python_only=True))
            print(
                f"(c) python {pythons[-1].seconds:7.2f} s  {pythons[-1].rate:>10,.0f} rows/s",
                flush=True,
            )

        checked = check_equal(backfilled, floored)
        check_equal(in_python, floored)
        checked_naive = check_equal(naive_db, floored, naives[-1].rows)
        print(
            f"outputs equal: backfill = (c) = (a) on {checked:,} rows, "
            f"(b) = (a) on {checked_naive:,}"
        )
        in_python.unlink()
        backfilled.unlink()
        naive_db.unlink()
        floored.unlink()

        small_rss = None
        if not args.no_memory and small != rows:
            small_db = copy(build(small, args.data, args.rebuild), workdir, "small")
            small_rss = run_backfill(small_db, small, args.batch_size).max_rss_kib

    mine, floor, naive, python = best(ours), best(floors), best(naives), best(pythons)
    print()
    print(
        f"rows                 {rows:,}" + (f"  (best of {args.repeat})" if args.repeat > 1 else "")
    )
    print(f"backfill             {mine.rate:>12,.0f} rows/s  (whole command, start-up included)")
    print(f"(a) set-based UPDATE {floor.rate:>12,.0f} rows/s")
    print(f"(b) naive loop       {naive.rate:>12,.0f} rows/s")
    print(f"(c) --python-only    {python.rate:>12,.0f} rows/s")
    print(f"backfill / (a)       {mine.rate / floor.rate:12.2f}x   (target >= 0.7)")
    print(f"backfill / (b)       {mine.rate / naive.rate:12.2f}x   (target >= 5)")
    print(f"(c) / (a)            {python.rate / floor.rate:12.2f}x")
    print(f"(c) / (b)            {python.rate / naive.rate:12.2f}x")
    if args.repeat > 1:
        print(
            f"all runs: backfill {rates(ours)}; (a) {rates(floors)}; (b) {rates(naives)}; "
            f"(c) {rates(pythons)}"
        )
    if mine.run is not None:
        print(mine.run.summary(args.batch_size or "default"))
    big_mib = max(t.max_rss_kib or 0 for t in ours) / 1024
    if small_rss is not None:
        small_mib = small_rss / 1024
        print(f"peak RSS at {small:>9,} rows {small_mib:8.1f} MiB")
        print(f"peak RSS at {rows:>9,} rows {big_mib:8.1f} MiB")
        print(f"memory ratio {rows // small}x rows {big_mib / small_mib:8.2f}x")
    else:
        print(f"peak RSS at {rows:>9,} rows {big_mib:8.1f} MiB")


if __name__ == "__main__":
    main()

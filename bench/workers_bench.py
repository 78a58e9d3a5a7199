"""PostgreSQL benchmark of many workers on one migration: 1, 2 and 4 workers against one.

On the same template database of N generated legacy messages as bench/postgres_bench.py (built
once, `bench_messages_<N>`), each contender runs on its own `CREATE DATABASE ... TEMPLATE` copy,
after a CHECKPOINT:

- `backfill run body_to_parts --workers W` for W = 1, 2, 4, the whole command (the parent makes
  the plan, W worker processes work its shards), on the default SQL path and `--python-only`;
- `backfill run body_to_parts` (one runner, no plan), both paths, for reference;
- (a) the set-based UPDATE of bench/postgres_bench.py, the floor.

Repeats are interleaved (every contender once, then again); the best of each is kept. Printed
for each: rows/s, the ratio to 1 worker on the same path and to (a), and the rows the workers
read (the `rows_read` of every `batch` event in the shared `--events` file) as a ratio to the
table's rows. Outputs are checked equal to (a)'s (md5 of `parts::text` per 10,000 ids).

    python bench/workers_bench.py --rows 1000000 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from postgres_bench import build, check_equal, copy, drop, run_floor, server, url_of
from report import best, opening, rates

PATHS = {"sql": (), "python": ("--python-only",)}
WORKERS = (1, 2, 4)


@dataclass(frozen=True)
class Measured:
    rows: int
    seconds: float
    rows_read: int

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def run(database: str, rows: int, workers: int | None, extra: tuple[str, ...]) -> Measured:
    """`backfill run body_to_parts [--workers W]` as a user runs it, a whole subprocess."""
    command = [
        sys.executable, "-m", "backfill", "run", "body_to_parts", "--app",
        "chat_migrations:migrations", *extra,
    ]  # fmt: skip
    if workers is not None:
        command += ["--workers", str(workers)]
    with tempfile.TemporaryDirectory(prefix="backfill-bench-") as work:
        events = Path(work) / "events.jsonl"
        command += ["--events", str(events)]
        # The URL by the environment, as the workers get it.
        env = dict(os.environ, BACKFILL_DATABASE_URL=url_of(database))
        started = time.perf_counter()
        done = subprocess.run(
            command, cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"backfill exited {done.returncode}:\n{done.stdout}{done.stderr}")
        batches = [
            event
            for event in map(json.loads, events.read_text().splitlines())
            if event["event"] == "batch"
        ]
    return Measured(rows, seconds, sum(int(b["rows_read"]) for b in batches))


def label(path: str, workers: int | None) -> str:
    who = "one runner, no plan" if workers is None else f"--workers {workers}"
    return f"{'SQL path' if path == 'sql' else '--python-only'}, {who}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=1, help="interleaved runs; best kept")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the template database")
    args = parser.parse_args(argv)
    rows = args.rows
    print(opening(server()), flush=True)
    source = build(rows, args.rebuild)
    contenders = [(p, w) for p in PATHS for w in (None, *WORKERS)]
    found: dict[tuple[str, int | None], list[Measured]] = {c: [] for c in contenders}
    floors = []
    try:
        for _ in range(args.repeat):
            floored = copy(source, "floor")
            floors.append(run_floor(floored, rows))
            print(f"(a) set-based UPDATE {floors[-1].rate:>10,.0f} rows/s", flush=True)
            for path, workers in contenders:
                database = copy(source, "workers")
                measured = run(database, rows, workers, PATHS[path])
                found[(path, workers)].append(measured)
                checked = check_equal(database, floored)
                print(
                    f"{label(path, workers):40} {measured.rate:>10,.0f} rows/s, read "
                    f"{measured.rows_read / rows:.3f}x the table (checked {checked:,} rows)",
                    flush=True,
                )
                drop(database)
            drop(floored)
    finally:
        drop("bench_run_floor")
        drop("bench_run_workers")

    floor = best(floors).rate
    print()
    print(f"rows {rows:,}" + (f" (best of {args.repeat})" if args.repeat > 1 else ""))
    print(f"{'contender':40} {'rows/s':>10} {'/ 1 worker':>11} {'/ (a)':>7} {'read':>7}")
    print(f"{'(a) set-based UPDATE':40} {floor:>10,.0f} {'':>11} {1:>7.2f} {1:>7.3f}")
    for path, workers in contenders:
        mine, one = best(found[(path, workers)]), best(found[(path, 1)]).rate
        print(
            f"{label(path, workers):40} {mine.rate:>10,.0f} {mine.rate / one:>10.2f}x "
            f"{mine.rate / floor:>6.2f}x {mine.rows_read / rows:>6.3f}x"
        )
    if args.repeat > 1:
        for contender, runs in found.items():
            print(f"all runs, {label(*contender)}: {rates(runs)}")
        print(f"all runs, (a): {rates(floors)}")


if __name__ == "__main__":
    main()

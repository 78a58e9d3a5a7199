"""PostgreSQL benchmark of the flagship migration: backfill against the floor and a naive loop.

Builds a template database of N generated legacy messages once (kept on the server as
`bench_messages_<N>`, reused by later runs with the same N; loaded with COPY, then frozen and
analyzed), then times each contender on its own copy of it (`CREATE DATABASE ... TEMPLATE`),
after a CHECKPOINT, so every one starts from the same pages:

- backfill: `backfill run body_to_parts` as a user runs it, a whole subprocess (interpreter
  start-up included), default batch size. The flagship declares its SQL for PostgreSQL, so
  each batch is decided in the database (`SqlChange`);
- (a) the floor: one set-based `UPDATE messages SET parts = <the same parts built with
  jsonb_build_array/jsonb_build_object> WHERE parts IS NULL` in a single transaction;
- (b) a naive per-row loop, as hand-written migration code does it: select one row, compute
  its parts in Python, update it, commit; timed on the first rows only and extrapolated;
- (c) for information, `backfill run body_to_parts --python-only`: every row through the
  Python function, written back with one `UPDATE ... FROM unnest(...)` per batch.

Outputs are checked equal: per range of 10,000 ids, an md5 of the ids and `parts::text`
(jsonb's text form is canonical, so equal documents give equal text). Batch durations come
from the runner itself (its `--events` file: a `batch` event per committed batch, with the time
from the transaction's BEGIN to its COMMIT; bench/run_events.py). Peak memory (max RSS of
the backfill process) is
measured at two table sizes to show it stays flat.

    python bench/postgres_bench.py                 # 1,000,000 rows (several minutes)
    python bench/postgres_bench.py --rows 100000   # quick iteration
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
from typing import Any

import psycopg
import sqlalchemy as sa
from report import best, opening, rates
from run_events import RunFigures, read_run

from chat_migrations.generator import create_messages_table, generate_messages
from chat_migrations.parts import derive_parts

ADMIN_URL = os.environ.get(
    "BACKFILL_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
COLUMNS = ("id", "conversation_id", "role", "body", "thinking_content", "created_at")
BUILT = "backfill bench: {rows} generated messages, seed 42"

# Parts computed in SQL, exactly as derive_parts does: reasoning then text, empty or NULL
# values omitted, [] when neither.
_REASONING = "jsonb_build_object('type', 'reasoning', 'text', thinking_content)"
_TEXT = "jsonb_build_object('type', 'text', 'text', body)"
_HAS_THINKING = "coalesce(thinking_content, '') <> ''"
_HAS_BODY = "coalesce(body, '') <> ''"
FLOOR_SQL = f"""
UPDATE messages SET parts = CASE
    WHEN {_HAS_THINKING} AND {_HAS_BODY} THEN jsonb_build_array({_REASONING}, {_TEXT})
    WHEN {_HAS_THINKING} THEN jsonb_build_array({_REASONING})
    WHEN {_HAS_BODY} THEN jsonb_build_array({_TEXT})
    ELSE '[]'::jsonb
END
WHERE parts IS NULL
"""


def url_of(database: str) -> str:
    return sa.make_url(ADMIN_URL).set(database=database).render_as_string(hide_password=False)


def connect(database: str, autocommit: bool = False) -> psycopg.Connection[Any]:
    """A plain psycopg connection (what hand-written code and the floor use)."""
    url = sa.make_url(url_of(database))
    return psycopg.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        password=url.password,
        dbname=url.database,
        autocommit=autocommit,
    )


def admin() -> psycopg.Connection[Any]:
    return connect(sa.make_url(ADMIN_URL).database or "postgres", autocommit=True)


# -- the databases ------------------------------------------------------------------------------


def build(rows: int, rebuild: bool) -> str:
    """The template database for `rows` messages, built once and reused."""
    name = f"bench_messages_{rows}"
    with admin() as conn:
        found = conn.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
            (name,),
        ).fetchone()
        if found is not None and found[0] == BUILT.format(rows=rows) and not rebuild:
            return name
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    started = time.perf_counter()
    engine = sa.create_engine(url_of(name))
    create_messages_table(engine)
    engine.dispose()
    with connect(name) as conn, conn.cursor() as cursor:
        columns = ", ".join(COLUMNS)
        with cursor.copy(f"COPY messages ({columns}) FROM STDIN") as copy:
            for message in generate_messages(rows):
                copy.write_row(tuple(message[c] for c in COLUMNS))
    with connect(name, autocommit=True) as conn:
        # As an old, settled table is: hint bits set, all-visible, statistics known.
        conn.execute("VACUUM (FREEZE, ANALYZE) messages")
    with admin() as conn:
        conn.execute(f"COMMENT ON DATABASE \"{name}\" IS '{BUILT.format(rows=rows)}'")
    print(f"built {name} ({rows:,} rows) in {time.perf_counter() - started:.1f} s", flush=True)
    return name


def copy(source: str, label: str) -> str:
    """A fresh copy of `source`, then a CHECKPOINT so each contender starts alike."""
    target = f"bench_run_{label}"
    with admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{target}" TEMPLATE "{source}" STRATEGY FILE_COPY')
        conn.execute("CHECKPOINT")
    return target


def drop(database: str) -> None:
    with admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


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


def run_backfill(database: str, rows: int, batch_size: int | None = None, *extra: str) -> Timing:
    """`backfill run body_to_parts` in a subprocess: wall time, its own peak RSS (wait4) and
    the duration of each batch as the runner measured it."""
    command = [
        sys.executable, "-m", "backfill", "run", "body_to_parts",
        "--database-url", url_of(database), "--app", "chat_migrations:migrations", *extra,
    ]  # fmt: skip
    if batch_size is not None:
        command += ["--batch-size", str(batch_size)]
    with tempfile.TemporaryDirectory(prefix="backfill-bench-") as work:
        events = Path(work) / "events.jsonl"
        command += ["--events", str(events)]
        env = dict(os.environ)
        started = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
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
    return Timing(rows, seconds, usage.ru_maxrss, run)


def run_floor(database: str, rows: int) -> Timing:
    with connect(database) as conn:
        started = time.perf_counter()
        updated = conn.execute(FLOOR_SQL).rowcount
        conn.commit()
        seconds = time.perf_counter() - started
    assert updated == rows, (updated, rows)
    return Timing(rows, seconds)


def run_naive(database: str, limit: int) -> Timing:
    """One row per transaction: select the next row, derive its parts in Python, update, commit."""
    select = (
        "SELECT id, body, thinking_content FROM messages"
        " WHERE id > %s AND parts IS NULL ORDER BY id LIMIT 1"
    )
    update = "UPDATE messages SET parts = %s::jsonb WHERE id = %s"
    last, done = 0, 0
    with connect(database) as conn:
        started = time.perf_counter()
        while done < limit:
            row = conn.execute(select, (last,)).fetchone()
            if row is None:
                conn.commit()
                break
            last, body, thinking = row
            parts = json.dumps(derive_parts(body, thinking), ensure_ascii=False)
            conn.execute(update, (parts, last))
            conn.commit()
            done += 1
        seconds = time.perf_counter() - started
    return Timing(done, seconds)


# -- checking -----------------------------------------------------------------------------------


def _digests(database: str, up_to: int | None) -> list[tuple[int, str, int, int]]:
    """Per range of 10,000 ids: (range, md5 of ids and parts, rows, rows still without parts)."""
    where = "" if up_to is None else f"WHERE id <= {int(up_to)}"
    with connect(database) as conn:
        return [
            tuple(row)  # type: ignore[misc]
            for row in conn.execute(
                "SELECT id / 10000, md5(string_agg(id || ':' || coalesce(parts::text, 'NULL'),"
                " ',' ORDER BY id)), count(*), count(*) FILTER (WHERE parts IS NULL)"
                f" FROM messages {where} GROUP BY 1 ORDER BY 1"
            )
        ]


def check_equal(left: str, right: str, up_to: int | None = None) -> int:
    """Rows compared; raises on the first range whose parts differ (or are missing)."""
    compared = 0
    for ldigest, rdigest in zip(_digests(left, up_to), _digests(right, up_to), strict=True):
        if ldigest != rdigest or ldigest[3] != 0:
            raise SystemExit(f"outputs differ in id range {ldigest[0]}: {ldigest} != {rdigest}")
        compared += ldigest[2]
    return compared


# -- the report ---------------------------------------------------------------------------------


def server() -> str:
    with admin() as conn:
        version = conn.execute("SHOW server_version").fetchone()
        settings = [
            f"{name} {conn.execute(f'SHOW {name}').fetchone()[0]}"  # type: ignore[index]
            for name in ("shared_buffers", "max_wal_size", "synchronous_commit")
        ]
    return f"PostgreSQL {version[0] if version else '?'} ({', '.join(settings)})"


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
    parser.add_argument(
        "--no-python", action="store_true", help="skip (c), backfill with --python-only"
    )
    parser.add_argument("--batch-size", type=int, help="override the migration's batch size")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each contender, interleaved; best is kept"
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the template database")
    args = parser.parse_args(argv)
    rows = args.rows
    small = args.memory_rows or (100_000 if rows > 100_000 else max(rows // 10, 1))
    print(opening(server()), flush=True)

    source = build(rows, args.rebuild)
    ours: list[Timing] = []
    floors: list[Timing] = []
    naives: list[Timing] = []
    pythons: list[Timing] = []
    try:
        for _ in range(args.repeat):
            backfilled = copy(source, "backfill")
            ours.append(run_backfill(backfilled, rows, args.batch_size))
            print(
                f"backfill  {ours[-1].seconds:8.2f} s  {ours[-1].rate:>10,.0f} rows/s", flush=True
            )

            floored = copy(source, "floor")
            floors.append(run_floor(floored, rows))
            print(f"(a) floor {floors[-1].seconds:8.2f} s  {floors[-1].rate:>10,.0f} rows/s")

            naive_db = copy(source, "naive")
            naives.append(run_naive(naive_db, min(args.naive_rows, rows)))
            print(
                f"(b) naive {naives[-1].seconds:8.2f} s  {naives[-1].rate:>10,.0f} rows/s"
                f"  (first {naives[-1].rows:,} rows, extrapolated: "
                f"{rows / naives[-1].rate:,.0f} s)",
                flush=True,
            )

            if not args.no_python:
                python_db = copy(source, "python")
                pythons.append(run_backfill(python_db, rows, args.batch_size, "--python-only"))
                print(
                    f"(c) --python-only {pythons[-1].seconds:8.2f} s  "
                    f"{pythons[-1].rate:>10,.0f} rows/s",
                    flush=True,
                )

        checked = check_equal(backfilled, floored)
        checked_naive = check_equal(naive_db, floored, naives[-1].rows)
        line = f"outputs equal: backfill = (a) on {checked:,} rows, (b) = (a) on {checked_naive:,}"
        if pythons:
            line += f", (c) = (a) on {check_equal(python_db, floored):,}"
        print(line)
        for database in ("backfill", "floor", "naive", "python"):
            drop(f"bench_run_{database}")

        small_rss = None
        if not args.no_memory and small != rows:
            small_db = copy(build(small, args.rebuild), "small")
            small_rss = run_backfill(small_db, small, args.batch_size).max_rss_kib
            drop(small_db)
    finally:
        for database in ("backfill", "floor", "naive", "python", "small"):
            drop(f"bench_run_{database}")

    mine, floor, naive = best(ours), best(floors), best(naives)
    print()
    print(
        f"rows                 {rows:,}" + (f"  (best of {args.repeat})" if args.repeat > 1 else "")
    )
    print(f"backfill             {mine.rate:>12,.0f} rows/s  (whole command, start-up included)")
    print(f"(a) set-based UPDATE {floor.rate:>12,.0f} rows/s")
    print(f"(b) naive loop       {naive.rate:>12,.0f} rows/s")
    if pythons:
        print(f"(c) --python-only    {best(pythons).rate:>12,.0f} rows/s")
    print(f"backfill / (a)       {mine.rate / floor.rate:12.2f}x   (target >= 0.5)")
    print(f"backfill / (b)       {mine.rate / naive.rate:12.2f}x   (target >= 20)")
    if pythons:
        print(f"(c) / (a)            {best(pythons).rate / floor.rate:12.2f}x")
    if args.repeat > 1:
        print(f"all runs: backfill {rates(ours)}; (a) {rates(floors)}; (b) {rates(naives)}")
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

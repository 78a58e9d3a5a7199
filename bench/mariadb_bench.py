"""MariaDB benchmark of the flagship's Python path: backfill's set-based write against the floor
and against the UPDATE per row it replaces.

Builds a database of N generated legacy messages once (kept on the server as
`bench_messages_<N>`, reused by later runs with the same N), then times each contender on its
own copy of its table (`CREATE TABLE ... LIKE`, `INSERT ... SELECT`, in a database of its own),
the contenders interleaved when repeated:

- (a) the floor: one set-based `UPDATE messages SET parts = <the same parts built with
  JSON_ARRAY/JSON_OBJECT> WHERE parts IS NULL` in a single transaction;
- (c) `backfill run body_to_parts --python-only` as a user runs it, a whole subprocess
  (interpreter start-up included), default batch size: every row through the Python function,
  each batch written with one `UPDATE ... JOIN (<rows>)` (the flagship declares no SQL for
  MySQL, so this is also what a plain `run` does there);
- (d) for reference, the same command with the write as it was before: one UPDATE per row
  (PyMySQL's `executemany`), a copy of which this script puts in place of `TableWrites.write` in
  the subprocess (`OLD_WRITE`); the product has no switch for it.

Outputs are checked equal: (c) and (d) byte for byte (the same text written two ways), and
(c) against (a) as decoded JSON (MariaDB's JSON_OBJECT writes a space after each colon and
comma, Python's encoder does not). Batch durations come from the runner's `--events` file
(bench/run_events.py).

    python bench/mariadb_bench.py --rows 300000              # the figure the README quotes
    python bench/mariadb_bench.py --rows 100000 --repeat 3   # quicker, best of three
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql
import sqlalchemy as sa
from report import best, opening, rates, same_parts
from run_events import RunFigures, read_run

from chat_migrations.generator import create_messages_table, generate_messages

ADMIN_URL = os.environ.get("BACKFILL_BENCH_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/")
COLUMNS = ("id", "conversation_id", "role", "body", "thinking_content", "created_at")
BUILT = "backfill bench: {rows} generated messages, seed 42"
CONTENDERS = ("floor", "python", "per_row")

# Parts computed in SQL, as derive_parts does: reasoning then text, empty or NULL values
# omitted, [] when neither.
_REASONING = "JSON_OBJECT('type', 'reasoning', 'text', thinking_content)"
_TEXT = "JSON_OBJECT('type', 'text', 'text', body)"
_HAS_THINKING = "coalesce(thinking_content, '') <> ''"
_HAS_BODY = "coalesce(body, '') <> ''"
FLOOR_SQL = f"""
UPDATE messages SET parts = CASE
    WHEN {_HAS_THINKING} AND {_HAS_BODY} THEN JSON_ARRAY({_REASONING}, {_TEXT})
    WHEN {_HAS_THINKING} THEN JSON_ARRAY({_REASONING})
    WHEN {_HAS_BODY} THEN JSON_ARRAY({_TEXT})
    ELSE JSON_ARRAY()
END
WHERE parts IS NULL
"""

# (d): the CLI with TableWrites.write as it was before set-based MySQL writes.
OLD_WRITE = '''
from backfill.store import writes
from backfill.store.database import driver


def write(self, conn, writes):
    """Write every changed row, a group of rows changing the same columns at a time."""
    raw = driver(conn).cursor()
    try:
        for names, rows in writes.groups.items():
            statement = self._write_statement(names)
            if statement.order is not None or statement.constants:
                rows = [statement.params(row) for row in rows]
            raw.executemany(statement.sql, rows)
    finally:
        raw.close()


writes.TableWrites.write = write
from backfill.cli import main

main()
'''


def url_of(database: str) -> str:
    return sa.make_url(ADMIN_URL).set(database=database).render_as_string(hide_password=False)


def connect(database: str | None = None) -> pymysql.Connection:
    """A plain PyMySQL connection (what the floor and the checks use)."""
    url = sa.make_url(ADMIN_URL)
    return pymysql.connect(
        host=url.host or "127.0.0.1",
        port=url.port or 3306,
        user=url.username or "root",
        password=url.password or "",
        database=database,
        charset="utf8mb4",
    )


def execute(sql: str, database: str | None = None) -> list[tuple[Any, ...]]:
    with connect(database) as conn, conn.cursor() as cursor:
        cursor.execute(sql)
        found = list(cursor.fetchall())
        conn.commit()
    return found


# -- the databases ------------------------------------------------------------------------------


def build(rows: int, rebuild: bool) -> str:
    """The source database for `rows` messages, built once and reused."""
    name = f"bench_messages_{rows}"
    comment = BUILT.format(rows=rows)
    found = execute(
        "SELECT table_comment FROM information_schema.tables "
        f"WHERE table_schema = '{name}' AND table_name = 'messages'"
    )
    if found and found[0][0] == comment and not rebuild:
        return name
    execute(f"DROP DATABASE IF EXISTS `{name}`")
    execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    started = time.perf_counter()
    engine = sa.create_engine(url_of(name))
    create_messages_table(engine)
    engine.dispose()
    insert = f"INSERT INTO messages ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * 6)})"
    with connect(name) as conn, conn.cursor() as cursor:
        for chunk in _chunks(generate_messages(rows), 5_000):
            cursor.executemany(insert, [tuple(m[c] for c in COLUMNS) for m in chunk])
        cursor.execute(f"ALTER TABLE messages COMMENT = '{comment}'")
        cursor.execute("ANALYZE TABLE messages")
        cursor.fetchall()
        conn.commit()
    print(f"built {name} ({rows:,} rows) in {time.perf_counter() - started:.1f} s", flush=True)
    return name


def _chunks(messages: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for message in messages:
        chunk.append(message)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def copy(source: str, label: str) -> str:
    """A fresh copy of `source`'s table in a database of its own."""
    target = f"bench_run_{label}"
    drop(target)
    execute(f"CREATE DATABASE `{target}` CHARACTER SET utf8mb4")
    execute(f"CREATE TABLE `{target}`.messages LIKE `{source}`.messages")
    execute(f"INSERT INTO `{target}`.messages SELECT * FROM `{source}`.messages")
    return target


def drop(database: str) -> None:
    execute(f"DROP DATABASE IF EXISTS `{database}`")


# -- the contenders ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    rows: int
    seconds: float
    run: RunFigures | None = None  # from the runner's own events

    @property
    def rate(self) -> float:
        return self.rows / self.seconds


def run_backfill(database: str, rows: int, batch_size: int | None, old_write: bool) -> Timing:
    """`backfill run body_to_parts --python-only` in a subprocess: wall time and the duration
    of each batch as the runner measured it; with `old_write`, the write per row of before."""
    start = [sys.executable, "-c", OLD_WRITE] if old_write else [sys.executable, "-m", "backfill"]
    command = [
        *start, "run", "body_to_parts", "--python-only",
        "--database-url", url_of(database), "--app", "chat_migrations:migrations",
    ]  # fmt: skip
    if batch_size is not None:
        command += ["--batch-size", str(batch_size)]
    with tempfile.TemporaryDirectory(prefix="backfill-bench-") as work:
        events = Path(work) / "events.jsonl"
        command += ["--events", str(events)]
        started = time.perf_counter()
        done = subprocess.run(
            command, cwd=work, stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"backfill exited {done.returncode}:\n{done.stdout}{done.stderr}")
        run = read_run(events)
    return Timing(rows, seconds, run)


def run_floor(database: str, rows: int) -> Timing:
    with connect(database) as conn, conn.cursor() as cursor:
        started = time.perf_counter()
        updated = cursor.execute(FLOOR_SQL)
        conn.commit()
        seconds = time.perf_counter() - started
    assert updated == rows, (updated, rows)
    return Timing(rows, seconds)


# -- checking -----------------------------------------------------------------------------------


def check_same_bytes(left: str, right: str) -> int:
    """Rows compared; raises unless every row's parts are the same bytes in both."""
    [(rows, differ)] = execute(
        "SELECT count(*), coalesce(sum(NOT (BINARY l.parts <=> BINARY r.parts)"
        " OR l.parts IS NULL), 0)"
        f" FROM `{left}`.messages l JOIN `{right}`.messages r USING (id)"
    )
    if differ:
        raise SystemExit(f"{left} and {right} differ on {differ} rows")
    return int(rows)


def _parts(database: str) -> Iterator[tuple[int, Any]]:
    with connect(database) as conn:
        cursor = conn.cursor(pymysql.cursors.SSCursor)
        cursor.execute("SELECT id, parts FROM messages ORDER BY id")
        for found in cursor:
            yield found[0], None if found[1] is None else json.loads(found[1])


def check_same_json(left: str, right: str) -> int:
    """Rows compared; raises on the first row whose parts differ as decoded JSON."""
    return same_parts(_parts(left), _parts(right))


# -- the report ---------------------------------------------------------------------------------


def server() -> str:
    [(version, pool, flush, packet)] = execute(
        "SELECT version(), @@innodb_buffer_pool_size, @@innodb_flush_log_at_trx_commit,"
        " @@max_allowed_packet"
    )
    return (
        f"MariaDB {version} (innodb_buffer_pool_size {int(pool) // 2**20} MiB, "
        f"innodb_flush_log_at_trx_commit {flush}, max_allowed_packet {int(packet) // 2**20} MiB)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000, help="messages (default 300,000)")
    parser.add_argument("--batch-size", type=int, help="override the migration's batch size")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each contender, interleaved; best is kept"
    )
    parser.add_argument("--no-per-row", action="store_true", help="skip (d), the old write")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the source database")
    args = parser.parse_args(argv)
    rows = args.rows
    print(opening(server()), flush=True)

    source = build(rows, args.rebuild)
    floors: list[Timing] = []
    pythons: list[Timing] = []
    per_rows: list[Timing] = []
    try:
        for _ in range(args.repeat):
            floor_db = copy(source, "floor")
            floors.append(run_floor(floor_db, rows))
            print(
                f"(a) floor         {floors[-1].seconds:8.2f} s  {floors[-1].rate:>10,.0f} rows/s"
            )

            python_db = copy(source, "python")
            pythons.append(run_backfill(python_db, rows, args.batch_size, old_write=False))
            print(
                f"(c) --python-only {pythons[-1].seconds:8.2f} s  "
                f"{pythons[-1].rate:>10,.0f} rows/s",
                flush=True,
            )

            if not args.no_per_row:
                per_row_db = copy(source, "per_row")
                per_rows.append(run_backfill(per_row_db, rows, args.batch_size, old_write=True))
                print(
                    f"(d) per-row write {per_rows[-1].seconds:8.2f} s  "
                    f"{per_rows[-1].rate:>10,.0f} rows/s",
                    flush=True,
                )

        line = f"outputs equal: (c) = (a) as JSON on {check_same_json(python_db, floor_db):,} rows"
        if per_rows:
            line += f", (c) = (d) byte for byte on {check_same_bytes(python_db, per_row_db):,}"
        print(line)
    finally:
        for label in CONTENDERS:
            drop(f"bench_run_{label}")

    floor, python = best(floors), best(pythons)
    print()
    print(
        f"rows                 {rows:,}" + (f"  (best of {args.repeat})" if args.repeat > 1 else "")
    )
    print(f"(a) set-based UPDATE {floor.rate:>12,.0f} rows/s")
    print(f"(c) --python-only    {python.rate:>12,.0f} rows/s  (whole command, start-up included)")
    if per_rows:
        print(f"(d) per-row write    {best(per_rows).rate:>12,.0f} rows/s  (the same, as before)")
    print(f"(c) / (a)            {python.rate / floor.rate:12.2f}x   (target >= 0.4)")
    if per_rows:
        print(f"(d) / (a)            {best(per_rows).rate / floor.rate:12.2f}x")
        print(f"(c) / (d)            {python.rate / best(per_rows).rate:12.2f}x")
    if args.repeat > 1:
        line = f"all runs: (a) {rates(floors)}; (c) {rates(pythons)}"
        print(line + (f"; (d) {rates(per_rows)}" if per_rows else ""))
        # Each round's contenders ran one after the other: their ratio shares the machine's load.
        rounds = ", ".join(f"{c.rate / a.rate:.2f}" for a, c in zip(floors, pythons, strict=True))
        print(f"(c) / (a) per round  {rounds}")
    if python.run is not None:
        print(python.run.summary(args.batch_size or "default"))


if __name__ == "__main__":
    main()

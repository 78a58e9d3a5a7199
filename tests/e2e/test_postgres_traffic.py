"""`body_to_parts` on PostgreSQL while the chat application keeps writing.

While a real `backfill run` walks more than 50,000 messages, writer threads of the test play the
application during the rollout:

- the *old* code inserts legacy messages (`body`/`thinking_content` only, `parts` SQL NULL), some
  at keys the runner has already passed (free ids behind the cursor) and some ahead of it;
- the *new* code edits existing messages with a dual write (`body`, `thinking_content` and the
  `parts` derived from them, in one transaction), mostly just ahead of the cursor, where the
  runner is reading and locking.

Afterwards no edit is lost and no row holds `parts` derived from an older `body` (the batch's
`SELECT ... FOR UPDATE` makes an edit wait for the batch, or the batch for the edit, and the batch
decides on what it locked); `verify` finds exactly the legacy rows inserted behind the cursor,
and `run --restart` migrates them, leaving every row's `parts` equal to what its final legacy
fields give.

Run both ways a user may run it: by default (the flagship declares its transform in SQL for
PostgreSQL, so each batch locks its keys and updates in the database) and with `--python-only`
(each batch reads the rows, calls the function, writes the parts back): there the `FOR UPDATE`
is what keeps an edit from being overwritten, and this test fails without it.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from backfill.store.database import Database
from chat_migrations import derive_parts
from chat_migrations.generator import seed_messages
from support import backfill_command, cli_env

SEEDED = 52_500
GAP = 25  # every 25th id is deleted after seeding: free keys for old code to insert at
EDITORS = 2
BATCH = "250"
NAME = "body_to_parts"


class App:
    """The application's writers, each a thread with a connection of its own."""

    def __init__(self, url: str, existing: list[int], free: list[int]) -> None:
        self.engine = sa.create_engine(url, poolclass=NullPool)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.existing = existing
        self.free = free
        self.lock = threading.Lock()
        # id -> (body, thinking_content) of the last edit each editor committed on it
        self.edits: dict[int, tuple[str, str | None]] = {}
        self.edit_count = 0
        self.inserted: dict[int, tuple[str, str | None]] = {}
        self.inserted_behind: set[int] = set()  # at or below the cursor when inserted
        self.threads = [
            threading.Thread(target=self._guard, args=(self._insert_legacy,), daemon=True),
            *(
                threading.Thread(target=self._guard, args=(self._edit, k), daemon=True)
                for k in range(EDITORS)
            ),
        ]

    def __enter__(self) -> App:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        self.engine.dispose()

    def _guard(self, work: Callable[..., None], *args: Any) -> None:
        try:
            work(*args)
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.errors.append(error)

    @staticmethod
    def cursor(conn: sa.Connection) -> int:
        found = conn.execute(
            sa.text("SELECT cursor FROM _migrations WHERE name = :name"), {"name": NAME}
        ).scalar()
        return 0 if found is None else int(json.loads(found)[0])

    def _insert_legacy(self) -> None:
        """Old code: new messages with the legacy fields only, parts left SQL NULL."""
        rng = random.Random(1)
        free = list(self.free)
        rng.shuffle(free)
        n = 0
        with self.engine.connect() as conn:
            while free and not self.stop.wait(0.002):
                cursor = self.cursor(conn)
                conn.commit()
                behind = [i for i in free if i <= cursor]
                pick = behind[0] if behind and rng.random() < 0.5 else free[-1]
                free.remove(pick)
                n += 1
                body = f"legacy insert {n}: {rng.choice(['hello', 'olá', '你好', ''])}"
                thinking = rng.choice([None, "", f"old thought {n}"])
                with conn.begin():
                    conn.execute(
                        sa.text(
                            "INSERT INTO messages (id, conversation_id, role, body, "
                            "thinking_content, created_at) VALUES (:id, 0, 'user', :body, "
                            ":thinking, :at)"
                        ),
                        {"id": pick, "body": body, "thinking": thinking, "at": datetime.now(UTC)},
                    )
                with self.lock:
                    self.inserted[pick] = (body, thinking)
                    if pick <= cursor:
                        self.inserted_behind.add(pick)

    def _edit(self, k: int) -> None:
        """New code: body, thinking and parts in one transaction (dual write)."""
        rng = random.Random(100 + k)
        mine = [i for i in self.existing if i % EDITORS == k]
        n = 0
        with self.engine.connect() as conn:
            while not self.stop.is_set():
                cursor = self.cursor(conn)
                conn.commit()
                if rng.random() < 0.8:
                    # Just ahead of the cursor: the rows the runner is about to lock and read.
                    near = [i for i in mine if cursor < i <= cursor + 600]
                    target = rng.choice(near or mine)
                else:
                    target = rng.choice(mine)
                n += 1
                body = f"edit {k}-{n} {rng.choice(['short', 'a longer reply ✓', ''])}"
                thinking = rng.choice([None, "", f"new thought {k}-{n}"])
                parts = json.dumps(derive_parts(body, thinking))
                with conn.begin():
                    conn.execute(
                        sa.text(
                            "UPDATE messages SET body = :body, thinking_content = :thinking, "
                            "parts = CAST(:parts AS jsonb) WHERE id = :id"
                        ),
                        {"id": target, "body": body, "thinking": thinking, "parts": parts},
                    )
                with self.lock:
                    self.edits[target] = (body, thinking)
                    self.edit_count += 1


def all_messages(engine: sa.Engine) -> dict[int, tuple[Any, Any, Any]]:
    with engine.connect() as conn:
        found = conn.execute(
            sa.text("SELECT id, body, thinking_content, parts FROM messages ORDER BY id")
        )
        return {r[0]: (r[1], r[2], r[3]) for r in found}


def cli(url: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        backfill_command(*args, "--database-url", url),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("path", [(), ("--python-only",)], ids=["declared-sql", "python-only"])
def test_live_traffic_loses_no_edit_and_restart_catches_rows_behind_the_cursor(postgres_url, path):
    db = Database(postgres_url)
    engine = sa.create_engine(postgres_url, poolclass=NullPool)
    try:
        seed_messages(db.engine, SEEDED)
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM messages WHERE id % :gap = 0"), {"gap": GAP})
        db.ensure_schema()
        existing = [i for i in range(1, SEEDED + 1) if i % GAP]
        free = [i for i in range(1, SEEDED + 1) if i % GAP == 0]
        assert len(existing) >= 50_000

        with App(postgres_url, existing, free) as app:
            run = cli(postgres_url, "run", NAME, "--batch-size", BATCH, "--json", *path)
        assert not app.errors, app.errors
        assert run.returncode == 0, run.stdout + run.stderr
        assert json.loads(run.stdout)[NAME]["state"] == "success"
        # The writers did meet the run.
        assert app.edit_count >= 100, app.edit_count
        assert len(app.inserted_behind) >= 5, len(app.inserted_behind)

        stored = all_messages(engine)
        # No edit lost, none overwritten with parts derived from an older body.
        for message_id, (body, thinking) in app.edits.items():
            assert stored[message_id][:2] == (body, thinking), message_id
            assert stored[message_id][2] == derive_parts(body, thinking), message_id
        unmigrated = {i for i, (_, _, parts) in stored.items() if parts is None}
        wrong = [
            i
            for i, (body, thinking, parts) in stored.items()
            if parts is not None and parts != derive_parts(body, thinking)
        ]
        assert not wrong, f"{len(wrong)} rows with stale parts, e.g. {wrong[:5]}"
        # Only old code's inserts are without parts: those the runner had already passed.
        assert unmigrated <= set(app.inserted)
        assert app.inserted_behind <= unmigrated

        verify = cli(postgres_url, "verify", NAME, "--json")
        assert verify.returncode == 1, verify.stdout + verify.stderr
        found = json.loads(verify.stdout)[NAME]
        assert (found["remaining"], found["raising"]) == (len(unmigrated), 0)
        assert set(found["sample_ids"]) <= unmigrated and found["sample_ids"]

        restart = cli(postgres_url, "run", NAME, "--restart", "--json", *path)
        assert restart.returncode == 0, restart.stdout + restart.stderr
        status = json.loads(restart.stdout)[NAME]
        assert status["state"] == "success"
        assert status["progress"]["processed"] == status["progress"]["total"] == len(stored)
        assert status["changed"] == len(unmigrated)

        final = all_messages(engine)
        assert final.keys() == stored.keys()
        for message_id, (body, thinking, parts) in final.items():
            assert (body, thinking) == stored[message_id][:2], message_id
            assert parts == derive_parts(body, thinking), message_id
        clean = cli(postgres_url, "verify", NAME, "--json")
        assert clean.returncode == 0, clean.stdout + clean.stderr
    finally:
        engine.dispose()
        db.dispose()

"""backup and restore on SQLite, PostgreSQL and MariaDB: a backup taken while an app writes holds,
row for row, what a read in its own snapshot sees, and restore puts exactly that back, parents
before children (a copy whose target has a foreign key to its source); the migrations over the
restored tables are pending after it, with nothing verified; a restore is refused while a run
holds one of them; a prod run without a recent backup asks again."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from backfill import LeaseHeld, Migrations, Row, Runner, State
from backfill.store import backup as snapshots

metadata = sa.MetaData()
parents = sa.Table(
    "parents",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("data", sa.JSON),
    sa.Column("at", sa.DateTime),
    sa.Column("blob", sa.LargeBinary),
)
children = sa.Table(
    "children",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("parent_id", sa.Integer, sa.ForeignKey("parents.id"), nullable=False),
    sa.Column("label", sa.Text),
)

app = Migrations()


@app.copy(source=parents, target=children, batch_size=40)
def copy_to_children(row: Row) -> dict[str, object]:
    """Each parent gets a child (whose key points back at it)."""
    return {"id": row["id"], "parent_id": row["id"], "label": row["name"].upper()}


@pytest.fixture
def engine(database_url):
    engine = sa.create_engine(database_url, poolclass=NullPool)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(parents),
            [
                {
                    "id": i,
                    "name": f"p{i} — ünïcode",
                    "data": {"n": i, "tags": ["a", "b"]} if i % 3 else None,
                    "at": None if i % 5 == 0 else datetime(2026, 1, 1, 12, 30, i % 60, 1234),
                    "blob": bytes([i % 256, 0, 255]) if i % 4 == 0 else None,
                }
                for i in range(1, 201)
            ],
        )
    yield engine
    engine.dispose()


def raw(conn: sa.Connection, table: sa.Table) -> list[tuple]:
    columns = [sa.type_coerce(c, sa.types.NullType()) for c in table.columns]
    return [tuple(r) for r in conn.execute(sa.select(*columns).order_by(table.c.id))]


class AppWrites:
    """An app writing while the backup runs: new parents with children, and edits."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine, self.stop, self.next = engine, threading.Event(), 1000
        self.thread = threading.Thread(target=self._write, daemon=True)

    def _write(self) -> None:
        while not self.stop.is_set():
            with self.engine.begin() as conn:
                conn.execute(sa.insert(parents).values(id=self.next, name="new", data=[1]))
                conn.execute(
                    sa.insert(children).values(id=self.next, parent_id=self.next, label="x")
                )
                conn.execute(
                    sa.update(parents)
                    .where(parents.c.id == self.next % 200 + 1)
                    .values(name=f"edited {self.next}")
                )
            self.next += 1
            time.sleep(0.002)

    def __enter__(self) -> AppWrites:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join()


def test_restore_puts_back_exactly_what_the_backup_saw_while_the_app_wrote(
    database_url, engine, tmp_path
):
    runner = Runner(database_url, app)
    runner.run(["copy_to_children"])
    seen: dict[str, list[tuple]] = {}

    def read_in_the_snapshot(conn: sa.Connection, tables: list[sa.Table]) -> None:
        time.sleep(0.2)  # the app goes on writing meanwhile
        seen.update({t.name: raw(conn, t) for t in tables})

    folder = tmp_path / "backup"
    with AppWrites(engine) as writes:
        time.sleep(0.1)
        info = snapshots.take(
            engine,
            [("parents", None), ("children", None)],
            folder,
            database="test",
            migrations=["copy_to_children"],
            now=time.time(),
            also=read_in_the_snapshot,
        )
        time.sleep(0.2)
    assert writes.next > 1010, "the app wrote during the backup"
    assert info.tables == ["parents", "children"]  # parents first
    assert info.rows == len(seen["parents"]) + len(seen["children"])
    with engine.connect() as conn:
        assert len(raw(conn, parents)) > len(seen["parents"])  # written after the snapshot

    result = runner.restore(folder)
    assert result.migrations == ["copy_to_children"] and result.rows == info.rows
    with engine.connect() as conn:
        assert raw(conn, parents) == seen["parents"]
        assert raw(conn, children) == seen["children"]
    status = runner.status()["copy_to_children"]
    assert (status.state, status.processed, status.verified) == (State.PENDING, 0, None)
    [restored] = runner.history("copy_to_children", limit=1)
    assert (restored.kind, restored.backup) == ("restore", str(folder.absolute()))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["migrations"] == ["copy_to_children"]
    assert [t["rows"] for t in manifest["tables"]] == [len(seen["parents"]), len(seen["children"])]
    runner.db.dispose()


def test_backup_is_recorded_and_restore_waits_for_no_live_run(database_url, engine, tmp_path):
    runner = Runner(database_url, app)
    runner.run(["copy_to_children"])
    runner.verify("copy_to_children")
    info = runner.backup(output=tmp_path / "b1")
    status = runner.status()["copy_to_children"]
    assert status.backup == (info.path, info.taken_at)
    assert status.to_json()["backup"]["path"] == str(tmp_path / "b1")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE _migrations SET state = 'inProgress', heartbeat_at = :t, "
                "runner_host = 'elsewhere', runner_pid = 7"
            ),
            {"t": time.time()},
        )
    with pytest.raises(LeaseHeld, match="elsewhere"):
        runner.restore(info.path)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE _migrations SET heartbeat_at = 1.0"))
    assert runner.restore(info.path).migrations == ["copy_to_children"]
    runner.db.dispose()


def test_a_prod_run_without_a_recent_backup_asks_again(cli, sqlite_url, tmp_path: Path):
    assert cli("demo", "--messages", "300", "--seed-only", "--yes").returncode == 0
    refused = cli("run", "body_to_parts", "--prod", "--yes")
    assert refused.returncode == 2, refused.stderr
    assert "no backup of its tables in the last 24 hours (never backed up)" in refused.stderr
    assert "--no-backup-check" in refused.stderr
    taken = cli("backup", "body_to_parts", "--output", str(tmp_path / "b"), "--json")
    assert taken.returncode == 0, taken.stderr
    assert json.loads(taken.stdout)["tables"] == ["messages"]
    done = cli("run", "body_to_parts", "--prod", "--yes", "--no-undo")
    assert done.returncode == 0, done.stderr
    again = cli("run", "body_to_parts", "--prod", "--yes", "--restart", "--no-backup-check")
    assert again.returncode == 0, again.stderr

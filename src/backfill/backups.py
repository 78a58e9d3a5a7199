"""`backup` and `restore`: a snapshot of the tables migrations touch (store.backup), recorded on
those migrations, and putting one back: then no gate trusts what it rolled back (each migration
over those tables is `pending`, its verify, undo log and progress forgotten), with a history
row for each."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from backfill import lease as leases
from backfill.definition import Migration
from backfill.errors import BackfillError, Refused
from backfill.history import Kind
from backfill.revert import NO_REVERT
from backfill.setting import Setting
from backfill.state import State
from backfill.store import backup as snapshots
from backfill.store import history, records, undo
from backfill.store.backup import BackupInfo, TableName

log = logging.getLogger("backfill")

# What a restore leaves of a migration's row: as after a reset, and nothing it had checked.
_RESTORED = {
    **NO_REVERT,
    "verified_at": None,
    "verified_remaining": None,
    "verified_raising": None,
    "undo": None,
    "unlogged": False,
}


@dataclass(frozen=True)
class RestoreResult:
    path: str
    tables: list[str]
    rows: int
    migrations: list[str]  # set to pending

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "tables": self.tables,
            "rows": self.rows,
            "migrations": self.migrations,
        }


def touched(migrations: Sequence[Migration]) -> list[TableName]:
    """The tables `migrations` touch (each one's table, and a copy's target), once each."""
    found: list[TableName] = []
    for migration in migrations:
        for table in (migration.table, migration.target):
            if table is not None and (table.name, table.schema) not in found:
                found.append((table.name, table.schema))
    return found


def default_folder(database: str | None, now: float) -> Path:
    """`./backfill-backups/<database>-<UTC time>`."""
    moment = datetime.fromtimestamp(now, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    stem = Path(database or "database").stem or "database"
    return Path("backfill-backups") / f"{stem}-{moment}"


class Backups:
    """Backups of `setting`'s database, for the migrations of a registry."""

    def __init__(self, setting: Setting, every: Sequence[Migration]) -> None:
        self.setting, self.db, self.every = setting, setting.db, list(every)

    def take(
        self,
        chosen: Sequence[Migration],
        folder: Path | None = None,
        *,
        also: Callable[[sa.Connection, list[sa.Table]], None] | None = None,
    ) -> BackupInfo:
        """Back up the tables `chosen` touch into `folder` (by default a new one under
        ./backfill-backups), and record it on them where this user may write."""
        now = self.setting.clock()
        target = folder or default_folder(self.db.engine.url.database, now)
        names = [m.name for m in chosen]
        with self.db.unavailable_as_error():
            info = snapshots.take(
                self.db.engine,
                touched(chosen),
                target.absolute(),
                database=self.db.display_url,
                migrations=names,
                now=now,
                also=also,
            )
        try:
            with self.db.unavailable_as_error(), self.db.write() as conn:
                for name in names:
                    records.ensure_record(conn, name)
                    records.annotate(conn, name, backup_path=info.path, backup_at=now)
        except BackfillError as error:
            log.warning("backup %s: not recorded on the migrations (%s)", info.path, error)
        return info

    def restore(self, folder: Path) -> RestoreResult:
        """Put the backup in `folder` back, in one transaction. Refused while a run (or a
        revert) holds a migration over its tables."""
        manifest = snapshots.read_manifest(folder)
        tables = {(t["name"], t["schema"]) for t in manifest["tables"]}
        over = [m.name for m in self.every if set(touched([m])) & tables]
        setting, path = self.setting, str(folder.absolute())
        for name in over:  # at once, without waiting for a runner's write lock
            leases.refuse_if_held(
                self.db, name, now=setting.clock(), lease=setting.lease_seconds, me=setting.me
            )
        with self.db.unavailable_as_error(), self.db.write() as conn:
            for name in over:
                records.lock(conn, name)
            found = {name: records.load(conn, name) for name in over}
            for name, record in found.items():
                leases.refuse_if_live(name, record, setting.observed(record), setting.seen())
            rows = snapshots.put_back(conn, folder, manifest)
            for record in found.values():
                if record is not None:
                    self._forget(conn, record, path)
        return RestoreResult(path, [t["name"] for t in manifest["tables"]], rows, over)

    def _forget(self, conn: sa.Connection, record: records.Record, path: str) -> None:
        name, now = record["name"], self.setting.clock()
        observed = self.setting.observed(record)
        if observed is State.IN_PROGRESS:  # checked above, under the lock: a bug if seen
            raise Refused(f"migration {name!r} is running; nothing was restored")
        records.forget(conn, record, observed, now, **_RESTORED)
        undo.forget(conn, name)
        history.record(
            conn,
            name,
            kind=Kind.RESTORE,
            invocation=self.setting.invocation,
            database=self.db.display_url,
            now=now,
            me=self.setting.me,
            outcome=State.PENDING,
            backup=path,
        )

"""The tables backfill owns inside the user's database, and their versioned creation.

`_migrations` holds one row per migration (state, cursor, counters, lease); `_migration_errors`
lists rows skipped under `--on-error skip`; `_migration_runs` is the history: each run (its `id`
is the run's number), and each reset or cancel by hand.
`_backfill_schema` records which layout is in place, so that a newer backfill upgrades an older
layout in place, one step per version, without losing progress (see `ensure_schema`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa

from backfill.errors import Refused, SchemaMismatch
from backfill.store.dialects import READ_ONLY
from backfill.store.locks import Unneeded, engine_tables_locked

# The layouts so far: 1, the first; 2 adds `_migration_runs` and `_migrations.run_id`; 3 adds
# `_migration_shards`; 4 makes `_migration_runs` the history, records verify's result, adds the
# undo log `_migration_undo` and a revert's progress. An
# upgrade step creates a table as it was at the step's own version: when a later layout changes a
# table, freeze that table's earlier definition for the earlier step.
SCHEMA_VERSION = 4

metadata = sa.MetaData()

schema_version = sa.Table(
    "_backfill_schema",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
)

migrations = sa.Table(
    "_migrations",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("state", sa.String(20), nullable=False),
    # JSON list of the last committed key's values; NULL before the first batch.
    sa.Column("cursor", sa.Text),
    # JSON description of what the cursor walks (table, key); a resume on another scan is refused.
    sa.Column("scan", sa.Text),
    sa.Column("processed", sa.BigInteger, nullable=False, default=0),
    sa.Column("changed", sa.BigInteger, nullable=False, default=0),
    sa.Column("skipped_errors", sa.BigInteger, nullable=False, default=0),
    sa.Column("kept", sa.BigInteger, nullable=False, default=0),
    sa.Column("total", sa.BigInteger),
    sa.Column("total_is_estimate", sa.Boolean, nullable=False, default=False),
    sa.Column("batch_size", sa.Integer),
    # Times are seconds since the epoch (UTC); rendered as ISO-8601 by the status report.
    sa.Column("started_at", sa.Double),
    sa.Column("updated_at", sa.Double),
    sa.Column("finished_at", sa.Double),
    sa.Column("run_started_at", sa.Double),
    sa.Column("run_processed_start", sa.BigInteger),
    sa.Column("generation", sa.Integer, nullable=False, default=0),
    sa.Column("runner_host", sa.String(255)),
    sa.Column("runner_pid", sa.Integer),
    sa.Column("heartbeat_at", sa.Double),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("error_message", sa.Text),
    sa.Column("error_type", sa.String(200)),
    sa.Column("error_row_id", sa.Text),
    sa.Column("error_field", sa.String(200)),
    # The run in progress, or the last one: its row in `_migration_runs`.
    sa.Column("run_id", sa.Integer),
    # The latest `verify`: when, and what it found (status shows it without scanning).
    sa.Column("verified_at", sa.Double),
    sa.Column("verified_remaining", sa.BigInteger),
    sa.Column("verified_raising", sa.BigInteger),
    # Whether the run in progress (or the last) logs its changes in `_migration_undo`; whether
    # a run committed batches without the log since it began (then it cannot be reverted).
    sa.Column("undo", sa.Boolean),
    sa.Column("unlogged", sa.Boolean),
    # A revert begun and not finished: its own state (inProgress, canceled, failed), how many
    # log entries it had to go through, has gone through, restored, and kept (the app changed
    # the row since).
    sa.Column("revert_state", sa.String(20)),
    sa.Column("revert_total", sa.BigInteger),
    sa.Column("revert_processed", sa.BigInteger),
    sa.Column("revert_reverted", sa.BigInteger),
    sa.Column("revert_kept", sa.BigInteger),
    # The latest backup of the tables it touches (`backfill backup`): where, and when.
    sa.Column("backup_path", sa.Text),
    sa.Column("backup_at", sa.Double),
)

# What layout 4 adds to `_migrations`.
_NAMES = [c.name for c in migrations.columns]
SAFETY_COLUMNS = tuple(_NAMES[_NAMES.index("run_id") + 1 :])

# The history: one row per claim that starts or resumes a run (its `id` is the run's number,
# `run_id`; the workers of a run share it), written again when the run ends; and one per command
# by hand (reset, cancel). Rows of layouts before 4 have no `origin`, and say no more than it.
migration_runs = sa.Table(
    "_migration_runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("migration", sa.String(200), nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("runner_host", sa.String(255)),
    sa.Column("runner_pid", sa.Integer),
    sa.Column("kind", sa.String(20), nullable=False, server_default="run"),
    sa.Column("origin", sa.String(20)),
    sa.Column("user_name", sa.String(255)),
    # JSON list of the command's arguments, passwords redacted.
    sa.Column("arguments", sa.Text),
    sa.Column("environment", sa.String(200)),
    # The database's URL, password redacted.
    sa.Column("database_url", sa.Text),
    sa.Column("finished_at", sa.Double),
    sa.Column("outcome", sa.String(20)),
    sa.Column("exit_code", sa.Integer),
    # The run's own counters once it ended; while it goes on, the migration's totals minus these
    # `*_before` (its totals when the run began).
    sa.Column("processed", sa.BigInteger),
    sa.Column("changed", sa.BigInteger),
    sa.Column("skipped_errors", sa.BigInteger),
    sa.Column("processed_before", sa.BigInteger),
    sa.Column("changed_before", sa.BigInteger),
    sa.Column("skipped_before", sa.BigInteger),
    sa.Column("holds", sa.Integer),
    sa.Column("backup", sa.Text),
)

# What layout 4 adds to `_migration_runs`.
HISTORY_COLUMNS = tuple(c.name for c in migration_runs.columns)[5:]

# A run's plan, when it has one (workers): one row per range shard of the migration's key, with
# its own cursor, lease and counters (the run's are their sums). `lo` is exclusive and `hi`
# inclusive, both keys as JSON lists; the first shard has no `lo`, the last no `hi` (it walks to
# the table's current end).
migration_shards = sa.Table(
    "_migration_shards",
    metadata,
    sa.Column("migration", sa.String(200), primary_key=True),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("lo", sa.Text),
    sa.Column("hi", sa.Text),
    sa.Column("cursor", sa.Text),
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("generation", sa.Integer, nullable=False, default=0),
    sa.Column("runner_host", sa.String(255)),
    sa.Column("runner_pid", sa.Integer),
    sa.Column("heartbeat_at", sa.Double),
    sa.Column("released_at", sa.Double),
    sa.Column("processed", sa.BigInteger, nullable=False, default=0),
    sa.Column("changed", sa.BigInteger, nullable=False, default=0),
    sa.Column("skipped_errors", sa.BigInteger, nullable=False, default=0),
    sa.Column("kept", sa.BigInteger, nullable=False, default=0),
    sa.Column("run_id", sa.Integer),
)

# The undo log of runs with `--undo`: per changed row and column, the value before and the value
# written (`update`), or per row a copy inserted, its values (`insert`); values are tagged JSON
# (store.undo). A revert goes through it newest first (`id` descending), deleting what it
# restored; an entry whose row the app changed since is `kept` (listed, never restored).
migration_undo = sa.Table(
    "_migration_undo",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("migration", sa.String(200), nullable=False),
    sa.Column("run_id", sa.Integer),
    sa.Column("action", sa.String(10), nullable=False),
    sa.Column("row_key", sa.Text, nullable=False),
    sa.Column("column_name", sa.String(200)),
    sa.Column("before", sa.Text),
    sa.Column("after", sa.Text),
    sa.Column("kept", sa.Boolean, nullable=False, default=False),
    sa.Index("ix_migration_undo_migration", "migration", "kept", "id"),
)

migration_errors = sa.Table(
    "_migration_errors",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("migration", sa.String(200), nullable=False),
    # JSON of the key value(s). MySQL cannot put TEXT in a unique key, so there it is bounded:
    # (200 + 512) characters of utf8mb4 fit InnoDB's 3072-byte limit on an index.
    sa.Column("row_id", sa.Text().with_variant(sa.String(512), "mysql", "mariadb"), nullable=False),
    sa.Column("field", sa.String(200)),
    sa.Column("error_type", sa.String(200), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("at", sa.Double, nullable=False),
    sa.UniqueConstraint("migration", "row_id", name="uq_migration_errors_row"),
)


# What every layout's `_migrations` has: enough to tell whether a run holds a lease.
LEASE_COLUMNS = ("name", "state", "heartbeat_at", "runner_host", "runner_pid")


def _add_column(conn: sa.Connection, table: sa.Table, column: sa.Column[Any]) -> None:
    spec = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
    name = conn.dialect.identifier_preparer.format_table(table)
    conn.exec_driver_sql(f"ALTER TABLE {name} ADD COLUMN {spec}")


def _migration_runs_at_2() -> sa.Table:
    """`_migration_runs` as layout 2 created it (layout 4 adds the history's columns)."""
    return sa.Table(
        migration_runs.name,
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("migration", sa.String(200), nullable=False),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("runner_host", sa.String(255)),
        sa.Column("runner_pid", sa.Integer),
    )


def _upgrade_to_2(conn: sa.Connection) -> None:
    _add_column(conn, migrations, migrations.c.run_id)
    _migration_runs_at_2().create(conn, checkfirst=True)


def _upgrade_to_3(conn: sa.Connection) -> None:
    migration_shards.create(conn, checkfirst=True)


def _upgrade_to_4(conn: sa.Connection) -> None:
    for name in HISTORY_COLUMNS:
        _add_column(conn, migration_runs, migration_runs.c[name])
    for name in SAFETY_COLUMNS:
        _add_column(conn, migrations, migrations.c[name])
    migration_undo.create(conn, checkfirst=True)


# version -> the step that upgrades the layout before it to it.
UPGRADES: dict[int, Callable[[sa.Connection], None]] = {
    2: _upgrade_to_2,
    3: _upgrade_to_3,
    4: _upgrade_to_4,
}


def layout(conn: sa.Connection) -> int | None:
    """The layout in place, None before backfill's first use."""
    inspector = sa.inspect(conn)
    if inspector.has_table(schema_version.name):
        found = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
        if found is not None:
            return int(found)
    # Version 1 on MySQL commits each CREATE TABLE by itself: its version row may be missing.
    return 1 if inspector.has_table(migrations.name) else None


def _layout_at_a_glance(engine: sa.Engine) -> int | None:
    """The layout's version, read without the lock; None when it cannot be read: the tables
    are not there, or (MySQL) another process is creating them this very moment."""
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(**{READ_ONLY: True})
            found = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
    except sa.exc.DBAPIError:
        return None
    return None if found is None else int(found)


def _refuse_newer(found: int | None) -> None:
    if found is not None and found > SCHEMA_VERSION:
        raise SchemaMismatch(
            f"the database's backfill tables are at version {found}, newer than this "
            f"backfill understands ({SCHEMA_VERSION}); upgrade backfill"
        )


def ensure_schema(
    engine: sa.Engine, *, wait: float, holds_lease: Callable[[Mapping[str, Any]], bool]
) -> None:
    """Create the tables on first use, or upgrade an older layout; refuse a newer one.

    Concurrent first uses and upgrades are serialized by store.locks (waiting at most `wait`
    seconds): exactly one process creates or upgrades, the others then find the layout in place.
    An upgrade is refused while `holds_lease` says a `_migrations` row (its LEASE_COLUMNS) is held
    by a live run: that run's backfill knows only the old layout."""
    found = _layout_at_a_glance(engine)
    _refuse_newer(found)
    if found == SCHEMA_VERSION:
        return

    def meanwhile() -> None:
        if _layout_at_a_glance(engine) == SCHEMA_VERSION:
            raise Unneeded

    with engine_tables_locked(engine, wait, meanwhile) as conn:
        if conn is None:
            return  # another process did it while this one waited
        found = layout(conn)
        _refuse_newer(found)
        if found == SCHEMA_VERSION:
            return  # another process did it while this one waited
        if found is None:
            metadata.create_all(conn)
        else:
            _refuse_while_held(conn, found, holds_lease)
            for version in range(found + 1, SCHEMA_VERSION + 1):
                UPGRADES[version](conn)
        conn.execute(sa.delete(schema_version))
        conn.execute(sa.insert(schema_version).values(version=SCHEMA_VERSION))


def _refuse_while_held(
    conn: sa.Connection, found: int, holds_lease: Callable[[Mapping[str, Any]], bool]
) -> None:
    columns: list[sa.ColumnClause[Any]] = [sa.column(c) for c in LEASE_COLUMNS]
    query = sa.select(*columns).select_from(sa.table(migrations.name))
    rows = [dict(row) for row in conn.execute(query).mappings()]
    if found >= 3:
        # The workers of a run hold its shards: each shard's lease is read as a runner's.
        shard = migration_shards.c
        leases = sa.select(shard.migration.label("name"), *(shard[c] for c in LEASE_COLUMNS[1:]))
        rows += [dict(row) for row in conn.execute(leases).mappings()]
    held = [row for row in rows if holds_lease(row)]
    if held:
        holders = ", ".join(
            f"{row['name']} (host {row['runner_host']}, pid {row['runner_pid']})" for row in held
        )
        raise Refused(
            f"backfill's tables need an upgrade from layout {found} to {SCHEMA_VERSION}, which "
            f"waits until no run holds a lease; held now: {holders}. Let those runs finish (or "
            "cancel them), then try again"
        )

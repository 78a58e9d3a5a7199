"""The tables backfill owns inside the user's database, and their versioned creation.

`_migrations` holds one row per migration (state, cursor, counters, lease); `_migration_errors`
lists rows skipped under `--on-error skip`; `_migration_runs` gives each run its number.
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
# `_migration_shards`. An upgrade step creates a table as it was at the step's own version: when
# a later layout changes a table, freeze that table's earlier definition for the earlier step.
SCHEMA_VERSION = 3

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
)

# One row per claim that starts or resumes a run: its `id` is the run's number (`run_id`).
migration_runs = sa.Table(
    "_migration_runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("migration", sa.String(200), nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("runner_host", sa.String(255)),
    sa.Column("runner_pid", sa.Integer),
)

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


def _upgrade_to_2(conn: sa.Connection) -> None:
    _add_column(conn, migrations, migrations.c.run_id)
    migration_runs.create(conn, checkfirst=True)


def _upgrade_to_3(conn: sa.Connection) -> None:
    migration_shards.create(conn, checkfirst=True)


# version -> the step that upgrades the layout before it to it.
UPGRADES: dict[int, Callable[[sa.Connection], None]] = {2: _upgrade_to_2, 3: _upgrade_to_3}


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
    held = [row for row in map(dict, conn.execute(query).mappings()) if holds_lease(row)]
    if held:
        holders = ", ".join(
            f"{row['name']} (host {row['runner_host']}, pid {row['runner_pid']})" for row in held
        )
        raise Refused(
            f"backfill's tables need an upgrade from layout {found} to {SCHEMA_VERSION}, which "
            f"waits until no run holds a lease; held now: {holders}. Let those runs finish (or "
            "cancel them), then try again"
        )

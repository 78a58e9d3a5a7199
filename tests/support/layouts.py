"""Earlier layouts of backfill's own tables, frozen as they were shipped, so that a test can
create each one and check that the current backfill upgrades it in place (tests/test_layouts.py).

Add the layout being replaced here whenever store.tables.SCHEMA_VERSION goes up.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa


def layout_1(metadata: sa.MetaData) -> None:
    """backfill 0.1 (issues 2-4): `_migrations`, `_migration_errors`, `_backfill_schema`."""
    sa.Table(
        "_backfill_schema",
        metadata,
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    )
    sa.Table(
        "_migrations",
        metadata,
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("cursor", sa.Text),
        sa.Column("scan", sa.Text),
        sa.Column("processed", sa.BigInteger, nullable=False, default=0),
        sa.Column("changed", sa.BigInteger, nullable=False, default=0),
        sa.Column("skipped_errors", sa.BigInteger, nullable=False, default=0),
        sa.Column("kept", sa.BigInteger, nullable=False, default=0),
        sa.Column("total", sa.BigInteger),
        sa.Column("total_is_estimate", sa.Boolean, nullable=False, default=False),
        sa.Column("batch_size", sa.Integer),
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
    )
    sa.Table(
        "_migration_errors",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("migration", sa.String(200), nullable=False),
        sa.Column(
            "row_id", sa.Text().with_variant(sa.String(512), "mysql", "mariadb"), nullable=False
        ),
        sa.Column("field", sa.String(200)),
        sa.Column("error_type", sa.String(200), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("at", sa.Double, nullable=False),
        sa.UniqueConstraint("migration", "row_id", name="uq_migration_errors_row"),
    )


def layout_2(metadata: sa.MetaData) -> None:
    """issue 9: layout 1, `_migrations.run_id` and `_migration_runs`."""
    layout_1(metadata)
    metadata.tables["_migrations"].append_column(sa.Column("run_id", sa.Integer))
    sa.Table(
        "_migration_runs",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("migration", sa.String(200), nullable=False),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("runner_host", sa.String(255)),
        sa.Column("runner_pid", sa.Integer),
    )


def layout_3(metadata: sa.MetaData) -> None:
    """issue 10: layout 2 and `_migration_shards`."""
    layout_2(metadata)
    sa.Table(
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


# version -> how to declare that layout's tables.
LAYOUTS: dict[int, Callable[[sa.MetaData], None]] = {1: layout_1, 2: layout_2, 3: layout_3}


def create_layout(engine: sa.Engine, version: int) -> None:
    """backfill's tables exactly as layout `version` had them, with its version row."""
    metadata = sa.MetaData()
    LAYOUTS[version](metadata)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO _backfill_schema (version) VALUES (:v)"), {"v": version})

"""The tables backfill owns inside the user's database, and their versioned creation.

`_migrations` holds one row per migration (state, cursor, counters, lease); `_migration_errors`
lists rows skipped under `--on-error skip`. `_backfill_schema` records which layout is in place so
a later version can upgrade in place without losing progress.
"""

from __future__ import annotations

import sqlalchemy as sa

from backfill.errors import SchemaMismatch

SCHEMA_VERSION = 1

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


def ensure_schema(engine: sa.Engine) -> None:
    """Create the tables on first use; refuse a layout newer than this version understands."""
    inspector = sa.inspect(engine)
    if inspector.has_table(schema_version.name):
        with engine.connect() as conn:
            found = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
        if found is not None and found > SCHEMA_VERSION:
            raise SchemaMismatch(
                f"the database's backfill tables are at version {found}, newer than this "
                f"backfill understands ({SCHEMA_VERSION}); upgrade backfill"
            )
        if found == SCHEMA_VERSION:
            return
    with engine.begin() as conn:
        metadata.create_all(conn, checkfirst=True)
        # Upgrades from older layouts would run here, one step per version, in this transaction.
        conn.execute(sa.delete(schema_version))
        conn.execute(sa.insert(schema_version).values(version=SCHEMA_VERSION))

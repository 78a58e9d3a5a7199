"""Optional adapters that drive backfill from tools a team already runs (each an extra)."""

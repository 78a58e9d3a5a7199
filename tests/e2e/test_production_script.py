"""scripts/production-migration.sh: the runbook's checklist, dry run, run and verify."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import ROOT, cli_env

SCRIPT = ROOT / "scripts" / "production-migration.sh"


def _script(url: str, answers: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = cli_env(BACKFILL_BIN=str(Path(sys.executable).parent / "backfill"))
    return subprocess.run(
        ["bash", str(SCRIPT), "--database-url", url, *args],
        input=answers,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def test_prod_checklist_refusal_changes_nothing(cli, sqlite_url, tmp_path):
    assert cli("demo", "--messages", "200", "--seed-only", "--yes").returncode == 0
    refused = _script(sqlite_url, "y\ny\nn\n", "--prod", cwd=tmp_path)
    assert refused.returncode == 2 and "finish the checklist" in refused.stdout
    status = json.loads(cli("status", "--json").stdout)["body_to_parts"]
    assert status["state"] == "pending"


def test_prod_run_after_checklist_migrates_and_verifies(cli, sqlite_url, tmp_path):
    assert cli("demo", "--messages", "1200", "--seed-only", "--yes").returncode == 0
    done = _script(sqlite_url, "y\n" * 6, "--prod", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Nothing was saved" in done.stdout  # the dry run came first
    assert "0 rows left" in done.stdout and "cleanup_legacy_fields --prod" in done.stdout
    status = json.loads(cli("status", "--json").stdout)["body_to_parts"]
    assert status["state"] == "success" and status["progress"]["processed"] == 1200


def test_declining_the_run_keeps_the_data(cli, sqlite_url, tmp_path):
    assert cli("demo", "--messages", "100", "--seed-only", "--yes").returncode == 0
    declined = _script(sqlite_url, "n\n", cwd=tmp_path)
    assert declined.returncode == 2 and "Nothing was changed" in declined.stdout
    assert (
        json.loads(cli("count", "body_to_parts", "--json").stdout)["body_to_parts"]["remaining"]
        == 100
    )

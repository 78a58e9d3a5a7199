"""The `backfill` command as a user runs it: output shapes, exit codes, error sentences."""

from __future__ import annotations

import json
import sqlite3
import subprocess

import sqlalchemy as sa

from backfill import Runner
from chat_migrations import migrations
from support import ROOT, after_each_batch, backfill_command, cli_env


def test_demo_then_status_count_verify_and_rerun(cli, sqlite_url):
    demo = cli("demo", "--messages", "3000", "--yes")
    assert demo.returncode == 0, demo.stderr
    assert "success" in demo.stdout and "3,000 processed" in demo.stdout

    status = cli("status", "--json")
    assert status.returncode == 0
    document = json.loads(status.stdout)
    assert set(document) == {"body_to_parts", "cleanup_legacy_fields"}
    body = document["body_to_parts"]
    assert body["state"] == "success"
    assert body["progress"] == {"processed": 3000, "total": 3000, "completed": True}
    assert body["changed"] == 3000 and body["skipped_errors"] == 0 and body["error"] is None
    assert body["finished_at"].endswith("Z") and body["runner"] is None
    assert document["cleanup_legacy_fields"]["state"] == "pending"

    assert json.loads(cli("count", "body_to_parts", "--json").stdout) == {
        "body_to_parts": {"remaining": 0, "raising": 0}
    }
    verify = cli("verify", "body_to_parts", "--json")
    assert verify.returncode == 0
    assert json.loads(verify.stdout)["body_to_parts"]["remaining"] == 0

    again = cli("run", "body_to_parts")
    assert again.returncode == 0 and "already succeeded" in again.stdout


def test_seed_only_then_count_and_verify_report_what_is_left(cli):
    assert cli("demo", "--messages", "500", "--seed-only", "--yes").returncode == 0
    count = cli("count", "body_to_parts", "--json")
    assert json.loads(count.stdout) == {"body_to_parts": {"remaining": 500, "raising": 0}}
    verify = cli("verify", "body_to_parts", "--json")
    assert verify.returncode == 1
    found = json.loads(verify.stdout)["body_to_parts"]
    assert found["remaining"] == 500 and found["sample_ids"] == list(range(1, 21))
    run = cli("run", "body_to_parts", "--batch-size", "100", "--json")
    assert run.returncode == 0
    assert json.loads(run.stdout)["body_to_parts"]["progress"]["processed"] == 500


def test_demo_asks_before_replacing_and_refuses_prod(cli, tmp_path):
    assert cli("demo", "--messages", "10", "--seed-only", "--yes").returncode == 0
    again = cli("demo", "--messages", "10", "--seed-only")
    assert again.returncode == 2 and "already exists" in again.stderr
    prod = cli("demo", "--messages", "10", "--prod")
    assert prod.returncode == 2 and "prod" in prod.stderr


def test_global_options_before_and_after_the_command(sqlite_url, tmp_path):
    def run(*args):
        return subprocess.run(
            backfill_command(*args),
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=cli_env(),
            stdin=subprocess.DEVNULL,
        )

    before = run("--database-url", sqlite_url, "--json", "status")
    after = run("status", "--json", "--database-url", sqlite_url)
    assert before.returncode == after.returncode == 0
    assert json.loads(before.stdout) == json.loads(after.stdout)


def test_refusals_exit_2_with_one_sentence(cli, sqlite_url, tmp_path):
    unknown = cli("run", "no_such_migration")
    assert unknown.returncode == 2
    assert "unknown migration 'no_such_migration'" in unknown.stderr
    assert "Traceback" not in unknown.stderr

    missing = cli("run", "body_to_parts")  # the database has no messages table
    assert missing.returncode == 2
    assert "table 'messages' does not exist" in missing.stderr

    sqlite3.connect(tmp_path / "chat.db").execute(
        "CREATE TABLE messages (id INTEGER PRIMARY KEY, body TEXT)"
    ).connection.commit()
    no_column = cli("run", "body_to_parts")
    assert no_column.returncode == 2 and "no column 'thinking_content'" in no_column.stderr


def test_unreachable_database_exits_4_without_password(cli, tmp_path):
    gone = cli("status", url=f"sqlite:///{tmp_path}/no/such/dir/x.db")
    assert gone.returncode == 4 and "unable to open" in gone.stderr
    secret = cli("status", url="postgresql+psycopg://alice:hunter2@127.0.0.1:1/nowhere", timeout=60)
    assert secret.returncode == 4
    assert "hunter2" not in secret.stderr + secret.stdout
    assert "Traceback" not in secret.stderr
    debug = cli("status", "--debug", url=f"sqlite:///{tmp_path}/no/such/dir/x.db")
    assert debug.returncode == 4 and "Traceback" in debug.stderr


def test_reset_asks_without_yes_and_forgets_progress(cli):
    assert cli("demo", "--messages", "200", "--yes").returncode == 0
    refused = cli("reset", "body_to_parts")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert cli("reset", "body_to_parts", "--yes").returncode == 0
    status = json.loads(cli("status", "body_to_parts", "--json").stdout)["body_to_parts"]
    assert status["state"] == "pending" and status["progress"]["processed"] == 0
    rerun = cli("run", "body_to_parts", "--json")
    assert json.loads(rerun.stdout)["body_to_parts"]["changed"] == 0  # parts already there


def test_cancel_without_a_live_run_changes_nothing(cli):
    assert cli("demo", "--messages", "50", "--seed-only", "--yes").returncode == 0
    cancel = cli("cancel", "body_to_parts")
    assert cancel.returncode == 0 and "no live run" in cancel.stdout
    assert json.loads(cli("status", "--json").stdout)["body_to_parts"]["state"] == "pending"


def test_status_table_for_people(cli):
    assert cli("demo", "--messages", "100", "--seed-only", "--yes").returncode == 0
    table = cli("status")
    assert table.returncode == 0
    assert "body_to_parts" in table.stdout and "pending" in table.stdout


def test_repository_config_points_at_the_flagship():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'app = "chat_migrations:migrations"' in text


def test_status_watch_json_streams_one_line_per_refresh(cli, sqlite_url, tmp_path):
    assert cli("demo", "--messages", "100", "--seed-only", "--yes").returncode == 0
    watcher = subprocess.Popen(
        backfill_command(
            "status", "--watch", "--interval", "0.2", "--json", "--database-url", sqlite_url
        ),
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=cli_env(),
    )
    lines = [watcher.stdout.readline() for _ in range(3)]
    watcher.terminate()
    watcher.wait(timeout=10)
    documents = [json.loads(line) for line in lines]
    assert all(d["body_to_parts"]["state"] == "pending" for d in documents)


def test_a_changed_range_under_a_half_done_run_is_refused_with_how_to_restart(cli, sqlite_url):
    from apps.ranged import items, metadata

    engine = sa.create_engine(sqlite_url)
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(items),
            [{"id": i, "source": "bad" if i == 35 else f"s{i}"} for i in range(1, 61)],
        )
    app = ("--app", "apps.ranged:migrations")
    failed = cli("run", "fill", *app)
    assert failed.returncode == 1 and "row 35" in failed.stderr

    narrower = cli_env(RANGED_BELOW="30")
    refused = cli("run", "fill", *app, env=narrower)
    assert refused.returncode == 2, refused.stderr
    sentence = " ".join(refused.stderr.split())
    assert "is half done (30 rows) over table 'ranged items', key (id), the whole table" in sentence
    assert (
        "now defined over table 'ranged items', key (id), range \"ranged items\".id < 30"
        in sentence
    )
    assert "backfill run fill --restart" in sentence

    restarted = cli("run", "fill", *app, "--restart", env=narrower)
    assert restarted.returncode == 0, restarted.stderr
    status = json.loads(cli("status", "fill", "--json", *app, env=narrower).stdout)["fill"]
    assert status["progress"] == {"processed": 29, "total": 29, "completed": True}
    engine.dispose()


def test_status_counts_the_live_runner_as_a_worker(cli, sqlite_url):
    """`workers` is the migration's live lease holders; `shards` lists a run's plan (none
    without workers)."""
    seeded = cli("demo", "--messages", "300", "--seed-only", "--yes")
    assert seeded.returncode == 0, seeded.stderr
    before = json.loads(cli("status", "body_to_parts", "--json").stdout)["body_to_parts"]
    assert (before["workers"], before["shards"]) == (0, [])

    runner = Runner(sqlite_url, migrations)
    during: list[dict[str, object]] = []

    def look(_batch: object) -> None:
        during.append(runner.status()["body_to_parts"].to_json())

    runner.run(["body_to_parts"], batch_size=100, listeners=[after_each_batch(look)])
    runner.db.dispose()
    # Three full batches, then the empty last one that records success.
    assert [(d["state"], d["workers"]) for d in during] == [("inProgress", 1)] * 3 + [
        ("success", 0)
    ]
    after = json.loads(cli("status", "body_to_parts", "--json").stdout)["body_to_parts"]
    assert (after["state"], after["workers"], after["shards"]) == ("success", 0, [])

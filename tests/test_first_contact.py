"""First contact: a missing database driver and a missing app are one sentence each, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from backfill import ConfigError
from backfill.store.database import Database
from support import cli_env

# The CLI with the PostgreSQL driver made unimportable, as if the extra were not installed.
WITHOUT_PSYCOPG = (
    "import sys; sys.modules['psycopg'] = None; from backfill.cli import main; main(sys.argv[1:])"
)


@pytest.mark.parametrize(
    ("url", "extra"),
    [
        ("postgresql+psycopg://u:secret@127.0.0.1/x", "backfill[postgresql]"),
        ("postgresql://u:secret@127.0.0.1/x", "backfill[postgresql]"),  # psycopg by default
        ("mysql+pymysql://u:secret@127.0.0.1/x", "backfill[mysql]"),
        ("mariadb+pymysql://u:secret@127.0.0.1/x", "backfill[mysql]"),
    ],
)
def test_a_missing_driver_names_the_extra_to_install(
    url: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.setitem(sys.modules, "pymysql", None)
    with pytest.raises(ConfigError) as raised:
        Database(url)
    message = str(raised.value)
    assert f"pip install '{extra}'" in message and "which is not installed" in message
    assert "secret" not in message and "u:***@127.0.0.1/x" in message


def test_a_driver_backfill_has_no_extra_for_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyodbc", None)
    with pytest.raises(ConfigError, match="needs the driver pyodbc, which is not installed$"):
        Database("mssql+pyodbc://u:secret@dsn")


def test_the_cli_says_which_extra_to_install_in_one_line(tmp_path: Path) -> None:
    url = "postgresql+psycopg://u:secret@127.0.0.1/db"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PSYCOPG, "status", "--database-url", url],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert "pip install 'backfill[postgresql]'" in line and line.startswith("backfill: ")
    assert "secret" not in done.stderr + done.stdout and "Traceback" not in done.stderr


def test_with_no_app_configured_commands_say_how_to_name_one(cli, tmp_path: Path) -> None:
    no_app = cli_env()
    del no_app["BACKFILL_APP"]
    for command in (
        ["status"],
        ["run", "body_to_parts"],
        ["count", "body_to_parts"],
        ["verify", "body_to_parts"],
        ["cancel", "body_to_parts"],
        ["reset", "body_to_parts", "--yes"],
    ):
        refused = cli(*command, env=no_app)
        assert refused.returncode == 2, (command, refused.stderr)
        [line] = refused.stderr.splitlines()
        assert "no app is configured" in line and "Traceback" not in line
        for way in ("--app", "BACKFILL_APP", "[tool.backfill]"):
            assert way in line
    assert list(tmp_path.iterdir()) == []  # nothing was created, not even the dev database


def test_demo_needs_no_app(cli, tmp_path: Path) -> None:
    no_app = cli_env()
    del no_app["BACKFILL_APP"]
    demo = cli("demo", "--seed-only", "--messages", "50", "--yes", env=no_app)
    assert demo.returncode == 0, demo.stderr
    assert "Created 50 legacy messages" in demo.stderr
    status = cli("status", "--app", "chat_migrations:migrations", env=no_app)
    assert status.returncode == 0 and "body_to_parts" in status.stdout


def test_a_dialect_sqlalchemy_does_not_know_is_one_sentence() -> None:
    with pytest.raises(ConfigError, match="names a dialect SQLAlchemy does not know") as raised:
        Database("foo+bar://u:secret@h/x")
    assert "secret" not in str(raised.value)


@pytest.mark.parametrize("url", ["postgresql+psycopg://u:secret@h:notaport/x", "nonsense"])
def test_a_url_sqlalchemy_cannot_parse_is_one_sentence_without_its_password(cli, url: str) -> None:
    with pytest.raises(ConfigError, match="is not a valid SQLAlchemy URL") as raised:
        Database(url)
    assert "secret" not in str(raised.value)
    done = cli("status", url=url)
    assert done.returncode == 2 and "secret" not in done.stderr + done.stdout
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "variable",
    [
        "BACKFILL_LEASE_SECONDS",
        "BACKFILL_RETRIES",
        "BACKFILL_RETRY_DELAY",
        "BACKFILL_LOCK_TIMEOUT",
        "BACKFILL_STATEMENT_TIMEOUT",
        "BACKFILL_ESTIMATE_ABOVE",
    ],
)
def test_a_bad_tuning_variable_is_one_sentence_and_exit_2(variable: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "backfill",
            "status",
            "--database-url",
            f"sqlite:///{tmp_path / 'x.db'}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=cli_env(**{variable: "soon"}),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"backfill: {variable}='soon' must be a non-negative number"
    ]


def test_the_engine_takes_plain_values_and_reads_no_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from backfill import Runner
    from chat_migrations import migrations

    for variable in ("BACKFILL_LEASE_SECONDS", "BACKFILL_RETRIES", "BACKFILL_LOCK_TIMEOUT"):
        monkeypatch.setenv(variable, "soon")
    runner = Runner(f"sqlite:///{tmp_path / 'x.db'}", migrations)
    assert runner.lease_seconds == 30 and runner.retry_policy.attempts == 5
    assert runner.db.limits.lock_timeout == 2.0

"""Where the CLI finds the app and the database; passwords never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from backfill import ConfigError
from backfill.config import DEFAULT_DEV_URL, load_app, resolve
from backfill.redaction import redact_arguments, redact_url, scrub


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BACKFILL_APP", "BACKFILL_DATABASE_URL", "BACKFILL_ENV"):
        monkeypatch.delenv(name, raising=False)


def test_nothing_configured_means_no_app_and_a_local_sqlite_file(tmp_path: Path) -> None:
    settings = resolve(directory=tmp_path)
    assert settings.app is None
    assert settings.database_url == DEFAULT_DEV_URL == "sqlite:///backfill-dev.db"
    assert settings.environment == "dev" and not settings.is_production
    with pytest.raises(ConfigError) as raised:
        settings.required_app()
    for way in ("--app", "BACKFILL_APP", "[tool.backfill]", "app = "):
        assert way in str(raised.value)
    assert resolve(app="flag:m", directory=tmp_path).required_app() == "flag:m"


def test_pyproject_environments_with_variables(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.backfill]\napp = "myapp:migrations"\n'
        '[tool.backfill.environments.dev]\ndatabase_url = "sqlite:///dev.db"\n'
        "[tool.backfill.environments.prod]\n"
        'database_url = "postgresql+psycopg://app:${DB_PASSWORD}@db.internal/chat"\n'
    )
    monkeypatch.setenv("DB_PASSWORD", "s3cret")
    assert resolve(directory=tmp_path).database_url == "sqlite:///dev.db"
    prod = resolve(environment="prod", directory=tmp_path)
    assert prod.is_production and prod.app == "myapp:migrations"
    assert prod.database_url.endswith("app:s3cret@db.internal/chat")
    assert "s3cret" not in redact_url(prod.database_url)


def test_precedence_flag_then_environment_variable_then_file(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "backfill.toml").write_text(
        'app = "fromfile:m"\n[environments.dev]\ndatabase_url = "sqlite:///file.db"\n'
    )
    assert resolve(directory=tmp_path).app == "fromfile:m"
    monkeypatch.setenv("BACKFILL_APP", "fromenv:m")
    monkeypatch.setenv("BACKFILL_DATABASE_URL", "sqlite:///env.db")
    assert resolve(directory=tmp_path).app == "fromenv:m"
    assert resolve(directory=tmp_path).database_url == "sqlite:///env.db"
    chosen = resolve(app="flag:m", database_url="sqlite:///flag.db", directory=tmp_path)
    assert (chosen.app, chosen.database_url) == ("flag:m", "sqlite:///flag.db")


def test_missing_variable_and_unconfigured_environment_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "backfill.toml").write_text(
        '[environments.staging]\ndatabase_url = "postgresql://u:${NOPE_NOT_SET}@h/db"\n'
    )
    with pytest.raises(ConfigError, match="NOPE_NOT_SET"):
        resolve(environment="staging", directory=tmp_path)
    with pytest.raises(ConfigError, match="'prod' has no database_url"):
        resolve(environment="prod", directory=tmp_path)


def test_redact_url_hides_only_the_password() -> None:
    shown = redact_url("postgresql+psycopg://alice:hunter2@db:5432/chat")
    assert "hunter2" not in shown and "alice" in shown and "db:5432/chat" in shown


def test_arguments_are_stored_with_every_password_hidden() -> None:
    url = "postgresql+psycopg://alice:hunter2@db:5432/chat"
    given = ["run", "x", "--database-url", url, f"--database-url={url}", "--note=hunter2"]
    shown = redact_arguments(given, url)
    assert not any("hunter2" in a for a in shown), shown
    assert shown[:2] == ["run", "x"] and shown[3] == redact_url(url)
    assert shown[4] == f"--database-url={redact_url(url)}" and shown[5] == "--note=***"
    assert scrub("FATAL: password hunter2 rejected", url) == "FATAL: password *** rejected"
    # A URL SQLAlchemy cannot parse (its port is not a number) is scrubbed all the same.
    odd = "postgresql+psycopg://u:hunter2@127.0.0.1:notaport/db"
    shown_odd = redact_arguments(["--database-url", odd], odd)
    assert shown_odd == ["--database-url", "<unparseable database URL>"]
    assert scrub(f"bad {odd}", odd) == "bad postgresql+psycopg://u:***@127.0.0.1:notaport/db"


def test_load_app_errors_name_what_is_wrong() -> None:
    assert len(load_app("chat_migrations:migrations")) == 2
    with pytest.raises(ConfigError, match="module:attribute"):
        load_app("chat_migrations")
    with pytest.raises(ConfigError, match="cannot import"):
        load_app("no_such_module_here:migrations")
    with pytest.raises(ConfigError, match="no attribute"):
        load_app("chat_migrations:nothing")

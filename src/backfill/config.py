"""Where the CLI finds the application's migrations and the database, and how URLs are shown.

Resolution order (the contract): `--app`, then `BACKFILL_APP`, then `app` under `[tool.backfill]`
in ./pyproject.toml or in ./backfill.toml. The database: `--database-url`, then
`BACKFILL_DATABASE_URL`, then the selected environment's `database_url`; dev defaults to
`sqlite:///backfill-dev.db`. Values may name environment variables as `${VAR}`. The app has no
default: a command that needs one and finds none says how to name it (`demo` needs none).
"""

from __future__ import annotations

import importlib
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backfill.errors import ConfigError

DEFAULT_DEV_URL = "sqlite:///backfill-dev.db"
PRODUCTION = "prod"
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def number_from_env(variable: str, default: float) -> float:
    """A non-negative number from the environment; `default` when unset or empty."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ConfigError(f"{variable}={raw!r} must be a non-negative number")
    return value


def _read_settings(directory: Path) -> dict[str, Any]:
    pyproject = directory / "pyproject.toml"
    if pyproject.is_file():
        settings = tomllib.loads(pyproject.read_text()).get("tool", {}).get("backfill")
        if settings is not None:
            return dict(settings)
    standalone = directory / "backfill.toml"
    if standalone.is_file():
        return tomllib.loads(standalone.read_text())
    return {}


def _expand(value: str, what: str) -> str:
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(f"{what} names the environment variable {name}, which is not set")
        return os.environ[name]

    return _VARIABLE.sub(substitute, value)


@dataclass(frozen=True)
class Settings:
    app: str | None  # None: nothing configured
    environment: str
    database_url: str

    @property
    def is_production(self) -> bool:
        return self.environment == PRODUCTION

    def required_app(self) -> str:
        """The app's `module:attribute`, or a ConfigError saying how to name one."""
        if self.app is None:
            raise ConfigError(
                "no app is configured: name the registry of migrations with "
                "--app module:attribute, the BACKFILL_APP environment variable, or "
                'app = "module:attribute" under [tool.backfill] in ./pyproject.toml '
                "(or in ./backfill.toml); the demo's is chat_migrations:migrations"
            )
        return self.app


def resolve(
    *,
    app: str | None = None,
    database_url: str | None = None,
    environment: str | None = None,
    directory: Path | None = None,
) -> Settings:
    settings = _read_settings(directory or Path.cwd())
    chosen_app = app or os.environ.get("BACKFILL_APP") or settings.get("app") or None
    env_name = environment or os.environ.get("BACKFILL_ENV") or "dev"
    environments: dict[str, Any] = settings.get("environments", {})
    url = database_url or os.environ.get("BACKFILL_DATABASE_URL")
    if not url:
        configured = environments.get(env_name, {}).get("database_url")
        if configured:
            url = _expand(str(configured), f"environment {env_name!r}'s database_url")
        elif env_name == "dev":
            url = DEFAULT_DEV_URL
        else:
            raise ConfigError(
                f"environment {env_name!r} has no database_url: add "
                f"[tool.backfill.environments.{env_name}] to pyproject.toml or pass --database-url"
            )
    return Settings(app=chosen_app, environment=env_name, database_url=url)


def load_app(reference: str) -> Any:
    """Import `module:attribute` and return the attribute (the Migrations registry)."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"app {reference!r} must look like module:attribute")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"cannot import app module {module_name!r}: {error}") from error
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}") from None

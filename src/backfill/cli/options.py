"""The CLI's options: the global ones (accepted both before and after the command name) and what
they resolve to, the options several commands share (durations, `--events`), and the
confirmations they ask for."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import Any, TypeVar

import click

from backfill import config
from backfill.dashboard.origin import origin_from_env
from backfill.errors import ConfigError, Refused
from backfill.events import JsonLines, Listener
from backfill.history import Invocation, Origin
from backfill.lease import DEFAULT_LEASE_SECONDS
from backfill.redaction import redact_arguments
from backfill.registry import Migrations
from backfill.retry import RetryPolicy
from backfill.runner import Runner
from backfill.store.database import Limits
from backfill.types import iso

F = TypeVar("F", bound=Callable[..., Any])
# The global options of the invocation in progress; `main` clears it before each invocation.
_given: dict[str, Any] = {}
# The command line of the invocation in progress, as `main` received it (for the history).
_arguments: list[str] = []


def _remember(name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        if value not in (None, False):
            _given[name] = value
        return value

    return callback


_GLOBALS = [
    click.option(
        "--app",
        callback=_remember("app"),
        expose_value=False,
        help="The registry of migrations, as module:attribute.",
    ),
    click.option(
        "--database-url",
        callback=_remember("database_url"),
        expose_value=False,
        help="SQLAlchemy URL of the database to migrate.",
    ),
    click.option(
        "--env",
        callback=_remember("env"),
        expose_value=False,
        help="Environment from [tool.backfill.environments] (default dev).",
    ),
    click.option(
        "--prod",
        is_flag=True,
        callback=_remember("prod"),
        expose_value=False,
        help="Same as --env prod.",
    ),
    click.option(
        "--debug",
        is_flag=True,
        callback=_remember("debug"),
        expose_value=False,
        help="Show tracebacks.",
    ),
    click.option(
        "--json",
        "as_json",
        is_flag=True,
        callback=_remember("json"),
        expose_value=False,
        help="One JSON document on stdout.",
    ),
]


def global_options(function: F) -> F:
    for option in reversed(_GLOBALS):
        function = option(function)
    return function


@dataclass
class Globals:
    values: dict[str, Any]

    @property
    def json(self) -> bool:
        return bool(self.values.get("json"))

    @property
    def debug(self) -> bool:
        return bool(self.values.get("debug"))

    @cached_property
    def settings(self) -> config.Settings:
        env = "prod" if self.values.get("prod") else self.values.get("env")
        return config.resolve(
            app=self.values.get("app"),
            database_url=self.values.get("database_url"),
            environment=env,
        )

    def migrations(self) -> Migrations:
        reference = self.settings.required_app()
        app = config.load_app(reference)
        if not isinstance(app, Migrations):
            raise ConfigError(f"app {reference!r} is not a backfill Migrations registry")
        return app

    def runner(self, migrations: Migrations | None = None, origin: Origin = Origin.CLI) -> Runner:
        """A Runner over the configured app, or over `migrations` (demo's flagship) if given;
        the history records what it starts as asked from `origin`, with this command line."""
        if migrations is None:
            migrations = self.migrations()
        settings = self.settings
        if origin is Origin.CLI:  # a run the dashboard started says so (BACKFILL_ORIGIN)
            origin = origin_from_env(origin)
        invocation = Invocation(
            origin=origin,
            arguments=tuple(redact_arguments(_arguments, settings.database_url)),
            environment=settings.environment,
        )
        runner = Runner(settings.database_url, migrations, invocation=invocation, **engine_knobs())
        context = click.get_current_context(silent=True)
        if context is not None:  # the command's connections close when it ends
            context.call_on_close(runner.db.dispose)
        return runner


def engine_knobs() -> dict[str, Any]:
    """The BACKFILL_* tuning variables, read here at the edge, once per command (the engine
    takes plain values): each bad value is one sentence and exit 2."""
    return {
        "lease_seconds": config.number_from_env("BACKFILL_LEASE_SECONDS", DEFAULT_LEASE_SECONDS),
        "retry_policy": RetryPolicy.from_env(),
        "limits": Limits.from_env(),
    }


def current() -> Globals:
    return Globals(_given)


def forget(arguments: Sequence[str] = ()) -> None:
    """A new invocation, with this command line."""
    _given.clear()
    _arguments[:] = arguments


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


events_option = click.option(
    "--events",
    type=click.Path(dir_okay=False),
    help="Append every event of the run to FILE, one JSON object per line.",
)


undo_option = click.option(
    "--undo/--no-undo",
    default=None,
    help="Log each change so `backfill revert` can put it back (default: in prod, wherever "
    "the migration can be undone; a resume does as its run did).",
)


@contextmanager
def events_file(path: str | None) -> Iterator[list[Listener]]:
    """`--events FILE`: a listener appending every event to FILE as a JSON line."""
    if path is None:
        yield []
        return
    writer = JsonLines(path)
    try:
        yield [writer]
    finally:
        writer.close()


class Duration(click.ParamType):  # type: ignore[type-arg]
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(value))
        if not match or (not match.group(2) and float(match.group(1)) != 0):
            self.fail(f"{value!r} is not a duration like 7d, 36h, 90m or 0", param, ctx)
        return timedelta(seconds=float(match.group(1)) * _UNITS.get(match.group(2) or "s", 1))


def interactive() -> bool:
    return sys.stdin.isatty()


def confirm(question: str, yes: bool, refusal: str) -> None:
    if yes:
        return
    if not interactive():
        raise Refused(refusal)
    if not click.confirm(question, default=False, err=True):
        raise Refused("not confirmed; nothing was changed")


def confirm_production(g: Globals, names: Sequence[str], yes: bool) -> None:
    """Running in prod asks first (or `--yes`); without a terminal it is refused."""
    settings = g.settings
    if settings.is_production:
        confirm(
            f"Run {', '.join(names)} on {settings.environment} ({g.runner().db.display_url})?",
            yes,
            "running in prod needs confirmation: pass --yes or run from a terminal",
        )


# A prod run asks again when the latest backup of its tables is older than this.
RECENT_SECONDS = 24 * 3600


def ask_without_recent_backup(runner: Runner, names: Sequence[str]) -> None:
    """A prod run whose migration has no backup from the last 24 hours asks again, at a
    terminal only (`--yes` does not answer it; `--no-backup-check` skips it)."""
    report = runner.status(names)
    now = runner.clock()
    for name in names:
        latest = report[name].backup
        if latest is not None and now - latest[1] <= RECENT_SECONDS:
            continue
        told = "never backed up" if latest is None else f"last backed up at {iso(latest[1])}"
        if not interactive():
            raise Refused(
                f"{name}: no backup of its tables in the last 24 hours ({told}): take one "
                f"with `backfill backup {name}`, or pass --no-backup-check"
            )
        if not click.confirm(
            f"{name}: no backup of its tables in the last 24 hours ({told}). Run anyway?",
            default=False,
            err=True,
        ):
            raise Refused(f"{name}: not run; take a backup first (`backfill backup {name}`)")


def ask_before_running(
    g: Globals, names: Sequence[str], *, yes: bool, force: bool, dry_run: bool, backup: bool
) -> None:
    """The questions of a run: in prod, run at all (or `--yes`), without a recent backup
    (unless not `backup`), and skip the gate (`--force`: the environment's name typed)."""
    settings = g.settings
    if not dry_run:
        confirm_production(g, names, yes)
        if settings.is_production and backup:
            ask_without_recent_backup(g.runner(), names)
    if force and settings.is_production:
        if not interactive():
            raise Refused(
                "--force in prod must be confirmed by typing the environment name at a terminal"
            )
        typed = click.prompt(f"Type {settings.environment!r} to skip the safety gate", err=True)
        if typed != settings.environment:
            raise Refused("environment name not confirmed; nothing was run")

"""`backfill dashboard`: the web dashboard (backfill.dashboard), served until interrupted. Its
web libraries are the `dashboard` extra's, imported only here, when the command runs."""

from __future__ import annotations

import importlib.util
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

import click

from backfill.cli import render
from backfill.cli.observe import observe_options, observed, passed_on
from backfill.cli.options import current, global_options
from backfill.errors import ConfigError, Refused
from backfill.history import Origin
from backfill.redaction import redact_url
from backfill.registry import Migrations
from backfill.runner import Runner
from backfill.stop_signals import handled

if TYPE_CHECKING:
    from backfill.dashboard.background import Background

TOKEN_ENV = "BACKFILL_DASHBOARD_TOKEN"
# What the `dashboard` extra installs.
EXTRA = ("starlette", "jinja2", "uvicorn")


port_option = click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8765,
    show_default=True,
    help="The port to listen on (0: a free one, printed).",
)


def missing_extra() -> list[str]:
    return [module for module in EXTRA if importlib.util.find_spec(module) is None]


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on `host`:`port` (0: a free port), so the address printed is the one
    served; one sentence when it cannot be had."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as error:
        raise Refused(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


@dataclass(frozen=True)
class Served:
    """What a dashboard serves besides the configured app: the demo's."""

    migrations: Migrations | None = None  # None: the configured app's
    app_reference: str | None = None  # how its runs import them (None: the configured app)
    notice: str | None = None  # said at the top of every page
    run_options: tuple[str, ...] = ()  # given to every run it starts, before the page's
    started: Callable[[Background, Runner], None] | None = None  # once it is ready to serve
    sock: socket.socket | None = None  # listening already (None: bound by `serve`)


@click.command(name="dashboard")
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to bind.")
@port_option
@observe_options
@global_options
def dashboard_command(host: str, port: int, log_format: str | None, log_file: str | None) -> None:
    """Serve the dashboard (status, history, run, dry-run, cancel, revert, /metrics) until
    interrupted. On loopback, reading is open and acting needs the token; bound elsewhere (only
    with BACKFILL_DASHBOARD_TOKEN set), everything needs it. With --log-format json, its
    actions and the runs it starts log JSON lines."""
    serve(host, port, log_format, log_file, Served())


def require_extra() -> None:
    missing = missing_extra()
    if missing:
        raise ConfigError(
            f"the dashboard needs {', '.join(missing)}: pip install 'backfill[dashboard]'"
        )


def serve(host: str, port: int, log_format: str | None, log_file: str | None, what: Served) -> None:
    """Serve the dashboard of `what` on `host`:`port` (or on `what.sock`) until interrupted."""
    require_extra()
    from backfill.dashboard.auth import LOOPBACK_NAMES, is_loopback

    loopback = is_loopback(host)
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not loopback and not token:
        raise Refused(
            f"the dashboard binds beyond loopback ({host}) only with a token: set {TOKEN_ENV} "
            "(every page and read then needs it)"
        )
    given = bool(token)
    token = token or secrets.token_urlsafe(32)
    g = current()
    settings = g.settings
    app_reference = what.app_reference or settings.required_app()
    # An app that cannot be loaded is one sentence now, not a page later.
    migrations = g.migrations() if what.migrations is None else what.migrations

    def runner(origin: Origin) -> Runner:
        return g.runner(migrations, origin=origin)

    import uvicorn

    from backfill.dashboard.app import create_app
    from backfill.dashboard.background import Background

    background = Background(
        settings.database_url,
        app_reference,
        settings.environment,
        passed=passed_on(log_format, log_file),
        run_options=what.run_options,
    )
    shown_url = redact_url(settings.database_url)
    app = create_app(
        runner,
        token=token,
        environment=settings.environment,
        database_display=shown_url,
        require_token_for_reads=not loopback,
        background=background,
        hosts=(*LOOPBACK_NAMES, host) if loopback else (),
        views=migrations.views,
        notice=what.notice,
    )
    sock = bind(host, port) if what.sock is None else what.sock
    url = address(sock)
    with sock, observed(log_format, log_file), _interrupt_ends_it():
        if what.started is not None:
            what.started(background, runner(Origin.CLI))
        say = render.out.print
        say(
            f"dashboard of {settings.environment} ({shown_url}) on {url}",
            markup=False,
            soft_wrap=True,
        )
        # A token given in the environment is a secret kept there: not echoed to a log.
        say(f"token: {f'from {TOKEN_ENV}' if given else token}", markup=False, soft_wrap=True)
        if not given:
            say(f"act from the page: open {url}?token={token}", markup=False, soft_wrap=True)
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        uvicorn.Server(config).run(sockets=[sock])


# The demo's pace: a bar a person can watch move, cancel and resume (about 4 rows a millisecond
# of batch, a quarter second apart: 100,000 messages take about two minutes).
DEMO_PACE = ("--batch-size", "250", "--pause", "0.25")
DEMO_APP = "chat_migrations:migrations"


def demo_socket(port: int) -> socket.socket:
    """Where the demo will serve, taken before it seeds anything: a port in use, or the extra
    missing, is one sentence before the messages are replaced."""
    require_extra()
    return bind("127.0.0.1", port)


def serve_demo(
    sock: socket.socket,
    log_format: str | None,
    log_file: str | None,
    migrations: Migrations,
    name: str,
) -> None:
    """The demo in the browser: the dashboard over the demo's messages, migration `name`
    started at the demo's pace (and each run the page starts), canceled when the demo ends."""

    def started(background: Background, runner: Runner) -> None:
        begun = background.start(runner, "run", name, [], Origin.CLI)
        if begun.code is not None:  # it ended before it began: its sentence says why
            raise Refused(f"{name} did not start: {begun.said} (log {begun.log})")
        render.out.print(
            f"{name}: running in the background at the demo's pace (pid {begun.pid}, log "
            f"{begun.log}); cancel and resume it from the page",
            markup=False,
            soft_wrap=True,
        )

    notice = (
        f"Demo: {name} runs at a pace a person can follow ({DEMO_PACE[1]} rows per batch, "
        f"{DEMO_PACE[3]} s between batches). Cancel and resume it here; read the "
        "conversations under Messages."
    )
    served = Served(migrations, DEMO_APP, notice, DEMO_PACE, started, sock)
    try:
        serve("127.0.0.1", 0, log_format, log_file, served)
    finally:
        if current().runner(migrations).cancel(name):  # a demo leaves nothing running
            render.out.print(f"{name}: canceled; `backfill run {name}` resumes it")


@contextmanager
def _interrupt_ends_it() -> Iterator[None]:
    """SIGINT and SIGTERM end the command with exit 0, as `backfill metrics`: uvicorn shuts
    down on either, then raises it again under the handlers it found, these no-ops."""

    def ignore(_signum: int, _frame: FrameType | None) -> None:
        pass

    with handled(ignore):
        yield

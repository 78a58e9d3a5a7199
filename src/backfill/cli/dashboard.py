"""`backfill dashboard`: the web dashboard (backfill.dashboard), served until interrupted. Its
web libraries are the `dashboard` extra's, imported only here, when the command runs."""

from __future__ import annotations

import importlib.util
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import click

from backfill.cli import render
from backfill.cli.options import current, global_options
from backfill.errors import ConfigError, Refused
from backfill.history import Origin
from backfill.redaction import redact_url
from backfill.runner import Runner
from backfill.stop_signals import handled

TOKEN_ENV = "BACKFILL_DASHBOARD_TOKEN"
# What the `dashboard` extra installs.
EXTRA = ("starlette", "jinja2", "uvicorn")


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


@click.command(name="dashboard")
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to bind.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8765,
    show_default=True,
    help="The port to listen on (0: a free one, printed).",
)
@global_options
def dashboard_command(host: str, port: int) -> None:
    """Serve the dashboard (status, history, run, dry-run, cancel, revert) until interrupted.
    On loopback, reading is open and acting needs the token; bound elsewhere (only with
    BACKFILL_DASHBOARD_TOKEN set), everything needs it."""
    missing = missing_extra()
    if missing:
        raise ConfigError(
            f"the dashboard needs {', '.join(missing)}: pip install 'backfill[dashboard]'"
        )
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
    app_reference = settings.required_app()
    g.migrations()  # an app that cannot be loaded is one sentence now, not a page later

    def runner(origin: Origin) -> Runner:
        return g.runner(origin=origin)

    import uvicorn

    from backfill.dashboard.app import create_app
    from backfill.dashboard.background import Background

    shown_url = redact_url(settings.database_url)
    app = create_app(
        runner,
        token=token,
        environment=settings.environment,
        database_display=shown_url,
        require_token_for_reads=not loopback,
        background=Background(settings.database_url, app_reference, settings.environment),
        hosts=(*LOOPBACK_NAMES, host) if loopback else (),
    )
    sock = bind(host, port)
    url = address(sock)
    say = render.out.print
    say(f"dashboard of {settings.environment} ({shown_url}) on {url}", markup=False, soft_wrap=True)
    # A token given in the environment is a secret kept there: not echoed to a log.
    say(f"token: {f'from {TOKEN_ENV}' if given else token}", markup=False, soft_wrap=True)
    if not given:
        say(f"act from the page: open {url}?token={token}", markup=False, soft_wrap=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    with sock, _interrupt_ends_it():
        uvicorn.Server(config).run(sockets=[sock])


@contextmanager
def _interrupt_ends_it() -> Iterator[None]:
    """SIGINT and SIGTERM end the command with exit 0, as `backfill metrics`: uvicorn shuts
    down on either, then raises it again under the handlers it found, these no-ops."""

    def ignore(_signum: int, _frame: FrameType | None) -> None:
        pass

    with handled(ignore):
        yield

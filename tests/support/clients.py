"""Dashboards under Starlette's TestClient (no server, no port): `dashboard_clients` makes them
over a database and a registry, each runner recording the origin it serves, and closes them."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from backfill import Migrations, Runner
from backfill.dashboard.app import create_app
from backfill.history import Invocation, Origin

with warnings.catch_warnings():  # Starlette 1.x would rather test with httpx2; httpx is ours
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

MakeClient = Callable[..., TestClient]
__all__ = ["MakeClient", "TestClient", "dashboard_clients"]


@contextlib.contextmanager
def dashboard_clients(url: str, registry: Migrations, **defaults: Any) -> Iterator[MakeClient]:
    """`make(**keywords)`: a started TestClient of `create_app` over `url` with `registry` (a
    `registry=` keyword overrides it), `defaults` overridden by the call's keywords;
    `raise_server_exceptions` and `base_url` are the TestClient's. All closed on leaving."""
    with contextlib.ExitStack() as stack:

        def make(**keywords: Any) -> TestClient:
            arguments = {**defaults, **keywords}
            chosen = arguments.pop("registry", registry)
            client_options = {
                key: arguments.pop(key)
                for key in ("raise_server_exceptions", "base_url")
                if key in arguments
            }

            def runner_for(origin: Origin) -> Runner:
                return Runner(url, chosen, invocation=Invocation(origin=origin))

            client = TestClient(create_app(runner_for, **arguments), **client_options)
            return stack.enter_context(client)

        yield make

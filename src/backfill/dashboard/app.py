"""The dashboard's Starlette app: the page of every migration (live through server-sent events),
a migration's own page, the status and history reads, and the actions (backfill.dashboard.
actions). Every page is rendered by Jinja2 with autoescape on; nothing a request says reaches
SQL (only the Runner is called). Who may do what is backfill.dashboard.auth's (applied by guard.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import anyio
import jinja2
import markupsafe
import prometheus_client
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from backfill import metrics
from backfill.config import PRODUCTION
from backfill.dashboard import display
from backfill.dashboard.actions import (
    LATER,
    OPTIONS,
    Actions,
    Answer,
    BadOptions,
    answer_error,
    options,
)
from backfill.dashboard.auth import COOKIE, Access
from backfill.dashboard.background import Background
from backfill.dashboard.guard import Guard, json_response, refused
from backfill.errors import BackfillError, UnknownMigration
from backfill.history import Origin
from backfill.runner import Runner
from backfill.types import iso
from backfill.views import RESERVED, BadRequest, NotFound, View, ViewRequest

HERE = Path(__file__).resolve().parent
_FORM = "application/x-www-form-urlencoded"
# An action's options are a few short fields: a larger body is refused unread.
_MAX_BODY = 64 * 1024
log = logging.getLogger("backfill")
RunnerFactory = Callable[[Origin], Runner]


async def _body(request: Request) -> bytes | None:
    """The request's body; None when it is larger than _MAX_BODY."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_BODY:
            return None
    return body


class Dashboard:
    """The routes' state: the runners (one per origin, made when first needed and kept), the
    templates, and how to act."""

    def __init__(
        self,
        runner_factory: RunnerFactory,
        access: Access,
        actions: Actions,
        *,
        environment: str,
        database_display: str,
        events_interval: float,
        events_limit: int | None,
        history_limit: int,
        views: Sequence[View],
        notice: str | None,
    ) -> None:
        self._factory, self.access, self.actions = runner_factory, access, actions
        self.views = {view.name: view for view in views}
        self.notice = notice
        self._runners: dict[Origin, Runner] = {}
        self._registry: prometheus_client.CollectorRegistry | None = None
        self._lock = threading.Lock()
        self.environment, self.database_display = environment, database_display
        self.events_interval, self.events_limit = events_interval, events_limit
        self.history_limit = history_limit
        environment_ = jinja2.Environment(
            # A view's templates are "{its name}/{template}", and may extend "base.html".
            loader=jinja2.ChoiceLoader(
                [
                    jinja2.FileSystemLoader(HERE / "templates"),
                    jinja2.PrefixLoader(
                        {view.name: jinja2.FileSystemLoader(view.templates) for view in views}
                    ),
                ]
            ),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        environment_.filters.update(number=display.number, when=display.when)
        # A dry run's samples may hold dates or decimals: shown as text.
        environment_.policies["json.dumps_kwargs"] = {"sort_keys": True, "default": str}
        self.templates = Jinja2Templates(env=environment_)

    def runner(self, origin: Origin = Origin.DASHBOARD) -> Runner:
        with self._lock:
            if origin not in self._runners:
                self._runners[origin] = self._factory(origin)
            return self._runners[origin]

    def close(self) -> None:
        with self._lock:
            for runner in self._runners.values():
                runner.db.dispose()
            self._runners.clear()

    # -- reads ------------------------------------------------------------------------------

    def status_json(self, names: Iterable[str] = ()) -> dict[str, Any]:
        """As `backfill status --json` prints it."""
        report = self.runner().status(list(names))
        return {name: found.to_json() for name, found in report.items()}

    async def api_status(self, request: Request) -> Response:
        return json_response(await run_in_threadpool(self.status_json))

    async def api_history(self, request: Request) -> Response:
        name = request.query_params.get("migration") or None
        raw = request.query_params.get("limit", str(self.history_limit))
        if not raw.isdigit() or int(raw) < 1:
            return json_response({"error": "limit must be a whole number of at least 1"}, 400)
        entries = await run_in_threadpool(self.runner().history, name, int(raw))
        return json_response({"runs": [entry.to_json() for entry in entries]})

    async def metrics(self, request: Request) -> Response:
        """What the database knows, in Prometheus' text format (as `backfill metrics`)."""
        runner = self.runner()  # (it takes the lock too)
        with self._lock:
            if self._registry is None:
                self._registry = metrics.database_registry(runner.status, runner.clock)
        exposition = await run_in_threadpool(prometheus_client.generate_latest, self._registry)
        return Response(exposition, media_type=prometheus_client.CONTENT_TYPE_LATEST)

    async def events(self, request: Request) -> Response:
        return StreamingResponse(
            self._stream(request),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def _stream(self, request: Request) -> AsyncIterator[str]:
        """The status JSON every `events_interval` seconds, until the client goes (or, for
        tests, after `events_limit` events); a read that fails is an `error` event."""
        sent = 0
        while self.events_limit is None or sent < self.events_limit:
            if sent and await request.is_disconnected():
                return
            try:
                report = await run_in_threadpool(self.status_json)
            except BackfillError as error:
                yield f"event: error\ndata: {json.dumps({'error': str(error)})}\n\n"
            else:
                yield f"data: {json.dumps(report, ensure_ascii=False, default=str)}\n\n"
            sent += 1
            if self.events_limit is None or sent < self.events_limit:
                await anyio.sleep(self.events_interval)

    # -- pages ------------------------------------------------------------------------------

    def _page(self, request: Request, template: str, /, **context: Any) -> Response:
        # The forms carry the token only for a browser that was given it (the cookie).
        cookie = request.cookies.get(COOKIE)
        context.update(
            environment=self.environment,
            production=self.environment == PRODUCTION,
            database=self.database_display,
            token=self.access.token if self.access.valid(cookie) else None,
            shown=display.shown,
            views=[(view.name, view.title) for view in self.views.values()],
            notice=self.notice,
        )
        return self.templates.TemplateResponse(request, template, context)

    async def index(self, request: Request) -> Response:
        def read() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            runner = self.runner()
            history = runner.history(limit=self.history_limit)
            return self.status_json(), [entry.to_json() for entry in history]

        report, history = await run_in_threadpool(read)
        return self._page(request, "index.html", report=report, history=history)

    async def migration(self, request: Request) -> Response:
        name = request.path_params["name"]

        def read() -> dict[str, Any]:
            runner = self.runner()
            found = runner.migrations[name]  # UnknownMigration: 404
            with contextlib.suppress(BackfillError):  # a table not there yet: as declared
                found = runner.migration(name)  # its tables reflected, when it names them
            return {
                "name": name,
                "definition": display.definition(found),
                "source": display.source(found),
                "report": self.status_json([name]),
                "skipped": [
                    {**row, "at": iso(row["at"])}
                    for row in runner.skipped_rows(name, self.history_limit, newest=True)
                ],
                "history": [e.to_json() for e in runner.history(name, self.history_limit)],
            }

        return self._page(request, "migration.html", **await run_in_threadpool(read))

    async def view(self, request: Request) -> Response:
        """A page of an application's view (backfill.views), read in a worker thread."""
        name, path = request.path_params["name"], request.path_params.get("path", "")
        found = self.views.get(name)
        if found is None:
            known = ", ".join(self.views) or "none"
            raise NotFound(f"no view {name!r} (this app's views: {known})")

        def render(template: str, context: Mapping[str, Any]) -> str:
            # Rendered with autoescape: markup the page may show as it is.
            rendered = self.templates.env.get_template(f"{name}/{template}").render(**context)
            return markupsafe.Markup(rendered)

        asked = ViewRequest(path, dict(request.query_params), self.runner().db.engine, render)
        page = await run_in_threadpool(found.page, asked)
        taken = sorted(RESERVED & set(page.context))
        if taken:  # the view's bug: said, not silently shadowed
            raise TypeError(f"view {name!r} gives its page the dashboard's own names {taken}")
        context = {
            **page.context,
            "title": page.title or found.title,
            "view_root": f"/views/{name}/",
        }
        return self._page(request, f"{name}/{page.template}", **context)

    # -- actions ----------------------------------------------------------------------------

    async def act(self, request: Request) -> Response:
        name, action = request.path_params["name"], request.path_params["action"]
        # The page's forms post urlencoded fields; anything else is the API's JSON.
        from_form = request.headers.get("content-type", "").startswith(_FORM)
        body = await _body(request)
        if body is None:
            return json_response({"error": f"the body is larger than {_MAX_BODY:,} bytes"}, 413)
        form = dict(parse_qsl(body.decode(errors="replace"))) if from_form else None
        token = None if form is None else form.pop("token", None)
        refusal = self._refusal(request, name, action, token)
        if refusal is not None:
            return self._answer(request, name, refusal, from_form)
        try:
            chosen = options(action, body, form)
        except BadOptions as error:
            return self._answer(request, name, Answer.refusal(400, str(error)), from_form)
        origin = Origin.DASHBOARD if from_form else Origin.API
        runner = self.runner(origin)
        answer = await run_in_threadpool(self.actions.act, runner, name, action, chosen, origin)
        log.log(
            logging.INFO if answer.code < 400 else logging.WARNING,
            "dashboard: %s of %s asked from the %s: %d %s",
            action, name, origin.value, answer.code, answer.sentence,
            extra={"migration": name},
        )  # fmt: skip
        return self._answer(request, name, answer, from_form)

    def _refusal(
        self, request: Request, name: str, action: str, form_token: str | None
    ) -> Answer | None:
        """401 without the token (the bearer's, or a form's with the cookie), 404 for an
        unknown migration or action; None: go on."""
        if not self.access.may_act(
            authorization=request.headers.get("authorization"),
            form_token=form_token,
            cookie=request.cookies.get(COOKIE),
        ):
            return Answer.refusal(401, "acting needs the token: `Authorization: Bearer <token>`")
        names = self.runner().migrations.names()
        if name not in names:
            known = ", ".join(names) or "none"
            return Answer.refusal(404, f"unknown migration {name!r} (defined: {known})")
        if action not in OPTIONS and action not in LATER:
            return Answer.refusal(404, f"unknown action {action!r}: run, dry-run, cancel or revert")
        return None

    def _answer(self, request: Request, name: str, answer: Answer, from_form: bool) -> Response:
        """JSON for the API; the result page, with the same status, for the page's forms."""
        if not from_form:
            return json_response(answer.document, answer.code)
        response = self._page(request, "result.html", name=name, answer=answer)
        response.status_code = answer.code
        return response


def create_app(
    runner_factory: RunnerFactory,
    *,
    token: str,
    environment: str,
    database_display: str,
    require_token_for_reads: bool,
    background: Background | None = None,
    hosts: Iterable[str] = (),
    events_interval: float = 1.0,
    events_limit: int | None = None,
    history_limit: int = 20,
    views: Sequence[View] = (),
    notice: str | None = None,
) -> Starlette:
    """The dashboard over the runners `runner_factory(origin)` makes (each once; their
    histories record that origin). `token` authorizes actions, and reads too when
    `require_token_for_reads` (bound beyond loopback). `database_display` is shown as is:
    give it redacted. `background` starts the detached runs and reverts (None: refused).
    `hosts`: the Host names answered (loopback's; empty: any). `events_limit` ends the event
    stream after that many events (tests). `views`: the application's pages (backfill.views),
    under /views/{name}/. `notice`: a sentence at the top of every page (the demo's pace)."""
    access = Access(token, require_token_for_reads, frozenset(h.lower() for h in hosts))
    actions = Actions(background, production=environment == PRODUCTION)
    dashboard = Dashboard(
        runner_factory,
        access,
        actions,
        environment=environment,
        database_display=database_display,
        events_interval=events_interval,
        events_limit=events_limit,
        history_limit=history_limit,
        views=views,
        notice=notice,
    )

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            dashboard.close()

    async def failed(request: Request, error: Exception) -> Response:
        if isinstance(error, UnknownMigration | NotFound):
            return refused(request, 404, str(error))
        if isinstance(error, BadRequest):
            return refused(request, 400, str(error))
        assert isinstance(error, BackfillError)
        answer = answer_error(error)
        return refused(request, answer.code, answer.sentence)

    routes = [
        Route("/", dashboard.index),
        Route("/migrations/{name}", dashboard.migration),
        Route("/api/status", dashboard.api_status),
        Route("/api/history", dashboard.api_history),
        Route("/events", dashboard.events),
        Route("/metrics", dashboard.metrics),
        Route("/views/{name}/{path:path}", dashboard.view),
        Route("/api/migrations/{name}/{action}", dashboard.act, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={BackfillError: failed},
        lifespan=lifespan,
    )
    app.add_middleware(Guard, access=access)
    app.state.dashboard = dashboard
    return app

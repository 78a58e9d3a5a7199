"""The check before every route of the dashboard (an ASGI middleware applying
backfill.dashboard.auth's rules): the Host on loopback, a foreign Origin, the token for reads
where they need it, a page opened with `?token=` remembered in the cookie; and the security
headers on every answer. Also how an error answer looks: JSON from the API, text on pages."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backfill.dashboard.auth import COOKIE, Access

# Every answer says: no framing (clickjacking of the actions), scripts and styles from here only.
_SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # Not no-referrer: under it a browser sends `Origin: null` with the page's own forms.
    "referrer-policy": "same-origin",
}


def json_response(document: Any, code: int = 200) -> Response:
    # default=str: a dry run's samples may hold dates or decimals, which JSON cannot.
    body = json.dumps(document, ensure_ascii=False, default=str)
    return Response(body, status_code=code, media_type="application/json")


def wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or request.url.path == "/events"


def refused(request: Request, code: int, sentence: str) -> Response:
    """An error answer: `{"error": sentence}` from the API, the sentence as text on pages."""
    if wants_json(request):
        return json_response({"error": sentence}, code)
    return PlainTextResponse(sentence, status_code=code)


class Guard:
    """Checks every request before any route (ASGI middleware): the Host on loopback, a foreign
    Origin, the token for reads where they need it; a page opened with `?token=` sets the
    cookie and is sent to its address without the token. Adds the security headers."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in _SECURITY_HEADERS.items():
                    headers.setdefault(key, value)
                if not scope["path"].startswith("/static/"):
                    headers.setdefault("cache-control", "no-store")  # pages hold the token
            await send(message)

        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            await refusal(scope, receive, secured)
            return
        await self.app(scope, receive, secured)

    def _refusal(self, request: Request) -> Response | None:
        access, headers = self.access, request.headers
        if not access.host_ok(headers.get("host")):
            return refused(request, 400, "this dashboard answers to its loopback address only")
        own = f"{request.url.scheme}://{request.url.netloc}"
        if not access.origin_ok(headers.get("origin"), own):
            return refused(request, 403, "requests from another site's pages are refused")
        given = request.query_params.get("token")
        if given is not None and request.method == "GET" and not wants_json(request):
            if not access.valid(given):
                return refused(request, 401, "the token in the address is not this one's")
            return _remember_token(request, given)
        if request.method == "POST":
            return None  # an action checks its own token (a form's is in its body)
        if not access.may_read(
            authorization=headers.get("authorization"), cookie=request.cookies.get(COOKIE)
        ):
            return refused(
                request,
                401,
                "this dashboard needs its token: open the address `backfill dashboard` "
                "printed, or send `Authorization: Bearer <token>`",
            )
        return None


def _remember_token(request: Request, token: str) -> Response:
    """The page again, without the token in its address (nor in the browser's history), with
    the cookie that lets its forms act: HttpOnly, SameSite=Strict (no other site's request
    carries it)."""
    rest = [(k, v) for k, v in parse_qsl(request.url.query) if k != "token"]
    target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response

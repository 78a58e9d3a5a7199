"""Who may read and who may act on the dashboard: one token, compared in constant time; a
request from a foreign `Origin` (another site's page) refused; on loopback, a `Host` that is not
a loopback name refused (DNS rebinding); the page's forms carrying the token in a hidden field
together with a `SameSite=Strict`, HttpOnly cookie. Knows nothing of Starlette: the app hands it
header values.

    reads   (pages, /api/status, /api/history, /events, /static)  open on loopback; otherwise
            the token: `Authorization: Bearer`, the cookie, or `?token=` on a page
    actions (POST /api/migrations/{name}/{action})  `Authorization: Bearer <token>`, or the form
            field `token` with the cookie holding the same token
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass, field

# The cookie a page opened with `?token=` sets: the page's forms post it along with the token.
COOKIE = "backfill_token"
# The Host names a dashboard bound to loopback answers to.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def is_loopback(host: str) -> bool:
    """`host` (an address to bind) is this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port or IPv6 brackets, lowercased."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _origin(value: str) -> str:
    """scheme://host[:port], lowercased, without a default port."""
    scheme, sep, rest = value.strip().lower().partition("://")
    rest = rest.rstrip("/")
    port = _DEFAULT_PORTS.get(scheme)
    if sep and port is not None and rest.endswith(f":{port}"):
        rest = rest[: -len(port) - 1]
    return f"{scheme}{sep}{rest}"


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None for any other."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


@dataclass(frozen=True)
class Access:
    """The dashboard's token and what needs it (`reads_need_token`: bound beyond loopback);
    `hosts`: the Host names it answers to (empty: any)."""

    token: str
    reads_need_token: bool
    hosts: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("the dashboard needs a token")

    def valid(self, given: str | None) -> bool:
        """`given` is the token (compared in constant time)."""
        if not given:
            return False
        return secrets.compare_digest(given.encode(), self.token.encode())

    def host_ok(self, host_header: str | None) -> bool:
        return not self.hosts or host_name(host_header or "") in self.hosts

    @staticmethod
    def origin_ok(origin: str | None, own: str) -> bool:
        """No Origin header (not a browser's cross-site request), or this server's own."""
        return origin is None or _origin(origin) == _origin(own)

    def may_read(self, *, authorization: str | None, cookie: str | None) -> bool:
        if not self.reads_need_token:
            return True
        return self.valid(bearer(authorization)) or self.valid(cookie)

    def may_act(
        self, *, authorization: str | None, form_token: str | None, cookie: str | None
    ) -> bool:
        """The bearer token, or a form's token with the cookie holding the same (a form posted
        from another site carries neither: the cookie is SameSite=Strict)."""
        if self.valid(bearer(authorization)):
            return True
        return self.valid(form_token) and self.valid(cookie)

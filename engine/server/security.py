"""Security defaults: a bearer token, same-origin writes, and a loopback-only default.

Three threats shape this module:

* A page the user happens to visit posts to ``http://127.0.0.1:8188`` (CSRF).
  Browsers always send ``Origin`` with such a request, so every state-changing
  request (and every websocket upgrade, which browsers do not restrict by
  origin) whose ``Origin`` is not this server is refused. Programs (curl, Python
  clients) send no ``Origin`` and pass.
* A hostile DNS name resolving to 127.0.0.1 (DNS rebinding) makes the page
  same-origin with the server. Without a token the ``Host`` header must
  therefore name a loopback address or the host the server was bound to.
* Someone on the network reaches a server bound beyond loopback. That is only
  allowed with a token (:func:`check_bind`), and the token is then required on
  every route: as ``Authorization: Bearer``, as a ``token`` query parameter (a
  browser cannot set headers on a websocket or an ``<img>``), or as the
  ``kiln_token`` cookie that a query-parameter login sets, so the editor opened
  as ``http://host:8188/?token=...`` keeps working without the token in its URLs.

No route of this server installs code; that is a property of the route set
(checked by the OpenAPI test), not something this module has to enforce.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from engine.server.http import json_error
from engine.server.state import STATE

TOKEN_ENV = "KILN_TOKEN"
COOKIE = "kiln_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BindRefused(RuntimeError):
    """Binding beyond loopback was asked for without a token."""


def resolve_token(token: str | None) -> str | None:
    """The token from ``--token``, else from ``$KILN_TOKEN``; empty means none."""
    token = token if token else os.environ.get(TOKEN_ENV, "")
    return token.strip() or None


def is_loopback(host: str) -> bool:
    """True for names and addresses that only this machine can reach."""
    host = (host or "").strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token; ``run_server`` calls it before binding.

    ``0.0.0.0``, ``::``, an empty host, a LAN address or any other name counts as
    beyond loopback: the safe answer for a name we cannot judge is "no".
    """
    if not is_loopback(host) and not token:
        raise BindRefused(
            f"refusing to listen on {host or 'all interfaces'!r} without a token: anyone on the network "
            f"could run jobs and read your files. Pass --token SECRET (or set {TOKEN_ENV}), "
            f"or bind to 127.0.0.1.")


def _split_host(value: str, default_port: int | None) -> tuple[str, int | None]:
    """``host[:port]`` (IPv6 in brackets) as a lower-case host and a port."""
    parts = urlsplit(f"//{value}")
    try:
        port = parts.port
    except ValueError:
        return value.lower(), None
    return (parts.hostname or "").lower(), port if port is not None else default_port


def origin_matches(origin: str, host_header: str, scheme: str) -> bool:
    """Whether a browser's ``Origin`` names the host this request was sent to."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False  # "null" (sandboxed frames, file://) and anything odd
    default = {"http": 80, "https": 443}
    try:
        origin_port = parts.port or default[parts.scheme]
    except ValueError:
        return False
    host, port = _split_host(host_header, default.get(scheme, 80))
    return parts.hostname.lower() == host and origin_port == port


def _token_of(request: web.Request) -> tuple[str | None, bool]:
    """The token a request carries, and whether it came in the query string."""
    auth = request.headers.get(hdrs.AUTHORIZATION, "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), False
    if request.method in SAFE_METHODS and request.query.get("token"):
        return request.query["token"], True
    cookie = request.cookies.get(COOKIE)
    return (cookie or None), False


def _refuse(status: int, kind: str, message: str, **headers: str) -> web.Response:
    response = json_error(status, kind, message)
    response.headers.update(headers)
    return response


@web.middleware
async def token_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With a token configured, every route needs it (constant-time comparison)."""
    expected = request.app[STATE].settings.token
    if not expected:
        return await handler(request)
    given, from_query = _token_of(request)
    if given is None or not hmac.compare_digest(given.encode(), expected.encode()):
        return _refuse(401, "unauthorized", "this server needs a token: send 'Authorization: Bearer <token>'",
                       **{"WWW-Authenticate": 'Bearer realm="kiln"'})
    response = await handler(request)
    if from_query and not response.prepared:
        response.set_cookie(COOKIE, expected, httponly=True, samesite="Strict", path="/")
    return response


@web.middleware
async def origin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Cross-site writes and websocket upgrades are refused; so are rebinding host names."""
    settings = request.app[STATE].settings
    host_header = request.headers.get(hdrs.HOST, "")
    if not settings.token:
        host, _ = _split_host(host_header, None)
        if not (is_loopback(host) or host == (settings.host or "").strip("[]").lower()):
            return _refuse(403, "host_refused",
                           f"Host {host_header!r} is not this server's address; use http://127.0.0.1 "
                           f"(a server reached by another name needs --token)")
    upgrade = request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
    if request.method not in SAFE_METHODS or upgrade:
        origin = request.headers.get(hdrs.ORIGIN)
        cross_site = request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site"
        if cross_site or (origin is not None and not origin_matches(origin, host_header, request.scheme)):
            return _refuse(403, "cross_origin",
                           f"cross-origin request refused: Origin {origin!r} is not {host_header!r}")
    return await handler(request)


def middlewares() -> list[Handler]:
    """The security middlewares, outermost first, for ``web.Application(middlewares=...)``."""
    return [token_middleware, origin_middleware]

"""The doors of `wecast serve`, as ASGI middleware in front of every route.

`RequestGuard` (always on) makes the loopback default safe from the web pages the operator visits:

* **Host**: when the server listens on loopback, a request must name a loopback host (`127.0.0.1`, `localhost`,
  `[::1]`, any port). DNS rebinding — a page whose own name resolves to 127.0.0.1 — sends its own name and is
  refused (421), before it can read or change anything.
* **Origin**: a state-changing request (POST, PUT, PATCH, DELETE) from a browser carries an `Origin`; it must be
  this server itself (scheme, host and port of the `Host` header). Any other site, and `Origin: null`
  (sandboxed frames, files), is refused (403), as is `Sec-Fetch-Site: cross-site`. Clients that are not browsers
  (curl, scripts) send no Origin and are not affected: the source document's curl lines keep working.
* **JSON only**: a state-changing request with a body must say `Content-Type: application/json` (415 otherwise).
  What a cross-site page can send without a CORS preflight — forms, text/plain, a typeless blob — is therefore
  never read as JSON.

`BearerAuth` (when a key is configured, and always beyond loopback): every path but /healthz needs
`Authorization: Bearer <key>`, compared in constant time; the key is never logged or echoed.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from engine.web.errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/healthz"})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost"})


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, without port) only ever means this machine. Names other than
    localhost count as not loopback: they may resolve to anything."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_part(authority: str) -> str:
    """`example.com:9898` -> `example.com`; `[::1]:9898` -> `::1`."""
    if authority.startswith("["):
        return authority[1 : authority.find("]")] if "]" in authority else authority
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in scope.get("headers", [])}


async def _refuse(send: Send, status: int, message: str, headers: Collection[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error_body(message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Host, Origin and Content-Type checks (see the module docstring). `loopback_only`: the server listens on
    loopback, so only loopback host names are accepted."""

    def __init__(self, app: ASGIApp, *, loopback_only: bool) -> None:
        self.app = app
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        host = headers.get(b"host", b"").decode("latin-1")
        if self.loopback_only and not is_loopback(_host_part(host)):
            await _refuse(
                send,
                421,
                f"this server only answers to loopback names (127.0.0.1, localhost), not {host or 'no Host'!r}",
            )
            return
        if scope.get("method", "GET") in STATE_CHANGING:
            problem = self._cross_site(headers, host)
            if problem:
                await _refuse(send, 403, problem)
                return
            if self._has_body(headers) and not self._is_json(headers):
                await _refuse(send, 415, "send the body as JSON, with the header 'Content-Type: application/json'")
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _cross_site(headers: dict[bytes, bytes], host: str) -> str:
        """Why a state-changing request comes from another site ('' when it does not)."""
        if headers.get(b"sec-fetch-site", b"").lower() == b"cross-site":
            return "cross-site requests cannot change anything here"
        origin = headers.get(b"origin")
        if origin is None:
            return ""
        text = origin.decode("latin-1")
        parts = urlsplit(text)
        if text == "null" or parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower():
            return f"requests from {text!r} cannot change anything here (only this server's own pages can)"
        return ""

    @staticmethod
    def _has_body(headers: dict[bytes, bytes]) -> bool:
        length = headers.get(b"content-length")
        if length is not None:
            return length.strip() not in (b"", b"0")
        return b"transfer-encoding" in headers

    @staticmethod
    def _is_json(headers: dict[bytes, bytes]) -> bool:
        media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class BearerAuth:
    """Every path but /healthz needs `Authorization: Bearer <key>` (see the module docstring)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self._key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = _headers(scope).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest also runs for a wrong scheme, so timing does not tell which part was wrong.
        ok = hmac.compare_digest(token.strip(), self._key)
        if ok and scheme.lower() == b"bearer":
            await self.app(scope, receive, send)
            return
        await _refuse(
            send,
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
            [(b"www-authenticate", b"Bearer")],
        )

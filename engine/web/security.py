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
  never read as JSON. Uploads (`POST /api/v1/media`, raw bytes) may say any other type, for the same reason:
  everything but the preflight-free types (and no type at all) needs a preflight, which this server never grants.
  WeCom's callbacks (`SIGNED_PATHS`) are XML, and are checked by their signature instead.

`BodyLimit` (always on) keeps one request from filling the memory: a body over `MAX_BODY` bytes is refused with 413,
at once when its Content-Length says so (nothing of it is read) and as soon as the bytes pass the limit when it is
sent without one (chunked). The largest body the API takes is a `/send-message-all` to its 100,000 ids. Uploads
(`UPLOAD_PATHS`) are streamed to disk and stopped at WeCom's limit for their kind by the media store instead.

`no_nul_characters` (a dependency of every route) refuses a NUL character (U+0000) anywhere in a request — the path,
a query parameter, a string of the JSON body (as the escape `\u0000`) — with 422 naming the field: PostgreSQL's
text cannot hold one, so a NUL that reached a query was a 500 there (and "no such contact" on SQLite). Message text
refuses every control character already (`engine.web.models`); a name, an id or a search never needs a NUL.

`Authentication` (always on) lets people in:

* **The key**: when a key is configured (always beyond loopback), every path but /healthz, /livez, the console's
  sign-in page and its static files, and WeCom's signed callbacks needs `Authorization: Bearer <key>` (compared
  in constant time) or the console's session cookie, which its sign-in form gives for the key
  (`engine.web.sessions`). A browser asking for a console page without either is sent to the sign-in page;
  everything else gets 401. The key is never logged or echoed.
* **Guessing**: wrong keys count per client address, in the Authorization header and at the console's sign-in
  alike (`engine.web.attempts`: 5 in 10 minutes); past that, a request that presents a key gets 429 with
  Retry-After, without the key being checked, until the oldest failure is 10 minutes old.
* **CSRF**: a state-changing request that rides on the cookie — every one to the console, and any to the API
  that is not made with the Bearer header — must carry the session's token in `X-CSRF-Token` (403 otherwise).
  The console's pages send it with every change they make; a cross-site page cannot read it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.requests import ClientDisconnect

from engine.i18n import tr
from engine.web.attempts import FailedAttempts
from engine.web.errors import error_body
from engine.web.sessions import CSRF_HEADER, SessionTokens, cookie_value

log = logging.getLogger("wecast.web")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CONSOLE = "/console"
SIGNIN = "/console/signin"
# WeCom's callbacks (engine.web.wecom_callback): XML, no key; each is authenticated by its own signature instead.
SIGNED_PATHS = frozenset({"/wecom/callback"})
# What anyone may fetch: liveness and readiness, the console's sign-in page and its static files (vendored scripts,
# styles), and the signed callbacks.
OPEN_PATHS = frozenset({"/healthz", "/livez", SIGNIN, *SIGNED_PATHS})
OPEN_PREFIXES = (f"{CONSOLE}/static/",)
UPLOAD_PATHS = frozenset({"/api/v1/media"})  # raw bodies (see the module docstring)
# What a browser sends cross-site without a CORS preflight (the Fetch standard's CORS-safelisted types).
PREFLIGHT_FREE = frozenset({b"application/x-www-form-urlencoded", b"multipart/form-data", b"text/plain", b""})
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost"})
# Bytes of a request body: 100,000 contact ids of up to 80 characters (a /send-message-all) fit; what a body this
# size parses into stays within a few hundred MB even when it is all one-character strings.
MAX_BODY = 8 * 1024 * 1024


def is_console(path: str) -> bool:
    """Whether `path` belongs to the web console (its pages, forms and files)."""
    return path == CONSOLE or path.startswith(CONSOLE + "/")


def is_open(path: str) -> bool:
    """Whether `path` is served without the key."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


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


async def _refuse(
    send: Send, status: int, message: str, code: str, headers: Collection[tuple[bytes, bytes]] = ()
) -> None:
    body = json.dumps(error_body(message, code=code), ensure_ascii=False).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
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
                tr(
                    "this server only answers to loopback names (127.0.0.1, localhost), not {host}",
                    host=repr(host) if host else tr("no Host"),
                ),
                "misdirected_request",
            )
            return
        if scope.get("method", "GET") in STATE_CHANGING:
            problem = self._cross_site(headers, host)
            if problem:
                await _refuse(send, 403, problem, "cross_site")
                return
            if scope.get("path") in UPLOAD_PATHS:
                if self._media_type(headers) in PREFLIGHT_FREE:
                    await _refuse(
                        send,
                        415,
                        tr("send the file's bytes with its type, e.g. 'Content-Type: application/octet-stream'"),
                        "unsupported_media_type",
                    )
                    return
            elif self._has_body(headers) and not self._is_json(headers) and scope.get("path") not in SIGNED_PATHS:
                await _refuse(
                    send,
                    415,
                    tr("send the body as JSON, with the header 'Content-Type: application/json'"),
                    "unsupported_media_type",
                )
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _cross_site(headers: dict[bytes, bytes], host: str) -> str:
        """Why a state-changing request comes from another site ('' when it does not)."""
        if headers.get(b"sec-fetch-site", b"").lower() == b"cross-site":
            return tr("cross-site requests cannot change anything here")
        origin = headers.get(b"origin")
        if origin is None:
            return ""
        text = origin.decode("latin-1")
        parts = urlsplit(text)
        if text == "null" or parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower():
            return tr(
                "requests from {origin} cannot change anything here (only this server's own pages can)",
                origin=repr(text),
            )
        return ""

    @staticmethod
    def _has_body(headers: dict[bytes, bytes]) -> bool:
        length = headers.get(b"content-length")
        if length is not None:
            return length.strip() not in (b"", b"0")
        return b"transfer-encoding" in headers

    @staticmethod
    def _media_type(headers: dict[bytes, bytes]) -> bytes:
        return headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()

    @classmethod
    def _is_json(cls, headers: dict[bytes, bytes]) -> bool:
        media = cls._media_type(headers)
        return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


NUL = "\x00"
# The JSON escape of a NUL: `\u0000` after an even number of backslashes (`\\u0000` is a backslash and "u0000").
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def _nul_at(value: Any, path: tuple[str | int, ...] = ()) -> tuple[str | int, ...] | None:
    """Where in a parsed JSON value a string (a key or a value) holds a NUL, or None."""
    if isinstance(value, str):
        return path if NUL in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = (*path, key) if NUL in key else _nul_at(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _nul_at(item, (*path, index))
            if found is not None:
                return found
    return None


async def no_nul_characters(request: Request) -> None:
    """Refuse a request with a NUL character anywhere (see the module docstring): RequestValidationError."""
    where: tuple[str | int, ...] | None = None
    named = {value: name for name, value in request.path_params.items() if isinstance(value, str)}
    if NUL in request.url.path:
        where = ("path", next((name for value, name in named.items() if NUL in value), "path"))
    else:
        where = next((("query", k) for k, v in request.query_params.multi_items() if NUL in k or NUL in v), None)
    json_body = request.url.path not in UPLOAD_PATHS and RequestGuard._is_json(_headers(request.scope))
    if where is None and request.method in STATE_CHANGING and json_body:
        body = await request.body()  # already read for the route (Starlette keeps it): no second read
        if _JSON_NUL.search(body):
            try:
                found = _nul_at(json.loads(body))
            except ValueError:  # not JSON after all: the route says so
                found = None
            where = ("body", *found) if found is not None else None
    if where is not None:
        reason = tr("control character {char} in the text", char="U+0000")
        raise RequestValidationError([{"loc": where, "msg": reason, "type": "value_error"}])


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413 (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def _too_large(self, send: Send) -> None:
        await _refuse(
            send,
            413,
            tr("the request body is larger than {mb} MB", mb=self.limit // (1024 * 1024)),
            "too_large",
            [(b"connection", b"close")],
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in UPLOAD_PATHS:
            await self.app(scope, receive, send)
            return
        length = _headers(scope).get(b"content-length", b"").strip()
        if length.isdigit() and int(length) > self.limit:
            await self._too_large(send)
            return
        received = 0
        refused = False
        started = False

        async def counted() -> Message:
            # A body without a length (or longer than it said) is counted as it arrives; past the limit the answer is
            # the 413 and the route sees the client go away.
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    if not started:
                        await self._too_large(send)
                    return {"type": "http.disconnect"}
            return message

        async def answer(message: Message) -> None:
            nonlocal started
            if refused:  # the 413 was the answer: what the route says after it goes nowhere
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, answer)
        except ClientDisconnect:
            if not refused:
                raise


class Authentication:
    """The key (Bearer header or console session) and the CSRF token (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, sessions: SessionTokens, attempts: FailedAttempts | None = None) -> None:
        self.app = app
        self.sessions = sessions
        self.attempts = attempts or FailedAttempts()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        headers = _headers(scope)
        session = self.sessions.read(cookie_value(headers.get(b"cookie", b"").decode("latin-1")))
        client = scope.get("client")
        address = str(client[0]) if client else ""
        presented = bool(headers.get(b"authorization", b"").strip())
        if presented and self.sessions.key_required:
            wait = self.attempts.retry_after(address)
            if wait is not None:  # the console's sign-in and the Bearer header share the limit on wrong keys
                await _refuse(
                    send,
                    429,
                    tr("too many wrong API keys from this address: try again in {n} seconds", n=wait),
                    "too_many_attempts",
                    [(b"retry-after", str(wait).encode())],
                )
                return
        bearer = self._bearer_ok(headers)
        if (
            presented
            and self.sessions.key_required
            and not bearer
            and self.attempts.failed(address) >= self.attempts.limit
        ):
            log.warning(
                "%d wrong API keys from %s within %d s (Authorization header); refusing it for %d s",
                self.attempts.limit,
                address,
                self.attempts.window,
                self.attempts.retry_after(address) or 0,
            )
        if self.sessions.key_required and not is_open(path) and not bearer and not (session and session.signed_in):
            await self._refuse_unsigned(scope, headers, send)
            return
        on_cookie = not bearer and (is_console(path) or (session is not None and session.signed_in))
        if scope.get("method", "GET") in STATE_CHANGING and on_cookie:
            token = headers.get(CSRF_HEADER.encode(), b"").decode("latin-1")
            if session is None or not self.sessions.check_csrf(session, token):
                await _refuse(
                    send, 403, tr("missing or wrong CSRF token: reload the page and try again"), "csrf_failed"
                )
                return
        await self.app(scope, receive, send)

    def _bearer_ok(self, headers: dict[bytes, bytes]) -> bool:
        header = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        # check_key also runs for a wrong scheme, so timing does not tell which part was wrong.
        return self.sessions.check_key(token) and scheme.lower() == "bearer"

    @staticmethod
    async def _refuse_unsigned(scope: Scope, headers: dict[bytes, bytes], send: Send) -> None:
        path: str = scope.get("path", "")
        wants_page = scope.get("method") == "GET" and b"text/html" in headers.get(b"accept", b"")
        if is_console(path) and b"hx-request" in headers:
            # An htmx request would swap the sign-in page into a fragment: tell htmx to go there instead.
            await _refuse(send, 401, tr("sign in first"), "unauthorized", [(b"hx-redirect", SIGNIN.encode())])
        elif (is_console(path) or path == "/") and wants_page:
            await send(
                {
                    "type": "http.response.start",
                    "status": 303,
                    "headers": [(b"location", f"{SIGNIN}?next={quote(path)}".encode()), (b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
        else:
            await _refuse(
                send,
                401,
                tr("missing or wrong API key: send the header 'Authorization: Bearer <key>'"),
                "unauthorized",
                [(b"www-authenticate", b"Bearer")],
            )

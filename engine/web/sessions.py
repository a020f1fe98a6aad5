"""Console sessions: the web console's sign-in exchanges the API key for a cookie, and every change it makes
carries a CSRF token bound to that cookie.

A session is a signed token, not a row: `v1.<nonce>.<expires>.<kind>.<mac>`, where `kind` is `key` (signed in
with the API key) or `anon` (a server without a key: the cookie only carries the CSRF binding), and `mac` is an
HMAC-SHA256 over the rest. The signing secret is derived from the API key, so sessions survive a restart and
all of them end when the key changes; without a key it is random per process. The cookie is HttpOnly (page
scripts cannot read it) and SameSite=Strict (other sites' pages never send it); the CSRF token (an HMAC of the
nonce) is written into the console's pages and sent back in the `X-CSRF-Token` header of every state-changing
request, which a cross-site page can neither read nor forge. Signing out revokes the nonce in this process.

Nothing here ever logs or echoes the key, a token or a cookie value.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

COOKIE = "wecast_session"
CSRF_HEADER = "x-csrf-token"
LIFETIME = 12 * 3600  # seconds a console sign-in lasts


class SessionKind(StrEnum):
    KEY = "key"  # signed in with the API key
    ANONYMOUS = "anon"  # no key configured: the session only binds the CSRF token


@dataclass(frozen=True, slots=True)
class Session:
    nonce: str
    expires: int
    kind: SessionKind

    @property
    def signed_in(self) -> bool:
        return self.kind is SessionKind.KEY


class SessionTokens:
    """Mints and checks session cookies and CSRF tokens (see the module docstring). `key`: the API key, or None
    when the server has none. `now`: seconds since the epoch (injected for tests)."""

    def __init__(self, key: str | None, *, now: Callable[[], float] = time.time) -> None:
        self.key_required = key is not None
        secret = key.encode() if key is not None else secrets.token_bytes(32)
        self._secret = hmac.new(secret, b"wecast console session v1", hashlib.sha256).digest()
        self._key = key.encode() if key is not None else None
        self._now = now
        self._revoked: set[str] = set()

    def _mac(self, payload: str) -> str:
        return hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()

    def check_key(self, candidate: str) -> bool:
        """Whether `candidate` is the API key (constant time)."""
        return self._key is not None and hmac.compare_digest(candidate.strip().encode(), self._key)

    def issue(self, kind: SessionKind) -> str:
        """A new session cookie value."""
        payload = f"v1.{secrets.token_hex(16)}.{int(self._now()) + LIFETIME}.{kind.value}"
        return f"{payload}.{self._mac(payload)}"

    def read(self, value: str | None) -> Session | None:
        """The session a cookie value carries, or None when it is missing, forged, expired or revoked."""
        if not value:
            return None
        payload, _, mac = value.rpartition(".")
        parts = payload.split(".")
        if len(parts) != 4 or parts[0] != "v1" or not hmac.compare_digest(mac, self._mac(payload)):
            return None
        _, nonce, expires, kind = parts
        try:
            session = Session(nonce, int(expires), SessionKind(kind))
        except ValueError:
            return None
        if session.expires <= self._now() or nonce in self._revoked:
            return None
        return session

    def csrf_token(self, session: Session) -> str:
        """The CSRF token bound to `session` (what the console's pages send back)."""
        return self._mac(f"csrf.{session.nonce}")

    def check_csrf(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), self.csrf_token(session))

    def revoke(self, session: Session) -> None:
        """Sign out: this session's cookie is refused from now on (in this process)."""
        self._revoked.add(session.nonce)


def cookie_header(value: str, *, secure: bool, max_age: int = LIFETIME) -> str:
    """The Set-Cookie header value for a session cookie (`max_age` 0 deletes it)."""
    attributes = [f"{COOKIE}={value}", "Path=/", f"Max-Age={max_age}", "HttpOnly", "SameSite=Strict"]
    if secure:
        attributes.append("Secure")
    return "; ".join(attributes)


def cookie_value(header: str) -> str | None:
    """The session cookie's value in a Cookie request header."""
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None

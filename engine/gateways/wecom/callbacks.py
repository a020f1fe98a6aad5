"""WeCom's callbacks (接收事件服务器): the URL check, and change_external_contact events as typed values.

`CallbackReceiver.receive` takes what WeCom POSTed — the query's msg_signature, timestamp and nonce and the XML
body `<xml><ToUserName/><AgentID/><Encrypt/></xml>` — and returns the decrypted event, or raises `CallbackError`:

* the signature must match (crypto.MessageCrypt.verify), the ciphertext decrypt, its receive id be our corpid;
* the timestamp must be within `max_age` of now (a captured callback cannot be played back later), and a
  (signature, timestamp, nonce) seen before is a replay: refused;
* the same event delivered twice (WeCom retries when an answer is slow, with a new nonce) is recognised by its
  content and returned as None: acknowledged, not processed again.

XML with a DOCTYPE is refused before parsing (WeCom never sends one; it is how entity-expansion attacks start).
Fields are kept as they arrive (`CallbackEvent.fields`), and change types wecast does not act on are logged with
them, as the reference asks for what it marks UNCERTAIN.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime

from engine.clock import Clock
from engine.gateways.wecom.crypto import CallbackError, MessageCrypt

log = logging.getLogger("wecast.wecom")
MAX_BODY = 64 * 1024  # a callback is a few hundred bytes


def parse_xml(body: bytes | str, what: str = "callback") -> dict[str, str]:
    """The root's child elements of a flat WeCom XML document, as text."""
    raw = body.encode() if isinstance(body, str) else body
    if len(raw) > MAX_BODY:
        raise CallbackError(f"the {what} is larger than {MAX_BODY} bytes")
    if b"<!DOCTYPE" in raw.upper() or b"<!ENTITY" in raw.upper():
        raise CallbackError(f"the {what} declares a DOCTYPE or entities, which WeCom never sends")
    try:
        root = ET.fromstring(raw)
    except ET.ParseError:
        raise CallbackError(f"the {what} is not well-formed XML") from None
    return {child.tag: (child.text or "").strip() for child in root}


@dataclass(frozen=True)
class CallbackEvent:
    """One decrypted event. `fields` holds every XML field as it came."""

    event: str  # e.g. change_external_contact
    change_type: str  # e.g. add_external_contact
    staff_id: str  # UserID: the staff member
    contact_id: str  # ExternalUserID: the customer
    welcome_code: str  # WelcomeCode ("" when WeCom gave none)
    created_at: datetime
    fields: dict[str, str] = field(default_factory=dict)


class CallbackReceiver:
    """Checks and decrypts the callbacks of one app; remembers recent ones to refuse replays and drop duplicates."""

    def __init__(self, crypt: MessageCrypt, clock: Clock, *, max_age: float = 300.0) -> None:
        self.crypt = crypt
        self.clock = clock
        self.max_age = max_age
        self._seen: dict[tuple[str, str, str], float] = {}  # (signature, timestamp, nonce) -> when received
        self._events: dict[tuple[str, ...], float] = {}  # event identity -> when received

    def _check_fresh(self, msg_signature: str, timestamp: str, nonce: str) -> None:
        now = self.clock.now().timestamp()
        try:
            sent = float(timestamp)
        except ValueError:
            raise CallbackError("the callback's timestamp is not a number") from None
        if abs(now - sent) > self.max_age:
            raise CallbackError(
                f"the callback's timestamp is {abs(now - sent):.0f}s away from now (more than {self.max_age:.0f}s)"
            )
        self._prune(now)
        key = (msg_signature.strip().lower(), timestamp, nonce)
        if key in self._seen:
            raise CallbackError("the callback was replayed (this signature, timestamp and nonce came before)")
        self._seen[key] = now

    def _prune(self, now: float) -> None:
        horizon = now - 2 * self.max_age
        self._seen = {k: at for k, at in self._seen.items() if at >= horizon}
        self._events = {k: at for k, at in self._events.items() if at >= horizon}

    def verify_url(self, msg_signature: str, timestamp: str, nonce: str, echostr: str) -> str:
        """The GET URL check: the decrypted `echostr`, to be answered as it is."""
        self.crypt.verify(msg_signature, timestamp, nonce, echostr)
        self._check_fresh(msg_signature, timestamp, nonce)
        return self.crypt.decrypt(echostr)

    def receive(self, msg_signature: str, timestamp: str, nonce: str, body: bytes | str) -> CallbackEvent | None:
        """The event inside a POSTed callback; None when it is a duplicate of one already received."""
        outer = parse_xml(body)
        encrypted = outer.get("Encrypt", "")
        if not encrypted:
            raise CallbackError("the callback has no Encrypt element")
        self.crypt.verify(msg_signature, timestamp, nonce, encrypted)
        inner = parse_xml(self.crypt.decrypt(encrypted), "callback's message")
        self._check_fresh(msg_signature, timestamp, nonce)
        identity = tuple(
            inner.get(k, "")
            for k in ("Event", "ChangeType", "UserID", "ExternalUserID", "CreateTime", "WelcomeCode", "State", "Source")
        )
        now = self.clock.now().timestamp()
        if identity in self._events:
            log.info("WeCom callback: duplicate %s/%s ignored", inner.get("Event"), inner.get("ChangeType"))
            return None
        self._events[identity] = now
        try:
            created = datetime.fromtimestamp(int(inner.get("CreateTime") or 0), UTC)
        except (ValueError, OverflowError, OSError):
            created = self.clock.now()
        return CallbackEvent(
            event=inner.get("Event", ""),
            change_type=inner.get("ChangeType", ""),
            staff_id=inner.get("UserID", ""),
            contact_id=inner.get("ExternalUserID", ""),
            welcome_code=inner.get("WelcomeCode", ""),
            created_at=created,
            fields=inner,
        )

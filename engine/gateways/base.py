"""The gateway contract: everything the engine needs from a way of reaching WeCom.

Three gateways implement it (see `engine.gateways.registry`):

* `sandbox`  – an in-process simulated account: the demo, and the test double.
* `workpro`  – juzibot's WorkPro puppet over gRPC: QR + verify-code login, one text per contact.
* `wecom`    – the official server API: customer sync, tags, and 群发 tasks that staff confirm.

The contract serves both direct senders (`send_text`, one personalised text per contact) and task-based
ones (`submit_batch`, one text for many contacts, results reconciled later with `batch_results`);
`capabilities` says which a gateway offers.

Errors: every method raises only `engine.errors.GatewayError` subclasses (or `LoginError` for misuse of
the login flow); a send never returns False. The mapping from transport errors happens inside each
gateway, at one boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from engine.clock import Clock, SystemClock
from engine.errors import GatewayError

log = logging.getLogger("wecast.gateway")


class LoginState(StrEnum):
    LOGGED_OUT = "logged_out"  # no QR yet: call start_login (POST /goStart)
    WAITING_SCAN = "waiting_scan"  # a QR is showing; scan it with WeCom on the phone
    SCANNED = "scanned"  # scanned; confirm on the phone
    WAITING_VERIFY_CODE = "waiting_verify_code"  # the phone shows a 6-digit code; submit it
    LOGGED_IN = "logged_in"


@dataclass(frozen=True)
class LoginStatus:
    """Where the login flow stands. `qr_url` / `qrcode_key` are set while a QR is showing."""

    state: LoginState
    qr_url: str | None = None
    qrcode_key: str | None = None
    second_verification: bool = False  # the QR is WeCom's "new device" security check, not a login
    account_id: str | None = None
    account_name: str | None = None
    tries_left: int | None = None  # verify-code tries left before a new QR is needed
    message: str = ""

    @property
    def logged_in(self) -> bool:
        return self.state is LoginState.LOGGED_IN


class EventKind(StrEnum):
    QR = "qr"  # a new QR to scan (data: qr_url, qrcode_key, second_verification)
    SCANNED = "scanned"
    VERIFY_CODE = "verify_code"  # the phone shows a code; submit it (data: qrcode_key)
    VERIFY_CODE_WRONG = "verify_code_wrong"
    LOGIN = "login"  # data: account_id, account_name
    READY = "ready"  # contacts are loaded on the gateway side
    LOGOUT = "logout"  # message: the reason WeCom/puppet gave
    SECOND_VERIFICATION = "second_verification"
    CONTACT_CHANGED = "contact_changed"  # data: contact_id (DIRTY)
    ERROR = "error"
    CONNECTION = "connection"  # transport up/down/reconnecting (data: state)


@dataclass(frozen=True)
class GatewayEvent:
    kind: EventKind
    at: datetime
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ContactRecord:
    """A contact as a gateway reports it (the source document's contact payload)."""

    id: str
    name: str = ""
    alias: str = ""
    avatar: str = ""
    gender: int = 0  # 0 unknown, 1 male, 2 female
    city: str = ""
    province: str = ""
    address: str = ""
    corporation: str = ""
    title: str = ""
    phones: tuple[str, ...] = ()
    weixin: str = ""
    description: str = ""
    signature: str = ""
    friend: bool = False
    coworker: bool = False
    star: bool = False
    type: int = 0
    real_name: str = ""
    aka: str = ""
    additional_info: dict[str, Any] = field(default_factory=dict)
    corp_id: str = ""
    added_at: datetime | None = None
    tag_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class TagRecord:
    id: str
    name: str
    group_name: str = ""
    type: int = 0  # 1 personal, 2 corporate


@dataclass(frozen=True)
class ContactPage:
    contacts: list[ContactRecord]
    next_cursor: str | None  # None: this was the last page
    total: int | None = None


@dataclass(frozen=True)
class SendReceipt:
    message_id: str
    duplicate: bool = False  # the gateway had already accepted this idempotency key


@dataclass(frozen=True)
class BatchReceipt:
    task_id: str
    accepted: tuple[str, ...] = ()  # contact ids the task covers
    rejected: dict[str, str] = field(default_factory=dict)  # contact id -> reason


class BatchOutcome(StrEnum):
    PENDING = "pending"  # staff have not confirmed yet
    SENT = "sent"
    FAILED = "failed"


@dataclass(frozen=True)
class BatchResult:
    contact_id: str
    outcome: BatchOutcome
    message_id: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Capabilities:
    direct_send: bool = True  # send_text: one personalised text to one contact, delivered now
    batch_send: bool = False  # submit_batch: one text to many contacts, as a task
    idempotent_sends: bool = False  # send_text honours idempotency_key: a resend can never duplicate
    max_batch: int = 1
    paged_contacts: bool = True


Listener = Callable[[GatewayEvent], None]


class Gateway(ABC):
    """A way of reaching WeCom. All methods are async; `start` before use, `close` after."""

    name: ClassVar[str] = "gateway"
    capabilities: Capabilities = Capabilities()

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self._listeners: list[Listener] = []
        self._status_changed = asyncio.Event()
        self.events: list[GatewayEvent] = []  # recent events, newest last (bounded)

    # -- lifecycle -------------------------------------------------------------------------------
    @abstractmethod
    async def start(self) -> None:
        """Connect (and open the event stream). Does not log in by itself unless configured to."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect. In-flight calls are allowed to finish."""

    # -- login -----------------------------------------------------------------------------------
    @abstractmethod
    async def login_status(self) -> LoginStatus: ...

    @abstractmethod
    async def start_login(self) -> LoginStatus:
        """Begin a login (POST /goStart): returns the QR to scan, or the logged-in status."""

    @abstractmethod
    async def submit_verify_code(self, code: str, qrcode_key: str | None = None) -> LoginStatus:
        """Submit the 6-digit code the phone shows. Wrong code: LoginError with tries_left."""

    @abstractmethod
    async def logout(self) -> LoginStatus:
        """Log the account out (POST /goEnd). A new QR can follow with start_login."""

    async def wait_for_login(self, timeout: float) -> LoginStatus:
        """Wait until logged in, or `timeout` seconds (real time). Returns the last status."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status = await self.login_status()
            if status.logged_in:
                return status
            remaining = deadline - loop.time()
            if remaining <= 0:
                return status
            self._status_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_changed.wait(), timeout=min(remaining, 1.0))

    # -- contacts --------------------------------------------------------------------------------
    @abstractmethod
    async def list_contacts(self, cursor: str | None = None, page_size: int = 500) -> ContactPage:
        """One page of contacts; pass `next_cursor` back for the next one."""

    @abstractmethod
    async def list_tags(self) -> list[TagRecord]: ...

    async def get_contact(self, contact_id: str) -> ContactRecord | None:
        """One contact, fresh from the gateway (for DIRTY events). Default: scan the pages."""
        cursor: str | None = None
        while True:
            page = await self.list_contacts(cursor)
            for contact in page.contacts:
                if contact.id == contact_id:
                    return contact
            if page.next_cursor is None:
                return None
            cursor = page.next_cursor

    # -- sending ---------------------------------------------------------------------------------
    @abstractmethod
    async def send_text(self, contact_id: str, text: str, *, idempotency_key: str) -> SendReceipt:
        """Send one text to one contact now. Raises a GatewayError subclass on failure."""

    async def submit_batch(self, contact_ids: list[str], text: str, *, idempotency_key: str) -> BatchReceipt:
        """Submit one text for many contacts as a task (task-based gateways only)."""
        raise GatewayError(f"the {self.name} gateway cannot submit batch tasks")

    async def batch_results(self, task_id: str) -> list[BatchResult]:
        """Per-contact results of a submitted task, as far as they are known."""
        raise GatewayError(f"the {self.name} gateway has no batch tasks")

    # -- events ----------------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` for every event; returns a function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def emit(self, kind: EventKind, message: str = "", **data: Any) -> GatewayEvent:
        """Record an event, log it and tell the listeners. Secrets must never be put in `data`."""
        event = GatewayEvent(kind=kind, at=self.clock.now(), message=message, data=dict(data))
        self.events.append(event)
        del self.events[:-200]
        log.info("%s: %s%s", self.name, kind.value, f" – {message}" if message else "")
        self._status_changed.set()
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a listener's bug must not break the gateway
                log.exception("gateway event listener failed")
        return event

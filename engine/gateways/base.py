"""The gateway contract: everything the engine needs from a way of reaching WeCom.

Three gateways implement it (see `engine.gateways.registry`):

* `sandbox`  – an in-process simulated account: the demo, and the test double.
* `workpro`  – juzibot's WorkPro puppet over gRPC: QR + verify-code login, one message per contact.
* `wecom`    – the official server API: customer sync, tags, and 群发 tasks that staff confirm.

The contract serves both direct senders (`send_part` / `send`, one personalised message per contact, part by
part) and task-based ones (`submit_batch`, one message for many contacts as a 群发 task that staff confirm,
results reconciled later with `batch_results`); `capabilities` says which a gateway offers and which message
parts (`engine.messages.PartKind`) it can carry, so a campaign a gateway cannot send fails validation, not at
send time.

Besides sending, the contract covers what journeys need (issue 9): tag actions (`add_contact_tags`,
`remove_contact_tags`, `create_tag`), WeCom's welcome message (`send_welcome`, wecom only) and the event stream
(`subscribe`): login lifecycle events and customer events — `MESSAGE` (the customer wrote), `CONTACT_ADDED`,
`CONTACT_REMOVED`, `CONTACT_CHANGED` (refresh that contact and diff its tags). The data keys of each event kind
are listed at `EventKind`.

Errors: every method raises only `engine.errors.GatewayError` subclasses (or `LoginError` for misuse of
the login flow); a send never returns False. The mapping from transport errors happens inside each
gateway, at one boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from engine.clock import Clock, SystemClock
from engine.errors import PermanentError
from engine.messages import Message, Part, PartKind, TextPart, part_key
from engine.settings import Settings

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
    CONTACT_CHANGED = "contact_changed"  # data: contact_id (DIRTY): refresh it, diff its tags
    MESSAGE = "message"  # the customer wrote. data: contact_id, message_id, text ("" for non-text), type
    CONTACT_ADDED = "contact_added"  # data: contact_id, staff_id ("" when unknown), welcome_code (wecom, or "")
    CONTACT_REMOVED = "contact_removed"  # data: contact_id, staff_id; the customer deleted us or we them
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
    # Staff members (WeCom userids) who have this customer as a contact; a 群发 task is per staff member.
    # The puppet gateways log in as one account, so theirs is that account (or empty).
    follow_user_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class TagRecord:
    id: str
    name: str
    group_name: str = ""
    type: int = 0  # 1 personal, 2 corporate


@dataclass(frozen=True)
class UnreadStaff:
    """A staff member whose customers a sync could not read: those customers are kept as they were."""

    staff_id: str
    reason: str  # stable English code, e.g. "unlicensed" (no WeCom interoperability licence)


@dataclass(frozen=True)
class ContactPage:
    contacts: list[ContactRecord]
    next_cursor: str | None  # None: this was the last page
    total: int | None = None
    # Staff members whose customers this list leaves out because they could not be read (not because they are
    # gone): the sync keeps the customers they follow rather than mark them removed.
    unread_staff: tuple[UnreadStaff, ...] = ()


@dataclass(frozen=True)
class SendReceipt:
    message_id: str
    duplicate: bool = False  # the gateway had already accepted this idempotency key


@dataclass(frozen=True)
class PartReceipt:
    """The gateway's receipt for one part of a message."""

    index: int
    kind: PartKind
    message_id: str
    duplicate: bool = False


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
    reason_code: str = ""  # stable machine code for FAILED: not_friend, customer_limit, cancelled, unknown_contact, …


@dataclass(frozen=True)
class Capabilities:
    direct_send: bool = True  # send_text: one personalised text to one contact, delivered now
    batch_send: bool = False  # submit_batch: one text to many contacts, as a task
    idempotent_sends: bool = False  # send_text honours idempotency_key: a resend can never duplicate
    max_batch: int = 1
    paged_contacts: bool = True
    supports: frozenset[PartKind] = frozenset({PartKind.TEXT})  # the message parts it can send
    tags: bool = False  # add_contact_tags / remove_contact_tags / create_tag
    welcome: bool = False  # send_welcome with a WelcomeCode (the official API only)
    events: bool = False  # emits customer events (MESSAGE, CONTACT_ADDED, ...) as they happen
    # Logs in by QR + verify code (the puppets, the sandbox). False: by configured credentials (the official API):
    # start_login logs in at once or says why not, and there is never a code to submit.
    qr_login: bool = True
    # A mini-program card's cover may be a local file (uploaded by the gateway). False: only an https URL the far
    # side fetches itself (WorkPro: the puppet runs on juzi's servers) — validation refuses a local cover for it.
    local_covers: bool = True


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

    @classmethod
    def capabilities_for(cls, settings: Settings) -> Capabilities:
        """What a gateway of this class built from `settings` can do, known without building it: validation asks
        which message parts the configured gateway can send. Gateways whose capabilities depend on their settings
        override it."""
        return cls.capabilities

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

    async def _wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` holds, re-checking it whenever the state-changed event is set (by `emit`, or
        by a gateway's own state changes), for up to `timeout` seconds; returns whether it holds. No polling."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            # Cleared before the check, with no await in between: a change after the check sets it again.
            self._status_changed.clear()
            if predicate():
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_changed.wait(), timeout=remaining)

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

    async def send_part(self, contact_id: str, part: Part, *, idempotency_key: str) -> SendReceipt:
        """Send one part of a message to one contact now. Gateways that carry more than text override this;
        the default sends text parts through `send_text` and refuses the rest."""
        if isinstance(part, TextPart):
            return await self.send_text(contact_id, part.text, idempotency_key=idempotency_key)
        raise PermanentError(f"the {self.name} gateway cannot send {part.kind.value} messages")

    async def send(
        self, contact_id: str, message: Message, *, idempotency_key: str, skip: frozenset[int] = frozenset()
    ) -> list[PartReceipt]:
        """Send every part of `message` in order (except the indexes in `skip`, already sent), each under its own
        key (`engine.messages.part_key`). Stops at the first failing part and raises its error: a caller that must
        resume part by part after a failure (the dispatcher) calls `send_part` itself and records each receipt."""
        receipts: list[PartReceipt] = []
        count = len(message.parts)
        for index, part in enumerate(message.parts):
            if index in skip:
                continue
            key = part_key(idempotency_key, index, count)
            receipt = await self.send_part(contact_id, part, idempotency_key=key)
            receipts.append(PartReceipt(index, part.kind, receipt.message_id, receipt.duplicate))
        return receipts

    async def submit_batch(
        self, contact_ids: list[str], message: Message | str, *, idempotency_key: str, sender: str = ""
    ) -> BatchReceipt:
        """Submit one message for many contacts as a task that staff confirm (task-based gateways only).
        `sender`: the staff member (WeCom userid) whose customers these are ('' where a gateway has one account).
        A plain `str` is a text-only message (kept for callers written before rich messages)."""
        raise PermanentError(f"the {self.name} gateway cannot submit batch tasks")

    async def batch_results(self, task_id: str) -> list[BatchResult]:
        """Per-contact results of a submitted task, as far as they are known."""
        raise PermanentError(f"the {self.name} gateway has no batch tasks")

    async def remind_batch(self, task_id: str) -> None:
        """Remind the staff member to confirm a task (WeCom allows 3 reminders per task per 24 h)."""
        raise PermanentError(f"the {self.name} gateway has no batch tasks")

    async def cancel_batch(self, task_id: str) -> None:
        """Stop a task's unsent messages (messages already sent cannot be recalled)."""
        raise PermanentError(f"the {self.name} gateway has no batch tasks")

    async def send_welcome(self, welcome_code: str, message: Message) -> SendReceipt:
        """Send the welcome message of a new customer with the event's single-use WelcomeCode, within WeCom's
        20-second window (the official API only: `capabilities.welcome`)."""
        raise PermanentError(f"the {self.name} gateway cannot send welcome messages")

    # -- tags ------------------------------------------------------------------------------------
    async def add_contact_tags(self, contact_id: str, tag_ids: Sequence[str]) -> None:
        """Put tags (by id) on a contact, in WeCom. Idempotent: a tag already there is no error."""
        raise PermanentError(f"the {self.name} gateway cannot change tags")

    async def remove_contact_tags(self, contact_id: str, tag_ids: Sequence[str]) -> None:
        """Take tags (by id) off a contact, in WeCom. Idempotent: a tag not there is no error."""
        raise PermanentError(f"the {self.name} gateway cannot change tags")

    async def create_tag(self, name: str, group_name: str = "") -> TagRecord:
        """Create a tag (in `group_name`, created when missing) and return it; an existing tag of that name and
        group is returned as it is."""
        raise PermanentError(f"the {self.name} gateway cannot change tags")

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

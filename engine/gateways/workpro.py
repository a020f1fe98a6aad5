"""The `workpro` gateway: juzibot's WorkPro WeCom puppet, spoken to directly over gRPC (`wechaty.Puppet`).

How it talks (facts from `shared/reference/workpro_puppet.md`):

* **Where**: an explicit `workpro.endpoint` (`host:port`) wins; otherwise the token is resolved through each
  discovery authority in turn (`https://<authority>/v0/hosties/<token>` → `{"host"|"ip", "port"}`; `0.0.0.0`
  or port 0 means "not registered here").
* **How**: a plaintext HTTP/2 channel (WorkPro has no TLS), `:authority` = the token *and*
  `authorization: Wechaty <token>` metadata (servers check one or the other), 80 MiB message limits.
* **Order**: the `Event` stream is opened first and `Start` called after it, because events emitted while no
  stream is open are dropped by the server (the VERIFY_CODE event would be lost). `Ding` runs every
  `ding_interval`. A dropped stream is re-opened with exponential backoff and jitter, sending the last `seq`
  and account id; the server replays LOGIN/READY/SCAN on connect, so those are handled idempotently, and
  `seq` is never required to grow (juzi's open-source server always sends 0).
* **Errors**: every gRPC failure is mapped to the engine's error tree at one boundary (`_map_rpc_error`),
  matching substrings of the details' first line rather than the status code alone, because WorkPro reports
  most failures as INTERNAL/UNKNOWN with the meaning in the text. The token never appears in logs, errors or
  reprs: server texts are scrubbed (the server echoes it in "Invalid Wechaty TOKEN") and httpx's request log
  line, which contains the discovery URL, is redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import unicodedata
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qs, urlsplit

import grpc
import httpx

from engine.backoff import backoff_delay
from engine.clock import Clock
from engine.errors import (
    AuthError,
    GatewayError,
    LoginError,
    NotLoggedInError,
    PermanentError,
    RateLimitedError,
    TransientError,
    UnknownOutcomeError,
)
from engine.gateways.base import (
    Capabilities,
    ContactPage,
    ContactRecord,
    EventKind,
    Gateway,
    LoginState,
    LoginStatus,
    SendReceipt,
    TagRecord,
)
from engine.gateways.proto import puppet_pb2 as pb
from engine.gateways.proto import puppet_pb2_grpc as pb_grpc
from engine.settings import WorkproSettings

log = logging.getLogger("wecast.gateway.workpro")

T = TypeVar("T")

MAX_MESSAGE_BYTES = 80 * 1024 * 1024  # juzi's client uses 80 MiB both ways (contact lists can be large)
VERIFY_TRIES = 3  # WeCom allows about 3 wrong codes, then the QR must be scanned again
PAYLOAD_CONCURRENCY = 16  # per-id ContactPayload / TagPayload calls in flight at once
BATCH_CONCURRENCY = 4  # BatchContactPayload chunks in flight at once
FIRST_EVENT_WAIT = 5.0  # juzi's client waits this long for the stream's first message

# ScanStatus (juzi/wechaty-puppet src/schemas/event.ts)
SCAN_UNKNOWN, SCAN_CANCEL, SCAN_WAITING, SCAN_SCANNED, SCAN_CONFIRMED, SCAN_TIMEOUT, SCAN_IDLE = range(7)
SCAN_TYPE_VERIFY = 2  # ScanType.Verify (UNCERTAIN whether WorkPro fills `type`)
# VerifyCodeStatus
VERIFY_WAITING, VERIFY_EXPIRED, VERIFY_WRONG = 1, 2, 3
PAYLOAD_TYPE_CONTACT = 2

NEW_DEVICE_MARKERS = ("新设备", "安全验证", "secondaryequipment")
TOO_MANY_TRIES_MARKERS = ("次数超过阈值", "too many", "exceed", "请重新扫码")
WRONG_CODE_MARKERS = ("invalid verify code", "验证码错误", "wrong code", "wrong verify code")
NOT_LOGGED_IN_MARKERS = ("not logged in", "no this.__currentuserid", "未登录", "not login")
NOT_IMPLEMENTED_MARKERS = ("is not a function", "not implemented", "unimplemented")
NOT_FOUND_MARKERS = ("not found", "not exist", "不存在")
# UNAVAILABLE texts that mean the request never left (connect failed) vs. the connection died mid-call.
BEFORE_SEND_MARKERS = (
    "failed to connect",
    "connection refused",
    "connect failed",
    "dns resolution",
    "name resolution",
    "no connection established",
    "unreachable",
    "failed to pick subchannel",
)
AFTER_SEND_MARKERS = (
    "stream removed",
    "rst_stream",
    "connection reset",
    "socket closed",
    "goaway",
    "broken pipe",
    "stream closed",
    "end of tcp stream",
)

_INVISIBLE = re.compile(r"[\s\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")


def clean_verify_code(code: str) -> str:
    """The code as WorkPro wants it: a string with every space, newline and invisible character removed."""
    text = unicodedata.normalize("NFKC", str(code))  # full-width digits from a Chinese IME -> ASCII
    return "".join(ch for ch in _INVISIBLE.sub("", text) if unicodedata.category(ch)[0] not in ("C", "Z"))


def qr_key(url: str) -> str | None:
    """The `key` query parameter of a WeCom QR URL (it equals the VERIFY_CODE event's id)."""
    try:
        values = parse_qs(urlsplit(url).query).get("key")
    except ValueError:
        return None
    return values[0] if values else None


def first_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of a server message: never a JavaScript stack trace, never a novel."""
    for line in (text or "").splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return ""


def parse_payload(raw: str) -> dict[str, Any]:
    """An event payload (JSON text) as a dict; tolerant of empty or broken payloads."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        log.warning("workpro event payload is not JSON: %.200r", raw)
        return {}
    return value if isinstance(value, dict) else {"data": value}


def parse_additional_info(raw: str) -> dict[str, Any]:
    """ContactPayload.additional_info: a stringified JSON object; anything else becomes {}."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        log.debug("contact additional_info is not JSON: %.120r", raw)
        return {}
    return value if isinstance(value, dict) else {}


def epoch_to_datetime(value: Any) -> datetime | None:
    """addContactTime arrives as ms or s since the epoch, as a number or a string; anything odd is None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if number <= 0:
        return None
    if number > 1e11:  # no one added a contact in the year 5138: this is milliseconds
        number /= 1000.0
    try:
        return datetime.fromtimestamp(number, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def contact_record(p: pb.ContactPayloadResponse) -> ContactRecord:
    """Map juzi's ContactPayloadResponse (fields 1–22) to our contact model."""
    info = parse_additional_info(p.additional_info)
    corp_id = info.get("corpId", info.get("corp_id", ""))
    return ContactRecord(
        id=p.id,
        name=p.name,
        alias=p.alias,
        avatar=p.avatar,
        gender=int(p.gender),
        city=p.city,
        province=p.province,
        address=p.address,
        corporation=p.corporation,
        title=p.title,
        phones=tuple(phone for phone in p.phones if phone),
        weixin=p.weixin,
        description=p.description,
        signature=p.signature,
        friend=p.friend,
        coworker=p.coworker,
        star=p.star,
        type=int(p.type),
        real_name=p.real_name,
        aka=p.aka,
        additional_info=info,
        corp_id=str(corp_id) if corp_id else "",
        added_at=epoch_to_datetime(info.get("addContactTime", info.get("add_contact_time"))),
        tag_ids=tuple(dict.fromkeys(tag for tag in p.tag_ids if tag)),
    )


class _RedactSecrets(logging.Filter):
    """Hides registered secrets in log records (httpx logs each request URL, and ours contain the token)."""

    def __init__(self) -> None:
        super().__init__("wecast-redact")
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            redacted = message
            for secret in self.secrets:
                redacted = redacted.replace(secret, "***")
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


_REDACT = _RedactSecrets()


def _protect_secret(secret: str) -> None:
    _REDACT.secrets.add(secret)
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if _REDACT not in logger.filters:
            logger.addFilter(_REDACT)


class WorkproGateway(Gateway):
    """A WeCom account logged in through a WorkPro puppet: QR + 6-digit code login, one text per contact."""

    name: ClassVar[str] = "workpro"
    capabilities = Capabilities(direct_send=True, batch_send=False, idempotent_sends=False)
    first_event_wait: float = FIRST_EVENT_WAIT  # how long start() waits for the event stream to open

    def __init__(
        self,
        settings: WorkproSettings,
        clock: Clock | None = None,
        *,
        http_client: httpx.AsyncClient | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(clock)
        self.settings = settings
        self._rng = rng or random.Random()  # reconnect jitter
        self._token = settings.token.get_secret_value() if settings.token else ""
        if self._token:
            _protect_secret(self._token)
        self._http = http_client
        self._endpoint: str | None = None
        self._channel: Any = None
        self._stub: Any = None
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._event_task: asyncio.Task[None] | None = None
        self._ding_task: asyncio.Task[None] | None = None
        self._stream_up = asyncio.Event()
        self._stream_error: GatewayError | None = None  # why the stream last failed (None: it is fine)
        self._stream_taken = False  # ... because another client holds the token's one event stream
        self._fatal: GatewayError | None = None  # the server rejected us; reconnecting will not help
        self._connects = 0
        self._last_seq = 0
        self._resume_account = ""
        self.last_dong: datetime | None = None
        # login state
        self._state = LoginState.LOGGED_OUT
        self._qr_url: str | None = None
        self._qr_key: str | None = None
        self._verify_id: str | None = None
        self._second = False
        self._expect_second = False  # a "new device" LOGOUT announced a verification QR
        self._account_id: str | None = None
        self._account_name: str | None = None
        self._tries_left: int | None = None
        self._ready = False
        self._message = ""
        # contacts
        self._contact_ids: list[str] | None = None
        self._batch_supported: bool | None = None  # None: not tried yet
        self._payload_sem = asyncio.Semaphore(PAYLOAD_CONCURRENCY)
        self._batch_sem = asyncio.Semaphore(BATCH_CONCURRENCY)

    def __repr__(self) -> str:
        return f"WorkproGateway(endpoint={self._endpoint!r}, state={self._state.value!r})"

    # -- connection ------------------------------------------------------------------------------
    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Wechaty {self._token}"),)

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    async def start(self) -> None:
        """Resolve the endpoint, open the event stream, then call Start. Safe to call twice."""
        async with self._start_lock:
            if self._started:
                return
            if not self._token:
                raise PermanentError("no WorkPro token: set workpro.token in config.yaml or WECAST_WORKPRO_TOKEN")
            self._closing = False
            self._connects = 0
            self._fatal = self._stream_error = None
            self._endpoint = self.settings.endpoint or await self._discover()
            options = [
                ("grpc.default_authority", self._token),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ]
            self._channel = grpc.aio.insecure_channel(self._endpoint, options=options)
            self._stub = pb_grpc.PuppetStub(self._channel)
            self._stream_up.clear()
            self._event_task = asyncio.create_task(self._event_loop(), name="workpro-events")
            # Wait for the stream's first message (the server's HEARTBEAT) so Start's events are not lost.
            # ALREADY_EXISTS is retried for a while: a previous process's stream may not have closed yet.
            await self._wait_until(
                lambda: self._stream_up.is_set() or (self._stream_error is not None and not self._stream_taken),
                self.first_event_wait,
            )
            failure = self._fatal or (None if self._stream_up.is_set() else self._stream_error)
            if failure is not None:
                await self._teardown()
                raise failure
            try:
                await self._unary("Start", pb.StartRequest())
            except GatewayError:
                await self._teardown()
                raise
            self._ding_task = asyncio.create_task(self._ding_loop(), name="workpro-ding")
            self._started = True
            log.info("workpro: connected to %s", self._endpoint)

    async def close(self) -> None:
        """Stop the background tasks and close the channel (the account stays logged in on the puppet)."""
        async with self._start_lock:
            if self._started and self.settings.stop_on_close:
                with contextlib.suppress(GatewayError):
                    await self._unary("Stop", pb.StopRequest(), timeout=5.0)
            await self._teardown()

    async def _teardown(self) -> None:
        self._closing = True
        self._started = False
        tasks = [t for t in (self._event_task, self._ding_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._event_task = self._ding_task = None
        self._tasks.clear()
        if self._channel is not None:
            await self._channel.close(grace=1.0)
            # gRPC core completes the cancelled calls' last operations a moment later; let them land on this
            # event loop, not on a closed one (which breaks the next loop that uses grpc.aio in the process).
            await asyncio.sleep(0.02)
        self._channel = self._stub = None
        self._stream_up.clear()

    async def _ensure_started(self) -> None:
        if not self._started:
            await self.start()

    async def _discover(self) -> str:
        """Resolve the token to host:port through each discovery authority, in order."""
        client = self._http or httpx.AsyncClient(timeout=10.0)
        problems: list[str] = []
        unreachable = 0
        try:
            for authority in self.settings.discovery_authorities:
                base = authority.rstrip("/")
                if "://" not in base:
                    base = f"https://{base}"
                host = urlsplit(base).netloc or authority
                try:
                    response = await client.get(f"{base}/v0/hosties/{self._token}")
                except httpx.HTTPError as exc:
                    unreachable += 1
                    problems.append(f"{host}: {type(exc).__name__}")
                    log.warning("workpro discovery: %s unreachable (%s)", host, type(exc).__name__)
                    continue
                endpoint = self._discovery_answer(response)
                if endpoint:
                    log.info("workpro discovery: %s resolved the token to %s", host, endpoint)
                    return endpoint
                problems.append(f"{host}: not registered (HTTP {response.status_code})")
                log.info("workpro discovery: %s does not know the token (HTTP %s)", host, response.status_code)
        finally:
            if client is not self._http:
                await client.aclose()
        tried = "; ".join(problems) or "no discovery_authorities configured"
        if problems and unreachable == len(problems):
            raise TransientError(f"cannot reach any WorkPro discovery service ({tried})")
        raise PermanentError(
            f"the WorkPro token is not registered with any discovery service ({tried}); "
            "check workpro.token, or set workpro.endpoint to host:port"
        )

    @staticmethod
    def _discovery_answer(response: httpx.Response) -> str | None:
        if response.status_code >= 400:
            return None
        try:
            data = response.json()
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        # Juzi answers with both `host` and `ip`; the community service with `host`; old clients read `ip`.
        host = next((str(data[k]) for k in ("host", "ip") if data.get(k) and data[k] != "0.0.0.0"), "")
        try:
            port = int(data.get("port") or 0)
        except (TypeError, ValueError):
            port = 0
        if not host or port <= 0:
            return None
        return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"

    async def _event_loop(self) -> None:
        """Consume the Event stream for as long as the gateway lives, re-opening it when it drops."""
        attempt = 0
        while not self._closing:
            request = pb.EventRequest(seq=self._last_seq, account_id=self._resume_account)
            reason = "the puppet ended the event stream"
            try:
                call = self._stub.Event(request, metadata=self._metadata)
                async for response in call:
                    if not self._stream_up.is_set():
                        self._on_stream_up()
                        attempt = 0
                    try:
                        self._handle_event(response)
                    except Exception:  # one odd event must not cost us the stream
                        log.exception("workpro: could not handle event type %d", int(response.type))
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if self._closing:
                    return
                error = self._map_rpc_error(exc, "Event", mutating=False)
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self._fatal = error
                    self._stream_up.clear()
                    self.emit(EventKind.ERROR, str(error))
                    return
                self._stream_error = error
                self._stream_taken = exc.code() == grpc.StatusCode.ALREADY_EXISTS
                reason = str(error)
            except Exception as exc:  # never let the event task die: it is the gateway's lifeline
                log.exception("workpro: event stream failed")
                reason = f"{type(exc).__name__} in the event stream"
            was_up = self._stream_up.is_set()
            self._stream_up.clear()
            if self._closing:
                return
            base = self.settings.reconnect_delay.total_seconds()
            cap = self.settings.reconnect_max_delay.total_seconds()
            delay = backoff_delay(attempt, base=base, cap=cap, rng=self._rng)
            attempt += 1
            if was_up or attempt == 1:
                self.emit(
                    EventKind.CONNECTION,
                    f"event stream lost ({reason}); reconnecting",
                    state="reconnecting",
                    attempt=attempt,
                    delay=round(delay, 3),
                )
            else:
                log.info("workpro: reconnect attempt %d failed (%s); next in %.1fs", attempt, reason, delay)
            await self.clock.sleep(delay)

    def _on_stream_up(self) -> None:
        self._connects += 1
        self._stream_error = None
        self._stream_up.set()
        if self._connects > 1:
            self.emit(EventKind.CONNECTION, "event stream re-opened", state="up", reconnects=self._connects - 1)
            self._spawn(self._resync())
        else:
            self.emit(EventKind.CONNECTION, "event stream open", state="up")

    async def _resync(self) -> None:
        """After a reconnect: Start again (a no-op while running) and check who, if anyone, is logged in."""
        try:
            await self._unary("Start", pb.StartRequest())
            user = await self._unary("CurrentUser", pb.CurrentUserRequest())
        except NotLoggedInError:
            if self._state is LoginState.LOGGED_IN:
                self._set_logged_out("the session ended while the event stream was down")
                self.emit(EventKind.LOGOUT, "the session ended while the event stream was down")
            return
        except GatewayError as exc:  # CurrentUser is juzi-only; an old server may lack it
            log.info("workpro: could not check the current user after reconnecting: %s", exc)
            return
        if user.user_id and self._state is not LoginState.LOGGED_IN:
            self._on_login(user.user_id)

    async def _ding_loop(self) -> None:
        while not self._closing:
            await self.clock.sleep(self.settings.ding_interval.total_seconds())
            try:
                await self._unary("Ding", pb.DingRequest(data="healthCheck"))
            except GatewayError as exc:
                log.info("workpro: Ding failed: %s", exc)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- calls and errors ------------------------------------------------------------------------
    async def _unary(self, method: str, request: Any, *, mutating: bool = False, timeout: float | None = None) -> Any:
        """One unary RPC with the auth metadata and deadline; gRPC errors mapped to GatewayErrors."""
        if self._stub is None:
            raise TransientError("the WorkPro gateway is not connected")
        call: Callable[..., Awaitable[Any]] = getattr(self._stub, method)
        try:
            return await call(
                request,
                metadata=self._metadata,
                timeout=timeout or self.settings.call_timeout.total_seconds(),
            )
        except grpc.aio.AioRpcError as exc:
            raise self._map_rpc_error(exc, method, mutating=mutating) from None

    def _map_rpc_error(self, exc: grpc.aio.AioRpcError, method: str, *, mutating: bool) -> GatewayError:
        """The one place a gRPC failure becomes an engine error. `mutating`: the call may have had effects."""
        code = exc.code()
        text = self._scrub(first_line(exc.details() or "")).removeprefix("Error: ")
        lower = text.lower()
        name = code.name if code is not None else "UNKNOWN"
        log.debug("workpro: %s failed: %s %s", method, name, text)
        backoff = self.settings.throttle_backoff.total_seconds()
        if "workproerrorcode: 20001" in lower:
            return RateLimitedError(f"WorkPro is throttling sends ({text}); slow down", retry_after=backoff)
        if code == grpc.StatusCode.UNAUTHENTICATED or "invalid wechaty token" in lower:
            return AuthError(
                "the WorkPro puppet rejected the token (UNAUTHENTICATED): check workpro.token "
                "(or WECAST_WORKPRO_TOKEN) and that it is a puppet_workpro_… token for this server"
            )
        if any(marker in lower for marker in NOT_LOGGED_IN_MARKERS):
            return NotLoggedInError(f"the WorkPro account is not logged in ({text})")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            if mutating:
                return UnknownOutcomeError(
                    f"WorkPro {method} timed out after the request was sent; it may have been delivered"
                )
            return TransientError(f"WorkPro {method} timed out")
        if code == grpc.StatusCode.UNAVAILABLE:
            if (
                mutating
                and any(m in lower for m in AFTER_SEND_MARKERS)
                and not any(m in lower for m in BEFORE_SEND_MARKERS)
            ):
                return UnknownOutcomeError(
                    f"the connection to WorkPro broke during {method} ({text}); it may have been delivered"
                )
            return TransientError(f"WorkPro is unavailable ({text or name})")
        if code == grpc.StatusCode.ALREADY_EXISTS and method == "Event":
            return TransientError(
                "another client is already connected with this WorkPro token (one event stream is allowed); "
                "stop it, or wait for its connection to time out"
            )
        if code == grpc.StatusCode.CANCELLED:
            if mutating:
                return UnknownOutcomeError(f"WorkPro {method} was cancelled mid-call; it may have been delivered")
            return TransientError(f"WorkPro {method} was cancelled")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" not in lower:
            return RateLimitedError(f"WorkPro is out of resources ({text})", retry_after=backoff)
        return PermanentError(f"WorkPro {method} failed: {text or name}")

    # -- events ----------------------------------------------------------------------------------
    def _handle_event(self, response: pb.EventResponse) -> None:
        kind = int(response.type)
        if response.seq:
            self._last_seq = response.seq
        payload = parse_payload(response.payload)
        if kind == pb.EVENT_TYPE_HEARTBEAT:
            log.debug("workpro: heartbeat %s", payload.get("data", ""))
        elif kind == pb.EVENT_TYPE_DONG:
            self.last_dong = self.clock.now()
        elif kind == pb.EVENT_TYPE_SCAN:
            self._on_scan(payload)
        elif kind == pb.EVENT_TYPE_VERIFY_CODE:
            self._on_verify_code(payload)
        elif kind == pb.EVENT_TYPE_LOGIN:
            self._on_login(str(payload.get("contactId") or payload.get("contact_id") or ""))
        elif kind == pb.EVENT_TYPE_READY:
            if not self._ready:
                self._ready = True
                self.emit(EventKind.READY, str(payload.get("data", "")))
        elif kind == pb.EVENT_TYPE_LOGOUT:
            self._on_logout(payload)
        elif kind == pb.EVENT_TYPE_ERROR:
            text = payload.get("data") or payload.get("gerror") or response.payload
            self.emit(EventKind.ERROR, self._scrub(first_line(str(text))))
        elif kind == pb.EVENT_TYPE_DIRTY:
            payload_type = payload.get("payloadType", payload.get("payload_type"))
            contact_id = str(payload.get("payloadId") or payload.get("payload_id") or "")
            if str(payload_type) == str(PAYLOAD_TYPE_CONTACT) and contact_id:
                self.emit(EventKind.CONTACT_CHANGED, contact_id=contact_id)
        else:
            log.debug("workpro: event type %d ignored: %.200s", kind, response.payload)

    def _on_scan(self, payload: dict[str, Any]) -> None:
        try:
            status = int(payload.get("status", SCAN_UNKNOWN))
        except (TypeError, ValueError):
            status = SCAN_UNKNOWN
        url = str(payload.get("qrcode") or "")
        log.info("workpro: scan status=%s type=%s qr=%s", status, payload.get("type"), bool(url))
        if status == SCAN_WAITING or (status == SCAN_UNKNOWN and url):
            key = qr_key(url) or str(payload.get("qrcodeKey") or "") or None
            if key and key == self._qr_key and self._state in (LoginState.SCANNED, LoginState.WAITING_VERIFY_CODE):
                return  # the server replays its cached SCAN on every reconnect: not a new QR
            second = (
                "secondaryequipment" in url.lower() or payload.get("type") == SCAN_TYPE_VERIFY or self._expect_second
            )
            self._expect_second = False
            if self._state is LoginState.LOGGED_IN:
                log.warning("workpro: a QR arrived while logged in; the session has ended")
                self._set_logged_out("")
            if key != self._qr_key:
                self._tries_left = VERIFY_TRIES
            self._state = LoginState.WAITING_SCAN
            self._qr_url, self._qr_key, self._verify_id, self._second = url, key, None, second
            self._message = (
                "WeCom asks for a security check on a new device: scan this QR with WeCom on the phone within 2 minutes"
                if second
                else "scan the QR code with WeCom on the phone"
            )
            self.emit(
                EventKind.QR,
                self._message,
                qr_url=url,
                qrcode_key=key,
                second_verification=second,
                status=status,
            )
            if second:
                self.emit(EventKind.SECOND_VERIFICATION, self._message, qr_url=url, qrcode_key=key)
        elif status in (SCAN_SCANNED, SCAN_CONFIRMED):
            if self._state in (LoginState.WAITING_SCAN, LoginState.LOGGED_OUT):
                self._state = LoginState.SCANNED
                self._message = "scanned; confirm the login on the phone"
                self.emit(EventKind.SCANNED, self._message, status=status)
        elif status in (SCAN_CANCEL, SCAN_TIMEOUT, SCAN_IDLE) and self._state is not LoginState.LOGGED_IN:
            self._state = LoginState.LOGGED_OUT
            self._qr_url = self._qr_key = self._verify_id = None
            self._message = (
                "the QR code expired or was cancelled; start the login again"
                if status != SCAN_IDLE
                else "the puppet waits for a login to be started"
            )
            self._status_changed.set()

    def _on_verify_code(self, payload: dict[str, Any]) -> None:
        verify_id = str(payload.get("id") or "") or self._qr_key
        status = payload.get("status", VERIFY_WAITING)
        message = str(payload.get("message") or "enter the verification code shown by WeCom on the phone")
        log.info(
            "workpro: verify-code status=%s scene=%s matches_qr=%s",
            status,
            payload.get("scene"),
            verify_id == self._qr_key,
        )
        if status == VERIFY_EXPIRED:
            self._message = "the verification code expired; start the login again"
            self._state = LoginState.LOGGED_OUT
            self._qr_url = self._qr_key = self._verify_id = None
            self.emit(EventKind.ERROR, self._message)
        elif status == VERIFY_WRONG:
            self.emit(EventKind.VERIFY_CODE_WRONG, "wrong verification code", qrcode_key=verify_id)
        elif self._state is not LoginState.LOGGED_IN:
            self._state = LoginState.WAITING_VERIFY_CODE
            self._verify_id = verify_id
            if self._tries_left is None:
                self._tries_left = VERIFY_TRIES
            self._message = message
            self.emit(EventKind.VERIFY_CODE, message, qrcode_key=verify_id)

    def _on_login(self, contact_id: str) -> None:
        if self._state is LoginState.LOGGED_IN and contact_id in ("", self._account_id):
            return  # replayed on reconnect
        self._state = LoginState.LOGGED_IN
        self._account_id = contact_id or self._account_id
        self._resume_account = self._account_id or ""
        self._qr_url = self._qr_key = self._verify_id = None
        self._second = False
        self._tries_left = None
        self._message = "logged in"
        self._contact_ids = None
        self.emit(EventKind.LOGIN, "logged in", account_id=self._account_id, account_name=self._account_name)
        if self._account_id:
            self._spawn(self._fetch_account_name(self._account_id))

    async def _fetch_account_name(self, contact_id: str) -> None:
        try:
            payload = await self._unary("ContactPayload", pb.ContactPayloadRequest(id=contact_id))
        except GatewayError as exc:
            log.debug("workpro: could not read the account's own name: %s", exc)
            return
        if self._account_id == contact_id:
            self._account_name = payload.name or None

    def _on_logout(self, payload: dict[str, Any]) -> None:
        reason = str(payload.get("data") or "")
        new_device = any(marker in reason.lower() for marker in NEW_DEVICE_MARKERS)
        account = self._account_id
        self._set_logged_out(reason)
        if new_device:
            self._expect_second = True
            self._message = (
                "WeCom asks for a security check on a new device: scan the next QR with WeCom on "
                "the phone within 2 minutes"
            )
        self.emit(EventKind.LOGOUT, reason or "logged out", account_id=account, second_verification=new_device)
        if new_device:
            self.emit(EventKind.SECOND_VERIFICATION, self._message)

    def _set_logged_out(self, reason: str) -> None:
        self._state = LoginState.LOGGED_OUT
        self._ready = False
        self._account_id = self._account_name = None
        self._qr_url = self._qr_key = self._verify_id = None
        self._second = False
        self._tries_left = None
        self._message = reason
        self._contact_ids = None
        self._status_changed.set()

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Poll a condition on our own state (set by the event task) for up to `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() >= deadline or self._fatal is not None:
                return predicate()
            await asyncio.sleep(0.02)
        return True

    # -- login -----------------------------------------------------------------------------------
    async def login_status(self) -> LoginStatus:
        return LoginStatus(
            state=self._state,
            qr_url=self._qr_url,
            qrcode_key=self._verify_id or self._qr_key,
            second_verification=self._second,
            account_id=self._account_id,
            account_name=self._account_name,
            tries_left=self._tries_left if self._state is not LoginState.LOGGED_IN else None,
            message=self._message,
        )

    def _qr_showing(self) -> bool:
        return self._state is LoginState.LOGGED_IN or (
            self._qr_key is not None and self._state is not LoginState.LOGGED_OUT
        )

    async def start_login(self) -> LoginStatus:
        """Start the puppet if needed and return the QR to scan (or the logged-in status)."""
        await self._ensure_started()
        if self._qr_showing():
            return await self.login_status()
        wait = self.settings.qr_wait.total_seconds()
        # Start usually makes the server push a SCAN by itself; only ask for a new QR if none comes.
        if not await self._wait_until(self._qr_showing, min(0.5, wait)):
            try:
                await self._unary("RefreshQRCode", pb.RefreshQRCodeRequest())
            except GatewayError as exc:
                log.info("workpro: RefreshQRCode failed (%s); waiting for the puppet's own QR", exc)
            await self._wait_until(self._qr_showing, wait)
        if self._fatal is not None:
            raise self._fatal
        status = await self.login_status()
        if not self._qr_showing():
            return LoginStatus(state=status.state, message="no QR code from WorkPro yet; try again in a moment")
        return status

    async def submit_verify_code(self, code: str, qrcode_key: str | None = None) -> LoginStatus:
        """EnterVerifyCode(id=<QR key>, code=<digits as a string>); wrong codes raise LoginError."""
        await self._ensure_started()
        if self._state is LoginState.LOGGED_IN:
            return await self.login_status()
        key = qrcode_key or self._verify_id or self._qr_key
        if not key:
            raise LoginError("no QR code is waiting for a verification code: start the login and scan the QR first")
        clean = clean_verify_code(code)
        if not clean:
            raise LoginError("the verification code is empty", tries_left=self._tries_left)
        try:
            await self._stub.EnterVerifyCode(
                pb.EnterVerifyCodeRequest(id=key, code=clean),
                metadata=self._metadata,
                timeout=self.settings.call_timeout.total_seconds(),
            )
        except grpc.aio.AioRpcError as exc:
            text = self._scrub(first_line(exc.details() or ""))
            lower = text.lower()
            if any(marker in lower for marker in TOO_MANY_TRIES_MARKERS):
                self._tries_left = 0
                self.emit(EventKind.VERIFY_CODE_WRONG, text, qrcode_key=key, tries_left=0)
                raise LoginError(
                    "too many wrong verification codes: scan the new QR code with WeCom on the phone "
                    "and enter the new code",
                    tries_left=0,
                ) from None
            if any(marker in lower for marker in WRONG_CODE_MARKERS):
                self._tries_left = max(0, (self._tries_left or VERIFY_TRIES) - 1)
                self.emit(EventKind.VERIFY_CODE_WRONG, text, qrcode_key=key, tries_left=self._tries_left)
                raise LoginError(
                    f"wrong verification code: check the code shown in WeCom on the phone and try "
                    f"again ({self._tries_left} tries left)",
                    tries_left=self._tries_left,
                ) from None
            error = self._map_rpc_error(exc, "EnterVerifyCode", mutating=False)
            if type(error) is PermanentError and exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                # e.g. an expired QR or a key that is not the latest one: a login problem, not a send failure
                raise LoginError(
                    f"WorkPro did not accept the code: {text}; start the login again if the QR has expired",
                    tries_left=self._tries_left,
                ) from None
            raise error from None
        self._message = "code accepted; waiting for WeCom to log in"
        await self._wait_until(
            lambda: self._state is LoginState.LOGGED_IN, min(10.0, self.settings.call_timeout.total_seconds())
        )
        return await self.login_status()

    async def logout(self) -> LoginStatus:
        """Logout, then wait briefly for the LOGOUT event; a new QR follows with start_login."""
        await self._ensure_started()
        await self._unary("Logout", pb.LogoutRequest())
        await self._wait_until(lambda: self._state is not LoginState.LOGGED_IN, 3.0)
        if self._state is LoginState.LOGGED_IN:  # no LOGOUT event came: trust the RPC's success
            self._set_logged_out("logged out")
            self.emit(EventKind.LOGOUT, "logged out")
        return await self.login_status()

    # -- contacts --------------------------------------------------------------------------------
    def _require_login(self, action: str) -> None:
        if self._state is not LoginState.LOGGED_IN:
            raise NotLoggedInError(f"cannot {action}: the WorkPro account is not logged in ({self._state.value})")

    async def list_contacts(self, cursor: str | None = None, page_size: int = 500) -> ContactPage:
        """ContactList once per sync (cursor None), then payloads for one page of ids, in batches."""
        await self._ensure_started()
        self._require_login("list contacts")
        if page_size < 1:
            raise PermanentError("page_size must be at least 1")
        if cursor is None or self._contact_ids is None:
            response = await self._unary("ContactList", pb.ContactListRequest())
            self._contact_ids = list(dict.fromkeys(i for i in response.ids if i))
        ids = self._contact_ids
        try:
            offset = int(cursor) if cursor else 0
            if offset < 0:
                raise ValueError(cursor)
        except ValueError:
            raise PermanentError(f"bad contacts cursor {cursor!r}") from None
        page_ids = ids[offset : offset + page_size]
        payloads = await self._payloads(page_ids)
        contacts = [contact_record(payloads[i]) for i in page_ids if i in payloads]
        end = offset + len(page_ids)
        return ContactPage(contacts=contacts, next_cursor=str(end) if end < len(ids) else None, total=len(ids))

    async def get_contact(self, contact_id: str) -> ContactRecord | None:
        """One contact, fresh from the puppet (after a DIRTY event)."""
        await self._ensure_started()
        self._require_login("read a contact")
        payloads = await self._payloads([contact_id])
        payload = payloads.get(contact_id)
        return contact_record(payload) if payload is not None else None

    async def _payloads(self, ids: list[str]) -> dict[str, pb.ContactPayloadResponse]:
        found: dict[str, pb.ContactPayloadResponse] = {}
        if not ids:
            return found
        leftover = ids
        if self._batch_supported is not False:
            size = self.settings.contact_batch_size
            chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
            results = await asyncio.gather(*(self._batch_chunk(chunk) for chunk in chunks))
            leftover = []
            for chunk, result in zip(chunks, results, strict=True):
                if result is None:
                    leftover.extend(chunk)
                else:
                    found.update(result)
        if leftover:
            singles = await asyncio.gather(*(self._single_payload(i) for i in leftover))
            found.update({p.id or i: p for i, p in zip(leftover, singles, strict=True) if p is not None})
        return found

    async def _batch_chunk(self, chunk: list[str]) -> dict[str, pb.ContactPayloadResponse] | None:
        """One BatchContactPayload call; None means "fall back to one call per id for this chunk"."""
        wanted = set(chunk)
        async with self._batch_sem:
            try:
                response = await self._stub.BatchContactPayload(
                    pb.BatchContactPayloadRequest(ids=chunk),
                    metadata=self._metadata,
                    timeout=self.settings.call_timeout.total_seconds(),
                )
            except grpc.aio.AioRpcError as exc:
                text = first_line(exc.details() or "").lower()
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED or any(m in text for m in NOT_IMPLEMENTED_MARKERS):
                    if self._batch_supported is not False:
                        log.info("workpro: BatchContactPayload is not available; reading contacts one by one")
                    self._batch_supported = False
                    return None
                error = self._map_rpc_error(exc, "BatchContactPayload", mutating=False)
                if isinstance(error, PermanentError) and not isinstance(error, AuthError):
                    # One unknown id can fail the whole batch on some accounts: read this chunk id by id.
                    log.warning(
                        "workpro: BatchContactPayload failed (%s); reading %d contacts one by one",
                        error,
                        len(chunk),
                    )
                    return None
                raise error from None
        self._batch_supported = True
        # Match by id, never by position: order is not guaranteed and unknown ids are simply missing.
        return {p.id: p for p in response.contact_payloads if p.id in wanted}

    async def _single_payload(self, contact_id: str) -> pb.ContactPayloadResponse | None:
        async with self._payload_sem:
            try:
                response: pb.ContactPayloadResponse = await self._unary(
                    "ContactPayload", pb.ContactPayloadRequest(id=contact_id)
                )
            except PermanentError as exc:
                log.debug("workpro: contact %s skipped: %s", contact_id, exc)
                return None
        return response if response.id or response.name else None

    async def list_tags(self) -> list[TagRecord]:
        """TagTagList, then TagPayload per tag and TagGroupPayload per group, concurrently."""
        await self._ensure_started()
        self._require_login("list tags")
        try:
            tag_ids = list(dict.fromkeys((await self._unary("TagTagList", pb.TagTagListRequest())).tag_ids))
        except PermanentError as exc:
            log.warning("workpro: tags are not available from this puppet: %s", exc)
            return []
        tags = [t for t in await self._gather_limited(tag_ids, self._tag_payload) if t is not None]
        group_ids = list(dict.fromkeys(t.group_id for t in tags if t.group_id))
        groups = await self._gather_limited(group_ids, self._group_payload)
        group_names = {gid: g.name for gid, g in zip(group_ids, groups, strict=True) if g is not None}
        return [
            TagRecord(id=t.id, name=t.name, group_name=group_names.get(t.group_id, ""), type=int(t.type))
            for t in tags
            if t.id
        ]

    async def _gather_limited(self, keys: Iterable[str], fetch: Callable[[str], Awaitable[T]]) -> list[T]:
        async def one(key: str) -> T:
            async with self._payload_sem:
                return await fetch(key)

        return list(await asyncio.gather(*(one(k) for k in keys)))

    async def _tag_payload(self, tag_id: str) -> pb.TagPayload | None:
        try:
            response = await self._unary("TagPayload", pb.TagPayloadRequest(tag_id=tag_id))
        except PermanentError as exc:
            log.warning("workpro: tag %s skipped: %s", tag_id, exc)
            return None
        payload: pb.TagPayload = response.payload
        return payload

    async def _group_payload(self, group_id: str) -> pb.TagGroupPayload | None:
        try:
            response = await self._unary("TagGroupPayload", pb.TagGroupPayloadRequest(group_id=group_id))
        except PermanentError as exc:
            log.warning("workpro: tag group %s skipped: %s", group_id, exc)
            return None
        payload: pb.TagGroupPayload = response.payload
        return payload

    # -- sending ---------------------------------------------------------------------------------
    async def send_text(self, contact_id: str, text: str, *, idempotency_key: str) -> SendReceipt:
        """MessageSendText to one contact. WorkPro has no idempotency keys: a timeout is an unknown outcome"""
        if not contact_id:
            raise PermanentError("no contact id to send to")
        if not text:
            raise PermanentError("the message text is empty")
        await self._ensure_started()
        self._require_login("send")
        request = pb.MessageSendTextRequest(conversation_id=contact_id, text=text)
        response: pb.MessageSendTextResponse = await self._unary("MessageSendText", request, mutating=True)
        message_id = response.id
        if not message_id and response.HasField("id_string_value_deprecated"):
            message_id = response.id_string_value_deprecated.value
        if not message_id:
            log.warning("workpro: MessageSendText to %s succeeded without a message id", contact_id)
        return SendReceipt(message_id=message_id)

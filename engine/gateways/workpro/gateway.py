"""The `WorkproGateway`: the connection, the calls, and the event stream, on top of the pure parts of the package
(`payloads` parses, `login` decides, `rpc_errors` maps failures).

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
* **Waiting**: whatever waits for the server (start, a QR, the login after a code) waits on the base class's
  state-changed event, set by every event handled and every change of the stream's state; nothing polls.
* **Secrets**: the token never appears in logs, errors or reprs: server texts are scrubbed (the server echoes it
  in "Invalid Wechaty TOKEN") and httpx's request log line, which contains the discovery URL, is redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, ClassVar, TypeVar
from urllib.parse import quote, urlsplit

import grpc
import httpx

import engine.gateways.workpro.parts as parts
import engine.gateways.workpro.payloads as payloads
import engine.gateways.workpro.tls as tls
from engine.backoff import backoff_delay
from engine.clock import Clock
from engine.errors import (
    AuthError,
    GatewayError,
    LoginError,
    NotLoggedInError,
    PermanentError,
    TransientError,
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
from engine.gateways.media_cache import InFlight, MediaCache, MediaContent
from engine.gateways.proto import puppet_pb2 as pb
from engine.gateways.proto import puppet_pb2_grpc as pb_grpc
from engine.gateways.workpro.login import LOGGED_OUT, Emit, LoginMachine
from engine.gateways.workpro.payloads import clean_verify_code, contact_record
from engine.gateways.workpro.rpc_errors import Failure, classify, map_rpc_error, server_text, status_lost
from engine.i18n import N_, Lazy, ntr, tr
from engine.messages import (
    FILE_MAX_BYTES,
    IMAGE_MAX_BYTES,
    FilePart,
    ImagePart,
    LinkPart,
    Media,
    Part,
    PartKind,
    TextPart,
)
from engine.settings import WorkproSettings

log = logging.getLogger("wecast.gateway.workpro")

T = TypeVar("T")

MAX_MESSAGE_BYTES = 80 * 1024 * 1024  # juzi's client uses 80 MiB both ways (contact lists can be large)
PAYLOAD_CONCURRENCY = 16  # per-id ContactPayload / TagPayload calls in flight at once
BATCH_CONCURRENCY = 4  # BatchContactPayload chunks in flight at once
FIRST_EVENT_WAIT = 5.0  # juzi's client waits this long for the stream's first message
ACCOUNT_NAME_WAIT = 5.0  # how long a login answer waits for the account's own name
SENT_IDS_KEPT = 10_000  # ids of our own recent sends, whose MESSAGE echo needs no lookup
DINGS_PER_IDLE_LIMIT = 3  # the event stream is given up as dead after this many Ding intervals without an event
# Upload: chunks of 256 KiB (juzi's Node client streams 64 KiB file chunks, its Go client 4 MB), a few of them
# buffered per upload; an upload's deadline grows with the file (1 MB/s at least, on top of the call timeout).
UPLOAD_CHUNK_BYTES = 256 * 1024
UPLOAD_CHUNKS_IN_FLIGHT = 4
UPLOAD_MIN_BYTES_PER_SECOND = 1_000_000
EVENT_CACHE_MAX_AGE = 120.0  # seconds: a resume seq older than this is not sent (juzi's client: timeoutSeconds=2 min)
# The status while the server cannot be connected to (a catalog key).
UNREACHABLE = N_("WorkPro cannot be reached: sends wait until it answers again")


def _cannot_connect(exc: grpc.aio.AioRpcError) -> bool:
    """gRPC could not connect to the server at all (it is down, or not listening): the request never left."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in (exc.details() or "").lower()


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
    """A WeCom account logged in through a WorkPro puppet: QR + 6-digit code login, one message per contact."""

    name: ClassVar[str] = "workpro"
    capabilities = Capabilities(
        direct_send=True,
        batch_send=False,
        idempotent_sends=False,
        supports=frozenset(PartKind),
        tags=True,
        events=True,
        local_covers=False,  # MiniProgramPayload carries the cover as thumb_url only (parts.mini_program)
    )
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
        # A token pasted with a newline or spaces around it (an env file, a copy from a chat) is the same token;
        # sent as it is, it is invalid gRPC metadata or an unknown :authority.
        self._token = settings.token.get_secret_value().strip() if settings.token else ""
        if self._token:
            _protect_secret(self._token)
            _protect_secret(quote(self._token, safe=""))  # as it stands in the discovery URL
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
        self._stream_up = False
        self._stream_error: GatewayError | None = None  # why the stream last failed (None: it is fine)
        self._stream_taken = False  # ... because another client holds the token's one event stream
        # The server cannot be connected to at all (it went away): sends wait, as for a login, instead of using up
        # their attempts and failing for good; cleared when the event stream is up again.
        self._unreachable = False
        self._fatal: GatewayError | None = None  # the server rejected us; reconnecting will not help
        self._connects = 0
        self._last_seq = 0
        self._last_event_at = 0.0  # loop time of the last event that carried a seq
        self._resume_account = ""
        # No event at all for this long (the server answers each Ding with a DONG) means the stream is dead.
        self.stream_idle_timeout = DINGS_PER_IDLE_LIMIT * settings.ding_interval.total_seconds()
        self.last_dong: datetime | None = None
        self._login = LoginMachine()
        self._name_task: asyncio.Task[None] | None = None  # looking up the account's own name after LOGIN
        # MESSAGE and FRIENDSHIP events name a payload to look up; one worker does it, in the order they came.
        self._lookups: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        self._sent_ids: set[str] = set()
        self._sent_order: deque[str] = deque()
        # contacts
        self._contact_ids: list[str] | None = None
        self._batch_supported: bool | None = None  # None: not tried yet
        self._payload_sem = asyncio.Semaphore(PAYLOAD_CONCURRENCY)
        self._batch_sem = asyncio.Semaphore(BATCH_CONCURRENCY)
        # Images and files read once per content (a poster to 10,000 customers is read once): their bytes, which
        # each send uploads, and — on a server without Upload — their FileBox JSON with the content inline.
        self.contents: MediaCache[MediaContent] = MediaCache(lambda media, content: content, lambda c: len(c.data))
        self.files: MediaCache[str] = MediaCache(
            lambda media, content: parts.filebox_inline(media.name, content.data), len
        )
        self.in_flight = InFlight()  # ... and sent a bounded number of bytes at a time, not once per send at once
        # Local content goes by Upload first (juzi's client's way); None: not tried on this connection yet.
        self._upload_supported: bool | None = None
        self._upload_probe = asyncio.Lock()  # ... and tried by one upload at a time until known
        self.uploads = 0  # files uploaded so far (one per send of local content)

    def __repr__(self) -> str:
        return f"WorkproGateway(endpoint={self._endpoint!r}, state={self._login.state.value!r})"

    # -- connection ------------------------------------------------------------------------------
    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Wechaty {self._token}"),)

    def _timeout(self) -> float:
        return self.settings.call_timeout.total_seconds()

    async def start(self) -> None:
        """Resolve the endpoint, open the event stream, then call Start. Safe to call twice."""
        async with self._start_lock:
            if self._started:
                return
            if not self._token:
                raise PermanentError(tr("no WorkPro token: set workpro.token in config.yaml or WECAST_WORKPRO_TOKEN"))
            if any(ch.isspace() or not ch.isprintable() for ch in self._token):
                raise PermanentError(
                    tr(
                        "the WorkPro token has spaces or control characters inside it: copy the puppet_workpro_… "
                        "token again into workpro.token or WECAST_WORKPRO_TOKEN"
                    )
                )
            self._closing = False
            self._connects = 0
            self._fatal = self._stream_error = None
            self._stream_taken = False
            self._unreachable = False
            self._upload_supported = None  # a new connection may reach another server
            self._endpoint = self.settings.endpoint or await self._discover()
            options = [
                ("grpc.default_authority", self._token),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ]
            self._channel = self._open_channel(self._endpoint, options)
            self._stub = pb_grpc.PuppetStub(self._channel)
            self._stream_up = False
            self._event_task = asyncio.create_task(self._event_loop(), name="workpro-events")
            # Wait for the stream's first message (the server's HEARTBEAT) so Start's events are not lost.
            # ALREADY_EXISTS is retried for a while: a previous process's stream may not have closed yet.
            await self._wait_for(
                lambda: (
                    self._stream_up
                    or self._fatal is not None
                    or (self._stream_error is not None and not self._stream_taken)
                ),
                self.first_event_wait,
            )
            # Another client holding the token's one event stream (`wecast serve` while a CLI command runs, or the
            # other way round) does not stop this one: calls need no stream. The stream is retried meanwhile.
            shared = not self._stream_up and self._stream_taken
            failure = self._fatal or (None if self._stream_up or shared else self._stream_error)
            if failure is not None:
                await self._teardown()
                raise failure
            try:
                await self._unary("Start", pb.StartRequest())
                if shared:
                    log.warning(
                        "workpro: another client holds this token's event stream; this process sends and reads "
                        "contacts without it (no QR, no customer events) until it is free"
                    )
                    await self._check_current_user()
            except GatewayError:
                await self._teardown()
                raise
            self._ding_task = asyncio.create_task(self._ding_loop(), name="workpro-ding")
            self._spawn(self._lookup_loop())
            self._started = True
            log.info("workpro: connected to %s", self._endpoint)

    def _open_channel(self, endpoint: str, options: list[tuple[str, Any]]) -> Any:
        """Plaintext (WorkPro), or TLS checked against the CA for the server name (juzi's open-source server)."""
        if not self.settings.tls:
            return grpc.aio.insecure_channel(endpoint, options=options)
        name = tls.server_name(self._token, self.settings.tls_server_name)
        credentials = tls.channel_credentials(self.settings.tls_ca_cert)
        return grpc.aio.secure_channel(
            endpoint, credentials, options=[*options, ("grpc.ssl_target_name_override", name)]
        )

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
        self._event_task = self._ding_task = self._name_task = None
        self._tasks.clear()
        if self._channel is not None:
            await self._channel.close(grace=1.0)
            # gRPC core completes the cancelled calls' last operations a moment later; let them land on this
            # event loop, not on a closed one (which breaks the next loop that uses grpc.aio in the process).
            await asyncio.sleep(0.02)
        self._channel = self._stub = None
        self._stream_up = False

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
                    response = await client.get(f"{base}/v0/hosties/{quote(self._token, safe='')}")
                except httpx.HTTPError as exc:
                    unreachable += 1
                    problems.append(f"{host}: {type(exc).__name__}")
                    log.warning("workpro discovery: %s unreachable (%s)", host, type(exc).__name__)
                    continue
                if response.status_code >= 500 or response.status_code == 429:
                    # wechaty-token's discover() retries these: the service is down or busy, which says nothing
                    # about the token (only a 4xx, or 0.0.0.0 / port 0, means "not registered here").
                    unreachable += 1
                    problems.append(f"{host}: HTTP {response.status_code}")
                    log.warning("workpro discovery: %s answered HTTP %s", host, response.status_code)
                    continue
                endpoint = self._discovery_answer(response)
                if endpoint:
                    log.info("workpro discovery: %s resolved the token to %s", host, endpoint)
                    return endpoint
                problems.append(tr("{host}: not registered (HTTP {status})", host=host, status=response.status_code))
                log.info("workpro discovery: %s does not know the token (HTTP %s)", host, response.status_code)
        finally:
            if client is not self._http:
                await client.aclose()
        tried = "; ".join(problems) or tr("no discovery_authorities configured")
        if problems and unreachable == len(problems):
            raise TransientError(
                tr(
                    "cannot reach any WorkPro discovery service ({tried}); set workpro.endpoint to the puppet's "
                    "host:port to connect without discovery, or check workpro.discovery_authorities",
                    tried=tried,
                )
            )
        raise PermanentError(
            tr(
                "the WorkPro token is not registered with any discovery service ({tried}); check workpro.token "
                "and workpro.discovery_authorities (juzi names each token's discovery host), or set "
                "workpro.endpoint to host:port",
                tried=tried,
            )
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
            request = pb.EventRequest(seq=self._resume_seq(), account_id=self._resume_account)
            reason = "the puppet ended the event stream"
            call: Any = None
            try:
                call = self._stub.Event(request, metadata=self._metadata)
                while True:
                    try:
                        async with asyncio.timeout(self.stream_idle_timeout or None):  # 0: no watchdog
                            response = await call.read()
                    except TimeoutError:
                        # A connection that died without a reset (a NAT or proxy dropping it) leaves the stream
                        # open and silent for ever. Ding is answered by a DONG on this stream, so this long with
                        # no event at all means the stream is dead: juzi's client resets it the same way
                        # (wechaty-puppet src/agents/watchdog-agent.ts: no `heartbeat` for 60 s -> reset(); the
                        # client turns every event into a heartbeat, wechaty-puppet-service puppet-service.ts).
                        reason = f"no event for {self.stream_idle_timeout:g} s, not even the DONG answering Ding"
                        log.warning("workpro: %s; re-opening the event stream", reason)
                        break
                    if response is grpc.aio.EOF:
                        break
                    if not self._stream_up:
                        self._on_stream_up()
                        attempt = 0
                    try:
                        self._handle_event(response)
                    except Exception:  # one odd event must not cost us the stream
                        log.exception("workpro: could not handle event type %d", int(response.type))
                    self._changed()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if self._closing:
                    return
                error = self._rpc_error(exc, "Event", mutating=False)
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self._fatal = error
                    self._stream_up = False
                    self.emit(EventKind.ERROR, str(error))
                    return
                self._stream_error = error
                self._stream_taken = exc.code() == grpc.StatusCode.ALREADY_EXISTS
                if _cannot_connect(exc):
                    self._set_unreachable(True)
                reason = str(error)
            except Exception as exc:  # never let the event task die: it is the gateway's lifeline
                log.exception("workpro: event stream failed")
                reason = f"{type(exc).__name__} in the event stream"
            finally:
                if call is not None and not call.done():
                    call.cancel()  # a stream we gave up on: tell the server, so it frees the token's one stream
            was_up = self._stream_up
            self._stream_up = False
            self._changed()
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

    def _resume_seq(self) -> int:
        """The seq to resume the stream from: the last one seen, unless it is older than the server's event cache
        is worth (juzi's client then asks for none: "will not request event cache", puppet-service.ts
        getMiscellaneousStoreData)."""
        if self._last_seq and asyncio.get_running_loop().time() - self._last_event_at > EVENT_CACHE_MAX_AGE:
            return 0
        return self._last_seq

    def _forget_resume_point(self) -> None:
        """A logout, or another account logging in: the saved seq and account belong to a session that is over
        (juzi's client resets its event cache then: puppet-service.ts resetMiscellaneousStoreData)."""
        self._last_seq = 0
        self._resume_account = ""

    def _set_unreachable(self, unreachable: bool) -> None:
        if unreachable and not self._unreachable:
            log.warning("workpro: %s cannot be reached; sends wait until it answers again", self._endpoint)
        self._unreachable = unreachable
        self._changed()

    def _on_stream_up(self) -> None:
        self._connects += 1
        self._stream_error = None
        self._stream_taken = False
        self._set_unreachable(False)
        self._stream_up = True
        if self._connects > 1:
            self.emit(EventKind.CONNECTION, "event stream re-opened", state="up", reconnects=self._connects - 1)
            self._spawn(self._resync())
        else:
            self.emit(EventKind.CONNECTION, "event stream open", state="up")

    async def _resync(self) -> None:
        """After a reconnect: Start again (a no-op while running) and check who, if anyone, is logged in."""
        try:
            await self._unary("Start", pb.StartRequest())
        except GatewayError as exc:
            log.info("workpro: Start after reconnecting failed: %s", exc)
            return
        await self._check_current_user()

    async def _check_current_user(self) -> None:
        """Ask the server who is logged in (CurrentUser), for when its events may have been missed: after a
        reconnect, or while another client holds the event stream."""
        try:
            user = await self._unary("CurrentUser", pb.CurrentUserRequest())
        except NotLoggedInError:
            self._apply(self._login.session_lost(Lazy(N_("the session ended while the event stream was down"))))
            return
        except GatewayError as exc:  # CurrentUser is juzi-only; an old server may lack it
            log.info("workpro: could not check the current user: %s", exc)
            return
        if user.user_id and not self._login.logged_in:
            self._on_login(user.user_id)

    async def _ding_loop(self) -> None:
        while not self._closing:
            await self.clock.sleep(self.settings.ding_interval.total_seconds())
            try:
                await self._unary("Ding", pb.DingRequest(data="healthCheck"))
            except GatewayError as exc:
                log.info("workpro: Ding failed: %s", exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        # The coroutine itself, not a wrapper awaiting it: a task cancelled before it ran (a short CLI command
        # closing at once) then closes the coroutine instead of leaving it "never awaited".
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- calls and errors ------------------------------------------------------------------------
    async def _unary(
        self, method: str, request: Any, *, mutating: bool = False, timeout: float | None = None, what: str = ""
    ) -> Any:
        """One unary RPC with the auth metadata and deadline; gRPC errors mapped to GatewayErrors. `what`
        describes the request in a refusal ("the image poster.jpg")."""
        if self._stub is None:
            raise TransientError("the WorkPro gateway is not connected")
        call: Callable[..., Awaitable[Any]] = getattr(self._stub, method)
        try:
            return await call(request, metadata=self._metadata, timeout=timeout or self._timeout())
        except grpc.aio.AioRpcError as exc:
            error = self._rpc_error(exc, method, mutating=mutating, what=what)
            if mutating and type(error) is TransientError and _cannot_connect(exc) and not self._stream_up:
                # Not even connected, so nothing left; the server is away (its event stream is down too). The
                # dispatcher holds the run's sends until the gateway can send again, attempts unused.
                self._set_unreachable(True)
                raise NotLoggedInError(f"{tr(UNREACHABLE)} ({error})") from None
            raise error from None

    def _rpc_error(self, exc: grpc.aio.AioRpcError, method: str, *, mutating: bool, what: str = "") -> GatewayError:
        error = map_rpc_error(
            exc.code(),
            exc.details(),
            method=method,
            mutating=mutating,
            throttle_backoff=self.settings.throttle_backoff.total_seconds(),
            secrets=(self._token,),
            what=what,
        )
        if exc.code() == grpc.StatusCode.UNAVAILABLE and type(error) is TransientError:
            name = self.settings.tls_server_name or tls.token_sni(self._token)
            hint = tls.connect_hint(exc.details(), tls=self.settings.tls, name=name)
            if hint:
                error = TransientError(f"{error}; {hint}")
        log.debug("workpro: %s failed: %s", method, error)
        return error

    # -- events ----------------------------------------------------------------------------------
    def _changed(self) -> None:
        """Wake whatever waits on our state (`_wait_for`)."""
        self._status_changed.set()

    def _apply(self, emits: Iterable[Emit]) -> None:
        """Emit what the login machine decided, and drop what a change of account makes stale."""
        for item in emits:
            if item.kind in (EventKind.LOGIN, EventKind.LOGOUT):
                self._contact_ids = None
            if item.kind is EventKind.LOGOUT:
                self._forget_resume_point()
            self.emit(item.kind, item.message, **item.data)
        self._changed()

    def _handle_event(self, response: pb.EventResponse) -> None:
        kind = int(response.type)
        if response.seq:
            self._last_seq = response.seq
            self._last_event_at = asyncio.get_running_loop().time()
        payload = payloads.parse_payload(response.payload)
        if kind == pb.EVENT_TYPE_HEARTBEAT:
            log.debug("workpro: heartbeat %s", payload.get("data", ""))
        elif kind == pb.EVENT_TYPE_DONG:
            self.last_dong = self.clock.now()
        elif kind == pb.EVENT_TYPE_SCAN:
            scan = payloads.parse_scan(payload)
            log.info("workpro: scan status=%s type=%s qr=%s", scan.status, scan.type, bool(scan.url))
            self._apply(self._login.on_scan(scan))
        elif kind == pb.EVENT_TYPE_VERIFY_CODE:
            verify = payloads.parse_verify_code(payload)
            log.info(
                "workpro: verify-code status=%s scene=%s matches_qr=%s",
                verify.status,
                verify.scene,
                verify.id == self._login.qr_key,
            )
            self._apply(self._login.on_verify_code(verify))
        elif kind == pb.EVENT_TYPE_VERIFY_SLIDE:
            slide = payloads.parse_verify_slide(payload)
            log.warning("workpro: verify-slide status=%s scene=%s", slide.status, slide.scene)
            self._apply(self._login.on_verify_slide(slide))
        elif kind == pb.EVENT_TYPE_LOGIN:
            self._on_login(payloads.parse_login(payload))
        elif kind == pb.EVENT_TYPE_READY:
            if self._login.on_ready():
                self.emit(EventKind.READY, str(payload.get("data", "")))
        elif kind == pb.EVENT_TYPE_LOGOUT:
            self._apply(self._login.on_logout(payloads.parse_logout_reason(payload)))
        elif kind == pb.EVENT_TYPE_ERROR:
            self.emit(EventKind.ERROR, server_text(payloads.parse_error_text(payload, response.payload), [self._token]))
        elif kind == pb.EVENT_TYPE_DIRTY:
            contact_id = payloads.parse_dirty(payload).contact_id
            if contact_id:
                self.emit(EventKind.CONTACT_CHANGED, contact_id=contact_id)
        elif kind == pb.EVENT_TYPE_MESSAGE:
            message_id = payloads.parse_message_id(payload)
            if message_id and message_id not in self._sent_ids:
                self._lookups.put_nowait((kind, message_id))
        elif kind == pb.EVENT_TYPE_FRIENDSHIP:
            friendship_id = payloads.parse_friendship_id(payload)
            if friendship_id:
                self._lookups.put_nowait((kind, friendship_id))
        else:
            log.debug("workpro: event type %d ignored: %.200s", kind, response.payload)

    async def _lookup_loop(self) -> None:
        """Turn MESSAGE and FRIENDSHIP events into customer events, one payload lookup at a time (in order)."""
        while True:
            kind, item_id = await self._lookups.get()
            try:
                if kind == pb.EVENT_TYPE_MESSAGE:
                    await self._on_message(item_id)
                else:
                    await self._on_friendship(item_id)
            except GatewayError as exc:
                log.warning("workpro: could not read the payload of event %d (%s): %s", kind, item_id, exc)
            except Exception:  # one odd payload must not end the lookups
                log.exception("workpro: could not handle event %d (%s)", kind, item_id)

    async def _on_message(self, message_id: str) -> None:
        if message_id in self._sent_ids:  # our own send, whose answer came after its echo was queued
            return
        response = await self._unary("MessagePayload", pb.MessagePayloadRequest(id=message_id))
        message = payloads.incoming_message(response, self._login.account_id or "")
        if message is not None:
            self.emit(EventKind.MESSAGE, message.text[:200], **message.data())

    async def _on_friendship(self, friendship_id: str) -> None:
        response = await self._unary("FriendshipPayload", pb.FriendshipPayloadRequest(id=friendship_id))
        staff = self._login.account_id or ""
        if not response.contact_id:
            log.info("workpro: friendship %s names no contact (type %d)", friendship_id, int(response.type))
        elif response.type == pb.FRIENDSHIP_TYPE_CONFIRM:
            self.emit(EventKind.CONTACT_ADDED, contact_id=response.contact_id, staff_id=staff, welcome_code="")
        elif response.type in (pb.FRIENDSHIP_TYPE_DELETE, pb.FRIENDSHIP_TYPE_REMOVED):
            by = "account" if response.type == pb.FRIENDSHIP_TYPE_DELETE else "customer"
            self.emit(EventKind.CONTACT_REMOVED, contact_id=response.contact_id, staff_id=staff, by=by)
        else:  # a request (RECEIVE) or a verification: not a contact yet
            log.info("workpro: friendship %s of type %d ignored", friendship_id, int(response.type))

    def _remember_sent(self, message_id: str) -> None:
        if not message_id or message_id in self._sent_ids:
            return
        self._sent_ids.add(message_id)
        self._sent_order.append(message_id)
        if len(self._sent_order) > SENT_IDS_KEPT:
            self._sent_ids.discard(self._sent_order.popleft())

    def _on_login(self, account_id: str) -> None:
        emits = self._login.on_login(account_id)
        if not emits:
            return  # replayed on reconnect
        if self._resume_account and self._login.account_id != self._resume_account:
            self._last_seq = 0  # another account's events: the old seq means nothing to it
        self._resume_account = self._login.account_id or ""
        self._apply(emits)
        if self._login.account_id:
            self._name_task = self._spawn(self._fetch_account_name(self._login.account_id))

    async def _fetch_account_name(self, contact_id: str) -> None:
        try:
            payload = await self._unary("ContactPayload", pb.ContactPayloadRequest(id=contact_id))
        except GatewayError as exc:
            log.debug("workpro: could not read the account's own name: %s", exc)
            return
        self._login.on_account_name(contact_id, payload.name)
        self._changed()

    async def _account_name_settled(self, timeout: float) -> None:
        """Give the LOGIN's account-name lookup up to `timeout` seconds to finish, so an answer that says
        "logged in" can say as whom."""
        task = self._name_task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=timeout)

    # -- login -----------------------------------------------------------------------------------
    async def login_status(self) -> LoginStatus:
        return self._status()

    def _status(self) -> LoginStatus:
        """The login's status; not logged in while the server cannot be reached (nothing can be sent)."""
        status = self._login.status()
        if self._unreachable and status.logged_in:
            return replace(status, state=LoginState.LOGGED_OUT, message=tr(UNREACHABLE))
        return status

    async def wait_for_login(self, timeout: float) -> LoginStatus:
        """Wait until logged in, and the server reachable (and the account's name is known), or `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._wait_for(lambda: self._login.logged_in and not self._unreachable, timeout)
        if self._login.logged_in:
            await self._account_name_settled(max(0.0, min(ACCOUNT_NAME_WAIT, deadline - loop.time())))
        return self._status()

    async def start_login(self) -> LoginStatus:
        """Start the puppet if needed and return the QR to scan (or the logged-in status)."""
        await self._ensure_started()
        if self._login.logged_in:
            await self._account_name_settled(ACCOUNT_NAME_WAIT)  # "already logged in as <name>", not as an id
            return self._login.status()
        if self._login.qr_showing():
            return self._login.status()
        if not self._stream_up and self._stream_taken:
            raise TransientError(
                tr(
                    "another client is connected with this WorkPro token and gets its QR code (one event stream "
                    "per token, e.g. a running `wecast serve`): log in there, or stop it and try again"
                )
            )
        wait = self.settings.qr_wait.total_seconds()
        # Start usually makes the server push a SCAN by itself; only ask for a new QR if none comes.
        await self._refresh_qr_unless_one_comes(min(0.5, wait))
        await self._wait_for(self._login.qr_showing, wait)
        if self._fatal is not None:
            raise self._fatal
        status = self._login.status()
        if not self._login.qr_showing():
            return LoginStatus(state=status.state, message=tr("no QR code from WorkPro yet; try again in a moment"))
        return status

    async def _refresh_qr_unless_one_comes(self, grace: float) -> None:
        """Give the server `grace` seconds to push a QR by itself; then ask for one (RefreshQRCode)."""
        if await self._wait_for(self._login.qr_showing, grace):
            return
        try:
            await self._unary("RefreshQRCode", pb.RefreshQRCodeRequest())
        except GatewayError as exc:
            log.info("workpro: RefreshQRCode failed (%s); waiting for the puppet's own QR", exc)

    async def submit_verify_code(self, code: str, qrcode_key: str | None = None) -> LoginStatus:
        """EnterVerifyCode(id=<QR key>, code=<digits as a string>); wrong codes raise LoginError. Answers once
        logged in (with the account's name) or after a short wait."""
        await self._ensure_started()
        machine = self._login
        if machine.logged_in:
            return machine.status()
        key = machine.code_key(qrcode_key)
        if not key:
            raise LoginError(tr("no QR code is waiting for a verification code: start the login and scan the QR first"))
        clean = clean_verify_code(code)
        if not clean:
            raise LoginError(tr("the verification code is empty"), tries_left=machine.tries_left)
        try:
            await self._stub.EnterVerifyCode(
                pb.EnterVerifyCodeRequest(id=key, code=clean), metadata=self._metadata, timeout=self._timeout()
            )
        except grpc.aio.AioRpcError as exc:
            raise self._verify_code_error(exc, key) from None
        machine.code_accepted()
        self._changed()
        return await self.wait_for_login(min(10.0, self._timeout()))

    def _verify_code_error(self, exc: grpc.aio.AioRpcError, key: str) -> LoginError | GatewayError:
        """What a failed EnterVerifyCode means for the user: a LoginError (with the tries left) for anything
        about the code or the QR, the mapped GatewayError for the rest (auth, network, ...)."""
        failure = classify(exc.code(), exc.details(), "EnterVerifyCode")
        text = server_text(exc.details(), [self._token])
        if failure is Failure.TOO_MANY_TRIES:
            self._apply(self._login.code_tries_exhausted(key, text))
            # That QR is dead. The server is said to show a new one (events may come ~10 s late): ask if it doesn't.
            self._spawn(self._refresh_qr_unless_one_comes(self.settings.qr_wait.total_seconds()))
            return LoginError(
                tr(
                    "too many wrong verification codes: scan the new QR code with WeCom on the phone "
                    "and enter the new code"
                ),
                tries_left=0,
            )
        if failure is Failure.WRONG_CODE:
            self._apply(self._login.code_wrong(key, text))
            tries = self._login.tries_left
            wrong = (
                tr("wrong verification code: check the code shown in WeCom on the phone and try again")
                if tries is None
                else ntr(
                    "wrong verification code: check the code shown in WeCom on the phone and try again ({n} try left)",
                    "wrong verification code: check the code shown in WeCom on the phone and try again "
                    "({n} tries left)",
                    tries,
                )
            )
            return LoginError(wrong, tries_left=tries)
        if failure is Failure.REFUSED:
            # e.g. an expired QR or a key that is not the latest one: a login problem, not a send failure
            return LoginError(
                tr("WorkPro did not accept the code: {text}; start the login again if the QR has expired", text=text),
                tries_left=self._login.tries_left,
            )
        return self._rpc_error(exc, "EnterVerifyCode", mutating=False)

    async def logout(self) -> LoginStatus:
        """Logout, then wait briefly for the LOGOUT event; a new QR follows with start_login."""
        await self._ensure_started()
        await self._unary("Logout", pb.LogoutRequest())
        await self._wait_for(lambda: not self._login.logged_in, 3.0)
        self._apply(self._login.session_lost(Lazy(LOGGED_OUT)))  # no LOGOUT event came: trust the RPC's success
        return self._login.status()

    # -- contacts --------------------------------------------------------------------------------
    def _require_login(self, action: str) -> None:
        """`action`: a catalog key (N_), said in the language of whoever reads the error."""
        if not self._login.logged_in:
            raise NotLoggedInError(
                Lazy(
                    N_("cannot {action}: the WorkPro account is not logged in ({state})"),
                    action=Lazy(action),
                    state=self._login.state.value,
                )
            )

    def _record(self, payload: pb.ContactPayloadResponse) -> ContactRecord:
        return contact_record(payload, self._login.account_id or "")

    async def list_contacts(self, cursor: str | None = None, page_size: int = 500) -> ContactPage:
        """ContactList once per sync (cursor None), then payloads for one page of ids, in batches; the logged-in
        account itself is left out."""
        await self._ensure_started()
        self._require_login(N_("list contacts"))
        if page_size < 1:
            raise PermanentError("page_size must be at least 1")
        if cursor is None or self._contact_ids is None:
            await self._contacts_loaded()
            response = await self._unary("ContactList", pb.ContactListRequest())
            # The account itself is no customer (a puppet's contact list may hold it): never synced, never sent to.
            account = self._login.account_id
            self._contact_ids = list(dict.fromkeys(i for i in response.ids if i and i != account))
        ids = self._contact_ids
        try:
            offset = int(cursor) if cursor else 0
            if offset < 0:
                raise ValueError(cursor)
        except ValueError:
            raise PermanentError(f"bad contacts cursor {cursor!r}") from None
        page_ids = ids[offset : offset + page_size]
        found = await self._payloads(page_ids)
        contacts = [self._record(found[i]) for i in page_ids if i in found]
        end = offset + len(page_ids)
        return ContactPage(contacts=contacts, next_cursor=str(end) if end < len(ids) else None, total=len(ids))

    async def _contacts_loaded(self) -> None:
        """Right after a login the puppet is still loading the account's contacts until READY ("data ready"): a
        list taken then is partial, and a sync would mark everyone missing from it removed. Wait for READY (up to
        `ready_wait`) when this process saw the login happen; an account logged in before is taken as loaded."""
        machine = self._login
        if not machine.watched_login or machine.ready:
            return
        wait = self.settings.ready_wait.total_seconds()
        log.info("workpro: waiting up to %g s for READY (the account's contacts are loading) to list them", wait)
        if not await self._wait_for(lambda: machine.ready or not machine.logged_in, wait):
            log.warning("workpro: no READY within %g s of the login; listing the contacts the puppet has", wait)
        self._require_login(N_("list contacts"))

    async def get_contact(self, contact_id: str) -> ContactRecord | None:
        """One contact, fresh from the puppet (after a DIRTY event)."""
        await self._ensure_started()
        self._require_login(N_("read a contact"))
        found = await self._payloads([contact_id])
        payload = found.get(contact_id)
        return self._record(payload) if payload is not None else None

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
                    pb.BatchContactPayloadRequest(ids=chunk), metadata=self._metadata, timeout=self._timeout()
                )
            except grpc.aio.AioRpcError as exc:
                if classify(exc.code(), exc.details(), "BatchContactPayload") is Failure.UNSUPPORTED:
                    if self._batch_supported is not False:
                        log.info("workpro: BatchContactPayload is not available; reading contacts one by one")
                    self._batch_supported = False
                    return None
                error = self._rpc_error(exc, "BatchContactPayload", mutating=False)
                if isinstance(error, PermanentError) and not isinstance(error, AuthError):
                    # One unknown id can fail the whole batch on some accounts: read this chunk id by id.
                    log.warning(
                        "workpro: BatchContactPayload failed (%s); reading %d contacts one by one", error, len(chunk)
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
        self._require_login(N_("list tags"))
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
        """MessageSendText to one contact. WorkPro has no idempotency keys: a timeout is an unknown outcome."""
        if not contact_id:
            raise PermanentError("no contact id to send to")
        if not text:
            raise PermanentError("the message text is empty")
        await self._ensure_started()
        self._require_login(N_("send"))
        request = pb.MessageSendTextRequest(conversation_id=contact_id, text=text)
        response = await self._unary("MessageSendText", request, mutating=True)
        return SendReceipt(message_id=self._message_id(response, "MessageSendText", contact_id))

    async def send_part(self, contact_id: str, part: Part, *, idempotency_key: str) -> SendReceipt:
        """One part to one contact: text by MessageSendText, images and files by MessageSendFile (a FileBox, the
        content inline or by URL), link cards by MessageSendUrl, mini-program cards by MessageSendMiniProgram.
        A part the server refuses raises PermanentError naming the part and the server's reason."""
        if isinstance(part, TextPart):
            return await self.send_text(contact_id, part.text, idempotency_key=idempotency_key)
        if not contact_id:
            raise PermanentError("no contact id to send to")
        await self._ensure_started()
        self._require_login(N_("send"))
        if isinstance(part, ImagePart | FilePart):
            return await self._send_file(contact_id, part)
        request: Any
        if isinstance(part, LinkPart):
            method = "MessageSendUrl"
            request = pb.MessageSendUrlRequest(conversation_id=contact_id, url_link=parts.url_link(part))
        else:
            method = "MessageSendMiniProgram"
            request = pb.MessageSendMiniProgramRequest(
                conversation_id=contact_id, mini_program=parts.mini_program(part)
            )
        response = await self._unary(method, request, mutating=True, what=parts.describe(part))
        return SendReceipt(message_id=self._message_id(response, method, contact_id))

    async def _send_file(self, contact_id: str, part: ImagePart | FilePart) -> SendReceipt:
        """MessageSendFile with a FileBox: by URL when the media is one; local content uploaded first (`_upload`,
        as juzi's own client does) and named by a Uuid box; inline (base64) only on a server without Upload."""
        image = isinstance(part, ImagePart)
        media = replace(part.media, name=parts.filebox_name(part.media, image=image))
        limit = IMAGE_MAX_BYTES if image else FILE_MAX_BYTES
        if media.url is not None:
            return await self._send_box(contact_id, part, parts.filebox_url(media.name, media.url, media.size))
        if self._upload_supported is not False:
            upload = await self._upload(media, limit, part)
            if upload is not None:
                uuid, size = upload
                return await self._send_box(contact_id, part, parts.filebox_uuid(media.name, uuid, size))
        return await self._send_inline(contact_id, part, media, limit)

    async def _send_box(self, contact_id: str, part: ImagePart | FilePart, box: str) -> SendReceipt:
        request = pb.MessageSendFileRequest(conversation_id=contact_id, file_box=box)
        response = await self._unary("MessageSendFile", request, mutating=True, what=parts.describe(part))
        return SendReceipt(message_id=self._message_id(response, "MessageSendFile", contact_id))

    async def _room_in_flight(self, n: int, part: ImagePart | FilePart) -> None:
        """Wait for `n` bytes to fit in `in_flight`, at most half the call timeout; then a TransientError: the
        send never left, so it is retried later rather than caught by the dispatcher's send timeout as an
        outcome nobody knows."""
        wait = self._timeout() / 2
        try:
            await self.in_flight.acquire(n, timeout=wait)
        except TimeoutError:
            raise TransientError(
                f"not sent: waited {wait:g} s for other sends of large files to finish ({parts.describe(part)})"
            ) from None

    async def _upload(self, media: Media, limit: int, part: ImagePart | FilePart) -> tuple[str, int] | None:
        """Stream a local file to the server with the client-streaming Upload RPC, as juzi's client does; the
        upload's id and size, or None when the server has no Upload (remembered for this connection: every later
        file goes inline). Every request carries bytes: juzi's client opens an upload with an empty request, but
        juzi's open-source server decodes the stream with wechaty-grpc's chunkDecoder, which fails on one
        (`NOCHUNK`, unhandled there: it ends the server process), while a server that joins chunks needs none.

        Memory: the file is read and checked once per content (`contents`: its bytes, once, as the contract
        wants — every later recipient gets the content that was checked, even if the file is gone), and each
        upload streams chunks of it (slices, one at a time) counted in `in_flight`. Uploads are per send, never
        reused: juzi's file-box registry documents an uploaded uuid as loadable once, and its client uploads
        again for every send. A failed upload delivered nothing, so it is a TransientError (retried by the
        dispatcher); a file refused by the checks is a PermanentError, sent to no one."""
        content = await self.contents.get(media, limit)
        if self._upload_supported is None:
            # Until the server has answered one Upload, uploads go one at a time: a server without it answers
            # while the chunks are still going out, and only the first upload should meet that.
            async with self._upload_probe:
                upload_id = None if self._upload_supported is False else await self._upload_within(content, part)
        else:
            upload_id = await self._upload_within(content, part)
        if upload_id is None:
            return None
        self.uploads += 1
        log.debug("workpro: uploaded %s (%d bytes) as %s", media.name, len(content.data), upload_id)
        return upload_id, len(content.data)

    async def _upload_within(self, content: MediaContent, part: ImagePart | FilePart) -> str | None:
        """`_upload_call`, its chunks counted in `in_flight` meanwhile."""
        window = UPLOAD_CHUNKS_IN_FLIGHT * UPLOAD_CHUNK_BYTES
        await self._room_in_flight(window, part)
        try:
            return await self._upload_call(content.data, part.media.name)
        finally:
            self.in_flight.release(window)

    async def _upload_call(self, data: bytes, name: str) -> str | None:
        """The Upload call itself: its id, or None (and Upload remembered as missing) on UNIMPLEMENTED."""
        if self._stub is None:
            raise TransientError("the WorkPro gateway is not connected")
        call: Any = None

        async def requests() -> AsyncIterator[pb.UploadRequest]:
            for offset in range(0, len(data), UPLOAD_CHUNK_BYTES):
                if call is not None and call.done():  # a write after the server's answer would hide that answer
                    return
                yield pb.UploadRequest(chunk=data[offset : offset + UPLOAD_CHUNK_BYTES])

        timeout = self._timeout() + len(data) / UPLOAD_MIN_BYTES_PER_SECOND
        try:
            call = self._stub.Upload(requests(), metadata=self._metadata, timeout=timeout)
            response = await call
        except grpc.aio.AioRpcError as exc:
            unsupported = classify(exc.code(), exc.details(), "Upload") is Failure.UNSUPPORTED
            if not unsupported and self._upload_supported is None and status_lost(exc.code(), exc.details()):
                unsupported = await self._server_lacks_upload()
            if unsupported:
                if self._upload_supported is not False:
                    log.warning("workpro: the server has no Upload; local images and files go inline (base64)")
                self._upload_supported = False
                return None
            raise self._rpc_error(exc, "Upload", mutating=False, what=name) from None
        self._upload_supported = True
        upload_id: str = response.id
        if not upload_id:
            raise TransientError(f"not sent: WorkPro's Upload of {name} returned no id")
        return upload_id

    async def _server_lacks_upload(self) -> bool:
        """Whether the server answers UNIMPLEMENTED to an Upload of nothing (no request at all: no chunk whose
        write could race the answer, and no empty one). Asked when the first upload's answer was lost to such a
        race."""
        try:
            await self._stub.Upload(iter(()), metadata=self._metadata, timeout=self._timeout())
        except grpc.aio.AioRpcError as exc:
            return classify(exc.code(), exc.details(), "Upload") is Failure.UNSUPPORTED
        return False

    async def _send_inline(self, contact_id: str, part: ImagePart | FilePart, media: Media, limit: int) -> SendReceipt:
        """The content inline, as a base64 FileBox (servers without Upload). The box is encoded once per content
        (`files`), but each request is a copy of it (the protobuf message, its serialized bytes, gRPC's buffer):
        such requests are built only once their bytes fit in `in_flight`, so a 5 MB poster to 10,000 customers
        costs a few copies of it at any moment, whatever the dispatcher's concurrency."""
        box = await self.files.get(media, limit)
        inline = len(box)
        await self._room_in_flight(inline, part)
        try:
            return await self._send_box(contact_id, part, box)
        finally:
            del box
            self.in_flight.release(inline)

    def _message_id(self, response: Any, method: str, contact_id: str) -> str:
        """The sent message's id: field 2, else the old wrapped field 1 (servers fill either or both). Remembered,
        so the server's MESSAGE echo of our own send is not looked up."""
        message_id: str = response.id
        if not message_id and response.HasField("id_string_value_deprecated"):
            message_id = response.id_string_value_deprecated.value
        if not message_id:
            log.warning("workpro: %s to %s succeeded without a message id", method, contact_id)
        self._remember_sent(message_id)
        return message_id

    # -- tags ------------------------------------------------------------------------------------
    async def add_contact_tags(self, contact_id: str, tag_ids: Sequence[str]) -> None:
        """TagContactTagAdd (idempotent: a tag already there is no error; the server answers with a DIRTY)."""
        await self._change_tags("TagContactTagAdd", contact_id, tag_ids)

    async def remove_contact_tags(self, contact_id: str, tag_ids: Sequence[str]) -> None:
        """TagContactTagRemove (idempotent: a tag not there is no error)."""
        await self._change_tags("TagContactTagRemove", contact_id, tag_ids)

    async def _change_tags(self, method: str, contact_id: str, tag_ids: Sequence[str]) -> None:
        ids = list(dict.fromkeys(t for t in tag_ids if t))
        if not contact_id:
            raise PermanentError("no contact id to tag")
        if not ids:
            return
        await self._ensure_started()
        self._require_login(N_("change tags"))
        request_type = pb.TagContactTagAddRequest if method == "TagContactTagAdd" else pb.TagContactTagRemoveRequest
        # Not `mutating`: doing it twice is harmless, so a timeout is worth a retry rather than "unknown".
        await self._unary(
            method, request_type(tag_ids=ids, contact_ids=[contact_id]), what=f"the tags {', '.join(ids)}"
        )

    async def create_tag(self, name: str, group_name: str = "") -> TagRecord:
        """The tag `name` in `group_name` (TagGroupAdd when the group is new, then TagTagAdd), or the existing one."""
        name, group_name = name.strip(), group_name.strip()
        if not name:
            raise PermanentError("a tag needs a name")
        await self._ensure_started()
        self._require_login(N_("create tags"))
        for tag in await self.list_tags():
            if tag.name == name and tag.group_name == group_name:
                return tag
        group_id = await self._tag_group_id(group_name) if group_name else ""
        response = await self._unary(
            "TagTagAdd", pb.TagTagAddRequest(tag_group_id=group_id, tag_name=[name]), what=f"the tag {name!r}"
        )
        info = next((i for i in response.tag_info if i.tag_name == name), None)
        tag_id = info.tag_id if info is not None else response.deprecated_tag_id
        if not tag_id:
            raise PermanentError(f"WorkPro created the tag {name!r} without saying its id")
        payload = await self._tag_payload(tag_id)
        kind = int(payload.type) if payload is not None else int(pb.TAG_TYPE_CORPORATION if group_id else 0)
        return TagRecord(id=tag_id, name=name, group_name=group_name, type=kind)

    async def _tag_group_id(self, name: str) -> str:
        """The id of the tag group called `name`, created when there is none."""
        group_ids: list[str] = list((await self._unary("TagGroupList", pb.TagGroupListRequest())).tag_group_ids)
        groups = await self._gather_limited(group_ids, self._group_payload)
        for group_id, group in zip(group_ids, groups, strict=True):
            if group is not None and group.name == name:
                return group_id
        response = await self._unary(
            "TagGroupAdd", pb.TagGroupAddRequest(tag_group_name=name), what=f"the tag group {name!r}"
        )
        created: str = response.tag_group_id
        if not created:
            raise PermanentError(f"WorkPro created the tag group {name!r} without saying its id")
        return created

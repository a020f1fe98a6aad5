"""A fake juzibot WorkPro puppet: a real gRPC server (grpc.aio, loopback) speaking our `wechaty.Puppet` proto.

It plays the whole flow as the fact sheet describes the real one (`shared/reference/workpro_puppet.md` §8):
token auth on every RPC, HEARTBEAT on connect (then LOGIN/READY when logged in, or the cached SCAN), a
WeCom QR URL, the phone's scan, the VERIFY_CODE event whose id is the QR key, EnterVerifyCode with 3
tries, LOGIN, READY (twice), WeCom's optional "new device" second QR, Logout, a deterministic Chinese
contact book with tags and tag groups, and sends of every part kind recorded in memory (`sends`: text, images
and files decoded from their FileBox, link and mini-program cards). Files come as juzi's client sends them: the
bytes by the client-streaming `Upload` (chunks; a request without bytes fails it), then a FileBox of type Uuid
naming the upload, resolved here to what was uploaded (its sha256 and size; the bytes are not kept) and usable
once, as file-box's registry documents; `uploads="unimplemented"` plays a server without Upload (base64 boxes
then), `cut_uploads` breaks uploads mid-stream. Faults are switched on through a Python control API
(`drop_event_stream`, `stall_event_stream`, `restart`, `fail_sends`, `throttle_sends`, `refuse_parts`,
`cut_uploads`, `send_delay`, `batch_mode`, `uploads`); sends a fault refused are kept in `rejected`. Customers act
through it too, with the events the real server pushes: `incoming_message` (MESSAGE, then MessagePayload),
`add_contact` / `remove_contact` (FRIENDSHIP, then FriendshipPayload), `tag` / `touch_contact` (DIRTY);
`deliver=False` loses the event, as a broken stream would. Tags are created with TagGroupAdd / TagTagAdd and
put on with TagContactTagAdd / Remove.

Tests drive it in-process. As a manual demo:

    python -m engine.gateways.fake_puppet --port 50051 --contacts 200

then point wecast at it (the command prints the config) and finish the login with the code it prints.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

from engine.gateways.demo_data import GIVEN, SURNAMES
from engine.gateways.proto import puppet_pb2 as pb
from engine.gateways.proto import puppet_pb2_grpc as pb_grpc
from engine.messages import PartKind

log = logging.getLogger("wecast.fake_puppet")

DEFAULT_TOKEN = "puppet_workpro_fake0123456789abcdef"
NEW_DEVICE_TEXT = "你正在一台新设备上使用企业微信，需通过手机企业微信扫码进行安全验证"
IMAGE_REFUSED = "WorkproErrorCode: 23060, cgi error code: (-4048)"  # seen on a refused image send (#565)
IMAGE_NAMES = (".jpg", ".jpeg", ".png")
# juzi's PuppetServer takes messages of up to 80 MiB (wechaty-puppet-service src/config.ts GRPC_OPTIONS).
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 80 * 1024 * 1024),
    ("grpc.max_send_message_length", 80 * 1024 * 1024),
]
VERIFY_TEXT = "请输入企业微信手机端展示的验证码，以继续登录"
# What a Node server appends to an error's details; the client must show only the first line.
JS_STACK = "\n    at PuppetWorkPro.{fn} (/app/node_modules/@juzi/puppet-workpro/dist/cjs/src/puppet.js:{line}:17)"

BatchMode = Literal["ok", "unimplemented", "not_a_function", "fail"]
UploadMode = Literal["ok", "unimplemented"]

_CITIES = [
    ("上海", "上海"),
    ("北京", "北京"),
    ("浙江", "杭州"),
    ("广东", "广州"),
    ("广东", "深圳"),
    ("江苏", "南京"),
    ("江苏", "苏州"),
    ("四川", "成都"),
    ("湖北", "武汉"),
    ("陕西", "西安"),
]
_CORPS = ["", "", "", "腾讯", "阿里巴巴", "字节跳动", "招商银行", "华为", "美团", "某某贸易有限公司"]
_TITLES = ["", "", "", "设计师", "教师", "产品经理", "销售经理", "工程师", "财务"]
# (group id, group name, [(tag id, tag name)]); tags without a group are personal tags.
_TAG_GROUPS = [
    ("et_group_level", "客户等级", [("et_vip", "VIP"), ("et_normal", "普通客户"), ("et_lead", "潜在客户")]),
    ("et_group_source", "来源", [("et_expo", "展会"), ("et_site", "官网"), ("et_referral", "转介绍")]),
    ("et_group_interest", "意向产品", [("et_prod_a", "A系列"), ("et_prod_b", "B系列")]),
]
_PERSONAL_TAGS = [("pt_old", "老客户"), ("pt_callback", "待回访")]
CORP_ID = "ww7d3f2a9c61b5e0a4"
SELF_ID = "1688850000000001"
SELF_NAME = "小王（演示账号）"


@dataclass
class SentMessage:
    """One message the fake accepted, as the recipient got it. `kind` is what the customer sees (a FileBox
    whose name ends in .jpg/.jpeg/.png is an image, as WeCom decides); `sha256` and `size` describe an image's or
    file's content as received (decoded from the FileBox), `url` a box sent by URL or a link card's target."""

    contact_id: str
    text: str  # the text part's text; a card's title; an image's or file's name
    message_id: str
    at: float = field(default_factory=time.time)
    kind: PartKind = PartKind.TEXT
    sha256: str = ""
    size: int = 0
    url: str = ""
    payload: dict[str, Any] = field(default_factory=dict)  # a card's fields as received


@dataclass
class Upload:
    """One finished upload, as the server keeps it (its content's sha256 and size; `used` once a send named it)."""

    sha256: str
    size: int
    used: bool = False


@dataclass
class RejectedSend:
    """One send an injected fault refused before anything was delivered (nothing recorded)."""

    contact_id: str
    code: grpc.StatusCode
    details: str
    at: float = field(default_factory=time.time)
    kind: PartKind = PartKind.TEXT


def demo_contacts(count: int, seed: int = 2024) -> list[pb.ContactPayloadResponse]:
    """`count` realistic, deterministic Chinese customers (external contacts, ids like 7881…)."""
    rng = random.Random(seed)
    tag_choices = [t for _, _, tags in _TAG_GROUPS for t, _ in tags] + [t for t, _ in _PERSONAL_TAGS]
    now_ms = 1_767_000_000_000
    contacts = []
    for i in range(count):
        name = rng.choice(SURNAMES) + rng.choice(GIVEN)
        province, city = rng.choice(_CITIES)
        added = now_ms - rng.randrange(1, 900) * 86_400_000
        # Mostly ms, sometimes seconds, once in a while broken: the real additionalInfo is that varied.
        roll = rng.random()
        if roll < 0.8:
            info = json.dumps({"addContactTime": added, "corpId": CORP_ID})
        elif roll < 0.97:
            info = json.dumps({"addContactTime": added // 1000})
        else:
            info = "{not json"
        contacts.append(
            pb.ContactPayloadResponse(
                id=f"7881{300000000000 + i * 7919:012d}",
                gender=rng.choice([0, 1, 2, 2]),
                type=pb.CONTACT_TYPE_PERSONAL,
                name=name,
                avatar=f"https://wework.qpic.cn/wwhead/demo{i % 97:02d}/0",
                alias=f"{name}-{city}" if rng.random() < 0.4 else "",
                city=city,
                province=province,
                friend=True,
                star=rng.random() < 0.05,
                weixin=f"wxid_{rng.randrange(16**10):010x}",
                corporation=rng.choice(_CORPS),
                title=rng.choice(_TITLES),
                description="",
                phones=[f"13{rng.randrange(10**9):09d}"] if rng.random() < 0.6 else [],
                additional_info=info,
                tag_ids=sorted(set(rng.sample(tag_choices, rng.choice([0, 1, 1, 2, 3])))),
                real_name="",
                aka="",
            )
        )
    return contacts


class _AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc has no type information
    """Every RPC needs `authorization: Wechaty <token>` (juzi's server falls back to :authority)."""

    def __init__(self, fake: FakePuppet) -> None:
        self.fake = fake

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        auth = metadata.get("authorization") or (
            f"Wechaty {metadata[':authority']}" if ":authority" in metadata else ""
        )
        self.fake.calls.append(details.method.rsplit("/", 1)[-1])
        if handler is None or auth == f"Wechaty {self.fake.token}":
            return handler
        message = f'Invalid Wechaty TOKEN "{auth.removeprefix("Wechaty ")}"' if auth else "No Authorization found."

        async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield None  # pragma: no cover - abort raises

        async def deny_stream_in(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                deny_stream_in,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                deny_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            deny_unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class FakePuppet(pb_grpc.PuppetServicer):  # type: ignore[misc]
    """The fake server and its control API. `await start()`, drive it, `await stop()`."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        contacts: int = 200,
        seed: int = 2024,
        batch_mode: BatchMode = "ok",
        second_verification: bool = False,
        ready_twice: bool = True,
        auto_scan_after: float | None = None,
        ready_delay: float = 0.01,
        zero_seq: bool = False,
        uploads: UploadMode = "ok",
        tls: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.token = token
        self.tls = tls  # (private key, certificate chain) as PEM: serve TLS, as juzi's PuppetServer does by default
        self.batch_mode: BatchMode = batch_mode
        self.upload_mode: UploadMode = uploads
        self.uploads: dict[str, Upload] = {}  # finished uploads by id
        self.file_boxes: list[dict[str, Any]] = []  # every MessageSendFile's FileBox JSON (without its base64)
        self.cut_upload_count = 0  # uploads cut mid-stream so far (nothing kept of them)
        self.empty_upload_chunks = 0  # Upload requests that carried no bytes (each failed its upload)
        self._cuts = 0  # how many of the next uploads to cut
        self.second_verification = second_verification  # ask for WeCom's "new device" QR after the next login
        self.ready_twice = ready_twice
        self.auto_scan_after = auto_scan_after  # the phone scans each QR this long after it shows
        self.ready_delay = ready_delay
        self.zero_seq = zero_seq  # like juzi's open-source server: EventResponse.seq is 0
        self.send_delay = 0.0  # seconds each MessageSendText takes (after recording)
        self.new_qr_after_tries = True  # after the third wrong code, push a new QR (False: wait for RefreshQRCode)
        # Between a login and its READY the account's contacts are still loading: ContactList names only some.
        self.partial_until_ready = False
        self.loading = False
        self.self_payload_delay = 0.0  # seconds ContactPayload of the account itself takes (its name lookup)
        self.sends: list[SentMessage] = []
        self.rejected: list[RejectedSend] = []  # sends refused by `fail_sends` / `throttle_sends`
        self.calls: list[str] = []  # RPC names, in order (auth failures included)
        self.calls_with: list[tuple[str, str]] = []  # (RPC, its main argument) for the calls that create things
        self.event_requests: list[tuple[int, str]] = []  # (seq, account_id) of each Event call
        self.emitted: list[pb.EventResponse] = []  # every event pushed (delivered or dropped)
        self._rng = random.Random(seed)
        self._contacts = {c.id: c for c in demo_contacts(contacts, seed)}
        self._tags = {
            tid: pb.TagPayload(id=tid, name=name, group_id=gid, type=pb.TAG_TYPE_CORPORATION)
            for gid, _, tags in _TAG_GROUPS
            for tid, name in tags
        }
        self._tags.update(
            {tid: pb.TagPayload(id=tid, name=name, type=pb.TAG_TYPE_PERSONAL) for tid, name in _PERSONAL_TAGS}
        )
        self._groups = {
            gid: pb.TagGroupPayload(id=gid, name=name, type=pb.TAG_TYPE_CORPORATION) for gid, name, _ in _TAG_GROUPS
        }
        self._server: Any = None
        self.port = 0
        self._stream: asyncio.Queue[pb.EventResponse | str] | None = None
        self._seq = 0
        self._faults: list[tuple[grpc.StatusCode, str]] = []
        self._part_faults: dict[PartKind, list[tuple[grpc.StatusCode, str]]] = {}
        self._message_counter = 0
        self._messages: dict[str, pb.MessagePayloadResponse] = {}  # every message sent or received, by id
        self._friendships: dict[str, pb.FriendshipPayloadResponse] = {}
        self._added = 0  # contacts added through add_contact
        self._tasks: set[asyncio.Task[Any]] = set()
        # account state
        self.running = False
        self.logged_in = False
        self.phase: Literal["idle", "waiting_scan", "waiting_code", "logged_in"] = "idle"
        self.qr_key: str | None = None
        self.qr_url: str | None = None
        self._second_qr = False
        self._code: str | None = None
        self._tries = 3
        self._cached_scan: pb.EventResponse | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on host:port (0: any free port); returns the port."""
        self._server = grpc.aio.server(interceptors=[_AuthInterceptor(self)], options=GRPC_OPTIONS)
        pb_grpc.add_PuppetServicer_to_server(self, self._server)
        address = f"{host}:{port}"
        if self.tls is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, grpc.ssl_server_credentials([self.tls]))
        await self._server.start()
        return int(self.port)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._end_stream()
        if self._server is not None:
            await self._server.stop(grace=0.2)
            await asyncio.sleep(0.02)  # let gRPC core's last completions land on this loop (see workpro.close)
            self._server = None

    def _later(self, delay: float, action: Callable[[], Any]) -> None:
        async def run() -> None:
            await asyncio.sleep(delay)
            result = action()
            if asyncio.iscoroutine(result):
                await result

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- control API -----------------------------------------------------------------------------
    def phone_code(self) -> str | None:
        """The 6-digit code the phone shows after a scan (None if none is pending)."""
        return self._code

    def contact_ids(self) -> list[str]:
        return list(self._contacts)

    def sent_to(self, contact_id: str) -> list[SentMessage]:
        return [s for s in self.sends if s.contact_id == contact_id]

    def pending_faults(self) -> int:
        """Injected send faults not yet served."""
        return len(self._faults)

    def tag_names(self, contact_id: str) -> set[str]:
        """The names of a contact's tags, as the account shows them."""
        return {self._tags[t].name for t in self._contacts[contact_id].tag_ids if t in self._tags}

    async def scan(self) -> None:
        """The phone scans the QR on screen: SCAN(scanned), then VERIFY_CODE (or LOGIN for a security QR)."""
        if self.phase != "waiting_scan" or self.qr_url is None:
            raise RuntimeError(f"nothing to scan (phase {self.phase})")
        self.emit(pb.EVENT_TYPE_SCAN, {"status": 3, "qrcode": self.qr_url, "timestamp": _ms()})
        if self._second_qr:
            self._second_qr = False
            self._login()
            return
        self._code = f"{self._rng.randrange(10**6):06d}"
        self._tries = 3
        self.phase = "waiting_code"
        self.emit(pb.EVENT_TYPE_VERIFY_CODE, {"id": self.qr_key, "scene": 1, "status": 1, "message": VERIFY_TEXT})

    def ask_slider(self) -> None:
        """WeCom wants its slider puzzle solved before this login: VERIFY_SLIDE(34) with juzi's payload shape
        (juzibot/wechaty-puppet src/schemas/event.ts EventVerifySlidePayload). No RPC answers it."""
        self.emit(
            pb.EVENT_TYPE_VERIFY_SLIDE,
            {
                "scene": 1,
                "status": 1,
                "sliderVerifyEncrypt": f"enc-{self.qr_key}",
                "sliderExeUrl": "https://wx.work.weixin.qq.com/slider/verify.exe",
            },
        )

    def stall_event_stream(self) -> None:
        """The open Event stream goes silent without ending, as when a NAT or proxy forgets the connection: nothing
        more is delivered on it (events are lost) until the client gives up on it and opens a new one."""
        if self._stream is not None:
            self._stream.put_nowait("stall")

    async def restart(self, *, keep_login: bool = True) -> None:
        """The puppet service restarts on the same port: every call in flight fails, the stream ends, the event seq
        starts again at 1, and the account must be started again (`Start`); it stays logged in with `keep_login`
        (WorkPro keeps the WeCom session behind the service), else it shows a new QR once started."""
        port = self.port
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            await self._server.stop(grace=0)
        self._stream = None
        self._seq = 0
        self.running = False
        if not keep_login:
            self.logged_in = False
            self.phase = "idle"
            self._cached_scan = None
        await self.start(port=port)

    def drop_event_stream(self) -> None:
        """Break the open Event stream the way a network reset does (the client sees UNAVAILABLE)."""
        if self._stream is not None:
            self._stream.put_nowait("drop")

    def fail_sends(
        self,
        count: int,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        details: str = "WorkPro service unavailable, try again later",
    ) -> None:
        """The next `count` sends (any kind of part) fail with `code` (nothing is recorded)."""
        self._faults.extend([(code, details)] * count)

    def refuse_parts(
        self,
        kind: PartKind,
        count: int = 1,
        code: grpc.StatusCode = grpc.StatusCode.INTERNAL,
        details: str = IMAGE_REFUSED,
    ) -> None:
        """The next `count` sends of that kind of part fail with `code` and `details` (nothing is recorded)."""
        self._part_faults.setdefault(kind, []).extend([(code, details)] * count)

    def cut_uploads(self, count: int) -> None:
        """The next `count` uploads break after their first chunk, the way a reset connection does (UNAVAILABLE,
        "Connection reset by peer"); nothing of them is kept."""
        self._cuts += count

    def throttle_sends(self, count: int) -> None:
        """The next `count` sends get WorkPro's rate-limit answer (13 INTERNAL, WorkproErrorCode 20001)."""
        self.fail_sends(count, grpc.StatusCode.INTERNAL, "WorkproErrorCode: 20001, Feature temporarily unavailable.")

    def touch_contact(self, contact_id: str, *, deliver: bool = True, **changes: Any) -> None:
        """Change a contact and push DIRTY, as WeCom does when a remark or tag changes."""
        contact = self._contacts[contact_id]
        for key, value in changes.items():
            if key in ("tag_ids", "phones"):
                del getattr(contact, key)[:]
                getattr(contact, key).extend(value)
            else:
                setattr(contact, key, value)
        self.emit(pb.EVENT_TYPE_DIRTY, {"payloadId": contact_id, "payloadType": 2}, deliver=deliver)

    def tag(self, contact_id: str, tag_id: str, *, add: bool = True, deliver: bool = True) -> None:
        """Put a tag on a contact (or take it off) on the phone: the contact changes and DIRTY is pushed."""
        tags = [t for t in self._contacts[contact_id].tag_ids if t != tag_id] + ([tag_id] if add else [])
        self.touch_contact(contact_id, tag_ids=tags, deliver=deliver)

    def incoming_message(
        self,
        contact_id: str,
        text: str,
        *,
        deliver: bool = True,
        room_id: str = "",
        message_type: int = pb.MESSAGE_TYPE_TEXT,
    ) -> str:
        """A customer writes to the account (in a group chat with `room_id`): MESSAGE {messageId}, whose payload
        MessagePayload then serves. `deliver=False` drops the event, as a broken stream would. Returns its id."""
        self._message_counter += 1
        message_id = f"fake-in-{self._message_counter:08d}"
        self._messages[message_id] = pb.MessagePayloadResponse(
            id=message_id,
            text=text,
            type=message_type,
            talker_id=contact_id,
            room_id=room_id,
            listener_id="" if room_id else SELF_ID,
        )
        self.emit(pb.EVENT_TYPE_MESSAGE, {"messageId": message_id}, deliver=deliver)
        return message_id

    def add_contact(self, name: str, *, deliver: bool = True, tag_ids: tuple[str, ...] = ()) -> str:
        """A new customer adds the account and is confirmed: the contact book grows and FRIENDSHIP (confirm) is
        pushed (`deliver=False` drops it: only the next sync can find the contact). Returns the contact id."""
        self._added += 1
        contact_id = f"7881{400000000000 + self._added:012d}"
        self._contacts[contact_id] = pb.ContactPayloadResponse(
            id=contact_id,
            name=name,
            type=pb.CONTACT_TYPE_PERSONAL,
            friend=True,
            tag_ids=list(tag_ids),
            additional_info=json.dumps({"addContactTime": _ms(), "corpId": CORP_ID}),
        )
        self._friendship(contact_id, pb.FRIENDSHIP_TYPE_CONFIRM, deliver)
        return contact_id

    def remove_contact(self, contact_id: str, *, by_customer: bool = True, deliver: bool = True) -> None:
        """The customer deletes the account (or the account deletes them): gone from the contact book, and
        FRIENDSHIP (removed / delete) is pushed."""
        del self._contacts[contact_id]
        kind = pb.FRIENDSHIP_TYPE_REMOVED if by_customer else pb.FRIENDSHIP_TYPE_DELETE
        self._friendship(contact_id, kind, deliver)

    def _friendship(self, contact_id: str, kind: int, deliver: bool) -> None:
        friendship_id = f"fake-friendship-{len(self._friendships) + 1:06d}"
        self._friendships[friendship_id] = pb.FriendshipPayloadResponse(
            id=friendship_id, contact_id=contact_id, type=kind, hello="你好", ticket=CORP_ID
        )
        self.emit(pb.EVENT_TYPE_FRIENDSHIP, {"friendshipId": friendship_id}, deliver=deliver)

    def emit(self, event_type: int, payload: dict[str, Any], *, deliver: bool = True) -> None:
        """Push one event to the open stream; like the real server, it is dropped when no stream is open (and
        when `deliver` is False: what a test uses to lose one)."""
        self._seq += 1
        event = pb.EventResponse(
            type=event_type,
            payload=json.dumps(payload, ensure_ascii=False),
            seq=0 if self.zero_seq else self._seq,
        )
        self.emitted.append(event)
        if event_type == pb.EVENT_TYPE_SCAN and payload.get("status") == 2:
            self._cached_scan = event
        if self._stream is not None and deliver:
            self._stream.put_nowait(event)

    def require_second_verification(self) -> None:
        """Now (if logged in): LOGOUT with WeCom's new-device text, then a secondaryEquipment QR."""
        if not self.logged_in:
            raise RuntimeError("not logged in")
        self.logged_in = False
        self.emit(pb.EVENT_TYPE_LOGOUT, {"contactId": SELF_ID, "data": NEW_DEVICE_TEXT})
        self._new_qr(second=True)

    # -- internals -------------------------------------------------------------------------------
    def _new_qr(self, *, second: bool = False) -> None:
        self.qr_key = f"{self._rng.getrandbits(128):032X}"
        extra = "&secondaryEquipment=1" if second else ""
        self.qr_url = f"https://wx.work.weixin.qq.com/cgi-bin/crtx_auth?key={self.qr_key}&wx=1{extra}"
        self._second_qr = second
        self._code = None
        self.phase = "waiting_scan"
        self.emit(pb.EVENT_TYPE_SCAN, {"status": 2, "qrcode": self.qr_url, "timestamp": _ms()})
        if self.auto_scan_after is not None:
            key = self.qr_key

            async def auto_scan() -> None:
                if self.qr_key == key and self.phase == "waiting_scan":
                    await self.scan()

            self._later(self.auto_scan_after, auto_scan)

    def _login(self) -> None:
        self.logged_in = True
        self.phase = "logged_in"
        self.qr_key = self.qr_url = self._code = None
        self._cached_scan = None  # only a LOGIN clears the SCAN cache
        self.emit(pb.EVENT_TYPE_LOGIN, {"contactId": SELF_ID})
        self.loading = self.partial_until_ready

        def ready() -> None:
            self.loading = False
            self.emit(pb.EVENT_TYPE_READY, {"data": "data ready"})

        self._later(self.ready_delay, ready)
        if self.ready_twice:
            self._later(self.ready_delay * 3, lambda: self.emit(pb.EVENT_TYPE_READY, {"data": "ready"}))
        if self.second_verification:
            self.second_verification = False
            self._later(self.ready_delay * 4, self.require_second_verification)

    def _end_stream(self) -> None:
        if self._stream is not None:
            self._stream.put_nowait("end")

    async def _fault(self, context: grpc.aio.ServicerContext, contact_id: str, kind: PartKind) -> None:
        queue = self._faults or self._part_faults.get(kind)
        if queue:
            code, details = queue.pop(0)
            self.rejected.append(RejectedSend(contact_id, code, details, kind=kind))
            await context.abort(code, details)

    async def _accept(
        self,
        context: grpc.aio.ServicerContext,
        fn: str,
        contact_id: str,
        kind: PartKind,
        make: Callable[[str], SentMessage],
    ) -> str:
        """The common path of every send: faults, login, a known recipient, then record (delivered) and answer
        (after `send_delay`: a slow answer to a delivered message is what makes a timeout's outcome unknown)."""
        await self._fault(context, contact_id, kind)
        await self._need_login(context, fn)
        if contact_id not in self._contacts:
            await context.abort(
                grpc.StatusCode.UNKNOWN,
                f"Error: conversation {contact_id} not found" + JS_STACK.format(fn=fn, line=233),
            )
        self._message_counter += 1
        message_id = f"fake-msg-{self._message_counter:08d}"
        sent = make(message_id)
        self.sends.append(sent)
        self._messages[message_id] = pb.MessagePayloadResponse(
            id=message_id,
            text=sent.text if kind is PartKind.TEXT else "",
            filename=sent.text if kind in (PartKind.IMAGE, PartKind.FILE) else "",
            type=_MESSAGE_TYPES[kind],
            talker_id=SELF_ID,
            listener_id=contact_id,
        )
        self.emit(pb.EVENT_TYPE_MESSAGE, {"messageId": message_id})  # the server announces our own sends too
        if self.send_delay:
            await asyncio.sleep(self.send_delay)
        return message_id

    async def _need_login(self, context: grpc.aio.ServicerContext, fn: str) -> None:
        if not self.logged_in:
            await context.abort(
                grpc.StatusCode.UNKNOWN,
                "Error: not logged in, no this.__currentUserId yet." + JS_STACK.format(fn=fn, line=88),
            )

    # -- the service -----------------------------------------------------------------------------
    async def Event(
        self, request: pb.EventRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EventResponse]:
        if self._stream is not None:
            # juzi's PuppetServer: "GrpcServerImpl.event() can not call twice." (puppet-implementation.ts event)
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "GrpcServerImpl.event() can not call twice.")
        self.event_requests.append((request.seq, request.account_id))
        queue: asyncio.Queue[pb.EventResponse | str] = asyncio.Queue()
        self._stream = queue
        try:
            yield pb.EventResponse(
                type=pb.EVENT_TYPE_HEARTBEAT,
                payload=json.dumps({"data": "Wechaty Puppet gRPC stream connect successfully"}),
            )
            if self.logged_in:
                yield pb.EventResponse(type=pb.EVENT_TYPE_LOGIN, payload=json.dumps({"contactId": SELF_ID}))
                self._later(self.ready_delay, lambda: self.emit(pb.EVENT_TYPE_READY, {"data": "ready"}))
            elif self._cached_scan is not None:
                yield self._cached_scan
            while True:
                event = await queue.get()
                if event == "drop":  # what a client sees when a proxy or the network resets the stream
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "Stream removed")
                if event == "stall":  # open, silent, until the client cancels it (GeneratorExit / CancelledError)
                    await asyncio.Event().wait()
                if isinstance(event, str):  # Stop: the real server ends the stream with OK
                    return
                yield event
        finally:
            if self._stream is queue:
                self._stream = None

    async def Start(self, request: pb.StartRequest, context: grpc.aio.ServicerContext) -> pb.StartResponse:
        if not self.running:
            self.running = True
            if self.logged_in:
                self._login()
            else:
                self._new_qr()
        return pb.StartResponse()

    async def Stop(self, request: pb.StopRequest, context: grpc.aio.ServicerContext) -> pb.StopResponse:
        self.running = False
        self._end_stream()
        return pb.StopResponse()

    async def Logout(self, request: pb.LogoutRequest, context: grpc.aio.ServicerContext) -> pb.LogoutResponse:
        if self.logged_in:
            self.logged_in = False
            self.phase = "idle"
            self.emit(pb.EVENT_TYPE_LOGOUT, {"contactId": SELF_ID, "data": "logout()"})
            self._new_qr()
        return pb.LogoutResponse()

    async def Ding(self, request: pb.DingRequest, context: grpc.aio.ServicerContext) -> pb.DingResponse:
        self.emit(pb.EVENT_TYPE_DONG, {"data": request.data})
        return pb.DingResponse()

    async def Version(self, request: pb.VersionRequest, context: grpc.aio.ServicerContext) -> pb.VersionResponse:
        return pb.VersionResponse(version="fake-workpro 1.0")

    async def CurrentUser(
        self, request: pb.CurrentUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.CurrentUserResponse:
        await self._need_login(context, "currentUser")
        return pb.CurrentUserResponse(user_id=SELF_ID)

    async def RefreshQRCode(
        self, request: pb.RefreshQRCodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RefreshQRCodeRequest:
        if self.logged_in:
            await context.abort(grpc.StatusCode.UNKNOWN, "Error: already logged in, can not refresh qrcode")
        self._new_qr()
        return pb.RefreshQRCodeRequest()

    async def EnterVerifyCode(
        self, request: pb.EnterVerifyCodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.EnterVerifyCodeResponse:
        if self.phase != "waiting_code" or request.id != self.qr_key:
            await context.abort(grpc.StatusCode.INTERNAL, "no verify code is pending for this id")
        if request.code != self._code:
            self._tries -= 1
            if self._tries <= 0:
                self.phase = "idle"  # that QR is dead
                if self.new_qr_after_tries:
                    self._later(0.01, self._new_qr)
                await context.abort(grpc.StatusCode.INTERNAL, "验证码错误次数超过阈值，请重新扫码")
            await context.abort(grpc.StatusCode.INTERNAL, "Invalid verify code!")
        self.emit(pb.EVENT_TYPE_SCAN, {"status": 4, "qrcode": self.qr_url, "timestamp": _ms()})
        self._login()
        return pb.EnterVerifyCodeResponse()

    async def CancelVerifyCode(
        self, request: pb.CancelVerifyCodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelVerifyCodeResponse:
        self._code = None
        return pb.CancelVerifyCodeResponse()

    async def DirtyPayload(
        self, request: pb.DirtyPayloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.DirtyPayloadResponse:
        self.emit(pb.EVENT_TYPE_DIRTY, {"payloadId": request.id, "payloadType": int(request.type)})
        return pb.DirtyPayloadResponse()

    async def ContactList(
        self, request: pb.ContactListRequest, context: grpc.aio.ServicerContext
    ) -> pb.ContactListResponse:
        await self._need_login(context, "contactList")
        # The account itself is listed too, as wechaty puppets' contactList() does (UNCERTAIN for WorkPro).
        ids = list(self._contacts)
        return pb.ContactListResponse(ids=[SELF_ID, *(ids[: len(ids) // 3] if self.loading else ids)])

    def _payload(self, contact_id: str) -> pb.ContactPayloadResponse | None:
        if contact_id == SELF_ID:
            return pb.ContactPayloadResponse(
                id=SELF_ID,
                name=SELF_NAME,
                type=pb.CONTACT_TYPE_CORPORATION,
                coworker=True,
                corporation="演示科技",
            )
        return self._contacts.get(contact_id)

    async def ContactPayload(
        self, request: pb.ContactPayloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.ContactPayloadResponse:
        await self._need_login(context, "contactRawPayload")
        if request.id == SELF_ID and self.self_payload_delay:
            await asyncio.sleep(self.self_payload_delay)
        payload = self._payload(request.id)
        if payload is None:
            await context.abort(
                grpc.StatusCode.UNKNOWN,
                f"Error: contact not found: {request.id}" + JS_STACK.format(fn="contactRawPayload", line=412),
            )
        return payload

    async def BatchContactPayload(
        self, request: pb.BatchContactPayloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchContactPayloadResponse:
        if self.batch_mode == "unimplemented":
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        if self.batch_mode == "not_a_function":
            await context.abort(
                grpc.StatusCode.UNKNOWN,
                "TypeError: this.puppet.batchContactPayload is not a function"
                + JS_STACK.format(fn="batchContactPayload", line=97),
            )
        await self._need_login(context, "batchContactPayload")
        if self.batch_mode == "fail":  # some accounts fail the whole batch (e.g. over one odd id)
            await context.abort(
                grpc.StatusCode.UNKNOWN,
                "Error: get contact payload failed for some ids" + JS_STACK.format(fn="batchContactPayload", line=131),
            )
        found = [p for p in (self._payload(i) for i in request.ids) if p is not None]
        self._rng.shuffle(found)  # the order is not guaranteed: clients must match by id
        return pb.BatchContactPayloadResponse(contact_payloads=found)

    async def MessageSendText(
        self, request: pb.MessageSendTextRequest, context: grpc.aio.ServicerContext
    ) -> pb.MessageSendTextResponse:
        message_id = await self._accept(
            context,
            "messageSendText",
            request.conversation_id,
            PartKind.TEXT,
            lambda mid: SentMessage(request.conversation_id, request.text, mid),
        )
        return _with_id(pb.MessageSendTextResponse(), message_id)

    async def Upload(self, request_iterator: AsyncIterator[pb.UploadRequest], context: grpc.aio.ServicerContext) -> Any:
        """The bytes of a file, in chunks, answered with the upload's id. Hashed as they come; only the hash and
        size are kept. A request without bytes fails the upload, as on juzi's open-source server."""
        if self.upload_mode == "unimplemented":
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        digest = hashlib.sha256()
        size = 0
        async for request in request_iterator:
            if not request.chunk:
                # juzi's server decodes the stream with wechaty-grpc's chunkDecoder, which fails on a request
                # without bytes (`NOCHUNK`); there the failure is unhandled and ends the server process.
                self.empty_upload_chunks += 1
                await context.abort(grpc.StatusCode.UNKNOWN, "Error: NOCHUNK")
            if self._cuts:
                self._cuts -= 1
                self.cut_upload_count += 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "Connection reset by peer")
            digest.update(request.chunk)
            size += len(request.chunk)
        upload_id = f"{self._rng.getrandbits(128):032x}"
        self.uploads[upload_id] = Upload(digest.hexdigest(), size)
        return pb.UploadResponse(id=upload_id)

    async def MessageSendFile(
        self, request: pb.MessageSendFileRequest, context: grpc.aio.ServicerContext
    ) -> pb.MessageSendFileResponse:
        upload: Upload | None = None
        try:
            box = json.loads(request.file_box)
            self.file_boxes.append({k: v for k, v in box.items() if k != "base64"})
            name = str(box["name"])
            box_type = int(box.get("type", box.get("boxType", 0)))
            data = base64.b64decode(box["base64"], validate=True) if box_type == 1 else b""
            url = str(box["url"]) if box_type == 2 else ""
            uuid = str(box["uuid"]) if box_type == 7 else ""
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            await context.abort(grpc.StatusCode.UNKNOWN, f"Error: unknown filebox json object: {exc}")
        if box_type not in (1, 2, 7):
            await context.abort(grpc.StatusCode.UNKNOWN, f"Error: unknown filebox json object{{type}}: {box_type}")
        if box_type == 7:
            upload = self.uploads.get(uuid)
            if upload is None or upload.used:
                await context.abort(
                    grpc.StatusCode.UNKNOWN,
                    f"Error: ENOENT: no such file or directory, open '/tmp/file-box-urn-registry/{uuid}.dat'",
                )
        kind = PartKind.IMAGE if name.lower().endswith(IMAGE_NAMES) else PartKind.FILE

        def received(mid: str) -> SentMessage:
            if upload is not None:
                upload.used = True
                sha256, size = upload.sha256, upload.size
            else:
                sha256 = hashlib.sha256(data).hexdigest() if data else ""
                size = len(data) if data else int(box.get("size") or 0)
            return SentMessage(request.conversation_id, name, mid, kind=kind, sha256=sha256, size=size, url=url)

        message_id = await self._accept(context, "messageSendFile", request.conversation_id, kind, received)
        return _with_id(pb.MessageSendFileResponse(), message_id)

    async def MessageSendUrl(
        self, request: pb.MessageSendUrlRequest, context: grpc.aio.ServicerContext
    ) -> pb.MessageSendUrlResponse:
        link = request.url_link
        fields = {
            "url": link.url,
            "title": link.title,
            "description": link.description,
            "thumb_url": link.thumbnail_url,
        }
        message_id = await self._accept(
            context,
            "messageSendUrl",
            request.conversation_id,
            PartKind.LINK,
            lambda mid: SentMessage(
                request.conversation_id, link.title, mid, kind=PartKind.LINK, url=link.url, payload=fields
            ),
        )
        return _with_id(pb.MessageSendUrlResponse(), message_id)

    async def MessageSendMiniProgram(
        self, request: pb.MessageSendMiniProgramRequest, context: grpc.aio.ServicerContext
    ) -> pb.MessageSendMiniProgramResponse:
        card = request.mini_program
        if not card.appid:
            await context.abort(grpc.StatusCode.UNKNOWN, "Error: appid is required" + JS_STACK.format(fn="x", line=1))
        fields = {
            "appid": card.appid,
            "title": card.title,
            "page": card.page_path,
            "description": card.description,
            "username": card.username,
            "thumb_url": card.thumb_url,
        }
        message_id = await self._accept(
            context,
            "messageSendMiniProgram",
            request.conversation_id,
            PartKind.MINIPROGRAM,
            lambda mid: SentMessage(
                request.conversation_id, card.title, mid, kind=PartKind.MINIPROGRAM, payload=fields
            ),
        )
        return _with_id(pb.MessageSendMiniProgramResponse(), message_id)

    async def MessagePayload(
        self, request: pb.MessagePayloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.MessagePayloadResponse:
        await self._need_login(context, "messageRawPayload")
        message = self._messages.get(request.id)
        if message is None:
            await context.abort(grpc.StatusCode.UNKNOWN, f"Error: message not found: {request.id}")
        return message

    async def FriendshipPayload(
        self, request: pb.FriendshipPayloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.FriendshipPayloadResponse:
        await self._need_login(context, "friendshipRawPayload")
        friendship = self._friendships.get(request.id)
        if friendship is None:
            await context.abort(grpc.StatusCode.UNKNOWN, f"Error: friendship not found: {request.id}")
        return friendship

    async def TagGroupAdd(
        self, request: pb.TagGroupAddRequest, context: grpc.aio.ServicerContext
    ) -> pb.TagGroupAddResponse:
        await self._need_login(context, "tagGroupAdd")
        group_id = f"et_group_{len(self._groups) + 1:04d}"
        self._groups[group_id] = pb.TagGroupPayload(
            id=group_id, name=request.tag_group_name, type=pb.TAG_TYPE_CORPORATION
        )
        self.calls_with.append(("TagGroupAdd", request.tag_group_name))
        return pb.TagGroupAddResponse(tag_group_id=group_id)

    async def TagTagAdd(self, request: pb.TagTagAddRequest, context: grpc.aio.ServicerContext) -> pb.TagTagAddResponse:
        await self._need_login(context, "tagTagAdd")
        if request.tag_group_id and request.tag_group_id not in self._groups:
            await context.abort(grpc.StatusCode.UNKNOWN, f"Error: tag group not found: {request.tag_group_id}")
        kind = pb.TAG_TYPE_CORPORATION if request.tag_group_id else pb.TAG_TYPE_PERSONAL
        infos = []
        for name in request.tag_name:
            tag_id = f"et_new_{len(self._tags) + 1:04d}"
            self._tags[tag_id] = pb.TagPayload(id=tag_id, name=name, group_id=request.tag_group_id, type=kind)
            infos.append(pb.TagTagInfo(tag_id=tag_id, tag_name=name))
        self.calls_with.append(("TagTagAdd", ",".join(request.tag_name)))
        return pb.TagTagAddResponse(tag_info=infos)

    async def TagTagList(
        self, request: pb.TagTagListRequest, context: grpc.aio.ServicerContext
    ) -> pb.TagTagListResponse:
        await self._need_login(context, "tagTagList")
        return pb.TagTagListResponse(tag_ids=list(self._tags))

    async def TagPayload(
        self, request: pb.TagPayloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.TagPayloadResponse:
        tag = self._tags.get(request.tag_id)
        if tag is None:
            await context.abort(grpc.StatusCode.UNKNOWN, f"Error: tag not found: {request.tag_id}")
        return pb.TagPayloadResponse(payload=tag)

    async def TagGroupList(
        self, request: pb.TagGroupListRequest, context: grpc.aio.ServicerContext
    ) -> pb.TagGroupListResponse:
        return pb.TagGroupListResponse(tag_group_ids=list(self._groups))

    async def TagGroupPayload(
        self, request: pb.TagGroupPayloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.TagGroupPayloadResponse:
        group = self._groups.get(request.group_id)
        if group is None:
            await context.abort(grpc.StatusCode.UNKNOWN, f"Error: tag group not found: {request.group_id}")
        return pb.TagGroupPayloadResponse(payload=group)

    async def TagGroupTagList(
        self, request: pb.TagGroupTagListRequest, context: grpc.aio.ServicerContext
    ) -> pb.TagGroupTagListResponse:
        return pb.TagGroupTagListResponse(
            tag_ids=[t.id for t in self._tags.values() if t.group_id == request.tag_group_id]
        )

    async def TagContactTagList(
        self, request: pb.TagContactTagListRequest, context: grpc.aio.ServicerContext
    ) -> pb.TagContactTagListResponse:
        contact = self._contacts.get(request.contact_id)
        return pb.TagContactTagListResponse(tag_ids=list(contact.tag_ids) if contact else [])

    async def TagTagContactList(
        self, request: pb.TagTagContactListRequest, context: grpc.aio.ServicerContext
    ) -> pb.TagTagContactListResponse:
        return pb.TagTagContactListResponse(
            contact_ids=[c.id for c in self._contacts.values() if request.tag_id in c.tag_ids]
        )

    async def _check_tagging(self, request: Any, context: grpc.aio.ServicerContext, fn: str) -> None:
        await self._need_login(context, fn)
        unknown = [t for t in request.tag_ids if t not in self._tags]
        if unknown:
            await context.abort(grpc.StatusCode.UNKNOWN, f"Error: tag not found: {','.join(unknown)}")
        strangers = [c for c in request.contact_ids if c not in self._contacts]
        if strangers:
            await context.abort(grpc.StatusCode.UNKNOWN, f"Error: contact not found: {','.join(strangers)}")

    async def TagContactTagAdd(
        self, request: pb.TagContactTagAddRequest, context: grpc.aio.ServicerContext
    ) -> pb.TagContactTagAddResponse:
        await self._check_tagging(request, context, "tagContactTagAdd")
        for contact_id in request.contact_ids:
            current = list(self._contacts[contact_id].tag_ids)
            added = current + [t for t in dict.fromkeys(request.tag_ids) if t not in current]
            if added != current:
                self.touch_contact(contact_id, tag_ids=added)
        return pb.TagContactTagAddResponse()

    async def TagContactTagRemove(
        self, request: pb.TagContactTagRemoveRequest, context: grpc.aio.ServicerContext
    ) -> pb.TagContactTagRemoveResponse:
        await self._check_tagging(request, context, "tagContactTagRemove")
        for contact_id in request.contact_ids:
            current = list(self._contacts[contact_id].tag_ids)
            kept = [t for t in current if t not in set(request.tag_ids)]
            if kept != current:
                self.touch_contact(contact_id, tag_ids=kept)
        return pb.TagContactTagRemoveResponse()


_MESSAGE_TYPES = {
    PartKind.TEXT: pb.MESSAGE_TYPE_TEXT,
    PartKind.IMAGE: pb.MESSAGE_TYPE_IMAGE,
    PartKind.FILE: pb.MESSAGE_TYPE_ATTACHMENT,
    PartKind.LINK: pb.MESSAGE_TYPE_URL,
    PartKind.MINIPROGRAM: pb.MESSAGE_TYPE_MINI_PROGRAM,
}


def _with_id(response: Any, message_id: str) -> Any:
    """Fill both id fields, as juzi's server does (field 2, and the old wrapped field 1)."""
    response.id = message_id
    response.id_string_value_deprecated.value = message_id
    return response


def _ms() -> int:
    return int(time.time() * 1000)


async def _serve(args: argparse.Namespace) -> None:
    fake = FakePuppet(
        token=args.token,
        contacts=args.contacts,
        seed=args.seed,
        auto_scan_after=args.scan_after,
        second_verification=args.second_verification,
    )
    port = await fake.start(args.host, args.port)
    print(f"fake WorkPro puppet listening on {args.host}:{port} with {args.contacts} contacts\n")
    print("Point wecast at it (config.yaml):\n")
    print(f"  gateway: workpro\n  workpro:\n    endpoint: 127.0.0.1:{port}\n    token: {args.token}\n")
    print(f"The phone scans each QR {args.scan_after:g} s after it shows; the verification code appears here.")
    shown: str | None = None
    sent = 0
    try:
        while True:
            await asyncio.sleep(0.5)
            code = fake.phone_code()
            if code and code != shown:
                shown = code
                print(f"phone shows verification code {code} (QR key {fake.qr_key})", flush=True)
            if len(fake.sends) != sent:
                sent = len(fake.sends)
                print(f"{sent} messages received; last to {fake.sends[-1].contact_id}", flush=True)
    finally:
        with contextlib.suppress(Exception):
            await fake.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake juzibot WorkPro puppet (gRPC) for wecast demos and tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--contacts", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--scan-after", type=float, default=5.0, help="seconds until the simulated phone scans")
    parser.add_argument("--second-verification", action="store_true", help="ask for the new-device QR once")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()

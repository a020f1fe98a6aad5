"""A fake WeCom server for tests and demos: FastAPI on loopback, `python -m engine.gateways.wecom.fake_server`.

It implements the endpoints the wecom gateway calls, with their documented behaviour
(shared/reference/wecom_api.md §8, "notes for the emulator"):

* `gettoken` issues a token valid `token_ttl` (the same one until it expires); a wrong corpid is 40013, a wrong
  secret 40001. Every other call checks `access_token`: missing 41001, unknown 40014, expired 42001.
* customers of `staff` members (`get_follow_user_list`, `list`, `get`, `batch/get_by_user` with its 100-member and
  100-a-page limits and cursors); corp tags (`get_corp_tag_list`, `add_corp_tag`, `mark_tag`).
* 群发 tasks (`add_msg_template` with its fail_list; nothing is delivered until a test confirms as the staff member
  would: `confirm`), the per-customer limit (days of the month, 7 a week or 1 a day), results
  (`get_groupmsg_list_v2`, `get_groupmsg_task`, `get_groupmsg_send_result`: 0 not sent, 1 sent, 2 not a friend,
  3 over the limit; 41063 for `dispatch_delay` after creation), `remind_groupmsg_send` (3 per 24 h, then 41094),
  `cancel_groupmsg_send`; `media/upload` (ids last 3 days); `send_welcome_msg` (the code of an
  `add_external_contact`, single-use, 20 s); `message/send` and the group robot's `webhook/send` (20 a minute).
* limits: `per_window` calls per API per `window` seconds (sliding), then 45009; more than `concurrency` calls of
  one API at once, 45033. Injected faults: `storm` (the next N calls of an API answer an errcode), `expire_tokens`,
  `fail_after_processing` (the call takes effect, then the answer is an HTTP 502: the client cannot know),
  `fail_before_processing` (the same answer, but nothing was done), and `fault` — after `skip` good answers, the
  next calls answered with an HTTP status (429, 503 … with a Retry-After; nothing done), or done and answered with
  other bytes (an HTML page, an empty or cut-off body) or with the answer changed (a list missing, a wrong type):
  what a proxy, an overloaded front end or a bad day at WeCom gives, mid-sync.
* callbacks: `add_customer` / `remove_follow` / `edit_follow` build the change_external_contact event WeCom would
  send, encrypted and signed (`callback`), and `deliver` POSTs it to wecast's callback URL.

What customers received is in `received` (one entry per message per customer), counted at the fake, never in
wecast's own log. Tests drive the fake in-process (`FakeWecomServer`); a demo drives it over HTTP (`/_fake/…`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import logging
import os
import secrets
import socket
import string
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from engine.clock import Clock, SystemClock
from engine.gateways.demo_data import demo_contacts, demo_tags
from engine.gateways.wecom.crypto import MessageCrypt

log = logging.getLogger("wecast.fake_wecom")

JSON = dict[str, Any]
SHANGHAI = ZoneInfo("Asia/Shanghai")
STAFF_NAMES = [  # pinyin userids, as WeCom admins name staff
    *("zhangwei", "lina", "wangfang", "liuyang", "chenjing", "yangmin", "zhaolei", "huangli", "zhouqiang", "wuxia"),
    *("xujie", "sunyan", "maming", "zhuting", "hulei", "guofang", "heyun", "gaoyu", "linxin", "luojun"),
]
MEDIA_TTL = 3 * 86_400.0
WELCOME_TTL = 20.0


class FakeError(Exception):
    """An errcode answer."""

    def __init__(self, errcode: int, errmsg: str, **extra: Any) -> None:
        super().__init__(errmsg)
        self.errcode = errcode
        self.errmsg = errmsg
        self.extra = extra


@dataclass
class Customer:
    external_userid: str
    name: str
    gender: int
    avatar: str
    type: int = 1
    unionid: str = ""


@dataclass
class Follow:
    userid: str
    external_userid: str
    remark: str = ""
    description: str = ""
    createtime: int = 0
    tag_ids: set[str] = field(default_factory=set)
    remark_mobiles: list[str] = field(default_factory=list)
    add_way: int = 1
    state: str = ""
    friend: bool = True  # False: the customer deleted the staff member (one-way relation, WeCom keeps it)


@dataclass
class Task:
    msgid: str
    sender: str
    recipients: list[str]
    text: str
    attachments: list[JSON]
    created_at: float  # unix time
    created_mono: float
    confirmed_at: float | None = None
    cancelled: bool = False
    status: dict[str, int] = field(default_factory=dict)  # external_userid -> 0/1/2/3
    send_time: dict[str, int] = field(default_factory=dict)
    reminders: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Received:
    """A message a customer received (from a confirmed task or a welcome)."""

    contact_id: str
    text: str
    message_id: str
    via: str  # "task" or "welcome"
    sender: str
    at: float
    attachments: tuple[str, ...] = ()  # attachment msgtypes
    attachment_media: tuple[tuple[str, int], ...] = ()  # (sha256, size) of each attachment's upload (("", 0): none)


@dataclass
class Welcome:
    code: str
    userid: str
    external_userid: str
    issued_mono: float
    used: bool = False


@dataclass
class Fault:
    """How the calls of one API go wrong (`FakeWecom.fault`): after `skip` good answers, `count` bad ones."""

    skip: int
    count: int
    status: int = 200  # not 200: answered so before anything is done
    retry_after: str | None = None
    raw: bytes | None = None  # the call is done, and these bytes are the answer
    content_type: str = "application/json"
    mutate: Callable[[JSON], JSON] | None = None  # the call is done, and its answer is changed so


class FakeWecom:
    """The fake's state and behaviour (no HTTP here: `build_app` serves it)."""

    def __init__(
        self,
        *,
        corp_id: str = "wwfake0000000001",
        secret: str = "fake-app-secret",
        callback_token: str = "faketoken",
        encoding_aes_key: str = "a" * 43,
        agent_id: int = 1000002,
        webhook_key: str = "fake-robot-key",
        customers: int = 60,
        staff: int = 3,
        shared_every: int = 7,
        seed: int = 2024,
        token_ttl: float = 7200.0,
        expired_errcode: int = 42001,
        per_window: int = 10_000,
        window: float = 60.0,
        concurrency: int = 50,
        customer_limit: str = "month",
        dispatch_delay: float = 0.0,
        latency: float = 0.0,
        clock: Clock | None = None,
    ) -> None:
        self.corp_id = corp_id
        self.secret = secret
        self.agent_id = agent_id
        self.webhook_key = webhook_key
        self.crypt = MessageCrypt(callback_token, encoding_aes_key, corp_id)
        self.clock: Clock = clock or SystemClock()
        self.token_ttl = token_ttl
        self.expired_errcode = expired_errcode
        self.per_window = per_window
        self.window = window
        self.concurrency = concurrency
        self.customer_limit = customer_limit
        self.dispatch_delay = dispatch_delay
        self.latency = latency
        self.staff: list[str] = [STAFF_NAMES[i] if i < len(STAFF_NAMES) else f"staff{i + 1:03d}" for i in range(staff)]
        self.customers: dict[str, Customer] = {}
        self.follows: dict[tuple[str, str], Follow] = {}  # (userid, external_userid) -> follow
        self.tag_groups: list[JSON] = []
        self.tasks: dict[str, Task] = {}
        self.media: dict[str, tuple[float, str, int, str]] = {}  # media_id -> (uploaded at, type, size, sha256)
        self.welcomes: dict[str, Welcome] = {}
        self.received: list[Received] = []
        self._task_receipts: dict[str, list[float]] = defaultdict(list)  # customer -> when tasks reached them
        self.staff_messages: list[tuple[str, str]] = []  # (userid, text) of message/send
        self.robot_messages: list[str] = []
        self.calls: Counter[str] = Counter()  # calls answered, per API (errors included)
        self.errors: Counter[tuple[str, int]] = Counter()  # (api, errcode) answered
        self.over_limit: Counter[str] = Counter()  # calls refused with 45009 by the fake's own limit (not storms)
        self.max_in_window: Counter[str] = Counter()  # the most calls of an API seen within one window
        self.max_concurrent: Counter[str] = Counter()
        self.tokens_issued = 0
        self._tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self._arrivals: dict[str, deque[float]] = defaultdict(deque)
        self._in_flight: Counter[str] = Counter()
        self._storms: dict[str, list[int]] = {}  # api -> errcodes to answer, next first
        self._fail_after: Counter[str] = Counter()
        self._fail_before: Counter[str] = Counter()
        self._faults: dict[str, list[Fault]] = defaultdict(list)
        self.faulted: Counter[str] = Counter()  # calls answered by an injected `fault`, per API
        self._robot_sends: deque[float] = deque()
        self._ids = itertools.count(1)
        self._index: dict[str, list[str]] | None = None
        self._index_version = -1
        self._version = 0  # bumped whenever a follow is added or removed
        # Staff without an interoperability licence: batch/get_by_user leaves their customers out and names them in
        # fail_info.unlicensed_userid_list (701008 when no listed member has one).
        self.unlicensed: set[str] = set()
        self._pairs: tuple[tuple[int, tuple[str, ...]], list[tuple[str, str]]] = ((-1, ()), [])
        self._seed = seed
        self._populate(customers, shared_every, seed)

    # -- data ------------------------------------------------------------------------------------
    def _populate(self, count: int, shared_every: int, seed: int) -> None:
        tags = [t for t in demo_tags() if t.type == 2]
        groups: dict[str, JSON] = {}
        for order, tag in enumerate(tags):
            group = groups.setdefault(
                tag.group_name,
                {
                    "group_id": "etgroup" + hashlib.md5(tag.group_name.encode()).hexdigest()[:12],
                    "group_name": tag.group_name,
                    "create_time": 1_700_000_000,
                    "order": 100 - len(groups),
                    "tag": [],
                },
            )
            group["tag"].append(
                {
                    "id": "et" + tag.id.removeprefix("tag-"),
                    "name": tag.name,
                    "create_time": 1_700_000_000,
                    "order": 100 - order,
                }
            )
        self.tag_groups = list(groups.values())
        known_tags = {t["id"] for g in self.tag_groups for t in g["tag"]}
        for i, demo in enumerate(demo_contacts(count, seed)):
            ext = self.external_id(i)
            self.customers[ext] = Customer(ext, demo.name, demo.gender, demo.avatar, unionid=f"oAmU{ext[-12:]}")
            staff = [self.staff[i % len(self.staff)]] if self.staff else []
            if shared_every and i % shared_every == 0 and len(self.staff) > 1:
                staff.append(self.staff[(i + 1) % len(self.staff)])
            for n, userid in enumerate(staff):
                tag_ids = {"et" + t.removeprefix("tag-") for t in demo.tag_ids} & known_tags
                created = int(demo.added_at.timestamp()) + n * 3600 if demo.added_at else 1_700_000_000
                self.follows[(userid, ext)] = Follow(
                    userid,
                    ext,
                    remark=demo.alias,
                    createtime=created,
                    tag_ids=tag_ids if n == 0 else set(sorted(tag_ids)[:1]),
                    remark_mobiles=list(demo.phones),
                    friend=demo.friend or n > 0,
                )

    def external_id(self, index: int) -> str:
        return "wm" + hashlib.sha256(f"{self._seed}:{index}".encode()).hexdigest()[:30]

    def customers_of(self, userid: str) -> list[str]:
        """The customers of one staff member, in the order they were added (an index, rebuilt after changes)."""
        if self._index_version != self._version or self._index is None:
            index: dict[str, list[str]] = defaultdict(list)
            for u, ext in self.follows:
                index[u].append(ext)
            self._index, self._index_version = index, self._version
        return list(self._index.get(userid, []))

    def follows_of(self, external_userid: str) -> list[Follow]:
        return [f for (_, ext), f in self.follows.items() if ext == external_userid]

    def tag_ids(self) -> set[str]:
        return {t["id"] for g in self.tag_groups for t in g["tag"]}

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):06d}{secrets.token_hex(6)}"

    def _now(self) -> float:
        return self.clock.now().timestamp()

    # -- control (what a test or a demo does to the far side) ---------------------------------------
    def confirm(self, userid: str | None = None) -> int:
        """Staff confirm their waiting tasks in WeCom (all staff, or one): the messages go out. Returns how many
        tasks were confirmed."""
        done = 0
        for task in self.tasks.values():
            if task.confirmed_at is not None or task.cancelled or (userid and task.sender != userid):
                continue
            task.confirmed_at = self._now()
            for ext in task.recipients:
                task.status[ext] = self._deliver(task, ext)
                if task.status[ext] == 1:
                    task.send_time[ext] = int(task.confirmed_at)
            done += 1
        return done

    def _deliver(self, task: Task, ext: str) -> int:
        follow = self.follows.get((task.sender, ext))
        if follow is None or not follow.friend:
            return 2
        if self._received_in_period(ext) >= self._cap():
            return 3
        kinds, media = self._seen(task.attachments)
        message_id = f"{task.msgid}:{ext}"
        self.received.append(Received(ext, task.text, message_id, "task", task.sender, self._now(), kinds, media))
        self._task_receipts[ext].append(self._now())
        return 1

    def _seen(self, attachments: list[JSON]) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
        """The kinds of a message's attachments, and the content (sha256, size) each uploaded one carried."""
        kinds, media = [], []
        for a in attachments:
            kind = str(a.get("msgtype", ""))
            payload = a.get(kind) or {}
            upload = self.media.get(str(payload.get("media_id") or payload.get("pic_media_id") or ""))
            kinds.append(kind)
            media.append((upload[3], upload[2]) if upload and kind in ("image", "file", "video") else ("", 0))
        return tuple(kinds), tuple(media)

    def _cap(self) -> int:
        if self.customer_limit == "day":
            return 1
        if self.customer_limit == "week":
            return 7
        local = self.clock.now().astimezone(SHANGHAI)
        following = (local.replace(day=28) + timedelta(days=4)).replace(day=1)
        return (following - local.replace(day=1)).days

    def _received_in_period(self, ext: str) -> int:
        local = self.clock.now().astimezone(SHANGHAI)
        if self.customer_limit == "day":
            start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        elif self.customer_limit == "week":
            start = (local - timedelta(days=local.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
        else:
            start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        since = start.timestamp()
        return sum(1 for at in self._task_receipts.get(ext, ()) if at >= since)

    def storm(self, api: str, errcode: int, count: int) -> None:
        """The next `count` calls of `api` answer `errcode` (as when another app of the corp used up the limit)."""
        self._storms.setdefault(api, []).extend([errcode] * count)

    def expire_tokens(self) -> None:
        """Every token issued so far expires now (WeCom may drop tokens early)."""
        for token in self._tokens:
            self._tokens[token] = float("-inf")

    def fail_before_processing(self, api: str, count: int = 1) -> None:
        """The next `count` calls of `api` answer an HTTP 502 without doing anything (the client cannot know)."""
        self._fail_before[api] += count

    def fail_after_processing(self, api: str, count: int = 1) -> None:
        """The next `count` calls of `api` take effect, but the answer is lost (an HTTP 502)."""
        self._fail_after[api] += count

    def fault(
        self,
        api: str,
        *,
        skip: int = 0,
        count: int = 1,
        status: int = 200,
        retry_after: str | None = None,
        raw: bytes | None = None,
        content_type: str = "application/json",
        mutate: Callable[[JSON], JSON] | None = None,
    ) -> None:
        """After `skip` good answers, the next `count` calls of `api` go wrong: with `status` (and `Retry-After`),
        refused before anything is done; else done, and answered with `raw` (as `content_type`) or with the answer
        `mutate` makes of the real one (both the whole JSON, errcode included)."""
        self._faults[api].append(Fault(skip, count, status, retry_after, raw, content_type, mutate))

    def clear_faults(self) -> None:
        """Every injected `fault` not spent yet is dropped: the next calls are answered properly."""
        self._faults.clear()

    def _fault(self, api: str) -> Fault | None:
        """The fault that answers this call of `api`, if one does (each fault counts down its skips first)."""
        faults = self._faults.get(api)
        if not faults:
            return None
        fault = faults[0]
        if fault.skip:
            fault.skip -= 1
            return None
        fault.count -= 1
        if fault.count <= 0:
            faults.pop(0)
        self.faulted[api] += 1
        return fault

    def add_customer(self, userid: str, name: str = "新客户", *, welcome: bool = True, state: str = "") -> JSON:
        """A customer adds `userid`: the customer and the follow exist, and the callback event WeCom would send is
        returned (with a WelcomeCode, valid 20 s, unless `welcome` is False)."""
        ext = self.external_id(10_000_000 + len(self.customers))
        self.customers[ext] = Customer(ext, name, 0, "")
        self.follows[(userid, ext)] = Follow(userid, ext, createtime=int(self._now()), state=state)
        self._version += 1
        fields = self._event("add_external_contact", userid, ext)
        if state:
            fields["State"] = state
        if welcome:
            code = secrets.token_urlsafe(24)
            self.welcomes[code] = Welcome(code, userid, ext, self.clock.monotonic())
            fields["WelcomeCode"] = code
        return fields

    def edit_follow(self, userid: str, ext: str, *, add_tags: Iterable[str] = ()) -> JSON:
        """Staff edit the customer in the WeCom app (here: tags): the edit_external_contact event."""
        self.follows[(userid, ext)].tag_ids.update(add_tags)
        return self._event("edit_external_contact", userid, ext)

    def remove_follow(self, userid: str, ext: str, *, by_customer: bool = False) -> JSON:
        """The staff member deletes the customer (del_external_contact) or the customer deletes the staff member
        (del_follow_user: the follow stays, one-way, and tasks to them fail with "not a friend")."""
        if by_customer:
            self.follows[(userid, ext)].friend = False
            return self._event("del_follow_user", userid, ext)
        del self.follows[(userid, ext)]
        self._version += 1
        return self._event("del_external_contact", userid, ext)

    def _event(self, change_type: str, userid: str, ext: str) -> JSON:
        return {
            "ToUserName": self.corp_id,
            "FromUserName": "sys",
            "CreateTime": str(int(self._now())),
            "MsgType": "event",
            "Event": "change_external_contact",
            "ChangeType": change_type,
            "UserID": userid,
            "ExternalUserID": ext,
        }

    def callback(
        self, fields: JSON, *, nonce: str | None = None, timestamp: str | None = None
    ) -> tuple[dict[str, str], bytes]:
        """The query and XML body WeCom would POST for an event (encrypted, signed)."""
        inner = "<xml>" + "".join(f"<{k}><![CDATA[{v}]]></{k}>" for k, v in fields.items()) + "</xml>"
        encrypted = self.crypt.encrypt(inner)
        ts = timestamp or str(int(self._now()))
        nonce = nonce or secrets.token_hex(8)
        query = {"msg_signature": self.crypt.sign(ts, nonce, encrypted), "timestamp": ts, "nonce": nonce}
        body = (
            f"<xml><ToUserName><![CDATA[{self.corp_id}]]></ToUserName><AgentID><![CDATA[{self.agent_id}]]></AgentID>"
            f"<Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>"
        ).encode()
        return query, body

    def url_check(self, echo: str = "echo-check") -> dict[str, str]:
        """The query of WeCom's GET URL check (the plaintext answer expected is `echo`)."""
        encrypted = self.crypt.encrypt(echo)
        ts = str(int(self._now()))
        nonce = secrets.token_hex(8)
        return {
            "msg_signature": self.crypt.sign(ts, nonce, encrypted),
            "timestamp": ts,
            "nonce": nonce,
            "echostr": encrypted,
        }

    async def deliver(self, url: str, fields: JSON) -> httpx.Response:
        """POST an event to wecast's callback URL, as WeCom does."""
        query, body = self.callback(fields)
        async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
            return await http.post(url, params=query, content=body, headers={"Content-Type": "text/xml"})

    # -- the API ------------------------------------------------------------------------------------
    async def handle(self, api: str, query: dict[str, str], body: JSON, upload: tuple[str, bytes] | None) -> Response:
        """Answer one call of `api` (the path after /cgi-bin/)."""
        self.calls[api] += 1
        self._in_flight[api] += 1
        self.max_concurrent[api] = max(self.max_concurrent[api], self._in_flight[api])
        try:
            if self._in_flight[api] > self.concurrency:
                raise FakeError(45033, "api concurrent out of limit")
            if self.latency:
                await asyncio.sleep(self.latency)
            if self._fail_before[api]:
                self._fail_before[api] -= 1
                return PlainTextResponse("bad gateway", status_code=502)
            fault = self._fault(api)
            if fault is not None and fault.status != 200:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
                page = fault.raw if fault.raw is not None else f"<html><body>{fault.status}</body></html>".encode()
                return Response(page, status_code=fault.status, headers=headers, media_type=fault.content_type)
            if api != "webhook/send":
                self._limit(api)
            storm = self._storms.get(api)
            if storm:
                code = storm.pop(0)
                raise FakeError(code, {45009: "api freq out of limit", -1: "system busy"}.get(code, "injected"))
            if api == "gettoken":
                data = self._gettoken(query)
            elif api == "webhook/send":
                data = self._webhook(query, body)
            else:
                self._check_token(query)
                handler = HANDLERS.get(api)
                if handler is None:
                    raise FakeError(404, f"the fake does not implement {api}")
                data = handler(self, query, body, upload)
            if self._fail_after[api]:
                self._fail_after[api] -= 1
                return PlainTextResponse("bad gateway", status_code=502)
            answer: JSON = {"errcode": 0, "errmsg": "ok", **data}
            if fault is not None and fault.raw is not None:
                return Response(fault.raw, media_type=fault.content_type)
            if fault is not None and fault.mutate is not None:
                return JSONResponse(fault.mutate(answer))
            return JSONResponse(answer)
        except FakeError as exc:
            self.errors[(api, exc.errcode)] += 1
            errmsg = f"{exc.errmsg}, hint: [{secrets.token_hex(4)}], from ip: 127.0.0.1, more info at https://open.work.weixin.qq.com/devtool/query?e={exc.errcode}"
            return JSONResponse({"errcode": exc.errcode, "errmsg": errmsg, **exc.extra})
        finally:
            self._in_flight[api] -= 1

    def _limit(self, api: str) -> None:
        now = self.clock.monotonic()
        arrivals = self._arrivals[api]
        while arrivals and arrivals[0] <= now - self.window:
            arrivals.popleft()
        if len(arrivals) >= self.per_window:
            self.over_limit[api] += 1
            raise FakeError(45009, "api freq out of limit")
        arrivals.append(now)
        self.max_in_window[api] = max(self.max_in_window[api], len(arrivals))

    def _gettoken(self, query: dict[str, str]) -> JSON:
        if query.get("corpid") != self.corp_id:
            raise FakeError(40013, "invalid corpid")
        if query.get("corpsecret") != self.secret:
            raise FakeError(40001, "invalid credential")
        now = self.clock.monotonic()
        for token, until in self._tokens.items():
            if until > now:
                return {"access_token": token, "expires_in": int(until - now)}
        token = "".join(secrets.choice(string.ascii_letters + string.digits + "-_") for _ in range(64))
        self._tokens[token] = now + self.token_ttl
        self.tokens_issued += 1
        return {"access_token": token, "expires_in": int(self.token_ttl)}

    def _check_token(self, query: dict[str, str]) -> None:
        token = query.get("access_token", "")
        if not token:
            raise FakeError(41001, "access_token missing")
        if token not in self._tokens:
            raise FakeError(40014, "invalid access_token")
        if self._tokens[token] <= self.clock.monotonic():
            raise FakeError(self.expired_errcode, "access_token expired")

    def _webhook(self, query: dict[str, str], body: JSON) -> JSON:
        if query.get("key") != self.webhook_key:
            raise FakeError(93000, "invalid webhook url")
        now = self.clock.monotonic()
        while self._robot_sends and self._robot_sends[0] <= now - 60:
            self._robot_sends.popleft()
        if len(self._robot_sends) >= 20:
            raise FakeError(45009, "api freq out of limit")
        self._robot_sends.append(now)
        kind = body.get("msgtype")
        self.robot_messages.append(str((body.get(kind) or {}).get("content", "")) if isinstance(kind, str) else "")
        return {}

    # customers --------------------------------------------------------------------------------------
    def _follow_user_list(self, query: dict[str, str], body: JSON, upload: Any) -> JSON:
        return {"follow_user": list(self.staff)}

    def _list(self, query: dict[str, str], body: JSON, upload: Any) -> JSON:
        userid = query.get("userid", "")
        if userid not in self.staff:
            raise FakeError(40003, "invalid userid", external_userid=[])
        return {"external_userid": self.customers_of(userid)}

    def _contact(self, c: Customer) -> JSON:
        return {
            "external_userid": c.external_userid,
            "name": c.name,
            "avatar": c.avatar,
            "type": c.type,
            "gender": c.gender,
            "unionid": c.unionid,
        }

    def _get(self, query: dict[str, str], body: JSON, upload: Any) -> JSON:
        ext = query.get("external_userid", "")
        customer = self.customers.get(ext)
        follows = self.follows_of(ext)
        if customer is None:
            raise FakeError(40096, "invalid external userid", external_contact={}, follow_user=[])
        if not follows:
            raise FakeError(84061, "not external contact", external_contact={}, follow_user=[])
        names = {t["id"]: (g["group_name"], t["name"]) for g in self.tag_groups for t in g["tag"]}
        return {
            "external_contact": self._contact(customer),
            "follow_user": [
                {
                    "userid": f.userid,
                    "remark": f.remark,
                    "description": f.description,
                    "createtime": f.createtime,
                    "tags": [
                        {"group_name": names[t][0], "tag_name": names[t][1], "tag_id": t, "type": 1}
                        for t in sorted(f.tag_ids)
                        if t in names
                    ],
                    "remark_mobiles": f.remark_mobiles,
                    "add_way": f.add_way,
                    "state": f.state,
                    "oper_userid": f.external_userid,
                }
                for f in follows
            ],
        }

    def _batch_get_by_user(self, query: dict[str, str], body: JSON, upload: Any) -> JSON:
        users = body.get("userid_list")
        if not isinstance(users, list) or not users:
            raise FakeError(40058, "userid_list missing", external_contact_list=[])
        if len(users) > 100:
            raise FakeError(40058, "userid_list exceed max length 100", external_contact_list=[])
        limit = body.get("limit") or 50
        limit = min(int(limit), 100)
        cursor = str(body.get("cursor") or "")
        start = int(cursor) if cursor.isdigit() else 0
        unlicensed = [str(u) for u in users if str(u) in self.unlicensed]
        if len(unlicensed) == len(users):
            raise FakeError(701008, "没有合法的有互通license的用户", external_contact_list=[])
        users = [u for u in users if str(u) not in self.unlicensed]
        key = (self._version, tuple(str(u) for u in users))
        if self._pairs[0] != key:  # the same userid_list pages on: list its pairs once
            self._pairs = (key, [(u, ext) for u in key[1] for ext in self.customers_of(u)])
        pairs = self._pairs[1]
        page = pairs[start : start + limit]
        items = []
        for userid, ext in page:
            f = self.follows[(userid, ext)]
            items.append(
                {
                    "external_contact": self._contact(self.customers[ext]),
                    "follow_info": {
                        "userid": f.userid,
                        "remark": f.remark,
                        "description": f.description,
                        "createtime": f.createtime,
                        "tag_id": sorted(f.tag_ids),
                        "remark_mobiles": f.remark_mobiles,
                        "oper_userid": f.external_userid,
                        "add_way": f.add_way,
                        "state": f.state,
                    },
                }
            )
        end = start + limit
        answer: JSON = {"external_contact_list": items, "next_cursor": str(end) if end < len(pairs) else ""}
        if unlicensed:
            answer["fail_info"] = {"unlicensed_userid_list": unlicensed}
        return answer

    # tags ------------------------------------------------------------------------------------------------
    def _get_corp_tag_list(self, query: dict[str, str], body: JSON, upload: Any) -> JSON:
        return {"tag_group": json.loads(json.dumps(self.tag_groups))}

    def _add_corp_tag(self, query: dict[str, str], body: JSON, upload: Any) -> JSON:
        names = [str(t.get("name", "")) for t in body.get("tag") or []]
        if not names or any(not n or len(n) > 30 for n in names):
            raise FakeError(40058, "invalid tag name")
        group = next(
            (
                g
                for g in self.tag_groups
                if g["group_id"] == body.get("group_id")
                or (not body.get("group_id") and g["group_name"] == body.get("group_name"))
            ),
            None,
        )
        if group is None:
            if body.get("group_id"):
                raise FakeError(40068, "invalid tag group id")
            group = {
                "group_id": self._new_id("etgroup"),
                "group_name": body.get("group_name") or "未分组",
                "create_time": int(self._now()),
                "order": 0,
                "tag": [],
            }
            self.tag_groups.append(group)
        created = []
        for name in names:
            existing = next((t for t in group["tag"] if t["name"] == name), None)
            tag = existing or {"id": self._new_id("et"), "name": name, "create_time": int(self._now()), "order": 0}
            if existing is None:
                group["tag"].append(tag)
            created.append(tag)
        return {"tag_group": {**{k: v for k, v in group.items() if k != "tag"}, "tag": created}}

    def _mark_tag(self, query: dict[str, str], body: JSON, upload: Any) -> JSON:
        add, remove = list(body.get("add_tag") or []), list(body.get("remove_tag") or [])
        if not add and not remove:
            raise FakeError(40058, "add_tag and remove_tag are both empty")
        follow = self.follows.get((str(body.get("userid")), str(body.get("external_userid"))))
        if follow is None:
            raise FakeError(84061, "not external contact")
        known = self.tag_ids()
        if any(t not in known for t in add + remove):
            raise FakeError(40068, "invalid tagid")
        follow.tag_ids.update(add)
        follow.tag_ids.difference_update(remove)
        return {}

    # 群发 tasks -------------------------------------------------------------------------------------------
    def _check_content(self, body: JSON) -> tuple[str, list[JSON]]:
        text = str((body.get("text") or {}).get("content") or "")
        if len(text.encode()) > 4000:
            raise FakeError(40058, "text.content exceed max length 4000")
        attachments = list(body.get("attachments") or [])
        if len(attachments) > 9:
            raise FakeError(41064, "attachments exceed limit")
        now = self._now()
        for a in attachments:
            kind = a.get("msgtype")
            if kind not in ("image", "link", "miniprogram", "video", "file") or not isinstance(a.get(kind), dict):
                raise FakeError(41065, "invalid attachments msgtype")
            payload = a[kind]
            media = payload.get("media_id") or payload.get("pic_media_id")
            if kind in ("image", "video", "file", "miniprogram") and not (media or payload.get("pic_url")):
                raise FakeError(40058, f"{kind} media missing")
            if media and (media not in self.media or self.media[media][0] + MEDIA_TTL < now):
                raise FakeError(40007, "invalid media_id")
            if kind == "link" and not (payload.get("title") and payload.get("url")):
                raise FakeError(40058, "link title and url are required")
            if kind == "miniprogram" and not all(payload.get(k) for k in ("title", "appid", "page")):
                raise FakeError(40058, "miniprogram title, appid and page are required")
        if not text and not attachments:
            raise FakeError(44004, "empty content")
        return text, attachments

    def _add_msg_template(self, query: dict[str, str], body: JSON, upload: Any) -> JSON:
        if body.get("chat_type", "single") != "single":
            raise FakeError(40058, "the fake implements chat_type single only")
        ids = [str(x) for x in body.get("external_userid") or []]
        sender = str(body.get("sender") or "")
        if len(ids) > 10_000:
            raise FakeError(40058, "external_userid exceed max length 10000", fail_list=[], msgid="")
        if not sender or sender not in self.staff:
            raise FakeError(40003, "invalid sender userid", fail_list=[])
        text, attachments = self._check_content(body)
        accepted = [e for e in dict.fromkeys(ids) if (sender, e) in self.follows]
        fail_list = [e for e in ids if e not in accepted]
        if not accepted:
            raise FakeError(41048, "no valid external userid to send", fail_list=fail_list)
        msgid = self._new_id("msg")
        self.tasks[msgid] = Task(
            msgid,
            sender,
            accepted,
            text,
            attachments,
            self._now(),
            self.clock.monotonic(),
            status=dict.fromkeys(accepted, 0),
        )
        return {"msgid": msgid, "fail_list": fail_list}

    def _task(self, body: JSON) -> Task:
        msgid = str(body.get("msgid") or "")
        if not msgid:
            raise FakeError(41046, "msgid missing")
        task = self.tasks.get(msgid)
        if task is None:
            raise FakeError(41047, "invalid msgid")
        return task

    def _dispatching(self, task: Task) -> None:
        if self.clock.monotonic() - task.created_mono < self.dispatch_delay:
            raise FakeError(41063, "group msg is dispatching, please retry later")

    def _groupmsg_list(self, query: dict[str, str], body: JSON, upload: Any) -> JSON:
        start, end = int(body.get("start_time") or 0), int(body.get("end_time") or 0)
        if end < start or end - start > 31 * 86_400:
            raise FakeError(40058, "invalid time range (at most one month)")
        if body.get("filter_type", 2) == 1:  # member-created: the fake has none
            return {"group_msg_list": [], "next_cursor": ""}
        tasks = [t for t in self.tasks.values() if start <= t.created_at <= end]
        limit = int(body.get("limit") or 50)
        limit = 50 if limit > 100 else limit
        offset = int(body.get("cursor") or 0) if str(body.get("cursor") or "").isdigit() else 0
        page = tasks[offset : offset + limit]
        return {
            "group_msg_list": [
                {
                    "msgid": t.msgid,
                    "create_time": str(int(t.created_at)),
                    "create_type": 0,
                    "text": {"content": t.text},
                    "attachments": t.attachments,
                }
                for t in page
            ],
            "next_cursor": str(offset + limit) if offset + limit < len(tasks) else "",
        }

    def _groupmsg_task(self, query: dict[str, str], body: JSON, upload: Any) -> JSON:
        task = self._task(body)
        self._dispatching(task)
        entry: JSON = {"userid": task.sender, "status": 2 if task.confirmed_at else 0}
        if task.confirmed_at:
            entry["send_time"] = int(task.confirmed_at)
        return {"task_list": [entry], "next_cursor": ""}

    def _groupmsg_send_result(self, query: dict[str, str], body: JSON, upload: Any) -> JSON:
        task = self._task(body)
        self._dispatching(task)
        if str(body.get("userid") or "") != task.sender:
            return {"send_list": [], "next_cursor": ""}
        limit = min(int(body.get("limit") or 500), 1000)
        offset = int(body.get("cursor") or 0) if str(body.get("cursor") or "").isdigit() else 0
        page = task.recipients[offset : offset + limit]
        items = []
        for ext in page:
            item: JSON = {"external_userid": ext, "userid": task.sender, "status": task.status.get(ext, 0)}
            if ext in task.send_time:
                item["send_time"] = task.send_time[ext]
            items.append(item)
        return {"send_list": items, "next_cursor": str(offset + limit) if offset + limit < len(task.recipients) else ""}

    def _remind(self, query: dict[str, str], body: JSON, upload: Any) -> JSON:
        task = self._task(body)
        if task.cancelled:
            raise FakeError(41093, "group msg is cancelled")
        now = self.clock.monotonic()
        task.reminders = [t for t in task.reminders if t > now - 86_400]
        if len(task.reminders) >= 3:
            raise FakeError(41094, "remind group msg exceed limit")
        task.reminders.append(now)
        return {}

    def _cancel(self, query: dict[str, str], body: JSON, upload: Any) -> JSON:
        task = self._task(body)
        if task.cancelled:
            raise FakeError(41093, "group msg is cancelled")
        task.cancelled = True
        return {}

    # welcome, media, internal messages -----------------------------------------------------------------
    def _welcome(self, query: dict[str, str], body: JSON, upload: Any) -> JSON:
        code = str(body.get("welcome_code") or "")
        if not code:
            raise FakeError(41049, "welcome_code missing")
        welcome = self.welcomes.get(code)
        if welcome is None or self.clock.monotonic() - welcome.issued_mono > WELCOME_TTL:
            raise FakeError(41050, "invalid welcome_code")
        if welcome.used:
            raise FakeError(41051, "externaluser has started chatting")
        text, attachments = self._check_content(body)
        welcome.used = True
        kinds, media = self._seen(attachments)
        message_id = f"welcome:{code[:8]}"
        self.received.append(
            Received(welcome.external_userid, text, message_id, "welcome", welcome.userid, self._now(), kinds, media)
        )
        return {}

    def _upload(self, query: dict[str, str], body: JSON, upload: tuple[str, bytes] | None) -> JSON:
        kind = query.get("type", "")
        if kind not in ("image", "voice", "video", "file"):
            raise FakeError(40004, "invalid media type")
        if upload is None or not upload[1]:
            raise FakeError(40058, "media missing")
        size = len(upload[1])
        if size > {"image": 10, "voice": 2, "video": 10, "file": 20}[kind] * 1024 * 1024:
            raise FakeError(40006, "invalid file size")
        media_id = self._new_id("3a")
        self.media[media_id] = (self._now(), kind, size, hashlib.sha256(upload[1]).hexdigest())
        return {"type": kind, "media_id": media_id, "created_at": str(int(self._now()))}

    def _message_send(self, query: dict[str, str], body: JSON, upload: Any) -> JSON:
        if body.get("agentid") != self.agent_id:
            raise FakeError(301002, "not allow to access from your ip / agent")
        users = [u for u in str(body.get("touser") or "").split("|") if u]
        valid = [u for u in users if u in self.staff]
        invalid = [u for u in users if u not in self.staff]
        if not valid:
            raise FakeError(81013, "user & party & tag all invalid")
        content = str((body.get("text") or body.get("markdown") or {}).get("content") or "")
        if not content:
            raise FakeError(44004, "empty content")
        self.staff_messages.extend((u, content) for u in valid)
        return {"invaliduser": "|".join(invalid), "msgid": self._new_id("app")}


HANDLERS = {
    "externalcontact/get_follow_user_list": FakeWecom._follow_user_list,
    "externalcontact/list": FakeWecom._list,
    "externalcontact/get": FakeWecom._get,
    "externalcontact/batch/get_by_user": FakeWecom._batch_get_by_user,
    "externalcontact/get_corp_tag_list": FakeWecom._get_corp_tag_list,
    "externalcontact/add_corp_tag": FakeWecom._add_corp_tag,
    "externalcontact/mark_tag": FakeWecom._mark_tag,
    "externalcontact/add_msg_template": FakeWecom._add_msg_template,
    "externalcontact/get_groupmsg_list_v2": FakeWecom._groupmsg_list,
    "externalcontact/get_groupmsg_task": FakeWecom._groupmsg_task,
    "externalcontact/get_groupmsg_send_result": FakeWecom._groupmsg_send_result,
    "externalcontact/remind_groupmsg_send": FakeWecom._remind,
    "externalcontact/cancel_groupmsg_send": FakeWecom._cancel,
    "externalcontact/send_welcome_msg": FakeWecom._welcome,
    "media/upload": FakeWecom._upload,
    "message/send": FakeWecom._message_send,
}


def multipart_file(content_type: str, body: bytes, field_name: str) -> tuple[str, bytes] | None:
    """(filename, content) of one file field of a multipart/form-data body (the stdlib's MIME parser: the fake
    needs no form library)."""
    message = BytesParser(policy=policy.HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    for part in message.iter_parts() if message.is_multipart() else ():
        if part.get_param("name", header="content-disposition") == field_name:
            payload = part.get_payload(decode=True)
            return part.get_filename() or "", payload if isinstance(payload, bytes) else b""
    return None


def build_app(fake: FakeWecom) -> FastAPI:
    """The HTTP face of a FakeWecom: `/cgi-bin/{api}` as WeCom, `/_fake/…` to act as staff and customers."""
    app = FastAPI(title="fake WeCom", docs_url=None, redoc_url=None, openapi_url=None)

    @app.api_route("/cgi-bin/{api:path}", methods=["GET", "POST"])
    async def cgi(api: str, request: Request) -> Response:
        query = dict(request.query_params)
        body: JSON = {}
        upload: tuple[str, bytes] | None = None
        if request.method == "POST":
            content_type = request.headers.get("content-type", "")
            if content_type.startswith("multipart/form-data"):
                upload = multipart_file(content_type, await request.body(), "media")
            else:
                raw = await request.body()
                try:
                    parsed = json.loads(raw or b"{}")
                except ValueError:
                    return JSONResponse({"errcode": 40058, "errmsg": "Warning: wrong json format."})
                body = parsed if isinstance(parsed, dict) else {}
        return await fake.handle(api, query, body, upload)

    @app.post("/_fake/confirm")
    async def confirm(userid: str | None = None) -> JSON:
        return {"confirmed": fake.confirm(userid)}

    @app.post("/_fake/expire_tokens")
    async def expire() -> JSON:
        fake.expire_tokens()
        return {"ok": True}

    @app.post("/_fake/storm")
    async def storm(api: str, errcode: int = 45009, count: int = 10) -> JSON:
        fake.storm(api, errcode, count)
        return {"ok": True}

    @app.post("/_fake/customers")
    async def add_customer(userid: str, name: str = "新客户", callback_url: str | None = None) -> JSON:
        fields = fake.add_customer(userid, name)
        delivered = None
        if callback_url:
            response = await fake.deliver(callback_url, fields)
            delivered = response.status_code
        return {"external_userid": fields["ExternalUserID"], "callback_status": delivered}

    @app.get("/_fake/received")
    async def received(contact_id: str | None = None) -> list[JSON]:
        return [r.__dict__ for r in fake.received if contact_id is None or r.contact_id == contact_id]

    @app.get("/_fake/stats")
    async def stats() -> JSON:
        return {
            "calls": dict(fake.calls),
            "tasks": len(fake.tasks),
            "received": len(fake.received),
            "tokens_issued": fake.tokens_issued,
            "over_limit": dict(fake.over_limit),
        }

    return app


class FakeWecomServer:
    """A FakeWecom served on 127.0.0.1 inside the running event loop (tests): `await server.start()`."""

    def __init__(self, fake: FakeWecom) -> None:
        self.fake = fake
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> str:
        sock = self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Accepted connections inherit it: without it every answer waits ~40 ms for a delayed ACK (Nagle).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(build_app(self.fake), log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        return self.url

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        if self._socket is not None:
            self._socket.close()
        self._server = None
        self._task = None
        self._socket = None


def _credentials(env_file: Path) -> dict[str, str]:
    """The demo's credentials: from the environment (WECAST_WECOM_*), else generated and written to `env_file`
    (mode 600) for wecast to read — never printed."""
    names = {
        "corp_id": "WECAST_WECOM_CORP_ID",
        "secret": "WECAST_WECOM_SECRET",
        "callback_token": "WECAST_WECOM_CALLBACK_TOKEN",
        "encoding_aes_key": "WECAST_WECOM_AES_KEY",
        "webhook_key": "WECAST_WECOM_WEBHOOK_KEY",
    }
    alphabet = string.ascii_letters + string.digits
    generated = {
        "corp_id": "ww" + secrets.token_hex(8),
        "secret": secrets.token_urlsafe(32),
        "callback_token": secrets.token_urlsafe(16),
        "encoding_aes_key": "".join(secrets.choice(alphabet) for _ in range(43)),
        "webhook_key": secrets.token_hex(16),
    }
    values = {key: os.environ.get(env) or generated[key] for key, env in names.items()}
    env_file.parent.mkdir(parents=True, exist_ok=True)
    env_file.touch(mode=0o600)
    env_file.write_text("".join(f"{names[k]}={v}\n" for k, v in values.items()), encoding="utf-8")
    return values


def main(argv: list[str] | None = None) -> None:
    """Serve a fake WeCom for a demo (see docs/wecom.md)."""
    parser = argparse.ArgumentParser(prog="python -m engine.gateways.wecom.fake_server", description=main.__doc__)
    parser.add_argument("--port", type=int, default=9899)
    parser.add_argument("--customers", type=int, default=200)
    parser.add_argument("--staff", type=int, default=5)
    parser.add_argument("--env-file", type=Path, default=Path("data/fake_wecom.env"))
    args = parser.parse_args(argv)
    creds = _credentials(args.env_file)
    fake = FakeWecom(
        customers=args.customers,
        staff=args.staff,
        corp_id=creds["corp_id"],
        secret=creds["secret"],
        callback_token=creds["callback_token"],
        encoding_aes_key=creds["encoding_aes_key"],
        webhook_key=creds["webhook_key"],
    )
    print(
        f"fake WeCom on http://127.0.0.1:{args.port} with {args.customers} customers of {len(fake.staff)} staff "
        f"({', '.join(fake.staff)})"
    )
    print(f"credentials for wecast: {args.env_file} (load it with: set -a; . {args.env_file}; set +a)")
    uvicorn.run(build_app(fake), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":  # pragma: no cover
    main()

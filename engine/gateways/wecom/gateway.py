"""The `wecom` gateway: WeCom's official server API — customers, tags, 群发 tasks, welcome messages, callbacks.

* **Login** is by credentials, not by QR (`capabilities.qr_login` is False): `start` and `start_login` fetch an
  access token with the corpid and secret; logged in means WeCom accepted them. `logout` drops the token and
  holds every call until `start_login`.
* **Customers** (`list_contacts`): the first page fetches the whole list — `get_follow_user_list` (or
  `wecom.staff`), then `batch/get_by_user` for 100 staff members at a time, 100 customers a page — into a snapshot
  in the state file, then hands it out one customer per contact, with every staff member who follows them
  (`customers.merge`). `get_contact` is `externalcontact/get`.
* **Tags**: `get_corp_tag_list`; `add_contact_tags` / `remove_contact_tags` call `mark_tag` once per staff member
  who follows the customer (WeCom tags a (staff, customer) pair); `create_tag` is `add_corp_tag`.
* **Sending** is by 群发 task only (`direct_send` False): `submit_batch` is one `add_msg_template` for one staff
  member's customers; nothing goes out until that member confirms in WeCom. `batch_results` reads
  `get_groupmsg_task` and `get_groupmsg_send_result` (0 not sent yet, 1 sent, 2 not a friend, 3 over WeCom's
  per-customer limit). `remind_batch` / `cancel_batch`. Images, files and mini-program covers are uploaded once
  (`media/upload`, ids cached by content hash in the state file and uploaded again before their 3 days end).
* **Nothing submitted twice.** `add_msg_template` has no idempotency key, so the gateway keeps a ledger (`store`):
  an attempt is recorded before the call and its msgid after; a key that already has a msgid is answered from the
  ledger; an attempt that got no answer (a timeout, a crash) is looked for among WeCom's recent corp tasks —
  same content, same sender, recipients among ours, not claimed by another key — before anything is submitted
  again (`_find_task`). So `idempotent_sends` holds for tasks, and a crashed run resubmits safely.
* **Welcome** (`send_welcome`): `send_welcome_msg` with the `WelcomeCode` of an `add_external_contact` callback,
  which is single-use and valid 20 s: a code is never sent twice from this process, and one older than the window is
  refused without a call.
* **Callbacks** (`verify_callback_url`, `receive_callback`): checked and decrypted by `callbacks.CallbackReceiver`,
  answered at once; the event is emitted on the next loop turn: add_external_contact / add_half_external_contact
  -> CONTACT_ADDED (with `welcome_code`), edit_external_contact -> CONTACT_CHANGED, del_external_contact /
  del_follow_user -> CONTACT_REMOVED.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from engine.clock import Clock
from engine.errors import (
    GatewayError,
    LoginError,
    NotLoggedInError,
    PermanentError,
    TransientError,
    UnknownOutcomeError,
)
from engine.gateways.base import (
    BatchOutcome,
    BatchReceipt,
    BatchResult,
    Capabilities,
    ContactPage,
    ContactRecord,
    EventKind,
    Gateway,
    LoginState,
    LoginStatus,
    SendReceipt,
    TagRecord,
    UnreadStaff,
)
from engine.gateways.fetch import fetch_public
from engine.gateways.media_cache import read_media
from engine.gateways.wecom import customers
from engine.gateways.wecom.callbacks import CallbackEvent, CallbackReceiver
from engine.gateways.wecom.client import WecomClient, waiting_at_most
from engine.gateways.wecom.crypto import CallbackError, MessageCrypt
from engine.gateways.wecom.errors import WecomPermanentError
from engine.gateways.wecom.store import TaskRow, WecomStore
from engine.i18n import tr
from engine.messages import (
    FILE_MAX_BYTES,
    IMAGE_MAX_BYTES,
    FilePart,
    ImagePart,
    LinkPart,
    Media,
    Message,
    MiniProgramPart,
    PartKind,
    TextPart,
)
from engine.settings import WecomSettings

log = logging.getLogger("wecast.wecom")

JSON = dict[str, Any]
MAX_TASK_RECIPIENTS = 10_000  # add_msg_template: external_userid ≤ 10,000
TEXT_MAX_BYTES = 4000  # add_msg_template: text.content ≤ 4000 bytes
MAX_ATTACHMENTS = 9
STAFF_PER_CALL = 100  # batch/get_by_user: userid_list ≤ 100
CUSTOMERS_PER_CALL = 100  # batch/get_by_user: limit ≤ 100
RESULTS_PER_CALL = 1000  # get_groupmsg_task / get_groupmsg_send_result: limit ≤ 1000
WELCOME_WINDOW = 20.0  # seconds a WelcomeCode is valid
TASK_SEARCH_SLACK = 300  # seconds before an attempt's start that a task lookup also searches (clock skew)
SNAPSHOT_STALE = 86_400.0  # an abandoned contact sync snapshot is dropped after a day
# Seconds of retry waits one send (submit_batch, send_welcome) may spend inside the gateway: well inside the
# dispatcher's send_timeout (30 s by default), past which a send is recorded unknown. Longer waits (a 45009 minute)
# go to the dispatcher as the error's retry_after, and it reschedules the deliveries (client.waiting_at_most).
SEND_WAIT_BUDGET = 5.0
UNLICENSED = "unlicensed"  # ContactPage.unread_staff reason: the member has no interoperability licence
SEND_STATUS = {
    0: (BatchOutcome.PENDING, "", ""),
    1: (BatchOutcome.SENT, "", ""),
    2: (BatchOutcome.FAILED, "not_friend", "not sent: the customer is no longer a contact of the staff member"),
    3: (
        BatchOutcome.FAILED,
        "customer_limit",
        "not sent: the customer already received WeCom's maximum of 群发 messages for the period",
    ),
}
CALLBACK_KINDS = {
    "add_external_contact": EventKind.CONTACT_ADDED,
    "add_half_external_contact": EventKind.CONTACT_ADDED,
    "edit_external_contact": EventKind.CONTACT_CHANGED,
    "del_external_contact": EventKind.CONTACT_REMOVED,
    "del_follow_user": EventKind.CONTACT_REMOVED,
}


@dataclass(frozen=True)
class _Cursor:
    sync: str
    after: str

    def __str__(self) -> str:
        return f"{self.sync}:{self.after}"

    @classmethod
    def parse(cls, cursor: str) -> _Cursor:
        sync, sep, after = cursor.partition(":")
        if not sep or not sync:
            raise PermanentError(f"invalid contact page cursor {cursor!r}")
        return cls(sync, after)


class WecomGateway(Gateway):
    """The official WeCom server API. See the module docstring."""

    name: ClassVar[str] = "wecom"
    # Class-level, so validation knows them without building the gateway (registry.gateway_capabilities).
    capabilities = Capabilities(
        direct_send=False,
        batch_send=True,
        idempotent_sends=True,
        max_batch=MAX_TASK_RECIPIENTS,
        supports=frozenset(PartKind),
        tags=True,
        welcome=True,
        events=True,
        qr_login=False,
    )

    def __init__(
        self,
        settings: WecomSettings,
        clock: Clock | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(clock)
        self.settings = settings
        self.client = WecomClient(settings, self.clock, transport=transport, rng=rng)
        self._store: WecomStore | None = None
        self._logged_in = False
        self._login_message = "not logged in yet: start_login fetches an access token with the corp id and secret"
        self._unread: dict[str, tuple[UnreadStaff, ...]] = {}  # snapshot -> staff whose customers it could not read
        self._receiver: CallbackReceiver | None = None
        self._welcome_codes: dict[str, float] = {}  # WelcomeCode -> monotonic time its callback came
        self._welcome_used: set[str] = set()
        self._media_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._pending: set[asyncio.Future[None]] = set()
        self.send_wait_budget = SEND_WAIT_BUDGET  # a test on the real clock sets it under its short send_timeout

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def store(self) -> WecomStore:
        if self._store is None:
            self._store = WecomStore(self.settings.state_file)
        return self._store

    async def start(self) -> None:
        """Open the state file and log in with the configured credentials (a refusal is reported, not raised)."""
        await asyncio.to_thread(lambda: self.store)
        await self.start_login()

    async def close(self) -> None:
        await self.client.close()
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- login (by credentials) ----------------------------------------------------------------------
    async def login_status(self) -> LoginStatus:
        if self._logged_in:
            return LoginStatus(
                LoginState.LOGGED_IN,
                account_id="wecom",
                account_name="企业微信 (official API)",
                message="logged in: WeCom accepted the app's credentials",
            )
        return LoginStatus(LoginState.LOGGED_OUT, message=self._login_message)

    async def start_login(self) -> LoginStatus:
        """Fetch an access token: logged in at once, or logged out with the reason (wrong secret, no network…)."""
        self.client.reset()
        try:
            await self.client.token()
        except GatewayError as exc:
            was = self._logged_in
            self._logged_in = False
            self._login_message = f"not logged in: {exc}"
            if was:
                self.emit(EventKind.LOGOUT, str(exc))
            log.warning("wecom: %s", self._login_message)
            return await self.login_status()
        if not self._logged_in:
            self._logged_in = True
            self.emit(EventKind.LOGIN, "WeCom accepted the app's credentials", account_id="wecom")
            self.emit(EventKind.READY)
        return await self.login_status()

    async def submit_verify_code(self, code: str, qrcode_key: str | None = None) -> LoginStatus:
        raise LoginError(tr("the wecom gateway logs in with the app's credentials: there is no verification code"))

    async def logout(self) -> LoginStatus:
        """Drop the token; nothing is called until start_login."""
        self.client.reset()
        if self._logged_in:
            self._logged_in = False
            self._login_message = "logged out: start_login logs in again with the configured credentials"
            self.emit(EventKind.LOGOUT, "logged out")
        return await self.login_status()

    def _require_login(self) -> None:
        if not self._logged_in:
            raise NotLoggedInError(f"the wecom gateway is {self._login_message}")

    # -- customers -------------------------------------------------------------------------------
    async def staff(self) -> list[str]:
        """The staff members whose customers are synced and messaged."""
        if self.settings.staff:
            return list(self.settings.staff)
        api = "externalcontact/get_follow_user_list"
        return customers.id_list(api, await self.client.get(api), "follow_user")

    async def list_contacts(self, cursor: str | None = None, page_size: int = 500) -> ContactPage:
        self._require_login()
        position = _Cursor(await self._snapshot(), "") if cursor is None else _Cursor.parse(cursor)
        total = await asyncio.to_thread(self.store.sync_total, position.sync)
        if total is None:
            raise PermanentError("this contact sync's snapshot is gone (older than a day?): start the sync again")
        size = max(1, page_size)
        page = await asyncio.to_thread(self.store.customers, position.sync, position.after, size + 1)
        records = [customers.merge(contact_of(pairs), [f for _, f in pairs]) for _, pairs in page[:size]]
        unread = self._unread.get(position.sync, ())
        if len(page) <= size:
            await asyncio.to_thread(self.store.end_sync, position.sync)
            self._unread.pop(position.sync, None)
            return ContactPage(records, None, total=total, unread_staff=unread)
        cursor = str(_Cursor(position.sync, page[size - 1][0]))
        return ContactPage(records, cursor, total=total, unread_staff=unread)

    async def _snapshot(self) -> str:
        """Fetch every (customer, staff member) pair into a new snapshot; returns its id. An answer that is not what
        the API returns fails the whole snapshot (dropped: nothing of it is handed out)."""
        sync = uuid.uuid4().hex
        now = self.clock.now().timestamp()
        await asyncio.to_thread(self.store.start_sync, sync, now, now - SNAPSHOT_STALE)
        unread: dict[str, str] = {}
        try:
            staff = await self.staff()
            for start in range(0, len(staff), STAFF_PER_CALL):
                await self._fetch_follows(sync, staff[start : start + STAFF_PER_CALL], unread)
            total = await asyncio.to_thread(self.store.seal_sync, sync)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.to_thread(self.store.end_sync, sync))
            raise
        log.info("wecom: %d customers of %d staff members fetched", total, len(staff))
        if unread:
            self._unread[sync] = tuple(UnreadStaff(u, reason) for u, reason in sorted(unread.items()))
            log.warning(
                tr(
                    "wecom: {count} staff members have no interoperability licence ({code}): their customers could "
                    "not be read and are kept as they were: {staff}",
                    count=len(unread),
                    code=UNLICENSED,
                    staff=", ".join(sorted(unread)),
                )
            )
        return sync

    async def _fetch_follows(self, sync: str, group: list[str], unread: dict[str, str]) -> None:
        """Every page of `batch/get_by_user` for up to 100 staff members into the snapshot. Members WeCom would not
        list customers of (no interoperability licence: `fail_info.unlicensed_userid_list`, or 701008 when none of
        the group has one) go into `unread`, so that the sync keeps their customers rather than mark them removed."""
        api = "externalcontact/batch/get_by_user"
        cursor = ""
        seen: set[str] = set()
        while True:
            body: JSON = {"userid_list": group, "cursor": cursor, "limit": CUSTOMERS_PER_CALL}
            try:
                data = await self.client.post(api, body)
            except WecomPermanentError as exc:
                if exc.reason_code != "no_licence":
                    raise
                unread.update(dict.fromkeys(group, UNLICENSED))
                return
            for userid in customers.strings(customers.obj(data.get("fail_info")).get("unlicensed_userid_list")):
                unread[userid] = UNLICENSED
            rows = []
            for i, item in enumerate(customers.items(api, data, "external_contact_list")):
                where = f"external_contact_list[{i}]"
                raw_contact, raw_follow = item.get("external_contact"), item.get("follow_info")
                ext_id = customers.obj(raw_contact).get("external_userid")
                ext = customers.ident(api, ext_id, f"{where}.external_contact.external_userid")
                userid = customers.ident(api, customers.obj(raw_follow).get("userid"), f"{where}.follow_info.userid")
                customers.optional_list(api, customers.obj(raw_follow).get("tag_id"), f"{where}.follow_info.tag_id")
                contact = {**customers.contact_fields(raw_contact), "external_userid": ext}
                follow = {**customers.follow_from_batch(raw_follow), "userid": userid}
                rows.append((ext, userid, contact, follow))
            await asyncio.to_thread(self.store.add_follows, sync, rows)
            cursor = customers.next_cursor(api, data, seen)
            if not cursor:
                return

    async def get_contact(self, contact_id: str) -> ContactRecord | None:
        self._require_login()
        api = "externalcontact/get"
        merged: JSON = {}
        follows: list[JSON] = []
        cursor = ""
        seen: set[str] = set()
        while True:
            params = {"external_userid": contact_id, **({"cursor": cursor} if cursor else {})}
            try:
                data = await self.client.get(api, params)
            except WecomPermanentError as exc:
                if exc.reason_code in ("unknown_contact", "not_friend", "no_privilege"):
                    return None
                raise
            customers.ident(api, customers.obj(data.get("external_contact")).get("external_userid"), "external_userid")
            for i, item in enumerate(customers.items(api, data, "follow_user")):
                customers.ident(api, item.get("userid"), f"follow_user[{i}].userid")
                customers.optional_list(api, item.get("tags"), f"follow_user[{i}].tags")
                follows.append(item)
            merged = merged or data
            cursor = customers.next_cursor(api, data, seen)
            if not cursor:
                break
        return customers.from_detail({**merged, "follow_user": follows})

    async def list_tags(self) -> list[TagRecord]:
        self._require_login()
        return customers.tags_from_groups(await self._tag_groups())

    async def _tag_groups(self) -> list[JSON]:
        """`get_corp_tag_list`'s tag groups, each group's `tag` list and every tag's id checked."""
        api = "externalcontact/get_corp_tag_list"
        groups = customers.items(api, await self.client.post(api, {}), "tag_group")
        for i, group in enumerate(groups):
            for j, tag in enumerate(customers.items(api, group, "tag") if "tag" in group else []):
                customers.ident(api, tag.get("id"), f"tag_group[{i}].tag[{j}].id")
        return groups

    # -- tags ------------------------------------------------------------------------------------
    async def _follows_of(self, contact_id: str) -> tuple[str, ...]:
        contact = await self.get_contact(contact_id)
        if contact is None or not contact.follow_user_ids:
            raise PermanentError(f"{contact_id} is not a customer of any staff member")
        return contact.follow_user_ids

    async def add_contact_tags(self, contact_id: str, tag_ids: Sequence[str]) -> None:
        """mark_tag for every staff member who follows the customer (adding a tag twice is no error)."""
        await self._mark(contact_id, add=list(tag_ids), remove=[])

    async def remove_contact_tags(self, contact_id: str, tag_ids: Sequence[str]) -> None:
        await self._mark(contact_id, add=[], remove=list(tag_ids))

    async def _mark(self, contact_id: str, *, add: list[str], remove: list[str]) -> None:
        self._require_login()
        if not add and not remove:
            return
        for userid in await self._follows_of(contact_id):
            body = {"userid": userid, "external_userid": contact_id, "add_tag": add, "remove_tag": remove}
            await self.client.post("externalcontact/mark_tag", body)

    async def create_tag(self, name: str, group_name: str = "") -> TagRecord:
        """The tag of that name in that group (WeCom needs a group: '' means 'wecast'), created when missing."""
        self._require_login()
        group_name = group_name or "wecast"
        groups = await self._tag_groups()
        for tag in customers.tags_from_groups(groups):
            if tag.name == name and tag.group_name == group_name:
                return tag
        group_id = next((customers.text(g.get("group_id")) for g in groups if g.get("group_name") == group_name), "")
        body: JSON = {"tag": [{"name": name}], **({"group_id": group_id} if group_id else {"group_name": group_name})}
        created = await self.client.post("externalcontact/add_corp_tag", body, idempotent=False)
        group = customers.obj(created.get("tag_group"))
        tags = customers.tags_from_groups([{**group, "group_name": group.get("group_name") or group_name}])
        match = next((t for t in tags if t.name == name), None)
        if match is None:
            raise PermanentError(f"WeCom add_corp_tag did not return the tag {name!r}")
        return match

    # -- sending: 群发 tasks only ------------------------------------------------------------------
    async def send_text(self, contact_id: str, text: str, *, idempotency_key: str) -> SendReceipt:
        self._require_login()
        raise PermanentError("the wecom gateway sends through 群发 tasks that staff confirm, not one message at a time")

    async def submit_batch(
        self, contact_ids: list[str], message: Message | str, *, idempotency_key: str, sender: str = ""
    ) -> BatchReceipt:
        """One add_msg_template for `sender`'s customers, idempotent by key (see the module docstring)."""
        self._require_login()
        with waiting_at_most(self.send_wait_budget):
            return await self._submit(contact_ids, message, idempotency_key, sender)

    async def _submit(
        self, contact_ids: list[str], message: Message | str, idempotency_key: str, sender: str
    ) -> BatchReceipt:
        msg = Message.of_text(message) if isinstance(message, str) else message
        if not sender:
            raise PermanentError("a WeCom 群发 task is sent by one staff member, and none was given for it")
        if not contact_ids:
            raise PermanentError("a 群发 task needs at least one customer")
        if len(contact_ids) > MAX_TASK_RECIPIENTS:
            raise PermanentError(
                f"a 群发 task takes at most {MAX_TASK_RECIPIENTS} customers ({len(contact_ids)} given)"
            )
        row = await asyncio.to_thread(self.store.task, idempotency_key)
        if row is not None and row.msgid:
            return _receipt(row.msgid, row.recipients, row.fail_list)
        content = await self._content(msg)
        if row is not None:  # an earlier attempt got no answer: did it create the task?
            found = await self._find_task(row, content)
            if found is not None:
                return found
            if row.sender != sender:  # the contacts were re-synced in between: the key's task stays its sender's
                log.warning(
                    "wecom: task key %s was first tried for %s, not %s: kept", idempotency_key, row.sender, sender
                )
                sender = row.sender
            first_attempt = False
        else:
            row = await asyncio.to_thread(
                self.store.start_task, idempotency_key, sender, msg.content_hash(), contact_ids, self._now()
            )
            first_attempt = True
        body = {"chat_type": "single", "external_userid": list(contact_ids), "sender": sender, **content}
        try:
            data = await self.client.post("externalcontact/add_msg_template", body, idempotent=False)
        except UnknownOutcomeError:
            found = await self._find_task(row, content)
            if found is not None:
                return found
            raise
        except GatewayError:
            if first_attempt:  # WeCom refused it outright (or it never left): nothing to look for later
                await asyncio.to_thread(self.store.forget_attempt, idempotency_key)
            raise
        msgid = customers.text(data.get("msgid"))
        if not msgid:
            raise UnknownOutcomeError("WeCom add_msg_template answered without a msgid")
        fail_list = customers.strings(data.get("fail_list"))
        await asyncio.to_thread(self.store.finish_task, idempotency_key, msgid, fail_list)
        log.info("wecom: task %s for %s: %d customers, %d refused", msgid, sender, len(contact_ids), len(fail_list))
        return _receipt(msgid, row.recipients, fail_list)

    async def _find_task(self, row: TaskRow, content: JSON) -> BatchReceipt | None:
        """The task an unanswered attempt created, if it did: a corp task since the attempt began with the same
        content, for the same sender, to customers among the attempt's, that no other key has claimed."""
        now = int(self._now())
        start = max(int(row.started_at) - TASK_SEARCH_SLACK, now - 30 * 86_400 + 60)  # WeCom searches ≤ 1 month
        known = await asyncio.to_thread(self.store.known_msgids)
        candidates: list[str] = []
        api = "externalcontact/get_groupmsg_list_v2"
        cursor = ""
        seen: set[str] = set()
        while True:
            body: JSON = {
                "chat_type": "single",
                "start_time": start,
                "end_time": now + 60,
                "filter_type": 0,
                "limit": 100,
                "cursor": cursor,
            }
            data = await self.client.post(api, body)
            for i, entry in enumerate(customers.items(api, data, "group_msg_list")):
                msgid = customers.ident(api, entry.get("msgid"), f"group_msg_list[{i}].msgid")
                if msgid not in known and _same_content(entry, content):
                    candidates.append(msgid)
            cursor = customers.next_cursor(api, data, seen)
            if not cursor:
                break
        wanted = set(row.recipients)
        for msgid in candidates:
            if row.sender not in await self._task_staff(msgid):
                continue
            included = {r["external_userid"] for r in await self._send_results(msgid, row.sender)}
            if included and included <= wanted:
                fail_list = sorted(wanted - included)
                await asyncio.to_thread(self.store.finish_task, row.key, msgid, fail_list)
                log.warning("wecom: an unanswered submission had created task %s; not submitting it again", msgid)
                return _receipt(msgid, row.recipients, fail_list)
        return None

    async def _task_staff(self, msgid: str) -> list[str]:
        api = "externalcontact/get_groupmsg_task"
        staff: list[str] = []
        cursor = ""
        seen: set[str] = set()
        while True:
            body: JSON = {"msgid": msgid, "limit": RESULTS_PER_CALL, "cursor": cursor}
            data = await self.client.post(api, body)
            for i, task in enumerate(customers.items(api, data, "task_list")):
                staff.append(customers.ident(api, task.get("userid"), f"task_list[{i}].userid"))
            cursor = customers.next_cursor(api, data, seen)
            if not cursor:
                return staff

    async def _send_results(self, msgid: str, userid: str) -> list[JSON]:
        api = "externalcontact/get_groupmsg_send_result"
        out: list[JSON] = []
        cursor = ""
        seen: set[str] = set()
        while True:
            body: JSON = {"msgid": msgid, "userid": userid, "limit": RESULTS_PER_CALL, "cursor": cursor}
            data = await self.client.post(api, body)
            for i, entry in enumerate(customers.items(api, data, "send_list")):
                ext = customers.ident(api, entry.get("external_userid"), f"send_list[{i}].external_userid")
                out.append({"external_userid": ext, "status": customers.number(entry.get("status"))})
            cursor = customers.next_cursor(api, data, seen)
            if not cursor:
                return out

    async def batch_results(self, task_id: str) -> list[BatchResult]:
        """Per-customer results of a task (customers WeCom does not list yet are left out: still waiting)."""
        self._require_login()
        row = await asyncio.to_thread(self.store.task_by_msgid, task_id)
        results: dict[str, BatchResult] = {}
        for userid in await self._task_staff(task_id):
            for item in await self._send_results(task_id, userid):
                status = item["status"]
                outcome, code, reason = SEND_STATUS.get(
                    status, (BatchOutcome.PENDING, "", f"WeCom reported send status {status}")
                )
                if status not in SEND_STATUS:
                    log.warning("wecom: task %s: unknown send status %r for a customer", task_id, status)
                ext = item["external_userid"]
                message_id = f"{task_id}:{ext}" if outcome is BatchOutcome.SENT else ""
                results[ext] = BatchResult(ext, outcome, message_id=message_id, reason=reason, reason_code=code)
        if row is not None and row.cancelled_at is not None:
            for ext in row.recipients:
                if ext in row.fail_list or (ext in results and results[ext].outcome is not BatchOutcome.PENDING):
                    continue
                results[ext] = BatchResult(
                    ext, BatchOutcome.FAILED, reason="not sent: the task was cancelled", reason_code="cancelled"
                )
        return list(results.values())

    async def remind_batch(self, task_id: str) -> None:
        """remind_groupmsg_send (WeCom allows 3 per task per 24 h; a fourth is a PermanentError saying so)."""
        self._require_login()
        await self.client.post("externalcontact/remind_groupmsg_send", {"msgid": task_id}, idempotent=False)

    async def cancel_batch(self, task_id: str) -> None:
        """cancel_groupmsg_send: unsent messages of the task are stopped (sent ones stay sent)."""
        self._require_login()
        try:
            await self.client.post("externalcontact/cancel_groupmsg_send", {"msgid": task_id})
        except WecomPermanentError as exc:
            if exc.reason_code != "cancelled":  # already cancelled: the same end state
                raise
        await asyncio.to_thread(self.store.cancel_task, task_id, self._now())

    # -- internal notifications (to staff, not customers) ------------------------------------------------
    async def notify_staff(self, text: str, userids: Sequence[str]) -> list[str]:
        """An application message (`message/send`, the app `wecom.agent_id`) to staff members, e.g. a run's summary.
        Returns the userids WeCom could not reach (all unreachable: a PermanentError). WeCom drops more than 30 a
        minute per member silently, so this is for summaries, not chatter."""
        self._require_login()
        if self.settings.agent_id is None:
            raise PermanentError("notifying staff needs wecom.agent_id (the app's AgentId)")
        body: JSON = {
            "touser": "|".join(userids),
            "msgtype": "text",
            "agentid": self.settings.agent_id,
            "text": {"content": text},
        }
        data = await self.client.post("message/send", body, idempotent=False)
        return [u for u in customers.text(data.get("invaliduser")).split("|") if u]

    async def notify_robot(self, text: str) -> None:
        """A text through the group robot of `wecom.webhook_key` (20 messages a minute per robot)."""
        if self.settings.webhook_key is None:
            raise PermanentError("a group robot needs wecom.webhook_key (WECAST_WECOM_WEBHOOK_KEY)")
        body: JSON = {"msgtype": "text", "text": {"content": text}}
        await self.client.webhook(self.settings.webhook_key.get_secret_value(), body)

    # -- welcome ---------------------------------------------------------------------------------
    async def send_welcome(self, welcome_code: str, message: Message) -> SendReceipt:
        """send_welcome_msg with a WelcomeCode: once per code, within its 20 seconds."""
        self._require_login()
        code = welcome_code.strip()
        if not code:
            raise PermanentError(
                "no welcome code: WeCom gave none for this customer (a welcome is set up in WeCom, "
                "or they already chat)"
            )
        if code in self._welcome_used:
            raise PermanentError("this welcome code was used already (WeCom allows one welcome per code)")
        received = self._welcome_codes.get(code)
        if received is not None and self.clock.monotonic() - received > WELCOME_WINDOW:
            raise PermanentError(f"the welcome code is older than WeCom's {WELCOME_WINDOW:.0f}-second window")
        with waiting_at_most(self.send_wait_budget):
            content = await self._content(message)
            self._welcome_used.add(code)  # single-use: whatever happens next, it is not sent again
            body = {"welcome_code": code, **content}
            await self.client.post("externalcontact/send_welcome_msg", body, idempotent=False)
        return SendReceipt(message_id="welcome-" + hashlib.sha256(code.encode()).hexdigest()[:16])

    # -- message content ---------------------------------------------------------------------------
    async def _content(self, message: Message) -> JSON:
        """`text` and `attachments` as add_msg_template and send_welcome_msg take them (media uploaded)."""
        body: JSON = {}
        attachments: list[JSON] = []
        for part in message.parts:
            if isinstance(part, TextPart):
                if len(part.text.encode()) > TEXT_MAX_BYTES:
                    raise PermanentError(f"the text is longer than WeCom's {TEXT_MAX_BYTES} bytes")
                if part.text.strip():
                    body["text"] = {"content": part.text}
            elif isinstance(part, ImagePart):
                attachments.append(
                    {"msgtype": "image", "image": {"media_id": await self._media_id(part.media, "image")}}
                )
            elif isinstance(part, FilePart):
                attachments.append({"msgtype": "file", "file": {"media_id": await self._media_id(part.media, "file")}})
            elif isinstance(part, LinkPart):
                link = {"title": part.title, "url": part.url, "desc": part.description, "picurl": part.thumb_url}
                attachments.append({"msgtype": "link", "link": {k: v for k, v in link.items() if v}})
            elif isinstance(part, MiniProgramPart):
                if part.thumb is None:
                    raise PermanentError("a WeCom mini-program card needs a cover image (thumb)")
                cover = await self._media_id(part.thumb, "image")
                attachments.append(
                    {
                        "msgtype": "miniprogram",
                        "miniprogram": {
                            "title": part.title,
                            "pic_media_id": cover,
                            "appid": part.appid,
                            "page": part.page,
                        },
                    }
                )
        if len(attachments) > MAX_ATTACHMENTS:
            raise PermanentError(f"WeCom takes at most {MAX_ATTACHMENTS} attachments ({len(attachments)} given)")
        if attachments:
            body["attachments"] = attachments
        if not body:
            raise PermanentError("empty message")
        return body

    async def _media_id(self, media: Media, kind: str) -> str:
        """The media id of `media` (uploaded once per content and kind, again when WeCom's 3 days are nearly up)."""
        content: bytes | None = None
        limit = IMAGE_MAX_BYTES if kind == "image" else FILE_MAX_BYTES
        digest = media.sha256
        if not digest:
            content = await self._read_media(media, limit)
            digest = hashlib.sha256(content).hexdigest()
        lock = self._media_locks.setdefault((digest, kind), asyncio.Lock())
        async with lock:
            fresh_after = self._now() - self.settings.media_ttl.total_seconds()
            cached = await asyncio.to_thread(self.store.media_id, digest, kind, fresh_after)
            if cached:
                return cached
            if content is None:
                content = await self._read_media(media, limit)
            data = await self.client.upload(kind, media.name or f"{digest[:12]}", content, media.mime)
            media_id = customers.text(data.get("media_id"))
            if not media_id:
                raise TransientError("WeCom media/upload answered without a media_id")
            await asyncio.to_thread(self.store.put_media, digest, kind, media_id, self._now())
            log.info("wecom: uploaded %s %s (%d bytes)", kind, media.name, len(content))
            return media_id

    async def _read_media(self, media: Media, limit: int) -> bytes:
        """The content of a media file (a local one checked: present, within `limit`, the content validated)."""
        if media.path is not None:
            return (await asyncio.to_thread(read_media, media, limit)).data
        assert media.url is not None  # a Media is a path or a URL
        # Only from the public internet, https at every hop (engine.gateways.fetch): what is fetched is sent out.
        return await fetch_public(media.url, limit, name=media.name)

    def _now(self) -> float:
        return self.clock.now().timestamp()

    # -- callbacks -------------------------------------------------------------------------------
    @property
    def receiver(self) -> CallbackReceiver:
        """The callback checker (needs wecom.callback_token, wecom.encoding_aes_key and wecom.corp_id)."""
        if self._receiver is None:
            s = self.settings
            if s.callback_token is None or s.encoding_aes_key is None or s.corp_id is None:
                raise CallbackError(
                    "callbacks need wecom.callback_token, wecom.encoding_aes_key and wecom.corp_id "
                    "(WECAST_WECOM_CALLBACK_TOKEN, WECAST_WECOM_AES_KEY, WECAST_WECOM_CORP_ID)"
                )
            crypt = MessageCrypt(
                s.callback_token.get_secret_value(), s.encoding_aes_key.get_secret_value(), s.corp_id.get_secret_value()
            )
            self._receiver = CallbackReceiver(crypt, self.clock, max_age=s.callback_max_age.total_seconds())
        return self._receiver

    def verify_callback_url(self, msg_signature: str, timestamp: str, nonce: str, echostr: str) -> str:
        """WeCom's GET URL check: the plaintext of `echostr` (CallbackError if it does not check out)."""
        return self.receiver.verify_url(msg_signature, timestamp, nonce, echostr)

    def receive_callback(self, msg_signature: str, timestamp: str, nonce: str, body: bytes) -> CallbackEvent | None:
        """Check and decrypt a POSTed callback and return at once; the event is emitted on the next loop turn, after
        the caller has answered WeCom. None: a duplicate (acknowledge it, nothing else). CallbackError: refuse it."""
        event = self.receiver.receive(msg_signature, timestamp, nonce, body)
        if event is None:
            return None
        if event.welcome_code:
            self._welcome_codes[event.welcome_code] = self.clock.monotonic()
            horizon = self.clock.monotonic() - 10 * WELCOME_WINDOW
            for code in [c for c, at in self._welcome_codes.items() if at < horizon]:
                del self._welcome_codes[code]
        asyncio.get_running_loop().call_soon(self._emit_callback, event)
        return event

    def _emit_callback(self, event: CallbackEvent) -> None:
        kind = CALLBACK_KINDS.get(event.change_type) if event.event == "change_external_contact" else None
        if kind is None:
            log.info("wecom: callback %s/%s not acted on: %s", event.event, event.change_type, event.fields)
            return
        data: dict[str, Any] = {"contact_id": event.contact_id, "staff_id": event.staff_id}
        if kind is EventKind.CONTACT_ADDED:
            data.update(
                welcome_code=event.welcome_code,
                state=event.fields.get("State", ""),
                half=event.change_type == "add_half_external_contact",
            )
        elif kind is EventKind.CONTACT_REMOVED:
            data.update(
                by="staff" if event.change_type == "del_external_contact" else "customer",
                source=event.fields.get("Source", ""),
            )
        self.emit(kind, event.change_type, **data)


def contact_of(pairs: Sequence[tuple[JSON, JSON]]) -> JSON:
    """The customer fields of a snapshot's pairs (the most complete copy: WeCom repeats them per follow)."""
    return max((c for c, _ in pairs), key=lambda c: sum(1 for v in c.values() if v))


def _receipt(msgid: str, recipients: Sequence[str], fail_list: Sequence[str]) -> BatchReceipt:
    failed = set(fail_list)
    return BatchReceipt(
        task_id=msgid,
        accepted=tuple(c for c in recipients if c not in failed),
        rejected={
            c: "WeCom will not send this task to the customer (not the sender's customer, or an invalid id)"
            for c in recipients
            if c in failed
        },
    )


def _same_content(entry: JSON, content: JSON) -> bool:
    """Whether a group_msg_list entry carries the content we submitted (text, and the attachments' kinds and
    addresses: media ids may differ when WeCom renamed them)."""
    if customers.text(customers.obj(entry.get("text")).get("content")) != content.get("text", {}).get("content", ""):
        return False
    theirs = [customers.obj(a) for a in entry.get("attachments") or []]
    ours = content.get("attachments", [])
    if len(theirs) != len(ours):
        return False
    for a, b in zip(theirs, ours, strict=True):
        kind = b["msgtype"]
        if customers.text(a.get("msgtype")) != kind:
            return False
        if kind == "link" and customers.obj(a.get("link")).get("url") != b["link"]["url"]:
            return False
        if kind == "miniprogram":
            theirs_mp, ours_mp = customers.obj(a.get("miniprogram")), b["miniprogram"]
            if (theirs_mp.get("appid"), theirs_mp.get("page")) != (ours_mp["appid"], ours_mp["page"]):
                return False
    return True

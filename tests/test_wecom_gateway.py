"""The wecom gateway on the fake WeCom server: customers with their staff members, tags through mark_tag, 群发 tasks
(results, WeCom's per-customer limit, not-a-friend, cancel, remind), attachments uploaded once, a task never
submitted twice (a lost answer included), and the welcome of a new customer from its callback."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.clock import FakeClock
from engine.errors import PermanentError, RateLimitedError, UnknownOutcomeError
from engine.gateways.base import BatchOutcome, ContactRecord, EventKind, Gateway, GatewayEvent
from engine.gateways.wecom.crypto import CallbackError
from engine.messages import FilePart, ImagePart, LinkPart, Media, Message, MiniProgramPart, TextPart

try:
    from wecom_harness import running
except ImportError:  # pragma: no cover
    from tests.wecom_harness import running

pytestmark = pytest.mark.anyio
TEMPLATE = "externalcontact/add_msg_template"
START = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def all_contacts(gateway: Gateway, page_size: int = 100) -> list[ContactRecord]:
    out: list[ContactRecord] = []
    cursor = None
    while True:
        page = await gateway.list_contacts(cursor, page_size)
        out.extend(page.contacts)
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


def media_file(tmp: Path, name: str, content: bytes, mime: str) -> Media:
    path = tmp / name
    path.write_bytes(content)
    return Media(name, path=path, size=len(content), sha256=hashlib.sha256(content).hexdigest(), mime=mime)


async def test_a_customer_of_two_staff_members_is_one_contact(tmp_path: Path) -> None:
    """Every customer once, with both staff members (the first to add them leading), the union of their tags, the
    remark as alias and the earliest add time; the page total is the customer count."""
    async with running(tmp_path, customers=70, staff=4, shared_every=5) as r:
        contacts = await all_contacts(r.gateway, 9)
        by_id = {c.id: c for c in contacts}
        assert len(contacts) == len(by_id) == 70
        shared = by_id[r.fake.external_id(0)]
        follows = r.fake.follows_of(shared.id)
        assert len(follows) == 2
        first = min(follows, key=lambda f: f.createtime)
        assert shared.follow_user_ids == tuple(f.userid for f in sorted(follows, key=lambda f: f.createtime))
        assert shared.follow_user_ids[0] == first.userid
        assert set(shared.tag_ids) == set().union(*(f.tag_ids for f in follows))
        assert shared.alias == first.remark
        assert shared.added_at == datetime.fromtimestamp(first.createtime, UTC)
        assert len(shared.additional_info["follows"]) == 2
        single = by_id[r.fake.external_id(1)]
        assert len(single.follow_user_ids) == 1
        assert (await r.gateway.list_contacts(None, 1000)).total == 70


async def test_only_the_configured_staff_are_synced(tmp_path: Path) -> None:
    """wecom.staff limits the sync to those members' customers."""
    async with running(tmp_path, customers=30, staff=3, shared_every=0, settings={"staff": ["lina"]}) as r:
        contacts = await all_contacts(r.gateway)
        assert {c.id for c in contacts} == set(r.fake.customers_of("lina"))
        assert all(c.follow_user_ids == ("lina",) for c in contacts)


async def test_get_contact_reads_one_customer(tmp_path: Path) -> None:
    """get_contact is the customer with all follows (and tag ids); an unknown or unrelated id is None."""
    async with running(tmp_path, customers=20, staff=2, shared_every=2) as r:
        ext = r.fake.external_id(0)
        contact = await r.gateway.get_contact(ext)
        assert contact is not None
        assert set(contact.follow_user_ids) == {f.userid for f in r.fake.follows_of(ext)}
        assert set(contact.tag_ids) == set().union(*(f.tag_ids for f in r.fake.follows_of(ext)))
        assert await r.gateway.get_contact("wmNoSuchCustomer") is None


async def test_tags_are_listed_and_marked_for_every_follow(tmp_path: Path) -> None:
    """Corp tags come with their groups; adding and removing a tag calls mark_tag once per staff member who follows
    the customer; create_tag makes a tag once and finds it the second time."""
    async with running(tmp_path, customers=20, staff=2, shared_every=2) as r:
        tags = await r.gateway.list_tags()
        assert {t.group_name for t in tags} >= {"客户等级", "兴趣偏好"}
        ext = r.fake.external_id(0)
        await r.gateway.add_contact_tags(ext, ["etsport"])
        assert all("etsport" in f.tag_ids for f in r.fake.follows_of(ext))
        assert r.fake.calls["externalcontact/mark_tag"] == 2
        await r.gateway.remove_contact_tags(ext, ["etsport"])
        assert all("etsport" not in f.tag_ids for f in r.fake.follows_of(ext))
        made = await r.gateway.create_tag("已购", "购买状态")
        again = await r.gateway.create_tag("已购", "购买状态")
        assert made == again
        assert made.id in r.fake.tag_ids()
        assert r.fake.calls["externalcontact/add_corp_tag"] == 1
        with pytest.raises(PermanentError):
            await r.gateway.add_contact_tags(ext, ["etNoSuchTag"])


async def test_task_results_cover_sent_not_friend_and_over_the_limit(tmp_path: Path) -> None:
    """After staff confirm: customers get status sent, a customer who deleted the staff member fails as not_friend,
    and one over WeCom's per-customer limit (here one a day) fails as customer_limit; a stranger is in fail_list."""
    clock = FakeClock(START)
    async with running(tmp_path, clock=clock, customers=12, staff=1, shared_every=0, customer_limit="day") as r:
        ids = r.fake.customers_of("zhangwei")
        gone, capped, rest = ids[0], ids[1], ids[2:]
        for ext in ids:  # the demo data has a few customers who deleted us: here exactly one
            r.fake.follows[("zhangwei", ext)].friend = ext != gone
        early = await r.gateway.submit_batch(
            [capped], Message.of_text("早上好"), idempotency_key="a", sender="zhangwei"
        )
        r.fake.confirm()
        assert (await r.gateway.batch_results(early.task_id))[0].outcome is BatchOutcome.SENT
        receipt = await r.gateway.submit_batch(
            [*ids, "wmStranger"], Message.of_text("会员日"), idempotency_key="b", sender="zhangwei"
        )
        assert set(receipt.accepted) == set(ids)
        assert list(receipt.rejected) == ["wmStranger"]
        pending = await r.gateway.batch_results(receipt.task_id)
        assert {x.outcome for x in pending} == {BatchOutcome.PENDING}
        r.fake.confirm("zhangwei")
        results = {x.contact_id: x for x in await r.gateway.batch_results(receipt.task_id)}
        assert (results[gone].outcome, results[gone].reason_code) == (BatchOutcome.FAILED, "not_friend")
        assert (results[capped].outcome, results[capped].reason_code) == (BatchOutcome.FAILED, "customer_limit")
        assert all(results[c].outcome is BatchOutcome.SENT for c in rest)
        assert sorted(m.contact_id for m in r.fake.received if m.text == "会员日") == sorted(rest)


async def test_a_cancelled_task_ends_cancelled(tmp_path: Path) -> None:
    """Cancelling a task before staff confirm: nothing is delivered and every customer's result is failed, cancelled;
    cancelling twice is not an error."""
    async with running(tmp_path, customers=6, staff=1) as r:
        ids = r.fake.customers_of("zhangwei")
        receipt = await r.gateway.submit_batch(ids, Message.of_text("取消"), idempotency_key="c", sender="zhangwei")
        await r.gateway.cancel_batch(receipt.task_id)
        await r.gateway.cancel_batch(receipt.task_id)
        r.fake.confirm()
        results = await r.gateway.batch_results(receipt.task_id)
        assert {(x.outcome, x.reason_code) for x in results} == {(BatchOutcome.FAILED, "cancelled")}
        assert r.fake.received == []


async def test_a_fourth_reminder_is_refused_with_the_reason(tmp_path: Path) -> None:
    """Three reminders a day are allowed; the fourth is a PermanentError saying WeCom's limit."""
    async with running(tmp_path, customers=4, staff=1) as r:
        ids = r.fake.customers_of("zhangwei")
        receipt = await r.gateway.submit_batch(ids, Message.of_text("提醒"), idempotency_key="d", sender="zhangwei")
        for _ in range(3):
            await r.gateway.remind_batch(receipt.task_id)
        with pytest.raises(PermanentError, match="3 reminders"):
            await r.gateway.remind_batch(receipt.task_id)


async def test_attachments_are_uploaded_once_and_again_after_their_days(tmp_path: Path) -> None:
    """A message with an image, a file, a link and a mini-program: the image and the cover (same content) are
    uploaded once, the file once; a second task reuses the ids; after the media TTL they are uploaded again."""
    clock = FakeClock(START)
    poster = media_file(tmp_path, "poster.png", b"\x89PNG" + b"x" * 2000, "image/png")
    guide = media_file(tmp_path, "guide.pdf", b"%PDF" + b"y" * 5000, "application/pdf")
    message = Message(
        (
            TextPart("新品上市"),
            ImagePart(poster),
            FilePart(guide),
            LinkPart("https://shop.example.com/new", "新品", "全场八折"),
            MiniProgramPart("wx1234567890", "领券", "pages/coupon/index?id=42", thumb=poster),
        )
    )
    async with running(tmp_path, clock=clock, customers=6, staff=1) as r:
        ids = r.fake.customers_of("zhangwei")
        await r.gateway.submit_batch(ids[:3], message, idempotency_key="m1", sender="zhangwei")
        await r.gateway.submit_batch(ids[3:], message, idempotency_key="m2", sender="zhangwei")
        assert r.fake.calls["media/upload"] == 2
        task = next(iter(r.fake.tasks.values()))
        assert [a["msgtype"] for a in task.attachments] == ["image", "file", "link", "miniprogram"]
        assert task.attachments[3]["miniprogram"]["pic_media_id"] == task.attachments[0]["image"]["media_id"]
        clock.advance(3 * 86_400)
        await r.gateway.submit_batch(ids[:2], message, idempotency_key="m3", sender="zhangwei")
        assert r.fake.calls["media/upload"] == 4
        r.fake.confirm()
        assert {m.attachments for m in r.fake.received} == {("image", "file", "link", "miniprogram")}


async def test_a_mini_program_without_a_cover_is_refused(tmp_path: Path) -> None:
    """WeCom needs a cover for a mini-program card: refused before any call."""
    async with running(tmp_path, customers=3, staff=1) as r:
        card = Message((MiniProgramPart("wx1", "领券", "pages/a"),))
        with pytest.raises(PermanentError, match="cover"):
            await r.gateway.submit_batch(r.fake.customers_of("zhangwei"), card, idempotency_key="x", sender="zhangwei")
        assert r.fake.calls[TEMPLATE] == 0


async def test_a_resubmitted_key_is_answered_from_the_ledger(tmp_path: Path) -> None:
    """The same key again — also from a new gateway on the same state file (a restarted process) — answers the
    same task without calling add_msg_template."""
    async with running(tmp_path, customers=5, staff=1) as r:
        ids = r.fake.customers_of("zhangwei")
        first = await r.gateway.submit_batch(ids, Message.of_text("一次"), idempotency_key="k", sender="zhangwei")
        await r.gateway.close()
        again = await r.gateway.submit_batch(ids, Message.of_text("一次"), idempotency_key="k", sender="zhangwei")
        assert again == first
        assert r.fake.calls[TEMPLATE] == 1


async def test_a_lost_answer_is_found_instead_of_submitted_again(tmp_path: Path) -> None:
    """add_msg_template takes effect but its answer is lost (HTTP 502): the gateway finds the task among WeCom's
    records (same content, sender and customers) and returns it; a retry under the key creates nothing more."""
    async with running(tmp_path, customers=8, staff=2, shared_every=0) as r:
        other = r.fake.customers_of("lina")
        await r.gateway.submit_batch(other, Message.of_text("一样的字"), idempotency_key="o", sender="lina")
        ids = r.fake.customers_of("zhangwei")
        r.fake.fail_after_processing(TEMPLATE)
        receipt = await r.gateway.submit_batch(ids, Message.of_text("一样的字"), idempotency_key="k", sender="zhangwei")
        assert len(r.fake.tasks) == 2
        mine = next(t for t in r.fake.tasks.values() if t.sender == "zhangwei")
        assert receipt.task_id == mine.msgid
        assert set(receipt.accepted) == set(ids)
        again = await r.gateway.submit_batch(ids, Message.of_text("一样的字"), idempotency_key="k", sender="zhangwei")
        assert again.task_id == mine.msgid
        assert len(r.fake.tasks) == 2


async def test_a_lost_request_is_submitted_once_more_under_its_key(tmp_path: Path) -> None:
    """The request fails ambiguously before WeCom acted (an HTTP 502, no task): the submission is unknown (never
    assumed failed), and the retry under the same key finds no task, submits, and exactly one task exists."""
    async with running(tmp_path, customers=4, staff=1) as r:
        ids = r.fake.customers_of("zhangwei")
        r.fake.fail_before_processing(TEMPLATE)
        with pytest.raises(UnknownOutcomeError):
            await r.gateway.submit_batch(ids, Message.of_text("再来"), idempotency_key="k", sender="zhangwei")
        assert r.fake.tasks == {}
        receipt = await r.gateway.submit_batch(ids, Message.of_text("再来"), idempotency_key="k", sender="zhangwei")
        assert list(r.fake.tasks) == [receipt.task_id]
        assert r.fake.calls["externalcontact/get_groupmsg_list_v2"] == 2  # looked before each resubmission


async def test_the_welcome_goes_out_with_the_callbacks_code(tmp_path: Path) -> None:
    """A customer adds a staff member: the add_external_contact callback (encrypted by the fake) becomes a
    CONTACT_ADDED event carrying the WelcomeCode; send_welcome with it reaches that customer once; the code cannot be
    used twice."""
    async with running(tmp_path, customers=3, staff=1) as r:
        events: list[GatewayEvent] = []
        r.gateway.subscribe(events.append)
        fields = r.fake.add_customer("zhangwei", "新客小王", state="门店海报")
        query, body = r.fake.callback(fields)
        event = r.gateway.receive_callback(query["msg_signature"], query["timestamp"], query["nonce"], body)
        assert event is not None
        assert events == []  # emitted after the answer, on the next loop turn
        await asyncio.sleep(0)
        [added] = [e for e in events if e.kind is EventKind.CONTACT_ADDED]
        assert added.data["contact_id"] == fields["ExternalUserID"]
        assert added.data["staff_id"] == "zhangwei"
        assert added.data["welcome_code"] == fields["WelcomeCode"]
        assert added.data["state"] == "门店海报"
        welcome = Message.of_text("欢迎光临！")
        receipt = await r.gateway.send_welcome(added.data["welcome_code"], welcome)
        assert receipt.message_id
        assert [(m.contact_id, m.text, m.via) for m in r.fake.received] == [
            (fields["ExternalUserID"], "欢迎光临！", "welcome")
        ]
        with pytest.raises(PermanentError, match="used"):
            await r.gateway.send_welcome(added.data["welcome_code"], welcome)
        assert r.fake.calls["externalcontact/send_welcome_msg"] == 1


async def test_a_welcome_after_the_window_is_refused(tmp_path: Path) -> None:
    """A welcome code older than WeCom's 20 seconds is refused without a call."""
    clock = FakeClock(START)
    async with running(tmp_path, clock=clock, customers=3, staff=1) as r:
        query, body = r.fake.callback(r.fake.add_customer("zhangwei"))
        event = r.gateway.receive_callback(query["msg_signature"], query["timestamp"], query["nonce"], body)
        assert event is not None
        clock.advance(21)
        with pytest.raises(PermanentError, match="20-second"):
            await r.gateway.send_welcome(event.welcome_code, Message.of_text("欢迎"))
        assert r.fake.calls["externalcontact/send_welcome_msg"] == 0


async def test_removal_and_edit_callbacks_become_events(tmp_path: Path) -> None:
    """del_external_contact and del_follow_user are CONTACT_REMOVED (by staff / by customer); edit_external_contact
    is CONTACT_CHANGED; a change type wecast does not act on emits nothing."""
    async with running(tmp_path, customers=4, staff=1) as r:
        events: list[GatewayEvent] = []
        r.gateway.subscribe(events.append)
        a, b = r.fake.customers_of("zhangwei")[:2]
        for fields in (
            r.fake.edit_follow("zhangwei", a, add_tags=["etvip"]),
            r.fake.remove_follow("zhangwei", a, by_customer=True),
            r.fake.remove_follow("zhangwei", b),
            {**r.fake._event("transfer_fail", "zhangwei", b), "FailReason": "customer_refused"},
        ):
            query, body = r.fake.callback(fields)
            r.gateway.receive_callback(query["msg_signature"], query["timestamp"], query["nonce"], body)
        await asyncio.sleep(0)
        assert [(e.kind, e.data["contact_id"], e.data.get("by")) for e in events if e.kind is not EventKind.LOGIN] == [
            (EventKind.CONTACT_CHANGED, a, None),
            (EventKind.CONTACT_REMOVED, a, "customer"),
            (EventKind.CONTACT_REMOVED, b, "staff"),
        ]


async def test_callbacks_without_configured_secrets_are_refused(tmp_path: Path) -> None:
    """Without the callback token and EncodingAESKey, a callback is refused with what to configure."""
    async with running(tmp_path, customers=2, staff=1, settings={"callback_token": None}) as r:
        query, body = r.fake.callback(r.fake.add_customer("zhangwei"))
        with pytest.raises(CallbackError, match="WECAST_WECOM_CALLBACK_TOKEN"):
            r.gateway.receive_callback(query["msg_signature"], query["timestamp"], query["nonce"], body)


async def test_staff_and_robot_notifications(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A summary reaches staff through message/send (unknown userids reported back) and a group through the robot's
    webhook; the robot's 21st message in a minute is throttled (45009); the robot's key is never logged."""
    caplog.set_level(logging.DEBUG)
    settings = {"agent_id": 1000002, "webhook_key": "fake-robot-key", "max_retries": 0}
    async with running(tmp_path, customers=2, staff=2, settings=settings) as r:
        missing = await r.gateway.notify_staff("会员日：已发送 120 条", ["zhangwei", "nobody"])
        assert missing == ["nobody"]
        assert r.fake.staff_messages == [("zhangwei", "会员日：已发送 120 条")]
        with pytest.raises(PermanentError):
            await r.gateway.notify_staff("x", ["nobody"])
        for i in range(20):
            await r.gateway.notify_robot(f"第 {i} 条")
        assert len(r.fake.robot_messages) == 20
        with pytest.raises(RateLimitedError):
            await r.gateway.notify_robot("第 21 条")
    assert all("fake-robot-key" not in rec.getMessage() for rec in caplog.records)

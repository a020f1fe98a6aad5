"""Multi-part messages through planning, the ledger and the dispatcher: each part sent once, in order, under its
own key; a crash between two parts resends only the parts not sent; the cap and dedupe count a message once."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import MONDAY_10, PLAIN, campaign, parts_received, record_part_calls, run
from sqlalchemy import text

from engine.clock import FakeClock
from engine.errors import TransientError
from engine.gateways.base import BatchReceipt
from engine.gateways.sandbox import SandboxGateway
from engine.messages import ImagePart, LinkPart, Message, PartKind, TextPart, part_key
from engine.service import Wecast
from engine.settings import Settings
from storage import deliveries as deliveries_db
from storage.db import schema_version
from storage.deliveries import PartMark
from storage.models import META, SCHEMA_VERSION, DeliveryStatus, PartStatus

MakeSettings = Callable[..., Settings]
POSTER = Path(__file__).parent / "cases" / "messages" / "valid" / "media" / "poster.png"
RICH = """
audience: {}
message:
  parts:
    - image: poster.png
    - text: "{{ display_name }}您好，双十一海报请查收"
    - link: {url: "https://mall.example.com/1111?c={{ id }}", title: 双十一会场}
frequency_cap: false
quiet_hours: false
throttle: {per_second: 1000}
"""
KINDS = [PartKind.IMAGE, PartKind.TEXT, PartKind.LINK]


async def rich_app(settings: Settings, clock: FakeClock | None = None) -> Wecast:
    """A started Wecast on the sandbox (a fake clock), contacts synced, the poster in the campaigns folder."""
    settings.campaigns_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(POSTER, settings.campaigns_dir / "poster.png")
    app = Wecast(settings, clock=clock or FakeClock(MONDAY_10))
    await app.start()
    await app.sync()
    return app


def sandbox(app: Wecast) -> SandboxGateway:
    assert isinstance(app.gateway, SandboxGateway)
    return app.gateway


def outbox_keys(app: Wecast) -> Counter[str]:
    """How many times each idempotency key reached the customers (the sandbox's outbox, one row per part)."""
    return Counter(m.idempotency_key for m in sandbox(app).outbox_messages())


def test_each_part_is_sent_once_in_order_under_its_own_key(make_settings: MakeSettings) -> None:
    """Every recipient gets image, text and link once, in that order, each under `key#i`; the ledger holds the
    message as JSON and one sent row per part with the gateway's id; the delivery is one `sent` delivery."""
    settings = make_settings(contacts=30)

    async def go() -> None:
        app = await rich_app(settings)
        c = campaign(settings, RICH)
        s = (await app.run_campaign(c)).summary
        assert s is not None and s.status == "completed" and s.sent > 10
        rows = deliveries_db.list_deliveries(app.db, run_id=s.run_id, status=DeliveryStatus.SENT, limit=1000)
        assert len(rows) == s.sent
        parts = deliveries_db.list_parts(app.db, [r.id for r in rows])
        for r in rows:
            assert parts_received(app.gateway, r.contact_id) == KINDS
            keys = [m.idempotency_key for m in sandbox(app).outbox_messages(r.contact_id)]
            assert keys == [part_key(str(r.dedupe_key), i, 3) for i in range(3)]
            assert r.message is not None
            message = Message.loads(r.message)
            assert [p.kind for p in message.parts] == KINDS
            assert r.text == message.text and r.text.endswith("您好，双十一海报请查收")
            assert [(p.part_index, p.status) for p in parts[r.id]] == [(i, PartStatus.SENT) for i in range(3)]
            assert [p.content_hash for p in parts[r.id]] == message.part_hashes()
            assert all(p.gateway_message_id for p in parts[r.id])
            assert r.gateway_message_id == parts[r.id][0].gateway_message_id
        await app.close()

    run(go())


def test_a_text_only_campaign_stores_no_message_json_and_no_part_rows(make_settings: MakeSettings) -> None:
    """A plain text campaign is stored as before: its text, no message JSON, no part rows."""
    settings = make_settings(contacts=20)

    async def go() -> None:
        app = await rich_app(settings)
        s = (await app.run_campaign(campaign(settings, PLAIN))).summary
        assert s is not None and s.sent > 5
        rows = deliveries_db.list_deliveries(app.db, run_id=s.run_id, limit=1000)
        assert all(r.message is None for r in rows)
        assert deliveries_db.list_parts(app.db, [r.id for r in rows]) == {}
        await app.close()

    run(go())


def test_a_refused_part_fails_the_delivery_naming_the_part_and_what_arrived(make_settings: MakeSettings) -> None:
    """WeCom refusing the link (part 3) fails that one delivery with the server's reason and the parts that did
    arrive; its part rows say sent, sent, failed; no later part is sent; the other recipients are not affected."""
    settings = make_settings(contacts=20)

    async def go() -> None:
        app = await rich_app(settings)
        sandbox(app).sandbox_refuse(PartKind.LINK, "链接域名未备案 (errcode 40xxx)")
        s = (await app.run_campaign(campaign(settings, RICH + "max_errors: 0\n"))).summary
        assert s is not None and s.counts[DeliveryStatus.FAILED] == 1
        [failed] = deliveries_db.list_deliveries(app.db, run_id=s.run_id, status=DeliveryStatus.FAILED)
        assert failed.reason == "part 3 of 3 (link): 链接域名未备案 (errcode 40xxx); delivered: part 1, 2"
        states = deliveries_db.list_parts(app.db, [failed.id])[failed.id]
        assert [(p.status, p.error) for p in states] == [
            (PartStatus.SENT, ""),
            (PartStatus.SENT, ""),
            (PartStatus.FAILED, "链接域名未备案 (errcode 40xxx)"),
        ]
        assert parts_received(app.gateway, failed.contact_id) == [PartKind.IMAGE, PartKind.TEXT]
        assert s.sent == s.counts[DeliveryStatus.SENT] and all(
            parts_received(app.gateway, r.contact_id) == KINDS
            for r in deliveries_db.list_deliveries(app.db, run_id=s.run_id, status=DeliveryStatus.SENT, limit=1000)
        )
        await app.close()

    run(go())


def test_a_transient_error_between_parts_retries_only_the_rest(make_settings: MakeSettings) -> None:
    """A transient error on the text (part 2) sends the delivery back to pending; the retry sends the text and
    the link, not the image again: every part arrives exactly once."""
    settings = make_settings(contacts=20)

    async def go() -> None:
        app = await rich_app(settings, FakeClock(MONDAY_10))
        calls = record_part_calls(app.gateway, fail={PartKind.TEXT: [TransientError("UNAVAILABLE (injected)")]})
        s = (await app.run_campaign(campaign(settings, RICH))).summary
        assert s is not None and s.status == "completed" and s.counts == {DeliveryStatus.SENT: s.sent}
        retried = [r for r in deliveries_db.list_deliveries(app.db, run_id=s.run_id, limit=1000) if r.attempts == 2]
        assert len(retried) == 1
        assert parts_received(app.gateway, retried[0].contact_id) == KINDS
        keys = Counter(key for _, key in calls)
        assert keys[part_key(str(retried[0].dedupe_key), 0, 3)] == 1  # the image was not sent again
        assert keys[part_key(str(retried[0].dedupe_key), 1, 3)] == 2  # the text: failed once, then sent
        await app.close()

    run(go())


def test_the_frequency_cap_and_dedupe_count_a_message_once(make_settings: MakeSettings) -> None:
    """A three-part message counts once against a cap of 2 a day (a second campaign still reaches everyone), and
    `dedupe: once` holds the contact back from a later run however many parts it had."""
    settings = make_settings(contacts=20)

    async def go() -> None:
        app = await rich_app(settings)
        capped = RICH.replace("frequency_cap: false", "frequency_cap: {max: 2, per: day}") + "dedupe: once\n"
        first = (await app.run_campaign(campaign(settings, capped, "a"))).summary
        assert first is not None and first.sent > 5
        start, end = MONDAY_10.replace(hour=0), MONDAY_10.replace(hour=23)
        assert set(deliveries_db.cap_counts(app.db, start, end).values()) == {1}
        two_a_day = PLAIN.replace("frequency_cap: false", "frequency_cap: {max: 2, per: day}")
        second = app.preview(campaign(settings, two_a_day, "b"))
        assert len(second.recipients) == first.sent
        again = app.preview(campaign(settings, capped, "a"), run_key="next-week")
        assert again.recipients == []
        assert sum(1 for e in again.excluded if e.category == "dedupe") == first.sent
        await app.close()

    run(go())


async def crashed_mid_message(app: Wecast, c_body: str = RICH) -> tuple[int, int, str]:
    """Plan a rich run and leave one delivery as a crash after its first part would: marked `sending`, part 1
    recorded sent, part 2 marked `sending` (handed over, no answer). Returns (run id, delivery id, dedupe key)."""
    plan = app.plan(campaign(app.settings, c_body))
    [row] = deliveries_db.claim(app.db, plan.run_id, "dead-process", 1, app.clock.now())
    deliveries_db.mark_sending(app.db, [row], app.clock.now())
    assert row.message is not None
    message = Message.loads(row.message)
    hashes = message.part_hashes()
    now = app.clock.now()
    deliveries_db.mark_parts_sending(app.db, [PartMark(row.id, 0, "image", hashes[0])], now)
    await app.gateway.send_part(row.contact_id, message.parts[0], idempotency_key=part_key(str(row.dedupe_key), 0, 3))
    deliveries_db.part_sent(app.db, row.id, 0, "before-crash", now, PartMark(row.id, 1, "text", hashes[1]))
    return plan.run_id, row.id, str(row.dedupe_key)


@pytest.mark.parametrize("arrived", [True, False])
def test_after_a_crash_between_parts_an_idempotent_gateway_gets_each_part_once(
    make_settings: MakeSettings, arrived: bool
) -> None:
    """Killed with part 2 handed over (whether or not it arrived): the resumed run resends part 2 under its own
    key — a gateway that knows the key does not deliver it twice — then part 3; part 1 is not sent again."""
    settings = make_settings(contacts=12)

    async def go() -> None:
        app = await rich_app(settings)
        run_id, delivery_id, key = await crashed_mid_message(app)
        [row] = [r for r in deliveries_db.list_deliveries(app.db, run_id=run_id) if r.id == delivery_id]
        if arrived:  # it reached the customer before the crash; only the answer was lost
            message = Message.loads(str(row.message))
            await app.gateway.send_part(row.contact_id, message.parts[1], idempotency_key=part_key(key, 1, 3))
        summary = await app.dispatcher.run(run_id)
        assert summary.status == "completed" and summary.recovered["resent"] == 1
        assert parts_received(app.gateway, row.contact_id) == KINDS
        assert outbox_keys(app) == Counter(
            {
                part_key(str(r.dedupe_key), i, 3): 1
                for r in deliveries_db.list_deliveries(app.db, run_id=run_id)
                for i in range(3)
            }
        )
        [after] = [r for r in deliveries_db.list_deliveries(app.db, run_id=run_id) if r.id == delivery_id]
        assert after.status is DeliveryStatus.SENT
        await app.close()

    run(go())


def test_after_a_crash_between_parts_without_keys_the_part_in_doubt_is_unknown(make_settings: MakeSettings) -> None:
    """A gateway that cannot recognise keys: the part caught `sending` and its delivery are `unknown` (never
    resent), the reason says which parts arrived; the later part is never sent; the rest of the run goes out."""
    settings = make_settings(contacts=12, idempotent=False)

    async def go() -> None:
        app = await rich_app(settings)
        run_id, delivery_id, _ = await crashed_mid_message(app)
        summary = await app.dispatcher.run(run_id)
        assert summary.recovered["unknown"] == 1 and summary.status == "completed"
        [row] = [r for r in deliveries_db.list_deliveries(app.db, run_id=run_id) if r.id == delivery_id]
        assert row.status is DeliveryStatus.UNKNOWN
        assert row.reason.startswith("interrupted while sending part 2 of 3 (text)")
        assert row.reason.endswith("; delivered: part 1")
        states = deliveries_db.list_parts(app.db, [row.id])[row.id]
        assert [p.status for p in states] == [PartStatus.SENT, PartStatus.UNKNOWN]
        assert parts_received(app.gateway, row.contact_id) == [PartKind.IMAGE]
        assert summary.sent == summary.counts[DeliveryStatus.SENT] > 5
        await app.close()

    run(go())


def test_a_crash_after_the_last_part_is_recovered_as_sent_without_sending(make_settings: MakeSettings) -> None:
    """Every part recorded sent but the delivery still `sending` (killed before its result was written): recovery
    records it sent, with the first part's gateway id, and calls the gateway for none of its parts."""
    settings = make_settings(contacts=12, idempotent=False)

    async def go() -> None:
        app = await rich_app(settings)
        run_id, delivery_id, key = await crashed_mid_message(app)
        calls = record_part_calls(app.gateway)
        now = app.clock.now()
        deliveries_db.part_sent(app.db, delivery_id, 1, "m-1", now, PartMark(delivery_id, 2, "link", "h"))
        deliveries_db.part_sent(app.db, delivery_id, 2, "m-2", now, None)
        summary = await app.dispatcher.run(run_id)
        assert summary.recovered.get("sent") == 1
        [row] = [r for r in deliveries_db.list_deliveries(app.db, run_id=run_id) if r.id == delivery_id]
        assert (row.status, row.gateway_message_id) == (DeliveryStatus.SENT, "before-crash")
        assert not [k for _, k in calls if k.startswith(key)]
        await app.close()

    run(go())


def test_a_part_in_doubt_that_then_fails_is_unknown_not_failed(make_settings: MakeSettings) -> None:
    """A part a crash left `sending` may have arrived: if its resend is refused for good, the delivery is
    `unknown` — never reported as not delivered."""
    settings = make_settings(contacts=12)

    async def go() -> None:
        app = await rich_app(settings)
        run_id, delivery_id, _ = await crashed_mid_message(app)
        sandbox(app).sandbox_refuse(PartKind.TEXT, "内容违规")
        await app.dispatcher.run(run_id)
        [row] = [r for r in deliveries_db.list_deliveries(app.db, run_id=run_id) if r.id == delivery_id]
        assert row.status is DeliveryStatus.UNKNOWN
        assert row.reason == "part 2 of 3 (text): 内容违规; delivered: part 1"
        states = deliveries_db.list_parts(app.db, [row.id])[row.id]
        assert [p.status for p in states] == [PartStatus.SENT, PartStatus.UNKNOWN]
        await app.close()

    run(go())


def test_task_gateways_get_one_task_per_identical_message(make_settings: MakeSettings) -> None:
    """On a 群发 (task) gateway, recipients whose messages are identical — every part — share one task, and the
    task carries the whole message."""
    settings = make_settings(contacts=20, sandbox=", mode: batch")
    body = RICH.replace('"{{ display_name }}您好，双十一海报请查收"', "双十一海报请查收").replace("?c={{ id }}", "")

    async def go() -> None:
        app = await rich_app(settings)
        seen: list[tuple[list[str], Message | str]] = []
        original = app.gateway.submit_batch

        async def record(ids: list[str], message: Message | str, **kw: object) -> BatchReceipt:
            seen.append((ids, message))
            return await original(ids, message, **kw)  # type: ignore[arg-type]

        app.gateway.submit_batch = record  # type: ignore[method-assign]
        plan = app.plan(campaign(settings, body))
        await app.dispatcher.run(plan.run_id, confirm_wait=0)
        assert len(seen) == 1
        ids, message = seen[0]
        assert len(ids) == plan.planned
        assert isinstance(message, Message)
        assert [type(p) for p in message.parts] == [ImagePart, TextPart, LinkPart]
        await app.close()

    run(go())


def test_a_schema_3_database_gains_messages_and_keeps_its_deliveries(make_settings: MakeSettings) -> None:
    """A database from before rich messages (schema 3: no `deliveries.message`, no `delivery_parts`) is migrated on
    open: its deliveries are kept as plain text (message NULL) and still resume; rich runs then plan and send."""
    settings = make_settings(contacts=12)

    async def go() -> None:
        app = await rich_app(settings)
        plan = app.plan(campaign(settings, PLAIN, "old"))
        await app.close()
        with app.db.begin() as conn:
            conn.execute(text("DROP TABLE delivery_parts"))
            conn.execute(text("ALTER TABLE deliveries DROP COLUMN message"))
            conn.execute(text(f"UPDATE {META.name} SET value = '3' WHERE key = 'schema_version'"))
        app.db.dispose()
        app = await rich_app(settings)
        assert schema_version(app.db) == SCHEMA_VERSION
        old = deliveries_db.list_deliveries(app.db, run_id=plan.run_id, limit=100)
        assert len(old) == plan.planned and all(r.message is None for r in old)
        resumed = await app.dispatcher.run(plan.run_id)
        assert resumed.sent == plan.planned
        rich = (await app.run_campaign(campaign(settings, RICH, "new"))).summary
        assert rich is not None and rich.sent == plan.planned
        await app.close()

    run(go())

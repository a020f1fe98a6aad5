"""Issue 9's "Must show" on the workpro gateway, end to end against the fake WorkPro puppet on loopback, with
`wecast serve`'s scheduler running the journeys on the real clock: an incoming MESSAGE event with a keyword gets its
reply; a new customer whose FRIENDSHIP event was dropped is entered (welcomed) once by the next sync, beside one
the stream reported, which the same sync does not enter again. Counted on the fake (what customers received)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_workpro_e2e import TOKEN, log_in, until, workpro_settings

from engine.gateways.fake_puppet import FakePuppet
from engine.gateways.workpro import WorkproGateway
from engine.scheduler import CampaignScheduler
from engine.service import Wecast

REPLY = """kind: journey
name: 关键词回复
trigger: {message: {keywords: [价格, 地址], match: contains}}
quiet_hours: false
steps:
  - send: {template: "{{ display_name }}您好，价格表请看：https://example.com/price"}
    transactional: true
"""
WELCOME = """kind: journey
name: 新客欢迎
trigger: contact_added
quiet_hours: false
steps:
  - id: welcome
    send: {template: "{{ display_name }}您好，欢迎添加！"}
    transactional: true
"""


@pytest.mark.anyio
async def test_keyword_reply_and_a_dropped_add_entered_once_by_the_next_sync(tmp_path: Path) -> None:
    fake = FakePuppet(token=TOKEN, contacts=20)
    await fake.start()
    settings = workpro_settings(tmp_path, fake, scheduler={"contacts_sync": None})
    (tmp_path / "campaigns" / "reply.yaml").write_text(REPLY, encoding="utf-8")
    (tmp_path / "campaigns" / "welcome.yaml").write_text(WELCOME, encoding="utf-8")
    app = Wecast(settings)
    gateway = app.gateway
    assert isinstance(gateway, WorkproGateway)
    scheduler = CampaignScheduler(app)
    try:
        await app.start()
        await log_in(gateway, fake)
        assert (await app.sync()).seen == 20
        await scheduler.start()

        def texts(contact_id: str) -> list[str]:
            return [s.text for s in fake.sent_to(contact_id)]

        # A customer asks about the price (the MESSAGE event, then MessagePayload for its text): one reply.
        asker = fake.contact_ids()[2]
        fake.incoming_message(asker, "你好，请问价格多少？")
        await until(lambda: bool(texts(asker)), timeout=15, what="the keyword reply")
        assert len(texts(asker)) == 1 and texts(asker)[0].endswith("价格表请看：https://example.com/price")

        # Two new customers: one's FRIENDSHIP event reaches us, the other's is lost.
        seen = fake.add_contact("王小明")
        lost = fake.add_contact("林小雨", deliver=False)
        await until(lambda: texts(seen) == ["王小明您好，欢迎添加！"], timeout=15, what="the stream's welcome")
        assert texts(lost) == []
        result = await app.sync()  # the next sync finds the lost add
        assert result.seen == 22
        await until(lambda: texts(lost) == ["林小雨您好，欢迎添加！"], timeout=15, what="the welcome after the sync")
        await app.sync()
        await asyncio.sleep(1.5)  # time for a (wrong) second welcome or reply to go out
        assert texts(seen) == ["王小明您好，欢迎添加！"]
        assert texts(lost) == ["林小雨您好，欢迎添加！"]
        assert len(texts(asker)) == 1
        others = [c for c in fake.contact_ids() if c not in (asker, seen, lost)]
        assert not any(texts(c) for c in others)  # nobody else got anything
    finally:
        await scheduler.stop()
        await scheduler.workers.drain(5)
        await app.close()
        await fake.stop()

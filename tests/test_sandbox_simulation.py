"""The sandbox's simulated customers drive the engine as a real account's would: a brand-new customer, a message,
a tag put on by staff and a customer leaving reach the journeys through the gateway's events, and an event the
stream lost is found by the next sync (engine.gateways.sandbox's sandbox_* methods, end to end through Wecast)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from helpers import run
from journey_harness import harness

from storage import journeys as store
from storage.models import CustomerEventKind

MONDAY_9 = datetime(2026, 11, 23, 1, 0, tzinfo=UTC)  # Monday 09:00 in Shanghai

WELCOME = """kind: journey
name: 新客欢迎
trigger: contact_added
steps:
  - id: welcome
    send: {template: "{{ display_name }}您好，欢迎！"}
    transactional: true
"""

KEYWORDS = """kind: journey
name: 关键词回复
trigger: {message: {keywords: [价格]}}
quiet_hours: false
steps:
  - id: price
    send: {template: 价格表}
    transactional: true
"""


def test_a_brand_new_customer_is_welcomed_under_the_name_the_sandbox_gave(tmp_path: Path) -> None:
    """sandbox_add_contact makes a customer the database has never seen; the CONTACT_ADDED it emits enters the
    welcome journey, the contact is read from the gateway, and the welcome uses its name, once."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write("welcome", WELCOME)
        h.load()
        known = set(h.contacts())
        new = h.gateway.sandbox_add_contact("陈晓雯", city="杭州")
        assert new.id not in known
        await h.run()
        assert h.outbox(new.id) == ["陈晓雯您好，欢迎！"]
        assert set(h.contacts()) == {*known, new.id}
        await h.app.sync()
        await h.run()
        assert h.counts()[new.id] == 1  # the sync finds the same add: no second welcome
        assert sum(h.counts().values()) == 1
        await h.app.close()

    run(go())


def test_an_add_the_stream_lost_is_welcomed_after_the_next_sync(tmp_path: Path) -> None:
    """A new customer whose CONTACT_ADDED never arrived gets nothing until the next sync lists them; then the
    welcome, once."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write("welcome", WELCOME)
        h.load()
        lost = h.gateway.sandbox_add_contact("林小雨", emit=False)
        await h.run()
        assert h.outbox(lost.id) == []
        assert (await h.app.sync()).events == 1
        await h.run()
        assert h.outbox(lost.id) == ["林小雨您好，欢迎！"]
        await h.app.sync()
        await h.run()
        assert h.counts()[lost.id] == 1
        await h.app.close()

    run(go())


def test_a_customer_s_message_gets_the_keyword_reply(tmp_path: Path) -> None:
    """sandbox_incoming_message is a MESSAGE event with the text: a keyword in it answers with the reply, other
    text gets nothing."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write("keywords", KEYWORDS)
        h.load()
        asker, chatter = h.contacts()[:2]
        h.gateway.sandbox_incoming_message(asker, "请问价格多少？")
        h.gateway.sandbox_incoming_message(chatter, "谢谢")
        await h.run()
        assert (h.outbox(asker), h.outbox(chatter)) == (["价格表"], [])
        (message,) = [e for e in store.recent_events(h.db, contact_id=asker) if e.kind is CustomerEventKind.MESSAGE]
        assert message.text == "请问价格多少？"
        await h.app.close()

    run(go())


def test_staff_tagging_and_a_customer_leaving_reach_the_database(tmp_path: Path) -> None:
    """A tag staff put on (a new tag, by name) is a tag_added event and on the contact after the next sync; a
    customer who deletes the account is a contact_removed event at once and no longer listed after the sync."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        tagged, leaving = h.contacts()[:2]
        bought = h.gateway.sandbox_tag(tagged, "已购")
        h.gateway.sandbox_remove_contact(leaving)
        await h.run()
        removed = [e.kind for e in store.recent_events(h.db, contact_id=leaving)]
        assert removed == [CustomerEventKind.CONTACT_REMOVED]
        await h.app.sync()
        events = [(e.kind, e.data.get("tag")) for e in store.recent_events(h.db, contact_id=tagged)]
        assert events == [(CustomerEventKind.TAG_ADDED, "已购")]
        assert bought.id in store.contact_states(h.db, [tagged])[tagged].tag_ids
        assert leaving not in h.contacts()
        assert len(store.recent_events(h.db, contact_id=leaving)) == 1  # the sync's removal is the same event
        await h.app.close()

    run(go())

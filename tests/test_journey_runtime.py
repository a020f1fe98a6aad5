"""The journey engine on the sandbox with an injected clock: entering exactly once, stepping, sending through the
ledger, opt-out, tags, goto, schedule and date triggers, backfill (engine.journeys.runtime)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from helpers import run
from journey_harness import Harness, harness

from engine.gateways.base import EventKind
from engine.journeys import events as ev
from storage import journeys as store
from storage import optouts as optouts_db
from storage.models import CustomerEventKind, DeliveryStatus, EnrolmentStatus

SHANGHAI = ZoneInfo("Asia/Shanghai")
MONDAY_9 = datetime(2026, 11, 23, 9, 0, tzinfo=SHANGHAI).astimezone(UTC)  # Monday 09:00 in Shanghai


def local(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=SHANGHAI).astimezone(UTC)


WELCOME = """kind: journey
name: 新客欢迎
trigger: contact_added
exit_when: [{tag: 已购}]
steps:
  - id: welcome
    send: {template: "{{ display_name }}您好，欢迎！"}
    transactional: true
  - wait: {days: 1, at: "10:00"}
  - id: tip
    send: {template: 小贴士}
  - wait: {days: 2, at: "10:00"}
  - id: coupon
    send: {template: 优惠券}
"""


def customer(h: Harness, index: int = 0, *, tag: str | None = None) -> str:
    """A friend of the account who is not a coworker (a contact every journey can reach), with `tag` if given."""
    from storage.contacts import load_contact_views

    views = [v for v in load_contact_views(h.db) if v["friend"] and not v["coworker"]]
    if tag is not None:
        views = [v for v in views if tag in v["tags"]]
    return str(views[index]["id"])


def test_a_new_contact_gets_the_welcome_at_once_then_each_step_at_its_local_time(db_url: str, tmp_path: Path) -> None:
    """Welcome at the event (Monday 09:00), tip on Tuesday 10:00, coupon Thursday 10:00: one each, at those times."""

    async def go() -> None:
        h = await harness(tmp_path, db_url, MONDAY_9)
        h.write("welcome", WELCOME)
        h.load()
        cid = customer(h)
        h.emit(EventKind.CONTACT_ADDED, cid)
        await h.run()
        assert h.outbox(cid) == [h.outbox(cid)[0]] and h.outbox(cid)[0].endswith("您好，欢迎！")
        sent = {r.dedupe_key: r.sent_at for r in store_deliveries(h, cid)}
        assert sent[f"welcome|{cid}|1|welcome"] == MONDAY_9  # within the same instant of the (fake) clock
        await h.at(local(24, 9, 59))
        assert len(h.outbox(cid)) == 1
        await h.at(local(24, 10))
        assert h.outbox(cid)[1:] == ["小贴士"]
        await h.at(local(26, 10))
        assert h.outbox(cid)[2:] == ["优惠券"]
        await h.advance(days=3)
        assert len(h.outbox(cid)) == 3
        (enrolment,) = store.enrolments(h.db, contact_id=cid)
        assert enrolment.status is EnrolmentStatus.COMPLETED
        await h.app.close()

    run(go())


def store_deliveries(h: Harness, contact_id: str) -> list:  # type: ignore[type-arg]
    from storage import deliveries as deliveries_db

    return deliveries_db.list_deliveries(h.db, contact_id=contact_id, limit=100)


def test_tagged_before_a_step_the_contact_exits_and_gets_nothing_more(tmp_path: Path) -> None:
    """Tagged 已购 after the tip: the coupon never goes, and the path says why the enrolment ended."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write("welcome", WELCOME)
        h.load()
        cid = customer(h)
        h.emit(EventKind.CONTACT_ADDED, cid)
        await h.run()
        await h.at(local(24, 10))
        await tag_contact(h, cid, "已购")
        await h.at(local(26, 10))
        assert h.outbox(cid)[1:] == ["小贴士"]
        (enrolment,) = store.enrolments(h.db, contact_id=cid)
        assert enrolment.status is EnrolmentStatus.EXITED and "已购" in enrolment.reason
        await h.app.close()

    run(go())


async def tag_contact(h: Harness, contact_id: str, tag: str) -> None:
    """The contact gets a tag in WeCom (as a sync would find it): the local tag set changes and the diff is
    recorded as events."""
    from storage import contacts as contacts_db

    tags = {t.name: t.id for t in contacts_db.tags_with_counts(h.db)}
    if tag not in tags:
        store.add_tag(h.db, f"tag-{tag}", tag)
        tags[tag] = f"tag-{tag}"
    before = store.contact_states(h.db, [contact_id])
    store.set_contact_tags(h.db, contact_id, [*before[contact_id].tag_ids, tags[tag]], h.clock.now())
    after = store.contact_states(h.db, [contact_id])
    names = {v: k for k, v in tags.items()}
    h.engine.record(ev.diff(before, after, now=h.clock.now(), tag_names=names, added_at={}))


def test_an_add_seen_by_the_stream_and_by_the_next_sync_enters_once(db_url: str, tmp_path: Path) -> None:
    """The same new contact reported by the gateway's event and found again by a sync diff is one inbox event, one
    enrolment, one welcome."""

    async def go() -> None:
        h = await harness(tmp_path, db_url, MONDAY_9)
        h.write("welcome", WELCOME)
        h.load()
        cid = customer(h)
        h.emit(EventKind.CONTACT_ADDED, cid)
        await h.run()
        gone = {cid: store.ContactState(False, frozenset())}
        back = {cid: store.ContactState(True, frozenset())}
        assert h.engine.record(ev.diff(gone, back, now=h.clock.now(), tag_names={}, added_at={})) == 0
        await h.run()
        assert len(store.enrolments(h.db, contact_id=cid)) == 1
        assert h.counts()[cid] == 1
        await h.app.close()

    run(go())


def test_a_contact_who_leaves_and_comes_back_is_a_new_add_but_entry_once_holds(tmp_path: Path) -> None:
    """Removed then added again: a second contact_added event is recorded (a new generation); `entry: once` keeps
    them out, `entry: every_time` lets them in again."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write("welcome", WELCOME)
        h.write("again", WELCOME.replace("name: 新客欢迎", "name: 再次欢迎\nentry: every_time"))
        h.load()
        cid = customer(h)
        h.emit(EventKind.CONTACT_ADDED, cid)
        await h.run()
        h.emit(EventKind.CONTACT_REMOVED, cid)
        h.emit(EventKind.CONTACT_ADDED, cid)
        await h.run()
        kinds = [e.kind for e in store.recent_events(h.db, contact_id=cid)]
        assert kinds.count(CustomerEventKind.CONTACT_ADDED) == 2
        entries = {(e.journey_id, e.entry) for e in store.enrolments(h.db, contact_id=cid)}
        assert entries == {("welcome", 1), ("again", 1), ("again", 2)}
        await h.app.close()

    run(go())


KEYWORDS = """kind: journey
name: 关键词回复
trigger: {message: {keywords: [价格, 地址]}}
quiet_hours: false
steps:
  - if: {message: {keywords: [价格]}}
    then: [{id: price, send: {template: 价格表}, transactional: true}]
    else: [{id: address, send: {template: 门店地址}, transactional: true}]
"""


def test_keyword_replies_match_width_and_case_and_answer_every_time(tmp_path: Path) -> None:
    """ "请问价格" gets the price list, "地址？" the address, and asking again gets another answer."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write("keywords", KEYWORDS)
        h.load()
        cid = customer(h)
        h.emit(EventKind.MESSAGE, cid, message_id="m1", text="请问价格多少")
        h.emit(EventKind.MESSAGE, cid, message_id="m2", text="地址？")
        h.emit(EventKind.MESSAGE, cid, message_id="m3", text="价格")
        h.emit(EventKind.MESSAGE, cid, message_id="m3", text="价格")  # the same message delivered twice
        h.emit(EventKind.MESSAGE, cid, message_id="m4", text="谢谢")
        await h.run()
        assert sorted(h.outbox(cid)) == ["价格表", "价格表", "门店地址"]
        await h.app.close()

    run(go())


def test_td_opts_out_with_one_confirmation_and_every_campaign_and_journey_skips_them(tmp_path: Path) -> None:
    """ "ＴＤ" (full width) opts out: one confirmation, however often they write it; a marketing journey no longer
    enters them, a campaign run records them skipped "opted out", and a keyword reply still answers them."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write("welcome", WELCOME)
        h.write("keywords", KEYWORDS)
        h.load()
        cid = customer(h)
        h.emit(EventKind.MESSAGE, cid, message_id="m1", text="ＴＤ")
        h.emit(EventKind.MESSAGE, cid, message_id="m2", text=" td。")
        await h.run()
        assert optouts_db.opted_out(h.db) == {cid}
        assert h.outbox(cid) == [h.settings.opt_out.reply]
        h.emit(EventKind.CONTACT_ADDED, cid)
        h.emit(EventKind.MESSAGE, cid, message_id="m3", text="价格")
        await h.run()
        assert h.outbox(cid)[1:] == ["价格表"]
        assert not store.enrolments(h.db, journey_id="welcome")
        from helpers import PLAIN, campaign

        outcome = await h.app.run_campaign(campaign(h.settings, PLAIN), login_wait=0)
        reasons = {r.contact_id: r.reason for r in store_deliveries(h, cid) if r.campaign_id == "c1"}
        assert reasons == {cid: "opted_out: opted out"}
        assert outcome.summary is not None and h.counts()[cid] == 2
        await h.app.close()

    run(go())


def test_an_opt_out_after_planning_is_honoured_at_send_time(tmp_path: Path) -> None:
    """A journey send planned before the contact opted out (it waits in the dispatcher's queue) is skipped when its
    turn comes, with the reason."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write("promo", "name: 促销\ntrigger: {tag_added: VIP}\nquiet_hours: false\nmessage: {template: 促销}\n")
        h.load()
        cid = customer(h)
        await tag_contact(h, cid, "VIP")
        await h.engine.tick()  # planned, not yet dispatched
        optouts_db.opt_out(h.db, cid, h.clock.now(), source="test")
        await h.run()
        assert h.outbox(cid) == []
        ((_key, status, reason),) = h.deliveries(cid)
        assert status is DeliveryStatus.SKIPPED and reason == "opted_out: opted out"
        await h.app.close()

    run(go())


def test_a_step_re_run_after_a_crash_finds_its_delivery_and_never_plans_a_second(tmp_path: Path) -> None:
    """A second engine (a restarted process) steps the same enrolments again from a stale read: the compare-and-set
    moves lose, the dedupe key holds, and each customer gets one welcome."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write("welcome", WELCOME)
        h.load()
        ids = [customer(h, i) for i in range(5)]
        for cid in ids:
            h.emit(EventKind.CONTACT_ADDED, cid)
        await h.engine.tick()
        stale = store.due_enrolments(h.db, h.clock.now() + timedelta(days=9), ["welcome"])
        assert not stale  # every enrolment is at its send, waiting for the delivery
        from engine.journeys.runtime import JourneyEngine

        other = JourneyEngine(h.db, h.gateway, h.settings, clock=h.clock)
        other.set_journeys(h.engine.journeys.values())
        await other.tick()
        await h.run()
        assert h.counts() == dict.fromkeys(ids, 1)
        await h.app.close()

    run(go())


def test_wait_for_a_reply_goes_on_at_the_reply_or_takes_the_timeout_branch(tmp_path: Path) -> None:
    """Two contacts asked a question: the one who answers gets the thanks at once; the other, after 2 days, the
    timeout branch's reminder."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write(
            "survey",
            "name: 回访\ntrigger: {tag_added: 待回访}\nquiet_hours: false\nfrequency_cap: false\nsteps:\n"
            "  - send: {template: 满意吗？}\n  - wait: {for: reply, timeout: 2d}\n"
            "    on_timeout: [{send: {template: 提醒}}, exit]\n  - send: {template: 谢谢反馈}\n",
        )
        h.load()
        a, b = customer(h, 0), customer(h, 1)
        await tag_contact(h, a, "待回访")
        await tag_contact(h, b, "待回访")
        await h.run()
        await h.advance(hours=3)
        h.emit(EventKind.MESSAGE, a, message_id="r1", text="很满意")
        await h.run()
        assert h.outbox(a) == ["满意吗？", "谢谢反馈"]
        await h.advance(days=2)
        assert h.outbox(b) == ["满意吗？", "提醒"]
        assert h.outbox(a) == ["满意吗？", "谢谢反馈"]
        await h.app.close()

    run(go())


def test_goto_enters_the_other_journey_under_its_own_entry_policy(tmp_path: Path) -> None:
    """A VIP is moved to the VIP journey (entered once); the first journey ends with `goto`."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write("first", "name: 分流\ntrigger: contact_added\nsteps:\n  - if: {tag: VIP}\n    then: [{goto: vip}]\n")
        h.write("vip", "name: VIP\ntrigger: message\nquiet_hours: false\nsteps: [{send: {template: VIP专属}}]\n")
        h.load()
        cid = customer(h, tag="VIP")
        h.emit(EventKind.CONTACT_ADDED, cid)
        await h.run()
        assert h.outbox(cid) == ["VIP专属"]
        states = {e.journey_id: (e.status, e.reason) for e in store.enrolments(h.db, contact_id=cid)}
        assert states["first"] == (EnrolmentStatus.COMPLETED, "goto vip")
        assert states["vip"][0] is EnrolmentStatus.COMPLETED
        await h.app.close()

    run(go())


RING = "name: {name}\ntrigger: {trigger}\nentry: {entry}\nfrequency_cap: false\nquiet_hours: false\nsteps:\n" + (
    "  - send: {{template: {name}}}\n  - goto: {target}\n"
)


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_a_ring_of_every_time_journeys_is_refused_and_sends_nothing(tmp_path: Path, lang: str) -> None:
    """Two `entry: every_time` journeys that goto each other would send a contact their messages without end (335
    in 20 s before): both files are refused at their goto, naming the ring, and nothing is sent. With one of them
    entered once the ring ends: each message goes out as often as the entry policies allow, and no more."""
    from engine.definitions import load_definitions
    from engine.i18n import Language, use_language

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write("ring_a", RING.format(name="甲", trigger="contact_added", entry="every_time", target="ring_b"))
        h.write("ring_b", RING.format(name="乙", trigger="{tag_added: X}", entry="every_time", target="ring_a"))
        with use_language(Language.ZH if lang == "zh" else Language.EN):
            defs = load_definitions([tmp_path / "campaigns"], h.settings)
        said = sorted(str(e) for e in defs.errors)
        assert len(said) == 2 and not defs.journeys
        words = "所有旅程都是 entry: every_time" if lang == "zh" else "all have entry: every_time"
        assert "ring_a.yaml:8: steps[1].goto:" in said[0] and "ring_a → ring_b → ring_a" in said[0]
        assert all(words in s for s in said), said
        h.engine.set_journeys(defs.journeys)
        cid = customer(h)
        h.emit(EventKind.CONTACT_ADDED, cid)
        await h.run()
        assert h.outbox(cid) == []

        h.write("ring_b", RING.format(name="乙", trigger="{tag_added: X}", entry="once", target="ring_a"))
        h.load()
        other = customer(h, 1)
        h.emit(EventKind.CONTACT_ADDED, other)
        await h.run()
        assert h.outbox(other) == ["甲", "乙", "甲"]  # b is entered once: the second goto into it is refused
        await h.app.close()

    run(go())


def test_a_schedule_trigger_enters_the_audience_at_each_fire(tmp_path: Path) -> None:
    """A daily 10:00 journey: nobody before the first fire after it was loaded, then the audience at 10:00, each
    contact once per fire."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9, contacts=12)
        h.write(
            "daily",
            "name: 每日\ntrigger: {schedule: {cron: '0 10 * * *'}}\nfrequency_cap: false\nquiet_hours: false\n"
            "audience: {tags_any: [VIP, 普通会员]}\nmessage: {template: 早安}\n",
        )
        h.load()
        await h.run()
        assert h.counts() == {}
        await h.at(local(23, 10))
        first = h.counts()
        assert first and set(first.values()) == {1}
        await h.at(local(24, 10))
        assert h.counts() == dict.fromkeys(first, 2)
        await h.app.close()

    run(go())


def test_a_date_trigger_enters_on_the_contact_birthday_once_a_year(tmp_path: Path) -> None:
    """Birthday 11-24 in additional_info: entered on 24 November at 09:30, not the day before, once."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write(
            "birthday",
            "name: 生日\ntrigger: {date: {field: birthday, at: '09:30'}}\nfrequency_cap: false\n"
            "message: {template: 生日快乐}\n",
        )
        cid = customer(h)
        set_field(h, cid, birthday="1990-11-24")
        h.load()
        await h.at(local(23, 9, 30))
        assert h.counts() == {}
        await h.at(local(24, 9, 30))
        await h.at(local(25, 9, 30))
        assert h.counts() == {cid: 1}
        await h.app.close()

    run(go())


def set_field(h: Harness, contact_id: str, **info: str) -> None:
    """Give a contact extra fields (additional_info), as a CRM import would."""
    import dataclasses

    from engine.contacts import record_to_row
    from storage import contacts as contacts_db

    record = h.gateway._by_id[contact_id]
    row = record_to_row(record)
    contacts_db.upsert_contacts(
        h.db, [dataclasses.replace(row, additional_info={**row.additional_info, **info})], h.clock.now()
    )


def test_backfill_enters_contacts_that_already_have_the_tag_once(tmp_path: Path) -> None:
    """`backfill: true` on a tag_added journey: everyone already tagged enters when the journey is first loaded —
    once, however often it is reloaded."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9, contacts=40)
        h.write(
            "vip",
            "name: VIP\ntrigger: {tag_added: VIP}\nbackfill: true\nfrequency_cap: false\nquiet_hours: false\n"
            "message: {template: VIP您好}\n",
        )
        from storage.contacts import load_contact_views

        vips = {v["id"] for v in load_contact_views(h.db) if "VIP" in v["tags"] and v["friend"] and not v["coworker"]}
        assert vips
        h.load()
        await h.run()
        h.load()
        await h.run()
        assert h.counts() == dict.fromkeys(vips, 1)
        await h.app.close()

    run(go())


def test_a_contact_lacking_a_template_field_is_skipped_with_the_reason_and_the_journey_goes_on(tmp_path: Path) -> None:
    """The first send names {{ city }}, which this contact lacks: recorded skipped (missing_field), and the next
    step still runs."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9, contacts=100)
        h.write(
            "city",
            "name: 城市\ntrigger: contact_added\nquiet_hours: false\nfrequency_cap: false\nsteps:\n"
            "  - {id: a, send: {template: '{{ city }}见'}}\n  - {id: b, send: {template: 你好}}\n",
        )
        h.load()
        from storage.contacts import load_contact_views

        cid = next(
            str(v["id"]) for v in load_contact_views(h.db) if not v["city"] and v["friend"] and not v["coworker"]
        )
        h.emit(EventKind.CONTACT_ADDED, cid)
        await h.run()
        assert h.outbox(cid) == ["你好"]
        reasons = {k.rsplit("|", 1)[1]: (s, r) for k, s, r in h.deliveries(cid)}
        assert reasons["a"][0] is DeliveryStatus.SKIPPED and "city" in reasons["a"][1]
        assert h.path(cid)[:2] == [("a", "skipped"), ("b", "sent")]
        await h.app.close()

    run(go())


def test_marketing_sends_respect_the_shared_frequency_cap_transactional_ones_do_not(tmp_path: Path) -> None:
    """With a cap of 1 a day, a second marketing send the same day is skipped (frequency_cap); a transactional
    welcome does not count and is not held back."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write(
            "two",
            "name: 两条\ntrigger: contact_added\nquiet_hours: false\nfrequency_cap: {max: 1, per: day}\nsteps:\n"
            "  - {id: hi, send: {template: 欢迎}, transactional: true}\n"
            "  - {id: m1, send: {template: 营销一}}\n  - {id: m2, send: {template: 营销二}}\n",
        )
        h.load()
        cid = customer(h)
        h.emit(EventKind.CONTACT_ADDED, cid)
        await h.run()
        assert h.outbox(cid) == ["欢迎", "营销一"]
        statuses = {k.rsplit("|", 1)[1]: (s, r) for k, s, r in h.deliveries(cid)}
        assert statuses["m2"][0] is DeliveryStatus.SKIPPED and statuses["m2"][1].startswith("frequency_cap")
        await h.app.close()

    run(go())


def test_a_sync_records_new_contacts_removals_and_tag_changes_but_the_first_sync_is_the_baseline(
    db_url: str, tmp_path: Path
) -> None:
    """The first sync of a database records no events; a later one records the contacts that came back and the
    tags the gateway has that the database did not."""

    async def go() -> None:
        from storage import contacts as contacts_db

        h = await harness(tmp_path, db_url, MONDAY_9)
        assert store.recent_events(h.db) == []
        back, retagged = customer(h, 0), customer(h, 1, tag="普通会员")
        contacts_db.mark_gone(h.db, [back], h.clock.now())
        tags = sorted(store.contact_states(h.db, [retagged])[retagged].tag_ids)
        store.set_contact_tags(h.db, retagged, [t for t in tags if t != "tag-member"], h.clock.now())
        result = await h.app.sync()
        found = {(e.kind, e.contact_id, e.data.get("tag", "")) for e in store.recent_events(h.db)}
        assert (CustomerEventKind.CONTACT_ADDED, back, "") in found
        assert (CustomerEventKind.TAG_ADDED, retagged, "普通会员") in found
        assert result.events == len(found)
        assert await h.app.sync() and len(store.recent_events(h.db)) == len(found)  # nothing changed since
        await h.app.close()

    run(go())


def test_wecast_serve_s_scheduler_loads_and_runs_journeys_beside_campaigns(tmp_path: Path) -> None:
    """The scheduler of `wecast serve` loads journey files with the campaigns and runs them: a stream event enters
    the welcome journey and its send goes out through a dispatch task the service tracks."""

    async def go() -> None:
        from engine.scheduler import CampaignScheduler

        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write("welcome", WELCOME)
        h.write("bad", "name: 坏\ntrigger: contact_added\nsteps: []\n")
        scheduler = CampaignScheduler(h.app)
        await scheduler.start(loop=False)
        assert "welcome" in h.app.journeys.journeys
        assert any("bad.yaml" in str(e) for e in scheduler.errors)
        cid = customer(h)
        h.gateway.emit(EventKind.CONTACT_ADDED, contact_id=cid)
        await scheduler.journeys.until_idle()
        assert len(h.outbox(cid)) == 1
        await scheduler.stop()
        await scheduler.workers.drain(5)
        await h.app.close()

    run(go())


def test_a_journey_run_another_live_process_sends_is_left_to_it_until_that_process_dies(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two `wecast serve` on one database: the runner does not ask, every tick, for a journey run a live process
    dispatches (each ask was refused with a warning, once a second per open run); once that process is gone
    (killed), the run is taken over and its reply sent, once."""
    import os
    import socket
    import subprocess
    import sys

    from storage.runs import take_over

    async def go() -> None:
        h = await harness(tmp_path, db_url, MONDAY_9)
        h.write("keywords", KEYWORDS)
        h.load()
        cid = customer(h)
        h.emit(EventKind.MESSAGE, cid, message_id="m1", text="价格")
        report = await h.engine.tick()  # planned, not dispatched
        [run_id] = report.runs
        alive = f"{socket.gethostname()}:{os.getpid()}:0ther0wn"  # another dispatcher, alive (this very process)
        assert take_over(h.db, run_id, expected_owner="", owner=alive, now=h.clock.now(), resend_in_flight=False)
        for _ in range(3):
            assert (await h.runner.step()).owned == {run_id}
        assert not h.runner.tasks and "not dispatched here" not in caplog.text and h.outbox(cid) == []
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        dead = f"{socket.gethostname()}:{gone.pid}:deadbeef"  # then killed: its pid is gone
        assert take_over(h.db, run_id, expected_owner=alive, owner=dead, now=h.clock.now(), resend_in_flight=False)
        await h.run()
        assert h.outbox(cid) == ["价格表"]
        await h.app.close()

    run(go())

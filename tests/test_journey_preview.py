"""`engine.journeys.preview` agrees with the engine: a contact's dry-run timeline lists exactly the messages (text and
local time), branches and end that an actual run on the sandbox with an injected clock then produces, with the
customer doing what the preview assumed (through the simulated-customer path, engine.sandbox_events); and who a
schedule journey's preview says would enter is who its next fire enters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from helpers import run
from journey_harness import Harness, harness
from test_journey_runtime import set_field

from engine.audience import ReasonCode
from engine.errors import WecastError
from engine.gateways.base import EventKind
from engine.journeys.preview import Assumption, entry_preview, timeline, tree
from engine.sandbox_events import SandboxEventBody, simulate
from storage import deliveries as deliveries_db
from storage import journeys as store
from storage import optouts as optouts_db
from storage.models import DeliveryStatus

SHANGHAI = ZoneInfo("Asia/Shanghai")
MONDAY_9 = datetime(2026, 11, 23, 9, 0, tzinfo=SHANGHAI).astimezone(UTC)

JOURNEY = """kind: journey
name: 预览一致
timezone: Asia/Shanghai
trigger: contact_added
quiet_hours: {start: "21:00", end: "09:00"}
frequency_cap: false
exit_when: [{tag: 已购}]
steps:
  - id: welcome
    send: {template: "{{ display_name }}您好，欢迎！"}
    transactional: true
  - wait: 13h
  - id: late
    send: {template: "晚上好，{{ display_name }}"}
  - id: ask
    wait: {for: reply, timeout: 2d}
    on_timeout: [{id: nudge, send: {template: 还在吗？}}, {id: mark, tag: {add: [沉默]}}]
  - id: check
    if: {replied: true}
    then: [{id: thanks, send: {template: 谢谢回复}}]
    else: [{id: coupon, send: {template: "{{ display_name }}的优惠券"}}]
  - wait: {days: 1, at: "10:00"}
  - id: last
    send: {template: 最后一条}
"""


def customer(h: Harness) -> str:
    from storage.contacts import load_contact_views

    views = [v for v in load_contact_views(h.db) if v["friend"] and not v["coworker"] and "勿扰" not in v["tags"]]
    return str(views[0]["id"])


# (assumptions, the sends expected as (step, local time), how it ends, the branch outcomes)
CASES = {
    "nobody writes": (
        [],
        [
            ("welcome", "11-23 09:00"),
            ("late", "11-24 09:00"),
            ("nudge", "11-26 09:00"),
            ("coupon", "11-26 09:00"),
            ("last", "11-27 10:00"),
        ],
        "completed",
    ),
    "a reply in the afternoon": (
        ["message:好的@30h"],
        [("welcome", "11-23 09:00"), ("late", "11-24 09:00"), ("thanks", "11-24 15:00"), ("last", "11-25 10:00")],
        "completed",
    ),
    "tagged 已购 while waiting": (
        ["tag:已购@26h"],
        [("welcome", "11-23 09:00"), ("late", "11-24 09:00")],
        "exited",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_timeline_is_what_a_run_then_does(db_url: str, tmp_path: Path, case: str) -> None:
    """The preview's sends (step, exact text, local time: quiet hours move the 22:00 send to 09:00), its branches
    and its end are those of the run that follows, the customer doing what was assumed at the assumed time."""
    assumed, expected, ends = CASES[case]

    async def go() -> None:
        h = await harness(tmp_path, db_url, MONDAY_9)
        h.write("agree", JOURNEY)
        h.load()
        cid = customer(h)
        journey = h.engine.journeys["agree"]
        assumptions = [Assumption.parse(a) for a in assumed]
        line = timeline(h.db, journey, cid, MONDAY_9, assume=assumptions)
        sends = [e for e in line.entries if e.outcome == "send"]
        assert [(e.step, e.at.astimezone(SHANGHAI).strftime("%m-%d %H:%M")) for e in sends] == expected
        assert line.ends == ends and line.sends == len(expected)
        if case == "nobody writes":
            assert any(e.outcome == "quiet_hours" and e.step == "late" for e in line.entries)

        # The run: the contact adds us now; the clock visits each moment of the timeline and of the assumptions.
        h.emit(EventKind.CONTACT_ADDED, cid)
        acts = {MONDAY_9 + a.after: a for a in assumptions}
        for moment in sorted({e.at for e in line.entries} | set(acts) | {MONDAY_9 + timedelta(days=6)}):
            h.clock.set(moment)
            act = acts.get(moment)
            if act is not None:
                if act.kind == "message":
                    body = SandboxEventBody(action="message", contact_id=cid, text=act.value)
                else:
                    body = SandboxEventBody(action="tag", contact_id=cid, tag=act.value)
                await simulate(h.db, h.gateway, h.clock, body)
            await h.run()

        got = sorted(
            (
                d
                for d in deliveries_db.list_deliveries(h.db, contact_id=cid, limit=50)
                if d.status is DeliveryStatus.SENT
            ),
            key=lambda d: d.id,
        )
        assert [(d.dedupe_key or "").rsplit("|", 1)[1] for d in got] == [e.step for e in sends]
        assert [d.sent_at for d in got] == [e.at for e in sends]
        assert [d.text for d in got] == [e.message for e in sends]
        assert h.outbox(cid) == [e.message for e in sends]
        (enrolment,) = store.enrolments(h.db, contact_id=cid)
        assert enrolment.status.value == ends and enrolment.ended_at == line.entries[-1].at  # when it ends, too
        branches = {"then", "else", "timeout", "event"}
        ran = [(p.step, p.outcome) for p in store.contact_path(h.db, cid) if p.outcome in branches]
        assert ran == [(e.step, e.outcome) for e in line.entries if e.outcome in branches]
        await h.app.close()

    run(go())


def test_the_timeline_sends_and_writes_nothing(tmp_path: Path) -> None:
    """A dry run leaves no enrolment, delivery, event or outbox message behind; the tree nests the branches."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write("agree", JOURNEY)
        h.load()
        cid = customer(h)
        journey = h.engine.journeys["agree"]
        line = timeline(h.db, journey, cid, MONDAY_9, assume=[Assumption.parse("tag:VIP")])
        first = next(e for e in line.entries if e.outcome == "send")
        assert line.sends == 5 and first.message == f"{line.name}您好，欢迎！"
        assert store.enrolments(h.db, contact_id=cid) == []
        assert deliveries_db.list_deliveries(h.db, contact_id=cid) == []
        assert store.recent_events(h.db, contact_id=cid) == [] and h.outbox() == []
        nodes = tree(journey)
        assert [n.id for n in nodes] == ["welcome", "2", "late", "ask", "check", "6", "last"]
        ask = nodes[3]
        assert [(b.label, [s.id for s in b.steps]) for b in ask.branches] == [("on_timeout", ["nudge", "mark"])]
        check = nodes[4]
        assert [(b.label, [s.id for s in b.steps]) for b in check.branches] == [
            ("then", ["thanks"]),
            ("else", ["coupon"]),
        ]
        await h.app.close()

    run(go())


def test_a_contact_the_audience_or_the_entry_policy_keeps_out_would_not_enter(tmp_path: Path) -> None:
    """Opted out: would not enter, with the campaign's words; after an entry, `entry: once` keeps them out."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write("agree", JOURNEY)
        h.load()
        cid = customer(h)
        journey = h.engine.journeys["agree"]
        optouts_db.opt_out(h.db, cid, MONDAY_9, source="manual")
        line = timeline(h.db, journey, cid, MONDAY_9)
        assert not line.enters and line.ends == "not_entered" and line.entries[-1].detail == "opted out"
        optouts_db.opt_in(h.db, cid)
        h.emit(EventKind.CONTACT_ADDED, cid)
        await h.run()
        again = timeline(h.db, journey, cid, MONDAY_9)
        assert again.ends == "not_entered" and "already in this journey" in again.entries[-1].detail
        await h.app.close()

    run(go())


SCHEDULED = """kind: journey
name: 每日唤醒
trigger: {schedule: {cron: "0 10 * * *"}}
audience: {tags_none: [勿扰]}
quiet_hours: false
frequency_cap: false
steps: [{id: hello, send: {template: 早上好}}]
"""


def test_who_a_schedule_journey_would_enter_is_who_its_next_fire_enters(tmp_path: Path) -> None:
    """The preview at 09:00 names the 10:00 fire, leaves out the opted-out contact (opted_out) and those tagged 勿扰
    (tags_none), and the fire then enters exactly the contacts it listed."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write("daily", SCHEDULED)
        h.load()
        await h.run()
        cid = customer(h)
        optouts_db.opt_out(h.db, cid, MONDAY_9, source="manual")
        journey = h.engine.journeys["daily"]
        p = entry_preview(h.db, journey, MONDAY_9, sample=None)
        assert p.mode == "schedule" and p.at == MONDAY_9 + timedelta(hours=1)
        codes = {e.id: e.reason_code for e in p.left_out}
        assert codes[cid] is ReasonCode.OPTED_OUT
        assert ReasonCode.TAGS_NONE in codes.values()
        assert p.entering + p.excluded == p.contacts
        await h.at(MONDAY_9 + timedelta(hours=1))
        entered = {e.contact_id for e in store.enrolments(h.db, journey_id="daily", limit=10_000)}
        assert entered == {e.id for e in p.entrants}
        after = entry_preview(h.db, journey, MONDAY_9 + timedelta(hours=1), sample=None)
        assert after.entering == p.entering  # every_time: the next fire enters them again
        await h.app.close()

    run(go())


@pytest.mark.parametrize(
    ("text", "kind", "value", "after"),
    [
        ("replied", "message", "OK", timedelta(0)),
        ("message:价格", "message", "价格", timedelta(0)),
        ("tag:已购@2d", "tag", "已购", timedelta(days=2)),
        ("untag:VIP@90m", "untag", "VIP", timedelta(minutes=90)),
        ("optout@1h", "optout", "", timedelta(hours=1)),
        ("removed", "removed", "", timedelta(0)),
    ],
)
def test_assumptions_parse(text: str, kind: str, value: str, after: timedelta) -> None:
    """Each way of saying what the customer does, with its delay."""
    a = Assumption.parse(text)
    assert (a.kind, a.value, a.after) == (kind, value, after)


@pytest.mark.parametrize("text", ["tag:", "buy:x", "replied@soon", "optout:x"])
def test_a_wrong_assumption_says_what_may_be_assumed(text: str) -> None:
    """A typo is an error naming the forms (never silently ignored)."""
    with pytest.raises(WecastError, match=r"replied|duration"):
        Assumption.parse(text)


BACKFILL = """kind: journey
name: VIP欢迎
trigger: {tag_added: VIP}
backfill: true
audience: {tags_none: [勿扰]}
frequency_cap: false
quiet_hours: false
message: {template: VIP您好}
"""


def test_who_a_backfill_would_enter_is_who_the_first_load_enters(tmp_path: Path) -> None:
    """Before the journey is first loaded its preview is a backfill: the contacts tagged VIP that the audience lets
    in; loading it enters exactly those; afterwards no backfill is pending (only events enter)."""

    async def go() -> None:
        from engine.definitions import load_definitions

        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9, contacts=60)
        h.write("vip", BACKFILL)
        (journey,) = load_definitions([h.tmp / "campaigns"], h.settings).journeys
        p = entry_preview(h.db, journey, MONDAY_9, sample=None)
        assert p.mode == "backfill" and p.entering > 0 and p.enters_without_event
        assert all(
            e.reason_code in (ReasonCode.TAGS_NONE, ReasonCode.NOT_FRIEND, ReasonCode.COWORKER) for e in p.left_out
        )
        h.load()
        await h.run()
        entered = {e.contact_id for e in store.enrolments(h.db, journey_id="vip", limit=10_000)}
        assert entered == {e.id for e in p.entrants}
        assert set(h.counts()) == entered
        assert entry_preview(h.db, journey, MONDAY_9, sample=None).mode == "event"
        await h.app.close()

    run(go())


def test_who_a_date_journey_would_enter_is_whose_date_the_next_fire_is(tmp_path: Path) -> None:
    """A birthday journey at 09:30: the preview at 09:00 names the contact whose birthday is today, and the fire
    enters exactly them."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write(
            "birthday",
            "name: 生日\ntrigger: {date: {field: birthday, at: '09:30'}}\nfrequency_cap: false\nquiet_hours: false\n"
            "message: {template: 生日快乐}\n",
        )
        cid = customer(h)
        set_field(h, cid, birthday="1990-11-23")
        h.load()
        await h.run()
        p = entry_preview(h.db, h.engine.journeys["birthday"], MONDAY_9, sample=None)
        assert p.mode == "date" and p.at == MONDAY_9 + timedelta(minutes=30)
        assert [e.id for e in p.entrants] == [cid] and p.contacts == 1
        await h.at(MONDAY_9 + timedelta(minutes=30))
        assert {e.contact_id for e in store.enrolments(h.db, journey_id="birthday")} == {cid}
        await h.app.close()

    run(go())


FIRST = """name: 第一段
trigger: contact_added
steps:
  - id: hello
    send: {template: "{{ display_name }}您好"}
  - wait: 1d
  - id: onward
    goto: second
"""
SECOND = """name: 第二段
trigger: {tag_added: 老客}
frequency_cap: false
steps:
  - id: more
    send: {template: 第二段的第一条}
  - wait: 2h
  - id: bye
    send: {template: 第二段的最后一条}
  - id: back
    goto: first
"""


def test_the_timeline_follows_a_goto_into_the_target_journey_and_stops_at_a_loop(tmp_path: Path) -> None:
    """A goto does not end the dry run: the contact goes on through the target journey's steps (its sends, at the
    times a run then sends them); the target's goto back to the first journey ends the timeline saying so."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write("first", FIRST)
        h.write("second", SECOND)
        h.load()
        cid = customer(h)
        line = timeline(h.db, h.engine.journeys["first"], cid, MONDAY_9, journeys=h.engine.journeys)
        sends = [e for e in line.entries if e.outcome == "send"]
        assert [(e.journey, e.step) for e in sends] == [("first", "hello"), ("second", "more"), ("second", "bye")]
        assert line.journeys == ["first", "second"] and line.ends == "loop" and line.sends == 3
        gotos = [e for e in line.entries if e.outcome == "goto"]
        assert [(e.journey, e.step) for e in gotos] == [("first", "onward"), ("second", "back")]
        assert "first" in gotos[-1].detail and line.entries[-1] == gotos[-1]
        assert any(e.outcome == "entered" and e.journey == "second" and e.step == "more" for e in line.entries)

        # The run sends the same messages at the same times, then leaves both journeys (first is entered once).
        h.emit(EventKind.CONTACT_ADDED, cid)
        for moment in sorted({e.at for e in line.entries} | {MONDAY_9 + timedelta(days=3)}):
            await h.at(moment)
        got = sorted(
            (
                d
                for d in deliveries_db.list_deliveries(h.db, contact_id=cid, limit=50)
                if d.status is DeliveryStatus.SENT
            ),
            key=lambda d: d.id,
        )
        assert [(d.text, d.sent_at) for d in got] == [(e.message, e.at) for e in sends]
        states = {e.journey_id: e.reason for e in store.enrolments(h.db, contact_id=cid)}
        assert states == {"first": "goto second", "second": "goto first"}
        await h.app.close()

    run(go())


def test_a_goto_the_target_would_refuse_or_that_leads_nowhere_ends_the_timeline_saying_why(tmp_path: Path) -> None:
    """A target whose audience keeps the contact out, and a target that is not loaded: the timeline ends at the goto
    with the reason, not in the target's steps."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9)
        h.write("first", FIRST)
        h.write("second", SECOND.replace("steps:", "audience: {tags_any: [没有人有的标签]}\nsteps:"))
        h.load()
        cid = customer(h)
        journeys = h.engine.journeys
        line = timeline(h.db, journeys["first"], cid, MONDAY_9, journeys=journeys)
        assert line.ends == "goto" and line.journeys == ["first"] and line.sends == 1
        assert line.entries[-1].outcome == "goto" and "second" in line.entries[-1].detail
        alone = timeline(h.db, journeys["first"], cid, MONDAY_9, journeys={"first": journeys["first"]})
        assert alone.ends == "goto" and alone.entries[-1].outcome == "goto"
        assert alone.entries[-1].detail != line.entries[-1].detail
        await h.app.close()

    run(go())

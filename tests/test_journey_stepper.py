"""The stepper (engine.journeys.stepper): one enrolment's pass through its steps, pure — no database, no clock.

Times are Shanghai local (UTC+8) unless said otherwise; `at(day, hh, mm)` is that local time in November 2026
(the 23rd is a Monday)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from engine.journeys.conditions import Facts
from engine.journeys.spec import Journey, parse_journey
from engine.journeys.stepper import End, GotoDue, Hold, Position, SendDue, TagDue, advance
from engine.settings import Settings
from storage.journeys import EventRow
from storage.models import CustomerEventKind, EnrolmentStatus

SHANGHAI = ZoneInfo("Asia/Shanghai")


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=SHANGHAI).astimezone(UTC)


def journey(body: str, tmp_path: Path) -> Journey:
    return parse_journey("name: 测试旅程\n" + body, tmp_path / "j.yaml", Settings(version=1, campaigns_dir=tmp_path))


def facts(now: datetime, **kw: object) -> Facts:
    contact = {"id": "c1", "name": "王芳", "tags": frozenset(kw.pop("tags", ()))}  # type: ignore[arg-type]
    return Facts(contact=contact, now=now, **kw)  # type: ignore[arg-type]


def message(event_id: int, when: datetime, text: str) -> EventRow:
    return EventRow(
        event_id, f"m{event_id}", CustomerEventKind.MESSAGE, "c1", "stream", {"text": text}, when, when, None
    )


WELCOME = """
trigger: contact_added
exit_when: [{tag: 已购}]
steps:
  - id: welcome
    send: {template: 欢迎}
    transactional: true
  - id: day1
    wait: {days: 1, at: "10:00"}
  - id: tip
    send: {template: 小贴士}
  - id: day3
    wait: {days: 2, at: "10:00"}
  - id: coupon
    send: {template: 优惠券}
"""


def test_a_due_send_stops_the_pass_and_a_wait_holds_until_its_local_time(tmp_path: Path) -> None:
    """Entered Monday 09:00: the welcome is due at once; after it, the wait holds until Tuesday 10:00 local."""
    j = journey(WELCOME, tmp_path)
    first = advance(j, Position("welcome", at(23, 9)), facts(at(23, 9)), at(23, 9))
    assert isinstance(first.stop, SendDue) and first.stop.step.id == "welcome" and not first.stop.skip
    after = advance(j, Position("day1", at(23, 9)), facts(at(23, 9, 1)), at(23, 9, 1))
    assert after.stop == Hold(at(24, 10))


def test_days_at_counts_calendar_days_whatever_the_hour_of_entry(tmp_path: Path) -> None:
    """ "The next day at 10:00" is Tuesday 10:00 for an entry at 00:30 and at 23:50 on Monday alike."""
    j = journey(WELCOME, tmp_path)
    wait = j.index["day1"]
    assert wait.target(at(23, 0, 30), SHANGHAI) == at(24, 10)  # type: ignore[union-attr]
    assert wait.target(at(23, 23, 50), SHANGHAI) == at(24, 10)  # type: ignore[union-attr]


def test_waits_count_from_when_the_step_was_due_not_from_when_the_engine_ran(tmp_path: Path) -> None:
    """The engine comes back Tuesday 10:30 (down since Monday): the day-1 wait, begun Monday 09:00, is over, so the
    pass goes straight on to the tip scheduled for Tuesday 10:00 — the timeline does not shift by the downtime."""
    j = journey(WELCOME, tmp_path)
    result = advance(j, Position("day1", at(23, 9)), facts(at(24, 10, 30)), at(24, 10, 30))
    assert isinstance(result.stop, SendDue) and result.stop.step.id == "tip"
    assert result.position == Position("tip", at(24, 10))
    assert [(e.step, e.outcome) for e in result.log] == [("day1", "waited")]


def test_until_and_weekday_find_the_next_such_local_moment(tmp_path: Path) -> None:
    """until 10:00 on sat/sun from Monday → Saturday 10:00; weekday alone on a listed day → now; until alone after
    the hour → tomorrow."""
    j = journey(
        "trigger: contact_added\nsteps:\n  - id: a\n    wait: {until: '10:00', weekday: [sat, sun]}\n"
        "  - id: b\n    wait: {weekday: 周一}\n  - id: c\n    wait: {until: '08:00'}\n  - exit\n",
        tmp_path,
    )
    assert j.index["a"].target(at(23, 12), SHANGHAI) == at(28, 10)  # type: ignore[union-attr]
    assert j.index["b"].target(at(23, 12), SHANGHAI) == at(23, 12)  # type: ignore[union-attr]
    assert j.index["b"].target(at(24, 12), SHANGHAI) == at(30, 0)  # type: ignore[union-attr]
    assert j.index["c"].target(at(23, 12), SHANGHAI) == at(24, 8)  # type: ignore[union-attr]


def test_exit_when_is_checked_before_every_step(tmp_path: Path) -> None:
    """Tagged 已购 while waiting: at the next look the enrolment exits with the condition as its reason."""
    j = journey(WELCOME, tmp_path)
    result = advance(j, Position("day3", at(24, 10)), facts(at(25, 9), tags={"已购"}), at(25, 9))
    assert result.stop == End(EnrolmentStatus.EXITED, "exit_when: has tag 已购")


def test_opted_out_and_removed_contacts_leave_every_journey_but_replies_to_their_own_message(tmp_path: Path) -> None:
    """An opted-out or removed contact exits; in a journey that answers the customer's own message, an opted-out
    contact stays (its transactional reply may still go)."""
    j = journey(WELCOME, tmp_path)
    now = at(23, 9)
    assert advance(j, Position("tip", now), facts(now, opted_out=True), now).stop == End(
        EnrolmentStatus.EXITED, "opted out"
    )
    assert advance(j, Position("tip", now), facts(now, removed=True), now).stop == End(
        EnrolmentStatus.EXITED, "no longer a contact"
    )
    reply = journey(
        "trigger: {message: {keywords: [价格]}}\nsteps:\n  - send: {template: 价格表}\n    transactional: true\n",
        tmp_path,
    )
    assert isinstance(advance(reply, Position("1", now), facts(now, opted_out=True), now).stop, SendDue)


def test_if_takes_then_or_else_and_logs_why(tmp_path: Path) -> None:
    """A VIP takes `then` (tag step next); anyone else `else`, with the failing condition's reason in the path."""
    j = journey(
        "trigger: contact_added\nsteps:\n  - if: {tag: VIP}\n    then: [{tag: {add: [老客]}}]\n"
        "    else: [{goto: other}]\n",
        tmp_path,
    )
    now = at(23, 9)
    vip = advance(j, Position("1", now), facts(now, tags={"VIP"}), now)
    assert isinstance(vip.stop, TagDue) and [(e.step, e.outcome) for e in vip.log] == [("1", "then")]
    other = advance(j, Position("1", now), facts(now), now)
    assert isinstance(other.stop, GotoDue) and other.log[0].outcome == "else" and "VIP" in other.log[0].detail


WAIT_REPLY = """
trigger: message
quiet_hours: false
steps:
  - id: ask
    wait: {for: reply, timeout: 3d}
    on_timeout: [{exit: 未回复}]
  - id: thanks
    send: {template: 谢谢}
"""


def test_a_wait_for_a_reply_continues_at_the_reply_and_ignores_the_message_that_started_it(tmp_path: Path) -> None:
    """The triggering message does not end the wait; a later message does, and the journey continues from it."""
    j = journey(WAIT_REPLY, tmp_path)
    start = at(23, 9)
    trigger = message(1, start, "你好")
    waiting = advance(j, Position("ask", start), facts(at(23, 12)), at(23, 12), events=[trigger], trigger_event=1)
    assert waiting.stop == Hold(start + timedelta(days=3))
    reply = message(2, at(24, 8), "好的")
    result = advance(j, Position("ask", start), facts(at(24, 8)), at(24, 8), events=[trigger, reply], trigger_event=1)
    assert isinstance(result.stop, SendDue) and result.position == Position("thanks", at(24, 8))


def test_a_wait_for_a_reply_that_times_out_takes_the_timeout_branch(tmp_path: Path) -> None:
    """No reply in 3 days: the on_timeout steps run (here: exit with its reason)."""
    j = journey(WAIT_REPLY, tmp_path)
    result = advance(j, Position("ask", at(23, 9)), facts(at(26, 9)), at(26, 9))
    assert result.stop == End(EnrolmentStatus.EXITED, "未回复")
    assert [e.outcome for e in result.log] == ["timeout", "exit"]


@pytest.mark.parametrize(
    ("policy", "tip", "coupon"),
    [("all", "", ""), ("skip", "missed", "missed"), ("once", "missed", "")],
)
def test_catch_up_policy_for_sends_missed_while_down(tmp_path: Path, policy: str, tip: str, coupon: str) -> None:
    """Down from Monday to Thursday 15:00: the tip (due Tue 10:00) and coupon (due Thu 10:00) are overdue beyond
    grace. all: both go late; skip: both recorded skipped; once: only the latest (the coupon) goes."""
    j = journey(WELCOME.replace("trigger: contact_added", f"trigger: contact_added\ncatch_up: {policy}"), tmp_path)
    now = at(26, 15)
    first = advance(j, Position("day1", at(23, 9)), facts(now), now)
    assert isinstance(first.stop, SendDue) and first.stop.step.id == "tip"
    assert first.stop.skip.startswith(tip) if tip else first.stop.skip == ""
    second = advance(j, Position("day3", first.position.started), facts(now), now)
    assert isinstance(second.stop, SendDue) and second.stop.step.id == "coupon"
    assert second.stop.skip.startswith(coupon) if coupon else second.stop.skip == ""


def test_a_send_due_in_quiet_hours_is_held_until_they_end(tmp_path: Path) -> None:
    """A marketing send due at 22:00 waits until 09:00 (its time moves there, so it is not 'late' then); a
    transactional one goes at once."""
    j = journey(
        "trigger: contact_added\nquiet_hours: {start: '21:00', end: '09:00'}\nsteps:\n"
        "  - id: promo\n    send: {template: 促销}\n"
        "  - id: reply\n    send: {template: 回复}\n    transactional: true\n",
        tmp_path,
    )
    now = at(23, 22)
    held = advance(j, Position("promo", now), facts(now), now)
    assert held.stop == Hold(at(24, 9)) and held.position == Position("promo", at(24, 9))
    morning = advance(j, held.position, facts(at(24, 9)), at(24, 9))
    assert isinstance(morning.stop, SendDue) and not morning.stop.skip
    assert isinstance(advance(j, Position("reply", now), facts(now), now).stop, SendDue)


def test_the_end_of_the_steps_completes_the_enrolment(tmp_path: Path) -> None:
    """Past the last step the enrolment is completed; a step removed by an edit makes it exit with that reason."""
    j = journey(WELCOME, tmp_path)
    now = at(23, 9)
    assert advance(j, Position(None, now), facts(now), now).stop == End(EnrolmentStatus.COMPLETED, "reached the end")
    gone = advance(j, Position("deleted", now), facts(now), now).stop
    assert gone == End(EnrolmentStatus.EXITED, "step deleted is no longer in the journey")

"""Stepping one enrolment: from where it stands, through every step that can run now, to the next thing that needs
the outside world (a send, a tag action), time (a wait, quiet hours) or nothing more (the end).

This is pure: the runtime feeds it what the database knows (`Facts`, the contact's recent events) and applies what
it returns; the preview feeds it a simulated contact and a moving clock to draw a dry-run timeline. So the timeline
a preview shows is the one the engine follows.

Rules (each has a test in tests/test_journey_stepper.py):

* `exit_when` is checked before every step; so are the two exits every journey has: a contact no longer listed,
  and — except in a journey that answers the customer's own messages (`trigger: message`) — one who opted out.
* A step's time is when it began *as scheduled* (`Position.started`): a wait ends that long after its start, not
  after the moment the engine got round to it, so a journey keeps its timeline across a restart.
* A send due longer ago than `grace` (wecast was down) follows `catch_up`: `all` sends it late; `skip` records it
  skipped; `once` skips it only when the next send after it is overdue too, so of several missed in a row only the
  latest goes out. Quiet hours then hold a send that may go until the window opens (its time moves there).
* A wait for an event ends at the first matching event after it began (not the one that started the journey), or
  at its timeout, taking the `on_timeout` branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from engine.journeys.conditions import Facts
from engine.journeys.spec import (
    EventWait,
    ExitStep,
    GotoStep,
    IfStep,
    Journey,
    SendStep,
    TagStep,
    TriggerKind,
    WaitStep,
)
from engine.settings import QuietHours
from storage.journeys import EventRow, PathEntry
from storage.models import CustomerEventKind, EnrolmentStatus

MAX_STEPS_PER_PASS = 500  # steps form a tree without loops; this only bounds a pass against surprises


@dataclass(frozen=True)
class Position:
    step: str | None  # None: past the last step
    started: datetime  # when this step began, as scheduled


@dataclass(frozen=True)
class Hold:
    """Nothing to do until `until` (a wait, a wait for an event, quiet hours)."""

    until: datetime


@dataclass(frozen=True)
class SendDue:
    """The send step at the position is due now. `skip` (non-empty): record it skipped with this reason."""

    step: SendStep
    skip: str = ""


@dataclass(frozen=True)
class TagDue:
    step: TagStep


@dataclass(frozen=True)
class GotoDue:
    step: GotoStep


@dataclass(frozen=True)
class End:
    status: EnrolmentStatus
    reason: str


Stop = Hold | SendDue | TagDue | GotoDue | End


@dataclass
class Pass:
    """Where a pass left the enrolment, why it stopped, and the steps it went through."""

    position: Position
    stop: Stop
    log: list[PathEntry] = field(default_factory=list)


def quiet_until(quiet: QuietHours | None, now: datetime, journey: Journey) -> datetime | None:
    """When the quiet window containing `now` opens (None: `now` is outside quiet hours)."""
    if quiet is None:
        return None
    tz = journey.tz
    local = now.astimezone(tz)
    if not quiet.contains(local.time()):
        return None
    opens = local.replace(hour=quiet.end.hour, minute=quiet.end.minute, second=0, microsecond=0)
    if opens <= local:
        opens += timedelta(days=1)
    return opens.replace(tzinfo=None).replace(tzinfo=tz)  # re-resolved in the zone, across a DST change


def event_matches(wait: EventWait, event: EventRow) -> bool:
    if wait.kind == "message":
        return event.kind is CustomerEventKind.MESSAGE and wait.matcher is not None and wait.matcher(event.text)
    kind = CustomerEventKind.TAG_ADDED if wait.kind == "tag_added" else CustomerEventKind.TAG_REMOVED
    return event.kind is kind and wait.tag in (event.tag_id, str(event.data.get("tag") or ""))


def _next_send_overdue(journey: Journey, after: SendStep, started: datetime, now: datetime) -> bool:
    """For catch_up: once — whether the next send after `after`, reached through timed waits only, is due by now."""
    step_id = journey.next_of[after.id]
    at = started
    while step_id is not None:
        step = journey.index[step_id]
        if isinstance(step, WaitStep) and step.event is None:
            at = step.target(at, journey.tz)
            step_id = journey.next_of[step_id]
            continue
        return isinstance(step, SendStep) and at <= now
    return False


def advance(
    journey: Journey,
    position: Position,
    facts: Facts,
    now: datetime,
    *,
    events: Sequence[EventRow] = (),
    trigger_event: int | None = None,
) -> Pass:
    """Run every step that can run now (see the module docstring)."""
    pos = position
    log: list[PathEntry] = []
    replies_allowed = journey.trigger.kind is TriggerKind.MESSAGE
    for _ in range(MAX_STEPS_PER_PASS):
        if pos.step is None:
            return Pass(pos, End(EnrolmentStatus.COMPLETED, "reached the end"), log)
        step = journey.index.get(pos.step)
        if step is None:
            return Pass(pos, End(EnrolmentStatus.EXITED, f"step {pos.step} is no longer in the journey"), log)
        if facts.removed:
            return Pass(pos, End(EnrolmentStatus.EXITED, "no longer a contact"), log)
        if facts.opted_out and not replies_allowed:
            return Pass(pos, End(EnrolmentStatus.EXITED, "opted out"), log)
        for condition in journey.exit_when:
            if condition.holds(facts):
                return Pass(pos, End(EnrolmentStatus.EXITED, f"exit_when: {condition.text}"), log)
        if pos.started > now:
            return Pass(pos, Hold(pos.started), log)
        if isinstance(step, SendStep):
            late = now - pos.started
            if late > journey.grace:
                missed = (
                    f"missed: due {pos.started.astimezone(journey.tz):%Y-%m-%d %H:%M} (catch_up: {journey.catch_up})"
                )
                if journey.catch_up == "skip" or (
                    journey.catch_up == "once" and _next_send_overdue(journey, step, pos.started, now)
                ):
                    return Pass(pos, SendDue(step, skip=missed), log)
            opens = quiet_until(step.quiet_hours, now, journey)
            if opens is not None:
                return Pass(Position(pos.step, opens), Hold(opens), log)
            return Pass(pos, SendDue(step), log)
        if isinstance(step, WaitStep):
            if step.event is not None:
                deadline = step.target(pos.started, journey.tz)
                hit = next(
                    (
                        e
                        for e in events
                        if e.id != trigger_event and e.occurred_at >= pos.started and event_matches(step.event, e)
                    ),
                    None,
                )
                if hit is not None and hit.occurred_at <= now:
                    log.append(PathEntry(step.id, "event", step.event.describe()))
                    pos = Position(journey.next_of[step.id], max(pos.started, hit.occurred_at))
                    continue
                if deadline <= now:
                    log.append(PathEntry(step.id, "timeout", f"no {step.event.describe()} within {step.timeout}"))
                    pos = Position(journey.entry_of(step.on_timeout, step.id), deadline)
                    continue
                return Pass(pos, Hold(deadline), log)
            target = step.target(pos.started, journey.tz)
            if target > now:
                return Pass(pos, Hold(target), log)
            log.append(PathEntry(step.id, "waited", step.describe()))
            pos = Position(journey.next_of[step.id], target)
            continue
        if isinstance(step, IfStep):
            reason = step.condition.test(facts)
            if reason is None:
                log.append(PathEntry(step.id, "then", step.condition.text))
                pos = Position(journey.entry_of(step.then, step.id), pos.started)
            else:
                log.append(PathEntry(step.id, "else", reason))
                pos = Position(journey.entry_of(step.otherwise, step.id), pos.started)
            continue
        if isinstance(step, TagStep):
            return Pass(pos, TagDue(step), log)
        if isinstance(step, GotoStep):
            return Pass(pos, GotoDue(step), log)
        assert isinstance(step, ExitStep)
        log.append(PathEntry(step.id, "exit", step.reason))
        return Pass(pos, End(EnrolmentStatus.EXITED, step.reason or "exit step"), log)
    return Pass(pos, End(EnrolmentStatus.EXITED, "too many steps in one pass"), log)

"""See a journey before it runs: its steps as a tree, who would enter now, and one contact's dry-run timeline.

    tree(journey, counts)             the steps, branches (then / else / on timeout) nested, with counts if given
    entry_preview(db, journey, now)   who would enter now (schedule, date and backfill triggers enter without an
                                      event) and who is left out and why: the campaign's exclusion reasons
                                      (`engine.audience.ReasonCode`), opt-outs, the entry policy
    timeline(db, journey, contact, now, assume=...)
                                      what the engine would do with this contact from now on: at which local time
                                      which exact message (rendered as the runtime renders it), which branch, quiet
                                      hours applied, where they exit

The timeline drives the runtime's own pieces — `engine.journeys.stepper.advance` for every step, the runtime's
audience and entry policy, `engine.message_spec.render_messages` for each message — over a simulated contact and a
moving clock, so it cannot disagree with a run (tests/test_journey_preview.py runs both and compares). It reads
the database and writes nothing; sends nothing.

Assumptions (`Assumption.parse`) say what the customer does, since the engine reacts to events: `replied` or
`message:TEXT` (they write), `tag:X` / `untag:X` (staff tag them), `optout`, `removed`; each at entry or
`@DURATION` after it (`tag:已购@2d`). Without any, nobody writes, nobody is tagged. Every send is assumed delivered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import Engine

from engine.audience import OPTED_OUT_REASON, ExclusionCategory, ReasonCode
from engine.durations import format_duration, parse_duration
from engine.errors import NotFoundError, WecastError
from engine.i18n import N_, tr
from engine.journeys.conditions import Facts
from engine.journeys.runtime import date_matches, fire_schedule, may_enter, select_audience
from engine.journeys.spec import (
    BACKFILLS,
    WEEKDAYS,
    EntryKind,
    ExitStep,
    GotoStep,
    IfStep,
    Journey,
    SendStep,
    Step,
    TagStep,
    TriggerKind,
    WaitStep,
)
from engine.journeys.stepper import End, GotoDue, Hold, Position, SendDue, TagDue, advance
from engine.message_spec import render_messages
from engine.schedule import build_trigger, next_fire_times
from storage import contacts as contacts_db
from storage import deliveries as deliveries_db
from storage import journeys as store
from storage import optouts as optouts_db
from storage.models import OPEN_ENROLMENT_STATUSES, CustomerEventKind, EnrolmentStatus

HORIZON = timedelta(days=400)  # a timeline stops at the first wait that ends later than this after entry
MAX_ENTRIES = 300  # ... or after this many entries (steps form a tree; this only bounds surprises)
SAMPLE = 20


class View(BaseModel):
    model_config = ConfigDict(frozen=True)


# -- the tree ------------------------------------------------------------------------------------------------

StepKind = Literal["send", "wait", "if", "tag", "goto", "exit"]
BranchLabel = Literal["then", "else", "on_timeout"]
BRANCH_NAMES = {"then": N_("then"), "else": N_("else"), "on_timeout": N_("on timeout")}
KIND_NAMES = {
    "send": N_("send"),
    "wait": N_("wait"),
    "if": N_("if"),
    "tag": N_("tag"),
    "goto": N_("go to journey"),
    "exit": N_("exit"),
}


class StepBranch(View):
    label: BranchLabel
    steps: list[StepNode]


class StepNode(View):
    """One step: `kind` (a stable key), `text` (what it does, in words: the template, the wait, the condition),
    and with counts: how many enrolments stand at it now (`here`) and how often it was passed (`passed`)."""

    id: str
    kind: StepKind
    text: str
    transactional: bool = False
    here: int | None = None
    passed: int | None = None
    branches: list[StepBranch] = []


@dataclass(frozen=True)
class Counts:
    """A journey's enrolments: open ones by step, ended ones by status, how often each step was passed."""

    at_step: dict[str, int]
    ended: dict[str, int]
    passed: dict[str, int]

    @property
    def active(self) -> int:
        return sum(self.at_step.values())

    @classmethod
    def of(cls, db: Engine, journey_id: str) -> Counts:
        return cls.from_rows(journey_id, store.step_counts(db, journey_id), store.passed_counts(db, journey_id))

    @classmethod
    def from_rows(
        cls, journey_id: str, counts: Sequence[store.StepCount], passed: Mapping[tuple[str, str], int]
    ) -> Counts:
        """From storage's rows (`counts` may hold other journeys' too: the console reads them all at once)."""
        at_step: dict[str, int] = {}
        ended: dict[str, int] = {}
        for c in counts:
            if c.journey_id != journey_id:
                continue
            if c.status in OPEN_ENROLMENT_STATUSES:
                at_step[c.step] = at_step.get(c.step, 0) + c.count
            else:
                ended[c.status.value] = ended.get(c.status.value, 0) + c.count
        by_step: dict[str, int] = {}
        for (step, _), n in passed.items():
            by_step[step] = by_step.get(step, 0) + n
        return cls(at_step, ended, by_step)


def tree(journey: Journey, counts: Counts | None = None) -> list[StepNode]:
    """The journey's steps in file order, branches nested under their step."""
    return [_node(s, counts) for s in journey.steps]


def _node(step: Step, counts: Counts | None) -> StepNode:
    extra: dict[str, Any] = {}
    if counts is not None:
        extra = {"here": counts.at_step.get(step.id, 0), "passed": counts.passed.get(step.id, 0)}
    if isinstance(step, SendStep):
        return StepNode(id=step.id, kind="send", text=send_text(step), transactional=step.transactional, **extra)
    if isinstance(step, WaitStep):
        branches = (
            [StepBranch(label="on_timeout", steps=[_node(s, counts) for s in step.on_timeout])]
            if step.on_timeout
            else []
        )
        return StepNode(id=step.id, kind="wait", text=describe_wait(step), branches=branches, **extra)
    if isinstance(step, IfStep):
        branches = [
            StepBranch(label="then", steps=[_node(s, counts) for s in step.then]),
            StepBranch(label="else", steps=[_node(s, counts) for s in step.otherwise]),
        ]
        return StepNode(id=step.id, kind="if", text=step.condition.text, branches=branches, **extra)
    if isinstance(step, TagStep):
        text = " ".join([f"+{t}" for t in step.add] + [f"-{t}" for t in step.remove])
        return StepNode(id=step.id, kind="tag", text=text, **extra)
    if isinstance(step, GotoStep):
        return StepNode(id=step.id, kind="goto", text=step.journey, **extra)
    assert isinstance(step, ExitStep)
    return StepNode(id=step.id, kind="exit", text=step.reason, **extra)


def send_text(step: SendStep) -> str:
    """A send step's message as written: the text template, and the kinds of its attachments."""
    text = step.compiled.text
    attachments = sorted(k.value for k in step.compiled.kinds if k.value != "text")
    return (text.template.source.strip() if text else "") + (f" [+{', '.join(attachments)}]" if attachments else "")


# -- words ---------------------------------------------------------------------------------------------------


def describe_trigger(journey: Journey) -> str:
    """What makes a contact enter, in words."""
    t = journey.trigger
    if t.kind is TriggerKind.TAG_ADDED:
        return tr("tag {tag} is added", tag=t.tag)
    if t.kind is TriggerKind.TAG_REMOVED:
        return tr("tag {tag} is removed", tag=t.tag)
    if t.kind is TriggerKind.MESSAGE and t.matcher is not None:
        if not t.matcher.keywords:
            return tr("the customer writes anything")
        return tr("the customer writes: {words}", words=t.matcher.describe())
    if t.kind is TriggerKind.DATE and t.date is not None:
        d = t.date
        at = d.at.strftime("%H:%M")
        if d.days_before:
            return tr("date {field}, {days} days before, at {time}", field=d.field, days=d.days_before, time=at)
        return tr("date {field} at {time}", field=d.field, time=at)
    if t.kind is TriggerKind.SCHEDULE and t.schedule is not None:
        s = t.schedule
        what = f"cron {s.cron}" if s.cron else f"at {s.at}" if s.at else f"every {s.every}" if s.every else ""
        return tr("on schedule: {what}", what=what)
    return tr("a new customer adds us")


def describe_entry(journey: Journey) -> str:
    e = journey.entry
    if e.kind is EntryKind.AGAIN_AFTER and e.window is not None:
        return tr("again after {span}", span=format_duration(e.window))
    if e.kind is EntryKind.EVERY_TIME:
        return tr("every time")
    return tr("once")


def describe_wait(step: WaitStep) -> str:
    """A wait step in words (the stepper's own `describe` is the English of the path log)."""
    if step.event is not None:
        ev = step.event
        if ev.kind == "message":
            what = (
                tr("a reply")
                if ev.matcher is None or not ev.matcher.keywords
                else tr("a reply with {words}", words=" / ".join(ev.matcher.keywords))
            )
        elif ev.kind == "tag_added":
            what = tr("tag {tag} added", tag=ev.tag)
        else:
            what = tr("tag {tag} removed", tag=ev.tag)
        return tr("wait up to {span} for {what}", span=format_duration(step.timeout or timedelta(0)), what=what)
    parts: list[str] = []
    if step.duration is not None:
        parts.append(format_duration(step.duration))
    if step.days is not None:
        parts.append(
            tr("{days} day(s) later at {time}", days=step.days, time=step.at.strftime("%H:%M"))
            if step.at
            else tr("{days} day(s) later", days=step.days)
        )
    if step.until is not None or step.weekdays is not None:
        days = "/".join(tr(WEEKDAY_NAMES[d]) for d in sorted(step.weekdays or ()))
        if step.until is not None:
            hhmm = f"{step.until:%H:%M}"
            parts.append(tr("until {time} {days}", time=hhmm, days=days).strip())
        else:
            parts.append(tr("until {days}", days=days))
    return tr("wait {what}", what=tr(", then ").join(parts))


WEEKDAY_NAMES = (N_("Mon"), N_("Tue"), N_("Wed"), N_("Thu"), N_("Fri"), N_("Sat"), N_("Sun"))
assert len(WEEKDAY_NAMES) == len([k for k in WEEKDAYS if k.isascii()])


# -- who would enter now -------------------------------------------------------------------------------------

EntryMode = Literal["schedule", "date", "backfill", "event"]


class Entrant(View):
    id: str
    name: str


class EntryExcluded(View):
    id: str
    name: str
    category: ExclusionCategory
    reason_code: ReasonCode
    reason: str


class EntryPreview(View):
    """Who would enter now. `mode`: `schedule` / `date` (at the next fire, `at`), `backfill` (when the journey is
    first loaded), or `event` (only on an event: the lists say who the audience and entry policy would let in if
    their event came now). Lists are a sample when `sample` is given; the counts are of everyone."""

    mode: EntryMode
    at: datetime | None
    enters_without_event: bool
    contacts: int
    entering: int
    excluded: int
    by_category: dict[ExclusionCategory, int]
    entrants: list[Entrant]
    left_out: list[EntryExcluded]
    next_fires: list[datetime]


def entry_preview(db: Engine, journey: Journey, now: datetime, *, sample: int | None = SAMPLE) -> EntryPreview:
    """Who would enter now and who is left out and why (see EntryPreview). Reads only."""
    t = journey.trigger
    views = contacts_db.load_contact_views(db)
    known = contacts_db.tag_names(db)
    next_fires: list[datetime] = []
    at: datetime | None = None
    schedule = fire_schedule(journey)
    if schedule is not None:
        next_fires = next_fire_times(build_trigger(schedule, journey.tz), now, 5)
        at = next_fires[0] if next_fires else None
    mode: EntryMode
    if t.kind is TriggerKind.SCHEDULE:
        mode = "schedule"
    elif t.kind is TriggerKind.DATE and t.date is not None:
        mode = "date"
        day = (at or now).astimezone(journey.tz).date() + timedelta(days=t.date.days_before)
        views = [v for v in views if date_matches(v, t.date.field, day, t.date.each_year, journey)]
    elif journey.backfill and t.kind in BACKFILLS and not store.backfilled(db, journey.id):
        mode = "backfill"
        if t.kind is TriggerKind.TAG_ADDED:
            views = [v for v in views if t.tag in v["tags"]]
    else:
        mode = "event"
    selection = select_audience(journey, views, now, known_tags=known)
    left: list[EntryExcluded] = [
        EntryExcluded(id=e.contact_id, name=e.name, category=e.category, reason_code=e.code, reason=e.reason)
        for e in selection.excluded
    ]
    chosen = [v for v in selection.recipients if not v.get("removed_at")]
    ids = [str(v["id"]) for v in chosen]
    blocked = set() if t.kind is TriggerKind.MESSAGE else optouts_db.opted_out(db, ids)
    history = store.past_entries(db, journey.id, ids)
    entering: list[Entrant] = []
    for v in chosen:
        cid, name = str(v["id"]), str(v.get("name") or "")
        if cid in blocked:
            left.append(_left(cid, name, ReasonCode.OPTED_OUT, tr(OPTED_OUT_REASON)))
        elif not may_enter(journey, history.get(cid, []), 0, now):
            left.append(_left(cid, name, ReasonCode.DEDUPE, entry_refusal(journey, history.get(cid, []))))
        else:
            entering.append(Entrant(id=cid, name=name))
    by_category: dict[ExclusionCategory, int] = {}
    for e in left:
        by_category[e.category] = by_category.get(e.category, 0) + 1
    left.sort(key=lambda e: (e.category == ExclusionCategory.AUDIENCE, e.id))
    return EntryPreview(
        mode=mode,
        at=at if mode in ("schedule", "date") else now if mode == "backfill" else None,
        enters_without_event=mode != "event",
        contacts=len(views),
        entering=len(entering),
        excluded=len(left),
        by_category=by_category,
        entrants=entering[:sample],
        left_out=left[:sample],
        next_fires=next_fires,
    )


def _left(cid: str, name: str, code: ReasonCode, reason: str) -> EntryExcluded:
    return EntryExcluded(id=cid, name=name, category=code.category, reason_code=code, reason=reason)


def entry_refusal(journey: Journey, past: Sequence[store.PastEntry]) -> str:
    """Why the entry policy keeps a contact out, given its earlier enrolments."""
    if any(p.open for p in past):
        return tr("already in this journey")
    if journey.entry.kind is EntryKind.AGAIN_AFTER and journey.entry.window is not None:
        return tr("entered within the last {span} (entry: again after)", span=format_duration(journey.entry.window))
    return tr("entered before (entry: once)")


# -- one contact's timeline ------------------------------------------------------------------------------------

AssumeKind = Literal["message", "tag", "untag", "optout", "removed"]


@dataclass(frozen=True)
class Assumption:
    """Something the customer (or staff) does during the dry run, `after` entering."""

    kind: AssumeKind
    value: str = ""
    after: timedelta = timedelta(0)

    @classmethod
    def parse(cls, text: str) -> Assumption:
        """`replied`, `message:TEXT`, `tag:X`, `untag:X`, `optout`, `removed`, each optionally `@DURATION`."""
        body, sep, when = text.rpartition("@") if "@" in text else (text, "", "")
        after = timedelta(0)
        if sep:
            try:
                after = parse_duration(when.strip())
            except ValueError as exc:
                raise WecastError(tr("{text!r}: {problem}", text=text, problem=str(exc))) from None
        key, colon, value = body.strip().partition(":")
        key = key.strip().lower()
        value = value.strip()
        if key in ("replied", "reply") and not colon:
            return cls("message", tr("OK"), after)
        if key in ("message", "tag", "untag") and value:
            return cls(key, value, after)  # type: ignore[arg-type]
        if key in ("optout", "opted_out", "removed") and not colon:
            return cls("removed" if key == "removed" else "optout", "", after)
        raise WecastError(
            tr(
                "{text!r}: assume replied, message:TEXT, tag:TAG, untag:TAG, optout or removed, "
                "optionally @DURATION after entering (tag:已购@2d)",
                text=text,
            )
        )

    def describe(self) -> str:
        what = {
            "message": tr("writes {text!r}", text=self.value),
            "tag": tr("is tagged {tag}", tag=self.value),
            "untag": tr("loses tag {tag}", tag=self.value),
            "optout": tr("opts out"),
            "removed": tr("deletes us"),
        }[self.kind]
        return (
            what if not self.after else tr("{what}, {span} after entering", what=what, span=format_duration(self.after))
        )


Outcome = Literal[
    "entered",
    "not_entered",
    "assumed",
    "send",
    "skipped",
    "quiet_hours",
    "waited",
    "event",
    "timeout",
    "then",
    "else",
    "tag",
    "goto",
    "exit",
    "completed",
    "waiting",
]
OUTCOME_NAMES = {
    "entered": N_("enters"),
    "not_entered": N_("would not enter"),
    "assumed": N_("assumed"),
    "send": N_("sends"),
    "skipped": N_("skipped"),
    "quiet_hours": N_("quiet hours"),
    "waited": N_("waited"),
    "event": N_("event came"),
    "timeout": N_("timed out"),
    "then": N_("then"),
    "else": N_("else"),
    "tag": N_("tags"),
    "goto": N_("goes to journey"),
    "exit": N_("exits"),
    "completed": N_("completes"),
    "waiting": N_("still waiting"),
}


class TimelineEntry(View):
    """One moment of the dry run: when (UTC, and `local` in the journey's zone), in which journey (another one
    after a `goto`) at which step, what happens (`outcome`, a stable key), in words (`detail`), and for a send the
    exact message (`message`, `parts`)."""

    at: datetime
    local: str
    journey: str
    step: str
    outcome: Outcome
    detail: str = ""
    message: str | None = None
    parts: list[dict[str, Any]] | None = None


TimelineEnd = Literal["completed", "exited", "goto", "loop", "waiting", "not_entered"]


class Timeline(View):
    """The dry run. `ends`: `goto` when it stops at a goto it does not follow (the target is not running or would
    not let the contact in), `loop` when a goto leads back to a journey already shown."""

    journey: str
    contact: str
    name: str
    timezone: str
    now: datetime
    enters: bool
    assumptions: list[str]
    entries: list[TimelineEntry]
    ends: TimelineEnd
    sends: int
    journeys: list[str] = []  # the journeys the contact passes through, in order (more than one after a goto)


@dataclass
class _Sim:
    journey: Journey
    view: dict[str, Any]
    names: dict[str, str]  # tag name -> id (and id -> id)
    labels: dict[str, str]  # tag id -> name
    opted_out: bool
    entries: list[TimelineEntry]

    def at(self, when: datetime, step: str, outcome: Outcome, detail: str = "", **more: Any) -> None:
        local = when.astimezone(self.journey.tz)
        self.entries.append(
            TimelineEntry(
                at=when,
                local=f"{local:%Y-%m-%d %H:%M} " + tr(WEEKDAY_NAMES[local.weekday()]),
                journey=self.journey.id,
                step=step,
                outcome=outcome,
                detail=detail,
                **more,
            )
        )

    def retag(self, add: Sequence[str] = (), remove: Sequence[str] = ()) -> list[tuple[CustomerEventKind, str]]:
        """Change the simulated contact's tags; returns the changes (kind, tag id) as events would record them."""
        ids = set(self.view.get("tag_ids") or ())
        changes: list[tuple[CustomerEventKind, str]] = []
        for name in add:
            tag_id = self.names.get(name) or name
            self.labels.setdefault(tag_id, name)
            if tag_id not in ids:
                ids.add(tag_id)
                changes.append((CustomerEventKind.TAG_ADDED, tag_id))
        for name in remove:
            tag_id = self.names.get(name) or name
            if tag_id in ids:
                ids.discard(tag_id)
                changes.append((CustomerEventKind.TAG_REMOVED, tag_id))
        tag_ids = sorted(ids)
        named = tuple(self.labels[t] for t in tag_ids if t in self.labels)
        self.view["tag_ids"] = tag_ids
        self.view["tags_named"] = named
        self.view["tags"] = frozenset(named).union(tag_ids)
        return changes


def timeline(
    db: Engine,
    journey: Journey,
    contact_id: str,
    now: datetime,
    *,
    assume: Sequence[Assumption] = (),
    check_entry: bool = True,
    journeys: Mapping[str, Journey] | None = None,
) -> Timeline:
    """The dry run of `contact_id` entering `journey` at `now` (see the module docstring). Reads only.
    `check_entry` False: simulate even when the audience or entry policy would keep them out.
    `journeys` (by id) are where a `goto` may lead: the dry run follows the contact into the target as the runtime
    enters them (the target's audience, opt-out and entry policy apply), and stops at a goto back to a journey it
    has shown already. Without them it stops at the goto."""
    found = store.contact_views(db, [contact_id])
    if contact_id not in found:
        raise NotFoundError(tr("no contact {id!r} (see `wecast contacts list`)", id=contact_id))
    view = dict(found[contact_id])
    names = store.tags_by_name(db)
    labels = {v: k for k, v in names.items() if k != v}
    sim = _Sim(journey, view, names, labels, contact_id in optouts_db.opted_out(db, [contact_id]), [])
    tz = journey.tz
    t = journey.trigger
    base = Timeline(
        journey=journey.id,
        contact=contact_id,
        name=str(view.get("name") or ""),
        timezone=journey.timezone,
        now=now,
        enters=False,
        assumptions=[a.describe() for a in assume],
        entries=[],
        ends="not_entered",
        sends=0,
    )
    # The message that starts a `trigger: message` journey: the first message assumed at entry, else its first
    # keyword (what the customer must write to enter).
    trigger_text = ""
    pending = sorted(assume, key=lambda a: a.after)
    if t.kind is TriggerKind.MESSAGE:
        first = next((a for a in pending if a.kind == "message" and not a.after), None)
        if first is not None:
            pending.remove(first)
            trigger_text = first.value
        elif t.matcher is not None and t.matcher.keywords:
            trigger_text = t.matcher.keywords[0]
        sim.at(now, journey.first or "", "assumed", tr("the customer writes {text!r}", text=trigger_text))
        if t.matcher is not None and not t.matcher(trigger_text):
            sim.at(
                now,
                "",
                "not_entered",
                tr("the message does not match the trigger ({words})", words=describe_trigger(journey)),
            )
            return base.model_copy(update={"entries": sim.entries})
    if check_entry:
        refusal = _entry_refusal(db, journey, view, sim.opted_out, now)
        if refusal:
            sim.at(now, "", "not_entered", refusal)
            return base.model_copy(update={"entries": sim.entries})
    if journey.first is None:
        sim.at(now, "", "not_entered", tr("the journey has no steps"))
        return base.model_copy(update={"entries": sim.entries})
    sim.at(now, journey.first, "entered", describe_trigger(journey))

    events: list[store.EventRow] = []
    received: set[str] = set()  # the steps sent in the current journey
    entered_at = now  # ... and when the contact entered it (replies count from then, as the runtime counts them)
    shown = [journey.id]
    removed = bool(view.get("removed_at"))
    capped_sent: list[datetime] = []  # the dry run's own capped sends (the cap counts them too)
    next_id = -1

    def event(kind: CustomerEventKind, when: datetime, **data: Any) -> None:
        nonlocal next_id
        events.append(
            store.EventRow(next_id, f"preview:{next_id}", kind, contact_id, "preview", data, when, when, None)
        )
        next_id -= 1

    position = Position(journey.first, now)
    clock = now
    sends = 0
    end: TimelineEnd = "waiting"
    for _ in range(MAX_ENTRIES):
        # What the customer does by now happens first (the runtime is woken by each event as it comes).
        while pending and now + pending[0].after <= clock:
            a = pending.pop(0)
            when = now + a.after
            sim.at(when, position.step or "", "assumed", a.describe())
            if a.kind == "message":
                event(CustomerEventKind.MESSAGE, when, text=a.value, type="text")
            elif a.kind in ("tag", "untag"):
                for kind, tag_id in sim.retag(*([[a.value], []] if a.kind == "tag" else [[], [a.value]])):
                    event(kind, when, tag_id=tag_id, tag=sim.labels.get(tag_id, tag_id))
            elif a.kind == "optout":
                sim.opted_out = True
            else:
                removed = True
                sim.view["removed_at"] = when
        facts = Facts(
            contact=sim.view,
            now=clock,
            replied=any(e.kind is CustomerEventKind.MESSAGE and e.occurred_at >= entered_at for e in events),
            received=frozenset(received),
            opted_out=sim.opted_out,
            removed=removed,
            message_text=trigger_text,
        )
        result = advance(journey, position, facts, clock, events=events)
        for entry in result.log:
            sim.at(clock, entry.step, _outcome(entry.outcome), _detail(journey, entry))
        stop = result.stop
        position = result.position
        if isinstance(stop, End):
            end = "completed" if stop.status is EnrolmentStatus.COMPLETED else "exited"
            if not (result.log and result.log[-1].outcome == "exit"):
                sim.at(
                    clock, position.step or "", "completed" if end == "completed" else "exit", _end_words(stop.reason)
                )
            break
        if isinstance(stop, GotoDue):
            target = _goto_target(db, sim, stop.step, clock, journeys, shown)
            if target is None:
                end = "loop" if stop.step.journey in shown else "goto"
                break
            # The runtime completes this enrolment and enters the target at its first step, a new enrolment: no
            # trigger message, nothing received yet, replies counted from now.
            journey = target
            tz = journey.tz
            shown.append(journey.id)
            trigger_text = ""
            received = set()
            entered_at = clock
            position = Position(journey.first, clock)
            continue
        if isinstance(stop, TagDue):
            changes = sim.retag(stop.step.add, stop.step.remove)
            text = " ".join([f"+{x}" for x in stop.step.add] + [f"-{x}" for x in stop.step.remove])
            sim.at(clock, stop.step.id, "tag", text)
            for kind, tag_id in changes:
                event(kind, clock, tag_id=tag_id, tag=sim.labels.get(tag_id, tag_id))
            position = Position(journey.next_of[stop.step.id], position.started)
            continue
        if isinstance(stop, SendDue):
            step = stop.step
            reason = stop.skip or _send_refusal(db, journey, step, sim, clock, capped_sent)
            rendered = None
            if not reason:
                rendered = render_messages(
                    step.compiled.for_zone(journey.timezone),
                    [sim.view],
                    campaign={"id": journey.id, "name": journey.name},
                    now=clock.astimezone(tz),
                )
                if contact_id not in rendered.texts:
                    lacking = [n for n, ids in rendered.missing.items() if contact_id in ids]
                    reason = (
                        tr("lacks {fields} used by the template", fields=", ".join(lacking))
                        if lacking
                        else tr("the message fails its checks")
                    )
            if reason or rendered is None:
                sim.at(clock, step.id, "skipped", reason)
            else:
                message = rendered.message(contact_id)
                sim.at(
                    clock,
                    step.id,
                    "send",
                    tr("transactional") if step.transactional else "",
                    message=rendered.texts[contact_id],
                    parts=message.to_json(),
                )
                sends += 1
                received.add(step.id)
                if step.frequency_cap is not None:
                    capped_sent.append(clock)
            position = Position(journey.next_of[step.id], position.started)
            continue
        assert isinstance(stop, Hold)
        step_now = journey.index.get(position.step or "")
        if isinstance(step_now, SendStep) and stop.until > clock:
            sim.at(
                clock,
                step_now.id,
                "quiet_hours",
                tr("held until {time}", time=_local(stop.until, journey)),
            )
        wake = stop.until
        if pending and now + pending[0].after < wake:
            wake = now + pending[0].after
        if wake - now > HORIZON:
            sim.at(
                clock,
                position.step or "",
                "waiting",
                tr("waits until {time} (the dry run stops here)", time=_local(stop.until, journey)),
            )
            break
        clock = max(clock, wake)
    return base.model_copy(
        update={"entries": sim.entries, "enters": True, "ends": end, "sends": sends, "journeys": shown}
    )


def _goto_target(
    db: Engine,
    sim: _Sim,
    step: GotoStep,
    clock: datetime,
    journeys: Mapping[str, Journey] | None,
    shown: Sequence[str],
) -> Journey | None:
    """The journey a goto leads the simulated contact into, its timeline entries written; None where the dry run
    stops: a goto back to a journey already shown, a target that is not running, or one that keeps them out."""
    target_id = step.journey
    if target_id in shown:
        sim.at(
            clock,
            step.id,
            "goto",
            tr("goes back to journey {id}, shown above (the dry run stops here)", id=target_id),
        )
        return None
    target = journeys.get(target_id) if journeys is not None else None
    if journeys is None:
        sim.at(clock, step.id, "goto", tr("enters journey {id} (its audience and entry policy apply)", id=target_id))
        return None
    if target is None or not target.enabled:
        sim.at(
            clock,
            step.id,
            "goto",
            tr("journey {id} is not running: the contact leaves this journey and enters none", id=target_id),
        )
        return None
    refusal = _entry_refusal(db, target, sim.view, sim.opted_out, clock)
    if refusal:
        sim.at(clock, step.id, "goto", tr("would not enter journey {id}: {reason}", id=target_id, reason=refusal))
        return None
    sim.at(clock, step.id, "goto", tr("enters journey {id}", id=target_id))
    sim.journey = target
    sim.at(clock, target.first or "", "entered", tr("from journey {id} (goto)", id=shown[-1]))
    return target


def _local(when: datetime, journey: Journey) -> str:
    return f"{when.astimezone(journey.tz):%Y-%m-%d %H:%M}"


def _entry_refusal(db: Engine, journey: Journey, view: Mapping[str, Any], opted_out: bool, now: datetime) -> str:
    """Why this contact would not enter now ('' when they would): the runtime's audience, opt-out, entry policy."""
    known = contacts_db.tag_names(db)
    selection = select_audience(journey, [view], now, known_tags=known)
    if selection.excluded:
        return selection.excluded[0].reason
    if view.get("removed_at"):
        return tr("no longer a contact")
    if opted_out and journey.trigger.kind is not TriggerKind.MESSAGE:
        return tr(OPTED_OUT_REASON)
    past = store.past_entries(db, journey.id, [str(view["id"])]).get(str(view["id"]), [])
    if not may_enter(journey, past, 0, now):
        return entry_refusal(journey, past)
    return ""


def _send_refusal(
    db: Engine, journey: Journey, step: SendStep, sim: _Sim, now: datetime, capped_sent: Sequence[datetime]
) -> str:
    """Why the runtime would skip this send now ('' when it sends): as `JourneyEngine._plan_sends` decides."""
    view = sim.view
    exempt = step.transactional and journey.trigger.kind is TriggerKind.MESSAGE
    if view.get("removed_at") or not view.get("friend", True):
        return tr("not a friend of this account (cannot receive messages)")
    if sim.opted_out and not exempt:
        return tr(OPTED_OUT_REASON)
    cap = step.frequency_cap
    if cap is not None:
        start, end = cap.window(now, journey.tz)
        had = deliveries_db.cap_counts(db, start, end, [str(view["id"])]).get(str(view["id"]), 0)
        had += sum(1 for t in capped_sent if start <= t < end)
        if had >= cap.max:
            return tr(
                "frequency cap: already got {n} marketing message(s) this {per} (max {max})",
                n=had,
                per=tr(PER_NAMES[cap.per]) if cap.per in PER_NAMES else cap.per,
                max=cap.max,
            )
    return ""


PER_NAMES = {"day": N_("day"), "week": N_("week"), "month": N_("month")}


def _outcome(outcome: str) -> Outcome:
    known: dict[str, Outcome] = {
        "waited": "waited",
        "event": "event",
        "timeout": "timeout",
        "then": "then",
        "else": "else",
        "exit": "exit",
    }
    return known.get(outcome, "waited")


def _detail(journey: Journey, entry: store.PathEntry) -> str:
    step = journey.index.get(entry.step)
    if entry.outcome == "waited" and isinstance(step, WaitStep):
        return describe_wait(step)
    if entry.outcome in ("event", "timeout") and isinstance(step, WaitStep):
        return describe_wait(step)
    if entry.outcome == "exit":
        return entry.detail
    return entry.detail  # a condition: its own words (or why it does not hold)


END_REASONS = {
    "reached the end": N_("reached the end"),
    "opted out": N_("opted out"),
    "no longer a contact": N_("no longer a contact"),
}


def _end_words(reason: str) -> str:
    if reason in END_REASONS:
        return tr(END_REASONS[reason])
    if reason.startswith("exit_when: "):
        return tr("exit_when: {condition}", condition=reason.removeprefix("exit_when: "))
    return reason

"""Journey YAML -> validated `Journey` objects, with `file:line: field: why` in every error.

A journey lives in `campaigns/` beside the campaigns. A file is a journey when it says `kind: journey` or has a
`trigger:` (or `steps:`); every other file is a campaign, so campaign files written before journeys stay valid.
A campaign is a one-step journey: `trigger: {schedule: {cron: ...}}` with one `send` step (or the `message:`
shorthand) enters everyone the audience selects at each fire, as the campaign spelling (`schedule:` + `message:`)
does, and both spellings work.

    kind: journey                       # optional when trigger: is given
    id: welcome                         # optional; defaults to the file name
    name: 新客欢迎
    timezone: Asia/Shanghai             # every wait and due time is in this zone (default: config.yaml's)
    trigger: contact_added              # or {tag_added: 已购} {tag_removed: VIP}
                                        #    {message: {keywords: [价格], match: contains}}  (contains|exact|regex)
                                        #    {date: {field: birthday, at: "10:00"}}  (added_at, or a key of the
                                        #           contact's additional_info; every year by default)
                                        #    {schedule: {cron: "0 10 * * 1"}}  (as a campaign's schedule:)
    audience: {tags_none: [勿扰]}        # the campaign audience rules, checked when a contact would enter
    entry: once                         # once | every_time | {again_after: 30d}
    backfill: false                     # true: when first loaded, contacts that already match enter too
    exit_when: [{tag: 已购}]             # checked before every step (any of them ends the journey)
    quiet_hours: {start: "21:00", end: "09:00"}   # omitted: config.yaml's; false: none
    frequency_cap: true                 # as campaigns; transactional sends are exempt
    throttle: {per_second: 5}
    catch_up: once                      # skip | once | all: steps due while wecast was down (default: scheduler's)
    grace: 1h                           # ... due at most this long ago still runs as on time
    steps:
      - id: welcome                     # ids name steps in the ledger; give them if you edit a live journey
        send: {template: "{{ display_name }}您好，欢迎！"}   # a campaign's message:, same fields
        transactional: true             # a welcome or a reply: no frequency cap, no quiet hours (never exempt
                                        # from dedupe or opt-out)
      - wait: 1d                        # a duration
      - wait: {days: 1, at: "10:00"}    # the next local day at 10:00 (MoChat's "X天后 HH:mm")
      - wait: {until: "10:00", weekday: [sat, sun]}   # the next such local moment
      - wait: {for: reply, timeout: 3d} # or for: {tag_added: 已购} / {tag_removed: X} / {message: {keywords: [..]}}
        on_timeout: [{exit: 未回复}]     # steps when the event did not come (default: carry on)
      - if: {tag: 已购}                  # conditions: engine.journeys.conditions
        then: [{exit: 已购买}]
        else: [{send: {template: ...}}]
      - tag: {add: [老客], remove: [新客]}   # tag actions reach WeCom through the gateway
      - goto: another_journey           # enter that journey (its entry policy and audience apply) and leave this
      - exit: 完成                       # or `- exit`

`load_journey_data` checks everything that can be checked without contacts; `engine.definitions` loads folders
of both kinds and checks what spans files (unique ids, `goto` targets).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from engine import yamlsrc
from engine.audience import Rule, RuleError, parse_rules
from engine.durations import Duration
from engine.errors import CampaignError, Location
from engine.i18n import tr
from engine.journeys.conditions import Condition, parse_condition
from engine.keywords import KeywordSpec, Matcher
from engine.message_spec import CompiledMessage, MessageSpec, compile_message
from engine.schedule import ScheduleError, ScheduleSpec, build_trigger
from engine.settings import FrequencyCap, QuietHours, Settings, Strict, Throttle, check_timezone, parse_hhmm
from engine.spec import ID_RE, Audience

CatchUp = Literal["skip", "once", "all"]
# Weekdays by name (Monday = 0), in English and Chinese.
WEEKDAYS = {
    **{day: i for i, day in enumerate(("mon", "tue", "wed", "thu", "fri", "sat", "sun"))},
    **{day: i for i, day in enumerate(("周一", "周二", "周三", "周四", "周五", "周六", "周日"))},
}
STEP_KINDS = ("send", "wait", "if", "tag", "goto", "exit")
# Keys a step may have beside its kind.
STEP_EXTRAS = {
    "send": ("transactional",),
    "wait": ("on_timeout",),
    "if": ("then", "else"),
    "tag": (),
    "goto": (),
    "exit": (),
}


class TriggerKind(StrEnum):
    CONTACT_ADDED = "contact_added"
    TAG_ADDED = "tag_added"
    TAG_REMOVED = "tag_removed"
    MESSAGE = "message"
    DATE = "date"
    SCHEDULE = "schedule"


class EntryKind(StrEnum):
    ONCE = "once"  # at most one enrolment per contact, ever
    EVERY_TIME = "every_time"  # every triggering event (or fire, or date) enters again
    AGAIN_AFTER = "again_after"  # again once `window` has passed since the last entry, and it has ended


# -- YAML models (field validation; the step tree is walked by hand below, for its paths) --------------------


class DateTriggerSpec(Strict):
    """Enter on a date of the contact's: the add date (an anniversary) or a date in its additional_info."""

    field: str = Field(min_length=1)
    at: time = time(10, 0)
    each_year: bool = True
    days_before: int = Field(default=0, ge=0, le=60)

    _at = field_validator("at", mode="before")(lambda v: parse_hhmm(v))


class TriggerModel(Strict):
    contact_added: bool | None = None
    tag_added: str | None = None
    tag_removed: str | None = None
    message: KeywordSpec | None = None
    date: DateTriggerSpec | None = None
    schedule: ScheduleSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):  # `trigger: contact_added`, `trigger: message`
            return {value: {} if value == "message" else True}
        return value

    @field_validator("contact_added")
    @classmethod
    def _added(cls, value: bool | None) -> bool | None:
        if value is False:
            raise ValueError(tr("contact_added: false would never trigger; write `trigger: contact_added`"))
        return value

    @field_validator("tag_added", "tag_removed")
    @classmethod
    def _tag(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(tr("name a tag, like tag_added: 已购"))
        return value

    @model_validator(mode="after")
    def _one(self) -> TriggerModel:
        kinds = [k for k in TriggerKind if getattr(self, k.value) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one trigger: contact_added, tag_added, tag_removed, message, date or schedule"
                + (f" (found {', '.join(kinds)})" if kinds else "")
            )
        return self


class EventWaitModel(Strict):
    """What a `wait: {for: ...}` waits for."""

    message: KeywordSpec | None = None
    tag_added: str | None = None
    tag_removed: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value == "reply":
            return {"message": {}}
        if not isinstance(value, dict):
            raise ValueError(tr("wait for reply, {message: {keywords: [...]}}, {tag_added: TAG} or {tag_removed: TAG}"))
        return value

    @model_validator(mode="after")
    def _one(self) -> EventWaitModel:
        if sum(getattr(self, k) is not None for k in ("message", "tag_added", "tag_removed")) != 1:
            raise ValueError(
                tr("wait for one of: reply, {message: {keywords: [...]}}, {tag_added: TAG}, {tag_removed: TAG}")
            )
        return self


class WaitModel(Strict):
    duration: Duration | None = None
    days: int | None = Field(default=None, ge=0, le=3660)
    at: time | None = None
    until: time | None = None
    weekday: list[str] | None = None
    for_: EventWaitModel | None = Field(default=None, alias="for")
    timeout: Duration | None = None

    _times = field_validator("at", "until", mode="before")(lambda v: None if v is None else parse_hhmm(v))

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return {"duration": value}
        if isinstance(value, dict) and isinstance(value.get("weekday"), str):
            return {**value, "weekday": [value["weekday"]]}
        return value

    @field_validator("weekday")
    @classmethod
    def _weekdays(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError(tr("weekday takes one or more days (mon ... sun)"))
            for day in value:
                if str(day).lower() not in WEEKDAYS:
                    raise ValueError(
                        tr(
                            "unknown weekday {day}; use mon, tue, wed, thu, fri, sat, sun (or 周一 … 周日)",
                            day=repr(day),
                        )
                    )
        return value

    @model_validator(mode="after")
    def _shape(self) -> WaitModel:
        timed = [k for k in ("duration", "days", "until", "weekday") if getattr(self, k) is not None]
        if self.at is not None and self.days is None:
            raise ValueError(tr("at goes with days (wait: {days: 1, at: 10:00}); for a time of day use until"))
        if self.for_ is not None:
            if timed or self.at is not None:
                raise ValueError(
                    tr("wait for an event takes only timeout, not {keys}", keys=", ".join(timed or ["at"]))
                )
            if self.timeout is None:
                raise ValueError(tr("wait for an event needs a timeout, e.g. timeout: 3d"))
        else:
            if self.timeout is not None:
                raise ValueError(tr("timeout goes with for (wait for an event)"))
            if not timed:
                raise ValueError(tr("a wait needs a duration (wait: 1d), days/at, until/weekday, or for + timeout"))
        return self


class TagModel(Strict):
    add: list[str] = []
    remove: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: [v] if isinstance(v, str) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _some(self) -> TagModel:
        if not self.add and not self.remove:
            raise ValueError(tr("a tag step adds or removes at least one tag: tag: {add: [老客], remove: [新客]}"))
        both = sorted(set(self.add) & set(self.remove))
        if both:
            raise ValueError(tr("tag {tags} is both added and removed", tags=", ".join(both)))
        for name in (*self.add, *self.remove):
            if not str(name).strip():
                raise ValueError(tr("a tag name cannot be empty"))
        return self


class JourneyModel(Strict):
    kind: Literal["journey"] | None = None
    id: str | None = None
    name: str = Field(min_length=1)
    description: str = ""
    enabled: bool = True
    timezone: str | None = None
    trigger: Any = Field(default=None)  # TriggerModel, validated with its path below
    audience: Audience = Audience()
    entry: Any = None
    backfill: bool = False
    exit_when: Any = None
    steps: Any = None
    message: MessageSpec | None = None  # shorthand for steps: [{id: message, send: ...}]
    frequency_cap: bool | FrequencyCap = True
    quiet_hours: bool | QuietHours | None = None
    throttle: Throttle | None = None
    catch_up: CatchUp | None = None
    grace: Duration | None = None
    max_errors: int | None = Field(default=None, ge=0)
    tags: list[str] = []

    _tz = field_validator("timezone")(lambda v: check_timezone(v) if v is not None else v)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        if v is not None and not ID_RE.match(v):
            raise ValueError(tr("id may use letters, digits, _ . - (up to 64), starting with a letter or digit"))
        return v

    @field_validator("quiet_hours")
    @classmethod
    def _quiet(cls, v: bool | QuietHours | None) -> bool | QuietHours | None:
        if v is True:
            raise ValueError(tr("quiet_hours: true is ambiguous; leave it out for config.yaml's, give {start, end}"))
        return v


# -- the validated journey -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trigger:
    kind: TriggerKind
    tag: str = ""  # tag_added / tag_removed: the tag's name (or id)
    matcher: Matcher | None = None  # message
    date: DateTriggerSpec | None = None
    schedule: ScheduleSpec | None = None

    def describe(self) -> str:
        if self.kind in (TriggerKind.TAG_ADDED, TriggerKind.TAG_REMOVED):
            return f"{self.kind.value.replace('_', ' ')}: {self.tag}"
        if self.kind is TriggerKind.MESSAGE and self.matcher is not None:
            return f"the customer writes: {self.matcher.describe()}"
        if self.kind is TriggerKind.DATE and self.date is not None:
            d = self.date
            every = "every year" if d.each_year else "once"
            before = f", {d.days_before} days before" if d.days_before else ""
            return f"date {d.field} ({every}{before}) at {d.at:%H:%M}"
        if self.kind is TriggerKind.SCHEDULE and self.schedule is not None:
            s = self.schedule
            return "schedule " + (
                f"cron {s.cron}" if s.cron else f"at {s.at}" if s.at else f"every {s.every}" if s.every else ""
            )
        return "a new contact adds us"


@dataclass(frozen=True)
class EntryPolicy:
    kind: EntryKind
    window: timedelta | None = None

    def describe(self) -> str:
        if self.kind is EntryKind.AGAIN_AFTER:
            return f"again after {self.window}"
        return self.kind.value.replace("_", " ")


@dataclass(frozen=True)
class EventWait:
    """The event a `wait: {for: ...}` step waits for."""

    kind: Literal["message", "tag_added", "tag_removed"]
    matcher: Matcher | None = None
    tag: str = ""

    def describe(self) -> str:
        if self.kind == "message" and self.matcher is not None:
            return "a reply" if not self.matcher.keywords else f"a reply that {self.matcher.describe()}"
        return f"{self.kind.replace('_', ' ')} {self.tag}"


@dataclass(frozen=True)
class StepBase:
    id: str
    path: tuple[str | int, ...]  # where in the file (for messages)


@dataclass(frozen=True)
class SendStep(StepBase):
    message: MessageSpec
    compiled: CompiledMessage  # its parts, checked; rendered per contact by engine.message_spec.render_messages
    transactional: bool
    quiet_hours: QuietHours | None  # resolved: None for transactional sends
    frequency_cap: FrequencyCap | None  # resolved: None for transactional sends


@dataclass(frozen=True)
class WaitStep(StepBase):
    duration: timedelta | None = None
    days: int | None = None
    at: time | None = None
    until: time | None = None
    weekdays: frozenset[int] | None = None
    event: EventWait | None = None
    timeout: timedelta | None = None
    on_timeout: tuple[Step, ...] = ()

    def target(self, start: datetime, tz: ZoneInfo) -> datetime:
        """When a wait that began at `start` ends (for an event wait: its timeout)."""
        if self.event is not None:
            assert self.timeout is not None
            return start + self.timeout
        moment = start
        if self.duration is not None:
            moment = moment + self.duration
        if self.days is not None:
            local = moment.astimezone(tz)
            day = local.date() + timedelta(days=self.days)
            wall = self.at or local.time().replace(tzinfo=None)
            moment = max(moment, _local(day, wall, tz))
        if self.until is not None or self.weekdays is not None:
            wall = self.until or time(0, 0)
            local = moment.astimezone(tz)
            for offset in range(8):
                day = local.date() + timedelta(days=offset)
                if self.weekdays is not None and day.weekday() not in self.weekdays:
                    continue
                candidate = _local(day, wall, tz)
                if self.until is None and offset == 0:
                    candidate = moment  # `weekday` alone: today counts, from now
                if candidate >= moment:
                    moment = candidate
                    break
        return moment

    def describe(self) -> str:
        if self.event is not None:
            return f"wait up to {_span(self.timeout)} for {self.event.describe()}"
        parts = []
        if self.duration is not None:
            parts.append(_span(self.duration))
        if self.days is not None:
            at = f" at {self.at:%H:%M}" if self.at else ""
            parts.append(f"{self.days} day(s) later{at}")
        if self.until is not None or self.weekdays is not None:
            names = [k for k, v in WEEKDAYS.items() if v in (self.weekdays or ()) and k.isascii()]
            on = f" on {'/'.join(sorted(names, key=lambda n: WEEKDAYS[n]))}" if self.weekdays else ""
            parts.append(f"until {self.until:%H:%M}{on}" if self.until else f"until{on}")
        return "wait " + ", then ".join(parts)


@dataclass(frozen=True)
class IfStep(StepBase):
    condition: Condition
    then: tuple[Step, ...] = ()
    otherwise: tuple[Step, ...] = ()


@dataclass(frozen=True)
class TagStep(StepBase):
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class GotoStep(StepBase):
    journey: str


@dataclass(frozen=True)
class ExitStep(StepBase):
    reason: str = ""


Step = SendStep | WaitStep | IfStep | TagStep | GotoStep | ExitStep


def _local(day: Any, wall: time, tz: ZoneInfo) -> datetime:
    return datetime.combine(day, wall).replace(tzinfo=tz)


def _span(value: timedelta | None) -> str:
    from engine.durations import format_duration

    return format_duration(value) if value is not None else "?"


@dataclass
class Journey:
    """A validated journey, resolved against the settings (defaults filled in)."""

    id: str
    name: str
    file: Path
    enabled: bool
    timezone: str
    trigger: Trigger
    audience: Audience
    rules: Rule | None
    entry: EntryPolicy
    backfill: bool
    exit_when: tuple[Condition, ...]
    steps: tuple[Step, ...]
    quiet_hours: QuietHours | None
    frequency_cap: FrequencyCap | None
    throttle: Throttle
    max_errors: int
    catch_up: CatchUp
    grace: timedelta
    description: str = ""
    content_hash: str = ""
    lines: yamlsrc.Lines = field(default_factory=lambda: yamlsrc.Lines(""))
    # The step graph: every step by id, and where each one continues when it is done (None: the journey ends).
    index: dict[str, Step] = field(default_factory=dict)
    next_of: dict[str, str | None] = field(default_factory=dict)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def first(self) -> str | None:
        return self.steps[0].id if self.steps else None

    def location(self, *path: str | int) -> Location:
        return self.lines.at(path)

    def walk(self) -> Iterator[tuple[Step, int]]:
        """Every step with its depth, in file order (branches after their parent)."""
        yield from _walk(self.steps, 0)

    def sends(self) -> list[SendStep]:
        return [s for s, _ in self.walk() if isinstance(s, SendStep)]

    def entry_of(self, branch: Sequence[Step], after: str) -> str | None:
        """The first step of `branch`, or where `after` continues when the branch is empty."""
        return branch[0].id if branch else self.next_of[after]


def _walk(steps: Sequence[Step], depth: int) -> Iterator[tuple[Step, int]]:
    for step in steps:
        yield step, depth
        if isinstance(step, IfStep):
            yield from _walk(step.then, depth + 1)
            yield from _walk(step.otherwise, depth + 1)
        elif isinstance(step, WaitStep):
            yield from _walk(step.on_timeout, depth + 1)


# -- parsing ---------------------------------------------------------------------------------------------------


class _Parser:
    """Walks the step tree by hand, collecting every problem with its path (then reported all together)."""

    def __init__(
        self,
        text: str,
        file: Path,
        lines: yamlsrc.Lines,
        settings: Settings,
        quiet: QuietHours | None,
        cap: FrequencyCap | None,
    ) -> None:
        self.text, self.file, self.lines, self.settings = text, file, lines, settings
        self.quiet, self.cap = quiet, cap
        self.problems: list[CampaignError] = []
        self.ids: dict[str, tuple[str | int, ...]] = {}
        self.template_texts: list[str] = []

    def problem(self, path: Sequence[str | int], reason: str) -> None:
        self.problems.append(CampaignError(reason, self.lines.at(tuple(path))))

    def located(self, exc: ValidationError, path: tuple[str | int, ...]) -> None:
        for loc, reason in yamlsrc.located(exc, self.lines, prefix=path):
            self.problems.append(CampaignError(reason, loc))

    def steps(self, raw: Any, path: tuple[str | int, ...], auto: str, *, allow_empty: bool = False) -> tuple[Step, ...]:
        if raw is None and allow_empty:
            return ()
        if not isinstance(raw, list) or (not raw and not allow_empty):
            self.problem(path, "steps is a list of steps (send, wait, if, tag, goto, exit)")
            return ()
        out: list[Step] = []
        for i, item in enumerate(raw):
            step = self.step(item, (*path, i), f"{auto}{i + 1}")
            if step is not None:
                out.append(step)
        return tuple(out)

    def step(self, raw: Any, path: tuple[str | int, ...], auto: str) -> Step | None:
        if raw == "exit":
            return ExitStep(self._claim_id(auto, path), path)
        if not isinstance(raw, dict):
            self.problem(path, "a step is a mapping with one of: " + ", ".join(STEP_KINDS))
            return None
        kinds = [k for k in STEP_KINDS if k in raw]
        if len(kinds) != 1:
            self.problem(
                path,
                "a step has exactly one of "
                + ", ".join(STEP_KINDS)
                + (f" (found {', '.join(kinds)})" if kinds else ""),
            )
            return None
        (kind,) = kinds
        allowed = {"id", "name", kind, *STEP_EXTRAS[kind]}
        for key in raw:
            if key not in allowed:
                self.problem(
                    (*path, str(key)), f"unknown field for a {kind} step (it takes {', '.join(sorted(allowed))})"
                )
        step_id = raw.get("id", auto)
        if not isinstance(step_id, str) or not ID_RE.match(step_id):
            self.problem(
                (*path, "id"), "a step id may use letters, digits, _ . - (up to 64), starting with a letter or digit"
            )
            return None
        step_id = self._claim_id(step_id, (*path, "id") if "id" in raw else path)
        value = raw[kind]
        here = (*path, kind)
        if kind == "send":
            return self.send(step_id, value, raw, path, here)
        if kind == "wait":
            return self._wait(step_id, value, raw, path)
        if kind == "if":
            try:
                condition = parse_condition(value)
            except RuleError as exc:
                self.problem((*here, *exc.path), exc.reason)
                return None
            then = self.steps(raw.get("then"), (*path, "then"), f"{step_id}.then.", allow_empty=True)
            otherwise = self.steps(raw.get("else"), (*path, "else"), f"{step_id}.else.", allow_empty=True)
            if not then and not otherwise:
                self.problem(path, "an if step needs then: and/or else: steps")
            return IfStep(step_id, path, condition, then, otherwise)
        if kind == "tag":
            try:
                tags = TagModel.model_validate(value)
            except ValidationError as exc:
                self.located(exc, here)
                return None
            return TagStep(step_id, path, tuple(tags.add), tuple(tags.remove))
        if kind == "goto":
            if not isinstance(value, str) or not ID_RE.match(value):
                self.problem(here, "goto names another journey by its id")
                return None
            return GotoStep(step_id, path, value)
        if value is True or value is None:
            return ExitStep(step_id, path)
        if not isinstance(value, str):
            self.problem(here, "exit takes a reason (text) or true")
            return None
        return ExitStep(step_id, path, value)

    def _claim_id(self, step_id: str, path: tuple[str | int, ...]) -> str:
        if step_id in self.ids:
            self.problem(path, f"step id {step_id!r} is already used at {yamlsrc.dotted(self.ids[step_id])}")
        else:
            self.ids[step_id] = path
        return step_id

    def send(
        self,
        step_id: str,
        value: Any,
        raw: dict[str, Any],
        path: tuple[str | int, ...],
        here: tuple[str | int, ...],
    ) -> SendStep | None:
        """A send step whose message spec stands at `here` (`steps[i].send`, or `message` for the shorthand)."""
        transactional = raw.get("transactional", False)
        if not isinstance(transactional, bool):
            self.problem((*path, "transactional"), "transactional is true or false")
            transactional = False
        try:
            message = MessageSpec.model_validate(value)
        except ValidationError as exc:
            self.located(exc, here)
            return None
        compiled, problems = compile_message(message, here, self.text, self.file, self.lines, self.settings)
        self.problems.extend(problems)
        if compiled is None:
            return None
        self.template_texts.append(compiled.source)
        return SendStep(
            step_id,
            path,
            message,
            compiled,
            transactional,
            None if transactional else self.quiet,
            None if transactional else self.cap,
        )

    def _wait(self, step_id: str, value: Any, raw: dict[str, Any], path: tuple[str | int, ...]) -> WaitStep | None:
        here = (*path, "wait")
        try:
            model = WaitModel.model_validate(value)
        except ValidationError as exc:
            self.located(exc, here)
            return None
        on_timeout: tuple[Step, ...] = ()
        if "on_timeout" in raw:
            if model.for_ is None:
                self.problem((*path, "on_timeout"), "on_timeout goes with a wait for an event (wait: {for: ...})")
            on_timeout = self.steps(raw["on_timeout"], (*path, "on_timeout"), f"{step_id}.timeout.")
        event: EventWait | None = None
        if model.for_ is not None:
            f = model.for_
            if f.message is not None:
                event = EventWait("message", matcher=f.message.matcher())
            else:
                kind: Literal["tag_added", "tag_removed"] = "tag_added" if f.tag_added is not None else "tag_removed"
                event = EventWait(kind, tag=str(f.tag_added or f.tag_removed))
        return WaitStep(
            step_id,
            path,
            duration=model.duration,
            days=model.days,
            at=model.at,
            until=model.until,
            weekdays=frozenset(WEEKDAYS[d.lower()] for d in model.weekday) if model.weekday else None,
            event=event,
            timeout=model.timeout,
            on_timeout=on_timeout,
        )


def _trigger(raw: Any, lines: yamlsrc.Lines, tz: ZoneInfo, problems: list[CampaignError]) -> Trigger | None:
    if raw is None:
        problems.append(
            CampaignError(tr("required field is missing (what makes a contact enter)"), lines.at(("trigger",)))
        )
        return None
    try:
        model = TriggerModel.model_validate(raw)
    except ValidationError as exc:
        problems.extend(CampaignError(r, loc) for loc, r in yamlsrc.located(exc, lines, prefix=("trigger",)))
        return None
    if model.schedule is not None:
        try:
            build_trigger(model.schedule, tz)
        except ScheduleError as exc:
            problems.append(CampaignError(str(exc), lines.at(("trigger", "schedule", exc.field))))
            return None
        return Trigger(TriggerKind.SCHEDULE, schedule=model.schedule)
    if model.message is not None:
        return Trigger(TriggerKind.MESSAGE, matcher=model.message.matcher())
    if model.date is not None:
        return Trigger(TriggerKind.DATE, date=model.date)
    if model.tag_added is not None:
        return Trigger(TriggerKind.TAG_ADDED, tag=model.tag_added.strip())
    if model.tag_removed is not None:
        return Trigger(TriggerKind.TAG_REMOVED, tag=model.tag_removed.strip())
    return Trigger(TriggerKind.CONTACT_ADDED)


# Triggers whose condition can be read off the contacts as they are now, so existing contacts can enter.
BACKFILLS = frozenset({TriggerKind.CONTACT_ADDED, TriggerKind.TAG_ADDED})
DEFAULT_ENTRY = {
    TriggerKind.CONTACT_ADDED: EntryKind.ONCE,
    TriggerKind.TAG_ADDED: EntryKind.ONCE,
    TriggerKind.TAG_REMOVED: EntryKind.ONCE,
    # A keyword reply answers every question; a date or a fire is an occurrence of its own.
    TriggerKind.MESSAGE: EntryKind.EVERY_TIME,
    TriggerKind.DATE: EntryKind.EVERY_TIME,
    TriggerKind.SCHEDULE: EntryKind.EVERY_TIME,
}


# Campaign fields a journey file may carry by mistake, with what to write instead.
CAMPAIGN_ONLY = {
    "schedule": "a journey starts on its trigger: write trigger: {schedule: {...}} (or drop trigger: for a campaign)",
    "dedupe": "a journey says who may enter again with entry: (once, every_time, {again_after: 30d})",
}


class _EntryModel(BaseModel):
    again_after: Duration


def _entry(raw: Any, trigger: Trigger | None, lines: yamlsrc.Lines, problems: list[CampaignError]) -> EntryPolicy:
    if raw is None:
        return EntryPolicy(DEFAULT_ENTRY[trigger.kind] if trigger else EntryKind.ONCE)
    if raw in ("once", "every_time"):
        return EntryPolicy(EntryKind(raw))
    if isinstance(raw, dict) and set(raw) == {"again_after"}:
        try:
            window = _EntryModel.model_validate(raw).again_after
        except ValidationError as exc:
            problems.extend(CampaignError(r, loc) for loc, r in yamlsrc.located(exc, lines, prefix=("entry",)))
            return EntryPolicy(EntryKind.ONCE)
        if window <= timedelta(0):
            problems.append(CampaignError(tr("again_after must be longer than 0"), lines.at(("entry", "again_after"))))
        return EntryPolicy(EntryKind.AGAIN_AFTER, window)
    problems.append(
        CampaignError(
            tr("entry is once, every_time or {{again_after: 30d}}, not {value!r}", value=raw), lines.at(("entry",))
        )
    )
    return EntryPolicy(EntryKind.ONCE)


def _exit_when(raw: Any, lines: yamlsrc.Lines, problems: list[CampaignError]) -> tuple[Condition, ...]:
    if raw is None:
        return ()
    items = raw if isinstance(raw, list) else [raw]
    out = []
    for i, item in enumerate(items):
        path: tuple[str | int, ...] = ("exit_when", i) if isinstance(raw, list) else ("exit_when",)
        try:
            out.append(parse_condition(item))
        except RuleError as exc:
            problems.append(CampaignError(exc.reason, lines.at((*path, *exc.path))))
    return tuple(out)


def _link(steps: Sequence[Step], after: str | None, next_of: dict[str, str | None], index: dict[str, Step]) -> None:
    """Fill `next_of`: each step continues with its successor; the last of a branch with where the parent does."""
    for i, step in enumerate(steps):
        following = steps[i + 1].id if i + 1 < len(steps) else after
        index[step.id] = step
        next_of[step.id] = following
        if isinstance(step, IfStep):
            _link(step.then, following, next_of, index)
            _link(step.otherwise, following, next_of, index)
        elif isinstance(step, WaitStep):
            _link(step.on_timeout, following, next_of, index)


def _raise_all(problems: list[CampaignError]) -> None:
    if not problems:
        return
    first = problems[0]
    if len(problems) == 1:
        raise first
    more = "".join(f"\n  {p}" for p in problems[1:])
    raise CampaignError(first.reason + more, first.location, problems=problems)


def parse_journey(text: str, file: Path, settings: Settings) -> Journey:
    """Parse a journey file's text. Raises CampaignError (every problem, first one first)."""
    name = str(file)
    try:
        data, lines = yamlsrc.load(text, name)
    except yamlsrc.YamlError as exc:
        raise CampaignError(str(exc), Location(name, exc.line)) from None
    if not isinstance(data, dict):
        raise CampaignError(tr("a journey file must be a mapping (name:, trigger:, steps:, ...)"), Location(name, 1))
    return load_journey_data(data, lines, text, file, settings)


def load_journey_data(data: dict[str, Any], lines: yamlsrc.Lines, text: str, file: Path, settings: Settings) -> Journey:
    """Validate parsed journey data (see the module docstring). Raises CampaignError."""
    misplaced = [CampaignError(hint, lines.at((key,))) for key, hint in CAMPAIGN_ONLY.items() if key in data]
    try:
        model = JourneyModel.model_validate({k: v for k, v in data.items() if k not in CAMPAIGN_ONLY})
    except ValidationError as exc:
        _raise_all([*misplaced, *(CampaignError(reason, loc) for loc, reason in yamlsrc.located(exc, lines))])
        raise AssertionError("unreachable") from None
    problems: list[CampaignError] = misplaced
    journey_id = model.id or file.stem
    if not ID_RE.match(journey_id):
        problems.append(
            CampaignError(
                tr("the file name {name!r} is not a valid journey id; add an id: field", name=file.stem),
                lines.at(("id",)),
            )
        )
    tz_name = model.timezone or settings.timezone
    trigger = _trigger(model.trigger, lines, ZoneInfo(tz_name), problems)
    entry = _entry(model.entry, trigger, lines, problems)
    if model.backfill and trigger is not None and trigger.kind not in BACKFILLS:
        problems.append(
            CampaignError(
                tr("backfill works with contact_added and tag_added triggers, not {kind}", kind=trigger.kind.value),
                lines.at(("backfill",)),
            )
        )
    rules: Rule | None = None
    if model.audience.rules is not None:
        try:
            rules = parse_rules(model.audience.rules)
        except RuleError as exc:
            problems.append(CampaignError(exc.reason, lines.at(("audience", "rules", *exc.path))))
    exit_when = _exit_when(model.exit_when, lines, problems)

    sending = settings.sending
    cap: FrequencyCap | None
    if model.frequency_cap is True:
        cap = sending.frequency_cap
    elif model.frequency_cap is False:
        cap = None
    else:
        cap = model.frequency_cap
    quiet: QuietHours | None
    if model.quiet_hours is None:
        quiet = sending.quiet_hours
    elif model.quiet_hours is False:
        quiet = None
    else:
        assert isinstance(model.quiet_hours, QuietHours)
        quiet = model.quiet_hours

    parser = _Parser(text, file, lines, settings, quiet, cap)
    if (model.steps is None) == (model.message is None):
        problems.append(
            CampaignError(
                tr("give steps: (a list of steps) or message: (one send step), not both")
                if model.steps is not None
                else tr("give steps: (a list of steps) or message: (one send step), required field is missing"),
                lines.at(("steps",)),
            )
        )
        steps: tuple[Step, ...] = ()
    elif model.message is not None:
        only = parser.send("message", data["message"], {}, ("message",), ("message",))
        steps = (only,) if only is not None else ()
    else:
        steps = parser.steps(model.steps, ("steps",), "")
    problems.extend(parser.problems)
    next_of: dict[str, str | None] = {}
    index: dict[str, Step] = {}
    _link(steps, None, next_of, index)
    sends = {s.id for s in index.values() if isinstance(s, SendStep)}
    named: list[tuple[frozenset[str], tuple[str | int, ...]]] = [(c.steps, ("exit_when",)) for c in exit_when]
    named += [(s.condition.steps, (*s.path, "if")) for s in index.values() if isinstance(s, IfStep)]
    for ids, where in named:
        for missing in sorted(ids - sends):
            problems.append(
                CampaignError(
                    tr("received names {step!r}, which is not a send step of this journey", step=missing),
                    lines.at(where),
                )
            )
    _raise_all(problems)
    assert trigger is not None
    scheduler = settings.scheduler
    return Journey(
        id=journey_id,
        name=model.name,
        file=file,
        enabled=model.enabled,
        timezone=tz_name,
        trigger=trigger,
        audience=model.audience,
        rules=rules,
        entry=entry,
        backfill=model.backfill,
        exit_when=exit_when,
        steps=steps,
        quiet_hours=quiet,
        frequency_cap=cap,
        throttle=model.throttle or sending.throttle,
        max_errors=model.max_errors if model.max_errors is not None else sending.max_errors,
        catch_up=model.catch_up or scheduler.catch_up,
        grace=model.grace if model.grace is not None else scheduler.grace,
        description=model.description,
        content_hash=hashlib.sha256((text + "".join(parser.template_texts)).encode()).hexdigest()[:16],
        lines=lines,
        index=index,
        next_of=next_of,
    )

"""Campaign schedules -> APScheduler 3 triggers, and the fire times they produce.

Only trigger classes are used here; `engine.scheduler` runs them. A cron expression has 5 fields
(minute hour day month day-of-week) and is read in the campaign's time zone; `at` without a zone is in
the campaign's zone too; `every` counts from `start` (or the Unix epoch in the campaign's zone, so the
slots are stable across restarts).

Daylight-saving zones (a campaign in America/New_York, Europe/London, ...): a cron time that falls in the hour
that repeats when the clocks go back fires once, at its first occurrence — not twice, which would send everyone
the day's message twice, once per slot — and one in the hour that is skipped when they go forward fires at the
same moment an hour later on the wall clock (APScheduler's choice; `next_fire_times` and `latest_fire_time` give
it as that wall time, 03:30 for a 02:30 that did not exist, so a preview shows when it really fires). Fire times
are stepped over in UTC: the wall clock of such a zone runs backwards once a year, and "a microsecond after 01:30
(the second one)" in local time is the first 01:30 again, which had the look-back of `latest_fire_time` loop
forever (tests/test_scheduler.py).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Protocol, cast
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger
from pydantic import field_validator, model_validator

from engine.durations import Duration, check_date_range
from engine.i18n import N_, tr
from engine.settings import Strict


class ScheduleSpec(Strict):
    """When a campaign fires. Exactly one of cron / at / every; none means manual runs only."""

    cron: str | None = None
    at: datetime | None = None
    every: Duration | None = None
    start: datetime | date | None = None
    end: datetime | date | None = None

    @field_validator("at", "start", "end")
    @classmethod
    def _in_range(cls, value: datetime | date | None) -> datetime | date | None:
        if value is not None:  # also when written as a quoted string, which the YAML loader does not check
            check_date_range(value)
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> ScheduleSpec:
        kinds = [k for k in ("cron", "at", "every") if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise ValueError(tr("give only one of cron, at, every (found {kinds})", kinds=", ".join(kinds)))
        if not kinds:
            raise ValueError(tr('give one of cron (e.g. "0 10 * * MON"), at (a date and time) or every (e.g. 1d)'))
        if self.every is not None and self.every < timedelta(minutes=1):
            raise ValueError(tr("every must be at least 1m"))
        return self


class Trigger(Protocol):
    """What the engine asks of a schedule (APScheduler 3's trigger interface, the part we use)."""

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        """The first fire time after `previous_fire_time` (None: the first one) that is not before `now`."""


def _just_after(when: datetime) -> datetime:
    """A microsecond after `when`, counted in UTC (see the module docstring)."""
    return when.astimezone(UTC) + timedelta(microseconds=1)


def _repeated(fire: datetime) -> bool:
    """Whether `fire` is the second occurrence of its wall-clock time (the hour repeated when the clocks go back)."""
    if not fire.fold:
        return False
    return fire.replace(fold=0).utcoffset() != fire.utcoffset()


class _OncePerWallTime:
    """A cron trigger that skips the second occurrence of a repeated wall-clock time (module docstring)."""

    def __init__(self, cron: CronTrigger) -> None:
        self.cron = cron

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        fire = cast(datetime | None, self.cron.get_next_fire_time(previous_fire_time, now))
        while fire is not None and _repeated(fire):
            fire = cast(datetime | None, self.cron.get_next_fire_time(fire, _just_after(fire)))
        return fire


EPOCH = datetime(2020, 1, 6)  # a Monday; interval slots count from here when no start is given


class ScheduleError(ValueError):
    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _aware(value: datetime | date | None, tz: ZoneInfo, *, end: bool = False) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        value = datetime.combine(value, time.max if end else time.min)
    return value if value.tzinfo else value.replace(tzinfo=tz)


# A cron expression's fields: APScheduler's name, the word for people, what a field may hold.
_CRON_FIELDS = (
    ("minute", N_("minute"), "0-59"),
    ("hour", N_("hour"), "0-23"),
    ("day", N_("day of the month"), "1-31"),
    ("month", N_("month"), "1-12"),
    ("day_of_week", N_("weekday"), "0-7"),
)


def _bad_cron_field(fields: list[str], tz: ZoneInfo) -> str | None:
    """Which field of a cron expression APScheduler refused, in words (its own message is English only)."""
    for (name, word, allowed), value in zip(_CRON_FIELDS, fields, strict=True):
        given = value
        if name == "day_of_week":
            try:
                given = cron_weekdays(value)
            except ValueError:
                return None  # our own words already ("weekday '9' out of range 0-7")
        try:
            CronTrigger(**{name: given}, timezone=tz)
        except ValueError:
            return tr(
                "the {field} field {value} is not valid (numbers {allowed}, *, ranges a-b, lists a,b, steps */n)",
                field=tr(word),
                value=repr(value),
                allowed=allowed,
            )
    return None


def build_trigger(spec: ScheduleSpec, tz: ZoneInfo) -> Trigger:
    """An APScheduler trigger for `spec` in zone `tz`. Raises ScheduleError naming the field."""
    start = _aware(spec.start, tz)
    end = _aware(spec.end, tz, end=True)
    if start and end and end <= start:
        raise ScheduleError(tr("end must be after start"), "end")
    if spec.cron is not None:
        fields = spec.cron.split()
        if len(fields) != 5:
            why = tr(
                "cron needs 5 fields (minute hour day month weekday), got {n}: {cron}",
                n=len(fields),
                cron=repr(spec.cron),
            )
            raise ScheduleError(why, "cron")
        try:
            cron = CronTrigger(
                minute=fields[0],
                hour=fields[1],
                day=fields[2],
                month=fields[3],
                day_of_week=cron_weekdays(fields[4]),
                timezone=tz,
                start_date=start,
                end_date=end,
            )
        except ValueError as exc:
            why = _bad_cron_field(fields, tz) or str(exc)
            said = tr("invalid cron expression {cron}: {why}", cron=repr(spec.cron), why=why)
            raise ScheduleError(said, "cron") from None
        return _OncePerWallTime(cron)
    if spec.at is not None:
        return cast(Trigger, DateTrigger(run_date=_aware(spec.at, tz), timezone=tz))
    assert spec.every is not None
    anchor = start or EPOCH.replace(tzinfo=tz)
    every = int(spec.every.total_seconds())
    return cast(Trigger, IntervalTrigger(seconds=every, start_date=anchor, end_date=end, timezone=tz))


def _as_lived(fire: datetime) -> datetime:
    """`fire` on the wall clock it happens at: a spring-forward 02:30 that does not exist (APScheduler's answer, read
    as the offset before the change) is the 03:30 it fires at. The same moment either way; only what is shown."""
    return fire.astimezone(UTC).astimezone(fire.tzinfo)


def next_fire_times(trigger: Trigger, after: datetime, count: int = 5) -> list[datetime]:
    """The next `count` fire times strictly after `after` (aware, on the wall clock they fire at)."""
    out: list[datetime] = []
    previous: datetime | None = None
    now = _just_after(after)
    for _ in range(count):
        fire = trigger.get_next_fire_time(previous, now)
        if fire is None:
            break
        if fire <= after:  # a one-off date in the past is "next" to APScheduler, not to people
            previous, now = fire, _just_after(fire)
            continue
        out.append(_as_lived(fire))
        previous = fire
        now = _just_after(fire)
    return out


def latest_fire_time(trigger: Trigger, now: datetime) -> datetime | None:
    """The most recent fire time at or before `now` (None if the schedule has not fired within a year).

    Used to name a manual run after the schedule slot it belongs to, so `wecast run` and the scheduler
    agree on what "this week's run" is and never send it twice.
    """
    # Triggers only answer "next after"; look back over growing windows, then walk forward.
    for window in (
        timedelta(minutes=2),
        timedelta(hours=2),
        timedelta(days=2),
        timedelta(days=8),
        timedelta(days=32),
        timedelta(days=370),
    ):
        fire = trigger.get_next_fire_time(None, now - window)
        if fire is None or fire > now:
            continue
        while True:
            following = trigger.get_next_fire_time(fire, _just_after(fire))
            if following is None or following > now:
                return _as_lived(fire)
            fire = following
    return None


_DOW = ["sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def cron_weekdays(field: str) -> str:
    """Standard cron weekday numbers (0 or 7 = Sunday) -> names; APScheduler 3 counts 0 = Monday."""
    out: list[str] = []
    for part in field.split(","):
        body, _, step = part.partition("/")
        if body.isdigit() or (("-" in body) and all(x.isdigit() for x in body.split("-", 1))):
            lo, _, hi = body.partition("-")
            first, last = int(lo), int(hi or lo)
            if not (0 <= first <= 7 and 0 <= last <= 7) or first > last:
                raise ValueError(tr("weekday {day} out of range 0-7", day=repr(body)))
            days = list(range(first, last + 1, int(step) if step else 1)) if step or hi else [first]
            out.extend(_DOW[d] for d in days)
        else:
            out.append(part)
    return ",".join(dict.fromkeys(out))

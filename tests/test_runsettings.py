"""The run's settings snapshot (RunSettings) and the policy value objects it carries (QuietHours, FrequencyCap)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from helpers import MONDAY_10, PLAIN, campaign, run, started

from engine.errors import WecastError
from engine.plan import run_settings
from engine.runsettings import RunSettings
from engine.settings import FrequencyCap, QuietHours, Settings
from storage.models import DeliveryStatus, RunStatus
from storage.runs import NewRun, get_run, record_plan

SHANGHAI = ZoneInfo("Asia/Shanghai")
NEW_YORK = ZoneInfo("America/New_York")
NIGHT = QuietHours(start=time(21, 0), end=time(9, 0))


@pytest.mark.parametrize(
    ("local", "expected"),
    [
        (datetime(2026, 1, 5, 20, 59), 0.0),  # before the window
        (datetime(2026, 1, 5, 21, 0), 12 * 3600.0),  # it starts: open again at 09:00 tomorrow
        (datetime(2026, 1, 6, 3, 30), 5.5 * 3600),  # after midnight, the same night
        (datetime(2026, 1, 6, 8, 59, 59, 500000), 1.0),  # never less than a second
        (datetime(2026, 1, 6, 9, 0), 0.0),  # it ends
    ],
)
def test_quiet_hours_across_midnight(local: datetime, expected: float) -> None:
    """21:00–09:00 holds sends from 21:00 to 09:00 local time, and says how long until it opens."""
    now = local.replace(tzinfo=SHANGHAI).astimezone(UTC)
    assert NIGHT.seconds_until_open(now, SHANGHAI) == pytest.approx(expected)


def test_quiet_hours_open_at_the_local_time_on_a_dst_night() -> None:
    """On the night New York's clocks spring forward (2026-03-08), 21:00–09:00 opens at 09:00 EDT: 11 real hours
    after 21:00 EST, not 12."""
    start = datetime(2026, 3, 7, 21, 0, tzinfo=NEW_YORK)
    wait = NIGHT.seconds_until_open(start.astimezone(UTC), NEW_YORK)
    opens = start.astimezone(UTC) + timedelta(seconds=wait)
    assert opens == datetime(2026, 3, 8, 9, 0, tzinfo=NEW_YORK).astimezone(UTC)
    assert wait == 11 * 3600


def test_quiet_hours_read_and_show_as_hh_mm() -> None:
    """A window reads '21:00' (and YAML's sexagesimal 1260) and shows itself as 21:00–09:00, in text and JSON."""
    q = QuietHours.model_validate({"start": 1260, "end": "09:00"})
    assert q == NIGHT and str(q) == "21:00–09:00" and f"{q:%H}" == "21–09"
    assert q.model_dump(mode="json") == {"start": "21:00", "end": "09:00"}


@pytest.mark.parametrize(
    ("per", "local", "start", "end"),
    [
        ("day", datetime(2026, 1, 5, 23, 59), datetime(2026, 1, 5), datetime(2026, 1, 6)),
        ("week", datetime(2026, 1, 8, 12, 0), datetime(2026, 1, 5), datetime(2026, 1, 12)),  # Monday to Monday
        ("month", datetime(2026, 12, 31, 8, 0), datetime(2026, 12, 1), datetime(2027, 1, 1)),
    ],
)
def test_frequency_cap_windows_are_local_calendar_periods(
    per: str, local: datetime, start: datetime, end: datetime
) -> None:
    """The cap counts per calendar day / week (from Monday) / month in the campaign's zone, as UTC bounds."""
    cap = FrequencyCap.model_validate({"max": 2, "per": per})
    got = cap.window(local.replace(tzinfo=SHANGHAI).astimezone(UTC), SHANGHAI)
    assert got == (start.replace(tzinfo=SHANGHAI).astimezone(UTC), end.replace(tzinfo=SHANGHAI).astimezone(UTC))
    assert not cap.reached(1) and cap.reached(2)
    period = "today" if per == "day" else f"this {per}"
    assert cap.reason(2) == f"already got 2 marketing messages {period} (max 2)"


def test_a_dst_day_is_23_hours_long() -> None:
    """The cap's day is the local calendar day, however long: 2026-03-08 in New York has 23 hours."""
    start, end = FrequencyCap(per="day").window(datetime(2026, 3, 8, 12, tzinfo=NEW_YORK), NEW_YORK)
    assert end - start == timedelta(hours=23)


def test_run_settings_round_trip_through_the_stored_json(make_settings: Callable[..., Settings]) -> None:
    """What the planner stores is what the dispatcher reads back: a frozen value equal to the campaign's policies."""
    settings = make_settings()
    c = campaign(
        settings,
        PLAIN.replace("frequency_cap: false", "frequency_cap: {max: 2, per: week}")
        .replace("quiet_hours: false", 'quiet_hours: {start: "22:00", end: "08:30"}')
        .replace("per_second: 1000", "per_second: 4"),
    )
    app = run(started(settings))
    plan = app.plan(c)
    stored = get_run(app.db, plan.run_id)
    assert stored is not None
    back = RunSettings.from_json(stored.settings, run_id=plan.run_id)
    assert back == run_settings(c)
    assert back.interval == 0.25 and back.quiet_hours == QuietHours(start=time(22, 0), end=time(8, 30))
    assert back.frequency_cap == FrequencyCap(max=2, per="week") and back.capped
    with pytest.raises(Exception, match="frozen"):
        back.interval = 0  # type: ignore[misc]
    run(app.close())


def test_damaged_stored_settings_are_a_clear_error_naming_the_run(make_settings: Callable[..., Settings]) -> None:
    """A run whose stored settings do not validate is refused with an error naming the run and the field, instead
    of being sent with defaults (no throttle, no quiet hours, no cap)."""
    settings = make_settings()
    app = run(started(settings))
    junk = {"version": 1, "timezone": "Asia/Shanghai", "interval": "fast", "max_errors": 0}
    recorded = record_plan(
        app.db,
        NewRun(campaign_id="x", run_key="k", trigger="manual", timezone="UTC", settings=junk, created_at=MONDAY_10),
        [],
        capped=False,
    )
    with pytest.raises(WecastError, match=rf"run {recorded.run_id}: its stored settings are unreadable \(interval"):
        run(app.dispatcher.run(recorded.run_id))
    run(app.close())


@pytest.mark.parametrize(
    "db_url", ["sqlite"], indirect=True
)  # waiting on the fake clock; the JSON is read on both backends above
def test_a_run_planned_by_release_0_1_resumes_with_its_quiet_hours(make_settings: Callable[..., Settings]) -> None:
    """A run planned by wecast 0.1 (an untyped settings dict, times as "HH:MM") still holds its sends in its quiet
    hours after an upgrade, and sends when they end."""
    from storage.deliveries import Planned

    settings = make_settings(contacts=20)
    app = run(started(settings))
    legacy = {
        "interval": 0.001,
        "per_second": 1000,
        "per_minute": None,
        "max_errors": 0,
        "timezone": "Asia/Shanghai",
        "frequency_cap": None,
        "quiet_hours": {"start": "09:00", "end": "11:00"},  # MONDAY_10 is 10:00 in Shanghai: inside
        "campaign_name": "旧版活动",
    }
    ids = [c.id for c in run(app.gateway.list_contacts(None, 5)).contacts if c.friend]
    recorded = record_plan(
        app.db,
        NewRun(
            campaign_id="old",
            run_key="k",
            trigger="manual",
            timezone="Asia/Shanghai",
            settings=legacy,
            created_at=MONDAY_10,
        ),
        [Planned(cid, "", "旧版消息", f"old|k|{cid}") for cid in ids],
        capped=False,
    )
    read = RunSettings.from_json(legacy, run_id=recorded.run_id)
    assert read.name == "旧版活动" and read.quiet_hours == QuietHours(start=time(9, 0), end=time(11, 0))
    held = run(app.dispatcher.run(recorded.run_id, quiet_wait_max=0))
    assert held.status is RunStatus.RUNNING and held.sent == 0 and "quiet hours (09:00–11:00)" in held.message
    done = run(app.dispatcher.run(recorded.run_id))  # waits (on the fake clock) for 11:00
    assert done.status is RunStatus.COMPLETED and done.counts == {DeliveryStatus.SENT: len(ids)}
    assert app.clock.now() >= datetime(2026, 1, 5, 3, 0, tzinfo=UTC)  # 11:00 Shanghai
    run(app.close())

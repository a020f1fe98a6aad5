"""The campaign scheduler with an injected clock: cron in Asia/Shanghai, one-off, interval, catch-up across
a restart (once, not zero, not twice), no overlap of a long run with its next fire, file reloads that report
invalid files, interrupted runs resumed, contact re-sync."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from engine.clock import FakeClock
from engine.gateways.base import SendReceipt
from engine.gateways.sandbox import SandboxGateway, SandboxStore
from engine.schedule import ScheduleSpec, build_trigger, next_fire_times
from engine.scheduler import ADOPT_AFTER, CampaignScheduler
from engine.service import Wecast
from engine.settings import Settings
from engine.spec import load_campaign
from storage.runs import RunRow, get_run, heartbeat, list_runs, take_over

pytestmark = pytest.mark.anyio

# 2026-01-05 is a Monday; 02:00 UTC is 10:00 in Asia/Shanghai.
T0 = datetime(2026, 1, 5, 1, 0, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings_for(root: Path, db_url: str | None = None, **scheduler: Any) -> Settings:
    return Settings.model_validate(
        {
            "version": 1,
            "database_url": db_url or f"sqlite:///{root / 'w.sqlite'}",
            "campaigns_dir": str(root / "campaigns"),
            "sandbox": {"contacts": 30, "auto_login": True, "state_file": str(root / "sandbox.sqlite")},
            "sending": {"throttle": {"per_second": 1000}, "quiet_hours": None, "frequency_cap": None},
            "scheduler": {"contacts_sync": None, **scheduler},
        }
    )


def write_campaign(root: Path, schedule: str, name: str = "greet") -> Path:
    folder = root / "campaigns"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(
        f"id: {name}\nname: 问候\ntimezone: Asia/Shanghai\nschedule: {schedule}\naudience: {{}}\n"
        'message:\n  template: "{{ name }}您好"\nquiet_hours: false\nfrequency_cap: false\n',
        encoding="utf-8",
    )
    return path


class GatedSandbox(SandboxGateway):
    """A sandbox whose sends wait for `gate`: a run that lasts as long as the test wants."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()

    async def send_text(self, contact_id: str, text: str, *, idempotency_key: str) -> SendReceipt:
        await self.gate.wait()
        return await super().send_text(contact_id, text, idempotency_key=idempotency_key)


@asynccontextmanager
async def service(
    root: Path, clock: FakeClock, *, gated: bool = False, db_url: str | None = None, **scheduler: Any
) -> AsyncIterator[tuple[Wecast, CampaignScheduler]]:
    """A started Wecast (synced contacts) and a scheduler driven by hand (no loop)."""
    settings = settings_for(root, db_url, **scheduler)
    gateway = GatedSandbox(settings.sandbox, clock) if gated else None
    app = Wecast(settings, clock=clock, gateway=gateway)
    await app.start()
    await app.sync()
    sched = CampaignScheduler(app)
    await sched.start(loop=False)
    try:
        yield app, sched
    finally:
        await sched.stop()
        app.dispatcher.stop()
        await sched.workers.drain(5)
        await app.close()


async def settle(sched: CampaignScheduler) -> None:
    """Wait for every dispatch the scheduler started."""
    while sched.workers.running():
        task = sched.workers.task(sched.workers.running()[0])
        if task is not None:
            await task


def runs(app: Wecast, campaign_id: str = "greet") -> list[RunRow]:
    return sorted(list_runs(app.db, campaign_id=campaign_id), key=lambda r: r.id)


async def test_cron_fires_in_the_campaigns_time_zone(tmp_path: Path) -> None:
    """A 10:00 Asia/Shanghai cron fires at 02:00 UTC, once per slot, and a manual run of the slot is the same run."""
    write_campaign(tmp_path, '{cron: "0 10 * * *"}')
    clock = FakeClock(datetime(2026, 1, 5, 1, 59, tzinfo=UTC))
    async with service(tmp_path, clock) as (app, sched):
        assert await sched.tick() == []
        assert sched.next_fire(sched.entries["greet"].campaign) == datetime(2026, 1, 5, 2, 0, tzinfo=UTC)
        clock.set(datetime(2026, 1, 5, 2, 0, 0, tzinfo=UTC))
        fired = await sched.tick()
        assert [(f.action, f.run_key) for f in fired] == [("started", "2026-01-05T02:00:00Z")]
        await settle(sched)
        assert await sched.tick() == []
        [run] = runs(app)
        assert run.trigger == "schedule" and run.status == "completed" and run.planned > 0
        manual = app.plan(load_campaign(tmp_path / "campaigns" / "greet.yaml", app.settings))
        assert (manual.run_id, manual.created) == (run.id, False)
        clock.set(datetime(2026, 1, 6, 2, 0, 5, tzinfo=UTC))
        assert [f.run_key for f in await sched.tick()] == ["2026-01-06T02:00:00Z"]
        await settle(sched)
        assert len(runs(app)) == 2


async def test_one_off_fires_once(tmp_path: Path) -> None:
    """`at` fires at its local time once and never again."""
    write_campaign(tmp_path, '{at: "2026-01-05T12:00:00"}')
    clock = FakeClock(datetime(2026, 1, 5, 3, 0, tzinfo=UTC))
    async with service(tmp_path, clock) as (app, sched):
        await sched.tick()
        clock.set(datetime(2026, 1, 5, 4, 0, 10, tzinfo=UTC))
        assert [f.run_key for f in await sched.tick()] == ["2026-01-05T04:00:00Z"]
        await settle(sched)
        clock.set(datetime(2026, 1, 9, tzinfo=UTC))
        assert await sched.tick() == []
        assert len(runs(app)) == 1


async def test_interval_fires_every_slot(tmp_path: Path) -> None:
    """`every: 2h` fires at each 2-hour slot, each its own run."""
    write_campaign(tmp_path, "{every: 2h}")
    clock = FakeClock(T0)
    async with service(tmp_path, clock) as (app, sched):
        await sched.tick()
        for hour in (2, 4):
            clock.set(datetime(2026, 1, 5, hour, 0, 1, tzinfo=UTC))
            assert [f.run_key for f in await sched.tick()] == [f"2026-01-05T0{hour}:00:00Z"]
            await settle(sched)
        assert [r.run_key for r in runs(app)] == ["2026-01-05T02:00:00Z", "2026-01-05T04:00:00Z"]


@pytest.mark.parametrize(
    ("policy", "down_until", "expected"),
    [
        ("once", datetime(2026, 1, 5, 2, 20, tzinfo=UTC), ["2026-01-05T02:00:00Z"]),
        ("skip", datetime(2026, 1, 5, 2, 20, tzinfo=UTC), []),
        ("once", datetime(2026, 1, 5, 3, 30, tzinfo=UTC), []),  # outside the 1h grace window
        ("all", datetime(2026, 1, 5, 2, 20, tzinfo=UTC), ["2026-01-05T01:30:00Z", "2026-01-05T02:00:00Z"]),
    ],
)
async def test_restart_across_fire_times_follows_the_catch_up_policy(
    tmp_path: Path, policy: str, down_until: datetime, expected: list[str]
) -> None:
    """Fires missed while down are caught up per policy, exactly once, and never again after another restart."""
    write_campaign(tmp_path, "{every: 30m}" if policy == "all" else '{cron: "0 10 * * *"}')
    clock = FakeClock(T0)
    async with service(tmp_path, clock, catch_up=policy) as (_, sched):
        assert await sched.tick() == []  # first sight: counts from now
    clock.set(down_until)
    async with service(tmp_path, clock, catch_up=policy) as (app, sched):
        fired = await sched.tick()
        assert [f.run_key for f in fired if f.action == "started"] == expected
        await settle(sched)
        assert await sched.tick() == []
    async with service(tmp_path, clock, catch_up=policy) as (app, sched):
        assert await sched.tick() == []
        assert [r.run_key for r in runs(app)] == expected
        assert all(r.status == "completed" for r in runs(app))


async def test_a_long_run_never_overlaps_its_next_fire(tmp_path: Path) -> None:
    """Fires during a run wait for it; afterwards one run starts, for the latest slot."""
    write_campaign(tmp_path, "{every: 1m}")
    clock = FakeClock(datetime(2026, 1, 5, 2, 0, 30, tzinfo=UTC))
    async with service(tmp_path, clock, gated=True) as (app, sched):
        gateway = app.gateway
        assert isinstance(gateway, GatedSandbox)
        await sched.tick()
        clock.set(datetime(2026, 1, 5, 2, 1, tzinfo=UTC))
        assert [f.action for f in await sched.tick()] == ["started"]
        for minute in (2, 3):
            clock.set(datetime(2026, 1, 5, 2, minute, tzinfo=UTC))
            assert await sched.tick() == []
            assert len(runs(app)) == 1 and sched.workers.running()
        gateway.gate.set()
        await settle(sched)
        fired = {f.run_key: f.action for f in await sched.tick()}
        assert fired == {"2026-01-05T02:03:00Z": "started", "2026-01-05T02:02:00Z": "skipped"}
        await settle(sched)
        first, second = runs(app)
        assert first.status == second.status == "completed"
        assert first.finished_at <= second.created_at


async def test_reload_reports_invalid_files_and_keeps_the_valid_ones(tmp_path: Path) -> None:
    """A broken file is listed with file:line and logged, the others keep running; fixing it loads it."""
    write_campaign(tmp_path, '{cron: "0 10 * * *"}')
    clock = FakeClock(T0)
    async with service(tmp_path, clock, reload_interval="5s") as (_, sched):
        assert set(sched.entries) == {"greet"} and sched.errors == []
        broken = tmp_path / "campaigns" / "other.yaml"
        broken.write_text("name: x\naudience: {}\nmessage:\n  templat: oops\n", encoding="utf-8")
        await sched.tick()
        assert sched.errors == []  # not polled yet: the interval has not passed
        clock.advance(5)
        await sched.tick()
        assert set(sched.entries) == {"greet"}
        [error] = sched.errors
        assert error.location.file == str(broken) and error.location.line == 4
        write_campaign(tmp_path, "{every: 1h}", name="other")
        assert await sched.reload() == [] and set(sched.entries) == {"greet", "other"}


async def test_interrupted_runs_resume_on_start(tmp_path: Path) -> None:
    """A run left running by a crash is dispatched when the scheduler starts."""
    write_campaign(tmp_path, '{cron: "0 10 * * *"}')
    clock = FakeClock(T0)
    async with service(tmp_path, clock) as (app, sched):
        plan = app.plan(sched.entries["greet"].campaign)  # planned, never dispatched: as after a crash
    async with service(tmp_path, clock) as (app, sched):
        await settle(sched)
        run = get_run(app.db, plan.run_id)
        assert run is not None and run.status == "completed"


def _dead_owner() -> str:
    """The owner id a process that has ended left behind (as after `kill -9`): this host, a pid that is gone."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}:deadbeef"


async def test_a_running_service_takes_over_runs_nobody_is_sending(tmp_path: Path, db_url: str) -> None:
    """Beside another process on the same database: a run whose owner died (killed mid-run) is taken over at once
    and finished, without a restart; a run without an owner (released, or planned by `wecast run --no-wait`) after
    `ADOPT_AFTER`, so its planner goes first; a run a live process sends, or one whose dispatch here failed, is left
    alone. Each customer gets one."""
    write_campaign(tmp_path, '{cron: "0 10 * * *"}')
    write_campaign(tmp_path, '{cron: "0 11 * * *"}', name="idle")
    write_campaign(tmp_path, '{cron: "0 12 * * *"}', name="busy")
    write_campaign(tmp_path, '{cron: "0 13 * * *"}', name="broken")
    clock = FakeClock(T0)
    async with service(tmp_path, clock, db_url=db_url) as (app, sched):
        failed = app.plan(sched.entries["broken"].campaign, run_key="failed-here")

        async def bug() -> None:
            raise RuntimeError("a bug in this dispatch")

        await sched.workers.start(failed.run_id, "broken", bug)  # stopped here on a failure: left to a person
        orphan = app.plan(sched.entries["greet"].campaign, run_key="killed")
        assert take_over(app.db, orphan.run_id, expected_owner="", owner=_dead_owner(), now=T0, resend_in_flight=True)
        waiting = app.plan(sched.entries["idle"].campaign, run_key="no-wait")
        alive = app.plan(sched.entries["busy"].campaign, run_key="elsewhere")
        other = f"{socket.gethostname()}:{os.getpid()}:0ther0wn"  # a live process (this one, another dispatcher)
        assert take_over(app.db, alive.run_id, expected_owner="", owner=other, now=T0, resend_in_flight=True)

        assert await sched.adopt_orphans() == [orphan.run_id]
        await settle(sched)
        assert [r.status for r in runs(app)] == ["completed"]
        clock.advance(ADOPT_AFTER / 2)
        assert await sched.adopt_orphans() == []  # not ownerless long enough yet
        heartbeat(app.db, alive.run_id, clock.now())  # the live owner keeps beating
        clock.advance(ADOPT_AFTER / 2)
        await sched.tick()  # the scheduler's own loop looks, too
        await settle(sched)
        assert [r.status for r in runs(app, "idle")] == ["completed"]
        assert [(r.status, r.owner) for r in runs(app, "busy")] == [("running", other)]
        assert [r.status for r in runs(app, "broken")] == ["running"]
        store = SandboxStore(app.settings.sandbox.state_file)
        try:
            received = Counter(m.idempotency_key for m in store.messages())
        finally:
            store.close()
        assert set(received.values()) == {1} and len(received) == orphan.planned + waiting.planned


async def test_contacts_resync_on_schedule(tmp_path: Path) -> None:
    """Contacts re-sync every `scheduler.contacts_sync`, not more often."""
    write_campaign(tmp_path, '{cron: "0 10 * * *"}')
    clock = FakeClock(T0)
    async with service(tmp_path, clock, contacts_sync="1h") as (_, sched):
        await sched.tick()
        await sched.workers.wait_sync()
        first = sched.workers.last_sync_at
        assert first is not None and first >= T0
        clock.advance(1800)
        await sched.tick()
        await sched.workers.wait_sync()
        assert sched.workers.last_sync_at == first
        clock.advance(1800)
        await sched.tick()
        await sched.workers.wait_sync()
        assert sched.workers.last_sync_at is not None
        assert sched.workers.last_sync_at >= first + timedelta(hours=1)


async def test_a_failed_contact_sync_is_retried_after_a_pause_not_every_tick(tmp_path: Path) -> None:
    """A sync that fails (here: the database refuses writes, SQLite's query_only) was retried on every scheduler
    tick, a warning each time, since only a success counts as the last sync: now the next try waits
    SYNC_RETRY (or the sync interval, if shorter), and a success clears the failure."""
    from sqlalchemy import event

    from engine.scheduler import SYNC_RETRY

    write_campaign(tmp_path, '{cron: "0 10 1 1 *"}')  # fires on 1 January only: no plan meets the read-only database
    clock = FakeClock(T0)
    async with service(tmp_path, clock, contacts_sync="1h") as (app, sched):
        await sched.tick()
        await sched.workers.wait_sync()
        read_only = {"on": True}

        def pragmas(conn: Any, _record: Any) -> None:
            conn.execute(f"PRAGMA query_only = {'ON' if read_only['on'] else 'OFF'}")

        event.listen(app.db, "connect", pragmas)
        app.db.dispose()
        clock.advance(3600)
        await sched.tick()
        await sched.workers.wait_sync()
        failed = sched.workers.last_sync_failed_at
        assert failed == clock.now() and "readonly" in sched.workers.last_sync_error
        for _ in range(3):  # ticks a few seconds apart: no new attempt
            clock.advance(5)
            await sched.tick()
            await sched.workers.wait_sync()
            assert sched.workers.last_sync_failed_at == failed
        read_only["on"] = False
        app.db.dispose()
        clock.advance(SYNC_RETRY.total_seconds())
        await sched.tick()
        await sched.workers.wait_sync()
        assert sched.workers.last_sync_at == clock.now() and sched.workers.last_sync_failed_at is None


async def test_a_fire_is_planned_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tick plans a fire in a worker thread: while planning is held, other coroutines keep running (here the
    one that releases it), so a 100,000-recipient plan never stalls sends or HTTP answers."""
    import threading

    write_campaign(tmp_path, '{cron: "0 10 * * *"}')
    clock = FakeClock(datetime(2026, 1, 5, 1, 59, tzinfo=UTC))
    async with service(tmp_path, clock) as (app, sched):
        await sched.tick()
        entered, release = threading.Event(), threading.Event()
        released_in_time: list[bool] = []
        real = app.plan

        def held(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            released_in_time.append(release.wait(5))
            return real(*args, **kwargs)

        monkeypatch.setattr(app, "plan", held)
        clock.set(datetime(2026, 1, 5, 2, 0, tzinfo=UTC))
        tick = asyncio.ensure_future(sched.tick())
        assert await asyncio.to_thread(entered.wait, 5)
        release.set()  # only possible because the loop is free while the plan runs
        fired = await tick
        assert released_in_time == [True] and [f.action for f in fired] == ["started"]
        await settle(sched)


@pytest.mark.timeout(60)
async def test_a_cron_in_a_daylight_saving_zone_fires_once_when_the_clocks_go_back(tmp_path: Path) -> None:
    """A daily 01:30 America/New_York cron on 2026-11-01, when 01:30 comes twice (EDT at 05:30 UTC, EST at 06:30):
    one run, at the first. Before, the second 01:30 was a slot of its own (everyone messaged twice that night), and
    from it on the look-back for the latest fire looped forever on the event loop (the service froze); the next
    fire times repeated it. A spring-forward 02:30 that does not exist fires once, an hour later on the wall."""
    folder = tmp_path / "campaigns"
    folder.mkdir()
    (folder / "night.yaml").write_text(
        "id: night\nname: 夜间\ntimezone: America/New_York\nschedule: {cron: '30 1 * * *'}\naudience: {}\n"
        'message:\n  template: "{{ name }}您好"\nquiet_hours: false\nfrequency_cap: false\n',
        encoding="utf-8",
    )
    clock = FakeClock(datetime(2026, 11, 1, 5, 0, tzinfo=UTC))
    started: list[str] = []
    async with service(tmp_path, clock) as (app, sched):
        assert await sched.tick() == []  # first sight
        for minutes in range(0, 181, 10):
            clock.set(datetime(2026, 11, 1, 5, 0, tzinfo=UTC) + timedelta(minutes=minutes))
            started += [f.run_key for f in await sched.tick() if f.action == "started"]
            await settle(sched)
        assert started == ["2026-11-01T05:30:00Z"]
        assert [r.run_key for r in runs(app, "night")] == started
        trigger = sched.entries["night"].trigger
        assert trigger is not None
        assert [f.astimezone(UTC) for f in next_fire_times(trigger, datetime(2026, 11, 1, 5, 0, tzinfo=UTC), 3)] == [
            datetime(2026, 11, 1, 5, 30, tzinfo=UTC),
            datetime(2026, 11, 2, 6, 30, tzinfo=UTC),
            datetime(2026, 11, 3, 6, 30, tzinfo=UTC),
        ]
        at_0230 = build_trigger(ScheduleSpec(cron="30 2 * * *"), ZoneInfo("America/New_York"))
        spring = next_fire_times(at_0230, datetime(2026, 3, 7, 12, 0, tzinfo=UTC), 2)
        assert [f.astimezone(UTC) for f in spring] == [
            datetime(2026, 3, 8, 7, 30, tzinfo=UTC),  # 03:30 EDT: 02:30 did not happen that night
            datetime(2026, 3, 9, 6, 30, tzinfo=UTC),
        ]

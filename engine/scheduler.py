"""The campaign scheduler of `wecast serve` (its background work, shared with the HTTP API, is `engine.workers`).

Fire times come from APScheduler 3 *triggers* (built in `engine.schedule`); this module drives them with
its own small loop instead of an APScheduler scheduler object, because the loop takes the injected
`Clock`: tests move time instead of waiting for it, and the catch-up rules below are ours, explicit and
tested, not APScheduler's `misfire_grace_time` defaults (which silently drop fires missed while down).

Rules:

* **Slots.** Each fire is planned with `trigger="schedule"` and `run_key=slot_key(fire_time)`, the same key a
  manual `wecast run` (or the API's "run now") in that slot uses: one slot is one run, never sent twice.
* **Catch-up.** The last fire handled per campaign is kept in `schedule_state`. A fire up to `LATE_AFTER`
  late is on time. Older fires (missed while the service was down) follow `scheduler.catch_up`:
  `skip` drops them, `once` (the default) runs the latest one if it is within `scheduler.grace`, `all` runs
  each one within the grace window, oldest first. A campaign first seen now starts counting from now, and a
  campaign whose schedule was edited while running starts again from the edit, so neither fires for the past.
* **No overlap.** A campaign has at most one run being dispatched. A fire that comes while its previous run
  is still sending (or waiting for login or quiet hours) waits for that run to end, then starts once for
  the latest slot that came meanwhile.
* **Reload.** Campaign files are re-read when their names, sizes or mtimes change (polled every
  `scheduler.reload_interval`) and on `reload()`. Invalid files are kept in `errors` (shown by the API
  and logged), never silently dropped; the valid campaigns keep running.
* **Contacts** re-sync every `scheduler.contacts_sync` and after each login, when the account is logged in.
* **Contact changes** the gateway reports (DIRTY events) re-read that one contact (`Workers.refresh_in_background`).
* **Journeys.** Journey files in the same folder are loaded with the campaigns (their errors beside the
  campaigns') and handed to the app's journey engine, which a `JourneyRunner` ticks beside this loop; the
  runner dispatches journey runs (through `Workers`, side by side: one per journey step, entry and day).
* **Start and stop.** `start()` resumes runs interrupted by the last shutdown or crash (`Wecast.resume`; journey
  runs are resumed by the journey runner's first tick); `stop()` ends the loops, and `Workers.drain` lets in-flight
  sends be recorded.
* **Runs nobody sends are taken over** while the service runs, not only at its start (`adopt_orphans`, every
  `ADOPT_EVERY`): a run whose owner died (another `wecast serve` or `wecast run` killed, `engine.owners`) at once;
  a run without an owner (released by a process that stopped, or left waiting by `wecast run --no-wait`) once it
  has stayed so for `ADOPT_AFTER`, so the process that planned it dispatches it first. A run a live process owns
  is left to it, and so is one this process stopped on a failure that needs a person (`Workers.stopped_on_failure`).
* **Never on the event loop:** reading campaign files, planning a fire and every database call run in worker
  threads (`engine.blocking.off_loop`), so a 100,000-recipient plan does not stall sends or HTTP answers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from engine.blocking import off_loop
from engine.clock import Clock
from engine.contacts import ListState
from engine.dberrors import explain
from engine.definitions import Definitions, load_definitions
from engine.errors import CampaignError, WecastError
from engine.gateways.base import EventKind, GatewayEvent
from engine.i18n import tr
from engine.journeys.runtime import Dispatch, JourneyRunner
from engine.owners import owner_alive
from engine.plan import slot_key
from engine.schedule import ScheduleSpec, Trigger, build_trigger, latest_fire_time, next_fire_times
from engine.service import Wecast
from engine.spec import Campaign, campaign_files
from engine.workers import Workers
from storage import runs as runs_db
from storage.errors import StorageError
from storage.journeys import JOURNEY_TRIGGER

log = logging.getLogger("wecast.scheduler")


LATE_AFTER = timedelta(seconds=60)  # a fire handled this late is still "on time", not a catch-up
MAX_CATCH_UP = 100  # `catch_up: all` runs at most this many missed slots
IDLE_CAP = 60.0  # the loop wakes at least this often (seconds)
SYNC_RETRY = timedelta(minutes=5)  # after a failed contact sync (a database it cannot write, the gateway down)
ADOPT_EVERY = 10.0  # seconds between looks for runs nobody is sending
ADOPT_AFTER = 60.0  # seconds a run stays without an owner before this process takes it over


@dataclass
class Fire:
    """One fire the scheduler acted on (or deliberately did not)."""

    campaign_id: str
    fire_time: datetime
    run_key: str
    action: str  # started | skipped | failed
    run_id: int | None = None
    reason: str = ""


@dataclass
class CampaignEntry:
    campaign: Campaign
    trigger: Trigger | None
    schedule: ScheduleSpec | None = None  # as loaded: an edit is noticed by comparing it
    history: list[Fire] = field(default_factory=list)


class CampaignScheduler:
    """Fires the enabled campaigns in `settings.campaigns_dir` by their schedules (see the module doc)."""

    def __init__(
        self,
        app: Wecast,
        *,
        workers: Workers | None = None,
        clock: Clock | None = None,
        campaigns_dir: Path | None = None,
    ) -> None:
        self.app = app
        self.config = app.settings.scheduler
        self.clock = clock or app.clock
        self.workers = workers or Workers(sleep=self.clock.sleep)
        self.campaigns_dir = campaigns_dir or app.settings.campaigns_dir
        self.entries: dict[str, CampaignEntry] = {}
        self.errors: list[CampaignError] = []
        self.fires: list[Fire] = []  # recent decisions, newest last (bounded)
        self.loaded_at: datetime | None = None
        self._snapshot: dict[str, tuple[int, int]] | None = None
        self._last_poll: float | None = None
        self._deferred: set[str] = set()
        self._sync_wanted = False
        self._last_adopt: float | None = None
        self._ownerless: dict[int, float] = {}  # run id -> when this process first saw it without an owner
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self.journeys = JourneyRunner(app.journeys, self._dispatch_journey_run, start_task=self._journey_task)

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self, *, loop: bool = True, resume: bool = True) -> None:
        """Load the campaigns, resume interrupted runs, and (with `loop`) start firing."""
        self._wake = asyncio.Event()
        await self.reload()
        self._unsubscribe = self.app.gateway.subscribe(self._on_event)
        self.workers.on_done.append(self._poke)
        if resume:
            await self.resume_interrupted()
        if loop:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="wecast-scheduler")
            self.journeys.start()

    async def stop(self) -> None:
        """Stop firing (running dispatch tasks are left to `Workers.drain`)."""
        self._stopping = True
        self._poke()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.journeys.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._poke in self.workers.on_done:
            self.workers.on_done.remove(self._poke)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _on_event(self, event: GatewayEvent) -> None:
        if event.kind is EventKind.LOGIN:
            self._sync_wanted = True
            self._poke()
        elif event.kind is EventKind.CONTACT_CHANGED and event.data.get("contact_id"):
            self.workers.refresh_in_background(self.app, str(event.data["contact_id"]))

    async def _loop(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            try:
                await self.tick()
            except StorageError as exc:  # the database's condition (full, locked): one line; the next tick retries
                log.error("scheduler tick failed: %s", explain(exc))
            except Exception:  # one bad tick must not end scheduling
                log.exception("scheduler tick failed")
            self._wake.clear()
            nap = asyncio.ensure_future(self.clock.sleep(self.seconds_until_next()))
            wake = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({nap, wake}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                nap.cancel()
                wake.cancel()

    def seconds_until_next(self) -> float:
        """How long the loop may sleep: until the next fire, file poll or contact sync."""
        now = self.clock.now()
        waits = [IDLE_CAP, self.config.reload_interval.total_seconds(), ADOPT_EVERY]
        for entry in self.entries.values():
            nxt = self.next_fire(entry.campaign)
            if nxt is not None:
                waits.append((nxt - now).total_seconds())
        if self.config.contacts_sync is not None and self.workers.last_sync_at is not None:
            due = self.workers.last_sync_at + self.config.contacts_sync
            waits.append((due - now).total_seconds())
        return max(0.05, min(waits))

    # -- campaign files --------------------------------------------------------------------------
    def _files_snapshot(self) -> dict[str, tuple[int, int]]:
        if not self.campaigns_dir.is_dir():
            return {}
        out = {}
        for path in campaign_files([self.campaigns_dir]):
            try:
                st = path.stat()
            except OSError:
                continue
            out[str(path)] = (st.st_mtime_ns, st.st_size)
        return out

    def _load(self) -> tuple[dict[str, tuple[int, int]], Definitions]:
        snapshot = self._files_snapshot()
        if not self.campaigns_dir.is_dir():
            return snapshot, Definitions(
                errors=[CampaignError(tr("campaigns folder not found: {path}", path=self.campaigns_dir))]
            )
        return snapshot, load_definitions([self.campaigns_dir], self.app.settings)

    async def reload(self) -> list[CampaignError]:
        """Re-read every campaign file now (off the event loop). Returns the problems (also kept in `errors`
        and logged)."""
        self._last_poll = self.clock.monotonic()
        self._snapshot, result = await off_loop(self._load)
        campaigns, errors = result.campaigns, result.errors
        await off_loop(self.app.journeys.set_journeys, result.journeys)
        now = self.clock.now()
        entries: dict[str, CampaignEntry] = {}
        for campaign in campaigns:
            trigger = build_trigger(campaign.schedule, campaign.tz) if campaign.schedule else None
            old = self.entries.get(campaign.id)
            if old is not None and old.schedule != campaign.schedule and trigger is not None:
                # An edited schedule counts from the edit: its past slots are not "missed".
                await self._set_last_fire(campaign.id, now, only_if_later=True)
                log.info(
                    tr(
                        "campaign {campaign}: schedule changed; next fire {when}",
                        campaign=campaign.id,
                        when=self._show(self.next_fire(campaign)),
                    )
                )
            entries[campaign.id] = CampaignEntry(campaign, trigger, campaign.schedule, old.history if old else [])
        added = sorted(set(entries) - set(self.entries))
        removed = sorted(set(self.entries) - set(entries))
        self.entries = entries
        self.errors = errors
        self.loaded_at = now
        log.info(
            tr("campaigns loaded from {folder}: {valid} valid", folder=self.campaigns_dir, valid=len(entries))
            + (tr(", {n} invalid", n=len(errors)) if errors else "")
            + (tr("; added {ids}", ids=", ".join(added)) if added else "")
            + (tr("; removed {ids}", ids=", ".join(removed)) if removed else "")
        )
        for error in errors:
            log.error(tr("invalid campaign file (not scheduled until fixed): {error}", error=error))
        return errors

    async def _maybe_reload(self) -> None:
        if self._last_poll is not None and (
            self.clock.monotonic() - self._last_poll < self.config.reload_interval.total_seconds()
        ):
            return
        self._last_poll = self.clock.monotonic()
        if await off_loop(self._files_snapshot) != self._snapshot:
            await self.reload()

    # -- schedule state --------------------------------------------------------------------------
    def last_fire(self, campaign_id: str) -> datetime | None:
        """The last slot handled for a campaign (a database read: async callers run it off the loop)."""
        return runs_db.last_fire(self.app.db, campaign_id)

    def last_slot_fired(self, entry: CampaignEntry) -> datetime | None:
        """The last slot of the campaign's schedule the scheduler handled, None if it has handled none. The stored
        mark is also where counting starts (the server's start for a campaign first seen, the moment of an edit):
        such a mark is not a slot of the schedule and is never shown as a fire."""
        last = self.last_fire(entry.campaign.id)
        if last is None or entry.trigger is None:
            return None
        return last if latest_fire_time(entry.trigger, last) == last else None

    async def _set_last_fire(self, campaign_id: str, when: datetime, *, only_if_later: bool = False) -> None:
        await off_loop(
            runs_db.set_last_fire, self.app.db, campaign_id, when, self.clock.now(), only_if_later=only_if_later
        )

    def next_fire(self, campaign: Campaign) -> datetime | None:
        entry = self.entries.get(campaign.id)
        if entry is None or entry.trigger is None or not campaign.enabled:
            return None
        fires = next_fire_times(entry.trigger, self.clock.now(), 1)
        return fires[0] if fires and fires[0] > self.clock.now() else None

    # -- firing ----------------------------------------------------------------------------------
    async def tick(self) -> list[Fire]:
        """One pass: poll files, fire what is due, start a contact sync if one is due. Returns the fires
        acted on in this pass."""
        await self._maybe_reload()
        acted: list[Fire] = []
        for entry in list(self.entries.values()):
            if entry.campaign.enabled and entry.trigger is not None:
                acted += await self._check(entry, entry.trigger)
        await self._maybe_sync()
        await self.adopt_orphans()
        return acted

    def _due(self, trigger: Trigger, last: datetime, now: datetime) -> list[datetime]:
        """Fire times in (last, now], oldest first; only the grace window is enumerated (older fires can
        only be skipped), plus the latest fire, which a deferred run needs whatever its age."""
        latest = latest_fire_time(trigger, now)
        if latest is None or latest <= last:
            return []
        since = max(last, now - self.config.grace - LATE_AFTER)
        fires = [f for f in next_fire_times(trigger, since, MAX_CATCH_UP + 2) if last < f <= now]
        if latest not in fires:
            fires.append(latest)
        return sorted(fires)

    def _choose(self, due: list[datetime], now: datetime) -> list[datetime]:
        """The catch-up policy (module docstring)."""
        on_time = [f for f in due if now - f <= LATE_AFTER]
        missed = [f for f in due if now - f > LATE_AFTER and now - f <= self.config.grace]
        policy = self.config.catch_up
        if policy == "skip":
            extra: list[datetime] = []
        elif policy == "once":
            extra = [] if on_time else missed[-1:]
        else:
            extra = missed[-MAX_CATCH_UP:]
        return sorted({*extra, *on_time[-1:]})

    async def _check(self, entry: CampaignEntry, trigger: Trigger) -> list[Fire]:
        campaign = entry.campaign
        now = self.clock.now()
        last = await off_loop(self.last_fire, campaign.id)
        if last is None:  # first sight: only fires from now on count
            await self._set_last_fire(campaign.id, now)
            return []
        due = self._due(trigger, last, now)
        if not due:
            return []
        busy = self.workers.active_run(campaign.id)
        if busy is not None:
            if campaign.id not in self._deferred:
                log.info(
                    tr(
                        "campaign {campaign}: fire at {when} waits for run {run} to finish (runs never overlap)",
                        campaign=campaign.id,
                        when=self._show(due[-1]),
                        run=busy,
                    )
                )
            self._deferred.add(campaign.id)
            return []
        if await off_loop(self.app.contact_list) is not ListState.WHOLE:
            await self.app.ensure_contacts()
            state = await off_loop(self.app.contact_list)
            if state is not ListState.WHOLE:
                if campaign.id not in self._deferred:
                    log.warning(
                        tr(
                            "campaign {campaign}: fire at {when} waits: {why}",
                            campaign=campaign.id,
                            when=self._show(due[-1]),
                            why=tr("no contacts synced yet (log in first)")
                            if state is ListState.EMPTY
                            else tr(
                                "the last contact sync did not finish (log in, or wait for the sync running elsewhere)"
                            ),
                        )
                    )
                self._deferred.add(campaign.id)
                return []
        if campaign.id in self._deferred:
            chosen = due[-1:]  # fires that came while it waited: one run, for the latest slot
            self._deferred.discard(campaign.id)
        else:
            chosen = self._choose(due, now)
        acted: list[Fire] = []
        skipped = [f for f in due if f not in chosen]
        if skipped:
            why = (
                f"missed while the service was down or busy (catch_up: {self.config.catch_up}, "
                f"grace: {self.config.grace})"
            )
            log.warning(
                tr(
                    "campaign {campaign}: skipping {n} missed fire(s) (latest {when}): missed while the service was "
                    "down or busy (catch_up: {policy}, grace: {grace})",
                    campaign=campaign.id,
                    n=len(skipped),
                    when=self._show(skipped[-1]),
                    policy=self.config.catch_up,
                    grace=self.config.grace,
                )
            )
            acted += [
                self._record(entry, Fire(campaign.id, f, slot_key(f), "skipped", reason=why)) for f in skipped[-5:]
            ]
        planned: list[int] = []
        if chosen:  # a sync this process runs (one starts at login) would have the plan refuse its half-written list
            await self.workers.wait_sync()
        for fire in chosen:
            key = slot_key(fire)
            try:
                plan = await off_loop(self.app.plan, campaign, run_key=key, trigger="schedule")
            except WecastError as exc:
                log.error(
                    tr(
                        "campaign {campaign}: fire at {when} could not be planned: {error}",
                        campaign=campaign.id,
                        when=self._show(fire),
                        error=exc,
                    )
                )
                acted.append(self._record(entry, Fire(campaign.id, fire, key, "failed", reason=str(exc))))
                continue
            late = now - fire > LATE_AFTER
            log.info(
                tr(
                    "campaign {campaign}: fired for {when}{late}: run {run} ({state}, {n} to send)",
                    campaign=campaign.id,
                    when=self._show(fire),
                    late=tr(" (catch-up)") if late else "",
                    run=plan.run_id,
                    state=tr("new") if plan.created else tr("already planned"),
                    n=plan.planned,
                )
            )
            planned.append(plan.run_id)
            acted.append(
                self._record(entry, Fire(campaign.id, fire, key, "started", plan.run_id, "catch-up" if late else ""))
            )
        # Recorded after planning: a crash in between re-plans the same slot (idempotent), never loses it.
        await self._set_last_fire(campaign.id, due[-1])
        if planned:
            self.workers.start(planned[0], campaign.id, lambda: self._dispatch_all(planned))
        return acted

    async def _dispatch_all(self, run_ids: list[int]) -> None:
        for run_id in run_ids:
            summary = await self.app.dispatcher.run(run_id, login_wait=None)
            log.info("run %s: %s (%s)", run_id, summary.status, summary.message)

    def _record(self, entry: CampaignEntry, fire: Fire) -> Fire:
        entry.history.append(fire)
        del entry.history[:-20]
        self.fires.append(fire)
        del self.fires[:-200]
        return fire

    def _show(self, when: datetime | None) -> str:
        return when.isoformat() if when else "never"

    # -- runs started from outside the loop ------------------------------------------------------
    async def resume_interrupted(self) -> list[int]:
        """Start dispatching every run left `running` by the last shutdown or crash."""
        started = []
        for run in await off_loop(runs_db.unfinished_runs, self.app.db):
            run_id, campaign_id = run.id, run.campaign_id
            if run.trigger == JOURNEY_TRIGGER:
                continue  # the journey runner dispatches journey runs (from its first tick on)
            try:
                self.workers.start(run_id, campaign_id, functools.partial(self._resume, run_id))
            except WecastError as exc:
                log.warning("run %s not resumed now: %s", run_id, exc)
                continue
            started.append(run_id)
        if started:
            log.info(tr("resuming interrupted runs: {runs}", runs=", ".join(map(str, started))))
        return started

    async def adopt_orphans(self) -> list[int]:
        """Start dispatching the runs nobody is sending (see the module docstring), at most every `ADOPT_EVERY`
        seconds. Returns the runs started."""
        mono = self.clock.monotonic()
        if self._last_adopt is not None and mono - self._last_adopt < ADOPT_EVERY:
            return []
        self._last_adopt = mono
        now = self.clock.now()
        ownerless: dict[int, float] = {}
        started = []
        for run in await off_loop(runs_db.unfinished_runs, self.app.db):
            if run.trigger == JOURNEY_TRIGGER or self.workers.task(run.id) is not None:
                continue  # the journey runner sends journey runs (and takes them over the same way)
            if not run.owner:
                if run.id in self.workers.stopped_on_failure:
                    continue  # stopped here by a failure that needs a person (logged then): not retried in a loop
                ownerless[run.id] = seen = self._ownerless.get(run.id, mono)
                if mono - seen < ADOPT_AFTER:
                    continue
            elif owner_alive(run.owner, run.heartbeat_at, now):
                continue
            try:
                self.workers.start(run.id, run.campaign_id, functools.partial(self._resume, run.id))
            except WecastError:
                continue  # this process is sending another run of that campaign: taken over after it
            ownerless.pop(run.id, None)
            started.append(run.id)
        self._ownerless = ownerless
        if started:
            log.warning(tr("taking over runs nobody is sending: {runs}", runs=", ".join(map(str, started))))
        return started

    async def _dispatch_journey_run(self, run_id: int) -> None:
        summary = await self.app.dispatcher.run(run_id, login_wait=None)
        log.info("run %s (journey): %s (%s)", run_id, summary.status, summary.message)

    def _journey_task(self, run_id: int, dispatch: Dispatch) -> asyncio.Task[Any]:
        return self.workers.start(run_id, "journey", lambda: dispatch(run_id), exclusive=False)

    async def _resume(self, run_id: int) -> None:
        for summary in await self.app.resume(run_id, login_wait=None):
            log.info("run %s: %s (%s)", run_id, summary.status, summary.message)

    async def _maybe_sync(self) -> None:
        interval = self.config.contacts_sync
        last = self.workers.last_sync_at
        now = self.clock.now()
        due = self._sync_wanted or (interval is not None and (last is None or now - last >= interval))
        failed = self.workers.last_sync_failed_at
        if failed is not None and not self._sync_wanted:  # a failed sync is tried again after a pause, not each tick
            due = due and now - failed >= min(SYNC_RETRY, interval or SYNC_RETRY)
        if not due or self.workers.syncing:
            return
        if not (await self.app.gateway.login_status()).logged_in:
            return
        self._sync_wanted = False
        self.workers.sync_in_background(self.app)

    # -- views for the API -----------------------------------------------------------------------
    def describe(self, campaign_id: str) -> dict[str, Any]:
        """What the scheduler knows of one campaign (reads the database: call it off the event loop)."""
        entry = self.entries[campaign_id]
        return {
            "next_fire": self.next_fire(entry.campaign),
            "last_fire": self.last_slot_fired(entry),
            "active_run": self.workers.active_run(campaign_id),
            "waiting": campaign_id in self._deferred,
            "history": [asdict(f) for f in entry.history],
        }

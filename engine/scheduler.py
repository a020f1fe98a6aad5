"""The campaign scheduler of `wecast serve`, and the background work it shares with the HTTP API.

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
* **Start and stop.** `start()` resumes runs interrupted by the last shutdown or crash (`Wecast.resume`);
  `stop()` ends the loop, and `Workers.drain` lets in-flight sends be recorded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from engine.clock import Clock
from engine.contacts import SyncResult
from engine.errors import CampaignError, WecastError
from engine.gateways.base import EventKind, GatewayEvent
from engine.plan import slot_key
from engine.schedule import build_trigger, latest_fire_time, next_fire_times
from engine.service import Wecast
from engine.spec import Campaign, campaign_files, load_campaigns
from storage import queries
from storage.models import SCHEDULE_STATE

log = logging.getLogger("wecast.scheduler")


LATE_AFTER = timedelta(seconds=60)  # a fire handled this late is still "on time", not a catch-up
MAX_CATCH_UP = 100  # `catch_up: all` runs at most this many missed slots
IDLE_CAP = 60.0  # the loop wakes at least this often (seconds)
API_CAMPAIGN = "api"  # runs of direct sends (`plan_adhoc`); they may run side by side

S = SCHEDULE_STATE.c


class Workers:
    """The service's background work: dispatch tasks (one per run; for campaigns, one per campaign, so a
    campaign's run never overlaps itself) and contact syncs (one at a time: two concurrent syncs would race
    on inserting the same new contacts)."""

    def __init__(self) -> None:
        self._runs: dict[int, asyncio.Task[Any]] = {}
        self._campaigns: dict[str, int] = {}
        self._sync_lock = asyncio.Lock()
        self._sync_task: asyncio.Task[SyncResult | None] | None = None
        self.on_done: list[Callable[[], None]] = []
        self.last_sync_at: datetime | None = None
        self.last_sync: SyncResult | None = None
        self.last_sync_error: str = ""

    # -- runs ------------------------------------------------------------------------------------
    def active_run(self, campaign_id: str) -> int | None:
        """The run this campaign is dispatching now, if any."""
        return self._campaigns.get(campaign_id)

    def task(self, run_id: int) -> asyncio.Task[Any] | None:
        return self._runs.get(run_id)

    def running(self) -> list[int]:
        return sorted(self._runs)

    def start(self, run_id: int, campaign_id: str, work: Callable[[], Coroutine[Any, Any, Any]]) -> asyncio.Task[Any]:
        """Start `work` (dispatching run `run_id`) unless that run, or another run of the same campaign, is
        already being dispatched; returns the task that dispatches it."""
        existing = self._runs.get(run_id)
        if existing is not None:
            return existing
        other = self._campaigns.get(campaign_id) if campaign_id != API_CAMPAIGN else None
        if other is not None:
            raise WecastError(
                f"campaign {campaign_id!r} is still sending run {other}; a campaign's runs never "
                "overlap: wait for it, or pause or cancel it first"
            )
        task = asyncio.get_running_loop().create_task(self._guard(run_id, work()), name=f"wecast-run-{run_id}")
        self._runs[run_id] = task
        if campaign_id != API_CAMPAIGN:
            self._campaigns[campaign_id] = run_id

        def done(_: asyncio.Task[Any]) -> None:
            self._runs.pop(run_id, None)
            if self._campaigns.get(campaign_id) == run_id:
                del self._campaigns[campaign_id]
            for callback in self.on_done:
                callback()

        task.add_done_callback(done)
        return task

    @staticmethod
    async def _guard(run_id: int, work: Awaitable[Any]) -> Any:
        try:
            result = await work
        except asyncio.CancelledError:
            log.info("run %s: dispatch stopped; unsent deliveries stay pending until the run is resumed", run_id)
            raise
        except Exception:  # a background task has nobody to raise to: log it, keep the service up
            log.exception("run %s: dispatch failed", run_id)
            return None
        return result

    async def drain(self, timeout: float) -> list[int]:
        """Wait up to `timeout` seconds (real time) for the dispatch tasks, then cancel what remains (runs
        waiting for a login or quiet hours: nothing of theirs is in flight). Returns the cancelled run ids."""
        tasks = list(self._runs.values())
        if self._sync_task is not None:
            tasks.append(self._sync_task)
        if not tasks:
            return []
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        cancelled = sorted(rid for rid, t in self._runs.items() if t in pending)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=max(timeout, 5.0))
        return cancelled

    # -- contact sync ----------------------------------------------------------------------------
    @property
    def syncing(self) -> bool:
        return self._sync_task is not None and not self._sync_task.done()

    async def sync(self, app: Wecast) -> SyncResult:
        """Sync contacts now (waits for a sync already in progress first)."""
        async with self._sync_lock:
            try:
                result = await app.sync()
            except WecastError as exc:
                self.last_sync_error = str(exc)
                raise
            self.last_sync_at = app.clock.now()
            self.last_sync, self.last_sync_error = result, ""
            log.info(
                "contacts synced: %s seen, %s added, %s updated, %s removed",
                result.seen,
                result.added,
                result.updated,
                result.removed,
            )
            return result

    def sync_in_background(self, app: Wecast) -> asyncio.Task[SyncResult | None]:
        """Start a sync unless one is running; returns its task."""
        if self._sync_task is not None and not self._sync_task.done():
            return self._sync_task

        async def go() -> SyncResult | None:
            try:
                return await self.sync(app)
            except WecastError as exc:
                log.warning("contact sync failed: %s", exc)
                return None

        self._sync_task = asyncio.get_running_loop().create_task(go(), name="wecast-contact-sync")
        return self._sync_task

    async def wait_sync(self) -> None:
        if self._sync_task is not None:
            await self._sync_task


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
    trigger: Any | None
    schedule_dump: dict[str, Any] | None = None
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
        self.workers = workers or Workers()
        self.campaigns_dir = campaigns_dir or app.settings.campaigns_dir
        self.entries: dict[str, CampaignEntry] = {}
        self.errors: list[CampaignError] = []
        self.fires: list[Fire] = []  # recent decisions, newest last (bounded)
        self.loaded_at: datetime | None = None
        self._snapshot: dict[str, tuple[int, int]] | None = None
        self._last_poll: float | None = None
        self._deferred: set[str] = set()
        self._sync_wanted = False
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self, *, loop: bool = True, resume: bool = True) -> None:
        """Load the campaigns, resume interrupted runs, and (with `loop`) start firing."""
        self._wake = asyncio.Event()
        self.reload()
        self._unsubscribe = self.app.gateway.subscribe(self._on_event)
        self.workers.on_done.append(self._poke)
        if resume:
            self.resume_interrupted()
        if loop:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="wecast-scheduler")

    async def stop(self) -> None:
        """Stop firing (running dispatch tasks are left to `Workers.drain`)."""
        self._stopping = True
        self._poke()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
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

    async def _loop(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            try:
                await self.tick()
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
        waits = [IDLE_CAP, self.config.reload_interval.total_seconds()]
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

    def reload(self) -> list[CampaignError]:
        """Re-read every campaign file now. Returns the problems (also kept in `errors` and logged)."""
        self._snapshot = self._files_snapshot()
        self._last_poll = self.clock.monotonic()
        if self.campaigns_dir.is_dir():
            result = load_campaigns([self.campaigns_dir], self.app.settings)
            campaigns, errors = result.campaigns, result.errors
        else:
            campaigns, errors = [], [CampaignError(f"campaigns folder not found: {self.campaigns_dir}")]
        now = self.clock.now()
        entries: dict[str, CampaignEntry] = {}
        for campaign in campaigns:
            trigger = build_trigger(campaign.schedule, campaign.tz) if campaign.schedule else None
            dump = campaign.schedule.model_dump(mode="json") if campaign.schedule else None
            old = self.entries.get(campaign.id)
            if old is not None and old.schedule_dump != dump and trigger is not None:
                # An edited schedule counts from the edit: its past slots are not "missed".
                self._set_last_fire(campaign.id, now, only_if_later=True)
                log.info(
                    "campaign %s: schedule changed; next fire %s",
                    campaign.id,
                    self._show(self.next_fire(campaign)),
                )
            entries[campaign.id] = CampaignEntry(campaign, trigger, dump, old.history if old else [])
        added = sorted(set(entries) - set(self.entries))
        removed = sorted(set(self.entries) - set(entries))
        self.entries = entries
        self.errors = errors
        self.loaded_at = now
        log.info(
            "campaigns loaded from %s: %d valid%s%s%s",
            self.campaigns_dir,
            len(entries),
            f", {len(errors)} invalid" if errors else "",
            f"; added {', '.join(added)}" if added else "",
            f"; removed {', '.join(removed)}" if removed else "",
        )
        for error in errors:
            log.error("invalid campaign file (not scheduled until fixed): %s", error)
        return errors

    def _maybe_reload(self) -> None:
        if self._last_poll is not None and (
            self.clock.monotonic() - self._last_poll < self.config.reload_interval.total_seconds()
        ):
            return
        self._last_poll = self.clock.monotonic()
        if self._files_snapshot() != self._snapshot:
            self.reload()

    # -- schedule state --------------------------------------------------------------------------
    def last_fire(self, campaign_id: str) -> datetime | None:
        with self.app.db.connect() as conn:
            value: datetime | None = conn.execute(select(S.last_fire_at).where(S.campaign_id == campaign_id)).scalar()
        return value

    def _set_last_fire(self, campaign_id: str, when: datetime, *, only_if_later: bool = False) -> None:
        now = self.clock.now()
        with self.app.db.begin() as conn:
            inserted = queries.insert_ignore(
                conn,
                SCHEDULE_STATE,
                [{"campaign_id": campaign_id, "last_fire_at": when, "updated_at": now}],
            )
            if not inserted:
                stmt = update(SCHEDULE_STATE).where(S.campaign_id == campaign_id)
                if only_if_later:
                    stmt = stmt.where(S.last_fire_at < when)
                conn.execute(stmt.values(last_fire_at=when, updated_at=now))

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
        self._maybe_reload()
        acted: list[Fire] = []
        for entry in list(self.entries.values()):
            if entry.campaign.enabled and entry.trigger is not None:
                acted += await self._check(entry)
        await self._maybe_sync()
        return acted

    def _due(self, entry: CampaignEntry, last: datetime, now: datetime) -> list[datetime]:
        """Fire times in (last, now], oldest first; only the grace window is enumerated (older fires can
        only be skipped), plus the latest fire, which a deferred run needs whatever its age."""
        latest = latest_fire_time(entry.trigger, now)
        if latest is None or latest <= last:
            return []
        since = max(last, now - self.config.grace - LATE_AFTER)
        fires = [f for f in next_fire_times(entry.trigger, since, MAX_CATCH_UP + 2) if last < f <= now]
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

    async def _check(self, entry: CampaignEntry) -> list[Fire]:
        campaign = entry.campaign
        now = self.clock.now()
        last = self.last_fire(campaign.id)
        if last is None:  # first sight: only fires from now on count
            self._set_last_fire(campaign.id, now)
            return []
        due = self._due(entry, last, now)
        if not due:
            return []
        busy = self.workers.active_run(campaign.id)
        if busy is not None:
            if campaign.id not in self._deferred:
                log.info(
                    "campaign %s: fire at %s waits for run %s to finish (runs never overlap)",
                    campaign.id,
                    self._show(due[-1]),
                    busy,
                )
            self._deferred.add(campaign.id)
            return []
        if self.app.contact_count() == 0:
            await self.app.ensure_contacts()
            if self.app.contact_count() == 0:
                if campaign.id not in self._deferred:
                    log.warning(
                        "campaign %s: fire at %s waits: no contacts synced yet (log in first)",
                        campaign.id,
                        self._show(due[-1]),
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
                "campaign %s: skipping %d missed fire(s) (latest %s): %s",
                campaign.id,
                len(skipped),
                self._show(skipped[-1]),
                why,
            )
            acted += [
                self._record(entry, Fire(campaign.id, f, slot_key(f), "skipped", reason=why)) for f in skipped[-5:]
            ]
        planned: list[int] = []
        for fire in chosen:
            key = slot_key(fire)
            try:
                plan = self.app.plan(campaign, run_key=key, trigger="schedule")
            except WecastError as exc:
                log.error("campaign %s: fire at %s could not be planned: %s", campaign.id, self._show(fire), exc)
                acted.append(self._record(entry, Fire(campaign.id, fire, key, "failed", reason=str(exc))))
                continue
            late = now - fire > LATE_AFTER
            log.info(
                "campaign %s: fired for %s%s: run %s (%s, %d to send)",
                campaign.id,
                self._show(fire),
                " (catch-up)" if late else "",
                plan.run_id,
                "new" if plan.created else "already planned",
                plan.planned,
            )
            planned.append(plan.run_id)
            acted.append(
                self._record(entry, Fire(campaign.id, fire, key, "started", plan.run_id, "catch-up" if late else ""))
            )
        # Recorded after planning: a crash in between re-plans the same slot (idempotent), never loses it.
        self._set_last_fire(campaign.id, due[-1])
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
    def resume_interrupted(self) -> list[int]:
        """Start dispatching every run left `running` by the last shutdown or crash."""
        with self.app.db.connect() as conn:
            runs = queries.unfinished_runs(conn)
        started = []
        for run in runs:
            run_id, campaign_id = int(run["id"]), str(run["campaign_id"])
            try:
                self.workers.start(run_id, campaign_id, functools.partial(self._resume, run_id))
            except WecastError as exc:
                log.warning("run %s not resumed now: %s", run_id, exc)
                continue
            started.append(run_id)
        if started:
            log.info("resuming interrupted runs: %s", ", ".join(map(str, started)))
        return started

    async def _resume(self, run_id: int) -> None:
        for summary in await self.app.resume(run_id, login_wait=None):
            log.info("run %s: %s (%s)", run_id, summary.status, summary.message)

    async def _maybe_sync(self) -> None:
        interval = self.config.contacts_sync
        last = self.workers.last_sync_at
        due = self._sync_wanted or (interval is not None and (last is None or self.clock.now() - last >= interval))
        if not due or self.workers.syncing:
            return
        if not (await self.app.gateway.login_status()).logged_in:
            return
        self._sync_wanted = False
        self.workers.sync_in_background(self.app)

    # -- views for the API -----------------------------------------------------------------------
    def describe(self, campaign_id: str) -> dict[str, Any]:
        entry = self.entries[campaign_id]
        return {
            "next_fire": self.next_fire(entry.campaign),
            "last_fire": self.last_fire(campaign_id),
            "active_run": self.workers.active_run(campaign_id),
            "waiting": campaign_id in self._deferred,
            "history": [f.__dict__ for f in entry.history],
        }

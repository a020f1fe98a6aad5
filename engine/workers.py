"""The background work of `wecast serve`, shared by the scheduler and the HTTP API (which also runs without a
scheduler): dispatch tasks, one per run — and for a campaign one at a time, so a campaign's runs never overlap —
and contact syncs, one at a time (two concurrent syncs would race on inserting the same new contacts), plus the
refresh of single contacts the gateway says changed (DIRTY events).

A run whose dispatch stopped because the database failed in a way that passes by itself — its server restarted or
could not be reached (`unreachable`), another process held it locked past the busy timeout (`busy`) — is dispatched
again after a pause (5 s, doubling up to 2 min) until it ends: it is taken over as after a crash, so nothing is sent
twice (tests/test_database_away.py). Other failures (a full disk, a deleted file, a newer schema) stop the run with
one log line until someone acts (`wecast run --resume`, or the next start)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any

from engine.contacts import SyncResult, refresh_contact
from engine.dberrors import explain
from engine.errors import WecastError
from engine.i18n import process_language, tr, use_language
from engine.plan import API_CAMPAIGN
from engine.service import Wecast
from storage.errors import Failure, StorageError

log = logging.getLogger("wecast.workers")

# The database failures a running service waits out (see the module docstring), and its pauses between tries.
PASSING = frozenset({Failure.UNREACHABLE, Failure.BUSY})
RETRY_FIRST = 5.0
RETRY_MAX = 120.0


class Workers:
    """The service's background work (see the module docstring)."""

    def __init__(self, *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """`sleep`: how the pause before dispatching a run again after a database failure is waited (tests pass a
        fake clock's)."""
        self._sleep = sleep
        self._runs: dict[int, asyncio.Task[Any]] = {}
        # Runs whose dispatch here stopped on a failure that does not pass by itself (a full disk, a bug): left to
        # a person, never taken over again by this process (`CampaignScheduler.adopt_orphans`).
        self.stopped_on_failure: set[int] = set()
        self._campaigns: dict[str, int] = {}
        self._sync_lock = asyncio.Lock()
        self._sync_task: asyncio.Task[SyncResult | None] | None = None
        self._refreshes: set[asyncio.Task[None]] = set()
        self.on_done: list[Callable[[], None]] = []
        self.last_sync_at: datetime | None = None
        self.last_sync: SyncResult | None = None
        self.last_sync_error: str = ""
        self.last_sync_failed_at: datetime | None = None  # when the last sync failed (None: it succeeded)

    # -- runs ------------------------------------------------------------------------------------
    def active_run(self, campaign_id: str) -> int | None:
        """The run this campaign is dispatching now, if any."""
        return self._campaigns.get(campaign_id)

    def task(self, run_id: int) -> asyncio.Task[Any] | None:
        return self._runs.get(run_id)

    def running(self) -> list[int]:
        return sorted(self._runs)

    def start(
        self,
        run_id: int,
        campaign_id: str,
        work: Callable[[], Coroutine[Any, Any, Any]],
        *,
        exclusive: bool = True,
    ) -> asyncio.Task[Any]:
        """Start `work` (dispatching run `run_id`) unless that run, or another run of the same campaign, is
        already being dispatched; returns the task that dispatches it. `exclusive=False`: runs that may go side by
        side with the campaign's others (a journey's runs, one per step, entry and day; direct API sends)."""
        existing = self._runs.get(run_id)
        if existing is not None:
            return existing
        exclusive = exclusive and campaign_id != API_CAMPAIGN
        other = self._campaigns.get(campaign_id) if exclusive else None
        if other is not None:
            raise WecastError(
                tr(
                    "campaign {id!r} is still sending run {run}; a campaign's runs never overlap: wait for it, "
                    "or pause or cancel it first",
                    id=campaign_id,
                    run=other,
                )
            )
        task = asyncio.get_running_loop().create_task(self._guard(run_id, work), name=f"wecast-run-{run_id}")
        self._runs[run_id] = task
        if exclusive:
            self._campaigns[campaign_id] = run_id

        def done(_: asyncio.Task[Any]) -> None:
            self._runs.pop(run_id, None)
            if self._campaigns.get(campaign_id) == run_id:
                del self._campaigns[campaign_id]
            for callback in self.on_done:
                callback()

        task.add_done_callback(done)
        return task

    async def _guard(self, run_id: int, work: Callable[[], Awaitable[Any]]) -> Any:
        pause = RETRY_FIRST
        while True:
            try:
                return await work()
            except asyncio.CancelledError:
                with use_language(process_language()):
                    log.info(
                        "%s",
                        tr(
                            "run {run}: dispatch stopped; unsent deliveries stay pending until the run is resumed",
                            run=run_id,
                        ),
                    )
                raise
            except WecastError as exc:  # one line: another process owns the run, the run's settings are bad, ...
                with use_language(process_language()):
                    log.warning("%s", tr("run {run}: not dispatched here: {why}", run=run_id, why=exc))
                return None
            except StorageError as exc:  # the database's condition (full, locked, away): one line, not a traceback
                if exc.kind not in PASSING:
                    with use_language(process_language()):
                        log.error(
                            "%s",
                            tr(
                                "run {run}: stopped, unsent deliveries stay to send: {why}",
                                run=run_id,
                                why=explain(exc),
                            ),
                        )
                    self.stopped_on_failure.add(run_id)
                    return None
                with use_language(process_language()):
                    log.error(
                        "%s",
                        tr(
                            "run {run}: stopped, unsent deliveries stay to send: {why}; dispatching it again in "
                            "{pause:.0f} s",
                            run=run_id,
                            why=explain(exc),
                            pause=pause,
                        ),
                    )
            except Exception:  # a background task has nobody to raise to: log it, keep the service up
                log.exception("run %s: dispatch failed", run_id)
                self.stopped_on_failure.add(run_id)
                return None
            await self._sleep(pause)
            pause = min(pause * 2, RETRY_MAX)

    async def drain(self, timeout: float) -> list[int]:
        """Wait up to `timeout` seconds (real time) for the dispatch tasks, then cancel what remains (runs
        waiting for a login or quiet hours: nothing of theirs is in flight). Returns the cancelled run ids."""
        tasks = [*self._runs.values(), *self._refreshes]
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
        """A contact sync runs in this process: in the background, or for a caller of `sync`."""
        return (self._sync_task is not None and not self._sync_task.done()) or self._sync_lock.locked()

    async def sync(self, app: Wecast) -> SyncResult:
        """Sync contacts now (waits for a sync already in progress first)."""
        async with self._sync_lock:
            try:
                result = await app.sync()
            except StorageError as exc:  # a read-only or full database: words, not a traceback every tick
                failed = explain(exc)
                self.last_sync_error, self.last_sync_failed_at = str(failed), app.clock.now()
                raise failed from None
            except WecastError as exc:
                self.last_sync_error, self.last_sync_failed_at = str(exc), app.clock.now()
                raise
            self.last_sync_at = app.clock.now()
            self.last_sync, self.last_sync_error, self.last_sync_failed_at = result, "", None
            with use_language(process_language()):  # a log line: the server's language, not a request's
                log.info(
                    "%s",
                    tr(
                        "contacts synced: {seen} seen, {added} added, {updated} updated, {removed} removed",
                        seen=result.seen,
                        added=result.added,
                        updated=result.updated,
                        removed=result.removed,
                    ),
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
                with use_language(process_language()):
                    log.warning("%s", tr("contact sync failed: {reason}", reason=exc))
                return None

        self._sync_task = asyncio.get_running_loop().create_task(go(), name="wecast-contact-sync")
        return self._sync_task

    async def wait_sync(self) -> None:
        """Wait for the contact syncs this process is running, if any (their outcomes are their callers')."""
        if self._sync_task is not None and not self._sync_task.done():
            await asyncio.wait([self._sync_task])
        async with self._sync_lock:
            pass

    def refresh_in_background(self, app: Wecast, contact_id: str) -> asyncio.Task[None]:
        """Re-read one contact the gateway says changed (its remark, its tags), after any sync in progress."""

        async def go() -> None:
            async with self._sync_lock:
                try:
                    exists = await refresh_contact(app.gateway, app.db, contact_id, clock=app.clock)
                except (WecastError, StorageError) as exc:
                    failed = explain(exc) if isinstance(exc, StorageError) else exc
                    log.warning("contact %s changed, but could not be re-read: %s", contact_id, failed)
                    return
            log.info("contact %s %s", contact_id, "refreshed" if exists else "is gone: marked removed")
            app.journeys.poke()  # the refresh recorded what changed (tags, removal) as customer events

        task = asyncio.get_running_loop().create_task(go(), name=f"wecast-refresh-{contact_id}")
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)
        return task

    async def wait_refreshes(self) -> None:
        if self._refreshes:
            await asyncio.wait(set(self._refreshes))

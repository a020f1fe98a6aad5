"""The application: settings + database + gateway + clock, and the operations the CLI and the HTTP API
share (sync contacts, preview, run, resume, direct sends). Built explicitly and passed down; nothing
is created at import time.

The synchronous operations (`preview`, `plan`, run control, counts) do database work: async callers run them off
the event loop (`engine.blocking.off_loop`); the async ones do that themselves.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from sqlalchemy.engine import Engine

from engine.blocking import off_loop
from engine.clock import Clock, SystemClock
from engine.contacts import ListState, SyncProgress, SyncResult, list_state, sync_contacts, wait_for_syncs
from engine.dispatch import Dispatcher, Progress, Reconciled, RunSummary, reconcile_run
from engine.errors import NotFoundError, WecastError
from engine.gateways.base import Gateway
from engine.gateways.registry import build_gateway
from engine.i18n import process_language, tr, use_language
from engine.journeys.runtime import JourneyEngine
from engine.media import MediaStore
from engine.message_spec import Attachment, direct_message
from engine.notify import RunNotifier
from engine.plan import PlanResult, Preview, build_preview, plan_adhoc, plan_run, plan_test_send
from engine.settings import Settings
from engine.spec import Campaign
from engine.status_words import status_name
from storage import contacts as contacts_db
from storage import deliveries as deliveries_db
from storage import runs as runs_db
from storage.db import make_db_engine
from storage.models import RunStatus

log = logging.getLogger("wecast")


@dataclass
class RunOutcome:
    plan: PlanResult
    summary: RunSummary | None


class Wecast:
    """One wecast instance. Use `async with Wecast(settings) as app:` (starts and closes the gateway)."""

    def __init__(
        self,
        settings: Settings,
        *,
        gateway: Gateway | None = None,
        clock: Clock | None = None,
        db: Engine | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.db = db or make_db_engine(
            settings.database_url, busy_timeout=settings.database_busy_timeout.total_seconds()
        )
        self.gateway = gateway or build_gateway(settings, self.clock)
        self.media = MediaStore(settings.media_dir)
        # Run summaries for people, once a run completes (whoever completes it: the dispatcher or a reconcile).
        self.notifier = RunNotifier(self.db, self.gateway, settings)
        self.dispatcher = Dispatcher(
            self.db, self.gateway, settings, clock=self.clock, on_finished=self.notifier.run_finished
        )
        # The journeys (the rule engine) of this instance; the scheduler of `wecast serve` loads and ticks them.
        self.journeys = JourneyEngine(self.db, self.gateway, settings, clock=self.clock)
        self._unsubscribe: Callable[[], None] | None = None
        self._started = False

    async def __aenter__(self) -> Wecast:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        if not self._started:
            # Listening before the gateway starts: customer events from its first moments reach the inbox too.
            self._unsubscribe = self.gateway.subscribe(self.journeys.on_gateway_event)
            await self.gateway.start()
            self._started = True

    async def close(self) -> None:
        if self._started:
            await self.gateway.close()
            self._started = False
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self.db.dispose()

    # -- contacts --------------------------------------------------------------------------------
    def contact_count(self) -> int:
        return contacts_db.count_contacts(self.db)

    async def sync(self, progress: SyncProgress | None = None) -> SyncResult:
        """Sync contacts; the changes it finds are recorded as customer events, and the journeys are woken."""
        result = await sync_contacts(self.gateway, self.db, clock=self.clock, progress=progress)
        if result.events:
            self.journeys.poke()
        return result

    def contact_list(self) -> ListState:
        """How whole the synced contact list is (never synced, a sync unfinished, whole)."""
        return list_state(self.db)

    async def ensure_contacts(self) -> SyncResult | None:
        """Sync unless the contact list is whole: never synced (a fresh install), or its last sync did not finish
        (killed midway, or running in another process: that one is waited for first). Planning refuses a list
        that is not whole; this finishes it first, when the account is logged in."""
        state = await off_loop(self.contact_list)
        if state is ListState.WHOLE:
            return None
        if not (await self.gateway.login_status()).logged_in:
            return None
        if state is ListState.INCOMPLETE:
            with use_language(process_language()):  # a log line: the server's language, not a request's
                log.warning(tr("the last contact sync did not finish: syncing the contacts again before planning"))
        result = await self.sync()
        # Another process may have started a sync while this one ran: wait for it; if it died, finish its work.
        if await wait_for_syncs(self.db, self.clock) is ListState.INCOMPLETE:
            result = await self.sync()
        return result

    # -- campaigns -------------------------------------------------------------------------------
    def preview(self, campaign: Campaign, *, run_key: str | None = None, keep: int | None = None) -> Preview:
        """What running the campaign now would do (`keep`: how many recipients and exclusions to list; None: all);
        on a task-based gateway also the 群发 tasks each staff member would have to confirm."""
        caps = self.gateway.capabilities
        batch = caps.max_batch if caps.batch_send and not caps.direct_send else None
        return build_preview(self.db, campaign, now=self.clock.now(), run_key=run_key, keep=keep, task_batch=batch)

    def plan(self, campaign: Campaign, *, run_key: str | None = None, trigger: str = "manual") -> PlanResult:
        return plan_run(self.db, campaign, now=self.clock.now(), run_key=run_key, trigger=trigger)

    async def run_campaign(
        self,
        campaign: Campaign,
        *,
        run_key: str | None = None,
        trigger: str = "manual",
        progress: Progress | None = None,
        login_wait: float | None = None,
        quiet_wait_max: float | None = None,
        confirm_wait: float | None = None,
        on_planned: Callable[[PlanResult], None] | None = None,
    ) -> RunOutcome:
        """Plan the run (or find it planned) and send it. `on_planned` is called between the two: a plan that fails
        (a field a recipient lacks) raises before anything about sending is said."""
        plan = await off_loop(self.plan, campaign, run_key=run_key, trigger=trigger)
        if on_planned is not None:
            on_planned(plan)
        summary = await self.dispatcher.run(
            plan.run_id,
            progress=progress,
            login_wait=login_wait,
            quiet_wait_max=quiet_wait_max,
            confirm_wait=confirm_wait,
        )
        return RunOutcome(plan, summary)

    async def test_send(
        self,
        campaign: Campaign,
        contact_ids: list[str],
        *,
        progress: Progress | None = None,
        login_wait: float | None = None,
    ) -> RunSummary:
        """Send the campaign's exact message to the named contacts only, in a test run of its own (see
        `engine.plan.plan_test_send`), and return how it went."""
        plan = await off_loop(plan_test_send, self.db, campaign, contact_ids, now=self.clock.now())
        return await self.dispatcher.run(plan.run_id, progress=progress, login_wait=login_wait, confirm_wait=0)

    async def send_direct(
        self, contact_id: str, text: str | None, attachments: list[Attachment], *, login_wait: float | None = None
    ) -> RunSummary:
        """Send one message given whole (text, then attachments) to one contact now (`wecast send`): checked as an
        API send is (`engine.message_spec.direct_message`), logged as a run of its own."""
        names = await off_loop(contacts_db.contact_names, self.db, [contact_id])
        if contact_id not in names:
            raise NotFoundError(tr("no contact {id} (see `wecast contacts list`)", id=repr(contact_id)))
        caps = self.gateway.capabilities
        message = direct_message(
            text,
            attachments,
            store=self.media,
            supports=caps.supports,
            gateway=self.gateway.name,
            local_covers=caps.local_covers,
        )
        plan = await off_loop(
            lambda: plan_adhoc(
                self.db,
                messages=[(contact_id, message)],
                run_key=f"cli-{uuid.uuid4().hex}",
                now=self.clock.now(),
                timezone=self.settings.timezone,
                trigger="cli",
                names=names,
            )
        )
        return await self.dispatcher.run(plan.run_id, login_wait=login_wait, confirm_wait=0)

    # -- run control (the CLI and the HTTP API share these) ----------------------------------------
    def set_run_status(self, run_id: int, to: RunStatus, *, allowed: set[RunStatus], why: str = "") -> None:
        """Move a run between states atomically; the dispatcher (in this or another process) notices before
        its next send. Raises WecastError when the run is not in an allowed state."""
        run = runs_db.get_run(self.db, run_id)
        if run is None:
            raise NotFoundError(tr("no run {run}", run=run_id))
        finished = self.clock.now() if to is RunStatus.CANCELLED else None
        if not runs_db.set_status(self.db, run_id, to, allowed=allowed, error=why, finished_at=finished):
            raise WecastError(
                tr(
                    "run {run} is {status}; it cannot be set to {to}",
                    run=run_id,
                    status=status_name(run.status),
                    to=status_name(to),
                )
            )

    def pause_run(self, run_id: int, why: str = "paused by a person") -> None:
        """Stop sending a run; sends in flight finish. `resume_run` continues it."""
        self.set_run_status(run_id, RunStatus.PAUSED, allowed={RunStatus.RUNNING}, why=why)

    def reopen_run(self, run_id: int) -> None:
        """Make a paused run sendable again (dispatch it with `resume`)."""
        self.set_run_status(run_id, RunStatus.RUNNING, allowed={RunStatus.PAUSED, RunStatus.RUNNING})

    def cancel_run(self, run_id: int, why: str = "cancelled by a person") -> int:
        """Cancel a run: its unsent deliveries are skipped (with the reason). Returns how many."""
        self.set_run_status(run_id, RunStatus.CANCELLED, allowed={RunStatus.RUNNING, RunStatus.PAUSED}, why=why)
        return deliveries_db.skip_pending(self.db, run_id, f"run {why}", self.clock.now())

    # -- 群发 tasks (task-based gateways) -----------------------------------------------------------------
    def task_ids(self, run_id: int) -> list[str]:
        """The 群发 tasks a run's deliveries wait in (NotFoundError for an unknown run)."""
        if runs_db.get_run(self.db, run_id) is None:
            raise NotFoundError(tr("no run {run}", run=run_id))
        return sorted({r.task_id for r in deliveries_db.submitted(self.db, run_id)})

    async def reconcile(self, run_id: int | None = None) -> dict[int, Reconciled]:
        """Ask the gateway how the 群发 tasks of a run (or of every run with some) went, record the final states,
        and complete a run with nothing left open. The dispatcher does this by itself while a run waits."""
        if run_id is not None:
            await off_loop(self.task_ids, run_id)  # an unknown run is an error, not an empty answer
        ids = [run_id] if run_id is not None else await off_loop(deliveries_db.runs_with_submitted, self.db)
        out: dict[int, Reconciled] = {}
        for each in ids:
            out[each] = await reconcile_run(self.db, self.gateway, each, self.clock)
            if await off_loop(runs_db.finish_if_done, self.db, each, self.clock.now()):
                await self.notifier.run_finished(each)
        return out

    async def remind(self, run_id: int) -> tuple[int, list[str]]:
        """Remind the staff members of a run's unconfirmed tasks (WeCom allows 3 reminders per task a day).
        Returns how many tasks were reminded and, for the others, why not."""
        reminded, problems = 0, []
        for task_id in await off_loop(self.task_ids, run_id):
            try:
                await self.gateway.remind_batch(task_id)
                reminded += 1
            except WecastError as exc:
                problems.append(f"task {task_id}: {exc}")
        return reminded, problems

    async def cancel_tasks(self, run_id: int) -> tuple[int, Reconciled]:
        """Cancel a run's 群发 tasks in WeCom (unsent messages are stopped; sent ones stay sent) and record what
        that leaves: each delivery sent, or failed as cancelled. Returns how many tasks were cancelled."""
        tasks = await off_loop(self.task_ids, run_id)
        for task_id in tasks:
            await self.gateway.cancel_batch(task_id)
        return len(tasks), await reconcile_run(self.db, self.gateway, run_id, self.clock)

    async def resume(
        self,
        run_id: int | None = None,
        *,
        progress: Progress | None = None,
        login_wait: float | None = None,
        quiet_wait_max: float | None = None,
        confirm_wait: float | None = None,
    ) -> list[RunSummary]:
        """Continue interrupted runs (all of them, or one). Resuming all, a run another live process is sending is
        left to it (its summary says so) and the others are resumed; one run named that way raises `RunBusyError`."""
        ids = [run_id] if run_id is not None else [r.id for r in await off_loop(runs_db.unfinished_runs, self.db)]
        return [
            await self.dispatcher.run(
                i,
                progress=progress,
                login_wait=login_wait,
                quiet_wait_max=quiet_wait_max,
                confirm_wait=confirm_wait,
                leave_if_busy=run_id is None,
            )
            for i in ids
        ]

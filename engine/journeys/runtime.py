"""The journey engine: events in, contacts entered, steps run, sends planned into the delivery ledger.

One `tick()` does, in order, what is due now:

1. **Record.** Events buffered from the gateway stream go into the inbox (`storage.journeys.record_events`);
   contacts the stream says were added or changed are re-read from the gateway, and the change is diffed into
   events, as a sync would.
2. **Process the inbox**, oldest first, a batch per transaction: a message that is an opt-out keyword puts the
   contact on the suppression list and plans one confirmation (an opt-in keyword takes them off); every other event
   enters the journeys it triggers (audience at entry, entry policy, exactly once per trigger: unique keys) and
   wakes the contact's enrolments so waits for events and `exit_when` see it. Marking the events processed commits
   with the entries, so a crash between "event seen" and "journey entered" loses nothing and doubles nothing.
3. **Fires** of `schedule` and `date` triggers (catch-up as the scheduler's), and **backfills** of new journeys.
4. **Step** the due enrolments, a batch at a time (index on status and due time: nothing else is scanned), with
   `engine.journeys.stepper`. A due send is planned through the ledger — one delivery, dedupe key
   `journey|contact|entry|step`, in the run of that journey step, entry and local day — in the same transaction
   as the enrolment's move to `sending` (compare-and-set on its version): re-run after a crash, the step finds
   its delivery already planned and never plans a second; never run, nothing was planned and it runs again.
   The dispatcher sends it with every guarantee of the ledger; when the delivery ends (sent, skipped, failed,
   unknown) the enrolment moves on. Tag steps call the gateway (idempotent: add/remove) and then move on.
5. Report the journey runs that have deliveries to send, and when the next enrolment is due.

`JourneyRunner` drives ticks in `wecast serve` (woken by events, by due times, by finished dispatches) and keeps
one dispatch task per journey run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Connection, Engine

from engine import audience as aud
from engine.backoff import backoff_delay
from engine.clock import Clock, SystemClock
from engine.contacts import ListState, list_state, refresh_contact
from engine.dberrors import explain
from engine.errors import GatewayError, NotLoggedInError, PermanentError, TransientError, UnknownOutcomeError
from engine.gateways.base import Gateway, GatewayEvent
from engine.journeys import events as ev
from engine.journeys.conditions import Facts
from engine.journeys.spec import EntryKind, IfStep, Journey, SendStep, TagStep, TriggerKind
from engine.journeys.stepper import End, GotoDue, Hold, Pass, Position, SendDue, TagDue, advance
from engine.keywords import Matcher
from engine.message_spec import render_messages
from engine.messages import Message
from engine.owners import owner_alive
from engine.plan import slot_key
from engine.runsettings import RunSettings
from engine.schedule import ScheduleSpec, build_trigger, latest_fire_time, next_fire_times
from engine.settings import Settings
from storage import contacts as contacts_db
from storage import deliveries as deliveries_db
from storage import journeys as store
from storage import optouts as optouts_db
from storage.db import transaction
from storage.errors import StorageError
from storage.models import CustomerEventKind, DeliveryStatus, EnrolmentStatus, RunStatus, fit_key

log = logging.getLogger("wecast.journeys")

BATCH = 1000  # enrolments stepped (or events processed) per transaction
OPT_OUT_CAMPAIGN = "_opt_out"  # the ledger's campaign id for opt-out confirmations (no user id starts with _)
TAG_ATTEMPTS = 5  # a tag action failing with transient errors is retried this often, then recorded failed
EVENT_PATIENCE = timedelta(hours=1)  # a contact_added event waits this long for its contact to be known
LATE_AFTER = timedelta(seconds=60)  # a trigger fire handled this late is still on time
# WeCom's WelcomeCode is valid this long after the add_external_contact callback, and for one welcome message.
WELCOME_WINDOW = timedelta(seconds=20)
WELCOME_TOKEN = deliveries_db.WELCOME_TASK  # the claim token (and gateway_task_id) of a send_welcome delivery


@dataclass
class TickReport:
    """What one tick did."""

    recorded: int = 0
    processed: int = 0
    entered: int = 0
    stepped: int = 0
    planned: int = 0
    opted_out: int = 0
    runs: list[int] = field(default_factory=list)  # journey runs with deliveries to send
    # Of those, the runs a live process is dispatching now (this one, or another `wecast serve` on the database).
    owned: set[int] = field(default_factory=set)
    next_due: datetime | None = None

    def busy(self) -> bool:
        return bool(self.recorded or self.processed or self.entered or self.stepped or self.planned)


@dataclass(frozen=True)
class Candidate:
    """A contact that a trigger would enter into a journey."""

    contact_id: str
    trigger_key: str
    started: datetime
    event_id: int | None = None


@dataclass(frozen=True)
class Welcome:
    """A journey send planned to go out by the gateway's welcome message (`send_welcome`) with the WelcomeCode of
    the contact_added event that started the enrolment: planned claimed by the engine, so no dispatcher takes it."""

    dedupe_key: str
    contact_id: str
    code: str
    message: Message


def dedupe_key(journey_id: str, contact_id: str, entry: int, step_id: str) -> str:
    """The ledger key of one journey send: one per journey, contact, entry and step, ever (fitted to its column: a
    long contact id)."""
    return fit_key(f"{journey_id}|{contact_id}|{entry}|{step_id}")


class JourneyEngine:
    """Runs the journeys it is given (see the module docstring). One tick at a time per process; several processes
    may tick the same database (moves are compare-and-set, inserts keyed)."""

    def __init__(
        self,
        db: Engine,
        gateway: Gateway,
        settings: Settings,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.db = db
        self.rng = rng or random.Random()
        self.gateway = gateway
        self.settings = settings
        self.clock = clock or SystemClock()
        self.journeys: dict[str, Journey] = {}
        self.activated: dict[str, datetime] = {}
        opt = settings.opt_out
        self.opt_out_words = Matcher.build(opt.keywords, opt.match)
        self.opt_in_words = Matcher.build(opt.opt_in_keywords, opt.match)
        self._buffer: list[store.NewEvent] = []
        self._refresh: set[str] = set()
        self._welcomes: list[Welcome] = []  # planned by the last _step_due, sent by the tick right after it
        self._welcome_used: set[str] = set()  # codes this process tried (each is good for one welcome)
        self._lock = asyncio.Lock()
        self.wakeup = asyncio.Event()

    # -- journeys --------------------------------------------------------------------------------------------
    def set_journeys(self, journeys: Iterable[Journey]) -> None:
        """Run these journeys from now on (a reload). A journey seen for the first time is activated now: events
        and fires before that moment do not enter it."""
        now = self.clock.now()
        fresh: dict[str, Journey] = {}
        for journey in journeys:
            state = store.activate(self.db, journey.id, journey.content_hash, now)
            self.activated[journey.id] = state.activated_at
            fresh[journey.id] = journey
        self.journeys = fresh
        self.poke()

    @property
    def running(self) -> list[Journey]:
        return [j for j in self.journeys.values() if j.enabled]

    def poke(self) -> None:
        self.wakeup.set()

    # -- events in -------------------------------------------------------------------------------------------
    def on_gateway_event(self, event: GatewayEvent) -> None:
        """A gateway listener: buffer customer events for the next tick (which records them first) and wake it. A new
        contact is re-read from the gateway in that tick."""
        # CONTACT_CHANGED (DIRTY) is the service's to refresh (engine.workers); the refresh records the change.
        new = ev.from_gateway(event)
        if new is None:
            return
        if new.kind is CustomerEventKind.CONTACT_ADDED:
            self._refresh.add(new.contact_id)
        self._buffer.append(new)
        self.poke()

    def record(self, events: Sequence[store.NewEvent]) -> int:
        """Record events in the inbox now (the sync diff, the CLI, the API). Returns how many were new."""
        recorded = store.record_events(self.db, events, self.clock.now())
        if recorded:
            self.poke()
        return len(recorded)

    async def refresh_contact(self, contact_id: str) -> bool:
        """Re-read a contact the stream says was added (its data, for the audience and the templates); the change
        is recorded as events like a sync's (`engine.contacts.refresh_contact`). Returns whether it exists."""
        return await refresh_contact(self.gateway, self.db, contact_id, clock=self.clock)

    # -- the tick --------------------------------------------------------------------------------------------
    async def tick(self) -> TickReport:
        """Do everything that is due now (see the module docstring)."""
        async with self._lock:
            self.wakeup.clear()
            report = TickReport()
            buffered, self._buffer = self._buffer, []
            if buffered:
                report.recorded += len(
                    await asyncio.to_thread(store.record_events, self.db, buffered, self.clock.now())
                )
            refresh, self._refresh = self._refresh, set()
            for contact_id in sorted(refresh):
                try:
                    await self.refresh_contact(contact_id)
                except GatewayError as exc:
                    log.warning("contact %s: could not refresh it from the gateway: %s", contact_id, exc)
            await asyncio.to_thread(self._process_inbox, report)
            await asyncio.to_thread(self._fires, report)
            await asyncio.to_thread(self._backfills, report)
            while True:
                finished = await asyncio.to_thread(self._finish_sends, report)
                tags = await asyncio.to_thread(self._step_due, report)
                welcomes, self._welcomes = self._welcomes, []
                if welcomes:
                    await self._send_welcomes(welcomes)
                if tags:
                    await self._tag_actions(tags, report)
                if not (finished or tags or welcomes) and not await asyncio.to_thread(self._anything_due):
                    break
            now = self.clock.now()
            for run in await asyncio.to_thread(store.open_journey_runs, self.db):
                report.runs.append(run.id)
                if owner_alive(run.owner, run.heartbeat_at, now):
                    report.owned.add(run.id)
            report.next_due = store.next_due(self.db, [j.id for j in self.running])
            return report

    def _anything_due(self) -> bool:
        due = store.next_due(self.db, [j.id for j in self.running])
        return due is not None and due <= self.clock.now()

    # -- 2. the inbox ----------------------------------------------------------------------------------------
    def _process_inbox(self, report: TickReport) -> None:
        while True:
            batch = store.unprocessed_events(self.db, BATCH)
            if not batch:
                return
            now = self.clock.now()
            views = store.contact_views(self.db, [e.contact_id for e in batch])
            done: list[int] = []
            deferred = 0
            with transaction(self.db) as conn:
                by_journey: dict[str, list[Candidate]] = defaultdict(list)
                wake: set[str] = set()
                for event in batch:
                    view = views.get(event.contact_id)
                    if view is None and event.kind is CustomerEventKind.CONTACT_ADDED:
                        if now - event.recorded_at < EVENT_PATIENCE:
                            deferred += 1  # its contact is being read from the gateway; the next tick has it
                            continue
                        log.warning("event %s: contact %s never became known; not entered", event.id, event.contact_id)
                    done.append(event.id)
                    wake.add(event.contact_id)
                    if view is None:
                        continue
                    if event.kind is CustomerEventKind.MESSAGE and self._opt_keywords(conn, event, view, report):
                        continue
                    for journey in self.running:
                        if self._triggers(journey, event):
                            started = min(event.occurred_at, now)
                            by_journey[journey.id].append(
                                Candidate(event.contact_id, f"event:{event.id}", started, event.id)
                            )
                for journey_id, candidates in by_journey.items():
                    report.entered += self._enter(conn, self.journeys[journey_id], candidates, views, now)
                active = [
                    e.id for e in store.open_enrolments_of(conn, sorted(wake)) if e.status is EnrolmentStatus.ACTIVE
                ]
                store.wake(conn, active, now)
                store.mark_processed(conn, done, now)
            report.processed += len(done)
            if deferred and len(done) == 0:
                return  # only events waiting for their contact are left

    def _triggers(self, journey: Journey, event: store.EventRow) -> bool:
        if event.occurred_at < self.activated.get(journey.id, event.occurred_at) - LATE_AFTER:
            return False  # before the journey existed
        t = journey.trigger
        if t.kind is TriggerKind.CONTACT_ADDED:
            return event.kind is CustomerEventKind.CONTACT_ADDED
        if t.kind is TriggerKind.TAG_ADDED:
            return event.kind is CustomerEventKind.TAG_ADDED and t.tag in (event.tag_id, event.data.get("tag"))
        if t.kind is TriggerKind.TAG_REMOVED:
            return event.kind is CustomerEventKind.TAG_REMOVED and t.tag in (event.tag_id, event.data.get("tag"))
        if t.kind is TriggerKind.MESSAGE:
            return event.kind is CustomerEventKind.MESSAGE and t.matcher is not None and t.matcher(event.text)
        return False

    def _opt_keywords(
        self, conn: Connection, event: store.EventRow, view: Mapping[str, Any], report: TickReport
    ) -> bool:
        """Opt-out and opt-in keywords: handled here, and they trigger no journey. Returns whether it was one."""
        now = self.clock.now()
        opt = self.settings.opt_out
        word = self.opt_out_words.find(event.text) if opt.keywords else None
        if word is not None:
            if optouts_db.opt_out(conn, event.contact_id, now, source="keyword", keyword=event.text.strip()[:40]):
                report.opted_out += 1
                log.info("contact %s opted out (wrote %r)", event.contact_id, event.text[:40])
            if opt.reply and optouts_db.claim_confirmation(conn, event.contact_id, now):
                self._reply(conn, view, opt.reply, f"confirm|{event.id}", now)
            return True
        word = self.opt_in_words.find(event.text) if opt.opt_in_keywords else None
        if word is not None and optouts_db.opt_in(conn, event.contact_id):
            log.info("contact %s opted back in", event.contact_id)
            if opt.opt_in_reply:
                self._reply(conn, view, opt.opt_in_reply, f"opt_in|{event.id}", now)
            return True
        return False

    def _reply(self, conn: Connection, view: Mapping[str, Any], text: str, what: str, now: datetime) -> None:
        """Plan a transactional reply to a customer's own message (no cap, no quiet hours, allowed when opted out)."""
        tz = self.settings.tz
        run_id, _ = store.journey_run(
            conn,
            journey_id=OPT_OUT_CAMPAIGN,
            run_key=f"replies:{now.astimezone(tz).date().isoformat()}",
            timezone=self.settings.timezone,
            settings=RunSettings(
                name="opt-out confirmations", timezone=self.settings.timezone, opt_out_exempt=True
            ).to_json(),
            file="",
            now=now,
        )
        contact_id = str(view["id"])
        delivery = store.NewDelivery(
            run_id,
            OPT_OUT_CAMPAIGN,
            contact_id,
            str(view.get("name") or ""),
            text,
            f"{OPT_OUT_CAMPAIGN}|{contact_id}|{what}",
            DeliveryStatus.PENDING,
            capped=False,
        )
        store.insert_deliveries(conn, [delivery], now)

    # -- entering --------------------------------------------------------------------------------------------
    def _enter(
        self,
        conn: Connection,
        journey: Journey,
        candidates: Sequence[Candidate],
        views: Mapping[str, Mapping[str, Any]],
        now: datetime,
    ) -> int:
        """Enter the candidates that pass the journey's audience, opt-out and entry policy. Returns how many."""
        if journey.first is None or not candidates:
            return 0
        present = [
            views[c.contact_id]
            for c in candidates
            if c.contact_id in views and not views[c.contact_id].get("removed_at")
        ]
        selection = self._select(journey, present, now)
        chosen = {str(v["id"]) for v in selection}
        blocked = set() if journey.trigger.kind is TriggerKind.MESSAGE else optouts_db.opted_out(conn, sorted(chosen))
        history = store.past_entries(conn, journey.id, sorted(chosen))
        items: list[store.NewEnrolment] = []
        taken: dict[str, int] = defaultdict(int)
        for c in candidates:
            if c.contact_id not in chosen or c.contact_id in blocked:
                continue
            past = history.get(c.contact_id, [])
            if any(p.trigger_key == c.trigger_key for p in past):
                continue
            if not may_enter(journey, past, taken[c.contact_id], now):
                continue
            taken[c.contact_id] += 1
            items.append(
                store.NewEnrolment(journey.id, c.contact_id, c.trigger_key, journey.first, c.started, now, c.event_id)
            )
        return len(store.enrol(conn, items))

    def _select(self, journey: Journey, views: Sequence[Mapping[str, Any]], now: datetime) -> list[Mapping[str, Any]]:
        return list(select_audience(journey, views, now).recipients)

    # -- 3. schedule and date triggers, backfills ------------------------------------------------------------
    def _fires(self, report: TickReport) -> None:
        now = self.clock.now()
        for journey in self.running:
            spec = fire_schedule(journey)
            if spec is None:
                continue
            key = f"journey:{journey.id}"
            last = store.last_fire(self.db, key)
            if last is None:
                store.set_last_fire(self.db, key, max(now, self.activated.get(journey.id, now)), now)
                continue
            trigger = build_trigger(spec, journey.tz)
            latest = latest_fire_time(trigger, now)
            if latest is None or latest <= last:
                continue
            since = max(last, now - journey.grace - LATE_AFTER)
            due = [f for f in next_fire_times(trigger, since, 100) if last < f <= now]
            if latest not in due:
                due.append(latest)
            chosen = _choose(sorted(due), now, journey)
            for fire in chosen:
                report.entered += self._enter_fire(journey, fire, now)
            store.set_last_fire(self.db, key, max(due), now)

    def _enter_fire(self, journey: Journey, fire: datetime, now: datetime) -> int:
        views = all_views(self.db)
        t = journey.trigger
        if t.kind is TriggerKind.DATE:
            assert t.date is not None
            day = fire.astimezone(journey.tz).date() + timedelta(days=t.date.days_before)
            views = [v for v in views if date_matches(v, t.date.field, day, t.date.each_year, journey)]
            key = f"date:{day.year}" if t.date.each_year else f"date:{day.isoformat()}"
        else:
            key = "slot:" + slot_key(fire)
        candidates = [Candidate(str(v["id"]), key, fire) for v in views]
        with transaction(self.db) as conn:
            entered = self._enter(conn, journey, candidates, {str(v["id"]): v for v in views}, now)
        log.info("journey %s: fired for %s, %d entered", journey.id, fire.isoformat(), entered)
        return entered

    def _backfills(self, report: TickReport) -> None:
        """A new journey's one backfill: claimed in the transaction that enters its contacts (a crash in between
        leaves it unclaimed, to be done again), and only over a whole contact list (none yet on a fresh install,
        or a sync killed midway: the backfill waits for the sync that finishes it)."""
        now = self.clock.now()
        for journey in self.running:
            if not journey.backfill or store.backfilled(self.db, journey.id):
                continue
            if list_state(self.db) is not ListState.WHOLE:
                log.info("journey %s: backfill waits for a whole contact list (a sync to finish)", journey.id)
                return
            views = all_views(self.db)
            t = journey.trigger
            if t.kind is TriggerKind.TAG_ADDED:
                views = [v for v in views if t.tag in v["tags"]]
            candidates = [Candidate(str(v["id"]), "backfill", now) for v in views]
            with transaction(self.db) as conn:
                if not store.mark_backfilled(conn, journey.id, now):
                    continue  # another process did it meanwhile
                entered = self._enter(conn, journey, candidates, {str(v["id"]): v for v in views}, now)
            report.entered += entered
            log.info("journey %s: backfill entered %d contacts", journey.id, entered)

    # -- 4. stepping -----------------------------------------------------------------------------------------
    def _finish_sends(self, report: TickReport) -> int:
        """Move SENDING enrolments whose delivery ended on to their next step."""
        journeys = self.journeys
        finished = store.finished_sends(self.db, list(journeys), BATCH * 5)
        if not finished:
            return 0
        now = self.clock.now()
        moves = []
        for f in finished:
            e = f.enrolment
            journey = journeys[e.journey_id]
            outcome = f.status.value
            detail = f.reason
            nxt = journey.next_of.get(e.step)
            moves.append(
                store.Move(
                    e.id,
                    e.version,
                    EnrolmentStatus.ACTIVE,
                    nxt or "",
                    now,
                    e.step_started_at,
                    now,
                    log=(store.PathEntry(e.step, outcome, detail),),
                )
                if e.step in journey.next_of
                else store.Move(
                    e.id,
                    e.version,
                    EnrolmentStatus.EXITED,
                    e.step,
                    None,
                    e.step_started_at,
                    now,
                    reason=f"step {e.step} is no longer in the journey",
                    log=(store.PathEntry(e.step, outcome, detail),),
                )
            )
        # A move to step "" (past the end) completes at the next pass; keep the moves uniform.
        won = store.apply_moves(
            self.db, {f.enrolment.id: (f.enrolment.journey_id, f.enrolment.contact_id) for f in finished}, moves
        )
        report.stepped += len(won)
        return len(won)

    def _step_due(self, report: TickReport) -> list[tuple[store.EnrolmentRow, Pass, Journey]]:
        """Step one batch of due enrolments. Returns the tag actions they reached (for the gateway)."""
        now = self.clock.now()
        due = store.due_enrolments(self.db, now, [j.id for j in self.running], BATCH)
        if not due:
            return []
        contacts = [e.contact_id for e in due]
        views = store.contact_views(self.db, contacts)
        blocked = optouts_db.opted_out(self.db, contacts)
        since = min((e.entered_at or now) for e in due) - timedelta(seconds=1)
        history = store.contact_events(
            self.db,
            contacts,
            since,
            [CustomerEventKind.MESSAGE, CustomerEventKind.TAG_ADDED, CustomerEventKind.TAG_REMOVED],
        )
        trigger_events = store.events_by_id(self.db, [e.event_id for e in due if e.event_id is not None])
        received = self._received(due)
        moves: list[store.Move] = []
        sends: list[tuple[store.EnrolmentRow, Pass, Journey]] = []
        tags: list[tuple[store.EnrolmentRow, Pass, Journey]] = []
        gotos: list[tuple[store.EnrolmentRow, Pass, Journey]] = []
        for e in due:
            journey = self.journeys[e.journey_id]
            view = views.get(e.contact_id, {"id": e.contact_id, "tags": frozenset(), "removed_at": now})
            mine = history.get(e.contact_id, [])
            trigger = trigger_events.get(e.event_id) if e.event_id is not None else None
            facts = Facts(
                contact=view,
                now=now,
                replied=any(
                    x.kind is CustomerEventKind.MESSAGE
                    and x.id != e.event_id
                    and x.occurred_at >= (e.entered_at or now)
                    for x in mine
                ),
                received=received.get(e.id, frozenset()),
                opted_out=e.contact_id in blocked,
                removed=bool(view.get("removed_at")),
                message_text=trigger.text if trigger is not None else "",
            )
            position = Position(e.step or None, e.step_started_at or now)
            result = advance(journey, position, facts, now, events=mine, trigger_event=e.event_id)
            stop = result.stop
            if isinstance(stop, SendDue):
                sends.append((e, result, journey))
            elif isinstance(stop, TagDue):
                moves.append(self._hold(e, result, now, now))  # at the tag step; acted on right below
                tags.append((e, result, journey))
            elif isinstance(stop, GotoDue):
                gotos.append((e, result, journey))
            elif isinstance(stop, Hold):
                moves.append(self._hold(e, result, stop.until, now))
            else:
                assert isinstance(stop, End)
                step = result.position.step or ""
                moves.append(
                    store.Move(
                        e.id,
                        e.version,
                        stop.status,
                        step,
                        None,
                        result.position.started,
                        now,
                        reason=stop.reason,
                        log=(*result.log, store.PathEntry(step or "end", stop.status.value, stop.reason)),
                    )
                )
        with transaction(self.db) as conn:
            moves += self._plan_sends(conn, sends, views, blocked, now, report, trigger_events)
            moves += self._gotos(conn, gotos, views, now, report)
            won = set(store.apply_moves(conn, {e.id: (e.journey_id, e.contact_id) for e in due}, moves))
        report.stepped += len(won)
        # Tag steps go to the gateway only for enrolments this process moved (another may be acting on the rest).
        return [t for t in tags if t[0].id in won]

    def _hold(self, e: store.EnrolmentRow, result: Pass, until: datetime, now: datetime) -> store.Move:
        return store.Move(
            e.id,
            e.version,
            EnrolmentStatus.ACTIVE,
            result.position.step or "",
            until,
            result.position.started,
            now,
            attempts=e.attempts if result.position.step == e.step else 0,
            log=tuple(result.log),
        )

    def _received(self, due: Sequence[store.EnrolmentRow]) -> dict[int, frozenset[str]]:
        """Per enrolment, the send steps named by `received` conditions whose delivery was sent."""
        wanted: dict[int, list[tuple[str, str]]] = {}
        for e in due:
            named = _named_steps(self.journeys[e.journey_id])
            if named:
                wanted[e.id] = [(s, dedupe_key(e.journey_id, e.contact_id, e.entry, s)) for s in sorted(named)]
        if not wanted:
            return {}
        statuses = store.delivery_statuses(self.db, [k for pairs in wanted.values() for _, k in pairs])
        return {
            eid: frozenset(s for s, k in pairs if statuses.get(k) is DeliveryStatus.SENT)
            for eid, pairs in wanted.items()
        }

    def _plan_sends(
        self,
        conn: Connection,
        sends: Sequence[tuple[store.EnrolmentRow, Pass, Journey]],
        views: Mapping[str, Mapping[str, Any]],
        blocked: set[str],
        now: datetime,
        report: TickReport,
        triggers: Mapping[int, store.EventRow] | None = None,
    ) -> list[store.Move]:
        """Plan the due sends into the ledger (rendered now, for the contact as they are now); each enrolment
        waits in `sending` for its delivery. A new contact's send within WeCom's welcome window of its event (with
        the event's WelcomeCode, on a gateway that sends welcome messages) is planned for `send_welcome`
        (`_welcome_code`): claimed by the engine, which sends it right after this transaction commits."""
        moves: list[store.Move] = []
        welcomes: list[Welcome] = []
        by_step: dict[tuple[str, str], list[tuple[store.EnrolmentRow, Pass]]] = defaultdict(list)
        for e, result, journey in sends:
            by_step[(journey.id, result.position.step or "")].append((e, result))
        for (journey_id, step_id), items in by_step.items():
            journey = self.journeys[journey_id]
            step = journey.index[step_id]
            assert isinstance(step, SendStep)
            exempt = step.transactional and journey.trigger.kind is TriggerKind.MESSAGE
            skips: dict[int, str] = {}
            eligible: list[Mapping[str, Any]] = []
            counts = self._cap_counts(conn, step, journey, [e.contact_id for e, _ in items], now)
            for e, result in items:
                stop = result.stop
                assert isinstance(stop, SendDue)
                view = views.get(e.contact_id)
                if stop.skip:
                    skips[e.id] = stop.skip
                elif view is None or view.get("removed_at") or not view.get("friend", True):
                    skips[e.id] = "not a friend of this account (cannot receive messages)"
                elif e.contact_id in blocked and not exempt:
                    skips[e.id] = "opted out"
                elif step.frequency_cap is not None and counts.get(e.contact_id, 0) >= step.frequency_cap.max:
                    cap = step.frequency_cap
                    skips[e.id] = (
                        f"frequency_cap: already got {counts[e.contact_id]} marketing message(s) "
                        f"this {cap.per} (max {cap.max})"
                    )
                else:
                    counts[e.contact_id] = counts.get(e.contact_id, 0) + 1
                    eligible.append(view)
            rendered = render_messages(
                step.compiled.for_zone(journey.timezone),
                eligible,
                campaign={"id": journey.id, "name": journey.name},
                now=now.astimezone(journey.tz),
            )
            lacking: dict[str, list[str]] = defaultdict(list)
            for name, ids in rendered.missing.items():
                for cid in ids:
                    lacking[cid].append(name)
            failing: dict[str, str] = {}  # contact id -> the message field that failed its check, and how
            for (index, check), ids in rendered.failed.items():
                for cid in ids:
                    failing.setdefault(cid, f"{step.compiled.fields[index].path} {check.value}")
            runs: dict[tuple[int, str], int] = {}
            cancelled: set[int] = set()
            for e, result in items:
                day = now.astimezone(journey.tz).date().isoformat()
                run_key = f"journey:{step_id}:{e.entry}:{day}"
                if (e.entry, day) not in runs:
                    run_id, run_status = store.journey_run(
                        conn,
                        journey_id=journey.id,
                        run_key=run_key,
                        timezone=journey.timezone,
                        settings=RunSettings(
                            name=f"{journey.name} · {step_id}",
                            timezone=journey.timezone,
                            interval=journey.throttle.interval,
                            max_errors=journey.max_errors,
                            frequency_cap=step.frequency_cap,
                            opt_out_exempt=exempt,
                        ).to_json(),
                        file=str(journey.file),
                        now=now,
                    )
                    runs[(e.entry, day)] = run_id
                    if run_status is RunStatus.CANCELLED:
                        cancelled.add(run_id)
                        log.warning(
                            "journey %s: run %s (step %s) was cancelled; its new sends are skipped",
                            journey.id,
                            run_id,
                            step_id,
                        )
                run_id = runs[(e.entry, day)]
                view = views.get(e.contact_id, {})
                key = dedupe_key(journey.id, e.contact_id, e.entry, step_id)
                text = rendered.texts.get(e.contact_id)
                reason = skips.get(e.id, "") or ("run cancelled" if run_id in cancelled else "")
                if not reason and text is None:
                    if e.contact_id in lacking:
                        reason = "missing_field: lacks " + ", ".join(lacking[e.contact_id]) + " used by the template"
                    elif e.contact_id in failing:
                        reason = f"invalid_message: {failing[e.contact_id]}"
                    else:
                        reason = f"too_long: the message is longer than message.max_length ({step.message.max_length})"
                whole = rendered.messages.get(e.contact_id) if text is not None else None
                status = DeliveryStatus.SKIPPED if reason else DeliveryStatus.PENDING
                code = "" if reason or text is None else self._welcome_code(journey, e, triggers, now)
                if code:
                    status = DeliveryStatus.CLAIMED
                    welcomes.append(Welcome(key, e.contact_id, code, rendered.message(e.contact_id)))
                delivery = store.NewDelivery(
                    run_id,
                    journey.id,
                    e.contact_id,
                    str(view.get("name") or ""),
                    text or "",
                    key,
                    status,
                    capped=step.frequency_cap is not None,
                    reason=reason,
                    message=whole.dumps() if whole is not None and not reason else None,
                    claim_token=WELCOME_TOKEN if code else "",
                )
                moves.append(
                    store.Move(
                        e.id,
                        e.version,
                        EnrolmentStatus.SENDING,
                        step_id,
                        None,
                        result.position.started,
                        now,
                        delivery_key=key,
                        log=tuple(result.log),
                        deliveries=(delivery,),
                    )
                )
                if not reason:
                    report.planned += 1
        self._welcomes.extend(welcomes)
        return moves

    def _welcome_code(
        self, journey: Journey, e: store.EnrolmentRow, triggers: Mapping[int, store.EventRow] | None, now: datetime
    ) -> str:
        """The WelcomeCode this send may go out with ('' for the normal path): a contact_added journey, the event
        that entered the contact carries a code not tried yet, less than WELCOME_WINDOW old, and the gateway sends
        welcome messages."""
        if journey.trigger.kind is not TriggerKind.CONTACT_ADDED or not self.gateway.capabilities.welcome:
            return ""
        event = (triggers or {}).get(e.event_id) if e.event_id is not None else None
        if event is None or event.kind is not CustomerEventKind.CONTACT_ADDED:
            return ""
        code = str(event.data.get("welcome_code") or "")
        if not code or code in self._welcome_used or now - event.occurred_at >= WELCOME_WINDOW:
            return ""
        self._welcome_used.add(code)
        return code

    async def _send_welcomes(self, welcomes: Sequence[Welcome]) -> None:
        """Send planned welcomes by `gateway.send_welcome`, each recorded in the ledger like any send: sent; back
        to the normal path (pending, for the dispatcher) when the gateway refused the code or could not be reached
        before sending; `unknown` when the outcome is not known (the code cannot be used twice, and a second
        message by the normal path might be a duplicate). Only deliveries still claimed for a welcome are sent
        (a crash before this point leaves them claimed: the run's recovery hands them to the dispatcher)."""
        for w in welcomes:
            now = self.clock.now()
            delivery_id = await asyncio.to_thread(store.start_welcome, self.db, w.dedupe_key, WELCOME_TOKEN, now)
            if delivery_id is None:
                continue
            try:
                receipt = await self.gateway.send_welcome(w.code, w.message)
            except UnknownOutcomeError as exc:
                result = deliveries_db.Result(
                    delivery_id,
                    DeliveryStatus.UNKNOWN,
                    reason=f"the welcome message may or may not have arrived: {exc}; not retried",
                    last_error=str(exc),
                )
            except (PermanentError, TransientError, NotLoggedInError) as exc:
                # Not sent (the code refused or expired, or no call reached WeCom): the normal path sends it.
                log.info("contact %s: no welcome message (%s); sending it the usual way", w.contact_id, exc)
                result = deliveries_db.Result(
                    delivery_id, DeliveryStatus.PENDING, last_error=f"welcome: {exc}", gateway_task_id=""
                )
            except GatewayError as exc:
                result = deliveries_db.Result(
                    delivery_id,
                    DeliveryStatus.UNKNOWN,
                    reason=f"the welcome message may or may not have arrived: {exc}; not retried",
                    last_error=str(exc),
                )
            else:
                result = deliveries_db.Result(
                    delivery_id,
                    DeliveryStatus.SENT,
                    gateway_message_id=receipt.message_id,
                    sent_at=self.clock.now(),
                    last_error="",
                    reason="",
                )
            await asyncio.to_thread(deliveries_db.write_results, self.db, [result], self.clock.now())
            self.poke()

    def _cap_counts(
        self, conn: Connection, step: SendStep, journey: Journey, contact_ids: list[str], now: datetime
    ) -> dict[str, int]:
        if step.frequency_cap is None:
            return {}
        start, end = step.frequency_cap.window(now, journey.tz)
        return deliveries_db.cap_counts(conn, start, end, contact_ids)

    def _gotos(
        self,
        conn: Connection,
        gotos: Sequence[tuple[store.EnrolmentRow, Pass, Journey]],
        views: Mapping[str, Mapping[str, Any]],
        now: datetime,
        report: TickReport,
    ) -> list[store.Move]:
        moves = []
        for e, result, _journey in gotos:
            stop = result.stop
            assert isinstance(stop, GotoDue)
            target = self.journeys.get(stop.step.journey)
            step = result.position.step or ""
            if target is None or not target.enabled:
                detail = f"journey {stop.step.journey} is not running"
            else:
                entered = self._enter(
                    conn, target, [Candidate(e.contact_id, f"goto:{e.journey_id}:{e.id}", now)], views, now
                )
                report.entered += entered
                detail = (
                    f"entered {target.id}"
                    if entered
                    else f"not entered into {target.id} (its audience or entry policy)"
                )
            moves.append(
                store.Move(
                    e.id,
                    e.version,
                    EnrolmentStatus.COMPLETED,
                    step,
                    None,
                    result.position.started,
                    now,
                    reason=f"goto {stop.step.journey}",
                    log=(*result.log, store.PathEntry(step, "goto", detail)),
                )
            )
        return moves

    async def _tag_actions(self, tags: Sequence[tuple[store.EnrolmentRow, Pass, Journey]], report: TickReport) -> None:
        """Tag steps: the gateway adds/removes the tags in WeCom, then the enrolment moves on. Each enrolment here
        was just moved to its tag step by this process (version + 1)."""
        names = await asyncio.to_thread(store.tags_by_name, self.db)
        views = await asyncio.to_thread(store.contact_views, self.db, [e.contact_id for e, _, _ in tags])
        for e, result, journey in tags:
            stop = result.stop
            assert isinstance(stop, TagDue)
            step = stop.step
            attempts = e.attempts if e.step == step.id else 0
            started = result.position.started
            now = self.clock.now()
            outcome, detail, retry_at = "tagged", _describe_tags(step), None
            if not self.gateway.capabilities.tags:
                outcome, detail = "skipped", f"the {self.gateway.name} gateway cannot change tags"
            else:
                try:
                    add = [await self._tag_id(t, names) for t in step.add]
                    remove = [names[t] for t in step.remove if t in names]
                    if add:
                        await self.gateway.add_contact_tags(e.contact_id, add)
                    if remove:
                        await self.gateway.remove_contact_tags(e.contact_id, remove)
                except PermanentError as exc:
                    outcome, detail = "failed", str(exc)
                except GatewayError as exc:
                    if attempts + 1 < TAG_ATTEMPTS:
                        delay = backoff_delay(attempts, base=5.0, cap=300.0, rng=self.rng)
                        retry_at = now + timedelta(seconds=delay)
                        detail = f"{exc}; retrying in {delay:.0f}s"
                        log.warning("journey %s: tag step %s for %s: %s", journey.id, step.id, e.contact_id, detail)
                    else:
                        outcome, detail = "failed", f"gave up after {TAG_ATTEMPTS} attempts: {exc}"
                else:
                    before = set(views.get(e.contact_id, {}).get("tag_ids") or ())
                    after = (before | set(add)) - set(remove)
                    await asyncio.to_thread(self._record_tags, e.contact_id, before, after, names, now)
            if retry_at is not None:
                move = store.Move(
                    e.id, e.version + 1, EnrolmentStatus.ACTIVE, step.id, retry_at, started, now, attempts=attempts + 1
                )
            else:
                move = store.Move(
                    e.id,
                    e.version + 1,
                    EnrolmentStatus.ACTIVE,
                    journey.next_of.get(step.id) or "",
                    now,
                    started,
                    now,
                    log=(store.PathEntry(step.id, outcome, detail),),
                )
            won = await asyncio.to_thread(store.apply_moves, self.db, {e.id: (e.journey_id, e.contact_id)}, [move])
            report.stepped += len(won)

    async def _tag_id(self, name: str, names: dict[str, str]) -> str:
        if name in names:
            return names[name]
        created = await self.gateway.create_tag(name)
        await asyncio.to_thread(store.add_tag, self.db, created.id, created.name, created.group_name)
        names[created.name] = names[created.id] = created.id
        return created.id

    def _record_tags(
        self, contact_id: str, before: set[str], after: set[str], names: dict[str, str], now: datetime
    ) -> None:
        store.set_contact_tags(self.db, contact_id, sorted(after), now)
        label = {v: k for k, v in names.items() if k != v}
        old = {contact_id: store.ContactState(True, frozenset(before))}
        new = {contact_id: store.ContactState(True, frozenset(after))}
        changes = ev.diff(old, new, now=now, tag_names=label, added_at={}, source="journey")
        store.record_events(self.db, changes, now)


# -- helpers -----------------------------------------------------------------------------------------------------


def all_views(db: Engine) -> list[dict[str, Any]]:
    return contacts_db.load_contact_views(db)


def select_audience(
    journey: Journey, views: Sequence[Mapping[str, Any]], now: datetime, *, known_tags: Iterable[str] = ()
) -> aud.Selection:
    """The journey's audience at entry (every limit-free audience rule of a campaign), with why others are left out."""
    a = journey.audience
    return aud.select(
        views,
        ids=a.ids,
        tags_any=a.tags_any,
        tags_all=a.tags_all,
        tags_none=a.tags_none,
        rules=journey.rules,
        exclude_ids=a.exclude_ids,
        include_coworkers=a.include_coworkers,
        now=now,
        known_tags=known_tags,
    )


def _named_steps(journey: Journey) -> frozenset[str]:
    """The send steps a journey's conditions ask about (`received: step`)."""
    named = set().union(*(c.steps for c in journey.exit_when))
    for step, _ in journey.walk():
        if isinstance(step, IfStep):
            named |= step.condition.steps
    return frozenset(named)


def may_enter(journey: Journey, past: Sequence[store.PastEntry], taken: int, now: datetime) -> bool:
    """The entry policy, given the contact's earlier enrolments in the journey (and entries in this batch)."""
    kind = journey.entry.kind
    if kind is EntryKind.EVERY_TIME:
        return True
    if kind is EntryKind.ONCE:
        return not past and not taken
    if taken or any(p.open for p in past):
        return False
    last = max((p.entered_at for p in past if p.entered_at is not None), default=None)
    return last is None or (journey.entry.window is not None and now - last >= journey.entry.window)


def fire_schedule(journey: Journey) -> ScheduleSpec | None:
    t = journey.trigger
    if t.kind is TriggerKind.SCHEDULE:
        return t.schedule
    if t.kind is TriggerKind.DATE and t.date is not None:
        return ScheduleSpec(cron=f"{t.date.at.minute} {t.date.at.hour} * * *")
    return None


def _choose(due: list[datetime], now: datetime, journey: Journey) -> list[datetime]:
    """Fires to act on, by the journey's catch-up policy (as the campaign scheduler's)."""
    on_time = [f for f in due if now - f <= LATE_AFTER]
    missed = [f for f in due if LATE_AFTER < now - f <= journey.grace]
    if journey.catch_up == "skip":
        extra: list[datetime] = []
    elif journey.catch_up == "once":
        extra = [] if on_time else missed[-1:]
    else:
        extra = missed
    return sorted({*extra, *on_time[-1:]})


def date_matches(view: Mapping[str, Any], name: str, day: Any, each_year: bool, journey: Journey) -> bool:
    value = view.get(name) if name in view else (view.get("additional_info") or {}).get(name)
    when = _as_date(value, journey)
    if when is None:
        return False
    if each_year:
        if (when.month, when.day) == (2, 29) and day.month == 2 and day.day == 28:
            return not _leap(day.year)  # a 29 February date is celebrated on the 28th in other years
        return (when.month, when.day) == (day.month, day.day)
    return bool(when == day)


def _leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _as_date(value: Any, journey: Journey) -> Any:
    from datetime import UTC, date

    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(journey.tz).date()
    if isinstance(value, date):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = value / 1000 if value > 10**11 else value  # epoch milliseconds, as addContactTime
        return datetime.fromtimestamp(seconds, UTC).astimezone(journey.tz).date()
    text = str(value).strip()
    for fmt in ("%Y-%m-%d", "%Y/%m/%d", "%m-%d", "%m/%d", "%Y年%m月%d日", "%m月%d日"):
        try:
            parsed = datetime.strptime(text, fmt)
        except ValueError:
            continue
        return parsed.date().replace(year=parsed.year if "%Y" in fmt else 2000)
    return None


def _describe_tags(step: TagStep) -> str:
    parts = [f"+{t}" for t in step.add] + [f"-{t}" for t in step.remove]
    return " ".join(parts)


# -- the runner --------------------------------------------------------------------------------------------------

Dispatch = Callable[[int], Coroutine[Any, Any, Any]]


class JourneyRunner:
    """Ticks the engine when something may be due (an event, a due time, a finished dispatch, a poll) and keeps
    one dispatch task per journey run with deliveries to send. `dispatch(run_id)` sends one run (the service's
    dispatcher); `start_task` (default: a plain task) lets the service track the tasks for a clean shutdown."""

    def __init__(
        self,
        engine: JourneyEngine,
        dispatch: Dispatch,
        *,
        poll: float = 1.0,
        start_task: Callable[[int, Dispatch], asyncio.Task[Any]] | None = None,
    ) -> None:
        self.engine = engine
        self.dispatch = dispatch
        self.poll = poll
        self._start_task = start_task
        self.tasks: dict[int, asyncio.Task[Any]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.last: TickReport | None = None
        self._db_failure = ""  # the database failure the last tick logged ("" while ticks succeed)

    async def step(self) -> TickReport:
        """One tick, and dispatch tasks for the runs it reports."""
        report = await self.engine.tick()
        self.last = report
        for run_id in report.runs:
            task = self.tasks.get(run_id)
            # A run another live process dispatches is its: asking for it every tick only logged a refusal
            # each second. Once that owner is gone (killed, stopped), the run is started here (taken over).
            if (task is None or task.done()) and run_id not in report.owned:
                self.tasks[run_id] = self._start(run_id)
        return report

    def _start(self, run_id: int) -> asyncio.Task[Any]:
        if self._start_task is not None:
            task = self._start_task(run_id, self.dispatch)
        else:
            task = asyncio.get_running_loop().create_task(self.dispatch(run_id), name=f"wecast-journey-run-{run_id}")
        task.add_done_callback(lambda _t: self.engine.poke())
        return task

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="wecast-journeys")

    async def stop(self) -> None:
        self._stopping = True
        self.engine.poke()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None

    async def _loop(self) -> None:
        clock = self.engine.clock
        while not self._stopping:
            try:
                report = await self.step()
            except StorageError as exc:  # the database's condition (away, full, locked): its words, once
                said = str(explain(exc))
                if said != self._db_failure:  # not the same line every poll while the database is away
                    log.error("journey tick failed: %s (said once while it fails the same way)", said)
                self._db_failure = said
                report = TickReport()
            except Exception:  # one bad tick must not end the journeys
                log.exception("journey tick failed")
                report = TickReport()
            else:
                if self._db_failure:
                    log.warning("journey ticks work again: the database answers")
                    self._db_failure = ""
            wait = self.poll
            if report.next_due is not None:
                wait = min(wait, max(0.0, (report.next_due - clock.now()).total_seconds()))
            if self.engine.wakeup.is_set():
                continue
            nap = asyncio.ensure_future(clock.sleep(max(0.01, wait)))
            wake = asyncio.ensure_future(self.engine.wakeup.wait())
            try:
                await asyncio.wait({nap, wake}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                nap.cancel()
                wake.cancel()

    async def until_idle(self, *, timeout: float = 30.0) -> TickReport:
        """Tick and dispatch until nothing is due now and every dispatch task has ended (tests, the CLI)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        report = TickReport()
        while loop.time() < deadline:
            report = await self.step()
            pending = [t for t in self.tasks.values() if not t.done()]
            if pending:
                await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
                continue
            ours = [r for r in report.runs if r not in report.owned]  # no task of ours runs: owned = elsewhere
            if not report.busy() and not ours and not store.has_unprocessed(self.engine.db):
                return report
        return report

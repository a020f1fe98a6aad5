"""Dispatch: claim -> throttle -> send -> record, for one planned run at a time.

Guarantees (each has a test):

* **Nothing twice.** A delivery is claimed atomically (`UPDATE … WHERE status = 'pending'`) and marked
  `sending` — durably, before the gateway is called. After a crash (`kill -9`) the run is taken over by the
  next process: claimed rows go back to pending; rows caught `sending` are resent only when the gateway
  deduplicates by idempotency key (the sandbox does), and otherwise recorded as `unknown`, never retried
  silently. A row is marked `sending` only while it is still claimed under the sender's own token, so a process
  taken over while alive (its heartbeat went stale) sends none of what the new owner holds
  (tests/test_stress_race.py, which also races and kills real processes at random on both databases).
* **Nothing lost.** Every delivery ends `sent`, `failed` (with the reason), `skipped` (with the reason) or
  `unknown`. Transient errors retry with exponential backoff and jitter, up to `retry.max_attempts`.
* **Rate.** Sends are spaced `1/rate` apart by a pacer that never catches up on missed slots, so the
  achieved rate never exceeds the configured one; concurrency hides gateway latency, so a slow gateway
  still reaches the rate. Rate-limit errors pause all sends and slow the pace, recovering gradually.
* **One outcome table.** Whatever a gateway call raised, on the direct path or the batch (群发 task) path, is
  classified by `engine.outcome.classify` and acted on in one place: retried, requeued, recorded `unknown` or
  `failed`, or — when the gateway refuses the credentials — the run pauses with every unsent delivery still
  pending (tests/test_outcome.py, test_batch.py, test_dispatch.py::test_refused_credentials_*).
* **Failing cleanly.** A store the sends need that cannot be written — wecast's database full or locked past the
  busy timeout (a `StorageError` from storage), or the gateway's own (the sandbox's state file full: a
  `DatabaseError`, nothing delivered) — stops the run with that one error once the sends in flight are recorded;
  what was never handed over stays to send and `wecast run --resume` continues (tests/test_failing_cleanly.py).
  Results of sends already made are kept until written: a database server away for a moment (a restart) is waited
  for, up to `RECORD_PATIENCE`, so they are recorded as what they were instead of being found `sending` by the next
  take-over and recorded `unknown` (tests/test_database_away.py).
* **Policy at send time.** The per-contact frequency cap is re-checked just before each send (other
  campaigns may have sent since planning); quiet hours hold sends until the window opens; a logged-out
  account holds them until it logs in again; `max_errors` failures pause the run.

Results are written in small batches (group commit), which is what lets a SQLite log keep up with
thousands of sends per second. Every database call runs in a worker thread (`asyncio.to_thread`), never on the
event loop: a write that waits for SQLite's lock (a 100,000-recipient plan being recorded beside this run)
stalls only this run's bookkeeping, not the other runs, the scheduler or the HTTP answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import TypeVar

from sqlalchemy.engine import Connection, Engine

from engine.audience import OPTED_OUT_REASON, ReasonCode
from engine.backoff import backoff_delay
from engine.blocking import GroupCommit, off_loop
from engine.clock import Clock, SystemClock
from engine.errors import GatewayError, NotFoundError, RunBusyError, WecastError
from engine.gateways.base import BatchOutcome, Gateway, LoginStatus
from engine.i18n import N_, tr
from engine.messages import Message, PartKind, part_key
from engine.outcome import Outcome, Verdict, classify
from engine.owners import BEAT_WITHIN, HEARTBEAT_EVERY, owner_alive, process_owner
from engine.runsettings import RunSettings
from engine.settings import Settings
from storage import contacts as contacts_db
from storage import deliveries as deliveries_db
from storage import optouts as optouts_db
from storage import runs as runs_db
from storage.db import transaction
from storage.deliveries import IN_DOUBT_REASON, Claimed, PartMark, PartResult, PartState, Result
from storage.errors import Failure, StorageError
from storage.models import OPEN_STATUSES, DeliveryStatus, PartStatus, RunStatus
from storage.runs import RunRow

log = logging.getLogger("wecast.dispatch")
T = TypeVar("T")
RECONCILE_EVERY = 30.0  # seconds between asking about mass-message tasks staff have not confirmed yet
RECORD_PATIENCE = 30.0  # seconds the results of sends made wait for a database server that is away


@dataclass
class RunSummary:
    run_id: int
    status: RunStatus
    counts: dict[DeliveryStatus, int]
    message: str = ""
    recovered: dict[str, int] = field(default_factory=dict)

    @property
    def sent(self) -> int:
        return self.counts.get(DeliveryStatus.SENT, 0)

    @property
    def open(self) -> int:
        return sum(self.counts.get(s, 0) for s in OPEN_STATUSES)


Progress = Callable[[dict[DeliveryStatus, int]], None]


# What a run that stopped being sendable meanwhile says (RunSummary.message).
_NOT_RUNNING = {
    RunStatus.PAUSED: N_("the run was paused meanwhile; `wecast resume` sends the rest"),
    RunStatus.CANCELLED: N_("the run was cancelled meanwhile"),
    RunStatus.COMPLETED: N_("the run is completed"),
}
_NO_LONGER_RUNNING = N_("the run is no longer running")
# A run asked to send that is not running (a second `wecast run` of a finished slot, resuming a cancelled run).
_ALREADY = {
    RunStatus.PAUSED: N_("run {run} is paused: `wecast resume {run}` sends the rest"),
    RunStatus.CANCELLED: N_("run {run} was cancelled: nothing more is sent"),
    RunStatus.COMPLETED: N_("run {run} is already completed: nothing more to send"),
}


class Halt(Enum):
    """Why sending must stop now (see `_RunSender.halt`)."""

    STOPPING = "the dispatcher is stopping"
    AUTH = "the gateway refused the credentials"
    LOGGED_OUT = "the account is logged out"
    NOT_RUNNING = "the run is no longer running"
    TOO_MANY_ERRORS = "max_errors reached"
    QUIET_HOURS = "quiet hours"
    FATAL = "a store the sends need cannot be written (a full disk)"


class Pacer:
    """Spaces calls at least `interval` seconds apart and never bursts to catch up on missed slots."""

    def __init__(self, clock: Clock, interval: float) -> None:
        self.clock = clock
        self.interval = interval
        self.factor = 1.0  # < 1 after rate limiting: sends are spaced further apart
        self._next: float | None = None
        self._paused_until = 0.0
        self._ok_streak = 0
        self._lock: asyncio.Lock | None = None

    async def slot(self) -> None:
        """Wait for this caller's turn (first come, first served); the caller acts right after."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            await self.wait()

    async def until_due(self) -> None:
        """Sleep until the next slot is due, without taking it."""
        now = self.clock.monotonic()
        due = max(self._paused_until, self._next if self._next is not None else now)
        if due > now:
            await self.clock.sleep(due - now)

    async def wait(self) -> None:
        now = self.clock.monotonic()
        start = max(now, self._paused_until, self._next if self._next is not None else now)
        if start > now:
            await self.clock.sleep(start - now)
        gap = self.interval / self.factor if self.interval else 0.0
        # The next slot counts from when this one really began (a late wake-up never lets the next
        # send come sooner), so no window of 1/rate seconds ever holds more than one send.
        self._next = max(start, self.clock.monotonic()) + gap

    def rate_limited(self, retry_after: float) -> None:
        self._paused_until = max(self._paused_until, self.clock.monotonic() + retry_after)
        self.factor = max(0.1, self.factor * 0.5)
        self._ok_streak = 0
        if not self.interval:
            self.interval = 0.01  # an unthrottled run that hits a limit starts pacing at 100/s and adapts

    def succeeded(self) -> None:
        if self.factor < 1.0:
            self._ok_streak += 1
            if self._ok_streak >= 20:
                self.factor = min(1.0, self.factor * 1.25)
                self._ok_streak = 0


@dataclass
class Reconciled:
    """What one look at a run's 群发 tasks found: deliveries now sent or failed, and those still waiting."""

    tasks: int = 0
    sent: int = 0
    failed: int = 0
    waiting: int = 0
    unreadable: int = 0  # tasks whose results could not be read this time (they count as waiting)


async def reconcile_run(db: Engine, gateway: Gateway, run_id: int, clock: Clock) -> Reconciled:
    """Move a run's `submitted` deliveries to their final state from the gateway's task results (sent, or failed
    with the reason: not a friend, over WeCom's per-customer limit, cancelled …); the rest keep waiting. The
    dispatcher does this while a run waits for staff, and `wecast reconcile` on demand; both write the same answer,
    so running them side by side is harmless."""
    rows = await off_loop(deliveries_db.submitted, db, run_id)
    by_task: dict[str, dict[str, int]] = {}
    for r in rows:
        by_task.setdefault(r.task_id, {})[r.contact_id] = r.id
    found = Reconciled(tasks=len(by_task))
    results: list[Result] = []
    for task_id, members in by_task.items():
        try:
            answers = await gateway.batch_results(task_id)
        except GatewayError as exc:
            log.warning("run %s: could not read results of task %s: %s", run_id, task_id, exc)
            found.waiting += len(members)
            found.unreadable += 1
            continue
        seen = set()
        for res in answers:
            row_id = members.get(res.contact_id)
            if row_id is None:
                continue
            seen.add(res.contact_id)
            if res.outcome is BatchOutcome.SENT:
                results.append(
                    Result(
                        row_id, DeliveryStatus.SENT, gateway_message_id=res.message_id, sent_at=clock.now(), reason=""
                    )
                )
                found.sent += 1
            elif res.outcome is BatchOutcome.FAILED:
                results.append(Result(row_id, DeliveryStatus.FAILED, reason=res.reason or "not delivered"))
                found.failed += 1
            else:
                found.waiting += 1
        found.waiting += len(set(members) - seen)
    await off_loop(deliveries_db.write_results, db, results, clock.now())
    return found


@dataclass(frozen=True)
class _Job:
    """A claimed delivery for one send task: its row and — for a multi-part message — the message and how far
    earlier attempts got with each part."""

    row: Claimed
    message: Message | None = None
    parts: Mapping[int, PartState] = field(default_factory=dict)


@dataclass(frozen=True)
class _PartFailure:
    """The part of a multi-part delivery a failed call carried, and what the parts before it came to."""

    delivery_id: int
    index: int
    count: int
    kind: PartKind
    delivered: tuple[int, ...]  # indexes of the parts the gateway accepted
    in_doubt: bool  # a crash left it `sending` before: it may have arrived already

    def describe(self, reason: str) -> str:
        text = f"part {self.index + 1} of {self.count} ({self.kind.value}): {reason}"
        if self.delivered:
            text += "; delivered: part " + ", ".join(str(i + 1) for i in self.delivered)
        return text


def _unsent(state: PartState | None) -> bool:
    """Whether a part still has to be handed to the gateway: never tried, failed before it left, or caught
    `sending` by a crash (resent under its own key: only a gateway that recognises the key gets it again)."""
    return state is None or state.status in (PartStatus.FAILED, PartStatus.SENDING)


def _held_back(row: Claimed, reason: str) -> Result:
    """A row a policy holds back at its hand-over: skipped with the reason — or, if an earlier attempt may have
    arrived, `unknown` (never sent again, never reported as not delivered)."""
    if row.in_doubt:
        return Result(row.id, DeliveryStatus.UNKNOWN, reason=f"{reason}; {IN_DOUBT_REASON}; not sent again")
    return Result(row.id, DeliveryStatus.SKIPPED, reason=reason)


async def _committed(call: Awaitable[T]) -> T:
    """Await a write running in a worker thread, which commits whatever its caller does meanwhile. A caller
    cancelled while it runs still waits for its end (then the cancellation goes on): what the write did is done
    before the caller's cleanup runs, never after it."""
    future = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait({future})
        raise


class Dispatcher:
    """Sends the deliveries of planned runs through one gateway."""

    def __init__(
        self,
        db: Engine,
        gateway: Gateway,
        settings: Settings,
        *,
        clock: Clock | None = None,
        owner: str | None = None,
        rng: random.Random | None = None,
        on_finished: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        """`on_finished(run_id)`: awaited once when this dispatcher marks a run completed (its summary for
        people: `engine.notify`); it must not raise."""
        self.db = db
        self.gateway = gateway
        self.on_finished = on_finished
        self.settings = settings
        self.clock = clock or SystemClock()
        self.owner = owner or process_owner()
        self.rng = rng or random.Random()
        self.retry = settings.sending.retry
        self.concurrency = settings.sending.concurrency
        self.send_timeout = settings.sending.send_timeout.total_seconds()
        self.stopping = asyncio.Event()

    # -- public ----------------------------------------------------------------------------------
    async def run(
        self,
        run_id: int,
        *,
        login_wait: float | None = None,
        progress: Progress | None = None,
        quiet_wait_max: float | None = None,
        confirm_wait: float | None = None,
        leave_if_busy: bool = False,
    ) -> RunSummary:
        """Send a run's pending deliveries. Returns when the run is done, paused, cancelled, or — with
        `login_wait` / `quiet_wait_max` / `confirm_wait` set — when it would have to wait longer than that
        (for a login, for quiet hours to end, for staff to confirm mass-message tasks). A run another live process
        is sending raises `RunBusyError`; with `leave_if_busy`, it is left to that process and its summary (still
        running) says so."""
        run = await off_loop(runs_db.get_run, self.db, run_id)
        if run is None:
            raise NotFoundError(tr("no run {run}", run=run_id))
        if run.status is not RunStatus.RUNNING:
            said = _ALREADY.get(run.status, N_("run {run} is {status}"))
            return await self._summary(run_id, run.status, tr(said, run=run_id, status=run.status.value))
        settings = RunSettings.from_json(run.settings, run_id=run_id)
        try:
            recovered = await self._take_over(run)
        except RunBusyError as exc:
            if not leave_if_busy:
                raise
            return await self._summary(run_id, run.status, str(exc))
        sending = _RunSender(self, run, settings, progress)
        try:
            await sending.start()
            message = await sending.loop(
                login_wait=login_wait, quiet_wait_max=quiet_wait_max, confirm_wait=confirm_wait
            )
        finally:
            await sending.drain()
            await off_loop(runs_db.release, self.db, run_id, self.owner)
        final = await off_loop(runs_db.run_status, self.db, run_id)
        summary = await self._summary(run_id, final or RunStatus.CANCELLED, message)
        summary.recovered = recovered
        return summary

    def stop(self) -> None:
        """Finish in-flight sends, record them, release the rest, and return from `run`."""
        self.stopping.set()

    # -- ownership -------------------------------------------------------------------------------
    async def _take_over(self, run: RunRow) -> dict[str, int]:
        now = self.clock.now()
        if run.owner and run.owner != self.owner and owner_alive(run.owner, run.heartbeat_at, now):
            raise RunBusyError(
                tr(
                    "run {run} is being sent by another process ({owner}); wait for it, or stop that process first",
                    run=run.id,
                    owner=run.owner.rsplit(":", 1)[0],
                )
            )
        recovered = await off_loop(
            runs_db.take_over,
            self.db,
            run.id,
            expected_owner=run.owner,
            owner=self.owner,
            now=now,
            resend_in_flight=self.gateway.capabilities.idempotent_sends,
        )
        if recovered is None:
            raise RunBusyError(tr("run {run} was taken over by another process just now", run=run.id))
        if any(recovered.values()):
            log.warning("run %s: recovered after an interruption: %s", run.id, recovered)
        return recovered

    async def _summary(self, run_id: int, status: RunStatus, message: str) -> RunSummary:
        counts = await off_loop(deliveries_db.status_counts, self.db, run_id)
        return RunSummary(run_id, status, counts, message)


class _RunSender:
    """The state of sending one run (one per `Dispatcher.run` call)."""

    def __init__(self, d: Dispatcher, run: RunRow, settings: RunSettings, progress: Progress | None) -> None:
        self.d = d
        self.run_id = run.id
        self.settings = settings
        self.tz = settings.tz
        self.pacer = Pacer(d.clock, settings.interval)
        self.max_errors = settings.max_errors
        self.cap = settings.frequency_cap
        self.quiet = settings.quiet_hours
        self.progress = progress
        self.token = uuid.uuid4().hex
        self.sem = asyncio.Semaphore(d.concurrency)
        self.inflight: set[asyncio.Task[None]] = set()
        self.results: list[Result] = []
        self.part_results: list[PartResult] = []  # parts whose calls failed, written with their deliveries' results
        # Parts accepted by the gateway, each recorded (with the next part's mark) before that next part goes: the
        # multi-part sends in flight together share the commit.
        self.parts_sent: GroupCommit[deliveries_db.PartSent] = GroupCommit(
            lambda sent: deliveries_db.parts_sent(d.db, sent, d.clock.now())
        )
        self.logged_out = False
        self.auth_error = ""  # set when the gateway refused the credentials: the run pauses
        self.fatal: WecastError | None = None  # set when nothing more can be sent (a full disk): raised by `loop`
        self.last_flush = d.clock.monotonic()
        self.last_beat = d.clock.monotonic()
        self.failed = 0
        caps = d.gateway.capabilities
        self.batch = caps.batch_send and not caps.direct_send

    async def start(self) -> None:
        counts = await off_loop(deliveries_db.status_counts, self.d.db, self.run_id)
        self.failed = counts.get(DeliveryStatus.FAILED, 0)

    def quiet_wait(self) -> float:
        """Seconds until the run's quiet hours end (0: sending is allowed now)."""
        return self.quiet.seconds_until_open(self.d.clock.now(), self.tz) if self.quiet else 0.0

    # -- the one "must I stop now" check ---------------------------------------------------------
    def halt(self, status: RunStatus | None) -> Halt | None:
        """Why no further send may start now, or None: the one check, made before every claim and every chunk.
        `status` is the run's state as just read from the database (None: not read for this check; the caller
        reads it with the chunk's hand-over, `_prepare`)."""
        if self.d.stopping.is_set():
            return Halt.STOPPING
        if self.fatal is not None:
            return Halt.FATAL
        if self.auth_error:
            return Halt.AUTH
        if self.logged_out:
            return Halt.LOGGED_OUT
        if status is not None and status is not RunStatus.RUNNING:
            return Halt.NOT_RUNNING
        if self.max_errors and self.failed >= self.max_errors:
            return Halt.TOO_MANY_ERRORS
        if self.quiet_wait():
            return Halt.QUIET_HOURS
        return None

    async def must_stop(self) -> Halt | None:
        return self.halt(await self._run_status())

    # -- main loop -------------------------------------------------------------------------------
    async def loop(
        self, *, login_wait: float | None, quiet_wait_max: float | None, confirm_wait: float | None = None
    ) -> str:
        d = self.d
        rate = 1.0 / self.pacer.interval if self.pacer.interval else 0.0
        chunk_size = max(1, min(d.concurrency, math.ceil(rate * 0.05))) if rate else d.concurrency
        claim_size = max(chunk_size * 4, min(500, math.ceil(rate * 2) if rate else 500))
        if self.batch:  # one API call carries many recipients: claim enough to fill tasks
            claim_size = max(claim_size, min(d.gateway.capabilities.max_batch, 10_000))
        confirm_deadline = None if confirm_wait is None else d.clock.monotonic() + confirm_wait
        while True:
            halt = await self.must_stop()
            if halt is Halt.STOPPING:
                return tr("stopped; unsent deliveries stay pending and resume on the next start")
            if halt is Halt.FATAL and self.fatal is not None:
                await self._wait_inflight()
                raise self.fatal
            if halt is Halt.NOT_RUNNING:
                status = await self._run_status()
                return tr(_NOT_RUNNING[status]) if status in _NOT_RUNNING else tr(_NO_LONGER_RUNNING)
            if halt is Halt.AUTH:
                await self._wait_inflight()
                await self._pause(f"paused: {self.auth_error}")
                return tr("paused: {error}; fix it, then `wecast resume {run}`", error=self.auth_error, run=self.run_id)
            if halt is Halt.TOO_MANY_ERRORS:
                await self._wait_inflight()
                await self._pause(f"paused after {self.failed} failed deliveries (max_errors {self.max_errors})")
                return tr("paused after {n} failures; see `wecast log --status failed`", n=self.failed)
            if halt is Halt.QUIET_HOURS:
                wait = self.quiet_wait()
                if quiet_wait_max is not None and wait > quiet_wait_max:
                    return tr(
                        "quiet hours ({window}): sends wait; they go out when the window opens (`wecast serve`, "
                        "or `wecast run --resume`)",
                        window=self.quiet,
                    )
                log.info("run %s: quiet hours, waiting %.0fs", self.run_id, wait)
                await self._idle(min(wait, 60.0))
                continue
            if halt is Halt.LOGGED_OUT or not (await d.gateway.login_status()).logged_in:
                await self._wait_inflight()
                status_now = await self._wait_for_login(login_wait)
                if d.stopping.is_set() or await self._run_status() is not RunStatus.RUNNING:
                    continue
                if not status_now.logged_in:
                    if login_wait is not None:
                        return tr(
                            "the WeCom account is not logged in: deliveries stay pending and go out after login "
                            "(`wecast login`, then `wecast run --resume`)"
                        )
                    continue
                self.logged_out = False
            rows = await _committed(
                off_loop(deliveries_db.claim, d.db, self.run_id, self.token, claim_size, d.clock.now())
            )  # cancelled meanwhile: its claims are committed before `drain` gives them back
            if not rows:
                if self.inflight:
                    await self._wait_any()
                    continue
                # Nothing is in flight any more, so every result is in `results`: written before deciding.
                await self._flush()
                due = await off_loop(deliveries_db.next_due, d.db, self.run_id)
                if due is None:
                    waiting = await self._reconcile() if self.batch else 0
                    if waiting:
                        if confirm_deadline is not None and d.clock.monotonic() >= confirm_deadline:
                            return tr(
                                "{n} deliveries were submitted as WeCom mass-message tasks and wait for staff to "
                                "confirm them in WeCom; `wecast run --resume` (or `wecast serve`) collects the "
                                "results",
                                n=waiting,
                            )
                        await self._idle(RECONCILE_EVERY)
                        continue
                    if await off_loop(runs_db.finish_if_done, d.db, self.run_id, d.clock.now()) and d.on_finished:
                        await d.on_finished(self.run_id)
                    return "done"
                await self._idle(min(max(0.0, (due - d.clock.now()).total_seconds()), 5.0))
                continue
            if self.batch:
                await self._submit_rows(rows)
            else:
                await self._send_rows(rows, chunk_size)

    async def _send_rows(self, rows: list[Claimed], chunk_size: int) -> None:
        for start in range(0, len(rows), chunk_size):
            chunk = rows[start : start + chunk_size]
            for _ in chunk:
                await self.sem.acquire()
            # Mark rows `sending` only when their turn is near, so a crash leaves few ambiguous rows.
            await self.pacer.until_due()
            # Checked after the wait, right before marking: what the sends in flight meanwhile ran into counts.
            halt = self.halt(None)
            kept: list[_Job] = []
            if halt is None:
                marking = asyncio.ensure_future(off_loop(self._prepare_jobs, chunk, self.d.clock.now()))
                try:
                    status, kept = await asyncio.shield(marking)
                except asyncio.CancelledError:
                    # Stopped (Ctrl-C or SIGTERM cancels the CLI's task) while the rows were being marked: the
                    # marks commit all the same, so the rows are in flight — they go out and are recorded (`drain`
                    # waits for them) instead of being left `sending`, which a resume would have to call unknown.
                    _, kept = await marking
                    self._launch(len(chunk), kept)
                    raise
                halt = self.halt(status) if status is not RunStatus.RUNNING else None
            if halt is not None:
                for _ in chunk:
                    self.sem.release()
                await self._unclaim([r.id for r in rows[start:]])
                return
            self._launch(len(chunk), kept)
            await self._maybe_flush()
            await self._beat()

    def _launch(self, acquired: int, jobs: list[_Job]) -> None:
        """Start a send task for each job marked `sending` (each holds one of the `acquired` semaphore slots; the
        rest are given back)."""
        for _ in range(acquired - len(jobs)):
            self.sem.release()
        for job in jobs:
            task = asyncio.get_running_loop().create_task(self._send_one(job))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)

    # -- one send --------------------------------------------------------------------------------
    async def _send_one(self, job: _Job) -> None:
        try:
            if job.message is None:
                await self._send_text(job.row)
            else:
                await self._send_parts(job, job.message)
        finally:
            self.sem.release()

    async def _send_text(self, row: Claimed) -> None:
        d = self.d
        await self.pacer.slot()
        try:
            # The call starts in this very step, right at the paced moment (no task hop in between).
            async with asyncio.timeout(d.send_timeout):
                receipt = await d.gateway.send_text(
                    row.contact_id, row.text, idempotency_key=row.dedupe_key or f"delivery-{row.id}"
                )
        except Exception as exc:
            self._failed_call([row], exc)
        else:
            self.pacer.succeeded()
            self._record(
                Result(
                    row.id,
                    DeliveryStatus.SENT,
                    gateway_message_id=receipt.message_id,
                    sent_at=d.clock.now(),
                    last_error="",
                    reason="",
                )
            )

    async def _send_parts(self, job: _Job, message: Message) -> None:
        """Send a multi-part message part by part, each under its own idempotency key and paced as a send of its
        own. The part about to go is on record as `sending` before its call (`_prepare_jobs` marked the first;
        each success is recorded together with the next part's mark), so a crash between two parts leaves the
        ledger saying which parts arrived, which one may have, and which never left."""
        d = self.d
        row = job.row
        key = row.dedupe_key or f"delivery-{row.id}"
        count = len(message.parts)
        hashes = message.part_hashes()
        sent = {i: p.gateway_message_id for i, p in job.parts.items() if p.status is PartStatus.SENT}
        todo = [i for i in range(count) if i not in sent]
        for n, index in enumerate(todo):
            part = message.parts[index]
            await self.pacer.slot()
            try:
                async with asyncio.timeout(d.send_timeout):
                    receipt = await d.gateway.send_part(
                        row.contact_id, part, idempotency_key=part_key(key, index, count)
                    )
            except Exception as exc:
                in_doubt = index in job.parts and job.parts[index].status is PartStatus.SENDING
                failure = _PartFailure(row.id, index, count, part.kind, tuple(sorted(sent)), in_doubt)
                self._failed_call([row], exc, failure)
                return
            self.pacer.succeeded()
            sent[index] = receipt.message_id
            then = None
            if n + 1 < len(todo):
                following = todo[n + 1]
                then = PartMark(row.id, following, message.parts[following].kind.value, hashes[following])
            await self.parts_sent.put(deliveries_db.PartSent(row.id, index, receipt.message_id, then))
        self._record(
            Result(
                row.id,
                DeliveryStatus.SENT,
                gateway_message_id=sent[min(sent)],
                sent_at=d.clock.now(),
                last_error="",
                reason="",
            )
        )

    # -- outcomes (one place for both send paths) -------------------------------------------------
    def _failed_call(self, rows: list[Claimed], exc: Exception, part: _PartFailure | None = None) -> None:
        """A gateway call carrying `rows` (or `part` of the one row) raised `exc`: classify it once, act on the run
        once, record each row."""
        outcome = classify(exc, timeout=self.d.send_timeout)
        if outcome.verdict is Verdict.UNKNOWN and not isinstance(exc, GatewayError | TimeoutError):
            log.exception("run %s: unexpected error sending %d deliveries", self.run_id, len(rows))
        if outcome.slow_down:
            self.pacer.rate_limited(outcome.retry_after or 0.0)
        if outcome.logged_out:
            self.logged_out = True
        if outcome.verdict is Verdict.HALT:
            self.auth_error = outcome.reason
        if outcome.stop and isinstance(exc, WecastError):
            self.fatal = self.fatal or exc
        for row in rows:
            self._settle(row, outcome, part)

    def _settle(self, row: Claimed, outcome: Outcome, part: _PartFailure | None = None) -> None:
        """Record what a failed call means for one of its rows — and, for a part of a multi-part message, for that
        part: not delivered (`failed`: a retry sends it again), or `unknown`.

        A delivery in doubt (a crash caught it being sent; it is sent again under its key) or a part in doubt may
        have arrived before: whatever its resend runs into, it is never recorded as not delivered."""
        attempts = row.attempts + 1
        reason = part.describe(outcome.reason) if part else outcome.reason
        verdict = outcome.verdict
        doubt = part.in_doubt if part is not None else row.in_doubt
        if doubt and verdict is Verdict.FAILED:
            verdict = Verdict.UNKNOWN
            if part is None:
                reason = f"{reason}; {IN_DOUBT_REASON}"
        # Whether anything of the delivery may have reached the customer (a part in doubt, or parts delivered):
        # until it ends it counts against the frequency cap and is never skipped (`storage.deliveries`).
        reached = doubt or (part is not None and bool(part.delivered))
        if verdict is Verdict.RETRY:
            self._retry(row, attempts, reason, delay=outcome.retry_after, part=part, reached=reached)
        elif verdict in (Verdict.REQUEUE, Verdict.HALT):
            # Not an attempt: nothing was sent. The row waits for the login (or the fixed credentials).
            self._record_part(part, PartStatus.FAILED, outcome.reason)
            self._record(
                Result(
                    row.id,
                    DeliveryStatus.PENDING,
                    attempts=row.attempts,
                    last_error=reason,
                    in_doubt=True if reached else None,
                )
            )
        elif verdict is Verdict.UNKNOWN:
            self._record_part(part, PartStatus.UNKNOWN, outcome.reason)
            self._record(Result(row.id, DeliveryStatus.UNKNOWN, reason=reason, last_error=reason))
        else:
            self.failed += 1
            self._record_part(part, PartStatus.FAILED, outcome.reason)
            self._record(Result(row.id, DeliveryStatus.FAILED, reason=reason, last_error=reason))

    def _retry(
        self,
        row: Claimed,
        attempts: int,
        error: str,
        delay: float | None = None,
        part: _PartFailure | None = None,
        *,
        reached: bool = False,
    ) -> None:
        retry = self.d.retry
        doubt = part.in_doubt if part is not None else row.in_doubt
        if attempts >= retry.max_attempts:
            reason = f"gave up after {attempts} attempts: {error}"
            if doubt:
                if part is None:
                    reason = f"{reason}; {IN_DOUBT_REASON}"
                self._record_part(part, PartStatus.UNKNOWN, error)
                self._record(Result(row.id, DeliveryStatus.UNKNOWN, reason=reason, last_error=error))
                return
            self.failed += 1
            self._record_part(part, PartStatus.FAILED, error)
            self._record(Result(row.id, DeliveryStatus.FAILED, reason=reason, last_error=error))
            return
        if delay is None:
            delay = backoff_delay(
                attempts - 1,
                base=retry.base_delay.total_seconds(),
                cap=retry.max_delay.total_seconds(),
                rng=self.d.rng,
            )
        due = self.d.clock.now() + timedelta(seconds=delay)
        self._record_part(part, PartStatus.FAILED, error)
        self._record(
            Result(
                row.id,
                DeliveryStatus.PENDING,
                last_error=error,
                next_attempt_at=due,
                in_doubt=True if reached else None,
            )
        )

    def _record_part(self, part: _PartFailure | None, status: PartStatus, error: str) -> None:
        """Record how a part's call ended (written with its delivery's result). A part in doubt that is to be
        tried again stays `sending`, so the next attempt still knows it may have arrived."""
        if part is None or (part.in_doubt and status is PartStatus.FAILED):
            return
        self.part_results.append(PartResult(part.delivery_id, part.index, status, error))

    # -- mass-message tasks (batch gateways) ------------------------------------------------------
    async def _submit_rows(self, rows: list[Claimed]) -> None:
        """Group claimed rows by identical message (every part) and the same staff member — a 群发 task is one staff
        member's (the contact's leading `follow_user_ids`; '' where the gateway has one account) — and submit each
        group as one task (up to max_batch).

        A group's idempotency key is derived from its rows and saved on them before the call, so after
        a crash exactly the same group is resubmitted under the same key (the gateway then answers with
        the task it already has) instead of a new, overlapping task."""
        d = self.d
        saved = await off_loop(deliveries_db.batch_keys, d.db, [r.id for r in rows])
        follows = await off_loop(contacts_db.follow_users, d.db, [r.contact_id for r in rows])
        groups: dict[tuple[str, str, str], list[Claimed]] = {}
        for r in rows:
            sender = follows.get(r.contact_id, ("",))[0]
            # A plain text message is its text; any other is its JSON (identical messages, identical JSON).
            groups.setdefault((r.message or r.text, sender, saved.get(r.id, "")), []).append(r)
        max_batch = max(1, d.gateway.capabilities.max_batch)
        parts = [
            (content, sender, key, group[i : i + max_batch]) if not key else (content, sender, key, group)
            for (content, sender, key), group in groups.items()
            for i in (range(0, len(group), max_batch) if not key else [0])
        ]
        for index, (content, sender, saved_key, group) in enumerate(parts):
            halt = self.halt(None)
            part: list[Claimed] = []
            key = ""
            if halt is None:
                status, part, key = await off_loop(self._prepare_task, group, d.clock.now(), sender, content, saved_key)
                halt = self.halt(status) if status is not RunStatus.RUNNING else None
            if halt is not None:
                await self._unclaim([r.id for *_, rest in parts[index:] for r in rest])
                return
            if not part:
                continue
            ids = sorted(r.contact_id for r in part)
            message = Message.loads(content) if part[0].message is not None else Message.of_text(content)
            await self.pacer.slot()
            try:
                async with asyncio.timeout(d.send_timeout):
                    receipt = await d.gateway.submit_batch(ids, message, idempotency_key=key, sender=sender)
            except Exception as exc:
                self._failed_call(part, exc)
            else:
                self.pacer.succeeded()
                by_contact = {r.contact_id: r for r in part}
                for cid in receipt.accepted:
                    if cid in by_contact:
                        self._record(
                            Result(
                                by_contact[cid].id,
                                DeliveryStatus.SUBMITTED,
                                gateway_task_id=receipt.task_id,
                                reason="",
                                last_error="",
                            )
                        )
                for cid, why in receipt.rejected.items():
                    if cid in by_contact:
                        self.failed += 1
                        self._record(Result(by_contact[cid].id, DeliveryStatus.FAILED, reason=why, last_error=why))
                for cid in set(by_contact) - set(receipt.accepted) - set(receipt.rejected):
                    why = f"task {receipt.task_id} did not say whether it includes this contact"
                    self._record(Result(by_contact[cid].id, DeliveryStatus.UNKNOWN, reason=why))
            await self._flush()
            await self._beat()

    async def _reconcile(self) -> int:
        """Ask the gateway how submitted tasks went; returns how many deliveries still wait."""
        result = await reconcile_run(self.d.db, self.d.gateway, self.run_id, self.d.clock)
        self.failed += result.failed
        if self.progress and (result.sent or result.failed):
            self.progress(await off_loop(deliveries_db.status_counts, self.d.db, self.run_id))
        return result.waiting

    # -- database --------------------------------------------------------------------------------
    def _record(self, result: Result) -> None:
        self.results.append(result)

    async def _maybe_flush(self) -> None:
        if len(self.results) >= 200 or self.d.clock.monotonic() - self.last_flush >= 0.05:
            await self._flush()

    async def _flush(self) -> None:
        self.last_flush = self.d.clock.monotonic()
        if not self.results:
            return
        batch, self.results = self.results, []
        parts, self.part_results = self.part_results, []
        try:
            await self._write_results(batch, parts)
        except BaseException:
            # Still to record (the sends happened): the next flush, the drain's at the latest, tries them again.
            self.results[:0], self.part_results[:0] = batch, parts
            raise
        if self.progress:
            self.progress(await off_loop(deliveries_db.status_counts, self.d.db, self.run_id))

    async def _write_results(self, batch: list[Result], parts: list[PartResult]) -> None:
        """Write results, waiting up to `RECORD_PATIENCE` for a database server that cannot be reached (the module
        docstring says why). Sending waits meanwhile: the loop that flushes is the one that starts sends."""
        waited, pause = 0.0, 0.25
        while True:
            try:
                await off_loop(deliveries_db.write_results, self.d.db, batch, self.d.clock.now(), parts)
                return
            except StorageError as exc:
                if exc.kind is not Failure.UNREACHABLE or waited >= RECORD_PATIENCE:
                    raise
                if not waited:
                    log.warning("run %s: %d results wait for the database: %s", self.run_id, len(batch), exc.detail)
            await self.d.clock.sleep(pause)
            waited += pause
            pause = min(pause * 2, 5.0)

    def _prepare(
        self, chunk: list[Claimed], now: datetime, *, mark: bool, conn: Connection | None = None
    ) -> tuple[RunStatus, list[Claimed]]:
        """The hand-over of a chunk, in one worker-thread call and one transaction (`conn`'s, or its own): the run's
        state and — if it still runs — the suppression list and the frequency cap re-checked (contacts may have
        opted out, other campaigns may have sent since planning: those rows are skipped) and, with `mark`, the rest
        marked `sending`. Returns the state and the rows to send.

        The cap's read and the marks are one step across processes (`deliveries.hold_cap`): two processes sending
        capped campaigns to the same contacts never both see room for one more. A row in doubt (an earlier attempt
        may have arrived) that may not be sent again is recorded `unknown`, never skipped. Rows no longer claimed
        under this sender's token (the run was taken over meanwhile) are dropped: their new owner sends them."""
        with transaction(self.d.db) if conn is None else nullcontext(conn) as conn:
            cap = self.cap
            if cap is not None and any(r.capped for r in chunk):
                deliveries_db.hold_cap(conn)
            status = runs_db.run_status(conn, self.run_id) or RunStatus.CANCELLED
            if status is not RunStatus.RUNNING:
                return status, []
            mine = deliveries_db.claimed_by(conn, [r.id for r in chunk], self.token)
            if len(mine) < len(chunk):
                # Taken back by a take-over of the run (this process was judged gone: its heartbeat went stale)
                # and perhaps claimed by the new owner: whoever holds a row's claim sends it, never both.
                log.warning(
                    "run %s: %d deliveries claimed here were taken over by another process; left to it",
                    self.run_id,
                    len(chunk) - len(mine),
                )
                chunk = [r for r in chunk if r.id in mine]
            keep = chunk
            held: list[Result] = []
            if not self.settings.opt_out_exempt:
                suppressed = optouts_db.opted_out(conn, [r.contact_id for r in chunk])
                if suppressed:
                    # Opted out since planning (a delayed or resumed run): never sent (`storage.optouts`).
                    reason = f"{ReasonCode.OPTED_OUT}: {tr(OPTED_OUT_REASON)}"
                    held += [_held_back(r, reason) for r in chunk if r.contact_id in suppressed]
                    keep = [r for r in chunk if r.contact_id not in suppressed]
            capped = [r.contact_id for r in keep if r.capped]
            if cap is not None and capped:
                start, end = cap.window(now, self.tz)
                # A row in doubt already counts (its earlier attempt may have arrived): not against itself.
                doubtful = [r.id for r in keep if r.in_doubt]
                counts = deliveries_db.cap_counts(conn, start, end, capped, exclude_ids=doubtful)
                kept = []
                for r in keep:
                    if r.capped and cap.reached(counts.get(r.contact_id, 0)):
                        held.append(_held_back(r, f"{ReasonCode.FREQUENCY_CAP}: {cap.reason(counts[r.contact_id])}"))
                    else:
                        kept.append(r)
                keep = kept
            deliveries_db.write_results(conn, held, now)
            if mark:
                deliveries_db.mark_sending(conn, keep, now)
        return status, keep

    def _prepare_task(
        self, group: list[Claimed], now: datetime, sender: str, content: str, saved_key: str
    ) -> tuple[RunStatus, list[Claimed], str]:
        """`_prepare` for a 群发 task, and in the same transaction the rows it lets through marked `sending` with the
        task's idempotency key (derived from the run, the sender, the message and the recipients; or the key a
        submission interrupted by a crash saved). Returns the state, the rows and the key."""
        with transaction(self.d.db) as conn:
            status, part = self._prepare(group, now, mark=False, conn=conn)
            if not part:
                return status, part, ""
            ids = sorted(r.contact_id for r in part)
            group_id = f"{self.run_id}|{sender}|{content}|{','.join(ids)}"
            key = saved_key or "batch:" + hashlib.sha256(group_id.encode()).hexdigest()[:32]
            deliveries_db.mark_sending(conn, part, now, task_key=key)
        return status, part, key

    def _prepare_jobs(self, chunk: list[Claimed], now: datetime) -> tuple[RunStatus, list[_Job]]:
        """`_prepare` (marking the rows `sending`) and, in the same transaction, for each multi-part message: what
        earlier attempts did with its parts, and the first part still to send marked `sending`."""
        with transaction(self.d.db) as conn:
            status, keep = self._prepare(chunk, now, mark=True, conn=conn)
            rich = [r for r in keep if r.message is not None]
            if not rich:
                return status, [_Job(r) for r in keep]
            states = deliveries_db.part_states(conn, [r.id for r in rich])
            jobs: list[_Job] = []
            marks: list[PartMark] = []
            for r in keep:
                if r.message is None:
                    jobs.append(_Job(r))
                    continue
                message = Message.loads(r.message)
                parts = states.get(r.id, {})
                first = next((i for i in range(len(message.parts)) if _unsent(parts.get(i))), None)
                if first is not None:
                    kind = message.parts[first].kind.value
                    marks.append(PartMark(r.id, first, kind, message.part_hashes()[first]))
                jobs.append(_Job(r, message, parts))
            deliveries_db.mark_parts_sending(conn, marks, now)
        return status, jobs

    async def _unclaim(self, ids: list[int]) -> None:
        """Give back claimed rows: to pending, or — when the run was cancelled meanwhile — to skipped."""
        if ids:
            cancelled = await self._run_status() is RunStatus.CANCELLED
            await off_loop(deliveries_db.unclaim, self.d.db, ids, self.token, self.d.clock.now(), cancelled=cancelled)

    async def _run_status(self) -> RunStatus:
        status = await off_loop(runs_db.run_status, self.d.db, self.run_id)
        return status or RunStatus.CANCELLED

    async def _pause(self, why: str) -> None:
        await off_loop(
            runs_db.set_status, self.d.db, self.run_id, RunStatus.PAUSED, allowed={RunStatus.RUNNING}, error=why
        )
        log.warning("run %s: %s", self.run_id, why)

    async def _beat(self) -> None:
        if self.d.clock.monotonic() - self.last_beat < HEARTBEAT_EVERY:
            return
        self.last_beat = self.d.clock.monotonic()
        await off_loop(runs_db.heartbeat, self.d.db, self.run_id, self.d.clock.now())

    # -- waiting ---------------------------------------------------------------------------------
    async def _wait_for_login(self, limit: float | None) -> LoginStatus:
        """Wait for the account to log in, up to `limit` seconds (None: until stopped), while still
        noticing a stop request or the run being paused or cancelled."""
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        while True:
            step = 5.0 if deadline is None else max(0.0, min(5.0, deadline - loop.time()))
            login = asyncio.ensure_future(self.d.gateway.wait_for_login(step))
            stop = asyncio.ensure_future(self.d.stopping.wait())
            await asyncio.wait({login, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            await self._beat()
            if not login.done():
                login.cancel()
                return await self.d.gateway.login_status()
            status = login.result()
            if (
                status.logged_in
                or self.d.stopping.is_set()
                or await self._run_status() is not RunStatus.RUNNING
                or (deadline is not None and loop.time() >= deadline)
            ):
                return status

    async def _wait_any(self) -> None:
        if self.inflight:
            await asyncio.wait(set(self.inflight), timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
        await self._maybe_flush()
        await self._beat()

    async def _wait_inflight(self) -> None:
        while self.inflight:
            await asyncio.wait(set(self.inflight), timeout=BEAT_WITHIN)
            await self._beat()
        await self._flush()

    async def _idle(self, seconds: float) -> None:
        """Wait `seconds` (on the clock) or until stopped, beating at least every `BEAT_WITHIN` seconds meanwhile."""
        await self._flush()
        await self._beat()
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        end = self.d.clock.monotonic() + seconds
        while not self.d.stopping.is_set() and (left := end - self.d.clock.monotonic()) > 0:
            stop = asyncio.ensure_future(self.d.stopping.wait())
            nap = asyncio.ensure_future(self.d.clock.sleep(min(left, BEAT_WITHIN)))
            await asyncio.wait({stop, nap}, return_when=asyncio.FIRST_COMPLETED)
            for f in (stop, nap):
                f.cancel()
            await self._beat()

    async def drain(self) -> None:
        """Let in-flight sends finish and record everything, then give back unsent claims."""
        await self._wait_inflight()
        cancelled = await self._run_status() is RunStatus.CANCELLED
        await off_loop(
            deliveries_db.release_claims, self.d.db, self.run_id, self.token, self.d.clock.now(), cancelled=cancelled
        )

"""Dispatch: claim -> throttle -> send -> record, for one planned run at a time.

Guarantees (each has a test):

* **Nothing twice.** A delivery is claimed atomically (`UPDATE … WHERE status = 'pending'`) and marked
  `sending` — durably, before the gateway is called. After a crash (`kill -9`) the run is taken over by the
  next process: claimed rows go back to pending; rows caught `sending` are resent only when the gateway
  deduplicates by idempotency key (the sandbox does), and otherwise recorded as `unknown`, never retried
  silently.
* **Nothing lost.** Every delivery ends `sent`, `failed` (with the reason), `skipped` (with the reason) or
  `unknown`. Transient errors retry with exponential backoff and jitter, up to `retry.max_attempts`.
* **Rate.** Sends are spaced `1/rate` apart by a pacer that never catches up on missed slots, so the
  achieved rate never exceeds the configured one; concurrency hides gateway latency, so a slow gateway
  still reaches the rate. Rate-limit errors pause all sends and slow the pace, recovering gradually.
* **One outcome table.** Whatever a gateway call raised, on the direct path or the batch (群发 task) path, is
  classified by `engine.outcome.classify` and acted on in one place: retried, requeued, recorded `unknown` or
  `failed`, or — when the gateway refuses the credentials — the run pauses with every unsent delivery still
  pending (tests/test_outcome.py, test_batch.py, test_dispatch.py::test_refused_credentials_*).
* **Policy at send time.** The per-contact frequency cap is re-checked just before each send (other
  campaigns may have sent since planning); quiet hours hold sends until the window opens; a logged-out
  account holds them until it logs in again; `max_errors` failures pause the run.

Results are written in small batches (group commit), which is what lets a SQLite log keep up with
thousands of sends per second.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import random
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from enum import Enum
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from engine.backoff import backoff_delay
from engine.clock import Clock, SystemClock
from engine.errors import GatewayError, NotFoundError, WecastError
from engine.gateways.base import BatchOutcome, Gateway
from engine.outcome import Outcome, Verdict, classify
from engine.plan import cap_period
from engine.settings import Settings
from storage import queries
from storage.models import DELIVERIES, OPEN_STATUSES, RUNS, DeliveryStatus, RunStatus

log = logging.getLogger("wecast.dispatch")
HEARTBEAT_EVERY = 5.0
RECONCILE_EVERY = 30.0  # seconds between asking about mass-message tasks staff have not confirmed yet
STALE_AFTER = timedelta(seconds=60)


@dataclass
class RunSummary:
    run_id: int
    status: str
    counts: dict[str, int]
    message: str = ""
    recovered: dict[str, int] = field(default_factory=dict)

    @property
    def sent(self) -> int:
        return self.counts.get(DeliveryStatus.SENT, 0)

    @property
    def open(self) -> int:
        return sum(self.counts.get(s, 0) for s in OPEN_STATUSES)


Progress = Callable[[dict[str, int]], None]


class Halt(Enum):
    """Why sending must stop now (see `_RunSender.must_stop`)."""

    STOPPING = "the dispatcher is stopping"
    AUTH = "the gateway refused the credentials"
    LOGGED_OUT = "the account is logged out"
    NOT_RUNNING = "the run is no longer running"
    TOO_MANY_ERRORS = "max_errors reached"
    QUIET_HOURS = "quiet hours"


def process_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_alive(owner: str, heartbeat: datetime | None, now: datetime) -> bool:
    """Whether the process that owns a run may still be sending it."""
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text = rest.split(":", 1)[0]
    fresh = heartbeat is not None and now - heartbeat < STALE_AFTER
    if host == socket.gethostname() and pid_text.isdigit():
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return fresh
        return fresh
    return fresh


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


def quiet_wait(now: datetime, tz: ZoneInfo, window: dict[str, str] | None) -> float:
    """Seconds until sending may start again (0 when outside quiet hours)."""
    if not window:
        return 0.0
    start = time.fromisoformat(window["start"])
    end = time.fromisoformat(window["end"])
    local = now.astimezone(tz)
    t = local.time()
    inside = (start <= t < end) if start < end else (t >= start or t < end)
    if not inside:
        return 0.0
    opens = local.replace(hour=end.hour, minute=end.minute, second=0, microsecond=0)
    if opens <= local:
        opens += timedelta(days=1)
    opens = opens.replace(tzinfo=None).replace(tzinfo=tz)  # re-resolve across DST
    return max(1.0, (opens - now).total_seconds())


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
    ) -> None:
        self.db = db
        self.gateway = gateway
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
    ) -> RunSummary:
        """Send a run's pending deliveries. Returns when the run is done, paused, cancelled, or — with
        `login_wait` / `quiet_wait_max` / `confirm_wait` set — when it would have to wait longer than that
        (for a login, for quiet hours to end, for staff to confirm mass-message tasks)."""
        run = queries.get_run(self.db, run_id)
        if run is None:
            raise NotFoundError(f"no run {run_id}")
        if run["status"] != RunStatus.RUNNING.value:
            return self._summary(run_id, run["status"], f"run {run_id} is {run['status']}")
        recovered = self._take_over(run)
        sending = _RunSender(self, run, progress)
        try:
            message = await sending.loop(
                login_wait=login_wait, quiet_wait_max=quiet_wait_max, confirm_wait=confirm_wait
            )
        finally:
            await sending.drain()
            self._release(run_id)
        final = queries.get_run(self.db, run_id)
        assert final is not None
        summary = self._summary(run_id, final["status"], message)
        summary.recovered = recovered
        return summary

    def stop(self) -> None:
        """Finish in-flight sends, record them, release the rest, and return from `run`."""
        self.stopping.set()

    # -- ownership -------------------------------------------------------------------------------
    def _take_over(self, run: dict[str, Any]) -> dict[str, int]:
        now = self.clock.now()
        owner = run.get("owner") or ""
        if owner and owner != self.owner and owner_alive(owner, run.get("heartbeat_at"), now):
            raise WecastError(
                f"run {run['id']} is being sent by another process ({owner.rsplit(':', 1)[0]}); "
                "wait for it, or stop that process first"
            )
        r = queries.R
        with self.db.begin() as conn:
            changed = conn.execute(
                update(RUNS).where(r.id == run["id"], r.owner == owner).values(owner=self.owner, heartbeat_at=now)
            ).rowcount
            if not changed:
                raise WecastError(f"run {run['id']} was taken over by another process just now")
            recovered = queries.recover_run(
                conn, run["id"], now=now, resend_in_flight=self.gateway.capabilities.idempotent_sends
            )
        if any(recovered.values()):
            log.warning("run %s: recovered after an interruption: %s", run["id"], recovered)
        return recovered

    def _release(self, run_id: int) -> None:
        r = queries.R
        with self.db.begin() as conn:
            conn.execute(update(RUNS).where(r.id == run_id, r.owner == self.owner).values(owner=""))

    def _summary(self, run_id: int, status: str, message: str) -> RunSummary:
        with self.db.connect() as conn:
            counts = queries.status_counts(conn, run_id)
        return RunSummary(run_id, status, counts, message)


class _RunSender:
    """The state of sending one run (one per `Dispatcher.run` call)."""

    def __init__(self, d: Dispatcher, run: dict[str, Any], progress: Progress | None) -> None:
        self.d = d
        self.run_id: int = run["id"]
        cfg: dict[str, Any] = run.get("settings") or {}
        self.cfg = cfg
        self.tz = ZoneInfo(cfg.get("timezone") or d.settings.timezone)
        self.pacer = Pacer(d.clock, float(cfg.get("interval") or 0.0))
        self.max_errors = int(cfg.get("max_errors") or 0)
        self.cap: dict[str, Any] | None = cfg.get("frequency_cap")
        self.quiet: dict[str, str] | None = cfg.get("quiet_hours")
        self.progress = progress
        self.token = uuid.uuid4().hex
        self.sem = asyncio.Semaphore(d.concurrency)
        self.inflight: set[asyncio.Task[None]] = set()
        self.results: list[dict[str, Any]] = []
        self.logged_out = False
        self.auth_error = ""  # set when the gateway refused the credentials: the run pauses
        self.last_flush = d.clock.monotonic()
        self.last_beat = d.clock.monotonic()
        with d.db.connect() as conn:
            counts = queries.status_counts(conn, self.run_id)
        self.failed = counts.get(DeliveryStatus.FAILED, 0)
        self.counts = counts
        caps = d.gateway.capabilities
        self.batch = caps.batch_send and not caps.direct_send

    # -- the one "must I stop now" check ---------------------------------------------------------
    def must_stop(self) -> Halt | None:
        """Why no further send may start now, or None. Checked before every claim and every chunk."""
        d = self.d
        if d.stopping.is_set():
            return Halt.STOPPING
        if self.auth_error:
            return Halt.AUTH
        if self.logged_out:
            return Halt.LOGGED_OUT
        if self._run_status() != RunStatus.RUNNING:
            return Halt.NOT_RUNNING
        if self.max_errors and self.failed >= self.max_errors:
            return Halt.TOO_MANY_ERRORS
        if quiet_wait(d.clock.now(), self.tz, self.quiet):
            return Halt.QUIET_HOURS
        return None

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
            halt = self.must_stop()
            if halt is Halt.STOPPING:
                return "stopped; unsent deliveries stay pending and resume on the next start"
            if halt is Halt.NOT_RUNNING:
                return f"run {self._run_status()}"
            if halt is Halt.AUTH:
                await self._wait_inflight()
                self._pause(f"paused: {self.auth_error}")
                return f"paused: {self.auth_error}; fix it, then `wecast resume {self.run_id}`"
            if halt is Halt.TOO_MANY_ERRORS:
                await self._wait_inflight()
                self._pause(f"paused after {self.failed} failed deliveries (max_errors {self.max_errors})")
                return f"paused after {self.failed} failures; see `wecast log --status failed`"
            if halt is Halt.QUIET_HOURS:
                wait = quiet_wait(d.clock.now(), self.tz, self.quiet)
                if quiet_wait_max is not None and wait > quiet_wait_max:
                    return (
                        f"quiet hours ({self.quiet['start'] if self.quiet else ''}–"
                        f"{self.quiet['end'] if self.quiet else ''}): sends wait; "
                        "they go out when the window opens (`wecast serve`, or `wecast run --resume`)"
                    )
                log.info("run %s: quiet hours, waiting %.0fs", self.run_id, wait)
                await self._idle(min(wait, 60.0))
                continue
            if halt is Halt.LOGGED_OUT or not (await d.gateway.login_status()).logged_in:
                await self._wait_inflight()
                status_now = await self._wait_for_login(login_wait)
                if d.stopping.is_set() or self._run_status() != RunStatus.RUNNING:
                    continue
                if not status_now.logged_in:
                    if login_wait is not None:
                        return (
                            "the WeCom account is not logged in: deliveries stay pending and go out "
                            "after login (`wecast login`, then `wecast run --resume`)"
                        )
                    continue
                self.logged_out = False
            with d.db.begin() as conn:
                rows = queries.claim(conn, self.run_id, self.token, claim_size, d.clock.now())
            if not rows:
                self._flush()
                if self.inflight:
                    await self._wait_any()
                    continue
                due = self._next_due()
                if due is None:
                    waiting = await self._reconcile() if self.batch else 0
                    if waiting:
                        if confirm_deadline is not None and d.clock.monotonic() >= confirm_deadline:
                            return (
                                f"{waiting} deliveries were submitted as WeCom mass-message tasks and wait for "
                                "staff to confirm them in WeCom; `wecast run --resume` (or `wecast serve`) "
                                "collects the results"
                            )
                        await self._idle(RECONCILE_EVERY)
                        continue
                    self._finish_if_done()
                    return "done"
                await self._idle(min(max(0.0, (due - d.clock.now()).total_seconds()), 5.0))
                continue
            if self.batch:
                await self._submit_rows(rows)
            else:
                await self._send_rows(rows, chunk_size)

    async def _send_rows(self, rows: list[dict[str, Any]], chunk_size: int) -> None:
        for start in range(0, len(rows), chunk_size):
            chunk = rows[start : start + chunk_size]
            for _ in chunk:
                await self.sem.acquire()
            # Mark rows `sending` only when their turn is near, so a crash leaves few ambiguous rows.
            await self.pacer.until_due()
            # Checked after the wait, right before marking: what the sends in flight meanwhile ran into counts.
            if self.must_stop() is not None:
                for _ in chunk:
                    self.sem.release()
                self._unclaim([r["id"] for r in rows[start:]])
                return
            kept = self._apply_cap(chunk)
            for _ in range(len(chunk) - len(kept)):
                self.sem.release()
            chunk = kept
            self._mark_sending(chunk)
            for row in chunk:
                task = asyncio.get_running_loop().create_task(self._send_one(row))
                self.inflight.add(task)
                task.add_done_callback(self.inflight.discard)
            self._maybe_flush()
            self._beat()

    # -- one send --------------------------------------------------------------------------------
    async def _send_one(self, row: dict[str, Any]) -> None:
        d = self.d
        await self.pacer.slot()
        try:
            # The call starts in this very step, right at the paced moment (no task hop in between).
            async with asyncio.timeout(d.send_timeout):
                receipt = await d.gateway.send_text(
                    row["contact_id"], row["text"], idempotency_key=row["dedupe_key"] or f"delivery-{row['id']}"
                )
        except Exception as exc:
            outcome = classify(exc, timeout=d.send_timeout)
            if outcome.verdict is Verdict.UNKNOWN and not isinstance(exc, GatewayError | TimeoutError):
                log.exception("run %s: unexpected error sending delivery %s", self.run_id, row["id"])
            self._react(outcome)
            self._settle(row, outcome)
        else:
            self.pacer.succeeded()
            self._record(
                {
                    "id": row["id"],
                    "claim_token": "",
                    "status": DeliveryStatus.SENT,
                    "gateway_message_id": receipt.message_id,
                    "sent_at": d.clock.now(),
                    "last_error": "",
                    "reason": "",
                }
            )
        finally:
            self.sem.release()

    # -- outcomes (one place for both send paths) -------------------------------------------------
    def _react(self, outcome: Outcome) -> None:
        """What a failed call means for the whole run (once per call, however many rows it carried)."""
        if outcome.slow_down:
            self.pacer.rate_limited(outcome.retry_after or 0.0)
        if outcome.logged_out:
            self.logged_out = True
        if outcome.verdict is Verdict.HALT:
            self.auth_error = outcome.reason

    def _settle(self, row: dict[str, Any], outcome: Outcome) -> None:
        """Record what a failed call means for one of its rows."""
        base: dict[str, Any] = {"id": row["id"], "claim_token": "", "last_error": outcome.reason}
        attempts = row["attempts"] + 1
        if outcome.verdict is Verdict.RETRY:
            self._retry(base, attempts, outcome.reason, delay=outcome.retry_after)
        elif outcome.verdict in (Verdict.REQUEUE, Verdict.HALT):
            # Not an attempt: nothing was sent. The row waits for the login (or the fixed credentials).
            self._record({**base, "status": DeliveryStatus.PENDING, "attempts": attempts - 1})
        elif outcome.verdict is Verdict.UNKNOWN:
            self._record({**base, "status": DeliveryStatus.UNKNOWN, "reason": outcome.reason})
        else:
            self.failed += 1
            self._record({**base, "status": DeliveryStatus.FAILED, "reason": outcome.reason})

    def _retry(self, base: dict[str, Any], attempts: int, error: str, delay: float | None = None) -> None:
        retry = self.d.retry
        if attempts >= retry.max_attempts:
            self.failed += 1
            self._record(
                {**base, "status": DeliveryStatus.FAILED, "reason": f"gave up after {attempts} attempts: {error}"}
            )
            return
        if delay is None:
            delay = backoff_delay(
                attempts - 1,
                base=retry.base_delay.total_seconds(),
                cap=retry.max_delay.total_seconds(),
                rng=self.d.rng,
            )
        self._record(
            {
                **base,
                "status": DeliveryStatus.PENDING,
                "next_attempt_at": self.d.clock.now() + timedelta(seconds=delay),
            }
        )

    # -- mass-message tasks (batch gateways) ------------------------------------------------------
    async def _submit_rows(self, rows: list[dict[str, Any]]) -> None:
        """Group claimed rows by identical text and submit each group as one task (up to max_batch).

        A group's idempotency key is derived from its rows and saved on them before the call, so after
        a crash exactly the same group is resubmitted under the same key (the gateway then answers with
        the task it already has) instead of a new, overlapping task."""
        d = self.d
        saved = self._saved_batch_keys([r["id"] for r in rows])
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault((r["text"], saved.get(r["id"], "")), []).append(r)
        max_batch = max(1, d.gateway.capabilities.max_batch)
        parts = [
            (text, key, group[i : i + max_batch]) if not key else (text, key, group)
            for (text, key), group in groups.items()
            for i in (range(0, len(group), max_batch) if not key else [0])
        ]
        for index, (text, key, part) in enumerate(parts):
            if self.must_stop() is not None:
                self._unclaim([r["id"] for _, _, rest in parts[index:] for r in rest])
                return
            part = self._apply_cap(part)
            if not part:
                continue
            ids = sorted(r["contact_id"] for r in part)
            key = key or "batch:" + hashlib.sha256(f"{self.run_id}|{text}|{','.join(ids)}".encode()).hexdigest()[:32]
            now = d.clock.now()
            with d.db.begin() as conn:
                queries.apply_updates(
                    conn,
                    [
                        {
                            "id": r["id"],
                            "status": DeliveryStatus.SENDING,
                            "attempts": r["attempts"] + 1,
                            "gateway_task_id": key,
                            "updated_at": now,
                            "sent_at": now,
                        }
                        for r in part
                    ],
                )
            await self.pacer.slot()
            by_contact = {r["contact_id"]: r for r in part}
            try:
                async with asyncio.timeout(d.send_timeout):
                    receipt = await d.gateway.submit_batch(ids, text, idempotency_key=key)
            except Exception as exc:
                outcome = classify(exc, timeout=d.send_timeout)
                if outcome.verdict is Verdict.UNKNOWN and not isinstance(exc, GatewayError | TimeoutError):
                    log.exception("run %s: unexpected error submitting a task of %d", self.run_id, len(part))
                self._react(outcome)
                for r in part:
                    self._settle(r, outcome)
            else:
                self.pacer.succeeded()
                for cid in receipt.accepted:
                    if cid in by_contact:
                        self._record(
                            {
                                "id": by_contact[cid]["id"],
                                "status": DeliveryStatus.SUBMITTED,
                                "claim_token": "",
                                "gateway_task_id": receipt.task_id,
                                "reason": "",
                                "last_error": "",
                            }
                        )
                for cid, why in receipt.rejected.items():
                    if cid in by_contact:
                        self.failed += 1
                        self._record(
                            {
                                "id": by_contact[cid]["id"],
                                "status": DeliveryStatus.FAILED,
                                "claim_token": "",
                                "reason": why,
                                "last_error": why,
                            }
                        )
                missing = set(by_contact) - set(receipt.accepted) - set(receipt.rejected)
                for cid in missing:
                    self._record(
                        {
                            "id": by_contact[cid]["id"],
                            "status": DeliveryStatus.UNKNOWN,
                            "claim_token": "",
                            "reason": f"task {receipt.task_id} did not say whether it includes this contact",
                        }
                    )
            self._flush()
            self._beat()

    def _saved_batch_keys(self, ids: list[int]) -> dict[int, str]:
        c = queries.D
        with self.d.db.connect() as conn:
            rows = conn.execute(select(c.id, c.gateway_task_id).where(c.id.in_(ids), c.gateway_task_id.like("batch:%")))
            return {r.id: r.gateway_task_id for r in rows}

    async def _reconcile(self) -> int:
        """Ask the gateway how submitted tasks went; returns how many deliveries still wait."""
        c = queries.D
        with self.d.db.connect() as conn:
            rows = conn.execute(
                select(c.id, c.contact_id, c.gateway_task_id).where(
                    c.run_id == self.run_id, c.status == DeliveryStatus.SUBMITTED.value
                )
            ).all()
        by_task: dict[str, dict[str, int]] = {}
        for r in rows:
            by_task.setdefault(r.gateway_task_id, {})[r.contact_id] = r.id
        waiting = 0
        for task_id, members in by_task.items():
            try:
                results = await self.d.gateway.batch_results(task_id)
            except GatewayError as exc:
                log.warning("run %s: could not read results of task %s: %s", self.run_id, task_id, exc)
                waiting += len(members)
                continue
            seen = set()
            for res in results:
                row_id = members.get(res.contact_id)
                if row_id is None:
                    continue
                seen.add(res.contact_id)
                if res.outcome is BatchOutcome.SENT:
                    self._record(
                        {
                            "id": row_id,
                            "status": DeliveryStatus.SENT,
                            "gateway_message_id": res.message_id,
                            "sent_at": self.d.clock.now(),
                            "reason": "",
                        }
                    )
                elif res.outcome is BatchOutcome.FAILED:
                    self.failed += 1
                    self._record(
                        {"id": row_id, "status": DeliveryStatus.FAILED, "reason": res.reason or "not delivered"}
                    )
                else:
                    waiting += 1
            waiting += len(set(members) - seen)
        self._flush()
        return waiting

    # -- database --------------------------------------------------------------------------------
    def _record(self, update_: dict[str, Any]) -> None:
        update_["updated_at"] = self.d.clock.now()
        self.results.append(update_)
        status = update_["status"]
        self.counts[status] = self.counts.get(status, 0) + 1

    def _maybe_flush(self) -> None:
        if len(self.results) >= 200 or self.d.clock.monotonic() - self.last_flush >= 0.05:
            self._flush()

    def _flush(self) -> None:
        self.last_flush = self.d.clock.monotonic()
        if not self.results:
            return
        batch, self.results = self.results, []
        with self.d.db.begin() as conn:
            queries.apply_updates(conn, batch)
        if self.progress:
            with self.d.db.connect() as conn:
                self.progress(queries.status_counts(conn, self.run_id))

    def _mark_sending(self, chunk: list[dict[str, Any]]) -> None:
        if not chunk:
            return
        now = self.d.clock.now()
        with self.d.db.begin() as conn:
            queries.apply_updates(
                conn,
                [
                    {
                        "id": r["id"],
                        "status": DeliveryStatus.SENDING,
                        "attempts": r["attempts"] + 1,
                        "updated_at": now,
                        "sent_at": now,
                    }
                    for r in chunk
                ],
            )

    def _apply_cap(self, chunk: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Re-check the shared frequency cap just before sending; over-cap rows are skipped."""
        if not self.cap:
            return chunk
        capped = [r for r in chunk if r["capped"]]
        if not capped:
            return chunk
        start, end = cap_period(self.d.clock.now(), self.tz, self.cap["per"])
        with self.d.db.connect() as conn:
            counts = queries.cap_counts(conn, start, end, [r["contact_id"] for r in capped])
        keep, skip = [], []
        for r in chunk:
            if r["capped"] and counts.get(r["contact_id"], 0) >= self.cap["max"]:
                skip.append(
                    {
                        "id": r["id"],
                        "status": DeliveryStatus.SKIPPED,
                        "claim_token": "",
                        "updated_at": self.d.clock.now(),
                        "reason": f"frequency_cap: already got {counts[r['contact_id']]} marketing message(s) "
                        f"this {self.cap['per']} (max {self.cap['max']})",
                    }
                )
            else:
                keep.append(r)
        if skip:
            with self.d.db.begin() as conn:
                queries.apply_updates(conn, skip)
        return keep

    def _unclaim(self, ids: list[int]) -> None:
        """Give back claimed rows: to pending, or — when the run was cancelled meanwhile — to skipped."""
        if not ids:
            return
        cancelled = self._run_status() == RunStatus.CANCELLED.value
        row: dict[str, Any] = (
            {"status": DeliveryStatus.SKIPPED, "reason": "run cancelled", "claim_token": ""}
            if cancelled
            else {"status": DeliveryStatus.PENDING, "claim_token": ""}
        )
        with self.d.db.begin() as conn:
            queries.apply_updates(conn, [{"id": i, **row} for i in ids])

    def _run_status(self) -> str:
        run = queries.get_run(self.d.db, self.run_id)
        return str(run["status"]) if run else RunStatus.CANCELLED.value

    def _next_due(self) -> datetime | None:
        with self.d.db.connect() as conn:
            return queries.next_due(conn, self.run_id)

    def _pause(self, why: str) -> None:
        r = queries.R
        with self.d.db.begin() as conn:
            conn.execute(update(RUNS).where(r.id == self.run_id).values(status=RunStatus.PAUSED.value, error=why))
        log.warning("run %s: %s", self.run_id, why)

    def _finish_if_done(self) -> None:
        with self.d.db.begin() as conn:
            counts = queries.status_counts(conn, self.run_id)
            if any(counts.get(s, 0) for s in OPEN_STATUSES):
                return
            r = queries.R
            conn.execute(
                update(RUNS)
                .where(r.id == self.run_id, r.status == RunStatus.RUNNING.value)
                .values(status=RunStatus.COMPLETED.value, finished_at=self.d.clock.now())
            )

    def _beat(self) -> None:
        if self.d.clock.monotonic() - self.last_beat < HEARTBEAT_EVERY:
            return
        self.last_beat = self.d.clock.monotonic()
        r = queries.R
        with self.d.db.begin() as conn:
            conn.execute(update(RUNS).where(r.id == self.run_id).values(heartbeat_at=self.d.clock.now()))

    # -- waiting ---------------------------------------------------------------------------------
    async def _wait_for_login(self, limit: float | None) -> Any:
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
            if not login.done():
                login.cancel()
                return await self.d.gateway.login_status()
            status = login.result()
            if (
                status.logged_in
                or self.d.stopping.is_set()
                or self._run_status() != RunStatus.RUNNING.value
                or (deadline is not None and loop.time() >= deadline)
            ):
                return status

    async def _wait_any(self) -> None:
        if self.inflight:
            await asyncio.wait(set(self.inflight), timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
        self._maybe_flush()
        self._beat()

    async def _wait_inflight(self) -> None:
        if self.inflight:
            await asyncio.wait(set(self.inflight))
        self._flush()

    async def _idle(self, seconds: float) -> None:
        self._flush()
        self._beat()
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        stop = asyncio.ensure_future(self.d.stopping.wait())
        nap = asyncio.ensure_future(self.d.clock.sleep(seconds))
        await asyncio.wait({stop, nap}, return_when=asyncio.FIRST_COMPLETED)
        for f in (stop, nap):
            f.cancel()

    async def drain(self) -> None:
        """Let in-flight sends finish and record everything, then give back unsent claims."""
        await self._wait_inflight()
        self._flush()
        cancelled = self._run_status() == RunStatus.CANCELLED.value
        with self.d.db.begin() as conn:
            c = queries.D
            conn.execute(
                update(DELIVERIES)
                .where(c.run_id == self.run_id, c.status == DeliveryStatus.CLAIMED.value, c.claim_token == self.token)
                .values(
                    status=DeliveryStatus.SKIPPED.value if cancelled else DeliveryStatus.PENDING.value,
                    reason="run cancelled" if cancelled else "",
                    claim_token="",
                )
            )

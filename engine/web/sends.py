"""Single sends of the HTTP API (/send-message), pooled: the requests that arrive while one group is being planned
are planned together — one transaction, one run — and sent by one dispatcher, instead of a run planned and
dispatched for each (200 concurrent calls cost 200 runs' bookkeeping: ≈ 50 sends/s).

Each send keeps what it had alone:

* **Its key.** A delivery's dedupe key is `api|{Idempotency-Key}|{contact}` as before, so the same key and body
  answer the first send's result (`replayed`) and send nothing; the same key with another recipient or message is
  refused (409) — also when the key was used by a whole run (/send-message-all, or a send before this pooling).
  Two requests with one key in one group: the second waits for the next group, which finds the first.
* **Its result.** The answer describes that send alone (its counts, its status, `runKey` its key; `runId` the
  shared run), as soon as its delivery is settled — not when the whole group is.
* **The ledger's guarantees.** The run is an ordinary direct-send run (not counted by the frequency cap, any hour,
  unthrottled as a run of one was): claimed, sent and recorded by the `Dispatcher` like every other.

A group holds at most one send per contact (a run has one delivery per contact) and at most `sending.concurrency`
sends, so a slow gateway still has every send of a group in flight at once; the next group is planned while the
last one is being sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from dataclasses import dataclass, field

from engine.errors import NotFoundError, NotLoggedInError, WecastError
from engine.i18n import N_, Lazy, tr
from engine.messages import Message
from engine.plan import API_CAMPAIGN
from engine.runsettings import RunSettings
from engine.web.context import NOT_LOGGED_IN, WebContext
from engine.web.models import SendResult, SendResultItem
from storage import contacts as contacts_db
from storage import deliveries as deliveries_db
from storage import runs as runs_db
from storage.deliveries import DeliveryRow
from storage.models import OPEN_STATUSES, DeliveryStatus, RunStatus
from storage.runs import DirectSend, DirectSendsRecorded, EarlierSend, NewRun

log = logging.getLogger("wecast.web")

# Made in the pool's task, shown to each waiting request: translated when shown (Lazy), in that request's language.
NO_CONTACT = N_(
    "no contact with id {ids} (ids come from /get-all-user; after changes on the phone, re-sync with "
    "POST /api/v1/contacts/sync)"
)
KEY_REUSED = N_(
    "this Idempotency-Key was already used for a different send (other recipients or message); use a new key for "
    "a new message"
)


@dataclass(eq=False)
class _Ask:
    """One /send-message waiting for its group."""

    contact_id: str
    message: Message
    key: str
    planned: asyncio.Future[tuple[int, bool]]  # (run id, replayed)
    settled: asyncio.Future[DeliveryRow | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def same_as(self, earlier: EarlierSend) -> bool:
        whole = None if self.message.is_plain_text() else self.message.dumps()
        return earlier.deliveries == ((self.contact_id, self.message.text, whole),)


class DirectSends:
    """The pool of /send-message calls (see the module docstring); one per `WebContext`."""

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx
        self.queue: deque[_Ask] = deque()
        self.worker: asyncio.Task[None] | None = None
        self.watchers: set[asyncio.Task[None]] = set()

    async def send(self, contact_id: str, message: Message, idempotency_key: str | None) -> tuple[int, SendResult]:
        """Send `message` to one contact (pooled); wait up to `send_wait` for its result. Returns (HTTP status,
        body): 200 when the delivery is settled, 202 while it is still going out."""
        loop = asyncio.get_running_loop()
        key = idempotency_key.strip() if idempotency_key and idempotency_key.strip() else f"api-{uuid.uuid4().hex}"
        ask = _Ask(contact_id, message, key, loop.create_future())
        self.queue.append(ask)
        if self.worker is None or self.worker.done():
            self.worker = loop.create_task(self._work(), name="wecast-direct-sends")
        run_id, replayed = await asyncio.shield(ask.planned)
        if replayed:
            await self._wait_replayed(run_id)
            row = await self.ctx.db(_row_of, self.ctx, run_id, contact_id)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(ask.settled), self.ctx.send_wait)
            row = (
                ask.settled.result() if ask.settled.done() else await self.ctx.db(_row_of, self.ctx, run_id, contact_id)
            )
        body = _result(run_id, key, row, replayed=replayed)
        return (202 if body.pending else 200), body

    # -- grouping and planning ---------------------------------------------------------------------
    async def _work(self) -> None:
        """Plan the queued asks a group at a time, until the queue is empty."""
        size = max(1, self.ctx.app.settings.sending.concurrency)
        while self.queue:
            group: list[_Ask] = []
            later: list[_Ask] = []
            contacts: set[str] = set()
            keys: set[str] = set()
            while self.queue and len(group) < size:
                ask = self.queue.popleft()
                if ask.contact_id in contacts or ask.key in keys:
                    later.append(ask)  # one delivery per contact in a run; a repeated key finds the first next time
                    continue
                contacts.add(ask.contact_id)
                keys.add(ask.key)
                group.append(ask)
            self.queue.extendleft(reversed(later))
            try:
                await self._plan(group)
            except Exception as exc:  # the group's requests answer with it (the error boundary maps it)
                for ask in group:
                    if not ask.planned.done():
                        ask.planned.set_exception(exc)

    async def _plan(self, group: list[_Ask]) -> None:
        ctx, app = self.ctx, self.ctx.app
        logged_in = (await ctx.login_status()).logged_in
        if logged_in:
            await ctx.ensure_contacts()
        now = app.clock.now()
        run = NewRun(
            campaign_id=API_CAMPAIGN,
            run_key=f"pool-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}",
            trigger="api",
            timezone=app.settings.timezone,
            # Unthrottled, as each send was in a run of its own; a rate limit still slows the run down (the Pacer).
            settings=RunSettings(name=API_CAMPAIGN, timezone=app.settings.timezone).to_json(),
            created_at=now,
        )
        recorded, refused = await ctx.db(_record, ctx, run, group, logged_in)
        for ask in group:
            if ask in refused:
                ask.planned.set_exception(refused[ask])
            elif ask.key in recorded.earlier:
                earlier = recorded.earlier[ask.key]
                if ask.same_as(earlier):
                    ask.planned.set_result((earlier.run_id, True))
                else:
                    ask.planned.set_exception(WecastError(Lazy(KEY_REUSED)))
            else:
                assert recorded.run_id is not None
                ask.planned.set_result((recorded.run_id, False))
        if recorded.run_id is not None:
            mine = [a for a in group if a.planned.done() and not a.planned.exception() and not a.planned.result()[1]]
            self._dispatch(recorded.run_id, mine)

    # -- sending and settling ----------------------------------------------------------------------
    def _dispatch(self, run_id: int, asks: list[_Ask]) -> None:
        """Send the group's run; answer each ask as soon as its delivery is settled."""
        ctx = self.ctx
        written = asyncio.Event()
        task = ctx.workers.start(
            run_id,
            API_CAMPAIGN,
            lambda: ctx.app.dispatcher.run(run_id, login_wait=None, progress=lambda _counts: written.set()),
        )
        watcher = asyncio.get_running_loop().create_task(self._settle(run_id, asks, task, written))
        self.watchers.add(watcher)
        watcher.add_done_callback(self.watchers.discard)

    async def _settle(self, run_id: int, asks: list[_Ask], task: asyncio.Task[object], written: asyncio.Event) -> None:
        waiting = {a.contact_id: a for a in asks}
        try:
            while waiting:
                if not task.done():
                    wrote = asyncio.ensure_future(written.wait())
                    await asyncio.wait({task, wrote}, return_when=asyncio.FIRST_COMPLETED)
                    wrote.cancel()
                    written.clear()
                rows = await self.ctx.db(_rows_of, self.ctx, run_id, len(asks))
                for row in rows:
                    ask = waiting.get(row.contact_id)
                    if ask is not None and (row.status not in OPEN_STATUSES or task.done()):
                        del waiting[row.contact_id]
                        if not ask.settled.done():
                            ask.settled.set_result(row)
                if task.done():
                    break
        finally:
            for ask in waiting.values():  # nothing more to learn here: each asks for its own row
                if not ask.settled.done():
                    ask.settled.set_result(None)

    async def _wait_replayed(self, run_id: int) -> None:
        """A replay of a send still going out waits for it as the first call did (and resumes a run no process
        is sending: after a restart)."""
        ctx = self.ctx
        task = ctx.workers.task(run_id)
        if task is None and await ctx.db(run_open, ctx, run_id):
            task = ctx.dispatch(run_id, API_CAMPAIGN)
        if task is not None and not task.done():
            await asyncio.wait({asyncio.shield(task)}, timeout=ctx.send_wait)


def _record(
    ctx: WebContext, run: NewRun, group: list[_Ask], logged_in: bool
) -> tuple[DirectSendsRecorded, dict[_Ask, Exception]]:
    """The group's planning, off the loop, as a send alone was checked: a key used before answers with its first
    result; otherwise a logged-out account refuses (409), then an unknown contact id (404); the rest are planned
    in one transaction (`storage.runs.record_direct_sends`)."""
    db = ctx.app.db
    refused: dict[_Ask, Exception] = {}
    if not logged_in:
        earlier = runs_db.earlier_sends(db, API_CAMPAIGN, [a.key for a in group])
        for ask in group:
            if ask.key not in earlier:
                refused[ask] = NotLoggedInError(Lazy(NOT_LOGGED_IN))
        return DirectSendsRecorded(None, earlier), refused
    names = contacts_db.contact_names(db, [a.contact_id for a in group])
    unknown = [a for a in group if a.contact_id not in names]
    earlier = runs_db.earlier_sends(db, API_CAMPAIGN, [a.key for a in unknown]) if unknown else {}
    for ask in unknown:
        if ask.key not in earlier:
            refused[ask] = NotFoundError(Lazy(NO_CONTACT, ids=ask.contact_id))
    sends = [
        DirectSend(
            ask.key,
            ask.contact_id,
            names[ask.contact_id],
            ask.message.text,
            None if ask.message.is_plain_text() else ask.message.dumps(),
        )
        for ask in group
        if ask.contact_id in names
    ]
    recorded = runs_db.record_direct_sends(db, run, sends) if sends else DirectSendsRecorded(None, {})
    return DirectSendsRecorded(recorded.run_id, {**earlier, **recorded.earlier}), refused


def _rows_of(ctx: WebContext, run_id: int, limit: int) -> list[DeliveryRow]:
    return deliveries_db.list_deliveries(ctx.app.db, run_id=run_id, limit=limit)


def _row_of(ctx: WebContext, run_id: int, contact_id: str) -> DeliveryRow | None:
    rows = deliveries_db.list_deliveries(ctx.app.db, run_id=run_id, contact_id=contact_id, limit=1)
    return rows[0] if rows else None


def run_open(ctx: WebContext, run_id: int) -> bool:
    """Whether a run still has deliveries to send or to reconcile (and is sendable)."""
    if runs_db.run_status(ctx.app.db, run_id) is not RunStatus.RUNNING:
        return False
    counts = deliveries_db.status_counts(ctx.app.db, run_id)
    return any(counts.get(s, 0) for s in OPEN_STATUSES)


def send_summary(what: str, run_id: int, *, sent: int, failed: int, pending: int, skipped: int) -> str:
    """The `message` of a send's answer, in the request's language: what is still going out, what failed, what was
    left out (an opted-out customer, one over the frequency cap, a duplicate: each result says why) — "sent
    successfully" only when every recipient was sent to."""
    if pending:
        text = tr(
            "{sent} sent, {pending} still going out (see /api/v1/runs/{run})", sent=sent, pending=pending, run=run_id
        )
    elif failed:
        text = tr("{sent} sent, {failed} not sent (see results)", sent=sent, failed=failed)
    elif skipped:
        text = tr("{sent} sent, {skipped} left out (see results for why)", sent=sent, skipped=skipped)
    else:
        text = tr("sent successfully ({sent} sent)", sent=sent)
    return f"{what}: {text}"


def _result(run_id: int, key: str, row: DeliveryRow | None, *, replayed: bool) -> SendResult:
    """One send's outcome, in the shape of a run's (`engine.web.legacy.run_result`)."""
    status = row.status if row is not None else DeliveryStatus.PENDING
    pending = int(status in OPEN_STATUSES)
    sent = int(status is DeliveryStatus.SENT)
    failed = int(status in (DeliveryStatus.FAILED, DeliveryStatus.UNKNOWN))
    skipped = int(status is DeliveryStatus.SKIPPED)
    # Built in the waiting request (its language), in the same words as a run's result.
    message = send_summary("send-message", run_id, sent=sent, failed=failed, pending=pending, skipped=skipped)
    return SendResult(
        message=message,
        runId=run_id,
        runKey=key,
        status=RunStatus.RUNNING if pending else RunStatus.COMPLETED,
        sent=sent,
        failed=failed,
        pending=pending,
        counts={status: 1},
        results=[
            SendResultItem(
                id=row.contact_id,
                name=row.contact_name,
                status=row.status,
                reason=row.reason,
                messageId=row.gateway_message_id or None,
            )
        ]
        if row is not None
        else [],
        replayed=replayed,
    )

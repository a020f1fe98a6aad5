"""Dispatch: nothing twice, nothing lost, throttle, retries, caps, quiet hours, login loss, races."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import CAPPED, MONDAY_10, PLAIN, campaign, outbox_by_contact, run, started

from engine.audience import ExclusionCategory, ReasonCode
from engine.clock import FakeClock
from engine.dispatch import _RunSender
from engine.errors import PermanentError, WecastError
from engine.gateways.sandbox import SandboxGateway
from engine.plan import plan_run
from engine.service import Wecast
from engine.settings import Settings
from engine.views import split_reason
from storage import deliveries as deliveries_db
from storage.deliveries import claim, list_deliveries
from storage.models import DeliveryStatus, RunStatus
from storage.runs import get_run

MakeSettings = Callable[..., Settings]


def test_same_run_twice_sends_nothing_the_second_time(make_settings: MakeSettings) -> None:
    """Running the same campaign run again plans and sends nothing new; the outbox holds one message each."""
    settings = make_settings()

    async def go() -> None:
        app = await started(settings)
        c = campaign(settings, PLAIN)
        first = await app.run_campaign(c)
        second = await app.run_campaign(c)
        assert first.plan.created and not second.plan.created
        assert first.plan.run_id == second.plan.run_id
        assert first.summary is not None and first.summary.sent > 50
        per_contact = outbox_by_contact(app.gateway)
        assert sum(per_contact.values()) == first.summary.sent
        assert set(per_contact.values()) == {1}
        await app.close()

    run(go())


def test_manual_run_and_scheduled_fire_of_the_same_slot_are_one_run(make_settings: MakeSettings) -> None:
    """A manual run names itself after the current schedule slot, so the scheduler's fire of that slot adds nothing."""
    settings = make_settings()

    async def go() -> None:
        app = await started(settings)
        c = campaign(settings, PLAIN + 'schedule: {cron: "0 9 * * 1"}\n')
        manual = await app.run_campaign(c)
        assert manual.plan.run_key == "2026-01-05T01:00:00Z"  # Monday 09:00 Shanghai
        scheduled = await app.run_campaign(c, run_key="2026-01-05T01:00:00Z", trigger="schedule")
        assert not scheduled.plan.created
        assert set(outbox_by_contact(app.gateway).values()) == {1}
        await app.close()

    run(go())


def test_dedupe_once_and_window(make_settings: MakeSettings) -> None:
    """dedupe: once never repeats a contact across runs; a 7d window repeats only after 7 days."""
    settings = make_settings(contacts=40)
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        app = await started(settings, clock)
        once = campaign(settings, PLAIN + "dedupe: once\n", "once")
        r1 = await app.run_campaign(once, run_key="a")
        r2 = await app.run_campaign(once, run_key="b")
        assert r1.summary and r1.summary.sent > 10
        assert r2.summary and r2.summary.sent == 0
        skipped = list_deliveries(app.db, run_id=r2.summary.run_id, status=DeliveryStatus.SKIPPED, limit=1000)
        held = [d for d in skipped if d.reason.startswith("dedupe: already sent in run")]
        assert len(held) == r1.summary.sent  # recorded with the reason, not silently dropped
        preview = app.preview(once, run_key="c")
        assert preview.recipients == []
        assert all(e.category in ("dedupe", "exclusion") for e in preview.excluded)

        window = campaign(settings, PLAIN + "dedupe: 7d\n", "win")
        w1 = await app.run_campaign(window, run_key="w1")
        clock.advance(3 * 86400)
        w2 = await app.run_campaign(window, run_key="w2")
        clock.advance(5 * 86400)
        w3 = await app.run_campaign(window, run_key="w3")
        assert w1.summary and w2.summary and w3.summary
        assert w2.summary.sent == 0 and w2.summary.counts.get("skipped", 0) >= w1.summary.sent
        assert w3.summary.sent == w1.summary.sent
        await app.close()

    run(go())


def test_faults_every_delivery_ends_recorded_and_none_twice(make_settings: MakeSettings) -> None:
    """With transient errors, rate limits and timeouts injected, every delivery ends in a terminal state,
    sent ones are in the outbox exactly once, and unknown ones are never retried."""
    settings = make_settings(contacts=300, faults="{error_rate: 0.2, rate_limit_rate: 0.05, timeout_rate: 0.05}")

    async def go() -> None:
        app = await started(settings)
        outcome = await app.run_campaign(campaign(settings, PLAIN + "max_errors: 0\n"))
        s = outcome.summary
        assert s is not None and s.status == "completed"
        assert s.open == 0
        rows = list_deliveries(app.db, run_id=s.run_id, limit=10_000)
        per_contact = outbox_by_contact(app.gateway)
        assert max(per_contact.values()) == 1
        sent = {r.contact_id for r in rows if r.status == "sent"}
        unknown = {r.contact_id for r in rows if r.status == "unknown"}
        assert sent <= set(per_contact)  # every "sent" really arrived
        assert set(per_contact) <= sent | unknown  # nothing arrived unrecorded
        assert unknown, "the injected timeouts should produce unknown outcomes"
        assert all(r.reason for r in rows if r.status in ("failed", "unknown", "skipped"))
        assert any(r.attempts > 1 for r in rows if r.status == "sent"), "transient errors are retried"
        await app.close()

    run(go())


@pytest.mark.parametrize(
    "db_url", ["sqlite"], indirect=True
)  # timing on the fake clock; its database work is tested on PostgreSQL by its neighbours
def test_transient_errors_give_up_after_max_attempts(make_settings: MakeSettings) -> None:
    """A send that keeps failing transiently is retried with growing delays, then failed with the reason."""
    settings = make_settings(contacts=30, faults="{error_rate: 1.0}")
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        app = await started(settings, clock)
        s = (await app.run_campaign(campaign(settings, PLAIN + "max_errors: 0\n"))).summary
        assert s is not None and s.sent == 0 and s.counts["failed"] > 0
        rows = list_deliveries(app.db, run_id=s.run_id, status=DeliveryStatus.FAILED, limit=1000)
        assert all(r.attempts == 3 and r.reason.startswith("gave up after 3 attempts") for r in rows)
        # base 1s, doubling with jitter: the fake clock moved at least 0.5 + 1 seconds for the retries
        assert clock.now() - MONDAY_10 >= timedelta(seconds=1.5)
        await app.close()

    run(go())


@pytest.mark.parametrize(
    "db_url", ["sqlite"], indirect=True
)  # timing on the fake clock; its database work is tested on PostgreSQL by its neighbours
def test_throttle_spaces_sends_and_never_exceeds_the_rate(make_settings: MakeSettings) -> None:
    """At 4/s, sends start 0.25 s apart on the (fake) clock: the achieved rate equals the configured one."""
    settings = make_settings(contacts=60)
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        app = await started(settings, clock)
        starts: list[float] = []
        original = app.gateway.send_text

        async def timed(contact_id: str, text: str, *, idempotency_key: str) -> Any:
            starts.append(clock.monotonic())
            return await original(contact_id, text, idempotency_key=idempotency_key)

        app.gateway.send_text = timed  # type: ignore[method-assign]
        body = PLAIN.replace("per_second: 1000", "per_second: 4")
        s = (await app.run_campaign(campaign(settings, body))).summary
        assert s is not None and s.sent == len(starts) > 20
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert min(gaps) >= 0.25 - 1e-9
        achieved = (len(starts) - 1) / (starts[-1] - starts[0])
        assert 0.95 * 4 <= achieved <= 4.0 + 1e-9
        await app.close()

    run(go())


def test_frequency_cap_is_shared_across_campaigns_per_local_day(make_settings: MakeSettings) -> None:
    """With 1 marketing message per contact per day, a second campaign the same Shanghai day skips them all;
    the next local day it sends again."""
    settings = make_settings(contacts=40)
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        app = await started(settings, clock)
        capped = CAPPED
        a = (await app.run_campaign(campaign(settings, capped, "a"))).summary
        b_preview = app.preview(campaign(settings, capped, "b"))
        assert b_preview.recipients == []
        assert {e.category for e in b_preview.excluded} >= {"frequency_cap"}
        b = (await app.run_campaign(campaign(settings, capped, "b"))).summary
        assert a and b and a.sent > 10 and b.sent == 0
        # 15:59 UTC is 23:59 in Shanghai: still the same local day
        clock.set(datetime(2026, 1, 5, 15, 59, tzinfo=UTC))
        assert app.preview(campaign(settings, capped, "c")).recipients == []
        clock.set(datetime(2026, 1, 5, 16, 1, tzinfo=UTC))  # 00:01 Tuesday in Shanghai
        assert len(app.preview(campaign(settings, capped, "c")).recipients) == a.sent
        await app.close()

    run(go())


def test_frequency_cap_rechecked_at_send_time(make_settings: MakeSettings) -> None:
    """Two runs planned before either sent: the second one's deliveries are skipped at send time by the cap."""
    settings = make_settings(contacts=40)

    async def go() -> None:
        app = await started(settings)
        capped = CAPPED
        pa = app.plan(campaign(settings, capped, "a"))
        pb = app.plan(campaign(settings, capped, "b"))
        assert pa.planned == pb.planned > 10
        sa = await app.dispatcher.run(pa.run_id)
        sb = await app.dispatcher.run(pb.run_id)
        assert sa.sent == pa.planned and sb.sent == 0
        rows = list_deliveries(app.db, run_id=pb.run_id, limit=1000)
        codes = {r.id: split_reason(r.reason)[0] for r in rows}
        # Held back at planning (a coworker, not a friend): not part of what was planned to be sent.
        planned = [r for r in rows if ReasonCode(codes[r.id]).category is not ExclusionCategory.EXCLUSION]
        assert len(planned) == pb.planned
        assert all(r.status == "skipped" and codes[r.id] == ReasonCode.FREQUENCY_CAP for r in planned)
        assert set(outbox_by_contact(app.gateway).values()) == {1}
        await app.close()

    run(go())


@pytest.mark.parametrize(
    "db_url", ["sqlite"], indirect=True
)  # timing on the fake clock; its database work is tested on PostgreSQL by its neighbours
def test_quiet_hours_hold_sends_until_the_window_opens(make_settings: MakeSettings) -> None:
    """Planned at 22:00 Shanghai with quiet hours 21:00–09:00, nothing goes out before 09:00 local."""
    settings = make_settings(contacts=30)
    clock = FakeClock(datetime(2026, 1, 5, 14, 0, tzinfo=UTC))  # 22:00 Shanghai

    async def go() -> None:
        app = await started(settings, clock)
        body = PLAIN.replace("quiet_hours: false", 'quiet_hours: {start: "21:00", end: "09:00"}')
        c = campaign(settings, body)
        held = await app.run_campaign(c, quiet_wait_max=0)
        assert held.summary and held.summary.sent == 0 and held.summary.status == "running"
        assert "quiet hours" in held.summary.message
        assert app.gateway.outbox_messages() == []
        sent_at: list[datetime] = []
        original = app.gateway.send_text

        async def timed(contact_id: str, text: str, *, idempotency_key: str) -> Any:
            sent_at.append(clock.now())
            return await original(contact_id, text, idempotency_key=idempotency_key)

        app.gateway.send_text = timed  # type: ignore[method-assign]
        [done] = await app.resume()  # waits (on the fake clock) for the window to open
        assert done.status == "completed" and done.sent > 10
        assert min(sent_at) >= datetime(2026, 1, 6, 1, 0, tzinfo=UTC)  # 09:00 Tuesday Shanghai
        await app.close()

    run(go())


def test_logged_out_sends_wait_pending_then_go_out_after_login(make_settings: MakeSettings) -> None:
    """A run started while the account is logged out keeps its deliveries pending; after login they go out."""
    settings = make_settings(contacts=30)

    async def go() -> None:
        app = await started(settings)
        gw = app.gateway
        assert isinstance(gw, SandboxGateway)
        await gw.logout()
        waiting = await app.run_campaign(campaign(settings, PLAIN), login_wait=0)
        assert waiting.summary and waiting.summary.sent == 0 and waiting.summary.counts.get("pending", 0) > 10
        assert "not logged in" in waiting.summary.message
        assert (await gw.sandbox_login()).logged_in
        [done] = await app.resume(login_wait=0)
        assert done.status == "completed", (done.message, done.counts)
        assert done.sent == waiting.summary.counts["pending"]
        await app.close()

    run(go())


def test_logout_mid_run_requeues_without_counting_an_attempt(make_settings: MakeSettings) -> None:
    """When the account drops mid-run, the unsent deliveries go back to pending (no attempt used) and finish later."""
    settings = make_settings(contacts=60)

    async def go() -> None:
        app = await started(settings)
        gw = app.gateway
        assert isinstance(gw, SandboxGateway)
        original = gw.send_text
        calls = 0

        async def dropping(contact_id: str, text: str, *, idempotency_key: str) -> Any:
            nonlocal calls
            calls += 1
            if calls == 10:
                await gw.logout()
            return await original(contact_id, text, idempotency_key=idempotency_key)

        gw.send_text = dropping  # type: ignore[method-assign]
        first = (await app.run_campaign(campaign(settings, PLAIN), login_wait=0)).summary
        assert first is not None and 0 < first.sent < 20 and first.counts.get("pending", 0) > 0
        pending = list_deliveries(app.db, run_id=first.run_id, status=DeliveryStatus.PENDING, limit=1000)
        assert all(r.attempts == 0 for r in pending)
        assert (await gw.sandbox_login()).logged_in
        [done] = await app.resume(login_wait=0)
        assert done.status == "completed" and done.open == 0
        assert set(outbox_by_contact(gw).values()) == {1}
        await app.close()

    run(go())


def test_too_many_errors_pause_the_run(make_settings: MakeSettings) -> None:
    """After max_errors permanent failures the run pauses and the rest stay pending."""
    settings = make_settings(contacts=80)

    async def go() -> None:
        app = await started(settings)

        async def broken(contact_id: str, text: str, *, idempotency_key: str) -> Any:
            raise PermanentError("message rejected by WeCom (test)")

        app.gateway.send_text = broken  # type: ignore[method-assign]
        s = (await app.run_campaign(campaign(settings, PLAIN + "max_errors: 5\n"))).summary
        assert s is not None and s.status == "paused"
        # sends already in flight when the limit is reached still finish (and may fail)
        assert 5 <= s.counts["failed"] <= 5 + 2 * settings.sending.concurrency
        assert s.counts.get("pending", 0) > 30
        await app.close()

    run(go())


def test_planning_is_one_transaction_and_idempotent_under_races(make_settings: MakeSettings) -> None:
    """Several threads planning the same run at once create one run with one delivery per recipient."""
    settings = make_settings(contacts=100)

    async def setup() -> Wecast:
        return await started(settings)

    app = run(setup())
    c = campaign(settings, PLAIN)
    results: list[Any] = []
    errors: list[BaseException] = []

    def plan() -> None:
        try:
            results.append(plan_run(app.db, c, now=MONDAY_10, run_key="race"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=plan) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.run_id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    rows = list_deliveries(app.db, run_id=results[0].run_id, limit=10_000)
    contacts = [r.contact_id for r in rows]
    assert len(contacts) == len(set(contacts)) > 50
    run(app.close())


def test_claims_are_atomic_across_threads(make_settings: MakeSettings) -> None:
    """Concurrent claimers of one run never get the same delivery."""
    settings = make_settings(contacts=200)
    app = run(started(settings))
    p = app.plan(campaign(settings, PLAIN))
    got: list[list[int]] = []
    lock = threading.Lock()

    def claimer(token: str) -> None:
        mine: list[int] = []
        while True:
            rows = claim(app.db, p.run_id, token, 7, MONDAY_10)
            if not rows:
                break
            mine.extend(r.id for r in rows)
        with lock:
            got.append(mine)

    threads = [threading.Thread(target=claimer, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [i for ids in got for i in ids]
    assert len(flat) == len(set(flat)) == p.planned
    run(app.close())


def test_a_live_owner_blocks_a_second_dispatcher(make_settings: MakeSettings) -> None:
    """A run being sent by a live process cannot be taken over by another dispatcher."""
    settings = make_settings(contacts=30)

    async def go() -> None:
        app = await started(settings)
        p = app.plan(campaign(settings, PLAIN))
        import os
        import socket

        from storage.runs import take_over

        # Another dispatcher of this very (live) process owns it, with a fresh heartbeat.
        other = f"{socket.gethostname()}:{os.getpid()}:other"
        assert take_over(app.db, p.run_id, expected_owner="", owner=other, now=datetime.now(UTC), resend_in_flight=True)
        with pytest.raises(WecastError, match="being sent by another process"):
            await app.dispatcher.run(p.run_id)
        await app.close()

    run(go())


def test_refused_credentials_pause_the_run_and_fail_nobody(make_settings: MakeSettings) -> None:
    """When the gateway refuses the credentials, the run pauses with the reason at the first refusal: no delivery
    is failed or loses an attempt, and after the fix `resume` sends them all."""
    from engine.errors import AuthError

    settings = make_settings(contacts=60)

    async def go() -> None:
        app = await started(settings)
        original = app.gateway.send_text
        refused = True
        calls = 0

        async def token_check(contact_id: str, text: str, *, idempotency_key: str) -> Any:
            nonlocal calls
            calls += 1
            if refused:
                raise AuthError("the WorkPro puppet rejected the token (UNAUTHENTICATED): check workpro.token")
            return await original(contact_id, text, idempotency_key=idempotency_key)

        app.gateway.send_text = token_check  # type: ignore[method-assign]
        s = (await app.run_campaign(campaign(settings, PLAIN + "max_errors: 5\n"))).summary
        assert s is not None and s.status == "paused" and "rejected the token" in s.message
        assert calls <= settings.sending.concurrency  # only sends already in flight were tried
        assert not s.counts.get("failed") and not s.counts.get("unknown")
        pending = list_deliveries(app.db, run_id=s.run_id, status=DeliveryStatus.PENDING, limit=1000)
        run_row = get_run(app.db, s.run_id)
        assert run_row is not None and "rejected the token" in run_row.error
        assert len(pending) == s.counts["pending"] > 30 and all(r.attempts == 0 for r in pending)
        refused = False
        app.reopen_run(s.run_id)
        [done] = await app.resume(s.run_id)
        assert done.status == "completed" and done.sent == len(pending)
        await app.close()

    run(go())


@pytest.mark.parametrize(
    "db_url", ["sqlite"], indirect=True
)  # timing on the fake clock; its database work is tested on PostgreSQL by its neighbours
def test_retry_delays_come_from_the_injected_random_source(make_settings: MakeSettings) -> None:
    """Two dispatchers given equally seeded random sources schedule the same retry times (no global random)."""
    import random

    from engine.dispatch import Dispatcher

    settings = make_settings(contacts=20, faults="{error_rate: 1.0}")

    async def retry_times(run_key: str) -> list[Any]:
        app = await started(settings)
        app.dispatcher = Dispatcher(app.db, app.gateway, settings, clock=app.clock, rng=random.Random(42))
        plan = app.plan(campaign(settings, PLAIN + "max_errors: 0\n"), run_key=run_key)
        await app.dispatcher.run(plan.run_id)
        rows = list_deliveries(app.db, run_id=plan.run_id, status=DeliveryStatus.FAILED, limit=1000)
        await app.close()
        return sorted((r.contact_id, r.next_attempt_at) for r in rows)

    first, second = run(retry_times("a")), run(retry_times("b"))
    assert first and all(at is not None for _, at in first)
    assert first == second


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_locked_database_stalls_only_the_run_not_the_event_loop(make_settings: MakeSettings) -> None:
    """While another connection holds SQLite's write lock for a second (a big plan being recorded), the
    dispatcher's writes wait in a worker thread: other coroutines keep running every few milliseconds, and the
    run completes once the lock is released."""
    import sqlite3
    import time

    settings = make_settings(contacts=60)

    async def go() -> None:
        app = await started(settings)
        plan = app.plan(campaign(settings, PLAIN))
        path = settings.database_url.removeprefix("sqlite:///")
        holder = sqlite3.connect(path, timeout=30)
        holder.execute("BEGIN IMMEDIATE")  # the write lock, as a long plan's transaction holds it
        lags: list[float] = []

        async def probe() -> None:
            while True:
                before = time.monotonic()
                await asyncio.sleep(0.01)
                lags.append(time.monotonic() - before)

        watch = asyncio.ensure_future(probe())
        dispatch = asyncio.ensure_future(app.dispatcher.run(plan.run_id))
        await asyncio.sleep(1.0)
        assert not dispatch.done()
        turns_while_locked = len(lags)
        holder.rollback()
        holder.close()
        summary = await dispatch
        watch.cancel()
        assert summary.status is RunStatus.COMPLETED and summary.sent == plan.planned
        # A loop blocked by the lock would turn about once in that second; a free one about 100 times. Counted
        # turns, not the longest gap: on a loaded machine the whole process may wait a second for a core.
        assert turns_while_locked >= 10, f"the event loop turned {turns_while_locked} times in the locked second"
        await app.close()

    run(go())


@pytest.mark.parametrize("write", ["claim", "mark"])
def test_a_dispatch_cancelled_while_a_write_commits_leaves_nothing_claimed_or_sending(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch, write: str
) -> None:
    """The CLI's Ctrl-C and SIGTERM cancel a run's dispatch. Cancelled while its claim, or its `sending` marks, are
    being committed in a worker thread, the run's cleanup comes after the write, never before: nothing is left
    claimed or `sending` (which a resume on a gateway without idempotency keys must record `unknown`, unsent); the
    rows marked go out and are recorded; the resume sends everyone else once, with no unknowns."""
    settings = make_settings(contacts=60, idempotent=False)
    entered, left = threading.Event(), threading.Event()

    def slowly(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if entered.is_set():
                return original(*args, **kwargs)
            entered.set()
            time.sleep(0.3)  # the cancellation lands while this write runs
            try:
                return original(*args, **kwargs)
            finally:
                left.set()

        return call

    if write == "claim":
        monkeypatch.setattr(deliveries_db, "claim", slowly(deliveries_db.claim))
    else:
        monkeypatch.setattr(_RunSender, "_prepare_jobs", slowly(_RunSender._prepare_jobs))

    async def go() -> None:
        app = await started(settings)
        plan = app.plan(campaign(settings, PLAIN))
        task = asyncio.ensure_future(app.dispatcher.run(plan.run_id))
        while not entered.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(left.wait, 5)  # the write has committed, whenever the cleanup ran
        stopped = Counter(d.status for d in list_deliveries(app.db, run_id=plan.run_id, limit=1000))
        assert not stopped[DeliveryStatus.CLAIMED] and not stopped[DeliveryStatus.SENDING], stopped
        assert stopped[DeliveryStatus.SENT] == sum(outbox_by_contact(app.gateway).values())
        assert stopped[DeliveryStatus.SENT] == (8 if write == "mark" else 0)  # the chunk marked went out
        done = await app.dispatcher.run(plan.run_id)
        assert done.status is RunStatus.COMPLETED and not done.counts.get(DeliveryStatus.UNKNOWN), done.counts
        received = outbox_by_contact(app.gateway)
        assert set(received.values()) == {1} and sum(received.values()) == done.counts[DeliveryStatus.SENT]
        await app.close()

    run(go())

"""The wecom gateway on a bad day, against the fake WeCom server on loopback (real HTTP): HTTP 429 and 5xx with
Retry-After (seconds or an HTTP-date) waited out within a cap, a run whose retries run out ending with every
delivery recorded, and faults injected mid-run."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from helpers import MONDAY_10, campaign

from engine.clock import FakeClock
from engine.errors import RateLimitedError, TransientError, UnknownOutcomeError
from engine.gateways.wecom.client import MAX_RETRY_AFTER, retry_after
from engine.gateways.wecom.fake_server import FakeWecom, FakeWecomServer
from engine.gateways.wecom.gateway import WecomGateway
from engine.service import Wecast
from storage.deliveries import list_deliveries, status_counts
from storage.models import OPEN_STATUSES, DeliveryStatus

try:
    from wecom_harness import running, started, wecom_config
except ImportError:  # pragma: no cover
    from tests.wecom_harness import running, started, wecom_config

pytestmark = pytest.mark.anyio
FOLLOW = "externalcontact/get_follow_user_list"
TEMPLATE = "externalcontact/add_msg_template"
PLAIN = "message: {template: '本周六会员日，全场八折，欢迎到店！'}\nfrequency_cap: false\nquiet_hours: false\n"
CAPPED = {"rate_limit_wait": "30s", "retry_delay": "0.5s", "max_retries": 3}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_retry_after_reads_seconds_and_http_dates() -> None:
    """Retry-After is seconds or an HTTP-date (in GMT), never negative; anything else is no hint."""
    now = MONDAY_10
    assert retry_after("7", now) == 7.0
    assert retry_after(format_datetime(now + timedelta(seconds=42), usegmt=True), now) == 42.0
    assert retry_after(format_datetime(now - timedelta(minutes=5), usegmt=True), now) == 0.0
    assert retry_after("Mon, 05 Jan 2026 02:00:09 GMT", now) == 9.0
    for nothing in (None, "", "  ", "soon", "-3", "1.5e9x"):
        assert retry_after(nothing, now) is None


@pytest.mark.parametrize(
    ("status", "header", "waited"),
    [
        (429, "7", [7.0, 7.0]),
        (503, "12", [12.0, 12.0]),
        (502, "date+5", [5.0, None]),  # the date is past at the second retry: a backoff
        (504, None, [None, None]),
        (429, None, [None, None]),
    ],
)
async def test_429_and_5xx_are_retried_after_their_retry_after(
    tmp_path: Path, status: int, header: str | None, waited: list[float | None]
) -> None:
    """HTTP 429 and 5xx on a read: waited out (at least what Retry-After asked, seconds or an HTTP-date; without one,
    a backoff from retry_delay), retried, and the answer is the real one."""
    clock = FakeClock(MONDAY_10)
    async with running(tmp_path, clock=clock, settings=CAPPED) as r:
        if header == "date+5":
            header = format_datetime(clock.now() + timedelta(seconds=5), usegmt=True)
        r.fake.fault(FOLLOW, status=status, retry_after=header, count=2)
        clock.slept.clear()
        assert (await r.gateway.client.get(FOLLOW))["follow_user"] == r.fake.staff
        assert r.fake.faulted[FOLLOW] == 2
        assert len(clock.slept) == 2
        for slept, asked in zip(clock.slept, waited, strict=True):
            if asked is not None:
                assert slept == pytest.approx(asked, abs=1.0)
            else:
                assert 0.25 <= slept <= 2.0  # equal-jitter backoff from 0.5 s, doubling


async def test_a_retry_after_beyond_the_cap_is_waited_only_to_the_cap(tmp_path: Path) -> None:
    """A Retry-After of a day: each retry waits rate_limit_wait (the cap), never longer; when the retries run out the
    RateLimitedError asks the dispatcher to wait MAX_RETRY_AFTER, not a day."""
    clock = FakeClock(MONDAY_10)
    async with running(tmp_path, clock=clock, settings=CAPPED) as r:
        r.fake.fault(FOLLOW, status=429, retry_after="86400", count=10)
        clock.slept.clear()
        with pytest.raises(RateLimitedError) as limited:
            await r.gateway.client.get(FOLLOW)
        assert clock.slept == [30.0, 30.0, 30.0]
        assert r.fake.faulted[FOLLOW] == 4  # the call and max_retries retries
        assert limited.value.retry_after == MAX_RETRY_AFTER
        assert "HTTP 429" in str(limited.value)


async def test_5xx_without_retry_after_backs_off_and_stays_transient(tmp_path: Path) -> None:
    """A 502 storm longer than the retries: the waits double (jittered) up to the cap, and the error is a plain
    TransientError (the dispatcher backs off on its own), not a RateLimitedError."""
    clock = FakeClock(MONDAY_10)
    settings = {"rate_limit_wait": "3s", "retry_delay": "1s", "max_retries": 5}
    async with running(tmp_path, clock=clock, settings=settings) as r:
        r.fake.fault(FOLLOW, status=502, count=10)
        clock.slept.clear()
        with pytest.raises(TransientError) as failed:
            await r.gateway.client.get(FOLLOW)
        assert not isinstance(failed.value, RateLimitedError)
        assert len(clock.slept) == 5
        assert all(w <= 3.0 for w in clock.slept)
        assert clock.slept[0] <= 1.0 and clock.slept[-1] >= 1.5  # 0.5-1, 1-2, then 1.5-3 (capped)


async def test_a_429_to_a_write_is_retried_and_a_503_is_unknown(tmp_path: Path) -> None:
    """add_msg_template refused with 429 was not done: retried, one task. A 503 to it may have been done (a proxy
    cannot say): UnknownOutcomeError, not repeated."""
    clock = FakeClock(MONDAY_10)
    async with running(tmp_path, clock=clock, settings=CAPPED) as r:
        userid, ext = next(iter(r.fake.follows))
        task = {"sender": userid, "external_userid": [ext], "text": {"content": "hi"}}
        r.fake.fault(TEMPLATE, status=429, retry_after="2", count=2)
        answer = await r.gateway.client.post(TEMPLATE, task, idempotent=False)
        assert answer["msgid"] in r.fake.tasks and len(r.fake.tasks) == 1
        r.fake.fault(TEMPLATE, status=503, retry_after="2")
        with pytest.raises(UnknownOutcomeError):
            await r.gateway.client.post(TEMPLATE, task, idempotent=False)
        assert r.fake.calls[TEMPLATE] == 4  # 429, 429, ok, 503: the 503 was not repeated


@pytest.mark.parametrize(
    ("header", "refusals", "completed", "calls_per_attempt"),
    [("2", 5, True, 2), ("2", 40, False, 2), ("120", 2, True, 1), ("120", 40, False, 1)],
)
def test_a_run_through_429s_ends_with_every_delivery_recorded(
    tmp_path: Path, db_url: str, header: str, refusals: int, completed: bool, calls_per_attempt: int
) -> None:
    """add_msg_template answers HTTP 429 again and again. A short Retry-After (2 s) is waited out inside the send
    (one retry); a long one (120 s, past what a send may wait inside the gateway) goes to the dispatcher at once, as
    the delivery's next attempt time. Outlasting the retries but not the dispatcher's attempts, the run completes
    with one task per staff member (each customer receives the message once); outlasting both, every delivery ends
    failed with the reason (gave up, HTTP 429) — none left pending or sending, no task created."""
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        fake = FakeWecom(customers=40, staff=2, shared_every=0, clock=clock)
        server = FakeWecomServer(fake)
        url = await server.start()
        extra = "  max_retries: 1\n"
        settings = wecom_config(tmp_path, db_url, fake, url, extra, attempts=3)
        app = await started(settings, clock)
        try:
            await app.sync()
            fake.fault(TEMPLATE, status=429, retry_after=header, count=refusals)
            outcome = await app.run_campaign(campaign(app.settings, "audience: {}\n" + PLAIN), confirm_wait=0)
            assert outcome.summary is not None
            run_id = outcome.summary.run_id
            deliveries = list_deliveries(app.db, run_id=run_id, limit=100)
            assert len(deliveries) == 40
            if completed:
                fake.confirm()
                [done] = await app.resume(run_id, confirm_wait=0)
                assert done.status == "completed"
                assert len(fake.tasks) == 2
                received = Counter(m.contact_id for m in fake.received)
                assert max(received.values()) == 1
                assert done.counts[DeliveryStatus.SENT] == len(received)
                assert not any(done.counts.get(s, 0) for s in OPEN_STATUSES)
            else:
                assert fake.tasks == {}
                assert {d.status for d in deliveries} == {DeliveryStatus.FAILED}
                assert all("gave up after 3 attempts" in d.reason and "HTTP 429" in d.reason for d in deliveries)
                assert fake.calls[TEMPLATE] == 2 * 3 * calls_per_attempt  # 2 staff x 3 attempts x (the call, a retry)
        finally:
            await app.close()
            await server.stop()

    asyncio.run(go())


def test_a_45009_block_longer_than_send_timeout_is_rescheduled_not_unknown(tmp_path: Path, db_url: str) -> None:
    """On the real clock: add_msg_template answers 45009 twice, and waiting the block out inside the call
    (rate_limit_wait 1.5 s, three retries) would outlast the dispatcher's send_timeout (1 s), which records a call
    it timed out as unknown (it may have been sent). The gateway hands the refusal to the dispatcher instead (nothing
    was created): the deliveries are rescheduled, the run submits one task per staff member, none is unknown."""

    async def go() -> None:
        fake = FakeWecom(customers=30, staff=2, shared_every=0)
        server = FakeWecomServer(fake)
        url = await server.start()
        extra = "  max_retries: 3\n"
        settings = wecom_config(tmp_path, db_url, fake, url, extra, send_timeout="1s")
        settings = settings.model_copy(
            update={"wecom": settings.wecom.model_copy(update={"rate_limit_wait": timedelta(seconds=1.5)})}
        )
        gateway = WecomGateway(settings.wecom)
        gateway.send_wait_budget = 0.5  # scaled down with send_timeout (5 s of 30 s by default)
        app = Wecast(settings, gateway=gateway)
        await app.start()
        try:
            await app.sync()
            fake.storm(TEMPLATE, 45009, 2)
            outcome = await app.run_campaign(campaign(app.settings, "audience: {}\n" + PLAIN), confirm_wait=0)
            assert outcome.summary is not None
            counts = status_counts(app.db, outcome.summary.run_id)
            assert counts.get(DeliveryStatus.UNKNOWN, 0) == 0, counts
            assert counts[DeliveryStatus.SUBMITTED] == 30
            assert len(fake.tasks) == 2 and fake.errors[(TEMPLATE, 45009)] == 2
        finally:
            await app.close()
            await server.stop()

    asyncio.run(go())

"""The WeCom client against the fake server on loopback: the access token (cached, refreshed once when it expires,
fatal when the credentials are refused), errcode retries (45009, 45033, -1), answers lost after the request took
effect, the limiter under the server's window, and secrets kept out of logs and errors."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from engine.clock import FakeClock
from engine.errors import AuthError, RateLimitedError, TransientError, UnknownOutcomeError
from engine.gateways.wecom.fake_server import FakeWecom, FakeWecomServer
from engine.gateways.wecom.gateway import WecomGateway

try:
    from wecom_harness import running, wecom_settings
except ImportError:  # pragma: no cover
    from tests.wecom_harness import running, wecom_settings

pytestmark = pytest.mark.anyio
FOLLOW = "externalcontact/get_follow_user_list"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_the_token_is_fetched_once_and_reused(tmp_path: Path) -> None:
    """Thirty calls share one access token: gettoken is called once."""
    async with running(tmp_path) as r:
        for _ in range(30):
            await r.gateway.client.get(FOLLOW)
        assert r.fake.calls["gettoken"] == 1
        assert r.fake.calls[FOLLOW] == 30


@pytest.mark.parametrize("expired_errcode", [42001, 40014, 40001])
async def test_a_token_that_expires_mid_run_is_refreshed_once(tmp_path: Path, expired_errcode: int) -> None:
    """WeCom drops the token early (42001, 40014 as some do, 40001 as when the token's credential no longer holds):
    twenty calls in flight at once each retry once, and exactly one new token is fetched for all of them."""
    async with running(tmp_path, expired_errcode=expired_errcode) as r:
        await r.gateway.client.get(FOLLOW)
        r.fake.expire_tokens()
        answers = await asyncio.gather(*(r.gateway.client.get(FOLLOW) for _ in range(20)))
        assert all(a["follow_user"] == r.fake.staff for a in answers)
        assert r.fake.calls["gettoken"] == 2
        assert r.fake.tokens_issued == 2
        assert r.fake.errors[(FOLLOW, expired_errcode)] == 20
        assert r.fake.calls[FOLLOW] == 1 + 20 + 20


async def test_a_refused_secret_is_fatal_and_never_retried(tmp_path: Path) -> None:
    """40001 on gettoken: an AuthError naming the setting (not the value), the gateway logged out, and later calls
    fail the same way without asking WeCom again (repeated secret errors get the IP blocked)."""
    fake = FakeWecom(customers=5, staff=1)
    server = FakeWecomServer(fake)
    url = await server.start()
    wrong = "wrong-secret-VALUE-42"
    gateway = WecomGateway(wecom_settings(fake, url, tmp_path / "w.sqlite", secret=wrong))
    try:
        await gateway.start()
        status = await gateway.login_status()
        assert not status.logged_in
        assert "wecom.secret" in status.message and wrong not in status.message
        for _ in range(3):
            with pytest.raises(AuthError) as refused:
                await gateway.client.get(FOLLOW)
            assert wrong not in str(refused.value)
        assert fake.calls["gettoken"] == 1
    finally:
        await gateway.close()
        await server.stop()


async def test_a_wrong_corp_id_is_fatal(tmp_path: Path) -> None:
    """40013 on gettoken is an AuthError about wecom.corp_id."""
    fake = FakeWecom(customers=5, staff=1)
    server = FakeWecomServer(fake)
    url = await server.start()
    gateway = WecomGateway(wecom_settings(fake, url, tmp_path / "w.sqlite", corp_id="wwsomeoneelse"))
    try:
        with pytest.raises(AuthError, match="corp_id"):
            await gateway.client.token()
    finally:
        await gateway.close()
        await server.stop()


async def test_a_short_45009_storm_is_waited_out(tmp_path: Path) -> None:
    """Three 45009 answers in a row: the call waits the block out each time and then succeeds."""
    async with running(tmp_path) as r:
        r.fake.storm(FOLLOW, 45009, 3)
        assert (await r.gateway.client.get(FOLLOW))["follow_user"] == r.fake.staff
        assert r.fake.errors[(FOLLOW, 45009)] == 3


async def test_a_long_45009_storm_raises_rate_limited(tmp_path: Path) -> None:
    """More 45009 answers than max_retries: RateLimitedError with the configured wait, for the dispatcher to slow
    down and retry later."""
    async with running(tmp_path, settings={"max_retries": 2, "rate_limit_wait": "0.02s"}) as r:
        r.fake.storm(FOLLOW, 45009, 10)
        with pytest.raises(RateLimitedError) as limited:
            await r.gateway.client.get(FOLLOW)
        assert limited.value.retry_after == pytest.approx(0.02)
        assert r.fake.errors[(FOLLOW, 45009)] == 3


async def test_system_busy_is_retried(tmp_path: Path) -> None:
    """-1 (system busy) is retried with backoff."""
    async with running(tmp_path) as r:
        r.fake.storm(FOLLOW, -1, 2)
        assert (await r.gateway.client.get(FOLLOW))["follow_user"] == r.fake.staff


async def test_a_lost_answer_is_unknown_for_writes_and_retried_for_reads(tmp_path: Path) -> None:
    """An HTTP 502 after the call took effect: a read is repeated; a write that must not be repeated raises
    UnknownOutcomeError (it may have taken effect)."""
    async with running(tmp_path) as r:
        r.fake.fail_after_processing(FOLLOW)
        assert (await r.gateway.client.get(FOLLOW))["follow_user"] == r.fake.staff
        userid, ext = next(iter(r.fake.follows))
        task = {"sender": userid, "external_userid": [ext], "text": {"content": "hi"}}
        r.fake.fail_after_processing("externalcontact/add_msg_template")
        with pytest.raises(UnknownOutcomeError):
            await r.gateway.client.post("externalcontact/add_msg_template", task, idempotent=False)
        assert len(r.fake.tasks) == 1  # it did take effect, once


async def test_an_unreachable_server_is_transient(tmp_path: Path) -> None:
    """Nothing listening: TransientError after the retries (the request never left, so it is safe to retry)."""
    async with running(tmp_path, settings={"max_retries": 1}) as r:
        await r.server.stop()
        with pytest.raises(TransientError):
            await r.gateway.client.get(FOLLOW)


async def test_too_many_concurrent_calls_are_retried(tmp_path: Path) -> None:
    """45033 (too concurrent) when the server allows fewer parallel calls than we make: retried, all succeed."""
    async with running(tmp_path, concurrency=2, latency=0.02) as r:
        answers = await asyncio.gather(*(r.gateway.client.get(FOLLOW) for _ in range(5)))
        assert len(answers) == 5
        assert r.fake.max_concurrent[FOLLOW] >= 3  # the fake did see more than it allows, and refused them


@pytest.mark.parametrize(("per_minute", "refused"), [(30, False), (1000, True)])
async def test_the_limiter_keeps_a_sync_under_the_window(tmp_path: Path, per_minute: int, refused: bool) -> None:
    """A sync needing 60 get_by_user pages against a server allowing 30 a minute: with the limiter set to the
    documented limit WeCom never refuses a call and never sees more than 30 within a minute; set too high (the
    control), the server refuses calls with 45009."""
    clock = FakeClock()
    api = "externalcontact/batch/get_by_user"
    options = {"per_window": 30, "window": 60.0, "customers": 6000, "staff": 4, "shared_every": 0}
    settings = {"limits": {"per_minute": per_minute, "per_hour": 100_000}, "max_retries": 20, "rate_limit_wait": "60s"}
    async with running(tmp_path, clock=clock, settings=settings, **options) as r:
        contacts = 0
        cursor: str | None = None
        while True:
            page = await r.gateway.list_contacts(cursor, 1000)
            contacts += len(page.contacts)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert contacts == 6000
        assert r.fake.calls[api] - r.fake.errors[(api, 45009)] == 60
        assert (r.fake.over_limit[api] > 0) is refused
        if not refused:
            assert r.fake.max_in_window[api] <= 30


async def test_secrets_never_reach_logs_or_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With every logger at DEBUG (httpx's request lines included), a session with a token refresh, retries and
    errors logs neither the corp id, the secret nor the access token, and no raised error contains them."""
    caplog.set_level(logging.DEBUG)
    async with running(tmp_path) as r:
        token = await r.gateway.client.token()
        r.fake.expire_tokens()
        r.fake.storm(FOLLOW, 45009, 1)
        await r.gateway.client.get(FOLLOW)
        new_token = await r.gateway.client.token()
        messages = []
        try:
            await r.gateway.client.post("externalcontact/mark_tag", {})
        except Exception as exc:
            messages.append(str(exc))
        r.fake.fail_after_processing("externalcontact/add_msg_template")
        try:
            await r.gateway.client.post("externalcontact/add_msg_template", {"sender": "x"}, idempotent=False)
        except Exception as exc:
            messages.append(str(exc))
        secrets = [r.fake.corp_id, r.fake.secret, token, new_token]
    logged = [rec.getMessage() for rec in caplog.records]
    assert any("HTTP Request" in line for line in logged)  # httpx did log its requests, masked
    for secret in secrets:
        assert all(secret not in line for line in logged), secret
        assert all(secret not in m for m in messages)

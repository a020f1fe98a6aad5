"""The access token on a bad day, against the fake WeCom server on loopback (real HTTP): expiring in the middle of a
sync, a secret reset while a run is going, two processes sharing the state file through expiries, and the corp
secret, corp id and tokens kept out of every log line, error message, repr and traceback of the failing paths."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from engine.errors import AuthError, GatewayError
from engine.gateways.wecom.fake_server import FakeWecom

try:
    from wecom_harness import FakeWecomThread, running
except ImportError:  # pragma: no cover
    from tests.wecom_harness import FakeWecomThread, running

pytestmark = pytest.mark.anyio
FOLLOW = "externalcontact/get_follow_user_list"
BATCH = "externalcontact/batch/get_by_user"
TEMPLATE = "externalcontact/add_msg_template"
RUNNER = Path(__file__).parent / "wecom_token_runner.py"
JSON = dict[str, Any]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def whole_sync(gateway: Any) -> int:
    seen, cursor = 0, None
    while True:
        page = await gateway.list_contacts(cursor, 100)
        seen += len(page.contacts)
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor


@pytest.mark.parametrize("expired_errcode", [42001, 40014, 40001])
async def test_a_token_dropped_mid_sync_is_refreshed_once_and_the_sync_goes_on(
    tmp_path: Path, expired_errcode: int
) -> None:
    """WeCom drops the token right after page 2 of batch/get_by_user: page 3 is refused, one new token is fetched,
    page 3 asked again, and the sync lists every customer."""
    async with running(tmp_path, customers=250, staff=3, expired_errcode=expired_errcode) as r:

        def expire_after(answer: JSON) -> JSON:
            r.fake.expire_tokens()
            return answer

        r.fake.fault(BATCH, skip=1, mutate=expire_after)
        assert await whole_sync(r.gateway) == 250
        assert r.fake.calls["gettoken"] == 2 and r.fake.tokens_issued == 2
        assert r.fake.errors[(BATCH, expired_errcode)] == 1


@pytest.mark.parametrize(
    ("change", "logged_in"),
    [
        ({"access_token": 12345}, False),
        ({"access_token": ""}, False),
        ({"access_token": None}, False),
        ({"expires_in": "soon"}, True),
        ({"expires_in": None}, True),
        ({"expires_in": "7200"}, True),
    ],
)
async def test_a_gettoken_answer_of_the_wrong_types(tmp_path: Path, change: JSON, logged_in: bool) -> None:
    """gettoken answering ok with an access_token that is not text (or none) is an error naming it — the gateway
    stays logged out, saying why, no traceback; an expires_in that is not a number is taken as WeCom's usual 7200 s
    (a token dropped sooner is refreshed when refused)."""
    async with running(tmp_path) as r:
        r.fake.fault("gettoken", count=20, mutate=lambda a: {**a, **change})
        status = await r.gateway.start_login()
        assert status.logged_in is logged_in, status.message
        if not logged_in:
            assert "gettoken answered ok, but" in status.message and "access_token" in status.message
        else:
            r.fake.clear_faults()
            assert (await r.gateway.client.get(FOLLOW))["follow_user"] == r.fake.staff


async def test_a_secret_reset_mid_run_stops_after_one_gettoken(tmp_path: Path) -> None:
    """The app's secret is reset in the admin console while ten calls are in flight: their token is refused
    (40001), one gettoken is tried with the old secret and refused (40001), every call raises an AuthError naming
    wecom.secret, and later calls raise it without asking WeCom again (repeated secret errors block the IP)."""
    async with running(tmp_path, expired_errcode=40001) as r:
        await r.gateway.client.get(FOLLOW)
        r.fake.secret = "reset-in-the-admin-console"
        r.fake.expire_tokens()
        answers = await asyncio.gather(*(r.gateway.client.get(FOLLOW) for _ in range(10)), return_exceptions=True)
        assert all(isinstance(a, AuthError) and "wecom.secret" in str(a) for a in answers), answers
        assert r.fake.calls["gettoken"] == 2
        with pytest.raises(AuthError):
            await r.gateway.client.get(FOLLOW)
        assert r.fake.calls["gettoken"] == 2 and r.fake.calls[FOLLOW] == 11


def test_two_processes_sharing_the_state_file_ride_out_expiries(tmp_path: Path) -> None:
    """Two wecast processes sync over and over, sharing one state file, while WeCom drops every token every 0.15 s:
    both list every customer in every round, neither fails, and each fetches a token only when its own was refused
    (at most once per expiry, plus its first)."""
    fake = FakeWecom(customers=300, staff=3)
    rounds = 25
    far = FakeWecomThread(fake)
    with far as url:
        env = {"WECAST_WECOM_CORP_ID": fake.corp_id, "WECAST_WECOM_SECRET": fake.secret, "PATH": "/usr/bin:/bin"}
        procs = [
            subprocess.Popen(
                [sys.executable, str(RUNNER), url, str(tmp_path / "wecom.sqlite"), str(rounds)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**env, "PYTHONPATH": str(Path(__file__).parent.parent)},
            )
            for _ in range(2)
        ]
        expiries = 0
        deadline = time.monotonic() + 120
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.15)
            far.call(fake.expire_tokens)
            expiries += 1
        outputs = [p.communicate(timeout=30) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()[-2000:]
        result = json.loads(out.decode().strip().splitlines()[-1])
        assert result["listed"] == [300] * rounds
        assert 1 <= result["gettoken"] <= expiries + 1
        assert fake.secret not in err.decode()
    assert fake.tokens_issued <= expiries + 1
    assert fake.errors[(BATCH, 42001)] + fake.errors[(FOLLOW, 42001)] >= 1  # tokens were dropped under them


async def test_secrets_stay_out_of_every_failing_path(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With every logger at DEBUG: a refused secret, a token refused twice, a secret reset mid-run, a proxy's page
    quoting the gettoken URL (corpid and corpsecret in it), a 429 storm, a 502 after a write, an answer without its
    list and a server gone. No log line, and no raised error's str, repr or formatted traceback, holds the corp id,
    the secret or any access token; nor do the gateway's, the client's or the settings' reprs."""
    caplog.set_level(logging.DEBUG)
    failures: list[BaseException] = []

    async def fails(call: Any) -> None:
        try:
            await call
        except GatewayError as exc:
            failures.append(exc)
        else:
            raise AssertionError("the call should have failed")

    async with running(tmp_path, settings={"max_retries": 1}) as r:
        fake, client = r.fake, r.gateway.client
        await client.get(FOLLOW)
        quoting = f"<html>bad gateway: /cgi-bin/gettoken?corpid={fake.corp_id}&corpsecret={fake.secret}</html>"
        fake.expire_tokens()
        fake.fault("gettoken", count=10, raw=quoting.encode(), content_type="text/html")
        await fails(client.get(FOLLOW))
        fake.clear_faults()
        fake.fault(FOLLOW, count=2, mutate=lambda a: {"errcode": 40014, "errmsg": "invalid access_token"})
        await fails(client.get(FOLLOW))
        fake.fault(FOLLOW, status=429, retry_after="0", count=10)
        await fails(client.get(FOLLOW))
        fake.clear_faults()
        fake.fault(BATCH, count=10, mutate=lambda a: {k: v for k, v in a.items() if k != "external_contact_list"})
        await fails(r.gateway.list_contacts(None, 100))
        fake.clear_faults()
        userid, ext = next(iter(fake.follows))
        fake.fail_after_processing(TEMPLATE)
        await fails(
            client.post(
                TEMPLATE, {"sender": userid, "external_userid": [ext], "text": {"content": "x"}}, idempotent=False
            )
        )
        secret = fake.secret
        fake.secret = "reset-in-the-admin-console"
        fake.expired_errcode = 40001
        fake.expire_tokens()
        await fails(client.get(FOLLOW))
        await fails(client.get(FOLLOW))
        client.reset()
        status = await r.gateway.start_login()
        assert not status.logged_in and "wecom.secret" in status.message
        reprs = [repr(r.gateway), repr(client), repr(r.gateway.settings), str(r.gateway.settings), status.message]
        await r.server.stop()
        client.reset()
        fake.secret = secret
        await fails(client.get(FOLLOW))
        secrets = [fake.corp_id, secret, *fake._tokens]
    assert len(failures) == 8 and len(secrets) >= 3
    texts = [t for exc in failures for t in (str(exc), repr(exc), "".join(traceback.format_exception(exc)))]
    logged = [rec.getMessage() for rec in caplog.records]
    assert any("HTTP Request" in line and "gettoken" in line for line in logged)  # httpx logged them, masked
    for value in secrets:
        for text in (*texts, *logged, *reprs):
            assert value not in text, text

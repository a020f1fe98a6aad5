"""Issue 4's end-to-end proofs on the workpro gateway against the fake WorkPro puppet on loopback: the source
document's flow through a real `wecast serve` (uvicorn) and a campaign that survives a dropped event stream,
20001 throttling and UNAVAILABLE — every message counted on the fake server, not only in our database."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zxingcpp
from PIL import Image

from engine.gateways.base import EventKind, LoginState
from engine.gateways.fake_puppet import SELF_ID, FakePuppet, demo_contacts
from engine.gateways.workpro import WorkproGateway
from engine.service import Wecast
from engine.settings import Settings
from engine.spec import load_campaign
from storage.deliveries import list_deliveries

try:
    from web_harness import LiveServer, make_settings
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.web_harness import LiveServer, make_settings

T = TypeVar("T")
TOKEN = "puppet_workpro_e2e7c41d9a0b3f5e6"
THROTTLE_BACKOFF = 0.3  # seconds sends pause after WorkproErrorCode 20001 (30 s in production)


def workpro_settings(root: Path, fake: FakePuppet, **overrides: Any) -> Settings:
    """`gateway: workpro` pointed at the fake on loopback, with test-sized waits."""
    workpro = {
        "endpoint": fake.endpoint,
        "token": fake.token,
        "reconnect_delay": "0.05s",
        "reconnect_max_delay": "0.2s",
        "call_timeout": "5s",
        "qr_wait": "3s",
        "throttle_backoff": timedelta(seconds=THROTTLE_BACKOFF),
    }
    return make_settings(root, gateway="workpro", workpro=workpro, **overrides)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `predicate` from a plain thread until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:g}s"
        time.sleep(0.01)


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `predicate` on the event loop until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"{what} not reached within {timeout:g}s"
        await asyncio.sleep(0.005)


class FakeInThread:
    """The fake puppet on its own event loop in a thread, so that the gateway inside the uvicorn thread
    reaches it over real loopback gRPC; control calls hop onto the fake's loop."""

    def __init__(self, **kwargs: Any) -> None:
        self.fake = FakePuppet(**kwargs)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-puppet", daemon=True)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def __enter__(self) -> FakeInThread:
        self.thread.start()
        self.call(self.fake.start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.fake.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def test_source_document_flow_through_serve_on_workpro(tmp_path: Path) -> None:
    """goStart → QR → phone scan → wrong code then right code → get-all-user → send-message →
    send-message-all by tag → goEnd → new QR, through a real uvicorn with `gateway: workpro` on the fake."""
    with FakeInThread(token=TOKEN, contacts=120) as puppet:
        fake = puppet.fake
        with LiveServer(workpro_settings(tmp_path, fake)) as live:
            client = live.client
            assert isinstance(live.app.gateway, WorkproGateway)

            start = client.post("/goStart")
            assert start.status_code == 200, start.text
            first = start.json()
            assert first["state"] == "waiting_scan"
            assert first["qrcodeKey"] == fake.qr_key and f"key={fake.qr_key}" in first["qrcodeUrl"]
            assert first["message"] == "scan the QR code with WeCom on the phone"
            zh = {"Accept-Language": "zh-CN,zh;q=0.9"}  # the same QR, asked for in Chinese
            assert client.post("/goStart", headers=zh).json()["message"] == "请用手机企业微信扫描二维码"
            png = client.get("/api/v1/login/qr.png")
            assert zxingcpp.read_barcodes(Image.open(io.BytesIO(png.content)))[0].text == first["qrcodeUrl"]

            puppet.call(fake.scan())
            wait_until(
                lambda: client.get("/api/v1/login").json()["state"] == "waiting_verify_code",
                what="the VERIFY_CODE event",
            )
            code = fake.phone_code()
            assert code is not None
            wrong = "000000" if code != "000000" else "111111"
            bad = client.post("/submit-verify-code", json={"verifyCode": wrong, "qrcodeKey": first["qrcodeKey"]})
            assert bad.status_code == 400, bad.text
            assert bad.json()["triesLeft"] == 2 and "wrong verification code" in bad.json()["error"]
            assert "2 tries left" in bad.json()["error"] and not fake.logged_in
            bad = client.post(
                "/submit-verify-code", json={"verifyCode": wrong, "qrcodeKey": first["qrcodeKey"]}, headers=zh
            )
            assert bad.json()["triesLeft"] == 1 and bad.json()["error"].startswith("验证码错误"), bad.text
            ok = client.post("/submit-verify-code", json={"verifyCode": f" {code} ", "qrcodeKey": first["qrcodeKey"]})
            assert ok.status_code == 200, ok.text
            assert ok.json()["state"] == "logged_in" and ok.json()["accountId"] == SELF_ID and fake.logged_in

            contacts: list[dict[str, Any]] = []
            page = 1
            while True:
                body = client.post("/get-all-user", json={"pageSize": 50, "page": page}).json()
                contacts += body["datas"]
                if not body["hasNextPage"]:
                    break
                page += 1
            assert page == 3 and body["total"] == 120
            assert [c["id"] for c in contacts] == sorted(fake.contact_ids())
            book = {c.id: c for c in demo_contacts(120)}  # what the fake serves (same seed)
            for contact in contacts:
                assert set(contact["tags"]) == fake.tag_names(contact["id"]), contact["id"]
                assert contact["name"] == book[contact["id"]].name
                assert contact["phone"] == list(book[contact["id"]].phones)

            one = contacts[7]["id"]
            sent = client.post("/send-message", json={"id": one, "message": "您好，本周新品8折"})
            assert sent.status_code == 200, sent.text
            assert sent.json()["sent"] == 1
            assert [s.text for s in fake.sent_to(one)] == ["您好，本周新品8折"]
            assert sent.json()["results"][0]["messageId"] == fake.sent_to(one)[0].message_id

            vip = {c for c in fake.contact_ids() if "VIP" in fake.tag_names(c)}
            assert 0 < len(vip) < 120
            many = client.post("/send-message-all", json={"tag": "VIP", "message": "VIP专享：满500减50"})
            assert many.status_code == 200, many.text
            assert many.json()["sent"] == len(vip) and many.json()["counts"] == {"sent": len(vip)}
            received = Counter(s.contact_id for s in fake.sends if s.text == "VIP专享：满500减50")
            assert received == Counter(vip)  # each VIP exactly once, nobody else
            assert len(fake.sends) == 1 + len(vip) and not fake.rejected

            end = client.post("/goEnd")
            assert end.status_code == 200, end.text
            # WorkPro pushes the next QR right after LOGOUT, so goEnd may already answer with it.
            assert end.json()["state"] in ("logged_out", "waiting_scan") and not fake.logged_in
            assert end.json()["accountId"] is None
            again = client.post("/goStart").json()
            assert again["state"] == "waiting_scan"
            assert again["qrcodeKey"] != first["qrcodeKey"] and again["qrcodeKey"] == fake.qr_key
            refused = client.post("/send-message", json={"id": one, "message": "登出后不应发送"})
            assert refused.status_code == 409 and len(fake.sends) == 1 + len(vip)
        assert "Logout" in fake.calls and fake.calls.count("EnterVerifyCode") == 3


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


CAMPAIGN = """\
id: spring_sale
name: 春季上新
audience: {}
message:
  template: "{{ name }}您好，春季新品已上架，回复1了解详情"
quiet_hours: false
frequency_cap: false
throttle: {per_second: 1000}
"""


async def log_in(gateway: WorkproGateway, fake: FakePuppet) -> None:
    """The phone's part of the login, driven on the fake."""
    status = await gateway.start_login()
    assert status.qrcode_key == fake.qr_key
    await fake.scan()
    await until(lambda: gateway._login.state is LoginState.WAITING_VERIFY_CODE, what="the verify-code prompt")
    code = fake.phone_code()
    assert code is not None
    assert (await gateway.submit_verify_code(code)).logged_in


@pytest.mark.anyio
async def test_campaign_survives_dropped_stream_throttling_and_unavailable(tmp_path: Path) -> None:
    """A 150-recipient campaign through which the fake drops the event stream twice, throttles with 20001
    and refuses sends with UNAVAILABLE reaches every recipient exactly once, counted on the fake."""
    fake = FakePuppet(token=TOKEN, contacts=150)
    await fake.start()
    settings = workpro_settings(
        tmp_path,
        fake,
        sending={"concurrency": 4, "retry": {"max_attempts": 10, "base_delay": "0.05s", "max_delay": "0.2s"}},
    )
    (tmp_path / "campaigns" / "spring_sale.yaml").write_text(CAMPAIGN, encoding="utf-8")
    app = Wecast(settings)
    gateway = app.gateway
    assert isinstance(gateway, WorkproGateway) and gateway.capabilities.idempotent_sends is False
    try:
        await app.start()
        await log_in(gateway, fake)
        assert (await app.sync()).seen == 150
        campaign = load_campaign(tmp_path / "campaigns" / "spring_sale.yaml", settings)
        started = time.monotonic()
        run = asyncio.create_task(app.run_campaign(campaign, login_wait=5))

        def stream_ups() -> int:
            return sum(1 for e in gateway.events if e.kind is EventKind.CONNECTION and e.data.get("state") == "up")

        await until(lambda: len(fake.sends) >= 30, what="30 sends")
        fake.drop_event_stream()
        fake.throttle_sends(8)  # WorkproErrorCode 20001, refused before delivery
        await until(lambda: stream_ups() == 2, what="the first reconnect")
        await until(lambda: fake.pending_faults() == 0 and len(fake.sends) >= 80, what="the throttling to pass")
        fake.drop_event_stream()
        fake.fail_sends(3)  # UNAVAILABLE before the request reached WorkPro
        await until(lambda: stream_ups() == 3, what="the second reconnect")
        outcome = await asyncio.wait_for(run, 20)
        elapsed = time.monotonic() - started
    finally:
        await app.close()
        await fake.stop()

    # On the fake server: everyone exactly once, every refused send made up for, nothing left over.
    assert Counter(s.contact_id for s in fake.sends) == Counter(fake.contact_ids())
    book = {c.id: c.name for c in demo_contacts(150)}
    assert all(s.text == f"{book[s.contact_id]}您好，春季新品已上架，回复1了解详情" for s in fake.sends)
    assert [r.code.name for r in fake.rejected] == ["INTERNAL"] * 8 + ["UNAVAILABLE"] * 3
    assert fake.calls.count("MessageSendText") == len(fake.sends) + len(fake.rejected) == 150 + 11
    assert fake.pending_faults() == 0
    assert len(fake.event_requests) == 3 and fake.event_requests[-1][1] == SELF_ID  # resumed as the account

    # In our log: every delivery sent, with the fake's message id; the refused ones took more attempts.
    assert outcome.summary is not None
    assert outcome.summary.status == "completed" and outcome.summary.counts == {"sent": 150}
    rows = list_deliveries(app.db, run_id=outcome.plan.run_id, limit=1000)
    assert {r.contact_id: r.gateway_message_id for r in rows} == {s.contact_id: s.message_id for s in fake.sends}
    retried = Counter({r.contact_id: r.attempts - 1 for r in rows if r.attempts > 1})
    assert retried == Counter(r.contact_id for r in fake.rejected)
    assert sum(r.attempts for r in rows) == 150 + 11

    # The dispatcher slowed down: after the first 20001 no send got through for the back-off.
    first_throttle = fake.rejected[0].at
    next_sent = min(s.at for s in fake.sends if s.at > first_throttle)
    assert next_sent - first_throttle >= THROTTLE_BACKOFF * 0.9
    assert elapsed < 15, elapsed


@pytest.mark.anyio
async def test_a_changed_contact_is_refreshed_from_the_dirty_event(tmp_path: Path) -> None:
    """When WeCom says a contact changed (WorkPro's DIRTY event: a new remark, other tags), `wecast serve`'s
    scheduler re-reads that one contact into the database: campaigns plan on the new remark and tags at once,
    not at the next full sync."""
    from engine.scheduler import CampaignScheduler
    from storage.contacts import ContactFilter, page_contacts

    fake = FakePuppet(token=TOKEN, contacts=20)
    await fake.start()
    settings = workpro_settings(tmp_path, fake, scheduler={"contacts_sync": None})
    app = Wecast(settings)
    gateway = app.gateway
    assert isinstance(gateway, WorkproGateway)
    scheduler = CampaignScheduler(app)
    try:
        await app.start()
        await log_in(gateway, fake)
        assert (await app.sync()).seen == 20
        await scheduler.start(loop=False)
        contact_id = fake.contact_ids()[3]
        # The fake's tag table (its own business; read here to pick a tag the contact does not have yet).
        tag = next(t for t in fake._tags if fake._tags[t].name not in fake.tag_names(contact_id))
        fake.touch_contact(contact_id, alias="新备注·王姐", tag_ids=[tag])

        def stored() -> tuple[str, list[str]]:
            [row] = page_contacts(app.db, ContactFilter(ids=[contact_id]), limit=1).rows
            return row.alias, [tid for tid, _ in row.tags]

        # Wait for the outcome, not for the refresh task: it may start and finish between two looks.
        await until(lambda: stored() == ("新备注·王姐", [tag]), what="the refreshed contact in the database")
    finally:
        await scheduler.stop()
        await app.close()
        await fake.stop()


POSTER_CAMPAIGN = """\
id: poster_day
name: 海报日
audience: {}
message:
  parts:
    - image: poster.png
    - text: "{{ name }}您好，海报请查收"
quiet_hours: false
frequency_cap: false
throttle: {per_second: 1000}
"""


@pytest.mark.anyio
async def test_a_poster_campaign_through_cut_uploads_reaches_everyone_once(tmp_path: Path) -> None:
    """A 40-recipient poster campaign whose uploads the connection cuts three times: each cut upload delivered
    nothing, so its send is retried (TransientError), and every recipient gets the poster exactly once — each
    send named its own fresh upload, whose bytes have the poster's sha256."""
    import hashlib
    import random

    fake = FakePuppet(token=TOKEN, contacts=40)
    await fake.start()
    settings = workpro_settings(
        tmp_path,
        fake,
        sending={"concurrency": 4, "retry": {"max_attempts": 10, "base_delay": "0.05s", "max_delay": "0.2s"}},
    )
    poster = tmp_path / "campaigns" / "poster.png"
    pixels = random.Random(40).randbytes(300 * 300 * 3)
    Image.frombytes("RGB", (300, 300), pixels).save(poster, format="PNG")
    digest = hashlib.sha256(poster.read_bytes()).hexdigest()
    (tmp_path / "campaigns" / "poster_day.yaml").write_text(POSTER_CAMPAIGN, encoding="utf-8")
    app = Wecast(settings)
    gateway = app.gateway
    assert isinstance(gateway, WorkproGateway)
    try:
        await app.start()
        await log_in(gateway, fake)
        assert (await app.sync()).seen == 40
        campaign = load_campaign(tmp_path / "campaigns" / "poster_day.yaml", settings)
        run = asyncio.create_task(app.run_campaign(campaign, login_wait=5))
        await until(lambda: len(fake.sends) >= 6, what="a few sends")
        fake.cut_uploads(3)
        outcome = await asyncio.wait_for(run, 30)
    finally:
        await app.close()
        await fake.stop()

    images = [s for s in fake.sends if s.kind.value == "image"]
    assert Counter(s.contact_id for s in images) == Counter(fake.contact_ids())
    assert {(s.sha256, s.size) for s in images} == {(digest, poster.stat().st_size)}
    assert fake.cut_upload_count == 3
    named = [b["uuid"] for b in fake.file_boxes]
    assert len(named) == len(set(named)) == 40 and all(fake.uploads[u].used for u in named)
    assert outcome.summary is not None and outcome.summary.status == "completed"
    rows = list_deliveries(app.db, run_id=outcome.plan.run_id, limit=1000)
    assert {r.status for r in rows} == {"sent"} and len(rows) == 40
    assert sum(r.attempts for r in rows) == 40 + 3

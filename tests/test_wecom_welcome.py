"""WeCom's welcome message, end to end on the fake WeCom server: a new customer's add_external_contact callback carries
a WelcomeCode; a contact_added journey's first send goes out through `send_welcome_msg` with that code while it is
fresh (under 20 s), recorded in the ledger once like any send — and by the normal path (a 群发 task) when the code is
too old, when there is none, or when WeCom refuses it. Counted at the fake (what the customer received)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from helpers import MONDAY_10
from test_wecom_e2e import started, wecom_config

from engine.clock import FakeClock
from engine.gateways.wecom.fake_server import FakeWecom, FakeWecomServer
from engine.gateways.wecom.gateway import WecomGateway
from engine.journeys.runtime import JourneyRunner, dedupe_key
from engine.service import Wecast
from storage.deliveries import list_deliveries
from storage.models import DeliveryStatus

JOURNEY = """kind: journey
id: welcome
name: 新客欢迎
trigger: contact_added
quiet_hours: false
steps:
  - id: hello
    send: {template: "{{ display_name }}您好，欢迎关注本店！"}
    transactional: true
  - wait: 1d
  - id: tip
    send: {template: 小贴士：会员日每周六}
"""
CALLBACK = "  callback_token: faketoken\n  encoding_aes_key: " + "a" * 43 + "\n"

Scenario = Callable[[Wecast, FakeWecom, FakeClock, JourneyRunner], Awaitable[None]]


def _run(tmp: Path, db_url: str, scenario: Scenario) -> None:
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        fake = FakeWecom(customers=12, staff=2, clock=clock)
        server = FakeWecomServer(fake)
        url = await server.start()
        (tmp / "campaigns").mkdir()
        (tmp / "campaigns" / "welcome.yaml").write_text(JOURNEY, encoding="utf-8")
        app = await started(wecom_config(tmp, db_url, fake, url, CALLBACK), clock)
        try:
            await app.sync()
            from engine.definitions import load_definitions

            defs = load_definitions([tmp / "campaigns"], app.settings)
            assert not defs.errors
            app.journeys.set_journeys(defs.journeys)
            runner = JourneyRunner(
                app.journeys, lambda run_id: app.dispatcher.run(run_id, login_wait=0, confirm_wait=0)
            )
            await scenario(app, fake, clock, runner)
        finally:
            await app.close()
            await server.stop()

    asyncio.run(go())


async def _callback(app: Wecast, fake: FakeWecom, fields: dict[str, str]) -> None:
    """WeCom POSTs the event; the gateway checks it and emits CONTACT_ADDED on the next loop turn."""
    query, body = fake.callback(fields)
    gateway = app.gateway
    assert isinstance(gateway, WecomGateway)
    assert gateway.receive_callback(query["msg_signature"], query["timestamp"], query["nonce"], body) is not None
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def _settle(runner: JourneyRunner, rounds: int = 6) -> None:
    """Tick and let the dispatch tasks end, a few rounds (until_idle would wait out its timeout while a 群发 task
    waits for staff to confirm it: the journey run stays open)."""
    for _ in range(rounds):
        await runner.step()
        pending = [t for t in runner.tasks.values() if not t.done()]
        if pending:
            await asyncio.wait(pending)


def _hello(app: Wecast, ext: str) -> list[tuple[DeliveryStatus, str]]:
    rows = list_deliveries(app.db, contact_id=ext, limit=10)
    return [(r.status, r.gateway_message_id) for r in rows if r.dedupe_key == dedupe_key("welcome", ext, 1, "hello")]


def test_a_new_customer_is_welcomed_by_send_welcome_msg_with_the_event_s_code(tmp_path: Path, db_url: str) -> None:
    async def scenario(app: Wecast, fake: FakeWecom, clock: FakeClock, runner: JourneyRunner) -> None:
        staff = sorted(fake.staff)[0]
        fields = fake.add_customer(staff, "新客小李")
        code = fields["WelcomeCode"]
        await _callback(app, fake, fields)
        clock.advance(2)  # the engine gets to it two seconds later
        await _settle(runner)
        ext = fields["ExternalUserID"]
        got = [(m.via, m.text, m.sender) for m in fake.received if m.contact_id == ext]
        assert got == [("welcome", "新客小李您好，欢迎关注本店！", staff)]
        assert fake.welcomes[code].used
        assert not any(ext in t.recipients for t in fake.tasks.values())  # not also as a 群发 task
        [(status, message_id)] = _hello(app, ext)
        assert status is DeliveryStatus.SENT and message_id.startswith("welcome-")
        # The journey goes on by the normal path: the next day's tip is a 群发 task for the staff member.
        await _settle(runner)
        clock.advance(86_400)
        await _settle(runner)
        assert [t.text for t in fake.tasks.values() if ext in t.recipients] == ["小贴士：会员日每周六"]
        assert len([m for m in fake.received if m.contact_id == ext]) == 1  # the tip waits for staff to confirm

    _run(tmp_path, db_url, scenario)


def test_a_code_past_its_20_seconds_or_refused_goes_the_normal_way_once(tmp_path: Path, db_url: str) -> None:
    """An event handled 25 s after the callback: its code is past WeCom's window, so the welcome goes as a 群发
    task (one delivery, nothing by send_welcome_msg). A fresh code WeCom refuses (another app used it first): the
    same delivery goes the normal way, once."""

    async def scenario(app: Wecast, fake: FakeWecom, clock: FakeClock, runner: JourneyRunner) -> None:
        staff = sorted(fake.staff)[0]
        late = fake.add_customer(staff, "晚到的客户")
        await _callback(app, fake, late)
        clock.advance(25)
        await _settle(runner)
        refused = fake.add_customer(staff, "被抢先的客户")
        fake.welcomes[refused["WelcomeCode"]].used = True  # another app of the corp sent its welcome first
        await _callback(app, fake, refused)
        await _settle(runner)
        for fields in (late, refused):
            ext = fields["ExternalUserID"]
            assert not [m for m in fake.received if m.contact_id == ext and m.via == "welcome"]
            tasks = [t for t in fake.tasks.values() if ext in t.recipients]
            assert len(tasks) == 1 and tasks[0].text.endswith("您好，欢迎关注本店！")
            [(status, _)] = _hello(app, ext)
            assert status is DeliveryStatus.SUBMITTED
        assert not fake.welcomes[late["WelcomeCode"]].used
        fake.confirm()
        await _settle(runner)
        for fields in (late, refused):
            ext = fields["ExternalUserID"]
            assert [m.via for m in fake.received if m.contact_id == ext] == ["task"]

    _run(tmp_path, db_url, scenario)

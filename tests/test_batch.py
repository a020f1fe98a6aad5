"""Task-based (群发) gateways: one text for many customers, confirmed by staff, results reconciled later.

The sandbox in `mode: batch` behaves like the official WeCom API's mass-message tasks, so the dispatcher's
batch path is exercised end to end before the wecom gateway exists.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from helpers import MONDAY_10, write_settings

from engine.clock import FakeClock
from engine.errors import PermanentError
from engine.gateways.sandbox import SandboxGateway
from engine.service import Wecast
from engine.settings import Settings
from engine.spec import Campaign, parse_campaign
from storage.deliveries import list_deliveries, status_counts
from storage.models import DeliveryStatus


@pytest.fixture
def settings_for(tmp_path: Path, db_url: str) -> Any:
    """`settings_for(confirm_delay="1h", contacts=80)`: a batch-mode sandbox (群发 tasks) on this test's database."""

    def make(*, confirm_delay: str = "0s", contacts: int = 80) -> Settings:
        return write_settings(
            tmp_path, db_url, contacts=contacts, sandbox=f", mode: batch, confirm_delay: {confirm_delay}"
        )

    return make


def campaign(settings: Settings, template: str, name: str = "mass") -> Campaign:
    text = (
        f"id: {name}\nname: 群发测试\naudience: {{}}\nmessage: {{template: '{template}'}}\n"
        "frequency_cap: false\nquiet_hours: false\nthrottle: {per_second: 50}\n"
    )
    return parse_campaign(text, settings.campaigns_dir / f"{name}.yaml", settings)


def test_identical_texts_go_out_as_one_task_and_complete_after_confirmation(settings_for: Any) -> None:
    """A non-personalised message becomes one task; deliveries stay `submitted` until staff confirm, then `sent`."""
    settings = settings_for(confirm_delay="1h")
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        app = Wecast(settings, clock=clock)
        await app.start()
        await app.sync()
        gw = app.gateway
        assert isinstance(gw, SandboxGateway)
        calls: list[int] = []
        original = gw.submit_batch

        async def counting(ids: list[str], text: str, *, idempotency_key: str, sender: str = "") -> Any:
            calls.append(len(ids))
            return await original(ids, text, idempotency_key=idempotency_key, sender=sender)

        gw.submit_batch = counting  # type: ignore[method-assign]
        first = (await app.run_campaign(campaign(settings, "周末会员日，全场8折！"), confirm_wait=0)).summary
        assert first is not None and first.status == "running"
        assert len(calls) == 1 and first.counts["submitted"] == calls[0] > 50
        assert "wait for staff to confirm" in first.message
        assert gw.outbox_messages() == []
        clock.advance(3601)  # staff confirmed in WeCom
        [done] = await app.resume(confirm_wait=0)
        assert done.status == "completed" and done.sent == calls[0]
        per_contact = [m.contact_id for m in gw.outbox_messages()]
        assert len(per_contact) == len(set(per_contact)) == calls[0]
        rows = list_deliveries(app.db, run_id=done.run_id, status=DeliveryStatus.SENT, limit=1000)
        assert {r.gateway_task_id for r in rows} and all(r.gateway_task_id.startswith("msgtask-") for r in rows)
        await app.close()

    asyncio.run(go())


def test_personalised_texts_make_one_task_per_distinct_text(settings_for: Any) -> None:
    """Rendering per contact then grouping by identical text gives one task per distinct message."""
    settings = settings_for()

    async def go() -> None:
        app = Wecast(settings, clock=FakeClock(MONDAY_10))
        await app.start()
        await app.sync()
        c = campaign(settings, '{{ city | default("全国") }}门店会员日！')
        preview = app.preview(c)
        distinct = {r.text for r in preview.recipients}
        outcome = await app.run_campaign(c, confirm_wait=0)
        assert outcome.summary is not None and outcome.summary.status == "completed"
        rows = list_deliveries(app.db, run_id=outcome.summary.run_id, status=DeliveryStatus.SENT, limit=1000)
        tasks = {r.gateway_task_id for r in rows}
        assert len(tasks) == len(distinct) > 3
        gw = app.gateway
        assert isinstance(gw, SandboxGateway)
        received = {m.contact_id: m.text for m in gw.outbox_messages()}
        assert received == {r.contact_id: r.text for r in preview.recipients}
        await app.close()

    asyncio.run(go())


def test_a_crash_mid_submit_resubmits_the_same_group_under_the_same_key(settings_for: Any) -> None:
    """Rows caught `sending` by a crash are resubmitted as exactly the same group and key: no second task,
    no second message."""
    settings = settings_for()

    async def go() -> None:
        app = Wecast(settings, clock=FakeClock(MONDAY_10))
        await app.start()
        await app.sync()
        gw = app.gateway
        assert isinstance(gw, SandboxGateway)
        original = gw.submit_batch
        keys: list[str] = []

        async def crash_after_submit(ids: list[str], text: str, *, idempotency_key: str, sender: str = "") -> Any:
            keys.append(idempotency_key)
            receipt = await original(ids, text, idempotency_key=idempotency_key, sender=sender)
            if len(keys) == 1:
                raise KeyboardInterrupt  # the process dies after WeCom accepted the task
            return receipt

        gw.submit_batch = crash_after_submit  # type: ignore[method-assign]
        c = campaign(settings, "新品上市，欢迎到店试用！")
        plan = app.plan(c)
        with pytest.raises(KeyboardInterrupt):
            await app.dispatcher.run(plan.run_id, confirm_wait=0)
        counts = status_counts(app.db, plan.run_id)
        assert counts.get("sending", 0) == plan.planned
        summary = await app.dispatcher.run(plan.run_id, confirm_wait=0)
        assert summary.status == "completed" and summary.sent == plan.planned
        assert len(set(keys)) == 1 and len(keys) == 2
        received = [m.contact_id for m in gw.outbox_messages()]
        assert len(received) == len(set(received)) == plan.planned
        await app.close()

    asyncio.run(go())


def test_direct_sends_are_refused_by_a_task_only_account(settings_for: Any) -> None:
    """A task-only account rejects direct sends with a clear permanent error."""
    settings = settings_for()

    async def go() -> None:
        gw = SandboxGateway(settings.sandbox, FakeClock(MONDAY_10))
        await gw.start()
        page = await gw.list_contacts(None, 5)
        with pytest.raises(PermanentError, match="群发"):
            await gw.send_text(page.contacts[0].id, "hi", idempotency_key="k")
        await gw.close()

    asyncio.run(go())


def test_an_unexpected_error_submitting_a_task_leaves_no_row_sending(settings_for: Any) -> None:
    """A bug behind the gateway boundary (not a GatewayError) while submitting a task is classified like on the
    direct path: the task may exist, so its rows are recorded `unknown` with the reason, none left `sending`."""
    settings = settings_for(contacts=40)

    async def go() -> None:
        app = Wecast(settings, clock=FakeClock(MONDAY_10))
        await app.start()
        await app.sync()

        async def broken(ids: list[str], text: str, *, idempotency_key: str, sender: str = "") -> Any:
            raise RuntimeError("bug in the gateway")

        app.gateway.submit_batch = broken  # type: ignore[method-assign]
        outcome = await app.run_campaign(campaign(settings, "会员日快乐"), confirm_wait=0)
        s = outcome.summary
        assert s is not None and s.status == "completed"
        assert s.counts.get("sending", 0) == 0 and s.counts["unknown"] == outcome.plan.planned
        rows = list_deliveries(app.db, run_id=s.run_id, status=DeliveryStatus.UNKNOWN, limit=1000)
        assert all(r.reason == "unexpected error: RuntimeError: bug in the gateway" for r in rows)
        await app.close()

    asyncio.run(go())


def test_a_rate_limited_task_slows_the_run_once_not_once_per_recipient(
    settings_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One throttled task submission slows the pace once (it was one call), and its rows are retried."""
    from engine.dispatch import Pacer
    from engine.errors import RateLimitedError

    settings = settings_for(contacts=40)
    slowed: list[float] = []
    original_rate_limited = Pacer.rate_limited

    def spy(self: Pacer, retry_after: float) -> None:
        slowed.append(retry_after)
        original_rate_limited(self, retry_after)

    monkeypatch.setattr(Pacer, "rate_limited", spy)

    async def go() -> None:
        app = Wecast(settings, clock=FakeClock(MONDAY_10))
        await app.start()
        await app.sync()
        gw = app.gateway
        assert isinstance(gw, SandboxGateway)
        original = gw.submit_batch
        calls = 0

        async def throttled_once(ids: list[str], text: str, *, idempotency_key: str, sender: str = "") -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RateLimitedError("45009: too many tasks", retry_after=3.0)
            return await original(ids, text, idempotency_key=idempotency_key, sender=sender)

        gw.submit_batch = throttled_once  # type: ignore[method-assign]
        outcome = await app.run_campaign(campaign(settings, "新品上市"), confirm_wait=0)
        assert outcome.summary is not None and outcome.summary.status == "completed"
        assert outcome.summary.sent == outcome.plan.planned > 10
        assert slowed == [3.0] and calls == 2
        await app.close()

    asyncio.run(go())

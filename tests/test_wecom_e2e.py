"""Campaigns on the wecom gateway, end to end against the fake WeCom server: sync, plan, one 群发 task per staff
member, staff confirm, reconciliation to final states — counted on the fake server, never in wecast's own log —
through a token that expires mid-run, a storm of 45009 and a crash after WeCom accepted a task."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import MONDAY_10, campaign

from engine.clock import FakeClock
from engine.gateways.wecom.fake_server import FakeWecom, FakeWecomServer
from storage.contacts import follow_users
from storage.deliveries import list_deliveries, status_counts
from storage.models import OPEN_STATUSES, DeliveryStatus

TEMPLATE = "externalcontact/add_msg_template"
try:
    from wecom_harness import started, wecom_config
except ImportError:  # pragma: no cover
    from tests.wecom_harness import started, wecom_config

PLAIN = "message: {template: '本周六会员日，全场八折，欢迎到店！'}\nfrequency_cap: false\nquiet_hours: false\n"


def leading_staff(fake: FakeWecom) -> dict[str, str]:
    """Each customer's leading staff member (the one who added them first), from the fake's own data."""
    firsts: dict[str, tuple[int, str]] = {}
    for (userid, ext), follow in fake.follows.items():
        mine = (follow.createtime, userid)
        if ext not in firsts or mine < firsts[ext]:
            firsts[ext] = mine
    return {ext: userid for ext, (_, userid) in firsts.items()}


def test_a_plain_campaign_is_one_task_per_staff_member_and_reconciles(tmp_path: Path, db_url: str) -> None:
    """1,000 customers of 5 staff members (every 7th shared by two): a non-personalised text becomes exactly one task
    per staff member, each to that member's leading customers; nothing is delivered until they confirm; then
    reconciliation gives every delivery its final state, and each customer received the message once (counted at
    the fake), those who deleted their staff member failed as not friends."""
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        fake = FakeWecom(customers=1000, staff=5, shared_every=7, clock=clock)
        server = FakeWecomServer(fake)
        url = await server.start()
        app = await started(wecom_config(tmp_path, db_url, fake, url), clock)
        try:
            result = await app.sync()
            assert result.seen == 1000
            leads = leading_staff(fake)
            stored = follow_users(app.db, list(leads))
            assert {ext: users[0] for ext, users in stored.items()} == leads
            assert sum(len(users) == 2 for users in stored.values()) == len(range(0, 1000, 7))

            outcome = await app.run_campaign(campaign(app.settings, "audience: {}\n" + PLAIN), confirm_wait=0)
            summary = outcome.summary
            assert summary is not None and summary.status == "running"
            assert "wait for staff to confirm" in summary.message
            assert len(fake.tasks) == 5
            assert sorted(t.sender for t in fake.tasks.values()) == sorted(fake.staff)
            for task in fake.tasks.values():
                assert set(task.recipients) == {ext for ext, lead in leads.items() if lead == task.sender}
            assert fake.received == []
            counts = status_counts(app.db, summary.run_id)
            assert counts[DeliveryStatus.SUBMITTED] == 1000

            fake.confirm()
            [done] = await app.resume(summary.run_id, confirm_wait=0)
            assert done.status == "completed"
            assert not any(done.counts.get(s, 0) for s in OPEN_STATUSES)
            received = Counter(m.contact_id for m in fake.received)
            assert max(received.values()) == 1
            assert done.counts[DeliveryStatus.SENT] == len(received)
            not_friends = {ext for (u, ext), f in fake.follows.items() if leads[ext] == u and not f.friend}
            assert not_friends  # the demo data has a few
            failed = list_deliveries(app.db, run_id=done.run_id, status=DeliveryStatus.FAILED, limit=2000)
            assert {d.contact_id for d in failed} == not_friends
            assert all("no longer a contact" in d.reason for d in failed)
            assert len(received) + len(not_friends) == 1000
        finally:
            await app.close()
            await server.stop()

    asyncio.run(go())


def test_a_token_expiring_mid_run_and_a_45009_storm(tmp_path: Path, db_url: str) -> None:
    """WeCom drops the token as the run starts, answers 45009 six times in a row to add_msg_template, and allows only
    20 calls of an API a minute: the run completes, no task is submitted twice (one per staff member, each customer
    received once), the server never had to refuse a call for going over its limit, and one new token served."""
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        fake = FakeWecom(
            customers=300, staff=3, shared_every=0, clock=clock, per_window=20, window=60.0, expired_errcode=40014
        )
        server = FakeWecomServer(fake)
        url = await server.start()
        limits = "  limits: {per_minute: 20, per_hour: 1000}\n  max_retries: 3\n"
        app = await started(wecom_config(tmp_path, db_url, fake, url, limits), clock)
        try:
            await app.sync()
            fake.expire_tokens()
            fake.storm(TEMPLATE, 45009, 6)
            outcome = await app.run_campaign(campaign(app.settings, "audience: {}\n" + PLAIN), confirm_wait=0)
            assert outcome.summary is not None
            fake.confirm()
            [done] = await app.resume(outcome.summary.run_id, confirm_wait=0)
            assert done.status == "completed"
            assert fake.errors[(TEMPLATE, 45009)] == 6
            assert any(code == 40014 for _, code in fake.errors)  # the dropped token was refused, then replaced
            assert len(fake.tasks) == 3
            assert sorted(t.sender for t in fake.tasks.values()) == sorted(fake.staff)
            received = Counter(m.contact_id for m in fake.received)
            assert max(received.values()) == 1
            assert done.counts[DeliveryStatus.SENT] == len(received)
            assert sum(fake.over_limit.values()) == 0
            assert max(fake.max_in_window.values()) <= 20
            assert fake.tokens_issued >= 2
        finally:
            await app.close()
            await server.stop()

    asyncio.run(go())


def test_a_crash_after_wecom_accepted_a_task_resubmits_nothing(tmp_path: Path, db_url: str) -> None:
    """The process dies right after add_msg_template answered (rows still `sending`): the next dispatcher resends
    the same group under the same key, the gateway answers from its ledger, and WeCom holds one task per staff member
    — each customer gets the message once."""
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        fake = FakeWecom(customers=60, staff=2, shared_every=0, clock=clock)
        server = FakeWecomServer(fake)
        url = await server.start()
        app = await started(wecom_config(tmp_path, db_url, fake, url), clock)
        try:
            await app.sync()
            gateway = app.gateway
            original = gateway.submit_batch
            calls: list[str] = []

            async def dies_after_the_answer(ids: list[str], message: Any, **kwargs: Any) -> Any:
                receipt = await original(ids, message, **kwargs)
                calls.append(kwargs["idempotency_key"])
                if len(calls) == 1:
                    raise KeyboardInterrupt  # kill -9 between WeCom's answer and recording it
                return receipt

            gateway.submit_batch = dies_after_the_answer  # type: ignore[method-assign]
            plan = await asyncio.to_thread(app.plan, campaign(app.settings, "audience: {}\n" + PLAIN))
            with pytest.raises(KeyboardInterrupt):
                await app.dispatcher.run(plan.run_id, confirm_wait=0)
            assert status_counts(app.db, plan.run_id).get(DeliveryStatus.SENDING, 0) > 0
            summary = await app.dispatcher.run(plan.run_id, confirm_wait=0)
            assert summary.status == "running"
            assert len(fake.tasks) == 2
            assert calls.count(calls[0]) == 2  # the same key again, answered from the ledger
            fake.confirm()
            done = await app.dispatcher.run(plan.run_id, confirm_wait=0)
            assert done.status == "completed"
            received = Counter(m.contact_id for m in fake.received)
            assert max(received.values()) == 1
            assert done.counts[DeliveryStatus.SENT] == len(received)
        finally:
            await app.close()
            await server.stop()

    asyncio.run(go())

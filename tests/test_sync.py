"""A half-done contact sync is never a contact list (issue 7, item 5): a sync is a generation marked finished at its
end; planning refuses a list whose latest sync did not finish, a run finishes it first; two processes syncing at
once neither crash nor plan on a partial list; the customer events a sync records are recorded once even when it is
interrupted and run again. Owners (runs, syncs) keep their heartbeat fresh while they wait."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from helpers import MONDAY_10, PLAIN, campaign, run, started

from engine.clock import FakeClock
from engine.contacts import ListState
from engine.errors import TransientError, WecastError
from engine.gateways.base import ContactPage, Gateway
from engine.gateways.sandbox import SandboxGateway
from engine.owners import BEAT_WITHIN, HEARTBEAT_EVERY, STALE_AFTER
from engine.service import Wecast
from engine.settings import Settings
from storage import contacts as contacts_db
from storage import journeys as journeys_db
from storage import runs as runs_db
from storage.models import CustomerEventKind

MakeSettings = Callable[..., Settings]
CONTACTS = 1100  # three pages of 500


def interrupt_after(gateway: Gateway, pages: int) -> None:
    """The gateway's contact list breaks off after `pages` pages (the sync is stopped there, its pages written)."""
    original = gateway.list_contacts
    served = 0

    async def list_contacts(cursor: str | None = None, page_size: int = 500) -> ContactPage:
        nonlocal served
        if served >= pages:
            gateway.list_contacts = original  # type: ignore[method-assign]
            raise TransientError("connection reset by peer (the sync is interrupted here)")
        served += 1
        return await original(cursor, page_size)

    gateway.list_contacts = list_contacts  # type: ignore[method-assign]


def audience(gateway: Gateway) -> set[str]:
    """Who `audience: {}` selects, from the gateway's own list (friends, not coworkers), not from our database."""
    assert isinstance(gateway, SandboxGateway)
    return {c.id for c in gateway._all_contacts() if c.friend and not c.coworker}


def test_a_run_after_an_interrupted_sync_refuses_the_partial_list_then_syncs_first(make_settings: MakeSettings) -> None:
    """A sync stopped after one of three pages leaves a list that planning refuses (saying which sync and what to do);
    `ensure_contacts` (what `wecast run` and the scheduler call first) syncs again and the run plans the whole
    audience. (Before issue 7 the run planned on the 500 contacts written and reported `completed`.)"""
    settings = make_settings(contacts=CONTACTS)

    async def go() -> None:
        app = Wecast(settings, clock=FakeClock(MONDAY_10))
        await app.start()
        interrupt_after(app.gateway, 1)
        with pytest.raises(TransientError, match="interrupted here"):
            await app.sync()
        assert 0 < contacts_db.count_contacts(app.db) < CONTACTS
        assert app.contact_list() is ListState.INCOMPLETE
        spec = campaign(settings, PLAIN)
        with pytest.raises(WecastError, match=r"the contact list is incomplete: contact sync 1 \(started 2026-01-05"):
            app.plan(spec)
        with pytest.raises(WecastError, match="incomplete"):
            app.preview(spec)
        assert await app.ensure_contacts() is not None
        assert app.contact_list() is ListState.WHOLE
        planned = app.plan(spec)
        assert planned.planned == len(audience(app.gateway))
        await app.close()

    run(go())


def test_two_processes_syncing_a_fresh_database_at_once_neither_crash_nor_plan_on_a_partial_list(
    make_settings: MakeSettings,
) -> None:
    """Two apps with their own connections (two processes) sync one empty database at the same moment and each
    plans right after its sync: no unique-key crash (contacts.id, tags_pkey), and both plan the whole audience (the
    second waits for the first's sync, then syncs itself)."""
    settings = make_settings(contacts=CONTACTS)

    async def go() -> None:
        # Real clocks: the one waiting judges the other's heartbeat by the time they share.
        one = Wecast(settings)
        two = Wecast(settings)
        await one.start()
        await two.start()

        async def sync_and_plan(app: Wecast, name: str) -> int:
            await app.ensure_contacts()
            return app.plan(campaign(settings, PLAIN, name)).planned

        planned = await asyncio.gather(sync_and_plan(one, "a"), sync_and_plan(two, "b"))
        assert planned == [len(audience(one.gateway))] * 2
        syncs = [contacts_db.latest_sync(one.db)]
        assert syncs[0] is not None and syncs[0].finished
        await one.close()
        await two.close()

    run(go())


def test_an_interrupted_sync_run_again_records_each_change_once(make_settings: MakeSettings) -> None:
    """After a first (baseline) sync, two contacts come back — one on the first page, one on the last. A sync
    interrupted after the first page and then run again records each return exactly once (before issue 7 the one on
    the first page was lost: its change was written by the interrupted sync, which recorded no events)."""
    settings = make_settings(contacts=CONTACTS)

    async def go() -> None:
        app = await started(settings)
        ids = sorted(contacts_db.unlisted(app.db, set()))
        first_page, last_page = ids[0], ids[-1]
        contacts_db.mark_gone(app.db, [first_page, last_page], app.clock.now())
        interrupt_after(app.gateway, 1)
        with pytest.raises(TransientError):
            await app.sync()
        await app.sync()
        await app.sync()  # nothing changed since: nothing more recorded
        events = journeys_db.recent_events(app.db, limit=100)
        added = [e.contact_id for e in events if e.kind is CustomerEventKind.CONTACT_ADDED]
        assert sorted(added) == sorted([first_page, last_page])
        # A contact who comes back brings their tags (tag_added each): every event once.
        keys = [(e.kind, e.contact_id, e.data.get("tag_id", "")) for e in events]
        assert {c for _, c, _ in keys} == {first_page, last_page} and len(keys) == len(set(keys))
        await app.close()

    run(go())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # timing on the fake clock
def test_a_run_waiting_out_quiet_hours_keeps_its_heartbeat_fresh(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run planned at 22:00 with quiet hours until 09:00 waits eleven hours: it beats at least every
    `BEAT_WITHIN` seconds all along, so no other host ever finds its heartbeat older than `STALE_AFTER` (before
    issue 7 it beat once a minute — exactly `STALE_AFTER` — while it waited)."""
    settings = make_settings(contacts=10)
    clock = FakeClock(datetime(2026, 1, 5, 14, 0, tzinfo=UTC))  # 22:00 Shanghai
    beats: list[datetime] = []
    original = runs_db.heartbeat

    def recording(db: Any, run_id: int, now: datetime) -> None:
        beats.append(now)
        original(db, run_id, now)

    monkeypatch.setattr(runs_db, "heartbeat", recording)

    async def go() -> None:
        app = await started(settings, clock)
        body = PLAIN.replace("quiet_hours: false", 'quiet_hours: {start: "21:00", end: "09:00"}')
        started_at = clock.now()
        outcome = await app.run_campaign(campaign(settings, body))
        assert outcome.summary is not None and outcome.summary.status == "completed"
        times = [started_at, *beats]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert clock.now() - started_at > timedelta(hours=10)
        assert max(gaps) <= timedelta(seconds=BEAT_WITHIN) < STALE_AFTER
        await app.close()

    run(go())


def test_a_sync_writes_in_few_transactions_and_beats_while_a_slow_gateway_pages(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync writes thousands of contacts a transaction, not one 500-contact page each (a commit per page cost a
    big first sync more than its rows), yet never goes `HEARTBEAT_EVERY` seconds without a write — each is the
    sync's heartbeat, nor `BEAT_WITHIN` — when every page of the gateway takes 2 s; every contact arrives, once."""
    settings = make_settings(contacts=12_000)  # 24 pages of 500
    clock = FakeClock(MONDAY_10)
    writes: list[tuple[datetime, int]] = []
    original = contacts_db.upsert_contacts

    def recording(db: Any, rows: Any, now: datetime) -> tuple[int, int]:
        writes.append((now, len(rows)))
        return original(db, rows, now)

    monkeypatch.setattr(contacts_db, "upsert_contacts", recording)

    async def go(page_seconds: float) -> int:
        writes.clear()
        app = Wecast(settings, clock=clock)
        await app.start()
        fetch = app.gateway.list_contacts

        async def slow(cursor: str | None = None, page_size: int = 500) -> ContactPage:
            clock.advance(page_seconds)
            return await fetch(cursor, page_size)

        app.gateway.list_contacts = slow  # type: ignore[method-assign]
        result = await app.sync()
        count = contacts_db.count_contacts(app.db)
        await app.close()
        assert result.seen == count == 12_000
        return count

    run(go(0))
    assert len(writes) == 3 and sum(n for _, n in writes) == 12_000  # 5,000 + 5,000 + 2,000
    run(go(2.0))
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise([(MONDAY_10, 0), *writes])]
    # A write at the first page past the beat (the page fetched ahead counts too), well within BEAT_WITHIN.
    assert max(gaps) <= timedelta(seconds=HEARTBEAT_EVERY + 2 * 2.0) <= timedelta(seconds=BEAT_WITHIN)
    assert 3 < len(writes) < 24


def test_a_nul_in_a_customers_text_does_not_stop_the_sync(make_settings: MakeSettings) -> None:
    """A customer whose name, remark or phone carries a NUL character (PostgreSQL's text refuses it: the whole
    sync failed there) is synced without it, on every backend; JSON fields keep it, as JSON's escape."""
    from engine.contacts import record_to_row
    from engine.gateways.base import ContactRecord

    app = Wecast(make_settings(contacts=5), clock=FakeClock(MONDAY_10))
    record = ContactRecord(
        "wm-nul", name="张\x00三", alias="老\x00客户", phones=("138\x000000",), additional_info={"备注": "a\x00b"}
    )
    contacts_db.upsert_contacts(app.db, [record_to_row(record)], MONDAY_10)
    [view] = journeys_db.contact_views(app.db, ["wm-nul"]).values()
    assert (view["name"], view["alias"], list(view["phones"])) == ("张三", "老客户", ["1380000"])
    assert view["additional_info"] == {"备注": "a\x00b"}
    app.db.dispose()

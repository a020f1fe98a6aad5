"""Staff without a WeCom interoperability licence: `batch/get_by_user` leaves their customers out (naming them in
`fail_info.unlicensed_userid_list`, or answering 701008 when no member of the call has a licence). A sync keeps the
customers they follow as they were — not removed, no removal events for journeys — and says which staff it could
not read and why (`unread_staff`, stable reason "unlicensed"). Against the fake WeCom on loopback."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from helpers import MONDAY_10

from engine.clock import FakeClock
from engine.gateways.base import UnreadStaff
from engine.gateways.wecom.fake_server import FakeWecom, FakeWecomServer
from engine.journeys.events import CustomerEventKind
from storage import contacts as contacts_db
from storage import journeys as journeys_db

try:
    from wecom_harness import started, wecom_config
except ImportError:  # pragma: no cover
    from tests.wecom_harness import started, wecom_config


def _removed_events(db: object) -> list[str]:
    return sorted(
        e.contact_id
        for e in journeys_db.recent_events(db, limit=10_000)  # type: ignore[arg-type]
        if e.kind is CustomerEventKind.CONTACT_REMOVED
    )


def test_customers_of_unlicensed_staff_are_kept_and_named(
    tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """After a whole sync, one of three staff members loses the licence and another staff member really deletes a
    customer: the next sync removes that one customer (one removal event) and keeps every customer of the
    unlicensed member as they were, and its result and log name the member and the reason."""
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        fake = FakeWecom(clock=clock, customers=250, staff=3)
        server = FakeWecomServer(fake)
        url = await server.start()
        app = await started(wecom_config(tmp_path, db_url, fake, url), clock)
        try:
            first = await app.sync()
            assert (first.seen, first.unread_staff, first.kept) == (250, [], 0)
            lost, other = fake.staff[1], fake.staff[0]
            theirs = set(fake.customers_of(lost))
            deleted = next(c for c in fake.customers_of(other) if c not in theirs)
            fake.remove_follow(other, deleted)
            fake.unlicensed = {lost}
            only_theirs = {c for c in theirs if not any(c in fake.customers_of(s) for s in fake.staff if s != lost)}
            assert len(only_theirs) > 50  # spread over three pages of batch/get_by_user
            with caplog.at_level(logging.WARNING):
                second = await app.sync()
            assert second.unread_staff == [UnreadStaff(lost, "unlicensed")]
            assert (second.removed, second.kept) == (1, len(only_theirs))
            assert second.seen == 250 - 1 - len(only_theirs)
            assert set(contacts_db.unlisted(app.db, set())) == set(fake.customers) - {deleted}  # nobody else gone
            assert _removed_events(app.db) == [deleted]
            assert any(lost in r.getMessage() and "unlicensed" in r.getMessage() for r in caplog.records)
            fake.unlicensed = set()  # the licence back: a whole sync again, nothing added twice, nothing removed
            third = await app.sync()
            assert (third.seen, third.removed, third.added, third.kept, third.unread_staff) == (249, 0, 0, 0, [])
        finally:
            await app.close()
            await server.stop()

    asyncio.run(go())


def test_no_licensed_staff_at_all_removes_nobody(tmp_path: Path, db_url: str) -> None:
    """Every staff member without a licence: WeCom answers 701008; the sync lists nobody but removes nobody, and
    names all of them."""
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        fake = FakeWecom(clock=clock, customers=40, staff=2)
        server = FakeWecomServer(fake)
        url = await server.start()
        app = await started(wecom_config(tmp_path, db_url, fake, url), clock)
        try:
            assert (await app.sync()).seen == 40
            fake.unlicensed = set(fake.staff)
            second = await app.sync()
            assert second.unread_staff == [UnreadStaff(s, "unlicensed") for s in sorted(fake.staff)]
            assert (second.seen, second.removed, second.kept) == (0, 0, 40)
            assert len(contacts_db.unlisted(app.db, set())) == 40
            assert _removed_events(app.db) == []
        finally:
            await app.close()
            await server.stop()

    asyncio.run(go())

"""The run summary the console draws, counted by the database on SQLite and PostgreSQL: sends per time bucket and
deliveries by reason."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from helpers import MONDAY_10, PLAIN, campaign, run, started

from engine.clock import FakeClock
from engine.settings import Settings
from storage import deliveries as deliveries_db
from storage.deliveries import Result
from storage.models import DeliveryStatus

MakeSettings = Callable[..., Settings]


def test_send_times_and_reasons_are_counted_by_the_database(make_settings: MakeSettings) -> None:
    """A run's sends fall into equal time buckets from its first send (every sent delivery counted once, the last
    one in the last bucket), and failures and skips are counted by reason, most frequent first."""
    settings = make_settings(contacts=30, faults="{error_rate: 0}")

    async def go() -> None:
        app = await started(settings, FakeClock(MONDAY_10))
        try:
            plan = app.plan(campaign(settings, PLAIN))
            rows = deliveries_db.list_deliveries(app.db, run_id=plan.run_id, limit=100)
            assert len(rows) >= 20
            results = []
            for i, d in enumerate(rows):
                if i < 3:
                    results.append(Result(d.id, DeliveryStatus.FAILED, reason="not a friend"))
                elif i < 4:
                    results.append(Result(d.id, DeliveryStatus.FAILED, reason="blocked"))
                elif i < 6:
                    results.append(Result(d.id, DeliveryStatus.SKIPPED, reason="run cancelled"))
                else:  # one send a minute over the 14 minutes after the first
                    results.append(Result(d.id, DeliveryStatus.SENT, sent_at=MONDAY_10 + timedelta(minutes=i % 15)))
            deliveries_db.write_results(app.db, results, MONDAY_10)
            sent = sum(r.status is DeliveryStatus.SENT for r in results)

            times = deliveries_db.send_times(app.db, plan.run_id, [DeliveryStatus.SENT], buckets=7)
            assert times.start == min(r.sent_at for r in results if r.sent_at)
            assert times.width == 120.0 and len(times.counts) == 7  # 14 minutes in 7 buckets of 2
            assert sum(times.counts) == sent
            assert times.counts[-1] > 0  # the last send is in the last bucket

            reasons = deliveries_db.reason_counts(app.db, plan.run_id, [DeliveryStatus.FAILED, DeliveryStatus.SKIPPED])
            assert [(r.status, r.reason, r.count) for r in reasons] == [
                (DeliveryStatus.FAILED, "not a friend", 3),
                (DeliveryStatus.SKIPPED, "run cancelled", 2),
                (DeliveryStatus.FAILED, "blocked", 1),
            ]
            newest = deliveries_db.list_deliveries(app.db, run_id=plan.run_id, limit=10)
            older = deliveries_db.list_deliveries(app.db, run_id=plan.run_id, limit=10, before=newest[-1].id)
            assert [d.id for d in older] == [d.id for d in rows[10:20]]  # keyset: the next ten, newest first
            empty = deliveries_db.send_times(app.db, plan.run_id, [DeliveryStatus.UNKNOWN])
            assert empty.start is None and empty.counts == []
        finally:
            await app.close()

    run(go())

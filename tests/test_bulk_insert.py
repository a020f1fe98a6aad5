"""The planning bulk insert (storage._sql.insert_fast: SQLite's executemany, PostgreSQL's COPY through a staging
table): rows whose dedupe key is held, or whose contact is already in the run, are passed over and not counted;
values round-trip (times, flags, reasons, whole messages); several column sets in one transaction; rows keep their
order (delivery ids follow the input), on both backends."""

from __future__ import annotations

from datetime import UTC, datetime

from storage import deliveries as deliveries_db
from storage.db import make_db_engine
from storage.deliveries import Planned
from storage.models import DeliveryStatus
from storage.runs import NewRun, create_run

NOW = datetime(2026, 12, 1, 2, 3, 4, 567000, tzinfo=UTC)


def test_conflicts_are_passed_over_and_values_round_trip(db_url: str) -> None:
    """Two chunks and three column sets in one transaction: every new row written once, in order, with its values;
    a held dedupe key or a contact already in the run is skipped and not counted."""
    db = make_db_engine(db_url)
    with db.begin() as conn:
        run_id, _ = create_run(
            conn, NewRun("c1", "slot-1", "manual", "Asia/Shanghai", {"version": 1, "timezone": "UTC"}, NOW)
        )
        first = [Planned(f"wm{i:05d}", f"客户{i}", f"您好{i}", f"c1|slot-1|wm{i:05d}") for i in range(7)]
        wrote = deliveries_db.insert_planned(
            conn, run_id, "c1", first, status=DeliveryStatus.PENDING, capped=True, now=NOW
        )
        assert wrote == 7
        again = [
            Planned("wm00003", "客户3", "又一次", "c1|slot-1|other-key"),  # contact already in the run
            Planned("wm09999", "新客户", "新", "c1|slot-1|wm00001"),  # dedupe key held
            Planned("wm00100", "客户100", "新的", "c1|slot-1|wm00100"),
        ]
        assert (
            deliveries_db.insert_planned(conn, run_id, "c1", again, status=DeliveryStatus.PENDING, capped=True, now=NOW)
            == 1
        )
        skipped = [Planned("wm00200", "客户200", "", "c1|slot-1|wm00200", reason="opted_out: 已退订")]
        assert (
            deliveries_db.insert_planned(
                conn, run_id, "c1", skipped, status=DeliveryStatus.SKIPPED, capped=False, now=NOW
            )
            == 1
        )
        rich = [Planned("wm00300", "客户300", "海报", "c1|slot-1|wm00300", message='{"parts": []}')]
        assert (
            deliveries_db.insert_planned(
                conn, run_id, "c1", rich, status=DeliveryStatus.PENDING, capped=True, now=NOW, with_message=True
            )
            == 1
        )
    rows = sorted(deliveries_db.list_deliveries(db, run_id=run_id, limit=100), key=lambda r: r.id)
    assert [r.contact_id for r in rows] == [*(f"wm{i:05d}" for i in range(7)), "wm00100", "wm00200", "wm00300"]
    assert rows[3].text == "您好3" and rows[1].dedupe_key == "c1|slot-1|wm00001"
    assert all(r.created_at == NOW and r.updated_at == NOW for r in rows)
    assert [r.capped for r in rows] == [True] * 8 + [False, True]
    assert rows[8].status is DeliveryStatus.SKIPPED and rows[8].reason == "opted_out: 已退订"
    assert rows[9].message == '{"parts": []}' and rows[0].message is None
    db.dispose()

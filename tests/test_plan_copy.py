"""Planning's fast path on PostgreSQL (issue 13): each chunk is one binary COPY straight into `deliveries`, written
while the next chunk renders, and the run foreign key is checked once a statement. What must not change, on both
backends: a delivery never names a run that does not exist and a run with deliveries cannot be deleted; a plan that
collides with a dedupe key taken behind its back still plans every other recipient once (the collided one is not
written twice); values round-trip; a schema-5 PostgreSQL database is migrated to the statement check with its
deliveries kept."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from helpers import MONDAY_10, PLAIN, campaign, run, started
from sqlalchemy import delete, inspect, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from engine import plan
from engine.plan import dedupe_key, plan_run, run_key_for
from engine.service import Wecast
from engine.settings import Settings
from storage import deliveries as deliveries_db
from storage import runs as runs_db
from storage.db import make_db_engine, schema_version
from storage.deliveries import Planned
from storage.models import DELIVERIES, META, RUNS, SCHEMA_VERSION, DeliveryStatus
from storage.runs import NewRun, create_run

MakeSettings = Callable[..., Settings]


@pytest.fixture
def app(make_settings: MakeSettings) -> Wecast:
    return run(started(make_settings(contacts=40)))


def _new_run(conn: Connection, key: str) -> int:
    run_id, _ = create_run(conn, NewRun("other", key, "manual", "Asia/Shanghai", {}, MONDAY_10))
    return run_id


def _copy_one(conn: Connection, run_id: int) -> None:
    """One pending delivery for `run_id` through the plan's writer (PostgreSQL: its background COPY)."""
    writer = deliveries_db.PlanWriter(
        conn, run_id, "other", key_prefix=f"other|{run_id}|", capped=False, now=MONDAY_10, with_messages=False
    )
    try:
        writer.pending(["wm2"], [""], ["hi"])
        writer.start()
        writer.wait()
    finally:
        writer.close()


def _insert_one(conn: Connection, run_id: int) -> None:
    """One pending delivery for `run_id` through a plain insert (`insert_planned`)."""
    deliveries_db.insert_planned(
        conn, run_id, "other", [Planned("wm3", "", "hi", f"other|{run_id}|wm3")], status=DeliveryStatus.PENDING,
        capped=False, now=MONDAY_10,
    )  # fmt: skip


def test_a_plan_in_small_chunks_writes_each_recipient_once_with_its_values(
    app: Wecast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of 3 (the copy of one overlapping the render of the next): every recipient once, in contact order,
    with its text, dedupe key, times and flags; skipped contacts with their reason; the counts agree."""
    monkeypatch.setattr(plan, "CHUNK", 3)
    c = campaign(app.settings, PLAIN.replace("audience: {}", "audience: {tags_none: [勿扰]}"))
    result = plan_run(app.db, c, now=MONDAY_10)
    rows = sorted(deliveries_db.list_deliveries(app.db, run_id=result.run_id, limit=1000), key=lambda r: r.id)
    pending = [r for r in rows if r.status is DeliveryStatus.PENDING]
    skipped = [r for r in rows if r.status is DeliveryStatus.SKIPPED]
    assert result.planned == len(pending) > 10 and result.skipped == len(skipped)
    assert [r.contact_id for r in pending] == sorted(r.contact_id for r in pending)
    key = run_key_for(c, MONDAY_10)
    assert all(r.dedupe_key == dedupe_key(c, key, r.contact_id) for r in pending)
    assert all(r.text.endswith("您好，测试消息。") and r.message is None and r.reason == "" for r in pending)
    assert all(r.created_at == MONDAY_10 == r.updated_at and r.capped is False for r in rows)
    assert all(r.dedupe_key is None and r.reason for r in skipped)
    run_row = runs_db.get_run(app.db, result.run_id)
    assert run_row is not None and (run_row.planned, run_row.skipped_at_plan) == (len(pending), len(skipped))
    run(app.close())


def test_a_dedupe_key_taken_behind_the_plans_back_is_passed_over(app: Wecast, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer holds the dedupe key the plan will give one recipient (taken after the plan's checks could
    see it): the plan still writes every other recipient exactly once and that key once in all (on PostgreSQL the
    straight COPY fails, everything rolls back, and the plan runs again the careful way)."""
    monkeypatch.setattr(plan, "CHUNK", 4)
    c = campaign(app.settings, PLAIN)
    everyone = plan_run(app.db, c, now=MONDAY_10, run_key="probe")  # who the plan picks, in a run of its own
    probe = deliveries_db.list_deliveries(app.db, run_id=everyone.run_id, limit=1000)
    victim = sorted(r.contact_id for r in probe)[5]
    taken = dedupe_key(c, "r", victim)
    with app.db.begin() as conn:
        other = _new_run(conn, "taken")
        deliveries_db.insert_planned(
            conn, other, "other", [Planned("someone", "", "x", taken)], status=DeliveryStatus.PENDING, capped=False,
            now=MONDAY_10,
        )  # fmt: skip
    attempts: list[bool] = []
    real = plan._plan

    def recorded(*args: Any, careful: bool) -> plan.PlanResult:
        attempts.append(careful)
        return real(*args, careful=careful)

    monkeypatch.setattr(plan, "_plan", recorded)
    result = plan_run(app.db, c, now=MONDAY_10, run_key="r")
    # PostgreSQL's straight copy collided and the plan ran again the careful way; SQLite passed over the row at once.
    assert attempts == ([False, True] if app.db.dialect.name == "postgresql" else [False])
    rows = [
        r
        for r in deliveries_db.list_deliveries(app.db, run_id=result.run_id, limit=1000)
        if r.status is DeliveryStatus.PENDING
    ]
    assert result.planned == everyone.planned - 1 == len(rows)
    assert victim not in {r.contact_id for r in rows}
    assert len({r.contact_id for r in rows}) == len(rows)
    runs = [r for r in runs_db.list_runs(app.db) if r.campaign_id == c.id and r.run_key == "r"]
    assert len(runs) == 1  # the first attempt's run was rolled back with it
    run(app.close())


def test_deliveries_always_name_a_run_that_exists(db_url: str) -> None:
    """The run check holds on both backends (PostgreSQL: once a statement, SQLite: its foreign key): a delivery for
    a run that does not exist is refused, through the plan's copy and through a plain insert; a run that deliveries
    name cannot be deleted nor renumbered; a run without deliveries can be deleted."""
    db = make_db_engine(db_url)
    with db.begin() as conn:
        run_id = _new_run(conn, "k1")
        empty = _new_run(conn, "k2")
        writer = deliveries_db.PlanWriter(
            conn, run_id, "other", key_prefix="other|k1|", capped=False, now=MONDAY_10, with_messages=False
        )
        writer.pending(["wm1"], ["客户"], ["您好"])
        writer.start()
        writer.wait()
        writer.close()
        assert writer.pending_count == 1
    if db.dialect.name == "postgresql":
        with pytest.raises(IntegrityError), db.begin() as conn:
            _copy_one(conn, 999_999)
    with pytest.raises(IntegrityError), db.begin() as conn:
        _insert_one(conn, 999_999)
    with pytest.raises(IntegrityError), db.begin() as conn:
        conn.execute(delete(RUNS).where(RUNS.c.id == run_id))
    with pytest.raises(IntegrityError), db.begin() as conn:
        conn.execute(update(RUNS).where(RUNS.c.id == run_id).values(id=777_777))
    with pytest.raises(IntegrityError), db.begin() as conn:
        conn.execute(update(DELIVERIES).where(DELIVERIES.c.run_id == run_id).values(run_id=888_888))
    with db.begin() as conn:
        conn.execute(delete(RUNS).where(RUNS.c.id == empty))
        conn.execute(update(RUNS).where(RUNS.c.id == run_id).values(status="paused"))  # not its id: allowed
    assert [r.contact_id for r in deliveries_db.list_deliveries(db, run_id=run_id, limit=10)] == ["wm1"]
    db.dispose()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_schema_5_postgresql_database_gets_the_statement_check(db_url: str) -> None:
    """A database from before (schema 5: deliveries' run foreign key, no triggers) is migrated on open: the foreign
    key gives way to the statement check, its deliveries are kept, and the check refuses a delivery without a run."""
    db = make_db_engine(db_url)
    with db.begin() as conn:
        run_id = _new_run(conn, "old")
        deliveries_db.insert_planned(
            conn, run_id, "other", [Planned("wm1", "", "hi", "other|old|wm1")], status=DeliveryStatus.PENDING,
            capped=False, now=MONDAY_10,
        )  # fmt: skip
        for trigger in ("wecast_deliveries_runs_exist", "wecast_delivery_run_changed"):
            conn.execute(text(f"DROP TRIGGER {trigger} ON deliveries"))
        for trigger in ("wecast_run_deleted", "wecast_run_id_changed"):
            conn.execute(text(f"DROP TRIGGER {trigger} ON campaign_runs"))
        conn.execute(text("ALTER TABLE deliveries ADD FOREIGN KEY (run_id) REFERENCES campaign_runs (id)"))
        conn.execute(text(f"UPDATE {META.name} SET value = '5' WHERE key = 'schema_version'"))
    db.dispose()
    db = make_db_engine(db_url)
    assert schema_version(db) == SCHEMA_VERSION == 6
    with db.connect() as conn:
        assert inspect(conn).get_foreign_keys(DELIVERIES.name) == []
        names = {r[0] for r in conn.execute(text("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"))}
    assert {"wecast_deliveries_runs_exist", "wecast_delivery_run_changed", "wecast_run_deleted"} <= names
    assert [r.contact_id for r in deliveries_db.list_deliveries(db, run_id=run_id, limit=10)] == ["wm1"]
    with pytest.raises(IntegrityError), db.begin() as conn:
        _insert_one(conn, 999_999)
    with pytest.raises(IntegrityError), db.begin() as conn:
        _copy_one(conn, 999_999)
    with pytest.raises(IntegrityError), db.begin() as conn:
        conn.execute(delete(RUNS).where(RUNS.c.id == run_id))
    db.dispose()

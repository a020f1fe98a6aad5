"""Storage on SQLite and on PostgreSQL (`db_url`, see conftest.py): the schema carries a version from day one;
times are stored UTC and come back aware; the fast planning path agrees with the ORM path; dedupe keys, cap
counts, crash recovery and claims behave the same on both backends."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from helpers import CAPPED, MONDAY_10, PLAIN, campaign, outbox_by_contact, run, started
from sqlalchemy import event, func, inspect, select, update
from sqlalchemy.pool import Pool

from engine.clock import FakeClock
from engine.contacts import SyncResult
from engine.gateways.sandbox import SandboxGateway
from engine.plan import build_preview, plan_run
from engine.service import Wecast
from engine.settings import SandboxSettings, Settings
from storage import db as storage_db
from storage import deliveries as deliveries_db
from storage import runs as runs_db
from storage.contacts import load_contact_views
from storage.db import CONNECT_TIMEOUT, SchemaError, make_db_engine, schema_version
from storage.deliveries import Planned, Result
from storage.models import CONTACTS, DELIVERIES, META, SCHEMA_VERSION, DeliveryStatus
from storage.runs import NewRun

MakeSettings = Callable[..., Settings]


def new_run(run_key: str, created_at: datetime) -> NewRun:
    return NewRun(
        campaign_id="c", run_key=run_key, trigger="manual", timezone="Asia/Shanghai", settings={}, created_at=created_at
    )


def test_new_database_records_the_schema_version_and_reopens_cleanly(db_url: str) -> None:
    """A new database gets every table and SCHEMA_VERSION once; opening it again changes nothing."""
    first = make_db_engine(db_url)
    assert schema_version(first) == SCHEMA_VERSION
    tables = set(inspect(first).get_table_names())
    assert {"contacts", "tags", "contact_tags", "campaign_runs", "deliveries", "wecast_meta"} <= tables
    first.dispose()
    again = make_db_engine(db_url)
    assert schema_version(again) == SCHEMA_VERSION
    with again.connect() as conn:
        assert conn.execute(select(func.count()).select_from(META)).scalar() == 1
    assert set(inspect(again).get_table_names()) == tables
    again.dispose()


def test_a_database_from_a_newer_release_is_refused_not_damaged(db_url: str) -> None:
    """A database written by a newer wecast is refused with a clear error instead of being altered."""
    db = make_db_engine(db_url)
    with db.begin() as conn:
        conn.execute(update(META).where(META.c.key == "schema_version").values(value=str(SCHEMA_VERSION + 1)))
    db.dispose()
    with pytest.raises(SchemaError, match="newer than this wecast"):
        make_db_engine(db_url)


def test_a_refused_database_leaves_no_connection_open(db_url: str) -> None:
    """`make_db_engine` refusing a database (here a newer release's) closes the connection it opened to check:
    it stayed in the pool of an engine nobody held, closed by no one (psycopg: "deleted while still open")."""
    db = make_db_engine(db_url)
    with db.begin() as conn:
        conn.execute(update(META).where(META.c.key == "schema_version").values(value=str(SCHEMA_VERSION + 1)))
    db.dispose()
    opened: list[Any] = []

    def remember(dbapi_connection: Any, _record: Any) -> None:
        opened.append(dbapi_connection)

    event.listen(Pool, "connect", remember)
    try:
        with pytest.raises(SchemaError):
            make_db_engine(db_url)
    finally:
        event.remove(Pool, "connect", remember)
    assert opened

    def is_open(dbapi_connection: Any) -> bool:
        if isinstance(dbapi_connection, sqlite3.Connection):
            try:
                dbapi_connection.execute("SELECT 1")
            except sqlite3.ProgrammingError:  # "Cannot operate on a closed database."
                return False
            return True
        return not dbapi_connection.closed

    assert [c for c in opened if is_open(c)] == []


def test_times_are_stored_utc_and_returned_aware(db_url: str) -> None:
    """An aware time in any zone is stored as naive UTC and read back aware (UTC); a naive time is rejected."""
    db = make_db_engine(db_url)
    shanghai = timezone(timedelta(hours=8))
    when = datetime(2026, 1, 5, 10, 0, tzinfo=shanghai)
    recorded = runs_db.record_plan(db, new_run("k", when), [], capped=False)
    stored = runs_db.get_run(db, recorded.run_id)
    with db.connect() as conn:
        raw = conn.exec_driver_sql("SELECT created_at FROM campaign_runs").scalar_one()
    assert stored is not None and stored.created_at == when and stored.created_at.tzinfo is UTC
    assert str(raw).startswith("2026-01-05 02:00:00")
    with pytest.raises(Exception, match="naive datetime"):
        runs_db.record_plan(db, new_run("k2", datetime(2026, 1, 5, 10, 0)), [], capped=False)
    db.dispose()


def test_the_fast_planning_path_and_the_orm_agree_on_times(db_url: str) -> None:
    """Times written by the planner's DB-API fast path and by the ORM type read back equal, whatever the session's
    time zone (Asia/Shanghai on PostgreSQL here), and the cap counts and last sends read them right."""
    db = make_db_engine(db_url)
    at = datetime(2026, 3, 1, 23, 30, 15, 123456, tzinfo=UTC)
    recorded = runs_db.record_plan(
        db,
        NewRun(campaign_id="t", run_key="k", trigger="manual", timezone="UTC", settings={}, created_at=at),
        [Planned("c1", "", "", "t|k|c1")],
        capped=True,
    )
    [row] = deliveries_db.list_deliveries(db, run_id=recorded.run_id)
    new_york = at.astimezone(ZoneInfo("America/New_York"))
    deliveries_db.write_results(db, [Result(row.id, DeliveryStatus.SENT, sent_at=new_york)], at)
    [again] = deliveries_db.list_deliveries(db, run_id=recorded.run_id)
    assert again.created_at == again.sent_at == again.updated_at == at
    assert deliveries_db.cap_counts(db, at, at + timedelta(microseconds=1)) == {"c1": 1}
    assert deliveries_db.cap_counts(db, at + timedelta(microseconds=1), at + timedelta(days=1)) == {}
    assert deliveries_db.last_sends(db, "t", at - timedelta(hours=1)) == {"c1": at}
    with db.connect() as conn:
        stored = conn.exec_driver_sql("SELECT created_at, sent_at FROM deliveries").one()
    assert tuple(str(v) for v in stored) == (str(at.replace(tzinfo=None)),) * 2, "stored as naive UTC"
    db.dispose()


def test_contact_sync_from_the_sandbox(make_settings: MakeSettings, tmp_path: Path) -> None:
    """A sandbox sync stores 300 contacts with tags, JSON and aware UTC times; a second sync changes nothing."""
    settings = make_settings(contacts=300)

    async def go() -> tuple[SyncResult, SyncResult, Wecast]:
        gw = SandboxGateway(SandboxSettings(state_file=tmp_path / "s.sqlite", contacts=300))
        app = Wecast(settings, gateway=gw, clock=FakeClock(MONDAY_10))
        await app.start()
        first, again = await app.sync(), await app.sync()
        await app.gateway.close()
        return first, again, app

    first, again, app = run(go())
    assert first.seen == first.added == 300 and first.tags > 0
    assert (again.added, again.updated, again.removed) == (0, 0, 0)
    views = load_contact_views(app.db)
    with app.db.connect() as conn:
        orm = {r.id: r for r in conn.execute(select(CONTACTS))}
    assert len(views) == 300 and [v["id"] for v in views] == sorted(orm)
    assert any(v["tags_named"] for v in views)
    for v in views:
        assert isinstance(v["phones"], list) and isinstance(v["additional_info"], dict)
        assert v["created_at"] == orm[v["id"]].created_at == MONDAY_10
        if v["added_at"] is not None:
            assert v["added_at"].tzinfo is not None and v["added_at"] == orm[v["id"]].added_at
        assert all(type(v[flag]) is bool and v[flag] == getattr(orm[v["id"]], flag) for flag in FLAGS)
        assert list(v)[-2:] == ["tags", "tags_named"] and next(iter(v)) == "id"
    # A plan's read of some columns: the same values, in the same order, as the view of every column.
    some = {"name", "friend", "added_at", "phones", "city"}
    for part, whole in zip(load_contact_views(app.db, columns=some), views, strict=True):
        assert list(part.items()) == [(k, v) for k, v in whole.items() if k in some | {"id", "tags", "tags_named"}]
    app.db.dispose()


FLAGS = ("friend", "coworker", "star")


def test_preview_and_plan_record_skips_and_replanning_is_idempotent(make_settings: MakeSettings) -> None:
    """plan_run writes what build_preview shows (pending and skipped rows); planning the run again adds nothing,
    and a dedupe: once campaign skips everyone its earlier run holds."""
    settings = make_settings(contacts=120)
    app = run(started(settings))
    body = PLAIN.replace("audience: {}", "audience: {tags_none: [勿扰]}") + "dedupe: once\n"
    c = campaign(settings, body)
    preview = build_preview(app.db, c, now=MONDAY_10, run_key="r1")
    assert preview.recipients and preview.excluded
    first = plan_run(app.db, c, now=MONDAY_10, run_key="r1")
    assert first.created and first.planned == len(preview.recipients)
    assert first.skipped == sum(1 for e in preview.excluded if e.recorded)
    again = plan_run(app.db, c, now=MONDAY_10, run_key="r1")
    assert not again.created and again.run_id == first.run_id
    assert deliveries_db.status_counts(app.db, first.run_id) == {"pending": first.planned, "skipped": first.skipped}
    keys = deliveries_db.held_keys(app.db, c.id)
    assert len(keys) == first.planned
    assert all(k.startswith("c1|once|") and v.run_id == first.run_id for k, v in keys.items())
    later = build_preview(app.db, c, now=MONDAY_10, run_key="r2")
    assert later.recipients == []
    assert sum(e.category == "dedupe" for e in later.excluded) == first.planned
    run(app.close())


def test_cap_counts_span_campaigns_and_local_days(make_settings: MakeSettings) -> None:
    """With a cap of one message a day, cap_counts sees what another campaign sent that Shanghai day — for all
    contacts, for some, or leaving a run out — and nothing the next local day."""
    settings = make_settings(contacts=40)
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        app = await started(settings, clock)
        sent = (await app.run_campaign(campaign(settings, CAPPED, "a"))).summary
        assert sent is not None and sent.sent > 10
        day = (datetime(2026, 1, 4, 16, tzinfo=UTC), datetime(2026, 1, 5, 16, tzinfo=UTC))
        counts = deliveries_db.cap_counts(app.db, *day)
        assert set(counts.values()) == {1} and len(counts) == sent.sent
        some = sorted(counts)[:5]
        assert deliveries_db.cap_counts(app.db, *day, contact_ids=some) == dict.fromkeys(some, 1)
        assert deliveries_db.cap_counts(app.db, *day, exclude_run=sent.run_id) == {}
        tuesday = (datetime(2026, 1, 5, 16, tzinfo=UTC), datetime(2026, 1, 6, 16, tzinfo=UTC))
        assert deliveries_db.cap_counts(app.db, *tuesday) == {}
        assert set(outbox_by_contact(app.gateway).values()) == {1}
        await app.close()

    asyncio.run(go())


def test_dedupe_window_reads_last_sends_and_campaign_keys(make_settings: MakeSettings) -> None:
    """A 7-day dedupe window reads this campaign's last sends (aware UTC) and keys only — not those of a campaign
    whose id extends it (`win2` beside `win`, a key range that linguistic collations would get wrong)."""
    settings = make_settings(contacts=40)
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        app = await started(settings, clock)
        w1 = (await app.run_campaign(campaign(settings, PLAIN + "dedupe: 7d\n", "win"), run_key="w1")).summary
        other = (await app.run_campaign(campaign(settings, PLAIN, "win2"), run_key="w1")).summary
        assert w1 and other and w1.sent > 10 and other.sent == w1.sent
        sends = deliveries_db.last_sends(app.db, "win", MONDAY_10 - timedelta(days=1))
        keys = deliveries_db.held_keys(app.db, "win")
        assert len(sends) == w1.sent and all(MONDAY_10 <= t < MONDAY_10 + timedelta(minutes=5) for t in sends.values())
        assert all(t.utcoffset() == timedelta(0) for t in sends.values())
        assert len(keys) == w1.sent and all(k.startswith("win|w1|") for k in keys)
        await app.close()

    asyncio.run(go())


def test_recover_run_requeues_claimed_and_settles_in_flight(make_settings: MakeSettings) -> None:
    """After a crash, claimed rows go back to pending; sending rows are resent or recorded unknown."""
    settings = make_settings(contacts=40)
    app = run(started(settings))
    p = app.plan(campaign(settings, PLAIN))
    claimed = deliveries_db.claim(app.db, p.run_id, "crashed", 10, MONDAY_10)
    deliveries_db.mark_sending(app.db, claimed[:4], MONDAY_10)
    assert deliveries_db.recover_run(app.db, p.run_id, resend_in_flight=False, now=MONDAY_10) == {
        "requeued": 6,
        "resent": 0,
        "unknown": 4,
    }
    assert deliveries_db.status_counts(app.db, p.run_id) == {
        "pending": p.planned - 4,
        "unknown": 4,
        "skipped": p.skipped,
    }
    with app.db.begin() as conn:
        conn.execute(
            update(DELIVERIES).where(DELIVERIES.c.id.in_([r.id for r in claimed[:4]])).values(status="sending")
        )
    assert deliveries_db.recover_run(app.db, p.run_id, resend_in_flight=True, now=MONDAY_10) == {
        "requeued": 0,
        "resent": 4,
        "unknown": 0,
    }
    assert deliveries_db.status_counts(app.db, p.run_id) == {"pending": p.planned, "skipped": p.skipped}
    run(app.close())


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_claim_in_flight_does_not_block_or_starve_another(make_settings: MakeSettings) -> None:
    """On PostgreSQL, while one claimer's transaction is still open, a second claimer takes the next rows at once
    (SKIP LOCKED; SQLite serializes writers instead)."""
    settings = make_settings(contacts=40)
    app = run(started(settings))
    p = app.plan(campaign(settings, PLAIN))
    with app.db.begin() as first:
        mine = deliveries_db.claim(first, p.run_id, "first", 7, MONDAY_10)
        with app.db.begin() as second:
            second.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
            theirs = deliveries_db.claim(second, p.run_id, "second", 7, MONDAY_10)
    assert len(mine) == len(theirs) == 7
    assert not {r.id for r in mine} & {r.id for r in theirs}
    run(app.close())


def test_a_rule_that_reads_like_an_exclusion_records_no_skipped_rows(make_settings: MakeSettings) -> None:
    """A staff-only campaign (`include_coworkers`, rule `{coworker: true}`) records no skipped delivery for the
    customers its rule does not select: their reason starts "coworker is", which the old wording match took
    for the coworker exclusion and wrote as a skipped delivery each."""
    settings = make_settings(contacts=120)
    app = run(started(settings))
    body = PLAIN.replace("audience: {}", "audience: {include_coworkers: true, rules: [{coworker: true}]}")
    plan = plan_run(app.db, campaign(settings, body), now=app.clock.now(), keep=None)  # the preview lists everyone
    preview = plan.preview
    assert preview is not None
    customers = [e for e in preview.excluded if e.reason.startswith("coworker is")]
    assert len(customers) > 100 and all(e.category == "audience" and not e.recorded for e in customers)
    recorded = [e for e in preview.excluded if e.recorded]  # the demo's few non-friends, excluded by the audience
    assert recorded and all(e.category == "exclusion" and e.reason.startswith("not a friend") for e in recorded)
    assert plan.skipped == len(recorded)
    run(app.close())


@pytest.mark.parametrize(
    ("url", "timeout"),
    [
        ("postgresql://wecast@127.0.0.1/test", CONNECT_TIMEOUT),
        ("postgresql+psycopg://wecast@127.0.0.1/test", CONNECT_TIMEOUT),
        ("postgresql+psycopg2://wecast@127.0.0.1/test", CONNECT_TIMEOUT),
        ("postgresql+psycopg://wecast@127.0.0.1/test?connect_timeout=3", None),  # the URL's own is kept
        ("postgresql+pg8000://wecast@127.0.0.1/test", None),  # pg8000 has no connect_timeout: it would refuse it
        ("postgresql+asyncpg://wecast@127.0.0.1/test", None),
    ],
)
def test_the_connect_timeout_goes_only_to_drivers_that_take_it(
    url: str, timeout: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's connect_args, caught before any driver is loaded (pg8000 and asyncpg are not installed here)."""
    seen: dict[str, Any] = {}

    def create_engine(url: str, **kwargs: Any) -> Any:
        seen.update(kwargs.get("connect_args", {}))
        raise RuntimeError("stop here")

    monkeypatch.setattr(storage_db, "create_engine", create_engine)
    with pytest.raises(RuntimeError, match="stop here"):
        make_db_engine(url, migrate=False)
    assert seen.get("connect_timeout") == timeout, seen

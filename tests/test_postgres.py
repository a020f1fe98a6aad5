"""The core flows against PostgreSQL (issue 2: "any SQLAlchemy URL works").

Each test gets a fresh database on the local server (`WECAST_TEST_PG`, default postgres@127.0.0.1:5432),
created with an ICU en-US collation — the collation real installations usually have, under which string
ranges do not sort by code point — and a Shanghai session time zone, so nothing may lean on SQLite's byte
order or on the server's clock zone. Without a reachable server these tests skip, except under CI
(`CI` set), where they fail: a green CI run must mean PostgreSQL was tested.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, inspect, select, update
from sqlalchemy.engine import Engine, make_url

from engine.clock import FakeClock
from engine.gateways.sandbox import SandboxGateway
from engine.plan import build_preview, plan_run
from engine.service import Wecast
from engine.settings import SandboxSettings, Settings, load_settings
from engine.spec import Campaign, parse_campaign
from storage import queries
from storage.db import make_db_engine, schema_version
from storage.models import CONTACTS, DELIVERIES, META, RUNS, SCHEMA_VERSION, DeliveryStatus

ADMIN_URL = os.environ.get("WECAST_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
# Monday 2026-01-05 10:00 in Shanghai (02:00 UTC): inside the default sending window.
MONDAY_10 = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)

PLAIN = """
audience: {}
message:
  template: "{{ display_name }}您好，测试消息。"
frequency_cap: false
quiet_hours: false
throttle: {per_second: 1000}
"""
CAPPED = PLAIN.replace("frequency_cap: false", "frequency_cap: {max: 1, per: day}")


def _unavailable(reason: str) -> None:
    message = f"PostgreSQL tests need a server at {make_url(ADMIN_URL).render_as_string()}: {reason}"
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(message + " (CI is set: start PostgreSQL before the tests, see .ci/run)", pytrace=False)
    pytest.skip(message)


def _admin() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        _unavailable(f"the psycopg driver is not installed ({exc}); pip install -e '.[test]'")
    url = make_url(ADMIN_URL).set(drivername="postgresql")
    try:
        return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        _unavailable(str(exc).strip())
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def pg_server() -> None:
    """Check once per module that the server answers (skip or fail the module otherwise)."""
    _admin().close()


@pytest.fixture
def pg_url(pg_server: None) -> Iterator[str]:
    """A new, empty database for one test, dropped afterwards."""
    name = f"wecast_test_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        try:
            admin.execute(
                f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
            )
        except Exception:  # a server built without ICU: the default collation still tests the rest
            admin.execute(f"CREATE DATABASE {name} TEMPLATE template0")
    url = make_url(ADMIN_URL).set(database=name, query={"options": "-c timezone=Asia/Shanghai"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with _admin() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def make_settings(tmp: Path, url: str, *, contacts: int = 120, idempotent: bool = True) -> Settings:
    cfg = tmp / "config.yaml"
    cfg.write_text(
        "version: 1\n"
        f"database_url: '{url}'\n"
        f"campaigns_dir: {tmp}/campaigns\n"
        "sending:\n"
        "  concurrency: 8\n"
        "  retry: {max_attempts: 3, base_delay: 1s, max_delay: 10s}\n"
        f"sandbox: {{contacts: {contacts}, seed: 11, state_file: {tmp}/sandbox.sqlite, "
        f"honor_idempotency_key: {str(idempotent).lower()}}}\n",
        encoding="utf-8",
    )
    return load_settings(cfg)


def campaign(settings: Settings, body: str, name: str = "c1") -> Campaign:
    return parse_campaign(f"id: {name}\nname: 测试活动\n" + body, settings.campaigns_dir / f"{name}.yaml", settings)


def outbox_by_contact(gw: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in gw.outbox_messages():
        counts[m.contact_id] = counts.get(m.contact_id, 0) + 1
    return counts


async def started(settings: Settings, clock: FakeClock | None = None) -> Wecast:
    app = Wecast(settings, clock=clock or FakeClock(MONDAY_10))
    await app.start()
    await app.sync()
    return app


def test_make_db_engine_creates_the_schema_and_a_second_call_is_a_no_op(pg_url: str) -> None:
    """make_db_engine creates every table and records the schema version once; calling it again changes nothing."""
    first = make_db_engine(pg_url)
    assert schema_version(first) == SCHEMA_VERSION
    tables = set(inspect(first).get_table_names())
    assert {"contacts", "tags", "contact_tags", "campaign_runs", "deliveries", "wecast_meta"} <= tables
    first.dispose()
    second = make_db_engine(pg_url)
    assert schema_version(second) == SCHEMA_VERSION
    with second.connect() as conn:
        assert conn.execute(select(func.count()).select_from(META)).scalar() == 1
    assert set(inspect(second).get_table_names()) == tables
    second.dispose()


def test_contact_sync_from_the_sandbox(pg_url: str, tmp_path: Path) -> None:
    """A sandbox sync stores 300 contacts with tags, JSON and aware UTC times; a second sync changes nothing."""
    db = make_db_engine(pg_url)

    async def go() -> None:
        gw = SandboxGateway(SandboxSettings(state_file=tmp_path / "s.sqlite", contacts=300))
        await gw.start()
        settings = make_settings(tmp_path, pg_url, contacts=300)
        app = Wecast(settings, db=db, gateway=gw, clock=FakeClock(MONDAY_10))
        await app.start()
        first = await app.sync()
        assert first.seen == first.added == 300 and first.tags > 0
        assert app.contact_count() == 300
        again = await app.sync()
        assert (again.added, again.updated, again.removed) == (0, 0, 0)
        await app.close()

    asyncio.run(go())
    with db.connect() as conn:
        views = queries.load_contact_views(conn)
        orm = {r.id: r for r in conn.execute(select(CONTACTS))}
    assert len(views) == 300 and [v["id"] for v in views] == sorted(orm)
    assert any(v["tags_named"] for v in views)
    for v in views:
        assert isinstance(v["phones"], list) and isinstance(v["additional_info"], dict)
        assert v["created_at"] == orm[v["id"]].created_at == MONDAY_10
        if v["added_at"] is not None:
            assert v["added_at"].tzinfo is not None and v["added_at"] == orm[v["id"]].added_at
    db.dispose()


def test_raw_sql_times_agree_with_the_orm(pg_url: str) -> None:
    """A time written through the DB-API fast path (db_time) reads back equal to one written through the ORM type,
    whatever the session's time zone (Asia/Shanghai here)."""
    db = make_db_engine(pg_url)
    at = datetime(2026, 3, 1, 23, 30, 15, 123456, tzinfo=UTC)
    with db.begin() as conn:
        queries.insert_ignore(conn, RUNS, [{"campaign_id": "t", "run_key": "k", "settings": {}, "created_at": at}])
        run_id = conn.execute(select(RUNS.c.id)).scalar_one()
        columns = (
            "run_id",
            "campaign_id",
            "contact_id",
            "contact_name",
            "text",
            "dedupe_key",
            "status",
            "capped",
            "created_at",
            "sent_at",
        )
        ts = queries.db_time(conn, at)
        fast = queries.insert_fast(
            conn, DELIVERIES, [(run_id, "t", "c1", "", "", "t|k|c1", "sent", True, ts, ts)], columns
        )
        assert fast == 1
        queries.insert_ignore(
            conn,
            DELIVERIES,
            [
                {
                    "run_id": run_id,
                    "campaign_id": "t",
                    "contact_id": "c2",
                    "text": "",
                    "dedupe_key": "t|k|c2",
                    "status": "sent",
                    "capped": True,
                    "created_at": at,
                    "sent_at": at.astimezone(ZoneInfo("America/New_York")),
                }
            ],
        )
    with db.connect() as conn:
        rows = queries.deliveries(conn, run_id=run_id)
        assert [r["sent_at"] for r in rows] == [at, at] and [r["created_at"] for r in rows] == [at, at]
        assert queries.cap_counts(conn, at, at + timedelta(microseconds=1)) == {"c1": 1, "c2": 1}
        assert queries.cap_counts(conn, at + timedelta(microseconds=1), at + timedelta(days=1)) == {}
        assert queries.last_sends(conn, "t", at - timedelta(hours=1)) == {"c1": at, "c2": at}
        stored = conn.exec_driver_sql("SELECT DISTINCT sent_at FROM deliveries").scalar_one()
        assert stored == at.replace(tzinfo=None), "stored as naive UTC"
    db.dispose()


def test_preview_and_plan_record_skips_and_replanning_is_idempotent(pg_url: str, tmp_path: Path) -> None:
    """plan_run writes what build_preview shows (pending and skipped rows); planning the run again adds nothing,
    and a dedupe: once campaign skips everyone its earlier run holds."""
    settings = make_settings(tmp_path, pg_url, contacts=120)

    async def go() -> None:
        app = await started(settings)
        body = PLAIN.replace("audience: {}", "audience: {tags_none: [勿扰]}") + "dedupe: once\n"
        c = campaign(settings, body)
        preview = build_preview(app.db, c, now=MONDAY_10, run_key="r1")
        assert preview.recipients and preview.excluded
        first = plan_run(app.db, c, settings, now=MONDAY_10, run_key="r1")
        assert first.created and first.planned == len(preview.recipients)
        assert first.skipped == sum(1 for e in preview.excluded if e.recorded)
        again = plan_run(app.db, c, settings, now=MONDAY_10, run_key="r1")
        assert not again.created and again.run_id == first.run_id
        with app.db.connect() as conn:
            assert queries.status_counts(conn, first.run_id) == {"pending": first.planned, "skipped": first.skipped}
            keys = queries.campaign_keys(conn, c.id)
        assert len(keys) == first.planned
        assert all(k.startswith("c1|once|") and v["run_id"] == first.run_id for k, v in keys.items())
        later = build_preview(app.db, c, now=MONDAY_10, run_key="r2")
        assert later.recipients == []
        assert sum(e.category == "dedupe" for e in later.excluded) == first.planned
        await app.close()

    asyncio.run(go())


def test_concurrent_planning_creates_one_run(pg_url: str, tmp_path: Path) -> None:
    """Several threads planning the same run at once create one run with one delivery per recipient."""
    settings = make_settings(tmp_path, pg_url, contacts=100)
    app = asyncio.run(started(settings))
    c = campaign(settings, PLAIN)
    results: list[Any] = []
    errors: list[BaseException] = []

    def plan() -> None:
        try:
            results.append(plan_run(app.db, c, settings, now=MONDAY_10, run_key="race"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=plan) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.run_id for r in results}) == 1 and sum(r.created for r in results) == 1
    with app.db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(RUNS)).scalar() == 1
        rows = queries.deliveries(conn, run_id=results[0].run_id, limit=10_000)
    contacts = [r["contact_id"] for r in rows]
    assert len(contacts) == len(set(contacts)) > 50
    asyncio.run(app.close())


def test_dispatch_runs_to_completion_and_never_twice(pg_url: str, tmp_path: Path) -> None:
    """Wecast plans and sends a run to completion on PostgreSQL; running it again sends nothing new."""
    settings = make_settings(tmp_path, pg_url, contacts=120)

    async def go() -> None:
        app = await started(settings)
        c = campaign(settings, PLAIN)
        first = await app.run_campaign(c)
        second = await app.run_campaign(c)
        s = first.summary
        assert s is not None and s.status == "completed" and s.open == 0 and s.sent > 50
        assert first.plan.created and not second.plan.created and second.plan.run_id == first.plan.run_id
        per_contact = outbox_by_contact(app.gateway)
        assert sum(per_contact.values()) == s.sent and set(per_contact.values()) == {1}
        with app.db.connect() as conn:
            rows = queries.deliveries(conn, run_id=s.run_id, status="sent", limit=10_000)
            run = queries.get_run(conn, s.run_id)
        assert len(rows) == s.sent
        assert all(r["sent_at"].tzinfo is not None and r["sent_at"] >= MONDAY_10 for r in rows)
        assert run is not None and run["status"] == "completed" and run["finished_at"] >= MONDAY_10
        await app.close()

    asyncio.run(go())


def test_frequency_cap_is_counted_across_two_campaigns(pg_url: str, tmp_path: Path) -> None:
    """With a cap of one message a day, a second campaign the same Shanghai day skips everyone the first reached,
    at plan time and (when both were planned first) at send time; the next local day it sends again."""
    settings = make_settings(tmp_path, pg_url, contacts=40)
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        app = await started(settings, clock)
        pa = app.plan(campaign(settings, CAPPED, "a"))
        pb = app.plan(campaign(settings, CAPPED, "b"))
        assert pa.planned == pb.planned > 10
        sa = await app.dispatcher.run(pa.run_id)
        sb = await app.dispatcher.run(pb.run_id)
        assert sa.sent == pa.planned and sb.sent == 0
        with app.db.connect() as conn:
            day = (datetime(2026, 1, 4, 16, tzinfo=UTC), datetime(2026, 1, 5, 16, tzinfo=UTC))
            counts = queries.cap_counts(conn, *day)
            assert set(counts.values()) == {1} and len(counts) == sa.sent
            assert queries.cap_counts(conn, *day, contact_ids=sorted(counts)[:5]) == dict.fromkeys(
                sorted(counts)[:5], 1
            )
            assert queries.cap_counts(conn, *day, exclude_run=pa.run_id) == {}
            skipped = queries.deliveries(conn, run_id=pb.run_id, status="skipped", limit=1000)
        assert sum(r["reason"].startswith("frequency_cap") for r in skipped) == pb.planned
        assert app.preview(campaign(settings, CAPPED, "c")).recipients == []
        clock.set(datetime(2026, 1, 5, 15, 59, tzinfo=UTC))  # 23:59 Shanghai: the same local day
        assert app.preview(campaign(settings, CAPPED, "c")).recipients == []
        clock.set(datetime(2026, 1, 5, 16, 1, tzinfo=UTC))  # 00:01 Tuesday in Shanghai
        assert len(app.preview(campaign(settings, CAPPED, "c")).recipients) == sa.sent
        assert set(outbox_by_contact(app.gateway).values()) == {1}
        await app.close()

    asyncio.run(go())


def test_dedupe_window_reads_last_sends_and_campaign_keys(pg_url: str, tmp_path: Path) -> None:
    """A 7-day dedupe window skips contacts reached 3 days ago (last_sends) and sends again after 8 days;
    campaign_keys holds only this campaign's keys, even beside a campaign whose id extends it."""
    settings = make_settings(tmp_path, pg_url, contacts=40)
    clock = FakeClock(MONDAY_10)

    async def go() -> None:
        app = await started(settings, clock)
        window = campaign(settings, PLAIN + "dedupe: 7d\n", "win")
        w1 = (await app.run_campaign(window, run_key="w1")).summary
        other = (await app.run_campaign(campaign(settings, PLAIN, "win2"), run_key="w1")).summary
        assert w1 and other and w1.sent > 10 and other.sent == w1.sent
        with app.db.connect() as conn:
            sends = queries.last_sends(conn, "win", MONDAY_10 - timedelta(days=1))
            keys = queries.campaign_keys(conn, "win")
        assert len(sends) == w1.sent and all(MONDAY_10 <= t < MONDAY_10 + timedelta(minutes=5) for t in sends.values())
        assert all(t.utcoffset() == timedelta(0) for t in sends.values())
        assert len(keys) == w1.sent and all(k.startswith("win|w1|") for k in keys)
        clock.advance(3 * 86400)
        w2 = (await app.run_campaign(window, run_key="w2")).summary
        clock.advance(5 * 86400)
        w3 = (await app.run_campaign(window, run_key="w3")).summary
        assert w2 and w3 and w2.sent == 0 and w3.sent == w1.sent
        await app.close()

    asyncio.run(go())


def test_recover_run_requeues_claimed_and_settles_in_flight(pg_url: str, tmp_path: Path) -> None:
    """After a crash, claimed rows go back to pending; sending rows are resent or recorded unknown."""
    settings = make_settings(tmp_path, pg_url, contacts=40)

    async def go() -> Wecast:
        return await started(settings)

    app = asyncio.run(go())
    p = app.plan(campaign(settings, PLAIN))
    with app.db.begin() as conn:
        claimed = queries.claim(conn, p.run_id, "crashed", 10, MONDAY_10)
        ids = [r["id"] for r in claimed]
        queries.set_status(conn, ids[:4], DeliveryStatus.SENDING, MONDAY_10, sent_at=MONDAY_10)
    with app.db.begin() as conn:
        assert queries.recover_run(conn, p.run_id, resend_in_flight=False, now=MONDAY_10) == {
            "requeued": 6,
            "resent": 0,
            "unknown": 4,
        }
        assert queries.status_counts(conn, p.run_id) == {"pending": p.planned - 4, "unknown": 4, "skipped": p.skipped}
        conn.execute(update(DELIVERIES).where(DELIVERIES.c.id.in_(ids[:4])).values(status="sending"))
        assert queries.recover_run(conn, p.run_id, resend_in_flight=True, now=MONDAY_10) == {
            "requeued": 0,
            "resent": 4,
            "unknown": 0,
        }
        assert queries.status_counts(conn, p.run_id) == {"pending": p.planned, "skipped": p.skipped}
    asyncio.run(app.close())


def test_claims_are_atomic_across_threads(pg_url: str, tmp_path: Path) -> None:
    """Concurrent claimers of one run never get the same delivery, and together they claim every one."""
    settings = make_settings(tmp_path, pg_url, contacts=200)
    app = asyncio.run(started(settings))
    p = app.plan(campaign(settings, PLAIN))
    got: list[list[int]] = []
    lock = threading.Lock()
    db: Engine = app.db

    def claimer(token: str) -> None:
        mine: list[int] = []
        while True:
            with db.begin() as conn:
                rows = queries.claim(conn, p.run_id, token, 7, MONDAY_10)
            if not rows:
                break
            mine.extend(r["id"] for r in rows)
        with lock:
            got.append(mine)

    threads = [threading.Thread(target=claimer, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [i for ids in got for i in ids]
    assert len(flat) == len(set(flat)) == p.planned
    asyncio.run(app.close())


def test_a_claim_in_flight_does_not_block_or_starve_another(pg_url: str, tmp_path: Path) -> None:
    """While one claimer's transaction is still open, a second claimer takes the next rows at once."""
    settings = make_settings(tmp_path, pg_url, contacts=40)
    app = asyncio.run(started(settings))
    p = app.plan(campaign(settings, PLAIN))
    with app.db.begin() as first:
        mine = queries.claim(first, p.run_id, "first", 7, MONDAY_10)
        with app.db.begin() as second:
            second.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
            theirs = queries.claim(second, p.run_id, "second", 7, MONDAY_10)
    assert len(mine) == len(theirs) == 7
    assert not {r["id"] for r in mine} & {r["id"] for r in theirs}
    asyncio.run(app.close())

"""Planning streams the audience (engine.plan, on SQLite and PostgreSQL): chunk by chunk it decides exactly what one
pass over every contact decides — `limit`, listed ids, dedupe, opt-outs and skipped fields carry across chunks — it
holds one chunk in memory at a time, and a problem in any chunk leaves nothing planned. A preview counts everyone
and, when asked, lists a bounded sample."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import pytest
from helpers import MONDAY_10, PLAIN, campaign, run, started

from engine import plan
from engine.errors import TemplateError
from engine.plan import Preview, build_preview, plan_run
from engine.service import Wecast
from engine.settings import Settings
from storage import deliveries as deliveries_db
from storage import optouts as optouts_db
from storage import runs as runs_db
from storage.contacts import load_contact_views
from storage.models import DeliveryStatus

MakeSettings = Callable[..., Settings]


def decisions(p: Preview) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """A preview's recipients (id, text) and exclusions (id, code, reason), in the order listed."""
    return (
        [(r.contact_id, r.text) for r in p.recipients],
        [(e.contact_id, e.code.value, e.reason) for e in p.excluded],
    )


def busy_body(views: list[dict[str, object]]) -> str:
    """A campaign that uses every rule that carries across chunks: listed ids (some unknown), a limit, excluded ids
    and tags, a field some contacts lack (skipped), dedupe once."""
    ids = [f"'{v['id']}'" for v in views[5:]] + ["nobody-1", "nobody-2"]
    excluded = f"'{views[9]['id']}'"
    return (
        PLAIN.replace(
            "audience: {}",
            f"audience: {{ids: [{', '.join(ids)}], exclude_ids: [{excluded}], tags_none: [勿扰], limit: 70}}",
        ).replace(
            '"{{ display_name }}您好，测试消息。"', '"{{ display_name }}，{{ city }}门店见"\n  on_missing_field: skip'
        )
        + "dedupe: once\n"
    )


@pytest.fixture
def app(make_settings: MakeSettings) -> Wecast:
    return run(started(make_settings(contacts=150)))


def test_chunks_decide_what_one_pass_decides(app: Wecast, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 7 contacts a chunk, preview and plan pick, hold back and word exactly what one chunk of all contacts
    does: the same recipients and texts, the same exclusions with the same reasons, in the same order."""
    views = load_contact_views(app.db)
    c = campaign(app.settings, busy_body(views))
    first_twelve = campaign(app.settings, busy_body(views).replace("limit: 70", "limit: 12"))
    earlier = plan_run(app.db, first_twelve, now=MONDAY_10)
    assert earlier.planned == 12  # dedupe once: these twelve are held by the earlier run
    reachable = [v for v in views[20:] if v.get("friend") and not v.get("coworker") and v.get("city")]
    optouts_db.opt_out(app.db, str(reachable[0]["id"]), MONDAY_10, source="cli")

    monkeypatch.setattr(plan, "CHUNK", 100_000)
    whole = build_preview(app.db, c, now=MONDAY_10, run_key="r")
    monkeypatch.setattr(plan, "CHUNK", 7)
    chunked = build_preview(app.db, c, now=MONDAY_10, run_key="r")

    assert decisions(chunked) == decisions(whole)
    assert chunked.unknown_ids == whole.unknown_ids == ["nobody-1", "nobody-2"]
    assert chunked.excluded_by_category() == whole.excluded_by_category()
    codes = {e.code.value for e in whole.excluded}
    assert {"dedupe", "opted_out", "exclude_ids", "limit", "missing_field"} <= codes
    assert whole.recipient_count == len(whole.recipients) > 0 and whole.complete

    planned = plan_run(app.db, c, now=MONDAY_10, run_key="r")
    rows = deliveries_db.list_deliveries(app.db, run_id=planned.run_id, limit=10_000)
    pending = sorted((r.contact_id, r.text) for r in rows if r.status is DeliveryStatus.PENDING)
    skipped = sorted((r.contact_id, r.reason) for r in rows if r.status is DeliveryStatus.SKIPPED)
    assert pending == sorted(decisions(whole)[0])
    assert skipped == sorted((e.contact_id, e.stored_reason) for e in whole.excluded if e.recorded)
    run_row = runs_db.get_run(app.db, planned.run_id)
    assert run_row is not None and (run_row.planned, run_row.skipped_at_plan) == (len(pending), len(skipped))
    run(app.close())


def test_a_problem_in_the_last_chunk_plans_nothing(app: Wecast, monkeypatch: pytest.MonkeyPatch) -> None:
    """When only the last chunk holds a recipient lacking a template field, planning raises that error and writes
    nothing: no run, no delivery — although the chunks before were written in the same transaction."""
    views = load_contact_views(app.db)
    with_city = [v for v in views if v.get("city") and v.get("friend") and not v.get("coworker")]
    lacking = [v for v in views if not v.get("city") and v.get("friend") and not v.get("coworker")]
    last = max(lacking, key=lambda v: str(v["id"]))
    before = [f"'{v['id']}'" for v in with_city if str(v["id"]) < str(last["id"])][:20]
    chosen = [*before, f"'{last['id']}'"]
    body = PLAIN.replace("audience: {}", f"audience: {{ids: [{', '.join(chosen)}]}}").replace(
        "{{ display_name }}您好", "{{ city }}您好"
    )
    c = campaign(app.settings, body)
    monkeypatch.setattr(plan, "CHUNK", 5)
    with pytest.raises(TemplateError, match=r"'city' is missing for 1 of 21 recipients"):
        plan_run(app.db, c, now=MONDAY_10, run_key="r")
    assert runs_db.find_run(app.db, c.id, "r") is None
    assert deliveries_db.list_deliveries(app.db, campaign_id=c.id) == []
    run(app.close())


def test_a_preview_counts_everyone_and_lists_a_sample(app: Wecast) -> None:
    """`keep=3` lists the first three recipients, the first three held back and the first three not targeted,
    exactly as the full preview starts; every count is the full one."""
    body = PLAIN.replace("audience: {}", "audience: {tags_any: [VIP, 普通会员], tags_none: [勿扰]}")
    c = campaign(app.settings, body)
    full = build_preview(app.db, c, now=MONDAY_10)
    sample = build_preview(app.db, c, now=MONDAY_10, keep=3)
    assert not sample.complete and full.complete
    assert sample.recipients == full.recipients[:3]
    held = [e for e in full.excluded if e.recorded]
    targeted = [e for e in full.excluded if not e.recorded]
    assert len(held) > 3 and len(targeted) > 3
    assert [e for e in sample.excluded if e.recorded] == held[:3]
    assert [e for e in sample.excluded if not e.recorded] == targeted[:3]
    assert (sample.recipient_count, sample.excluded_count) == (len(full.recipients), len(full.excluded))
    assert sample.excluded_by_category() == full.excluded_by_category()
    assert sample.distinct_messages == full.distinct_messages == len({r.text for r in full.recipients})
    assert sample.total_contacts == full.total_contacts == len(load_contact_views(app.db))
    run(app.close())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_planning_holds_one_chunk_at_a_time(make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning 3,000 recipients 100 at a time allocates at most a third of what planning them in one chunk does
    at its peak (Python's own allocations, traced): the audience is never held whole."""
    app = run(started(make_settings(contacts=3000)))
    c = campaign(app.settings, PLAIN)

    def peak(chunk: int, key: str) -> int:
        monkeypatch.setattr(plan, "CHUNK", chunk)
        tracemalloc.start()
        try:
            result = plan_run(app.db, c, now=MONDAY_10, run_key=key)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            assert result.planned > 2500

    whole, streamed = peak(10_000, "whole"), peak(100, "streamed")
    assert streamed * 3 < whole, (streamed, whole)
    run(app.close())


def test_planning_leaves_the_garbage_collector_as_it_found_it(app: Wecast, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a plan or preview streams, the objects older than it are out of the collector's scans (gc.freeze);
    afterwards — also when the plan fails, and only once the last of two overlapping plans ends — every object is
    the collector's again, and garbage that was made before the plan is collected."""
    import gc
    import weakref

    class Node:
        pass

    assert gc.get_freeze_count() == 0
    during: list[int] = []
    chunks = plan.contacts_db.contact_view_chunks

    def watched(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        during.append(gc.get_freeze_count())
        yield from chunks(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(plan.contacts_db, "contact_view_chunks", watched)
    cycle = Node()
    cycle.self = cycle  # type: ignore[attr-defined]
    gone = weakref.ref(cycle)
    del cycle
    c = campaign(app.settings, PLAIN)
    assert plan_run(app.db, c, now=MONDAY_10, run_key="r").planned > 0
    build_preview(app.db, c, now=MONDAY_10, run_key="r2")
    lacking = campaign(app.settings, PLAIN.replace("{{ display_name }}您好", "{{ city }}您好"))
    with pytest.raises(TemplateError):
        plan_run(app.db, lacking, now=MONDAY_10, run_key="r3")
    assert len(during) == 3 and all(n > 0 for n in during), during
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert gone() is None  # made before the plans, collected after them

    with plan._old_objects_left_alone():
        with plan._old_objects_left_alone():
            assert gc.get_freeze_count() > 0
        assert gc.get_freeze_count() > 0  # the other plan is still under way
    assert gc.get_freeze_count() == 0
    run(app.close())

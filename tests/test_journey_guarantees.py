"""The journeys' runtime guarantees that issue 9 asks to see, each on the sandbox with an injected clock: a backfill
over a whole contact list only, claimed with its entries; catch-up of due steps missed while wecast was down; quiet
hours holding a due send; one entry for an event seen by the stream and by a sync."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run
from journey_harness import harness
from test_journey_runtime import MONDAY_9

from storage import journeys as store
from storage.contacts import load_contact_views

VIP = (
    "name: VIP\ntrigger: {tag_added: VIP}\nbackfill: true\nfrequency_cap: false\nquiet_hours: false\n"
    "message: {template: VIP您好}\n"
)


def _vips(db: object) -> set[str]:
    return {v["id"] for v in load_contact_views(db) if "VIP" in v["tags"] and v["friend"] and not v["coworker"]}


def test_a_backfill_on_a_fresh_install_waits_for_the_first_sync(tmp_path: Path) -> None:
    """A journey loaded before any contact was synced (serve's first start) backfills once the sync finished — not
    over the empty list, which would use up its one backfill on nobody."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9, contacts=40, synced=False)
        h.write("vip", VIP)
        h.load()
        await h.run()
        assert h.counts() == {} and not store.backfilled(h.db, "vip")
        await h.app.sync()
        await h.run()
        vips = _vips(h.db)
        assert vips and h.counts() == dict.fromkeys(vips, 1)
        await h.app.close()

    run(go())


def test_a_backfill_that_fails_midway_is_claimed_by_nobody_and_done_by_the_next_tick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim of the one backfill commits with its entries: a crash while entering (here the database refusing
    the entries once) leaves it unclaimed, and the next tick enters everyone once."""

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9, contacts=40)
        h.write("vip", VIP)
        real = store.enrol
        calls = []

        def enrol_failing_once(conn: object, items: object) -> list[int]:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("killed while entering the backfill")
            return real(conn, items)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "enrol", enrol_failing_once)
        h.load()
        with pytest.raises(RuntimeError, match="killed while entering"):
            await h.engine.tick()
        assert not store.backfilled(h.db, "vip")
        await h.run()
        vips = _vips(h.db)
        assert vips and h.counts() == dict.fromkeys(vips, 1)
        await h.app.close()

    run(go())


def test_entries_and_moves_in_bulk_keep_their_one_winner(db_url: str) -> None:
    """`enrol` numbers each contact's entries and enters a trigger once (also twice in one batch); `apply_moves`
    lets exactly one of two moves made from the same version win, and a move from a stale version none."""
    from datetime import timedelta

    from storage.db import make_db_engine, transaction
    from storage.models import EnrolmentStatus

    db = make_db_engine(db_url)
    now = MONDAY_9
    first = [store.NewEnrolment("j", f"c{i}", "slot:1", "s1", now, now) for i in range(3)]
    with transaction(db) as conn:
        ids = store.enrol(conn, [*first, first[0]])
    assert len(ids) == 3
    again = [
        store.NewEnrolment("j", "c0", "slot:1", "s1", now, now),
        store.NewEnrolment("j", "c0", "slot:2", "s1", now, now),
    ]
    assert len(store.enrol(db, again)) == 1
    rows = store.enrolments(db, contact_id="c0")
    assert sorted((r.entry, r.trigger_key) for r in rows) == [(1, "slot:1"), (2, "slot:2")]

    target = next(r for r in store.enrolments(db, contact_id="c1"))
    later = now + timedelta(hours=1)

    def move(version: int, step: str) -> store.Move:
        return store.Move(target.id, version, EnrolmentStatus.ACTIVE, step, later, later, later)

    who = {target.id: (target.journey_id, target.contact_id)}
    assert store.apply_moves(db, who, [move(0, "a"), move(0, "b")]) == [target.id]
    assert store.apply_moves(db, who, [move(0, "c")]) == []
    (row,) = store.enrolments(db, contact_id="c1")
    assert (row.step, row.version, row.due_at) == ("a", 1, later)
    assert store.apply_moves(db, who, [move(1, "d")]) == [target.id]
    db.dispose()


def test_a_welcome_caught_by_a_crash_is_never_sent_another_way(db_url: str) -> None:
    """A journey send planned for WeCom's welcome message and interrupted: still claimed (send_welcome was never
    called) it goes back to the normal path; caught `sending` (the welcome may have arrived, and its code cannot be
    used again) it is recorded unknown — not resent as a 群发 task, even on a gateway that dedupes by key. While
    the engine may still be at it (the last minute), recovery leaves both alone."""
    from datetime import timedelta

    from storage import deliveries as deliveries_db
    from storage.db import make_db_engine
    from storage.models import DeliveryStatus

    db = make_db_engine(db_url)
    now = MONDAY_9
    run_id, _ = store.journey_run(
        db, journey_id="welcome", run_key="k", timezone="Asia/Shanghai", settings={}, file="", now=now
    )
    planned = [
        store.NewDelivery(
            run_id,
            "welcome",
            cid,
            "新客",
            "您好",
            f"welcome|{cid}|1|hello",
            DeliveryStatus.CLAIMED,
            False,
            claim_token=deliveries_db.WELCOME_TASK,
        )
        for cid in ("c-claimed", "c-sending")
    ]
    store.insert_deliveries(db, planned, now)
    assert store.start_welcome(db, "welcome|c-sending|1|hello", deliveries_db.WELCOME_TASK, now) is not None
    assert store.start_welcome(db, "welcome|c-sending|1|hello", deliveries_db.WELCOME_TASK, now) is None
    # A dispatcher of the run starting meanwhile (every start recovers its run) leaves a live engine's welcomes be.
    soon = now + timedelta(seconds=5)
    assert deliveries_db.recover_run(db, run_id, resend_in_flight=True, now=soon) == {
        "requeued": 0,
        "resent": 0,
        "unknown": 0,
    }
    states = {r.contact_id: r.status for r in deliveries_db.list_deliveries(db, run_id=run_id, limit=10)}
    assert states == {"c-claimed": DeliveryStatus.CLAIMED, "c-sending": DeliveryStatus.SENDING}
    later = now + deliveries_db.WELCOME_HOLD + timedelta(seconds=1)  # abandoned: the engine would be long done
    recovered = deliveries_db.recover_run(db, run_id, resend_in_flight=True, now=later)
    assert (recovered["requeued"], recovered["resent"], recovered["unknown"]) == (1, 0, 1)
    rows = {r.contact_id: r for r in deliveries_db.list_deliveries(db, run_id=run_id, limit=10)}
    assert rows["c-claimed"].status is DeliveryStatus.PENDING
    assert rows["c-sending"].status is DeliveryStatus.UNKNOWN and "welcome" in rows["c-sending"].reason
    db.dispose()


@pytest.mark.parametrize(("policy", "slots"), [("skip", 0), ("once", 1), ("all", 3)])
def test_fires_missed_while_down_follow_the_catch_up_policy(tmp_path: Path, policy: str, slots: int) -> None:
    """A daily 10:00 journey, wecast down from Monday 09:00 to Wednesday 11:00 (three fires missed, all within the
    grace): `skip` enters nobody for them, `once` the latest, `all` each — each contact once per fire entered."""
    from test_journey_runtime import local

    async def go() -> None:
        h = await harness(tmp_path, f"sqlite:///{tmp_path}/w.sqlite", MONDAY_9, contacts=12)
        h.write(
            "daily",
            "name: 每日\ntrigger: {schedule: {cron: '0 10 * * *'}}\nfrequency_cap: false\nquiet_hours: false\n"
            f"catch_up: {policy}\ngrace: 3d\nentry: every_time\n"
            "audience: {tags_any: [VIP, 普通会员]}\nmessage: {template: 早安}\n",
        )
        h.load()
        await h.run()
        await h.at(local(25, 11))
        counts = h.counts()
        if slots == 0:
            assert counts == {}
        else:
            assert counts and set(counts.values()) == {slots}
        await h.at(local(26, 10))  # and the next fire, on time, enters everyone once more
        assert h.counts() and set(h.counts().values()) == {slots + 1}
        await h.app.close()

    run(go())

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

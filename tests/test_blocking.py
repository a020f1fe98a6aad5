"""engine.blocking.GroupCommit: records from concurrent tasks share one write (the dispatcher's part records)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from engine.blocking import GroupCommit


class Ledger:
    """A write that takes a while (as a commit does), counting calls, items and how many ran at once."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls: list[list[int]] = []
        self.running = 0
        self.most_at_once = 0
        self.fail_on = fail_on
        self._lock = threading.Lock()

    def write(self, items: Sequence[int]) -> None:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            time.sleep(0.02)
            if self.fail_on is not None and self.fail_on in items:
                raise OSError("disk full")
            self.calls.append(list(items))
        finally:
            with self._lock:
                self.running -= 1


def test_concurrent_records_share_writes_one_at_a_time() -> None:
    """200 tasks recording at once: every item written exactly once, in a handful of writes, never two at once;
    each task returns only after its own item is written."""
    ledger = Ledger()

    async def go() -> list[bool]:
        group: GroupCommit[int] = GroupCommit(ledger.write)

        async def record(i: int) -> bool:
            await asyncio.sleep(0.001 * (i % 7))
            await group.put(i)
            return any(i in call for call in ledger.calls)

        return await asyncio.gather(*(record(i) for i in range(200)))

    written_when_returned = asyncio.run(go())
    assert all(written_when_returned)
    assert sorted(i for call in ledger.calls for i in call) == list(range(200))
    assert len(ledger.calls) < 20  # grouped: not one commit per item
    assert ledger.most_at_once == 1


def test_a_failed_write_fails_its_items_and_the_next_ones_are_written() -> None:
    """The write that fails raises in every task whose item it carried, and in no other; items arriving later
    are written by the next write."""
    ledger = Ledger(fail_on=3)

    async def go() -> tuple[list[object], None]:
        group: GroupCommit[int] = GroupCommit(ledger.write)
        first = await asyncio.gather(*(group.put(i) for i in range(5)), return_exceptions=True)
        later = await group.put(10)
        return first, later

    first, _ = asyncio.run(go())
    assert all(isinstance(r, OSError) for r in first)
    assert ledger.calls == [[10]]


def test_a_cancelled_waiter_still_has_its_item_written() -> None:
    """A task that gives up waiting (a stop, a timeout) does not take its record back: it is written."""
    ledger = Ledger()

    async def go() -> None:
        group: GroupCommit[int] = GroupCommit(ledger.write)
        waiter = asyncio.ensure_future(group.put(1))
        await asyncio.sleep(0.005)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await group.put(2)

    asyncio.run(go())
    assert [i for call in ledger.calls for i in call] == [1, 2]

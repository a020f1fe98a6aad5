"""A client-side limiter per API that keeps wecast under WeCom's per-corp limits without ever being told.

WeCom counts calls per corp and API (10,000 a minute and 150,000 an hour by default, D90454) and caps concurrent
calls (45033). The limiter holds a call back until starting it cannot break any window, and the proof is short:

    A call counts from the moment it starts until `window` seconds after its answer arrived (calls in flight count
    all along). A call starts only while fewer than `limit` calls count. Take any `window`-long stretch in which
    WeCom saw calls arrive, and the last of them to *start*, j: every other call i of that stretch started before j
    and arrived no earlier than the stretch began, so its answer came at or after that and it still counted when j
    started. So at most `limit` - 1 others, and j: never more than `limit` calls arrive within any `window`, whatever
    the network delay.

Time comes from the injected clock (tests jump it); waiting for a call in flight to finish uses an asyncio event.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from engine.clock import Clock


@dataclass(frozen=True)
class Window:
    """At most `limit` calls within any `seconds`."""

    limit: int
    seconds: float


@dataclass
class _Api:
    in_flight: int = 0
    ended: list[float] = field(default_factory=list)  # monotonic times the answers came, ascending
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class ApiLimiter:
    """Per-API windows and a concurrency cap. `async with limiter.call("externalcontact/get"): ...`."""

    def __init__(self, clock: Clock, windows: Sequence[Window], concurrency: int) -> None:
        self.clock = clock
        self.windows = tuple(windows)
        self.concurrency = concurrency
        self._apis: dict[str, _Api] = {}
        self._horizon = max((w.seconds for w in self.windows), default=0.0)

    @asynccontextmanager
    async def call(self, api: str) -> AsyncIterator[None]:
        """Wait for a free slot of `api`, hold it for the call, and count the call until its window is over."""
        state = self._apis.setdefault(api, _Api())
        await self._acquire(state)
        try:
            yield
        finally:
            state.in_flight -= 1
            state.ended.append(self.clock.monotonic())
            state.changed.set()

    def _wait(self, state: _Api, now: float) -> float | None:
        """0 when a call may start now; else seconds until one may (None: only when a call in flight ends)."""
        cutoff = now - self._horizon
        drop = bisect.bisect_right(state.ended, cutoff)
        if drop:
            del state.ended[:drop]
        if state.in_flight >= self.concurrency:
            return None
        longest = 0.0
        for window in self.windows:
            start = bisect.bisect_right(state.ended, now - window.seconds)
            counting = state.in_flight + len(state.ended) - start
            if counting < window.limit:
                continue
            if state.in_flight >= window.limit:
                return None
            # The (counting - limit + 1)-th oldest finished call of the window must leave it first.
            leaves = state.ended[start + counting - window.limit] + window.seconds
            longest = max(longest, leaves - now)
        return longest

    async def _acquire(self, state: _Api) -> None:
        while True:
            now = self.clock.monotonic()
            wait = self._wait(state, now)
            if wait is not None and wait <= 0:
                state.in_flight += 1
                return
            state.changed.clear()
            if wait is None:
                await state.changed.wait()
                continue
            changed = asyncio.ensure_future(state.changed.wait())
            nap = asyncio.ensure_future(self.clock.sleep(wait))
            await asyncio.wait({changed, nap}, return_when=asyncio.FIRST_COMPLETED)
            for pending in (changed, nap):
                pending.cancel()

    def counting(self, api: str, seconds: float) -> int:
        """How many calls of `api` count toward a window of `seconds` now (for tests and metrics)."""
        state = self._apis.get(api)
        if state is None:
            return 0
        start = bisect.bisect_right(state.ended, self.clock.monotonic() - seconds)
        return state.in_flight + len(state.ended) - start

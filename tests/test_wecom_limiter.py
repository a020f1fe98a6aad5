"""The per-API limiter: whatever the network delays, WeCom never sees more than `limit` calls of an API within any
window, nor more than `concurrency` at once; and it does not hold calls back when there is room."""

from __future__ import annotations

import asyncio
import random

import pytest

from engine.clock import FakeClock
from engine.gateways.wecom.limiter import ApiLimiter, Window


def max_in_window(times: list[float], window: float) -> int:
    """The most arrivals within any half-open stretch [t, t + window)."""
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_arrivals_never_exceed_the_window_whatever_the_delays(seed: int) -> None:
    """200 calls with random delays before arrival and before the answer: at most `limit` arrive in any window,
    and at most `concurrency` are in flight at once."""
    rng = random.Random(seed)
    clock = FakeClock()
    limiter = ApiLimiter(clock, [Window(10, 1.0), Window(25, 5.0)], concurrency=4)
    arrivals: list[float] = []
    in_flight = 0
    peak = 0

    async def call() -> None:
        nonlocal in_flight, peak
        await clock.sleep(rng.random() * 3)
        async with limiter.call("externalcontact/batch/get_by_user"):
            in_flight += 1
            peak = max(peak, in_flight)
            await clock.sleep(rng.random() * 0.3)  # on the way there
            arrivals.append(clock.monotonic())
            await clock.sleep(rng.random() * 0.3)  # the answer on the way back
            in_flight -= 1

    async def main() -> None:
        await asyncio.gather(*(call() for _ in range(200)))

    asyncio.run(main())
    assert len(arrivals) == 200
    assert max_in_window(arrivals, 1.0) <= 10
    assert max_in_window(arrivals, 5.0) <= 25
    assert peak <= 4


def test_a_call_with_room_starts_at_once() -> None:
    """Below every limit, calls are not delayed at all."""
    clock = FakeClock()
    limiter = ApiLimiter(clock, [Window(5, 60.0)], concurrency=5)

    async def main() -> float:
        start = clock.monotonic()
        for _ in range(5):
            async with limiter.call("a"):
                pass
        return clock.monotonic() - start

    assert asyncio.run(main()) == 0
    assert limiter.counting("a", 60.0) == 5


def test_apis_are_limited_separately() -> None:
    """A full window of one API does not hold back another."""
    clock = FakeClock()
    limiter = ApiLimiter(clock, [Window(2, 60.0)], concurrency=5)

    async def main() -> tuple[float, float]:
        for _ in range(2):
            async with limiter.call("a"):
                pass
        start = clock.monotonic()
        async with limiter.call("b"):
            pass
        b_wait = clock.monotonic() - start
        async with limiter.call("a"):
            pass
        return b_wait, clock.monotonic() - start

    b_wait, a_wait = asyncio.run(main())
    assert b_wait == 0
    assert a_wait >= 60.0  # the third call of `a` waited for the first to leave the window


def test_the_wait_ends_when_the_oldest_call_leaves_the_window() -> None:
    """A full window makes the next call wait exactly until the oldest answer is `window` seconds old."""
    clock = FakeClock()
    limiter = ApiLimiter(clock, [Window(3, 10.0)], concurrency=10)

    async def main() -> list[float]:
        starts = []
        for _ in range(4):
            async with limiter.call("a"):
                starts.append(clock.monotonic())
                await clock.sleep(1.0)
        return starts

    starts = asyncio.run(main())
    base = starts[0]
    assert [round(s - base, 6) for s in starts] == [0.0, 1.0, 2.0, 11.0]

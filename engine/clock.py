"""Time, injected. Logic never calls `datetime.now()` or `asyncio.sleep()` directly: it asks a Clock,
so tests can move time instead of waiting for it."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware (UTC)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` (or pretend to)."""


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock for tests: `sleep` advances time instantly; `advance` moves it by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 5, 2, 0, tzinfo=UTC)
        self._mono = 1000.0
        self.slept: list[float] = []

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._mono += seconds

    def set(self, when: datetime) -> None:
        delta = (when - self._now).total_seconds()
        self.advance(delta)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        target = self._mono + max(0.0, seconds)
        # Let everything that is ready run at the current time first, then jump to the wake-up time
        # (unless another sleeper already moved the clock past it: concurrent sleeps overlap, as in
        # real time, instead of adding up).
        for _ in range(3):
            await asyncio.sleep(0)
        if self._mono < target:
            self.advance(target - self._mono)
        await asyncio.sleep(0)

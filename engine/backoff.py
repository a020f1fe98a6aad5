"""Exponential backoff with jitter: the one formula for every retry (sends, reconnects).

The random source is passed in (never the global `random`), so a seeded test sees the same delays every run.
"""

from __future__ import annotations

import random

# 2**64 base delays is past any cap anyone configures; the bound keeps the float finite.
_MAX_DOUBLINGS = 64


def backoff_delay(retry: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry number `retry` (0 for the first retry): `base` doubled per retry up to
    `cap`, with "equal jitter" (half of it fixed, half random), so many clients that failed together do not
    come back together, and no wait is shorter than half the step."""
    step = min(cap, base * 2.0 ** min(max(retry, 0), _MAX_DOUBLINGS))
    return step / 2 + rng.random() * step / 2

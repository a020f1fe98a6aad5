"""A limit on failed sign-in attempts per client address: guessing the API key through the console's sign-in form
is slowed to `limit` wrong keys per `window` seconds from one address.

Each address keeps the times of its recent failures (at most `limit` of them). Once it has `limit` failures within
the window it is refused — without the key being checked at all, so a refused guess tells nothing — until the
oldest of them leaves the window; `retry_after` says how many seconds that is (the answer's `Retry-After`). A
right key clears the address's failures. Memory is bounded: at most `max_addresses` addresses are remembered, the
least recently failing forgotten first.

Behind a reverse proxy every request comes from the proxy's address, unless uvicorn is told to trust its
`X-Forwarded-For` (`--forwarded-allow-ips`; loopback proxies are trusted by default): then the limit is per client,
as it should be.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

LIMIT = 5  # wrong keys ...
WINDOW = 600.0  # ... per this many seconds, from one address
MAX_ADDRESSES = 10_000


class FailedAttempts:
    """Counts failed sign-ins per address (see the module docstring). `now`: monotonic seconds (injected for
    tests). Thread-safe: sign-in runs on the event loop, but nothing here assumes it."""

    def __init__(
        self,
        *,
        limit: int = LIMIT,
        window: float = WINDOW,
        max_addresses: int = MAX_ADDRESSES,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1 or window <= 0 or max_addresses < 1:
            raise ValueError("limit, window and max_addresses must be positive")
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._now = now
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> deque[float] | None:
        found = self._failures.get(address)
        if found is None:
            return None
        while found and found[0] <= now - self.window:
            found.popleft()
        if not found:
            del self._failures[address]
            return None
        return found

    def retry_after(self, address: str) -> int | None:
        """Whole seconds until `address` may try again, or None when it may try now."""
        with self._lock:
            now = self._now()
            found = self._recent(address, now)
            if found is None or len(found) < self.limit:
                return None
            return max(1, math.ceil(found[0] + self.window - now))

    def failed(self, address: str) -> int:
        """Record a wrong key from `address`; returns its failures within the window (at most `limit`)."""
        with self._lock:
            now = self._now()
            found = self._recent(address, now)
            if found is None:
                found = self._failures[address] = deque(maxlen=self.limit)
                while len(self._failures) > self.max_addresses:
                    self._failures.popitem(last=False)
            else:
                self._failures.move_to_end(address)
            found.append(now)
            return len(found)

    def succeeded(self, address: str) -> None:
        """The right key from `address`: its failures are forgotten."""
        with self._lock:
            self._failures.pop(address, None)

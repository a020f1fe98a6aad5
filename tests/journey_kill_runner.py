"""The child side of tests/test_journey_kill.py: what `wecast serve` runs (the app, its scheduler, the journey
runner and their dispatch tasks) on the sandbox, on a clock the test moves from outside, until it is killed.

    python tests/journey_kill_runner.py CONFIG CLOCK_FILE

The clock is the real one shifted by the number of seconds in CLOCK_FILE (the test rewrites that file to jump time
forward across a journey's waits, never back); sleeps end early when a jump passes their end. On start the contact
list is made whole (a sync killed midway is run again), then the scheduler starts as serve's does. It prints
`ready` once started and runs until killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

SLICE = 0.05  # seconds: how often a sleeper looks whether the clock jumped (and the file is read at most)


class ShiftedClock:
    """Real time plus the offset the test writes to a file (read at most every SLICE seconds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0.0
        self._read_at = -1.0
        self._base = self._read()  # monotonic time moves by the jumps only (it starts near time.monotonic())

    def _read(self) -> float:
        mono = time.monotonic()
        if mono - self._read_at >= SLICE:
            with contextlib.suppress(OSError, ValueError):  # being replaced: keep the last value
                self._offset = float(self.path.read_text(encoding="ascii").strip() or 0)
            self._read_at = mono
        return self._offset

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self._read())

    def monotonic(self) -> float:
        return time.monotonic() + self._read() - self._base

    async def sleep(self, seconds: float) -> None:
        end = self.monotonic() + max(0.0, seconds)
        while True:
            left = end - self.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, SLICE))


async def main(config: Path, clock_file: Path) -> None:
    from engine.contacts import ListState
    from engine.scheduler import CampaignScheduler
    from engine.service import Wecast
    from engine.settings import load_settings

    settings = load_settings(config)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    app = Wecast(settings, clock=ShiftedClock(clock_file))
    await app.start()
    while (await app.gateway.login_status()).logged_in is False:
        await asyncio.sleep(0.05)
    if app.contact_list() is not ListState.WHOLE:
        await app.ensure_contacts()
    scheduler = CampaignScheduler(app)
    await scheduler.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("WECAST_LANG", "en")
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))

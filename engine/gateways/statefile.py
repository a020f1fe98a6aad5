"""A gateway's own SQLite state file (the sandbox's, the wecom gateway's), opened the way several processes can.

Turning a new file's journal to WAL needs its exclusive lock, and SQLite answers "database is locked" at once,
without calling the busy handler, when waiting could deadlock (this connection holds the shared lock another is
waiting to upgrade past). Two `wecast serve` (or serve and `wecast run`) starting at the same moment on a fresh
machine hit that, and the second died at startup with a traceback. So the switch is retried for as long as the busy
timeout would have waited — as `storage.db` does for wecast's own database (the gateways never import storage).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

BUSY_TIMEOUT = 30.0  # seconds a statement waits for another process's lock


def open_state_file(path: Path | str, *, timeout: float = BUSY_TIMEOUT) -> sqlite3.Connection:
    """A connection to `path` in autocommit mode, usable from several threads (callers hold their own lock), with
    the journal in WAL mode."""
    conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None, check_same_thread=False)
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return conn
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                conn.close()
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)

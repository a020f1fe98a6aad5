"""Who is doing what: a process's owner id, the heartbeat it keeps, and whether another process may take over.

A run being dispatched (`campaign_runs.owner`) and a contact sync running (`contact_syncs.owner`) carry their
process's owner id (`host:pid:nonce`) and a heartbeat. Another process takes over only when the owner is gone: on
the same host, its pid no longer exists or is a zombie (killed, its parent not having collected its exit status
yet: it will never beat again); on any host, its heartbeat is older than `STALE_AFTER`. Owners beat every
`HEARTBEAT_EVERY` seconds while they work and never go longer than `BEAT_WITHIN` without a beat whatever they wait
for (quiet hours to end, a login, staff to confirm a task, a retry's backoff), so a live owner is never judged stale
by another host: the margin also covers a beat held up by a database lock for up to its busy timeout (30 s).
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timedelta

HEARTBEAT_EVERY = 5.0  # seconds
BEAT_WITHIN = 15.0  # seconds: the longest wait between two beats
STALE_AFTER = timedelta(seconds=60)


def process_owner() -> str:
    """A new owner id for this process (`host:pid:nonce`)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_alive(owner: str, heartbeat: datetime | None, now: datetime) -> bool:
    """Whether the process that owns something may still be working on it."""
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text = rest.split(":", 1)[0]
    fresh = heartbeat is not None and now - heartbeat < STALE_AFTER
    if host == socket.gethostname() and pid_text.isdigit():
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return fresh
        return fresh and not _zombie(int(pid_text))
    return fresh


def _zombie(pid: int) -> bool:
    """Whether `pid` has exited and only waits for its parent to collect its status (Linux: its state in
    /proc/PID/stat is Z, or X while it goes). A `kill -9`'d wecast stays so until its parent waits for it; its pid
    still answers signal 0. Elsewhere (no /proc) nothing is known: False."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (comm) state ...": comm may hold spaces and parentheses, the state follows its last ')'.
            state = stat.read().rpartition(b")")[2].split(maxsplit=1)[:1]
    except OSError:
        return False
    return state in ([b"Z"], [b"X"])

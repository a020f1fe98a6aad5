"""A real `wecast` in a subprocess, and what to count afterwards: the harness of tests/test_chaos.py and
tests/test_failing_cleanly.py.

Everything is counted where it happened, not in wecast's own words: what customers received is read from the
sandbox's outbox (its state file, a SQLite file any process can read), what wecast recorded from its database.

A full disk is made real and cheap with SQLite's own size limit: `wecast_cmd(..., full_flag=F)` runs the CLI with
every database transaction first setting `PRAGMA max_page_count` to the file's current size once the file F exists,
so from then on any write that needs a new page fails with SQLITE_FULL — the very error a full disk gives — in the
wecast database only (not in the sandbox's state file, which stands for WeCom's servers).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

# Run as `python -c BOOT FLAG args...`: the CLI, with the disk "full" once FLAG exists (see the module docstring).
_FULL_DISK_BOOT = """
import os, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine
flag = sys.argv.pop(1)

@event.listens_for(Engine, "begin")
def _full_once_flagged(conn):
    if conn.dialect.name == "sqlite" and os.path.exists(flag):
        raw = conn.connection.dbapi_connection
        pages = raw.execute("PRAGMA page_count").fetchone()[0]
        raw.execute(f"PRAGMA max_page_count={pages}")

from engine.cli import main
sys.argv[0] = "wecast"
main()
"""


def wecast_cmd(cfg: Path, *args: str, full_flag: Path | None = None) -> list[str]:
    """The command line of `wecast -c cfg args...` (with `full_flag`: a disk that fills when the flag appears)."""
    if full_flag is None:
        return [sys.executable, "-m", "engine.cli", "-c", str(cfg), *args]
    return [sys.executable, "-c", _FULL_DISK_BOOT, str(full_flag), "-c", str(cfg), *args]


def start(cfg: Path, *args: str, full_flag: Path | None = None) -> subprocess.Popen[str]:
    """Start `wecast -c cfg args...` (in English unless `args` say `--lang`; stdout and stderr captured)."""
    env = {**os.environ, "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT)}
    env.pop("LC_ALL", None)
    return subprocess.Popen(
        wecast_cmd(cfg, *(() if "--lang" in args else ("--lang", "en")), *args, full_flag=full_flag),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


@dataclass
class Finished:
    code: int
    out: str
    err: str


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> Finished:
    out, err = proc.communicate(timeout=timeout)
    return Finished(proc.returncode, out, err)


def wecast(cfg: Path, *args: str, timeout: float = 120, full_flag: Path | None = None) -> Finished:
    """Run `wecast -c cfg args...` to its end."""
    return finish(start(cfg, *args, full_flag=full_flag), timeout)


def kill_9(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()


def _query(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Rows of `sql` on a SQLite file another process may be writing ([] while the file or table is not there)."""
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def outbox_parts(state_file: Path) -> list[tuple[str, str, str]]:
    """(contact id, part key, kind) of every part the sandbox delivered: what customers received."""
    return [
        (str(c), str(k), str(kind))
        for c, k, kind in _query(state_file, "SELECT contact_id, idempotency_key, kind FROM outbox")
    ]


def outbox_count(state_file: Path) -> int:
    rows = _query(state_file, "SELECT COUNT(*) FROM outbox")
    return int(str(rows[0][0])) if rows else 0


def wait_until(proc: subprocess.Popen[str], ready: Callable[[], bool], *, timeout: float = 60) -> bool:
    """Poll `ready` until it holds (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise AssertionError("the process made no progress")
        time.sleep(0.01)
    return True


@dataclass
class Delivery:
    id: int
    run_id: int
    campaign: str
    contact_id: str
    status: str
    reason: str
    key: str  # the delivery's idempotency key (each part's is `engine.messages.part_key` of it)
    parts: int  # how many parts its message has (1 for plain text)
    capped: bool


def ledger(db_url: str) -> list[Delivery]:
    """Every delivery wecast recorded (SQLite or PostgreSQL), read with plain SQL, not through wecast."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, run_id, campaign_id, contact_id, status, reason, dedupe_key, message, capped "
                    "FROM deliveries"
                )
            ).all()
    except OperationalError:
        return []
    finally:
        engine.dispose()
    return [
        Delivery(
            id=int(r.id),
            run_id=int(r.run_id),
            campaign=str(r.campaign_id),
            contact_id=str(r.contact_id),
            status=str(r.status),
            reason=str(r.reason or ""),
            key=str(r.dedupe_key or f"delivery-{r.id}"),
            parts=1 if r.message is None else len(json.loads(r.message)),
            capped=bool(r.capped),
        )
        for r in rows
    ]


def statuses(db_url: str) -> Counter[str]:
    return Counter(d.status for d in ledger(db_url))


@dataclass
class Tally:
    """The chaos figures, counted at the sandbox outbox against the ledger."""

    trials: int = 0
    duplicates: int = 0  # parts a customer received more than once (same delivery, same part)
    lost: int = 0  # recipients who should have received a message and have no part of it and no open delivery
    misreported: int = 0  # ledger `sent` without the whole message in the outbox, or anything in the outbox for a
    # delivery the ledger says was not delivered (failed/skipped/pending), or `unknown` where nothing may have left
    over_cap: int = 0  # contacts that received more capped messages in the cap's window than the cap allows
    unresolved: int = 0  # deliveries left neither final nor resumable
    notes: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.trials += other.trials
        self.duplicates += other.duplicates
        self.lost += other.lost
        self.misreported += other.misreported
        self.over_cap += other.over_cap
        self.unresolved += other.unresolved
        self.notes += other.notes

    def line(self) -> str:
        return (
            f"chaos: trials={self.trials} duplicates={self.duplicates} lost={self.lost} "
            f"misreported={self.misreported} over_cap={self.over_cap} unresolved={self.unresolved}"
        )

    @property
    def clean(self) -> bool:
        return not (self.duplicates or self.lost or self.misreported or self.over_cap or self.unresolved)

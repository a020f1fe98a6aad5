"""`kill -9` at random points of a 1,000-contact journey with waits: every step reaches every contact exactly once,
counted in the sandbox outbox (what customers received), not in our own ledger.

Each trial is a fresh database and sandbox: a real process (tests/journey_kill_runner.py: the app, serve's
scheduler, the journey runner and its dispatch tasks) runs a journey for 1,000 customers from its backfill — a
send, a calendar wait (the next day at 10:00), a two-hour wait, a second send — on a clock this test moves from
outside (the runner reads its offset from a file): when nothing is due, time jumps to the next due step. A seeded
plan kills the process once or twice, each either when the outbox reaches a random count or a random moment after
it started (its startup, the contact sync, the backfill, planning, an idle wait); after some kills wecast stays
"down" for a while (the clock jumps up to 50 minutes, within the journey's grace). Then the process is started
again, until every enrolment has ended.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from engine.gateways.demo_data import demo_contacts

TRIALS = 20
PARALLEL = 2
CUSTOMERS = 1000
SEED = 7
STEPS = ("s1", "s2")
START = datetime(2026, 11, 23, 1, 0, tzinfo=UTC)  # Monday 09:00 in Shanghai
RUNNER = Path(__file__).with_name("journey_kill_runner.py")
TRIAL_DEADLINE = 60.0  # seconds a trial may go without any progress (a send, a kill, a jump) before it counts as stuck

JOURNEY = """kind: journey
id: care
name: 三步关怀
trigger: contact_added
backfill: true
entry: once
quiet_hours: false
frequency_cap: false
catch_up: all
grace: 1h
throttle: {per_second: 5000}
steps:
  - id: s1
    send: {template: "【s1】{{ display_name }}您好，欢迎关注本店！"}
  - wait: {days: 1, at: "10:00"}
  - wait: 2h
  - id: s2
    send: {template: "【s2】{{ display_name }}，送您一张满减券"}
"""


def _book() -> tuple[int, frozenset[str]]:
    """How many demo contacts the sandbox needs so that exactly CUSTOMERS of them can receive messages (friends,
    not coworkers), and their ids: the journey's audience as the sandbox defines it, not as our database says."""
    n = CUSTOMERS
    while True:
        reachable = frozenset(c.id for c in demo_contacts(n, SEED) if c.friend and not c.coworker)
        if len(reachable) == CUSTOMERS:
            return n, reachable
        n += CUSTOMERS - len(reachable)


@dataclass
class Trial:
    seed: int
    kills: int
    jumps: int
    seconds: float
    received: Counter[tuple[str, str]]  # (contact id, step) -> messages in the outbox


class Child:
    """One trial's folder and its runner process."""

    def __init__(self, tmp: Path, contacts: int) -> None:
        self.tmp = tmp
        (tmp / "campaigns").mkdir(parents=True)
        (tmp / "campaigns" / "care.yaml").write_text(JOURNEY, encoding="utf-8")
        self.config = tmp / "config.yaml"
        self.config.write_text(
            "version: 1\n"
            f"database_url: sqlite:///{tmp}/wecast.sqlite\n"
            f"campaigns_dir: {tmp}/campaigns\n"
            "timezone: Asia/Shanghai\n"
            "log_level: WARNING\n"
            "sending: {concurrency: 64}\n"
            f"sandbox: {{contacts: {contacts}, seed: {SEED}, state_file: {tmp}/sandbox.sqlite}}\n",
            encoding="utf-8",
        )
        self.clock = tmp / "clock"
        self.offset = (START - datetime.now(UTC)).total_seconds()
        self._write_clock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def _write_clock(self) -> None:
        part = self.clock.with_suffix(".new")
        part.write_text(f"{self.offset:.6f}", encoding="ascii")
        part.replace(self.clock)

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset)

    def jump_to(self, when: datetime) -> None:
        self.offset += max(0.0, (when - self.now()).total_seconds())
        self._write_clock()

    def start(self) -> None:
        with open(self.tmp / "runner.log", "ab") as log:  # the child has its own copy; ours is closed here
            self.proc = subprocess.Popen(
                [sys.executable, str(RUNNER), str(self.config), str(self.clock)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=RUNNER.parent.parent,
            )
        self.started = time.monotonic()

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def alive(self) -> bool:
        if self.proc is None:
            return False
        code = self.proc.poll()
        assert code is None or code == -signal.SIGKILL, self.log()
        return code is None

    def log(self) -> str:
        path = self.tmp / "runner.log"
        return path.read_text(encoding="utf-8", errors="replace")[-3000:] if path.exists() else ""

    # -- looking from outside (plain sqlite3: the test does not trust the code under test to count) --------------
    def outbox(self) -> list[tuple[str, str]]:
        return _query(self.tmp / "sandbox.sqlite", "SELECT contact_id, text FROM outbox")

    def sent(self) -> int:
        rows = _query(self.tmp / "sandbox.sqlite", "SELECT COUNT(*) FROM outbox")
        return int(rows[0][0]) if rows else 0

    def enrolments(self) -> tuple[Counter[str], datetime | None]:
        """Enrolments by status, and when the next active one is due."""
        sql = "SELECT status, COUNT(*), MIN(due_at) FROM enrolments GROUP BY status"
        rows = _query(self.tmp / "wecast.sqlite", sql)
        due = next((d for status, _, d in rows if status == "active" and d), None)
        return Counter({status: n for status, n, _ in rows}), (
            datetime.fromisoformat(due).replace(tzinfo=UTC) if due else None
        )


def _query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []  # the schema is not there yet
    finally:
        conn.close()


def _step_of(text: str) -> str:
    return text[1:3] if text.startswith("【") else "?"


def run_trial(tmp: Path, seed: int, contacts: int, expected: int) -> Trial:
    rng = random.Random(seed)
    child = Child(tmp, contacts)
    # The kill plan: at an outbox count somewhere in the whole journey, or at a moment after a (re)start.
    plan = [
        ("outbox", rng.randrange(expected)) if rng.random() < 0.6 else ("after", rng.uniform(0.05, 2.5))
        for _ in range(rng.randint(1, 2))
    ]
    plan.sort(key=lambda k: (k[0] != "outbox", k[1]))
    kills = jumps = 0
    began = progressed = time.monotonic()
    seen: tuple[int, int, int] = (-1, 0, 0)
    child.start()
    try:
        while True:
            # Stuck means no progress for a while, not slow: under a loaded machine a whole trial may take minutes.
            assert time.monotonic() - progressed < TRIAL_DEADLINE, f"trial {seed} made no progress:\n{child.log()}"
            if not child.alive():
                child.start()
            sent = child.sent()
            if (sent, kills, jumps) != seen:
                seen, progressed = (sent, kills, jumps), time.monotonic()
            if plan:
                kind, value = plan[0]
                if (kind == "outbox" and sent >= value) or (
                    kind == "after" and time.monotonic() - child.started >= value
                ):
                    plan.pop(0)
                    child.kill()
                    kills += 1
                    if rng.random() < 0.5:
                        child.jump_to(child.now() + timedelta(minutes=rng.uniform(1, 50)))  # down for a while
                    child.start()
                    continue
            statuses, due = child.enrolments()
            if statuses and statuses["active"] == 0 and statuses["sending"] == 0:
                break  # every enrolment ended
            if statuses and statuses["sending"] == 0 and due is not None and due > child.now():
                child.jump_to(due + timedelta(seconds=1))  # nothing to do until the next step: skip the wait
                jumps += 1
            time.sleep(0.05)
    finally:
        if child.alive():
            child.kill()
    received = Counter((contact_id, _step_of(text)) for contact_id, text in child.outbox())
    return Trial(seed, kills, jumps, time.monotonic() - began, received)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_kill_9_at_random_points_of_a_journey_with_waits_sends_every_step_exactly_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    contacts, reachable = _book()
    wanted = {(cid, step) for cid in reachable for step in STEPS}
    with ThreadPoolExecutor(PARALLEL) as pool:  # the children do the work: two at a time keep two cores busy
        trials = list(
            pool.map(lambda seed: run_trial(tmp_path / f"trial-{seed}", seed, contacts, len(wanted)), range(TRIALS))
        )
    sent = sum(sum(t.received.values()) for t in trials)
    duplicates = sum(n - 1 for t in trials for n in t.received.values() if n > 1)
    missing = sum(len(wanted - set(t.received)) for t in trials)
    stray = sum(len(set(t.received) - wanted) for t in trials)
    with capsys.disabled():
        print(
            f"\njourney kill -9: {TRIALS} trials, {sum(t.kills for t in trials)} kills, {CUSTOMERS} contacts, "
            f"{len(wanted) * TRIALS} steps expected, {sent} sent, {duplicates} duplicates, {missing} missing"
        )
    for t in trials:
        assert set(t.received) == wanted and max(t.received.values()) == 1, (
            f"trial {t.seed} ({t.kills} kills): {len(wanted - set(t.received))} missing, "
            f"{sum(n - 1 for n in t.received.values() if n > 1)} duplicates, {len(set(t.received) - wanted)} stray"
        )
    assert sent == len(wanted) * TRIALS and duplicates == missing == stray == 0
    assert sum(t.kills for t in trials) >= TRIALS

"""A run killed with `kill -9` mid-send resumes and every recipient gets exactly one message —
counted in the sandbox outbox (what customers received), not only in our own log."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

RECIPIENTS = 1000


def _setup(tmp: Path, *, idempotent: bool) -> Path:
    (tmp / "campaigns").mkdir()
    (tmp / "campaigns" / "big.yaml").write_text(
        "id: big\nname: 大促通知\n"
        f"audience: {{limit: {RECIPIENTS}}}\n"
        "message: {template: '{{ display_name }}您好，双十二大促开始啦！'}\n"
        "frequency_cap: false\nquiet_hours: false\nthrottle: {per_second: 400}\n",
        encoding="utf-8",
    )
    cfg = tmp / "config.yaml"
    cfg.write_text(
        "version: 1\n"
        f"database_url: sqlite:///{tmp}/wecast.sqlite\n"
        f"campaigns_dir: {tmp}/campaigns\n"
        "sending: {concurrency: 16}\n"
        f"sandbox: {{contacts: 1100, seed: 5, state_file: {tmp}/sandbox.sqlite, "
        f"honor_idempotency_key: {str(idempotent).lower()}, faults: {{latency_ms: 3, latency_jitter_ms: 4}}}}\n",
        encoding="utf-8",
    )
    return cfg


def _wecast(cfg: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "-c", str(cfg), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def _outbox(tmp: Path) -> list[tuple[str, str]]:
    path = tmp / "sandbox.sqlite"
    if not path.exists():
        return []
    conn = sqlite3.connect(path, timeout=30)
    try:
        return conn.execute("SELECT contact_id, idempotency_key FROM outbox").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def _kill_when_outbox_reaches(proc: subprocess.Popen[str], tmp: Path, count: int) -> None:
    deadline = time.monotonic() + 60
    # Kill at a moment when some messages have been delivered but not yet recorded as sent: the case
    # recovery must get right (resend only if the gateway deduplicates, else record `unknown`).
    while len(_outbox(tmp)) < count or len(_outbox(tmp)) <= _recorded_sent(tmp):
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()  # reaps it and closes its pipes (wait() left them open: unclosed files)


def _recorded_sent(tmp: Path) -> int:
    conn = sqlite3.connect(tmp / "wecast.sqlite", timeout=30)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM deliveries WHERE status = 'sent'").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def _deliveries(tmp: Path) -> dict[str, str]:
    conn = sqlite3.connect(tmp / "wecast.sqlite")
    try:
        # Contacts held back at planning (not friends, over the limit) are no recipients: skipped, not sent.
        rows = conn.execute(
            "SELECT contact_id, status FROM deliveries "
            "WHERE reason NOT LIKE 'not_friend:%' AND reason NOT LIKE 'limit:%'"
        )
        return dict(rows.fetchall())
    finally:
        conn.close()


@pytest.mark.slow
def test_kill_9_twice_then_resume_sends_each_recipient_exactly_once(tmp_path: Path) -> None:
    """Killed twice mid-run (idempotent gateway), the resumed run completes with one message per recipient."""
    cfg = _setup(tmp_path, idempotent=True)
    proc = _wecast(cfg, "run", "big")
    _kill_when_outbox_reaches(proc, tmp_path, 250)
    proc = _wecast(cfg, "run", "--resume")
    _kill_when_outbox_reaches(proc, tmp_path, 600)
    partial = _deliveries(tmp_path)
    assert "pending" in partial.values() or "sending" in partial.values()
    done = _wecast(cfg, "run", "--resume")
    _, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    received = _outbox(tmp_path)
    contacts = [c for c, _ in received]
    assert len(contacts) == RECIPIENTS
    assert len(set(contacts)) == RECIPIENTS
    statuses = _deliveries(tmp_path)
    assert set(statuses.values()) == {"sent"}
    assert set(statuses) == set(contacts)


@pytest.mark.slow
def test_kill_9_without_idempotent_gateway_never_sends_twice_and_records_unknowns(tmp_path: Path) -> None:
    """When the gateway cannot deduplicate, in-flight sends at the kill become `unknown` (never resent):
    nobody gets two messages, and every delivery ends in a recorded state."""
    cfg = _setup(tmp_path, idempotent=False)
    proc = _wecast(cfg, "run", "big")
    _kill_when_outbox_reaches(proc, tmp_path, 400)
    done = _wecast(cfg, "run", "--resume")
    done.communicate(timeout=120)
    statuses = _deliveries(tmp_path)
    received = [c for c, _ in _outbox(tmp_path)]
    assert len(received) == len(set(received)), "a recipient got two messages"
    assert set(statuses.values()) <= {"sent", "unknown"}
    sent = {c for c, s in statuses.items() if s == "sent"}
    unknown = {c for c, s in statuses.items() if s == "unknown"}
    assert sent <= set(received)
    assert set(received) <= sent | unknown
    assert len(sent) + len(unknown) == RECIPIENTS
    assert len(unknown) <= 64, "only sends in flight at the kill may be unknown"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_or_sigterm_mid_run_stops_gracefully_and_resume_finishes(tmp_path: Path, signum: int) -> None:
    """Ctrl-C, and SIGTERM (`docker stop`, systemd, `timeout`), stop `wecast run` gracefully on a gateway without
    idempotency keys: the sends in flight finish and are recorded, nothing is left claimed or sending, the exit
    status names the signal; the resumed run sends everyone else, with no `unknown` and nobody twice."""
    (tmp_path / "campaigns").mkdir()
    (tmp_path / "campaigns" / "slow.yaml").write_text(
        "id: slow\nname: 慢速发送\naudience: {}\nmessage: {template: '{{ display_name }}您好'}\n"
        "frequency_cap: false\nquiet_hours: false\nthrottle: {per_second: 40}\n",
        encoding="utf-8",
    )
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "version: 1\n"
        f"database_url: sqlite:///{tmp_path}/wecast.sqlite\n"
        f"campaigns_dir: {tmp_path}/campaigns\n"
        "sending: {concurrency: 8}\n"
        f"sandbox: {{contacts: 150, seed: 3, state_file: {tmp_path}/sandbox.sqlite, "
        "honor_idempotency_key: false, faults: {latency_ms: 400}}\n",
        encoding="utf-8",
    )
    proc = _wecast(cfg, "--lang", "en", "run", "slow")
    deadline = time.monotonic() + 60
    while len(_outbox(tmp_path)) < 20:  # mid-run: sends in flight (400 ms each, 8 at a time)
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err, err[-2000:]
    stopped = _deliveries(tmp_path)
    assert "claimed" not in stopped.values() and "sending" not in stopped.values(), (
        Counter(stopped.values()),
        err[-1500:],
    )
    assert "pending" in stopped.values()  # stopped mid-run, not after it
    assert sum(s == "sent" for s in stopped.values()) == len(_outbox(tmp_path))  # what left is recorded sent
    done = _wecast(cfg, "run", "--resume")
    _, err = done.communicate(timeout=120)
    assert done.returncode == 0, err[-2000:]
    received = [c for c, _ in _outbox(tmp_path)]
    statuses = _deliveries(tmp_path)
    assert set(statuses.values()) == {"sent"}, statuses
    assert sorted(received) == sorted(statuses)

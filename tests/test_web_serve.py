"""`serve()` itself: no API key means no start beyond loopback; with a key every endpoint but /healthz needs it
(a real process bound to 0.0.0.0); the key never shows in the log; SIGTERM and graceful shutdown record every
in-flight send, and a restart finishes the run without sending anything twice."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from engine.errors import ConfigError
from engine.gateways.sandbox import SandboxStore
from engine.service import Wecast
from engine.web.app import create_app
from engine.web.security import is_loopback
from engine.web.server import serve, serve_settings
from storage.deliveries import status_counts

try:
    from web_harness import LiveServer, make_settings
except ImportError:  # pragma: no cover
    from tests.web_harness import LiveServer, make_settings

REPO = Path(__file__).resolve().parent.parent
KEY = "test-key-5f0c2a9e77d1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_non_loopback_without_key_refuses_to_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Binding 0.0.0.0 with no API key returns a config exit code at once and says why."""
    settings = make_settings(tmp_path)
    assert serve(settings, host="0.0.0.0", port=free_port()) == 2
    assert "WECAST_API_KEY" in caplog.text
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")


def test_require_key_without_a_key_is_a_config_error(tmp_path: Path) -> None:
    """create_app refuses to build an app that would need a key nobody configured."""
    with pytest.raises(ConfigError, match="API key"):
        create_app(Wecast(make_settings(tmp_path)), require_key=True)


def test_serve_starts_the_sandbox_logged_out_unless_configured(tmp_path: Path) -> None:
    """In serve mode the sandbox waits for /goStart (even with the CLI's sandbox.auto_login: true), unless
    api.sandbox_auto_login is set."""
    assert serve_settings(make_settings(tmp_path, sandbox={"auto_login": True})).sandbox.auto_login is False
    explicit = make_settings(tmp_path, api={"sandbox_auto_login": True})
    assert serve_settings(explicit).sandbox.auto_login is True


@pytest.mark.slow
def test_serve_process_with_key_on_all_interfaces(tmp_path: Path) -> None:
    """A real `serve` on 0.0.0.0: 401 without the key, 200 with it, /healthz open, clean exit on SIGTERM."""
    (tmp_path / "config.yaml").write_text("version: 1\nsandbox:\n  contacts: 20\n  scan_delay: 1h\n", encoding="utf-8")
    port = free_port()
    env = {**os.environ, "WECAST_CONFIG": str(tmp_path / "config.yaml"), "WECAST_API_KEY": KEY, "PYTHONPATH": str(REPO)}
    code = (
        "from engine.settings import load_settings; from engine.web.server import serve; "
        f"raise SystemExit(serve(load_settings(), host='0.0.0.0', port={port}))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{url}/api/v1/login").status_code == 401
        assert httpx.post(f"{url}/goStart").status_code == 401
        assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/api/v1/login", headers={"Authorization": KEY}).status_code == 401
        assert httpx.get(f"{url}/api/v1/login", headers=auth).json()["state"] == "logged_out"
        started = httpx.post(f"{url}/goStart", headers=auth).json()
        assert started["state"] == "waiting_scan"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "refusing" not in out and KEY not in out
    assert started["qrcodeKey"] in out and "█" in out  # the QR was printed as terminal text
    assert "shutting down" in out and "every in-flight send is recorded" in out


def test_shutdown_records_in_flight_sends_and_restart_finishes_once(tmp_path: Path) -> None:
    """Stopping mid-send leaves no delivery claimed or sending; the restart completes the run; nobody gets two."""
    settings = make_settings(
        tmp_path,
        sandbox={"auto_login": True, "faults": {"latency_ms": 60}},
        sending={"throttle": {"per_second": 40}, "concurrency": 4, "quiet_hours": None},
        api={"send_wait": "0.2s", "shutdown_timeout": "5s"},
    )
    with LiveServer(settings) as live:
        answer = live.client.post(
            "/send-message-all",
            json={"tag": "普通会员", "message": "会员日快乐"},
            headers={"Idempotency-Key": "member-day"},
        )
        assert answer.status_code == 202, answer.text
        run_id = answer.json()["runId"]
        planned = sum(answer.json()["counts"].values())
    counts = status_counts(Wecast(settings).db, run_id)
    assert not counts.get("claimed") and not counts.get("sending"), counts
    assert 0 < counts.get("sent", 0) < planned, counts  # stopped mid-run, and what went out is recorded
    store = SandboxStore(settings.sandbox.state_file)
    try:
        assert store.count() == counts["sent"]
    finally:
        store.close()

    with LiveServer(settings) as live:
        for _ in range(300):
            run = live.client.get(f"/api/v1/runs/{run_id}").json()
            if run["status"] == "completed":
                break
            time.sleep(0.05)
        assert run["status"] == "completed" and run["counts"] == {"sent": planned}
        retry = live.client.post(
            "/send-message-all",
            json={"tag": "普通会员", "message": "会员日快乐"},
            headers={"Idempotency-Key": "member-day"},
        )
        assert retry.status_code == 200 and retry.json()["replayed"] is True
    store = SandboxStore(settings.sandbox.state_file)
    try:
        per_contact = Counter(m.contact_id for m in store.messages())
    finally:
        store.close()
    assert len(per_contact) == planned and set(per_contact.values()) == {1}

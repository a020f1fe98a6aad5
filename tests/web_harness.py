"""Helpers for the HTTP tests: a real uvicorn server on a random loopback port, in a thread, serving a
`create_app` built for a Wecast instance over a temporary data folder (sandbox gateway)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn

from engine.scheduler import CampaignScheduler
from engine.service import Wecast
from engine.settings import Settings
from engine.web.app import create_app
from engine.web.attempts import FailedAttempts

T = TypeVar("T")

CAMPAIGN = """\
id: vip_daily
name: VIP每日问候
timezone: Asia/Shanghai
schedule: {cron: "0 10 * * *"}
audience: {tags_any: [VIP]}
message:
  template: "{{ name }}您好，VIP专享活动开始啦"
quiet_hours: false
frequency_cap: false
"""

MANUAL = """\
id: new_customers
name: 新客欢迎
audience: {tags_any: [新客]}
message:
  template: "{{ name }}，欢迎光临"
quiet_hours: false
frequency_cap: false
"""

BROKEN = """\
name: 坏的活动
audience: {tags_any: [VIP]}
message:
  templat: "typo"
"""


def make_settings(root: Path, **overrides: Any) -> Settings:
    """Settings over `root`: sandbox with 60 customers, a phone that never scans by itself, fast sends."""
    (root / "campaigns").mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "version": 1,
        "gateway": "sandbox",
        "database_url": f"sqlite:///{root / 'wecast.sqlite'}",
        "campaigns_dir": str(root / "campaigns"),
        "sandbox": {
            "contacts": 60,
            "auto_login": False,
            "scan_delay": "1h",
            "state_file": str(root / "sandbox.sqlite"),
        },
        "sending": {"throttle": {"per_second": 500}, "quiet_hours": None},
        "api": {"send_wait": "10s", "shutdown_timeout": "5s"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return Settings.model_validate(data)


class LiveServer:
    """uvicorn in a thread on 127.0.0.1:<free port>; `with LiveServer(...) as s: s.client.get(...)`."""

    def __init__(
        self,
        settings: Settings,
        *,
        require_key: bool = False,
        scheduler: bool = True,
        loopback_only: bool = True,
        signin_attempts: FailedAttempts | None = None,
    ) -> None:
        """`loopback_only=False` serves as `wecast serve` does on a non-loopback address (any Host name)."""
        self.app = Wecast(settings)
        self.scheduler = CampaignScheduler(self.app) if scheduler else None
        self.api = create_app(
            self.app,
            scheduler=self.scheduler,
            require_key=require_key,
            loopback_only=loopback_only,
            signin_attempts=signin_attempts,
        )
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # The loop `wecast serve` runs on (uvloop): tests that read contacts right after a login get the list the
        # login's sync makes, on any loop's order of callbacks (the contact listings wait for it).
        config = uvicorn.Config(
            self.api,
            log_config=None,
            lifespan="on",
            ws="none",
            http="h11",
            loop="auto",  # uvloop where installed, as `wecast serve`
            timeout_graceful_shutdown=10,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def on_loop(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the server's event loop, as a gateway's stream delivers an event there, and return its result."""
        loop = self.server.servers[0].get_loop()

        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.client.close()
        self.sock.close()


def login(client: httpx.Client) -> dict[str, Any]:
    """The source document's login, with the sandbox phone driven over the API."""
    state = client.get("/api/v1/login").json()
    if state["state"] == "logged_in":
        return dict(state)
    started = client.post("/goStart").json()
    client.post("/api/v1/sandbox/scan").raise_for_status()
    phone = client.get("/api/v1/sandbox/phone").json()
    answer = client.post(
        "/submit-verify-code", json={"verifyCode": phone["verifyCode"], "qrcodeKey": started["qrcodeKey"]}
    )
    answer.raise_for_status()
    return dict(answer.json())

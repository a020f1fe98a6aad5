"""Helpers for the wecom tests: the fake WeCom server on loopback and gateway settings pointing at it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from engine.clock import Clock, FakeClock
from engine.gateways.wecom.fake_server import FakeWecom, FakeWecomServer
from engine.gateways.wecom.gateway import WecomGateway
from engine.service import Wecast
from engine.settings import Settings, WecomSettings, load_settings

T = TypeVar("T")
CALLBACK_TOKEN = "faketoken"
AES_KEY = "a" * 43


def wecom_settings(fake: FakeWecom, url: str, state_file: Path, **overrides: object) -> WecomSettings:
    """Settings pointing at the fake, with test-sized waits (the real 45009 block is 60 s)."""
    values: dict[str, object] = {
        "corp_id": fake.corp_id,
        "secret": fake.secret,
        "callback_token": CALLBACK_TOKEN,
        "encoding_aes_key": AES_KEY,
        "base_url": url,
        "state_file": state_file,
        "rate_limit_wait": "0.05s",
        "retry_delay": "0.01s",
        "call_timeout": "5s",
    }
    values.update(overrides)
    return WecomSettings.model_validate(values)


def wecom_config(
    tmp: Path, db_url: str, fake: FakeWecom, url: str, extra: str = "", *, attempts: int = 6, send_timeout: str = "30s"
) -> Settings:
    """config.yaml for gateway wecom pointing at the fake (test-sized waits)."""
    cfg = tmp / "config.yaml"
    cfg.write_text(
        "version: 1\n"
        "gateway: wecom\n"
        f"database_url: '{db_url}'\n"
        f"campaigns_dir: {tmp}/campaigns\n"
        f"sending: {{concurrency: 4, send_timeout: {send_timeout}, "
        f"retry: {{max_attempts: {attempts}, base_delay: 1s, max_delay: 10s}}}}\n"
        f"wecom:\n  corp_id: {fake.corp_id}\n  secret: {fake.secret}\n  base_url: {url}\n"
        f"  state_file: {tmp}/wecom.sqlite\n  retry_delay: 0.01s\n  rate_limit_wait: 60s\n{extra}",
        encoding="utf-8",
    )
    return load_settings(cfg)


async def started(settings: Settings, clock: FakeClock) -> Wecast:
    app = Wecast(settings, gateway=WecomGateway(settings.wecom, clock), clock=clock)
    await app.start()
    return app


@dataclass
class Running:
    fake: FakeWecom
    server: FakeWecomServer
    gateway: WecomGateway

    @property
    def url(self) -> str:
        return self.server.url


@asynccontextmanager
async def running(
    tmp: Path, *, clock: Clock | None = None, settings: dict[str, object] | None = None, **fake_options: Any
) -> AsyncIterator[Running]:
    """A fake WeCom on loopback and a started wecom gateway logged in to it."""
    fake = FakeWecom(clock=clock, **fake_options)
    server = FakeWecomServer(fake)
    url = await server.start()
    try:
        gateway = WecomGateway(wecom_settings(fake, url, tmp / "wecom.sqlite", **(settings or {})), clock)
        try:
            await gateway.start()
            yield Running(fake, server, gateway)
        finally:
            await gateway.close()
    finally:
        await server.stop()


class FakeWecomThread:
    """The fake WeCom server in a thread of its own (for tests that run `wecast serve` in another thread):
    `with FakeWecomThread(fake) as url: ...`."""

    def __init__(self, fake: FakeWecom) -> None:
        self.fake = fake
        self.server = FakeWecomServer(fake)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(20)

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(20)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(20)
        self._loop.close()

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` (e.g. staff confirming tasks) on the fake's own loop, between its requests."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(20)

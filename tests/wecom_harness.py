"""Helpers for the wecom tests: the fake WeCom server on loopback and gateway settings pointing at it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.clock import Clock
from engine.gateways.wecom.fake_server import FakeWecom, FakeWecomServer
from engine.gateways.wecom.gateway import WecomGateway
from engine.settings import WecomSettings

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

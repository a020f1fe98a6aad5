"""Helpers shared by the test modules (the fixtures that use them are in conftest.py).

Import as `from helpers import ...`: pytest puts this folder on sys.path for the tests in it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections import Counter
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from engine.clock import FakeClock
from engine.gateways.base import Gateway, SendReceipt
from engine.gateways.sandbox import SandboxGateway
from engine.messages import Part, PartKind
from engine.service import Wecast
from engine.settings import Settings, load_settings
from engine.spec import Campaign, parse_campaign

T = TypeVar("T")

# Monday 2026-01-05 10:00 in Shanghai (02:00 UTC): inside the default sending window.
MONDAY_10 = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)

# A campaign body for everyone, exempt from the cap and quiet hours, fast.
PLAIN = """
audience: {}
message:
  template: "{{ display_name }}您好，测试消息。"
frequency_cap: false
quiet_hours: false
throttle: {per_second: 1000}
"""
CAPPED = PLAIN.replace("frequency_cap: false", "frequency_cap: {max: 1, per: day}")


def write_settings(
    tmp: Path,
    db_url: str,
    *,
    contacts: int = 120,
    faults: str = "{}",
    extra: str = "",
    idempotent: bool = True,
    sandbox: str = "",
) -> Settings:
    """A config.yaml in `tmp` over `db_url`: a seeded sandbox, 8 concurrent sends, 3 tries a delivery."""
    cfg = tmp / "config.yaml"
    cfg.write_text(
        "version: 1\n"
        f"database_url: '{db_url}'\n"
        f"campaigns_dir: {tmp}/campaigns\n"
        "sending:\n"
        "  concurrency: 8\n"
        "  retry: {max_attempts: 3, base_delay: 1s, max_delay: 10s}\n"
        f"{extra}"
        f"sandbox: {{contacts: {contacts}, seed: 11, state_file: {tmp}/sandbox.sqlite, "
        f"honor_idempotency_key: {str(idempotent).lower()}, faults: {faults}{sandbox}}}\n",
        encoding="utf-8",
    )
    return load_settings(cfg)


def campaign(settings: Settings, body: str, name: str = "c1") -> Campaign:
    """A campaign `name` with `body` (audience, message, policies), as if read from campaigns/."""
    return parse_campaign(f"id: {name}\nname: 测试活动\n" + body, settings.campaigns_dir / f"{name}.yaml", settings)


def outbox_by_contact(gateway: Gateway) -> Counter[str]:
    """How many messages each contact received, counted in the sandbox's outbox (not in our own log)."""
    assert isinstance(gateway, SandboxGateway)
    return Counter(m.contact_id for m in gateway.outbox_messages())


async def started(settings: Settings, clock: FakeClock | None = None) -> Wecast:
    """A started Wecast on a fake clock (Monday 10:00 Shanghai), contacts synced."""
    app = Wecast(settings, clock=clock or FakeClock(MONDAY_10))
    await app.start()
    await app.sync()
    return app


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def parts_received(gateway: Gateway, contact_id: str) -> list[PartKind]:
    """The kinds of the parts a contact received, in order, from the sandbox's outbox."""
    assert isinstance(gateway, SandboxGateway)
    return [PartKind(m.kind) for m in gateway.outbox_messages(contact_id)]


def record_part_calls(gateway: Gateway, fail: dict[PartKind, list[Exception]] | None = None) -> list[tuple[str, str]]:
    """Record (contact id, key) of every `send_part` call the gateway gets from now on; `fail`: errors to raise
    instead of sending, per part kind, first one first."""
    calls: list[tuple[str, str]] = []
    original = gateway.send_part
    failures = fail or {}

    async def send_part(contact_id: str, part: Part, *, idempotency_key: str) -> SendReceipt:
        calls.append((contact_id, idempotency_key))
        if failures.get(part.kind):
            raise failures[part.kind].pop(0)
        return await original(contact_id, part, idempotency_key=idempotency_key)

    gateway.send_part = send_part  # type: ignore[method-assign]
    return calls


def demo_workdir(folder: Path) -> Path:
    """The shipped campaigns and a config in `folder`, sending as fast as the sandbox takes them, at any hour
    (no throttle worth the name, no quiet hours: whatever the hour the suite runs at)."""
    shutil.copytree(Path(__file__).resolve().parent.parent / "campaigns", folder / "campaigns")
    for path in (folder / "campaigns").glob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"(?m)^throttle:.*(\n[ \t]+.*)*", "throttle: {per_second: 1000}", text)
        text = re.sub(r"(?m)^quiet_hours:.*(\n[ \t]+.*)*", "", text) + "\nquiet_hours: false\n"
        path.write_text(text, encoding="utf-8")
    (folder / "config.yaml").write_text(
        "version: 1\n"
        f"database_url: sqlite:///{folder}/data/wecast.sqlite\n"
        f"campaigns_dir: {folder}/campaigns\n"
        "sending: {throttle: {per_second: 1000}, quiet_hours: null}\n"
        f"sandbox: {{state_file: {folder}/data/sandbox.sqlite}}\n",
        encoding="utf-8",
    )
    return folder

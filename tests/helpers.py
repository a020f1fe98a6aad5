"""Helpers shared by the test modules (the fixtures that use them are in conftest.py).

Import as `from helpers import ...`: pytest puts this folder on sys.path for the tests in it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from engine.clock import Clock, FakeClock
from engine.errors import PermanentError
from engine.gateways.base import Gateway, SendReceipt
from engine.gateways.sandbox import SandboxGateway
from engine.messages import Part, PartKind, TextPart
from engine.service import Wecast
from engine.settings import SandboxSettings, Settings, load_settings
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


@dataclass(frozen=True)
class ReceivedPart:
    """One part a customer received, as the gateway's far side recorded it."""

    contact_id: str
    kind: PartKind
    key: str
    part: Part


class PartsSandbox(SandboxGateway):
    """The sandbox, able to send every part kind: parts other than text land in `received` (deduplicated by key
    when the sandbox honours keys, as its outbox is); `sandbox_refuse(kind, reason)` refuses the next part of a kind
    for good, `sandbox_fail(kind, error)` raises `error` for it. (The sandbox's own outbox learns every part kind on
    the gateways branch; these tests move to it then.)"""

    def __init__(self, settings: SandboxSettings, clock: Clock | None = None) -> None:
        super().__init__(settings, clock)
        self.capabilities = replace(self.capabilities, supports=frozenset(PartKind))
        self.received: list[ReceivedPart] = []
        self.failures: dict[PartKind, list[Exception]] = {}
        self.calls: list[tuple[str, str]] = []  # (contact id, key) of every send_part call

    def sandbox_refuse(self, kind: PartKind, reason: str, count: int = 1) -> None:
        self.failures.setdefault(kind, []).extend(PermanentError(reason) for _ in range(count))

    def sandbox_fail(self, kind: PartKind, error: Exception) -> None:
        self.failures.setdefault(kind, []).append(error)

    async def send_part(self, contact_id: str, part: Part, *, idempotency_key: str) -> SendReceipt:
        self.calls.append((contact_id, idempotency_key))
        if self.failures.get(part.kind):
            raise self.failures[part.kind].pop(0)
        if isinstance(part, TextPart):
            receipt = await self.send_text(contact_id, part.text, idempotency_key=idempotency_key)
            if not receipt.duplicate:
                self.received.append(ReceivedPart(contact_id, part.kind, idempotency_key, part))
            return receipt
        self._require_login()
        problem = self._reachable(contact_id)
        if problem:
            raise PermanentError(problem)
        await self._faults_before_send()
        if self.capabilities.idempotent_sends:
            for i, r in enumerate(self.received):
                if r.key == idempotency_key:
                    return SendReceipt(f"part-{i}", duplicate=True)
        self.received.append(ReceivedPart(contact_id, part.kind, idempotency_key, part))
        return SendReceipt(f"part-{len(self.received) - 1}")

    def parts_of(self, contact_id: str) -> list[PartKind]:
        return [r.kind for r in self.received if r.contact_id == contact_id]

"""Runs the shared gateway contract (`tests/gateway_contract.py`) against every gateway we ship.

* `workpro`: the real gRPC client against the fake WorkPro puppet on loopback.
* `sandbox`: the in-process simulated account (its phone scans only when the test says so).
* `sandbox-batch`: the sandbox sending by 群发 task (`mode: batch`), as the official API does.
* `wecom`: the official-API gateway against the fake WeCom server (FastAPI on loopback). It logs in with
  credentials, not by QR, and sends by task only: the capabilities select `test_credential_login` and the task
  tests for it instead of the QR and direct-send tests (see tests/gateway_contract.py).

Each is a `Flavour` in `FLAVOURS`, with the capabilities its settings give it: the contract parametrizes each test
over the flavours it applies to when it is collected, so no test is skipped.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from engine.gateways.base import Capabilities, Gateway
from engine.gateways.fake_puppet import FakePuppet
from engine.gateways.sandbox import OutboxMessage, SandboxGateway
from engine.gateways.wecom.fake_server import FakeWecom, FakeWecomServer
from engine.gateways.wecom.gateway import WecomGateway
from engine.gateways.workpro import WorkproGateway
from engine.messages import PartKind
from engine.settings import SandboxSettings, WorkproSettings

try:  # pytest puts tests/ on sys.path (no __init__.py); keep working if it becomes a package
    from gateway_contract import Delivered, DriverFactory, Flavour, GatewayContract, GatewayDriver
    from wecom_harness import wecom_settings
except ImportError:  # pragma: no cover
    from tests.gateway_contract import Delivered, DriverFactory, Flavour, GatewayContract, GatewayDriver
    from tests.wecom_harness import wecom_settings

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class WorkproDriver:
    """The workpro gateway and the fake puppet's control API."""

    unknown_contact_id = "7881999999999999"

    def __init__(self, gateway: WorkproGateway, fake: FakePuppet) -> None:
        self.gateway: Gateway = gateway
        self.fake = fake

    async def scan(self) -> None:
        await self.fake.scan()

    def phone_code(self) -> str | None:
        return self.fake.phone_code()

    def sent_messages(self) -> list[Delivered]:
        return [Delivered(s.contact_id, s.text, s.message_id, s.kind, s.sha256, s.size, s.url) for s in self.fake.sends]

    def contact_ids(self) -> set[str]:
        return set(self.fake.contact_ids())

    def refuse_next(self, kind: PartKind, reason: str) -> None:
        self.fake.refuse_parts(kind, details=f"WorkproErrorCode: 23060, {reason}")

    async def confirm(self) -> None:
        """Direct sends have no tasks to confirm."""

    async def customer_writes(self, contact_id: str, text: str) -> None:
        self.fake.incoming_message(contact_id, text)

    async def customer_adds(self, name: str) -> str:
        return self.fake.add_contact(name)

    async def customer_removes(self, contact_id: str) -> None:
        self.fake.remove_contact(contact_id)


def workpro_settings(fake: FakePuppet, **overrides: object) -> WorkproSettings:
    """Settings pointing at the fake, with test-sized waits."""
    values: dict[str, object] = {
        "token": SecretStr(fake.token),
        "endpoint": fake.endpoint,
        "reconnect_delay": timedelta(seconds=0.05),
        "reconnect_max_delay": timedelta(seconds=0.2),
        "call_timeout": timedelta(seconds=5),
        "qr_wait": timedelta(seconds=3),
    }
    values.update(overrides)
    return WorkproSettings.model_validate(values)


@asynccontextmanager
async def workpro_driver() -> AsyncIterator[GatewayDriver]:
    fake = FakePuppet(contacts=60)
    await fake.start()
    gateway = WorkproGateway(workpro_settings(fake))
    try:
        await gateway.start()
        yield WorkproDriver(gateway, fake)
    finally:
        await gateway.close()
        await fake.stop()


class SandboxDriver:
    """The sandbox gateway and its test-only helpers."""

    unknown_contact_id = "7881999999999999"

    def __init__(self, gateway: SandboxGateway) -> None:
        self.gateway: Gateway = gateway
        self.sandbox = gateway

    async def scan(self) -> None:
        await self.sandbox.sandbox_scan()

    def phone_code(self) -> str | None:
        return self.sandbox.sandbox_phone_code()

    def sent_messages(self) -> list[Delivered]:
        return [delivered(m) for m in self.sandbox.outbox_messages()]

    def contact_ids(self) -> set[str]:
        return {c.id for c in self.sandbox._all_contacts()}

    def refuse_next(self, kind: PartKind, reason: str) -> None:
        self.sandbox.sandbox_refuse(kind, reason)

    async def confirm(self) -> None:
        self.sandbox.sandbox_confirm_tasks()

    async def customer_writes(self, contact_id: str, text: str) -> None:
        self.sandbox.sandbox_incoming_message(contact_id, text)

    async def customer_adds(self, name: str) -> str:
        return self.sandbox.sandbox_add_contact(name).id

    async def customer_removes(self, contact_id: str) -> None:
        self.sandbox.sandbox_remove_contact(contact_id)


def delivered(m: OutboxMessage) -> Delivered:
    """An outbox row as the contract's Delivered: media by content, cards by target."""
    kind = PartKind(m.kind)
    part = json.loads(m.part) if m.part else {}
    media = kind in (PartKind.IMAGE, PartKind.FILE)
    url = part.get("url") or (part.get("media") or {}).get("url") or ""
    return Delivered(
        m.contact_id,
        m.text,
        m.message_id,
        kind,
        m.content_hash if media else "",
        m.size if media else 0,
        str(url),
    )


def sandbox_driver_factory(tmp_path: Path, mode: str = "direct", supports: tuple[str, ...] = ()) -> DriverFactory:
    @asynccontextmanager
    async def make() -> AsyncIterator[GatewayDriver]:
        gateway = SandboxGateway(_sandbox_settings(tmp_path, mode, supports))
        try:
            await gateway.start()
            yield SandboxDriver(gateway)
        finally:
            await gateway.close()

    return make


class WecomDriver:
    """The wecom gateway and the fake WeCom server's far side (its staff and customers)."""

    unknown_contact_id = "wmUnknownCustomer000000000000000"

    def __init__(self, gateway: WecomGateway, fake: FakeWecom) -> None:
        self.gateway: Gateway = gateway
        self.wecom = gateway
        self.fake = fake

    def _deliver(self, fields: dict[str, str]) -> None:
        """WeCom POSTs the event's callback (encrypted and signed by the fake) to the gateway."""
        query, body = self.fake.callback(fields)
        self.wecom.receive_callback(query["msg_signature"], query["timestamp"], query["nonce"], body)

    async def customer_writes(self, contact_id: str, text: str) -> None:
        raise AssertionError("the official API does not deliver customers' messages (only 会话存档 does)")

    async def customer_adds(self, name: str) -> str:
        fields = self.fake.add_customer(self.fake.staff[0], name, welcome=False)
        self._deliver(fields)
        return fields["ExternalUserID"]

    async def customer_removes(self, contact_id: str) -> None:
        for follow in self.fake.follows_of(contact_id):
            self._deliver(self.fake.remove_follow(follow.userid, contact_id, by_customer=True))

    async def scan(self) -> None:
        raise AssertionError("the official API has no QR to scan")

    def phone_code(self) -> str | None:
        return None

    def sent_messages(self) -> list[Delivered]:
        """One Delivered per part: the text, then each attachment (media by the content the fake received)."""
        out: list[Delivered] = []
        for r in self.fake.received:
            if r.text:
                out.append(Delivered(r.contact_id, r.text, r.message_id))
            for kind, (sha256, size) in zip(r.attachments, r.attachment_media, strict=True):
                out.append(Delivered(r.contact_id, "", r.message_id, PartKind(kind), sha256, size))
        return out

    def contact_ids(self) -> set[str]:
        return {ext for (_, ext) in self.fake.follows}

    def refuse_next(self, kind: PartKind, reason: str) -> None:
        raise AssertionError("the wecom gateway sends no single parts to refuse")

    async def confirm(self) -> None:
        self.fake.confirm()


def wecom_driver_factory(tmp_path: Path) -> DriverFactory:
    @asynccontextmanager
    async def make() -> AsyncIterator[GatewayDriver]:
        fake = FakeWecom(customers=60, staff=3)
        server = FakeWecomServer(fake)
        url = await server.start()
        gateway = WecomGateway(wecom_settings(fake, url, tmp_path / "wecom.sqlite"))
        try:
            await gateway.start()
            await gateway.logout()  # every contract test starts logged out
            yield WecomDriver(gateway, fake)
        finally:
            await gateway.close()
            await server.stop()

    return make


def _sandbox_settings(folder: Path, mode: str, supports: tuple[str, ...] = ()) -> SandboxSettings:
    return SandboxSettings.model_validate(
        {
            **({"supports": list(supports)} if supports else {}),
            "contacts": 60,
            "auto_login": False,
            "scan_delay": timedelta(hours=1),
            "state_file": folder / "sandbox.sqlite",
            "mode": mode,
            "confirm_delay": timedelta(hours=1),  # batch mode: staff confirm when the test says so
        }
    )


def _sandbox_capabilities(mode: str, supports: tuple[str, ...] = ()) -> Capabilities:
    """What a sandbox of `mode` can do, as the configured one reports it (built, never started: no files)."""
    return SandboxGateway(_sandbox_settings(Path("unused"), mode, supports)).capabilities


FLAVOURS = (
    Flavour("workpro", WorkproGateway.capabilities, lambda _: workpro_driver),
    Flavour("sandbox", _sandbox_capabilities("direct"), sandbox_driver_factory),
    Flavour("sandbox-batch", _sandbox_capabilities("batch"), lambda folder: sandbox_driver_factory(folder, "batch")),
    # A sandbox that sends text and images only (sandbox.supports): every real gateway sends every part kind, so
    # this one is what proves that the parts a gateway lacks are refused.
    Flavour(
        "sandbox-text-image",
        _sandbox_capabilities("direct", ("text", "image")),
        lambda folder: sandbox_driver_factory(folder, "direct", ("text", "image")),
    ),
    # The official API does not deliver customers' messages (only 会话存档 does): no test can make one write.
    Flavour("wecom", WecomGateway.capabilities, wecom_driver_factory, customer_messages=False),
)


class TestGatewayContract(GatewayContract):
    FLAVOURS = FLAVOURS

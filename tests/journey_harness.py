"""A journey engine on the sandbox with a fake clock, for the journey tests: campaigns folder, Wecast app, engine and
runner in one object, and the few moves a test makes (events, time, outbox)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from helpers import write_settings

from engine.clock import FakeClock
from engine.definitions import load_definitions
from engine.gateways.base import EventKind
from engine.gateways.sandbox import SandboxGateway
from engine.journeys.runtime import JourneyEngine, JourneyRunner, TickReport
from engine.service import Wecast
from engine.settings import Settings
from storage import journeys as store
from storage.models import DeliveryStatus


@dataclass
class Harness:
    tmp: Path
    settings: Settings
    clock: FakeClock
    app: Wecast
    engine: JourneyEngine
    runner: JourneyRunner
    seen: set[str] = field(default_factory=set)

    @property
    def gateway(self) -> SandboxGateway:
        assert isinstance(self.app.gateway, SandboxGateway)
        return self.app.gateway

    @property
    def db(self) -> Any:
        return self.app.db

    def write(self, name: str, text: str) -> None:
        (self.tmp / "campaigns" / f"{name}.yaml").write_text(text, encoding="utf-8")

    def load(self) -> None:
        """(Re)load the campaigns folder's journeys into the engine; fails on any invalid file."""
        defs = load_definitions([self.tmp / "campaigns"], self.settings)
        assert not defs.errors, "\n".join(map(str, defs.errors))
        self.engine.set_journeys(defs.journeys)

    def contacts(self) -> list[str]:
        return store.contact_ids(self.db)

    def emit(self, kind: EventKind, contact_id: str, **data: Any) -> None:
        """The gateway reports a customer event (as its stream would)."""
        self.gateway.emit(kind, contact_id=contact_id, **data)

    async def run(self) -> TickReport:
        """Everything due now: ticks and dispatches until idle (the clock does not move)."""
        return await self.runner.until_idle()

    async def at(self, when: datetime) -> TickReport:
        """Move the clock to `when`, then run everything due."""
        self.clock.set(when)
        return await self.run()

    async def advance(self, **delta: float) -> TickReport:
        return await self.at(self.clock.now() + timedelta(**delta))

    def outbox(self, contact_id: str | None = None) -> list[str]:
        """Texts customers received, in the sandbox outbox (what they got, not our own log)."""
        return [m.text for m in self.gateway.outbox_messages(contact_id)]

    def counts(self) -> Counter[str]:
        return Counter(m.contact_id for m in self.gateway.outbox_messages())

    def path(self, contact_id: str) -> list[tuple[str, str]]:
        return [(p.step, p.outcome) for p in store.contact_path(self.db, contact_id)]

    def deliveries(self, contact_id: str) -> list[tuple[str, DeliveryStatus, str]]:
        from storage import deliveries as deliveries_db

        rows = deliveries_db.list_deliveries(self.db, contact_id=contact_id, limit=100)
        return sorted((r.dedupe_key or "", r.status, r.reason) for r in rows)


async def harness(
    tmp: Path, db_url: str, start: datetime, *, contacts: int = 30, extra: str = "", synced: bool = True
) -> Harness:
    """A started harness: sandbox logged in, contacts synced (unless not `synced`: a fresh install), the engine
    listening to the gateway."""
    (tmp / "campaigns").mkdir(exist_ok=True)
    settings = write_settings(tmp, db_url, contacts=contacts, extra=extra)
    clock = FakeClock(start)
    app = Wecast(settings, clock=clock)
    await app.start()
    if synced:
        await app.sync()
    engine = app.journeys  # listening to the gateway since app.start()
    runner = JourneyRunner(engine, lambda run_id: app.dispatcher.run(run_id, login_wait=0))
    return Harness(tmp, settings, clock, app, engine, runner)

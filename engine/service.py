"""The application: settings + database + gateway + clock, and the operations the CLI and the HTTP API
share (sync contacts, preview, run, resume, direct sends). Built explicitly and passed down; nothing
is created at import time."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from engine.clock import Clock, SystemClock
from engine.contacts import SyncResult, sync_contacts
from engine.dispatch import Dispatcher, Progress, RunSummary
from engine.gateways.base import Gateway
from engine.gateways.registry import build_gateway
from engine.plan import PlanResult, Preview, build_preview, plan_run
from engine.settings import Settings
from engine.spec import Campaign
from storage import queries
from storage.db import make_db_engine
from storage.models import Contact

log = logging.getLogger("wecast")


@dataclass
class RunOutcome:
    plan: PlanResult
    summary: RunSummary | None


class Wecast:
    """One wecast instance. Use `async with Wecast(settings) as app:` (starts and closes the gateway)."""

    def __init__(
        self,
        settings: Settings,
        *,
        gateway: Gateway | None = None,
        clock: Clock | None = None,
        db: Engine | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.db = db or make_db_engine(settings.database_url)
        self.gateway = gateway or build_gateway(settings, self.clock)
        self.dispatcher = Dispatcher(self.db, self.gateway, settings, clock=self.clock)
        self._started = False

    async def __aenter__(self) -> Wecast:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def start(self) -> None:
        if not self._started:
            await self.gateway.start()
            self._started = True

    async def close(self) -> None:
        if self._started:
            await self.gateway.close()
            self._started = False
        self.db.dispose()

    # -- contacts --------------------------------------------------------------------------------
    def contact_count(self) -> int:
        with self.db.connect() as conn:
            return int(
                conn.execute(select(func.count()).select_from(Contact).where(queries.C.removed_at.is_(None))).scalar()
                or 0
            )

    async def sync(self, progress: Any = None) -> SyncResult:
        return await sync_contacts(self.gateway, self.db, clock=self.clock, progress=progress)

    async def ensure_contacts(self) -> SyncResult | None:
        """Sync once if the database has no contacts yet (a fresh install)."""
        if self.contact_count() == 0:
            status = await self.gateway.login_status()
            if status.logged_in:
                return await self.sync()
        return None

    # -- campaigns -------------------------------------------------------------------------------
    def preview(self, campaign: Campaign, *, run_key: str | None = None) -> Preview:
        return build_preview(self.db, campaign, now=self.clock.now(), run_key=run_key)

    def plan(self, campaign: Campaign, *, run_key: str | None = None, trigger: str = "manual") -> PlanResult:
        return plan_run(self.db, campaign, self.settings, now=self.clock.now(), run_key=run_key, trigger=trigger)

    async def run_campaign(
        self,
        campaign: Campaign,
        *,
        run_key: str | None = None,
        trigger: str = "manual",
        progress: Progress | None = None,
        login_wait: float | None = None,
        quiet_wait_max: float | None = None,
        confirm_wait: float | None = None,
    ) -> RunOutcome:
        plan = self.plan(campaign, run_key=run_key, trigger=trigger)
        summary = await self.dispatcher.run(
            plan.run_id,
            progress=progress,
            login_wait=login_wait,
            quiet_wait_max=quiet_wait_max,
            confirm_wait=confirm_wait,
        )
        return RunOutcome(plan, summary)

    async def resume(
        self,
        run_id: int | None = None,
        *,
        progress: Progress | None = None,
        login_wait: float | None = None,
        quiet_wait_max: float | None = None,
        confirm_wait: float | None = None,
    ) -> list[RunSummary]:
        """Continue interrupted runs (all of them, or one)."""
        if run_id is not None:
            ids = [run_id]
        else:
            with self.db.connect() as conn:
                ids = [r["id"] for r in queries.unfinished_runs(conn)]
        return [
            await self.dispatcher.run(
                i, progress=progress, login_wait=login_wait, quiet_wait_max=quiet_wait_max, confirm_wait=confirm_wait
            )
            for i in ids
        ]

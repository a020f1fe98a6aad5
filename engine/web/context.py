"""`WebContext`: what the routers of `wecast serve` share, passed to them explicitly (no globals) — the Wecast
instance, the background workers, the scheduler (when there is one), the login state and the gateway event log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from prometheus_client import CollectorRegistry

from engine.blocking import off_loop
from engine.contacts import ListState
from engine.errors import CampaignError, NotFoundError, NotLoggedInError
from engine.gateways.base import EventKind, GatewayEvent, LoginState, LoginStatus
from engine.i18n import N_, process_language, tr, use_language
from engine.qr import qr_terminal
from engine.scheduler import CampaignScheduler
from engine.service import Wecast
from engine.spec import Campaign, load_campaigns
from engine.workers import Workers
from storage import events as events_db
from storage.events import EventRow

NOT_LOGGED_IN = N_(
    "the WeCom account is not logged in, so nothing was sent: call POST /goStart, scan the QR code and submit the "
    "verification code first"
)

log = logging.getLogger("wecast.web")

PAGE_READS = 2

P = ParamSpec("P")
T = TypeVar("T")

_LOGIN_AFTER = {
    EventKind.QR: LoginState.WAITING_SCAN,
    EventKind.SCANNED: LoginState.SCANNED,
    EventKind.VERIFY_CODE: LoginState.WAITING_VERIFY_CODE,
    EventKind.LOGIN: LoginState.LOGGED_IN,
    EventKind.LOGOUT: LoginState.LOGGED_OUT,
}


@dataclass
class WebContext:
    """What the routers need (see the module docstring)."""

    app: Wecast
    workers: Workers
    scheduler: CampaignScheduler | None
    send_wait: float
    shutdown_timeout: float
    login_state: LoginState = LoginState.LOGGED_OUT
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=False))
    _unsubscribe: Callable[[], None] | None = None
    _qr_printed: str | None = None
    _last_event_write: asyncio.Task[None] | None = None  # events are written one after another, in order
    # Contact pages are read PAGE_READS at a time: each is about a millisecond of Python in a worker thread, and
    # more at once only fight over the GIL (16 connections asking /get-all-user: p99 95 -> 44 ms on SQLite;
    # two, not one, so that PostgreSQL's round trips overlap).
    _page_reads: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(PAGE_READS))

    async def db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Database (or other blocking) work from an async route, off the event loop."""
        return await off_loop(fn, *args, **kwargs)

    async def read_page(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`db` for a page of contacts (the API's hot reads), PAGE_READS at a time."""
        async with self._page_reads:
            return await off_loop(fn, *args, **kwargs)

    # -- login -----------------------------------------------------------------------------------
    async def login_status(self) -> LoginStatus:
        status = await self.app.gateway.login_status()
        self.login_state = status.state
        return status

    async def ensure_contacts(self) -> None:
        """Contacts are served (and sends addressed) from the local copy: let a sync in progress finish, so no
        answer is read from a half-written list, and fill the copy if it is not whole (just logged in, or a sync
        was interrupted)."""
        if self.workers.syncing:
            await self.workers.wait_sync()
        if await self.db(self.app.contact_list) is not ListState.WHOLE:
            await self.require_login()
            await self.workers.sync(self.app)

    async def require_login(self) -> LoginStatus:
        status = await self.login_status()
        if not status.logged_in:
            raise NotLoggedInError(tr(NOT_LOGGED_IN))
        return status

    def print_qr(self, status: LoginStatus | GatewayEvent, *, again: bool = False) -> None:
        """Print a QR to the log as terminal text (each new one; `again` re-prints the current one)."""
        if isinstance(status, GatewayEvent):
            url, key = status.data.get("qr_url"), status.data.get("qrcode_key")
            second = bool(status.data.get("second_verification"))
        else:
            url, key, second = status.qr_url, status.qrcode_key, status.second_verification
        if not url or (key == self._qr_printed and not again):
            return
        self._qr_printed = key
        with use_language(process_language()):  # the log's reader, not the request's (often another language)
            what = (
                tr("WeCom security check (second verification): scan this QR code with WeCom on the phone")
                if second
                else tr("scan this QR code with WeCom on the phone to log in")
            )
            where = tr("qrcodeKey {key}; also at /api/v1/login/qr.png", key=key)
        log.info("%s (%s):\n%s%s", what, where, qr_terminal(url), url)

    # -- campaigns -------------------------------------------------------------------------------
    def campaigns(self) -> tuple[list[Campaign], list[CampaignError]]:
        """The campaigns the scheduler has loaded; without a scheduler, read from the folder (blocking:
        call it off the event loop)."""
        if self.scheduler is not None:
            return [e.campaign for e in self.scheduler.entries.values()], list(self.scheduler.errors)
        directory = self.app.settings.campaigns_dir
        if not directory.is_dir():
            return [], []
        result = load_campaigns([directory], self.app.settings)
        return result.campaigns, result.errors

    def campaign(self, campaign_id: str) -> Campaign:
        campaigns, errors = self.campaigns()
        for c in campaigns:
            if c.id == campaign_id:
                return c
        broken = [e for e in errors if e.location.file and campaign_id in e.location.file]
        if broken:
            raise broken[0]
        raise NotFoundError(
            tr("no campaign {id} in {folder}", id=repr(campaign_id), folder=self.app.settings.campaigns_dir)
        )

    # -- runs ------------------------------------------------------------------------------------
    def dispatch(self, run_id: int, campaign_id: str) -> asyncio.Task[Any]:
        """Send a planned run in the background (at most one task per run; campaigns never overlap)."""
        return self.workers.start(run_id, campaign_id, lambda: self.app.dispatcher.run(run_id, login_wait=None))

    # -- events ----------------------------------------------------------------------------------
    def on_event(self, event: GatewayEvent) -> None:
        """Gateway listener: keep the login state, print new QRs, and persist the event (off the loop)."""
        self.login_state = _LOGIN_AFTER.get(event.kind, self.login_state)
        if event.kind is EventKind.QR:
            self.print_qr(event)
        data = {k: v for k, v in event.data.items() if isinstance(v, str | int | float | bool | None)}
        row = EventRow(event.at, self.app.gateway.name, event.kind.value, event.message, data)
        self._last_event_write = asyncio.get_running_loop().create_task(self._record_event(row, self._last_event_write))

    async def _record_event(self, row: EventRow, after: asyncio.Task[None] | None) -> None:
        if after is not None:
            await asyncio.wait({after})
        try:
            await off_loop(events_db.insert_event, self.app.db, row)
        except Exception:  # the event log must never break the login flow
            log.exception("could not record gateway event %s", row.kind)

    # -- lifecycle -------------------------------------------------------------------------------
    async def startup(self) -> None:
        self._unsubscribe = self.app.gateway.subscribe(self.on_event)
        await self.app.start()
        status = await self.login_status()
        log.info("gateway %s: %s", self.app.gateway.name, status.message or status.state.value)
        if self.scheduler is not None:
            await self.scheduler.start()

    async def shutdown(self, *, close_app: bool) -> None:
        log.info("%s", tr("shutting down: stopping the scheduler, finishing in-flight sends"))
        if self.scheduler is not None:
            await self.scheduler.stop()
        self.app.dispatcher.stop()
        cancelled = await self.workers.drain(self.shutdown_timeout)
        if cancelled:
            log.info(
                "%s",
                tr(
                    "runs {runs} were waiting (login / quiet hours / throttle); their unsent deliveries stay "
                    "pending and resume on the next start",
                    runs=", ".join(map(str, cancelled)),
                ),
            )
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._last_event_write is not None:
            await asyncio.wait({self._last_event_write}, timeout=self.shutdown_timeout)
        if close_app:
            await self.app.close()
        log.info("%s", tr("stopped; every in-flight send is recorded"))

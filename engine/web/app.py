"""The FastAPI application of `wecast serve`: `create_app(app, scheduler=..., require_key=...)`.

Nothing is built at import time: the caller passes the `Wecast` instance (settings, database, gateway,
dispatcher) and, optionally, the scheduler; tests build as many independent apps as they like.

What lives here: the shared `WebContext` the routers close over, the error mapping (one boundary: every
`WecastError` becomes a clear JSON answer, bad bodies a 422 naming the field), bearer-key auth, the gateway
event log (persisted, and every new QR printed as a terminal QR, as the source document's service did),
Prometheus metrics, and the lifespan (start; on stop: the scheduler, `Dispatcher.stop()`, sends recorded).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from engine.errors import (
    CampaignError,
    ConfigError,
    GatewayError,
    LoginError,
    NotFoundError,
    NotLoggedInError,
    WecastError,
)
from engine.gateways.base import EventKind, GatewayEvent, LoginState, LoginStatus
from engine.scheduler import CampaignScheduler, Workers
from engine.service import Wecast
from engine.spec import Campaign, load_campaigns
from engine.web.qr import qr_terminal
from storage import queries
from storage.models import DELIVERIES, GATEWAY_EVENTS, QUEUED_STATUSES, RUNS, DeliveryStatus, RunStatus

log = logging.getLogger("wecast.web")


OPEN_PATHS = frozenset({"/healthz"})


def error_body(message: str, **extra: Any) -> dict[str, Any]:
    """The JSON of every error answer: `error` (one line, for people) plus machine-readable extras."""
    return {"error": message, **extra}


@dataclass
class WebContext:
    """What the routers need, passed to them explicitly (no globals)."""

    app: Wecast
    workers: Workers
    scheduler: CampaignScheduler | None
    send_wait: float
    shutdown_timeout: float
    login_state: LoginState = LoginState.LOGGED_OUT
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=False))
    _unsubscribe: Callable[[], None] | None = None
    _qr_printed: str | None = None

    # -- login -----------------------------------------------------------------------------------
    async def login_status(self) -> LoginStatus:
        status = await self.app.gateway.login_status()
        self.login_state = status.state
        return status

    async def require_login(self) -> LoginStatus:
        status = await self.login_status()
        if not status.logged_in:
            raise NotLoggedInError(
                "the WeCom account is not logged in, so nothing was sent: call POST /goStart, "
                "scan the QR and submit the verification code first"
            )
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
        what = (
            "WeCom security check (second verification): scan this QR with WeCom on the phone"
            if second
            else "scan this QR with WeCom on the phone to log in"
        )
        log.info("%s (qrcodeKey %s; also at /api/v1/login/qr.png):\n%s%s", what, key, qr_terminal(url), url)

    # -- campaigns -------------------------------------------------------------------------------
    def campaigns(self) -> tuple[list[Campaign], list[CampaignError]]:
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
        raise NotFoundError(f"no campaign {campaign_id!r} in {self.app.settings.campaigns_dir}")

    # -- runs ------------------------------------------------------------------------------------
    def dispatch(self, run_id: int, campaign_id: str) -> asyncio.Task[Any]:
        """Send a planned run in the background (at most one task per run; campaigns never overlap)."""
        return self.workers.start(run_id, campaign_id, lambda: self.app.dispatcher.run(run_id, login_wait=None))

    # -- events ----------------------------------------------------------------------------------
    def on_event(self, event: GatewayEvent) -> None:
        """Gateway listener: keep the login state, print new QRs, and persist the event."""
        transitions = {
            EventKind.QR: LoginState.WAITING_SCAN,
            EventKind.SCANNED: LoginState.SCANNED,
            EventKind.VERIFY_CODE: LoginState.WAITING_VERIFY_CODE,
            EventKind.LOGIN: LoginState.LOGGED_IN,
            EventKind.LOGOUT: LoginState.LOGGED_OUT,
        }
        self.login_state = transitions.get(event.kind, self.login_state)
        if event.kind is EventKind.QR:
            self.print_qr(event)
        data = {k: v for k, v in event.data.items() if isinstance(v, str | int | float | bool | None)}
        try:
            with self.app.db.begin() as conn:
                conn.execute(
                    GATEWAY_EVENTS.insert(),
                    [
                        {
                            "at": event.at,
                            "gateway": self.app.gateway.name,
                            "kind": event.kind.value,
                            "message": event.message,
                            "data": data,
                        }
                    ],
                )
        except Exception:  # the event log must never break the login flow
            log.exception("could not record gateway event %s", event.kind.value)

    # -- lifecycle -------------------------------------------------------------------------------
    async def startup(self) -> None:
        self._unsubscribe = self.app.gateway.subscribe(self.on_event)
        instrument_gateway(self)
        await self.app.start()
        status = await self.login_status()
        log.info("gateway %s: %s", self.app.gateway.name, status.message or status.state.value)
        if self.scheduler is not None:
            await self.scheduler.start()

    async def shutdown(self, *, close_app: bool) -> None:
        log.info("shutting down: stopping the scheduler, finishing in-flight sends")
        if self.scheduler is not None:
            await self.scheduler.stop()
        self.app.dispatcher.stop()
        cancelled = await self.workers.drain(self.shutdown_timeout)
        if cancelled:
            log.info(
                "runs %s were waiting (login / quiet hours / throttle); their unsent deliveries stay "
                "pending and resume on the next start",
                ", ".join(map(str, cancelled)),
            )
        if self._unsubscribe is not None:
            self._unsubscribe()
        if close_app:
            await self.app.close()
        log.info("stopped; every in-flight send is recorded")


# -- metrics -------------------------------------------------------------------------------------


class DatabaseCollector:
    """Gauges read from the database at scrape time, so they are right across restarts and processes."""

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[GaugeMetricFamily]:
        d, r = queries.D, queries.R
        with self.ctx.app.db.connect() as conn:
            by_status: dict[str, int] = dict(conn.execute(select(d.status, func.count()).group_by(d.status)).all())
            queue = conn.execute(
                select(func.count())
                .select_from(DELIVERIES)
                .join(RUNS, r.id == d.run_id)
                .where(r.status == RunStatus.RUNNING, d.status.in_(QUEUED_STATUSES))
            ).scalar()
            runs: dict[str, int] = dict(conn.execute(select(r.status, func.count()).group_by(r.status)).all())
        deliveries = GaugeMetricFamily("wecast_deliveries", "Deliveries by status (all runs)", labels=["status"])
        for status in DeliveryStatus:
            deliveries.add_metric([status], float(by_status.get(status, 0)))
        yield deliveries
        yield GaugeMetricFamily(
            "wecast_queue_depth", "Deliveries of running runs waiting to be sent", value=float(queue or 0)
        )
        run_family = GaugeMetricFamily("wecast_runs", "Runs by status", labels=["status"])
        for run_status in RunStatus:
            run_family.add_metric([run_status], float(runs.get(run_status, 0)))
        yield run_family
        login = GaugeMetricFamily("wecast_login_state", "1 for the current login state", labels=["state"])
        for state in LoginState:
            login.add_metric([state.value], 1.0 if self.ctx.login_state is state else 0.0)
        yield login
        yield GaugeMetricFamily(
            "wecast_logged_in",
            "1 when the WeCom account is logged in",
            value=1.0 if self.ctx.login_state is LoginState.LOGGED_IN else 0.0,
        )
        yield GaugeMetricFamily(
            "wecast_campaign_file_errors",
            "Campaign files that failed to load",
            value=float(len(self.ctx.scheduler.errors) if self.ctx.scheduler else 0),
        )
        yield GaugeMetricFamily(
            "wecast_dispatching_runs",
            "Runs being dispatched by this process",
            value=float(len(self.ctx.workers.running())),
        )


def instrument_gateway(ctx: WebContext) -> None:
    """Time the gateway calls that matter (sends, contact pages) into a latency histogram, and count
    sends by outcome. The bound methods are wrapped on the instance, because the dispatcher calls the
    gateway directly and the gateway classes are not ours to change."""
    gateway = ctx.app.gateway
    if getattr(gateway, "_wecast_instrumented", False):
        return
    latency = Histogram(
        "wecast_gateway_latency_seconds",
        "Gateway call latency",
        ["operation"],
        registry=ctx.registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    )
    sends = Counter(
        "wecast_gateway_sends", "Gateway sends by outcome (this process)", ["outcome"], registry=ctx.registry
    )

    def timed(name: str, method: Callable[..., Awaitable[Any]], count: bool) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            outcome = "sent"
            try:
                return await method(*args, **kwargs)
            except GatewayError as exc:
                outcome = exc.kind
                raise
            except BaseException:
                outcome = "error"
                raise
            finally:
                latency.labels(name).observe(time.perf_counter() - started)
                if count:
                    sends.labels(outcome).inc()

        return call

    setattr(gateway, "send_text", timed("send_text", gateway.send_text, True))  # noqa: B010 - see docstring
    setattr(gateway, "list_contacts", timed("list_contacts", gateway.list_contacts, False))  # noqa: B010
    setattr(gateway, "_wecast_instrumented", True)  # noqa: B010


# -- auth ----------------------------------------------------------------------------------------


class BearerAuth:
    """ASGI middleware: every path but /healthz needs `Authorization: Bearer <key>`, compared in constant
    time. The key is never logged or echoed."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self._key = key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        # compare_digest also runs for a wrong scheme, so timing does not tell which part was wrong.
        ok = hmac.compare_digest(token.strip(), self._key)
        if ok and scheme.lower() == b"bearer":
            await self.app(scope, receive, send)
            return
        body = json.dumps(error_body("missing or wrong API key: send the header 'Authorization: Bearer <key>'"))
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


# -- errors --------------------------------------------------------------------------------------


def _field_name(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or str(loc[0] if loc else "body")


def install_error_handlers(api: FastAPI) -> None:
    """Map errors to answers at one boundary."""

    @api.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors():
            loc = tuple(e.get("loc", ()))
            problems.append(
                {
                    "field": _field_name(loc),
                    "in": str(loc[0]) if loc else "body",
                    "message": str(e.get("msg", "invalid")),
                }
            )
        first = problems[0] if problems else {"field": "body", "message": "invalid request"}
        message = f"invalid request: {first['field']}: {first['message']}"
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more)"
        return JSONResponse(error_body(message, field=first["field"], problems=problems), status_code=422)

    @api.exception_handler(WecastError)
    async def wecast_error(_: Request, exc: WecastError) -> JSONResponse:
        extra: dict[str, Any] = {}
        if isinstance(exc, LoginError):
            extra["triesLeft"] = exc.tries_left
            code = 400 if exc.tries_left is not None else 409
        elif isinstance(exc, NotLoggedInError):
            code, extra["state"] = 409, "logged_out"
        elif isinstance(exc, NotFoundError):
            code = 404
        elif isinstance(exc, CampaignError):
            code = 422
            extra["problems"] = [problem_json(p) for p in exc.problems]
        elif isinstance(exc, GatewayError):
            code = 502
        else:
            code = 409
        return JSONResponse(error_body(str(exc), **extra), status_code=code)

    @api.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error handling a request")
        return JSONResponse(error_body(f"internal error ({type(exc).__name__}); see the server log"), status_code=500)


def problem_json(e: CampaignError) -> dict[str, Any]:
    return {
        "file": e.location.file,
        "line": e.location.line,
        "field": e.location.field,
        "message": e.reason,
        "text": str(e),
    }


# -- the app -------------------------------------------------------------------------------------


def create_app(
    app: Wecast,
    *,
    scheduler: CampaignScheduler | None = None,
    require_key: bool,
    workers: Workers | None = None,
    close_app: bool = True,
) -> FastAPI:
    """The HTTP service for `app`. With `require_key`, every endpoint but /healthz needs the API key
    (`settings.api.key`); asking for that without a key configured is a ConfigError. `close_app`: close
    the Wecast instance when the server stops."""
    settings = app.settings
    key = settings.api.key.get_secret_value() if settings.api.key is not None else None
    if require_key and not key:
        raise ConfigError("an API key is required (set WECAST_API_KEY or api.key in config.yaml)")
    ctx = WebContext(
        app=app,
        workers=workers or (scheduler.workers if scheduler else Workers()),
        scheduler=scheduler,
        send_wait=settings.api.send_wait.total_seconds(),
        shutdown_timeout=settings.api.shutdown_timeout.total_seconds(),
    )
    ctx.registry.register(DatabaseCollector(ctx))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ctx.startup()
        try:
            yield
        finally:
            await ctx.shutdown(close_app=close_app)

    from engine.web import api as api_routes
    from engine.web import legacy

    api = FastAPI(
        title="wecast",
        version="1",
        description=(
            "Reach WeChat customers through a WeCom account. The source document's endpoints "
            "(/goStart, /submit-verify-code, /get-all-user, /send-message, /send-message-all, /goEnd) "
            "and the REST API under /api/v1. Auth: `Authorization: Bearer <key>` on every endpoint "
            "but /healthz when the server is bound beyond loopback or a key is configured."
        ),
        lifespan=lifespan,
    )
    api.state.wecast = ctx
    install_error_handlers(api)
    api.include_router(legacy.router(ctx))
    api.include_router(api_routes.router(ctx))

    @api.get("/healthz", tags=["ops"], summary="Liveness (no auth)")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "gateway": app.gateway.name, "login": ctx.login_state.value}

    @api.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)

    if key:
        api.add_middleware(BearerAuth, key=key)
    return api

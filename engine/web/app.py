"""The FastAPI application of `wecast serve`: `create_app(app, scheduler=..., require_key=...)`.

Nothing is built at import time: the caller passes the `Wecast` instance (settings, database, gateway,
dispatcher) and, optionally, the scheduler; tests build as many independent apps as they like. The pieces live
beside this module: the shared context (`context`), the routers (`legacy`, `api`), request and response models
(`models`), the error boundary (`errors`), the guards and the key (`security`, `sessions`), `/metrics` (`metrics`)
and the web console at / (`console`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy.engine import Engine

from engine.blocking import off_loop
from engine.errors import ConfigError
from engine.i18n import tr
from engine.scheduler import CampaignScheduler
from engine.service import Wecast
from engine.web import api as api_routes
from engine.web import console, legacy, wecom_callback
from engine.web.attempts import FailedAttempts
from engine.web.context import WebContext
from engine.web.errors import install_error_handlers
from engine.web.language import SpeakLanguage
from engine.web.metrics import DatabaseCollector, instrument_gateway
from engine.web.security import CONSOLE, Authentication, BodyLimit, RequestGuard, no_nul_characters
from engine.web.sessions import SessionTokens
from engine.workers import Workers
from storage.db import file_gone, schema_version

# How long /healthz waits for the database to answer before it says it is unreachable (a black-holed server would
# otherwise hold the probe for the system's TCP timeout, minutes).
DB_CHECK_TIMEOUT = 2.0


class Health(BaseModel):
    status: str  # ok | error
    gateway: str
    login: str
    # What was checked and how it is: database ok | unreachable | gone; gateway: the login state (logged_out is
    # not "down": the server must stay reachable for the login itself).
    checks: dict[str, str] | None = None
    down: list[str] | None = None  # what is down (503): database
    error: str | None = None  # why not ok, for people (503)
    code: str | None = None  # why not ok, for scripts: database_gone | database_unreachable


class Liveness(BaseModel):
    status: str  # ok


class DatabaseCheck:
    """Whether the database answers a trivial read within `timeout` seconds. One probe at a time: a server that
    does not answer holds one worker thread, however many health requests come meanwhile."""

    def __init__(self, db: Engine, timeout: float = DB_CHECK_TIMEOUT) -> None:
        self.db = db
        self.timeout = timeout
        self._probe: asyncio.Future[int | None] | None = None

    async def answers(self) -> bool:
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(off_loop(schema_version, self.db))
            self._probe.add_done_callback(_retrieve)
        try:
            await asyncio.wait_for(asyncio.shield(self._probe), self.timeout)
        except Exception:  # any failure to read (refused, dropped, timed out, unreadable) is "not answering"
            return False
        return True


def _retrieve(probe: asyncio.Future[int | None]) -> None:
    """Take a probe's exception, so one nobody waited for any more is not reported as never retrieved."""
    if not probe.cancelled():
        probe.exception()


def create_app(
    app: Wecast,
    *,
    scheduler: CampaignScheduler | None = None,
    require_key: bool,
    workers: Workers | None = None,
    close_app: bool = True,
    loopback_only: bool = True,
    signin_attempts: FailedAttempts | None = None,
) -> FastAPI:
    """The HTTP service for `app`. With `require_key`, every endpoint but /healthz needs the API key
    (`settings.api.key`); asking for that without a key configured is a ConfigError. `close_app`: close
    the Wecast instance when the server stops. `loopback_only`: the server listens on loopback, so requests
    must name a loopback host (see `engine.web.security`). `signin_attempts`: the limit on wrong keys, at the console's
    sign-in and in the Authorization header (`engine.web.attempts`; 5 per 10 minutes from one address unless
    given)."""
    settings = app.settings
    key = settings.api.key.get_secret_value() if settings.api.key is not None else None
    if require_key and not key:
        raise ConfigError(tr("an API key is required (set WECAST_API_KEY or api.key in config.yaml)"))
    ctx = WebContext(
        app=app,
        workers=workers or (scheduler.workers if scheduler else Workers(sleep=app.clock.sleep)),
        scheduler=scheduler,
        send_wait=settings.api.send_wait.total_seconds(),
        shutdown_timeout=settings.api.shutdown_timeout.total_seconds(),
    )
    ctx.registry.register(
        DatabaseCollector(
            app.db,
            login_state=lambda: ctx.login_state,
            file_errors=lambda: len(scheduler.errors) if scheduler else 0,
            dispatching=lambda: len(ctx.workers.running()),
        )
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        instrument_gateway(app.gateway, ctx.registry)
        await ctx.startup()
        try:
            yield
        finally:
            await ctx.shutdown(close_app=close_app)

    # The docs pages load Swagger UI and ReDoc from files shipped in the fastapi-offline wheel, not from a CDN:
    # intranets and mainland-China deployments often cannot reach one (tests/test_web_docs.py).
    api = FastAPIOffline(
        title="wecast",
        version="1",
        description=(
            "Reach WeChat customers through a WeCom account. The source document's endpoints "
            "(/goStart, /submit-verify-code, /get-all-user, /send-message, /send-message-all, /goEnd) "
            "and the REST API under /api/v1. Auth: `Authorization: Bearer <key>` on every endpoint "
            "but /healthz when the server is bound beyond loopback or a key is configured. Request bodies are "
            "JSON (`Content-Type: application/json`); browsers may change things only from this server's own pages."
        ),
        lifespan=lifespan,
        dependencies=[Depends(no_nul_characters)],
        static_url="/docs-assets",
        favicon_url="/docs-assets/favicon.png",
    )
    api.state.wecast = ctx
    install_error_handlers(api)
    api.include_router(legacy.router(ctx))
    api.include_router(api_routes.router(ctx))
    api.include_router(wecom_callback.router(ctx))
    sessions = SessionTokens(key)
    attempts = signin_attempts or FailedAttempts()  # one limit on wrong keys: the console's form and Bearer
    api.include_router(console.router(ctx, sessions, attempts))
    api.mount(f"{CONSOLE}/static", StaticFiles(directory=console.STATIC_DIR), name="console-static")

    @api.get("/", include_in_schema=False)
    def home() -> Response:
        return RedirectResponse(f"{CONSOLE}/", status_code=303)

    database = DatabaseCheck(app.db)

    @api.get(
        "/livez",
        response_model=Liveness,
        tags=["ops"],
        summary="Liveness (no auth): the process answers; checks nothing else",
    )
    def livez() -> Liveness:
        return Liveness(status="ok")

    @api.get(
        "/healthz",
        response_model=Health,
        tags=["ops"],
        summary="Readiness (no auth): 503 when the database is unreachable, or its file was deleted or replaced",
        responses={503: {"model": Health, "description": "not ready: `down` says what, `code` and `error` why"}},
    )
    async def healthz() -> Response:
        login = ctx.login_state.value
        health = Health(status="ok", gateway=app.gateway.name, login=login, checks={"database": "ok", "gateway": login})
        gone = file_gone(app.db)
        if gone is not None:
            error = tr(
                "the database file {path} was deleted or replaced while wecast was running: nothing more is "
                "recorded or sent; restart wecast (restore the file from a backup first if it was not meant)",
                path=gone,
            )
            return _not_ready(health, "gone", error, "database_gone")
        if not await database.answers():
            error = tr(
                "the database does not answer (waited {seconds} s): nothing is recorded or sent until it is back; "
                "check that the server is running and that database_url is right",
                seconds=format(database.timeout, "g"),
            )
            return _not_ready(health, "unreachable", error, "database_unreachable")
        return JSONResponse(health.model_dump(exclude_none=True))

    @api.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)

    api.add_middleware(Authentication, sessions=sessions, attempts=attempts)
    # Added after the authentication, so it runs before: a forged Host or a cross-site request is refused first.
    api.add_middleware(RequestGuard, loopback_only=loopback_only)
    # Before the guards read anything: a body over the limit is refused however the request is otherwise.
    api.add_middleware(BodyLimit)
    # Outermost: every answer, the guards' refusals too, in the request's language.
    api.add_middleware(SpeakLanguage, config=settings.language)
    return api


def _not_ready(health: Health, database: str, error: str, code: str) -> JSONResponse:
    checks = {**(health.checks or {}), "database": database}
    body = health.model_copy(
        update={"status": "error", "checks": checks, "down": ["database"], "error": error, "code": code}
    )
    return JSONResponse(body.model_dump(), status_code=503)

"""The FastAPI application of `wecast serve`: `create_app(app, scheduler=..., require_key=...)`.

Nothing is built at import time: the caller passes the `Wecast` instance (settings, database, gateway,
dispatcher) and, optionally, the scheduler; tests build as many independent apps as they like. The pieces live
beside this module: the shared context (`context`), the routers (`legacy`, `api`), request and response models
(`models`), the error boundary (`errors`), the guards and the key (`security`, `sessions`), `/metrics` (`metrics`)
and the web console at / (`console`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

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
from storage.db import file_gone


class Health(BaseModel):
    status: str  # ok | error
    gateway: str
    login: str
    error: str | None = None  # why not ok, for people (503)
    code: str | None = None  # why not ok, for scripts: database_gone


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

    @api.get(
        "/healthz",
        response_model=Health,
        tags=["ops"],
        summary="Liveness (no auth): 503 when the database file was deleted or replaced under the server",
        responses={503: {"model": Health, "description": "not healthy: `error` says why"}},
    )
    async def healthz() -> Response:
        health = Health(status="ok", gateway=app.gateway.name, login=ctx.login_state.value)
        gone = file_gone(app.db)
        if gone is None:
            return JSONResponse(health.model_dump(exclude_none=True))
        error = tr(
            "the database file {path} was deleted or replaced while wecast was running: nothing more is recorded "
            "or sent; restart wecast (restore the file from a backup first if it was not meant)",
            path=gone,
        )
        body = health.model_copy(update={"status": "error", "error": error, "code": "database_gone"})
        return JSONResponse(body.model_dump(), status_code=503)

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

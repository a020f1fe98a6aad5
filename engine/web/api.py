"""The REST API under /api/v1 (OpenAPI at /openapi.json, browsable at /docs).

login       GET /login, POST /login/start | /login/verify-code | /login/logout,
            GET /login/qr.png | /login/qr.svg | /login/qr.txt, GET /events
contacts    GET /contacts (filter by tag and fields, paginate), GET /contacts/{id}, POST /contacts/sync,
            GET /tags
campaigns   GET /campaigns (invalid files listed, not dropped), POST /campaigns/reload,
            POST /campaigns/validate, GET /campaigns/{id}, GET /campaigns/{id}/preview,
            POST /campaigns/{id}/run
runs        GET /runs, GET /runs/{id}, POST /runs/{id}/pause | /resume | /cancel, GET /deliveries
scheduler   GET /scheduler
sandbox     POST /sandbox/scan, GET /sandbox/phone, GET /sandbox/outbox (sandbox gateway only)
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, or_, select
from starlette.concurrency import run_in_threadpool

from engine.errors import CampaignError, LoginError, NotFoundError, WecastError
from engine.gateways.base import LoginState
from engine.schedule import build_trigger, next_fire_times
from engine.spec import Campaign, parse_campaign
from engine.web import legacy
from engine.web.qr import qr_png, qr_svg, qr_terminal
from storage import queries
from storage.models import CONTACTS, GATEWAY_EVENTS, TAGS, RunStatus

if TYPE_CHECKING:
    from engine.web.app import WebContext

RunId = Annotated[int, PathParam(ge=1, le=2**62, description="run id")]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=10**9)]


class VerifyCode(legacy.VerifyCodeBody):
    pass


class ValidateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str = Field(max_length=200_000, description="the YAML text of one campaign file")
    filename: str = Field(
        default="campaign.yaml",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.ya?ml$",
        description="its file name (the id defaults to the name without .yaml)",
    )


def campaign_json(ctx: WebContext, c: Campaign) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": c.id,
        "name": c.name,
        "description": c.description,
        "enabled": c.enabled,
        "file": str(c.file),
        "timezone": c.timezone,
        "schedule": c.schedule.model_dump(mode="json") if c.schedule else None,
        "audience": c.audience.model_dump(mode="json"),
        "dedupe": c.dedupe,
        "frequency_cap": c.frequency_cap.model_dump() if c.frequency_cap else None,
        "quiet_hours": (
            {"start": c.quiet_hours.start.strftime("%H:%M"), "end": c.quiet_hours.end.strftime("%H:%M")}
            if c.quiet_hours
            else None
        ),
        "throttle": c.throttle.model_dump(),
        "content_hash": c.content_hash,
    }
    if ctx.scheduler is not None and c.id in ctx.scheduler.entries:
        out.update(ctx.scheduler.describe(c.id))
    elif c.schedule is not None and c.enabled:
        fires = next_fire_times(build_trigger(c.schedule, c.tz), ctx.app.clock.now(), 1)
        out["next_fire"] = fires[0] if fires else None
    return out


def run_json(ctx: WebContext, run: dict[str, Any]) -> dict[str, Any]:
    with ctx.app.db.connect() as conn:
        counts = queries.status_counts(conn, int(run["id"]))
    out = {k: v for k, v in run.items() if k not in ("owner", "settings")}
    out["counts"] = counts
    out["dispatching"] = ctx.workers.task(int(run["id"])) is not None
    out["settings"] = run.get("settings")
    return out


def router(ctx: WebContext) -> APIRouter:
    """The /api/v1 routes, bound to `ctx`."""
    r = APIRouter(prefix="/api/v1")
    app = ctx.app

    # -- login -----------------------------------------------------------------------------------
    @r.get("/login", tags=["login"], summary="Login state, the QR while one is showing, recent events")
    async def login() -> dict[str, Any]:
        status = await ctx.login_status()
        return {**legacy.login_json(status), "gateway": app.gateway.name, "events": _events(ctx, None, 10)}

    @r.post("/login/start", tags=["login"], summary="Start the login (same as POST /goStart)")
    async def login_start() -> dict[str, Any]:
        status = await app.gateway.start_login()
        ctx.login_state = status.state
        ctx.print_qr(status)
        return legacy.login_json(status)

    @r.post("/login/verify-code", tags=["login"], summary="Submit the phone's code (same as /submit-verify-code)")
    async def login_verify(body: VerifyCode) -> dict[str, Any]:
        status = await app.gateway.submit_verify_code(body.verifyCode, body.qrcodeKey)
        ctx.login_state = status.state
        return legacy.login_json(status)

    @r.post("/login/logout", tags=["login"], summary="Log out (same as POST /goEnd)")
    async def login_logout() -> dict[str, Any]:
        status = await app.gateway.logout()
        ctx.login_state = status.state
        return legacy.login_json(status)

    async def current_qr() -> str:
        status = await ctx.login_status()
        if not status.qr_url:
            raise NotFoundError(f"no QR code is showing (login state: {status.state.value}); POST /goStart to get one")
        return status.qr_url

    @r.get(
        "/login/qr.png",
        tags=["login"],
        summary="The current QR as PNG",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 404: {"description": "no QR showing"}},
    )
    async def login_qr_png() -> Response:
        return Response(qr_png(await current_qr()), media_type="image/png", headers={"Cache-Control": "no-store"})

    @r.get(
        "/login/qr.svg",
        tags=["login"],
        summary="The current QR as SVG",
        response_class=Response,
        responses={200: {"content": {"image/svg+xml": {}}}, 404: {"description": "no QR showing"}},
    )
    async def login_qr_svg() -> Response:
        return Response(qr_svg(await current_qr()), media_type="image/svg+xml", headers={"Cache-Control": "no-store"})

    @r.get(
        "/login/qr.txt",
        tags=["login"],
        summary="The current QR as terminal text",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}, 404: {"description": "no QR showing"}},
    )
    async def login_qr_txt() -> Response:
        url = await current_qr()
        return Response(
            qr_terminal(url) + url + "\n",
            media_type="text/plain; charset=utf-8",
            headers={"Cache-Control": "no-store"},
        )

    @r.get("/events", tags=["login"], summary="Gateway events: QR, scanned, verify code, login, logout (reason)")
    async def events(kind: Annotated[str | None, Query(max_length=40)] = None, limit: Limit = 50) -> dict[str, Any]:
        return {"events": _events(ctx, kind, limit)}

    # -- contacts --------------------------------------------------------------------------------
    @r.get("/contacts", tags=["contacts"], summary="Contacts, filtered by tags and fields, paginated")
    async def contacts(
        tag: Annotated[
            list[str] | None, Query(max_length=20, description="tag name or id; repeat: all must match")
        ] = None,
        any_tag: Annotated[list[str] | None, Query(max_length=20, description="contacts with any of these")] = None,
        city: Annotated[str | None, Query(max_length=100)] = None,
        province: Annotated[str | None, Query(max_length=100)] = None,
        gender: Annotated[int | None, Query(ge=0, le=2)] = None,
        friend: bool | None = None,
        coworker: bool | None = None,
        star: bool | None = None,
        q: Annotated[str | None, Query(max_length=100, description="text in name, alias or real name")] = None,
        limit: Limit = 50,
        offset: Offset = 0,
        cursor: Annotated[str | None, Query(max_length=200, description="nextCursor of the previous page")] = None,
    ) -> dict[str, Any]:
        c = queries.C
        where: list[Any] = [legacy.tag_filter([t]) for t in tag or []]
        if any_tag:
            where.append(legacy.tag_filter(any_tag))
        for col, value in (
            (c.city, city),
            (c.province, province),
            (c.gender, gender),
            (c.friend, friend),
            (c.coworker, coworker),
            (c.star, star),
        ):
            if value is not None:
                where.append(col == value)
        if q:
            pattern = f"%{q}%"
            where.append(or_(c.name.like(pattern), c.alias.like(pattern), c.real_name.like(pattern)))
        page = legacy.page_contacts(ctx, where=where, limit=limit, offset=offset, cursor=cursor)
        return {
            "items": page["datas"],
            "total": page["total"],
            "hasNextPage": page["hasNextPage"],
            "nextCursor": page["nextCursor"],
            "limit": limit,
            "offset": None if cursor else offset,
        }

    @r.get("/contacts/{contact_id}", tags=["contacts"], summary="One contact")
    async def contact(contact_id: Annotated[str, PathParam(max_length=200)]) -> dict[str, Any]:
        page = legacy.page_contacts(ctx, where=[queries.C.id == contact_id], limit=1)
        if not page["datas"]:
            raise NotFoundError(f"no contact {contact_id!r}")
        return dict(page["datas"][0])

    @r.post("/contacts/sync", tags=["contacts"], summary="Re-sync contacts from the gateway now")
    async def contacts_sync() -> dict[str, Any]:
        await ctx.require_login()
        result = await ctx.workers.sync(app)
        return {
            "seen": result.seen,
            "added": result.added,
            "updated": result.updated,
            "removed": result.removed,
            "tags": result.tags,
        }

    @r.get("/tags", tags=["contacts"], summary="Tags with how many contacts have each")
    async def tags() -> dict[str, Any]:
        t, ct, c = queries.T, queries.CT, queries.C
        with app.db.connect() as conn:
            counts: dict[str, int] = dict(
                conn.execute(
                    select(ct.tag_id, func.count())
                    .join(CONTACTS, c.id == ct.contact_id)
                    .where(c.removed_at.is_(None))
                    .group_by(ct.tag_id)
                ).all()
            )
            rows = conn.execute(select(TAGS).order_by(t.group_name, t.name)).all()
        return {
            "tags": [
                {
                    "id": row.id,
                    "name": row.name,
                    "group": row.group_name,
                    "type": row.type,
                    "contacts": int(counts.get(row.id, 0)),
                }
                for row in rows
            ]
        }

    # -- campaigns -------------------------------------------------------------------------------
    @r.get("/campaigns", tags=["campaigns"], summary="Campaigns, and the files that failed to load (with why)")
    async def campaigns() -> dict[str, Any]:
        found, errors = ctx.campaigns()
        from engine.web.app import problem_json

        return {
            "campaigns": [campaign_json(ctx, c) for c in found],
            "errors": [problem_json(p) for e in errors for p in e.problems],
        }

    @r.post("/campaigns/reload", tags=["campaigns"], summary="Re-read the campaign files now")
    async def campaigns_reload() -> dict[str, Any]:
        if ctx.scheduler is not None:
            ctx.scheduler.reload()
        return await campaigns()

    @r.post(
        "/campaigns/validate",
        tags=["campaigns"],
        summary="Validate a campaign's YAML text (or, without a body, every campaign file)",
    )
    async def campaigns_validate(body: Annotated[ValidateBody | None, Body()] = None) -> dict[str, Any]:
        from engine.web.app import problem_json

        if body is None:
            found, errors = await run_in_threadpool(ctx.campaigns if ctx.scheduler is None else lambda: _fresh(ctx))
            return {
                "valid": not errors,
                "campaigns": [c.id for c in found],
                "errors": [problem_json(p) for e in errors for p in e.problems],
            }
        try:
            # Parsing is bounded (engine.yamlsrc) but still CPU work: off the event loop. A template_file is
            # confined to the campaigns directory like any campaign file's (engine.paths).
            campaign = await run_in_threadpool(
                parse_campaign, body.content, app.settings.campaigns_dir / body.filename, app.settings
            )
        except CampaignError as exc:
            return {"valid": False, "errors": [problem_json(p) for p in exc.problems]}
        fires = (
            next_fire_times(build_trigger(campaign.schedule, campaign.tz), app.clock.now(), 5)
            if campaign.schedule
            else []
        )
        return {"valid": True, "id": campaign.id, "name": campaign.name, "next_fires": fires, "errors": []}

    @r.get("/campaigns/{campaign_id}", tags=["campaigns"], summary="One campaign, its schedule and recent fires")
    async def campaign(campaign_id: Annotated[str, PathParam(max_length=64)]) -> dict[str, Any]:
        c = ctx.campaign(campaign_id)
        with app.db.connect() as conn:
            runs = queries.runs(conn, campaign_id=c.id, limit=10)
        return {**campaign_json(ctx, c), "runs": [run_json(ctx, run) for run in runs]}

    @r.get(
        "/campaigns/{campaign_id}/preview",
        tags=["campaigns"],
        summary="Who would get what now (dry run; nothing is written)",
    )
    async def campaign_preview(
        campaign_id: Annotated[str, PathParam(max_length=64)],
        sample: Annotated[int, Query(ge=0, le=500)] = 20,
    ) -> dict[str, Any]:
        p = app.preview(ctx.campaign(campaign_id))
        return {
            "campaign": p.campaign.id,
            "run_key": p.run_key,
            "total_contacts": p.total_contacts,
            "recipients": len(p.recipients),
            "distinct_texts": p.distinct_texts,
            "sample": [{"contact_id": x.contact_id, "name": x.name, "text": x.text} for x in p.recipients[:sample]],
            "excluded": dict(p.excluded_by_category()),
            "excluded_sample": [
                {"contact_id": e.contact_id, "name": e.name, "category": e.category, "reason": e.reason}
                for e in p.excluded[:sample]
            ],
            "problems": [str(e) for e in p.problems()],
            "unknown_tags": p.unknown_tags,
            "unknown_ids": p.unknown_ids,
            "next_fires": p.next_fires,
            "existing_run": p.existing_run,
        }

    @r.post(
        "/campaigns/{campaign_id}/run",
        tags=["campaigns"],
        status_code=202,
        summary="Run now: the current schedule slot's run (the same run the scheduler would start)",
    )
    async def campaign_run(campaign_id: Annotated[str, PathParam(max_length=64)]) -> dict[str, Any]:
        c = ctx.campaign(campaign_id)
        plan = app.plan(c, trigger="manual")
        run = queries.get_run(app.db, plan.run_id)
        assert run is not None
        if run["status"] == RunStatus.RUNNING.value and ctx.workers.task(plan.run_id) is None:
            ctx.dispatch(plan.run_id, c.id)
        message = (
            "planned and sending"
            if plan.created
            else f"this slot's run already exists ({run['status']}); nothing is sent twice"
        )
        return {"message": message, "created": plan.created, "run": run_json(ctx, run)}

    # -- runs ------------------------------------------------------------------------------------
    @r.get("/runs", tags=["runs"], summary="Runs, newest first")
    async def runs(
        campaign: Annotated[str | None, Query(max_length=64)] = None,
        status: Literal["running", "paused", "completed", "cancelled"] | None = None,
        limit: Limit = 50,
    ) -> dict[str, Any]:
        with app.db.connect() as conn:
            rows = queries.runs(conn, campaign_id=campaign, status=status, limit=limit)
        return {"runs": [run_json(ctx, row) for row in rows]}

    @r.get("/runs/{run_id}", tags=["runs"], summary="One run with its delivery counts")
    async def run(run_id: RunId) -> dict[str, Any]:
        return run_json(ctx, _run(ctx, run_id))

    @r.post("/runs/{run_id}/pause", tags=["runs"], summary="Pause a running run (sends in flight finish)")
    async def run_pause(run_id: RunId) -> dict[str, Any]:
        app.pause_run(run_id, "paused through the API")
        await _settle(ctx, run_id)
        return run_json(ctx, _run(ctx, run_id))

    @r.post("/runs/{run_id}/resume", tags=["runs"], summary="Resume a paused (or interrupted) run")
    async def run_resume(run_id: RunId) -> dict[str, Any]:
        row = _run(ctx, run_id)
        if row["status"] == RunStatus.PAUSED.value:
            app.reopen_run(run_id)
        elif row["status"] != RunStatus.RUNNING.value:
            raise WecastError(f"run {run_id} is {row['status']}; only paused or running runs can be resumed")
        if ctx.workers.task(run_id) is None:
            ctx.dispatch(run_id, str(row["campaign_id"]))
        return run_json(ctx, _run(ctx, run_id))

    @r.post("/runs/{run_id}/cancel", tags=["runs"], summary="Cancel a run: unsent deliveries are skipped")
    async def run_cancel(run_id: RunId) -> dict[str, Any]:
        app.cancel_run(run_id, "cancelled through the API")
        await _settle(ctx, run_id)  # its dispatcher skips the rows it had claimed
        return run_json(ctx, _run(ctx, run_id))

    @r.get("/deliveries", tags=["runs"], summary="Deliveries, newest first, filtered")
    async def deliveries(
        run_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
        campaign: Annotated[str | None, Query(max_length=64)] = None,
        status: Literal["pending", "claimed", "sending", "submitted", "sent", "failed", "skipped", "unknown"]
        | None = None,
        contact_id: Annotated[str | None, Query(max_length=200)] = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        with app.db.connect() as conn:
            rows = queries.deliveries(
                conn,
                campaign_id=campaign,
                run_id=run_id,
                status=status,
                contact_id=contact_id,
                limit=limit,
                offset=offset,
            )
        return {"deliveries": [{k: v for k, v in row.items() if k != "claim_token"} for row in rows]}

    # -- scheduler -------------------------------------------------------------------------------
    @r.get("/scheduler", tags=["campaigns"], summary="What the scheduler is doing")
    async def scheduler() -> dict[str, Any]:
        s = ctx.scheduler
        from engine.web.app import problem_json

        base = {
            "dispatching": ctx.workers.running(),
            "contacts": {
                "last_sync_at": ctx.workers.last_sync_at,
                "syncing": ctx.workers.syncing,
                "last_error": ctx.workers.last_sync_error or None,
            },
        }
        if s is None:
            return {"enabled": False, **base}
        return {
            "enabled": True,
            **base,
            "catch_up": s.config.catch_up,
            "grace": s.config.grace.total_seconds(),
            "loaded_at": s.loaded_at,
            "campaigns": [{"id": cid, **s.describe(cid)} for cid in s.entries],
            "errors": [problem_json(p) for e in s.errors for p in e.problems],
            "recent_fires": [f.__dict__ for f in s.fires[-20:]],
        }

    # -- sandbox ---------------------------------------------------------------------------------
    def sandbox() -> Any:
        from engine.gateways.sandbox import SandboxGateway

        if not isinstance(app.gateway, SandboxGateway):
            raise NotFoundError("sandbox endpoints exist only with `gateway: sandbox`")
        return app.gateway

    @r.post("/sandbox/scan", tags=["sandbox"], summary="Sandbox: the simulated phone scans the QR that is showing")
    async def sandbox_scan() -> dict[str, Any]:
        gw = sandbox()
        status = await gw.login_status()
        if status.state is LoginState.WAITING_SCAN:
            status = await gw.sandbox_scan()
        elif status.state is LoginState.LOGGED_OUT:
            raise LoginError("no QR is showing: call POST /goStart first")
        ctx.login_state = status.state
        return {**legacy.login_json(status), "phoneCode": gw.sandbox_phone_code()}

    @r.get(
        "/sandbox/phone",
        tags=["sandbox"],
        summary="Sandbox: what the simulated phone shows (the 6-digit code)",
    )
    async def sandbox_phone() -> dict[str, Any]:
        gw = sandbox()
        status = await gw.login_status()
        code = gw.sandbox_phone_code()
        return {
            "verifyCode": code,
            "qrcodeKey": status.qrcode_key,
            "state": status.state.value,
            "message": f"手机企业微信显示验证码 {code}" if code else "the phone shows no code now",
        }

    @r.get("/sandbox/outbox", tags=["sandbox"], summary="Sandbox: messages the simulated customers received")
    async def sandbox_outbox(
        contact_id: Annotated[str | None, Query(max_length=200)] = None, limit: Limit = 50
    ) -> dict[str, Any]:
        messages = sandbox().outbox_messages(contact_id)
        return {"total": len(messages), "messages": [m.__dict__ for m in messages[-limit:]]}

    return r


def _events(ctx: WebContext, kind: str | None, limit: int) -> list[dict[str, Any]]:
    e = GATEWAY_EVENTS.c
    stmt = select(GATEWAY_EVENTS).order_by(e.id.desc()).limit(limit)
    if kind:
        stmt = stmt.where(e.kind == kind)
    with ctx.app.db.connect() as conn:
        return [{k: v for k, v in row._mapping.items() if k != "id"} for row in conn.execute(stmt)]


async def _settle(ctx: WebContext, run_id: int, wait: float = 5.0) -> None:
    """After a pause or cancel: let the run's dispatch task notice (sends in flight finish and are recorded).
    A task waiting for a login (or quiet hours) would only notice when that wait ends, so it is stopped:
    its `finally` drains and records what was in flight, and nothing else of it was going out."""
    task = ctx.workers.task(run_id)
    if task is None:
        return
    logged_in = (await ctx.login_status()).logged_in
    done, _ = await asyncio.wait({task}, timeout=wait if logged_in else 0)
    if not done:
        task.cancel()
        await asyncio.wait({task}, timeout=ctx.shutdown_timeout)


def _run(ctx: WebContext, run_id: int) -> dict[str, Any]:
    run = queries.get_run(ctx.app.db, run_id)
    if run is None:
        raise NotFoundError(f"no run {run_id}")
    return run


def _fresh(ctx: WebContext) -> tuple[list[Campaign], list[CampaignError]]:
    from engine.spec import load_campaigns

    directory = ctx.app.settings.campaigns_dir
    if not directory.is_dir():
        return [], [CampaignError(f"campaigns folder not found: {directory}")]
    result = load_campaigns([directory], ctx.app.settings)
    return result.campaigns, result.errors

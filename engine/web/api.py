"""The REST API under /api/v1 (OpenAPI at /openapi.json, browsable at /docs). Every route declares its response
model; routes that only read or write the database are plain functions (FastAPI runs them in its threadpool),
routes that talk to the gateway are async and run their database work off the event loop.

login       GET /login, POST /login/start | /login/verify-code | /login/logout,
            GET /login/qr.png | /login/qr.svg | /login/qr.txt, GET /events
contacts    GET /contacts (filter by tag and fields, paginate), GET /contacts/{id}, POST /contacts/sync,
            GET /tags
campaigns   GET /campaigns (invalid files listed, not dropped), POST /campaigns/reload,
            POST /campaigns/validate, GET /campaigns/{id}, GET /campaigns/{id}/preview,
            POST /campaigns/{id}/run
runs        GET /runs, GET /runs/{id}, POST /runs/{id}/pause | /resume | /cancel | /reconcile | /remind,
            GET /deliveries
media       POST /media: upload an image or file (the raw bytes as the body) to send as an attachment
scheduler   GET /scheduler
sandbox     POST /sandbox/scan, GET /sandbox/phone, GET /sandbox/outbox (sandbox gateway only)
journeys    GET /journeys, /journeys/{id}, /journeys/{id}/preview, /contacts/{id}/journeys, /optouts,
            GET|PUT|DELETE /contacts/{id}/optout, POST /sandbox/events: engine.web.journeys_api
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse

from engine.errors import CampaignError, LoginError, NotFoundError, NotLoggedInError, WecastError
from engine.gateways.base import LoginState
from engine.gateways.sandbox import SandboxGateway
from engine.i18n import tr
from engine.media import MediaError, MediaTooLarge, MediaTypeRefused, max_bytes
from engine.messages import PartKind
from engine.plan import plan_test_send
from engine.qr import qr_png, qr_svg, qr_terminal
from engine.schedule import build_trigger, next_fire_times
from engine.spec import Campaign, load_campaigns, parse_campaign
from engine.status_words import status_name
from engine.views import ContactView, DeliveryView, PreviewView, Problem, RunView, json_page
from engine.web import journeys_api
from engine.web.context import WebContext
from engine.web.errors import error_body
from engine.web.models import (
    CampaignDetail,
    CampaignsView,
    CampaignView,
    ContactsPageView,
    DeliveriesView,
    EventsView,
    EventView,
    LoginDetail,
    LoginView,
    MediaView,
    OutboxMessageView,
    OutboxView,
    RunNowView,
    RunsView,
    SandboxPhoneView,
    SandboxScanView,
    SchedulerCampaign,
    SchedulerView,
    SyncState,
    SyncView,
    TagsView,
    TagView,
    TasksView,
    TestSendBody,
    ValidateBody,
    ValidateView,
    VerifyCodeBody,
)
from storage import contacts as contacts_db
from storage import deliveries as deliveries_db
from storage import events as events_db
from storage import runs as runs_db
from storage.contacts import ContactFilter
from storage.models import MAX_ID, DeliveryStatus, RunStatus
from storage.runs import RunRow

RunId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="run id")]
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=10**9)]


def campaign_view(ctx: WebContext, c: Campaign) -> CampaignView:
    """A campaign as the API shows it, with what the scheduler knows of it (reads the database)."""
    values: dict[str, Any] = {
        "id": c.id,
        "name": c.name,
        "description": c.description,
        "enabled": c.enabled,
        "file": str(c.file),
        "timezone": c.timezone,
        "schedule": c.schedule.model_dump(mode="json") if c.schedule else None,
        "audience": c.audience.model_dump(mode="json"),
        "dedupe": c.dedupe,
        "frequency_cap": c.frequency_cap,
        "quiet_hours": c.quiet_hours,
        "throttle": c.throttle,
        "content_hash": c.content_hash,
    }
    if ctx.scheduler is not None and c.id in ctx.scheduler.entries:
        values.update(ctx.scheduler.describe(c.id))
    elif c.schedule is not None and c.enabled:
        fires = next_fire_times(build_trigger(c.schedule, c.tz), ctx.app.clock.now(), 1)
        values["next_fire"] = fires[0] if fires else None
    return CampaignView(**values)


def run_view(ctx: WebContext, run: RunRow) -> RunView:
    counts = deliveries_db.status_counts(ctx.app.db, run.id)
    return RunView.from_row(run, counts, dispatching=ctx.workers.task(run.id) is not None)


def run_by_id(ctx: WebContext, run_id: int) -> RunView:
    """One run with its delivery counts (NotFoundError when there is none); reads the database."""
    return run_view(ctx, _run(ctx, run_id))


def _run(ctx: WebContext, run_id: int) -> RunRow:
    run = runs_db.get_run(ctx.app.db, run_id)
    if run is None:
        raise NotFoundError(tr("no run {run}", run=run_id))
    return run


def _campaign_files(ctx: WebContext) -> tuple[list[Campaign], list[CampaignError]]:
    """Every campaign file, read now (not the scheduler's copy)."""
    directory = ctx.app.settings.campaigns_dir
    if not directory.is_dir():
        return [], [CampaignError(tr("campaigns folder not found: {folder}", folder=directory))]
    result = load_campaigns([directory], ctx.app.settings)
    return result.campaigns, result.errors


def _sandbox(ctx: WebContext) -> SandboxGateway:
    if not isinstance(ctx.app.gateway, SandboxGateway):
        raise NotFoundError(tr("sandbox endpoints exist only with `gateway: sandbox`"))
    return ctx.app.gateway


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


# -- operations the API routes and the console share -------------------------------------------------------


async def run_now(ctx: WebContext, campaign_id: str) -> RunNowView:
    """Plan the campaign's current slot and send it in the background (the same run the scheduler would start)."""
    c = await ctx.db(ctx.campaign, campaign_id)
    await ctx.workers.wait_sync()  # a sync this process runs (one starts at login): plan from the list it finishes
    plan = await ctx.db(ctx.app.plan, c, trigger="manual")
    run = await ctx.db(_run, ctx, plan.run_id)
    if run.status is RunStatus.RUNNING and ctx.workers.task(plan.run_id) is None:
        ctx.dispatch(plan.run_id, c.id)
    message = (
        "planned and sending"
        if plan.created
        else f"this slot's run already exists ({run.status}); nothing is sent twice"
    )
    return RunNowView(message=message, created=plan.created, run=await ctx.db(run_view, ctx, run))


async def test_send(ctx: WebContext, campaign_id: str, contact_ids: list[str]) -> RunNowView:
    """Send the campaign's exact message to the named contacts only, in a test run of its own (outside the
    campaign's dedupe and the frequency cap: `engine.plan.plan_test_send`), in the background. Refused at once
    while the account is logged out."""
    await ctx.require_login()
    c = await ctx.db(ctx.campaign, campaign_id)
    await ctx.workers.wait_sync()
    plan = await ctx.db(plan_test_send, ctx.app.db, c, contact_ids, now=ctx.app.clock.now())
    # Beside the campaign's real runs, never instead of them: a test does not wait for a run being sent.
    ctx.workers.start(
        plan.run_id,
        c.id,
        lambda: ctx.app.dispatcher.run(plan.run_id, login_wait=None, confirm_wait=0),
        exclusive=False,
    )
    run = await ctx.db(_run, ctx, plan.run_id)
    return RunNowView(
        message=f"test send of {c.id} to {len(contact_ids)} contacts",
        created=True,
        run=await ctx.db(run_view, ctx, run),
    )


async def pause_run(ctx: WebContext, run_id: int, why: str) -> RunView:
    """Pause a running run; sends in flight finish and are recorded."""
    await ctx.db(ctx.app.pause_run, run_id, why)
    await _settle(ctx, run_id)
    return await ctx.db(lambda: run_view(ctx, _run(ctx, run_id)))


async def resume_run(ctx: WebContext, run_id: int) -> RunView:
    """Resume a paused (or interrupted) run: send its pending deliveries in the background."""
    row = await ctx.db(_run, ctx, run_id)
    if row.status is RunStatus.PAUSED:
        await ctx.db(ctx.app.reopen_run, run_id)
    elif row.status is not RunStatus.RUNNING:
        raise WecastError(
            tr(
                "run {run} is {status}; only paused or running runs can be resumed",
                run=run_id,
                status=status_name(row.status),
            )
        )
    if ctx.workers.task(run_id) is None:
        ctx.dispatch(run_id, row.campaign_id)
    return await ctx.db(lambda: run_view(ctx, _run(ctx, run_id)))


async def cancel_run(ctx: WebContext, run_id: int, why: str) -> RunView:
    """Cancel a run: its unsent deliveries are skipped with the reason, and its 群发 tasks staff have not all
    confirmed are cancelled in WeCom (what had gone out stays sent; the rest fails as cancelled)."""
    await ctx.db(ctx.app.cancel_run, run_id, why)
    await _settle(ctx, run_id)  # its dispatcher skips the rows it had claimed
    if ctx.app.gateway.capabilities.batch_send:
        tasks = await ctx.db(ctx.app.task_ids, run_id)
        if tasks:
            await ctx.app.cancel_tasks(run_id)
    return await ctx.db(lambda: run_view(ctx, _run(ctx, run_id)))


async def reconcile_run(ctx: WebContext, run_id: int) -> TasksView:
    """Collect the results of a run's 群发 tasks now (the dispatcher also does, every 30 s while the run waits)."""
    found = (await ctx.app.reconcile(run_id))[run_id]
    problems = [f"{found.unreadable} task(s) could not be read this time"] if found.unreadable else []
    if (await ctx.db(_run, ctx, run_id)).status is not RunStatus.RUNNING:
        # Done: the run's dispatcher, idle until its next look at the tasks, has nothing left in flight.
        await _settle(ctx, run_id, wait=0)
    view = await ctx.db(lambda: run_view(ctx, _run(ctx, run_id)))
    return TasksView(
        tasks=found.tasks, sent=found.sent, failed=found.failed, waiting=found.waiting, problems=problems, run=view
    )


async def remind_run(ctx: WebContext, run_id: int) -> TasksView:
    """Remind the staff of a run's unconfirmed 群发 tasks (WeCom allows 3 reminders per task per 24 h)."""
    tasks = await ctx.db(ctx.app.task_ids, run_id)
    reminded, problems = await ctx.app.remind(run_id)
    view = await ctx.db(lambda: run_view(ctx, _run(ctx, run_id)))
    return TasksView(tasks=len(tasks), reminded=reminded, problems=problems, run=view)


def router(ctx: WebContext) -> APIRouter:
    """The /api/v1 routes, bound to `ctx`."""
    r = APIRouter(prefix="/api/v1")
    app = ctx.app

    def events(kind: str | None, limit: int) -> list[EventView]:
        return [EventView(**asdict(e)) for e in events_db.recent_events(app.db, kind=kind, limit=limit)]

    # -- login -----------------------------------------------------------------------------------
    @r.get("/login", response_model=LoginDetail, tags=["login"], summary="Login state, the QR, recent events")
    async def login() -> LoginDetail:
        status = await ctx.login_status()
        recent = await ctx.db(events, None, 10)
        return LoginDetail(**LoginView.from_status(status).model_dump(), gateway=app.gateway.name, events=recent)

    @r.post("/login/start", response_model=LoginView, tags=["login"], summary="Start the login (as POST /goStart)")
    async def login_start() -> LoginView:
        status = await app.gateway.start_login()
        ctx.login_state = status.state
        ctx.print_qr(status)
        return LoginView.from_status(status)

    @r.post(
        "/login/verify-code",
        response_model=LoginView,
        tags=["login"],
        summary="Submit the phone's code (as /submit-verify-code)",
    )
    async def login_verify(body: VerifyCodeBody) -> LoginView:
        status = await app.gateway.submit_verify_code(body.verifyCode, body.qrcodeKey)
        ctx.login_state = status.state
        return LoginView.from_status(status)

    @r.post("/login/logout", response_model=LoginView, tags=["login"], summary="Log out (as POST /goEnd)")
    async def login_logout() -> LoginView:
        status = await app.gateway.logout()
        ctx.login_state = status.state
        return LoginView.from_status(status)

    async def current_qr() -> str:
        status = await ctx.login_status()
        if not status.qr_url:
            raise NotFoundError(
                tr(
                    "no QR code is showing (login state: {state}); POST /goStart to get one",
                    state=status.state.value,
                )
            )
        return status.qr_url

    no_qr: dict[int | str, dict[str, Any]] = {404: {"description": "no QR showing"}}

    @r.get(
        "/login/qr.png",
        tags=["login"],
        summary="The current QR as PNG",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **no_qr},
    )
    async def login_qr_png() -> Response:
        png = await ctx.db(qr_png, await current_qr())
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @r.get(
        "/login/qr.svg",
        tags=["login"],
        summary="The current QR as SVG",
        response_class=Response,
        responses={200: {"content": {"image/svg+xml": {}}}, **no_qr},
    )
    async def login_qr_svg() -> Response:
        return Response(qr_svg(await current_qr()), media_type="image/svg+xml", headers={"Cache-Control": "no-store"})

    @r.get(
        "/login/qr.txt",
        tags=["login"],
        summary="The current QR as terminal text",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}, **no_qr},
    )
    async def login_qr_txt() -> Response:
        url = await current_qr()
        return Response(
            qr_terminal(url) + url + "\n", media_type="text/plain; charset=utf-8", headers={"Cache-Control": "no-store"}
        )

    @r.get(
        "/events",
        response_model=EventsView,
        tags=["login"],
        summary="Gateway events: QR, scanned, verify code, login, logout (reason)",
    )
    def events_route(kind: Annotated[str | None, Query(max_length=40)] = None, limit: Limit = 50) -> EventsView:
        return EventsView(events=events(kind, limit))

    # -- contacts --------------------------------------------------------------------------------
    @r.get("/contacts", response_model=ContactsPageView, tags=["contacts"], summary="Contacts, filtered, paginated")
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
    ) -> Response:
        where = ContactFilter(
            tags_all=tag or (),
            tags_any=any_tag or (),
            city=city,
            province=province,
            gender=gender,
            friend=friend,
            coworker=coworker,
            star=star,
            text=q,
        )
        ask = functools.partial(
            contacts_db.page_contacts_json, app.db, where, limit=limit, offset=offset, cursor=cursor
        )
        page = None if ctx.workers.syncing else await ctx.read_page(ask)
        if page is None or not (page.latest_sync and page.latest_sync.finished):
            # A sync in progress (just logged in), interrupted or never run: as /get-all-user, the list is read
            # once a sync has made it whole. Logged out, what is stored is listed as it is.
            with contextlib.suppress(NotLoggedInError):
                await ctx.ensure_contacts()
            page = await ctx.read_page(ask)
        # As ContactsPageView serializes it, its contacts as the database wrote them (a hot path).
        rest = {
            "total": page.total,
            "hasNextPage": page.has_next,
            "nextCursor": page.next_cursor,
            "limit": limit,
            "offset": None if cursor else offset,
        }
        return Response(json_page("items", page.items, rest), media_type="application/json")

    @r.get("/contacts/{contact_id}", response_model=ContactView, tags=["contacts"], summary="One contact")
    def contact(contact_id: Annotated[str, PathParam(max_length=200)]) -> ContactView:
        page = contacts_db.page_contacts(app.db, ContactFilter(ids=[contact_id]), limit=1)
        if not page.rows:
            raise NotFoundError(tr("no contact {id}", id=repr(contact_id)))
        return ContactView.from_row(page.rows[0])

    @r.post("/contacts/sync", response_model=SyncView, tags=["contacts"], summary="Re-sync contacts now")
    async def contacts_sync() -> SyncView:
        await ctx.require_login()
        result = await ctx.workers.sync(app)
        return SyncView(**asdict(result))

    @r.get("/tags", response_model=TagsView, tags=["contacts"], summary="Tags with how many contacts have each")
    def tags() -> TagsView:
        return TagsView(
            tags=[
                TagView(id=t.id, name=t.name, group=t.group_name, type=t.type, contacts=t.contacts)
                for t in contacts_db.tags_with_counts(app.db)
            ]
        )

    # -- campaigns -------------------------------------------------------------------------------
    @r.get(
        "/campaigns",
        response_model=CampaignsView,
        tags=["campaigns"],
        summary="Campaigns, and the files that failed to load (with why)",
    )
    def campaigns() -> CampaignsView:
        found, errors = ctx.campaigns()
        return CampaignsView(campaigns=[campaign_view(ctx, c) for c in found], errors=Problem.all_of(errors))

    @r.post(
        "/campaigns/reload", response_model=CampaignsView, tags=["campaigns"], summary="Re-read the campaign files now"
    )
    async def campaigns_reload() -> CampaignsView:
        if ctx.scheduler is not None:
            await ctx.scheduler.reload()
        return await ctx.db(campaigns)

    @r.post(
        "/campaigns/validate",
        response_model=ValidateView,
        tags=["campaigns"],
        summary="Validate a campaign's YAML text (or, without a body, every campaign file)",
    )
    def campaigns_validate(body: Annotated[ValidateBody | None, Body()] = None) -> ValidateView:
        if body is None:
            found, errors = _campaign_files(ctx)
            return ValidateView(valid=not errors, campaigns=[c.id for c in found], errors=Problem.all_of(errors))
        try:
            # A plain route, so parsing (bounded by engine.yamlsrc, still CPU work) runs off the event loop. A
            # template_file is confined to the campaigns directory like any campaign file's (engine.paths).
            campaign = parse_campaign(body.content, app.settings.campaigns_dir / body.filename, app.settings)
        except CampaignError as exc:
            return ValidateView(valid=False, errors=Problem.all_of([exc]))
        fires = (
            next_fire_times(build_trigger(campaign.schedule, campaign.tz), app.clock.now(), 5)
            if campaign.schedule
            else []
        )
        return ValidateView(valid=True, id=campaign.id, name=campaign.name, next_fires=fires, errors=[])

    @r.get(
        "/campaigns/{campaign_id}",
        response_model=CampaignDetail,
        tags=["campaigns"],
        summary="One campaign, its schedule and recent fires",
    )
    def campaign(campaign_id: Annotated[str, PathParam(max_length=64)]) -> CampaignDetail:
        c = ctx.campaign(campaign_id)
        runs = runs_db.list_runs(app.db, campaign_id=c.id, limit=10)
        return CampaignDetail(**campaign_view(ctx, c).model_dump(), runs=[run_view(ctx, run) for run in runs])

    @r.get(
        "/campaigns/{campaign_id}/preview",
        response_model=PreviewView,
        tags=["campaigns"],
        summary="Who would get what now (dry run; nothing is written); `sample` limits the lists",
    )
    def campaign_preview(
        campaign_id: Annotated[str, PathParam(max_length=64)],
        sample: Annotated[int, Query(ge=0, le=500)] = 20,
    ) -> PreviewView:
        return PreviewView.from_preview(app.preview(ctx.campaign(campaign_id), keep=sample), sample=sample)

    @r.post(
        "/campaigns/{campaign_id}/run",
        response_model=RunNowView,
        tags=["campaigns"],
        status_code=202,
        summary="Run now: the current schedule slot's run (the same run the scheduler would start)",
    )
    async def campaign_run(campaign_id: Annotated[str, PathParam(max_length=64)]) -> RunNowView:
        return await run_now(ctx, campaign_id)

    @r.post(
        "/campaigns/{campaign_id}/test-send",
        response_model=RunNowView,
        tags=["campaigns"],
        status_code=202,
        summary="Test-send: the campaign's exact message to the named contacts only, in a test run of its own",
    )
    async def campaign_test_send(
        campaign_id: Annotated[str, PathParam(max_length=64)], body: TestSendBody
    ) -> RunNowView:
        return await test_send(ctx, campaign_id, list(dict.fromkeys(body.contacts)))

    # -- runs ------------------------------------------------------------------------------------
    @r.get("/runs", response_model=RunsView, tags=["runs"], summary="Runs, newest first")
    def runs(
        campaign: Annotated[str | None, Query(max_length=64)] = None,
        status: RunStatus | None = None,
        limit: Limit = 50,
    ) -> RunsView:
        rows = runs_db.list_runs(app.db, campaign_id=campaign, status=status, limit=limit)
        return RunsView(runs=[run_view(ctx, row) for row in rows])

    @r.get("/runs/{run_id}", response_model=RunView, tags=["runs"], summary="One run with its delivery counts")
    def run(run_id: RunId) -> RunView:
        return run_view(ctx, _run(ctx, run_id))

    @r.post("/runs/{run_id}/pause", response_model=RunView, tags=["runs"], summary="Pause a running run")
    async def run_pause(run_id: RunId) -> RunView:
        return await pause_run(ctx, run_id, "paused through the API")

    @r.post(
        "/runs/{run_id}/resume", response_model=RunView, tags=["runs"], summary="Resume a paused (or interrupted) run"
    )
    async def run_resume(run_id: RunId) -> RunView:
        return await resume_run(ctx, run_id)

    @r.post("/runs/{run_id}/cancel", response_model=RunView, tags=["runs"], summary="Cancel a run (unsent: skipped)")
    async def run_cancel(run_id: RunId) -> RunView:
        return await cancel_run(ctx, run_id, "cancelled through the API")

    @r.post(
        "/runs/{run_id}/reconcile",
        response_model=TasksView,
        tags=["runs"],
        summary="Collect the results of the run's 群发 tasks (staff confirmations) now",
    )
    async def run_reconcile(run_id: RunId) -> TasksView:
        return await reconcile_run(ctx, run_id)

    @r.post(
        "/runs/{run_id}/remind",
        response_model=TasksView,
        tags=["runs"],
        summary="Remind staff to confirm the run's 群发 tasks (3 per task per 24 h)",
    )
    async def run_remind(run_id: RunId) -> TasksView:
        return await remind_run(ctx, run_id)

    @r.get("/deliveries", response_model=DeliveriesView, tags=["runs"], summary="Deliveries, newest first, filtered")
    def deliveries(
        run_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        campaign: Annotated[str | None, Query(max_length=64)] = None,
        status: DeliveryStatus | None = None,
        contact_id: Annotated[str | None, Query(max_length=200)] = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> DeliveriesView:
        rows = deliveries_db.list_deliveries(
            app.db,
            campaign_id=campaign,
            run_id=run_id,
            status=status,
            contact_id=contact_id,
            limit=limit,
            offset=offset,
        )
        parts = deliveries_db.list_parts(app.db, [d.id for d in rows if d.message is not None])
        return DeliveriesView(deliveries=[DeliveryView.from_row(d, parts.get(d.id, ())) for d in rows])

    # -- media -----------------------------------------------------------------------------------
    @r.post(
        "/media",
        response_model=MediaView,
        status_code=201,
        tags=["media"],
        summary="Upload an image (JPG/PNG, ≤ 10 MB) or a file (≤ 20 MB): the raw bytes as the body",
        responses={
            413: {"description": "over WeCom's size limit"},
            415: {"description": "not a JPG or PNG (by its content)"},
        },
    )
    async def media_upload(
        request: Request,
        kind: Annotated[Literal["image", "file"], Query(description="image (JPG/PNG) or file")] = "image",
        name: Annotated[str, Query(min_length=1, max_length=200, description="the file name to show")] = "upload",
    ) -> JSONResponse:
        part = PartKind(kind)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes(part):
            return JSONResponse(
                error_body(
                    tr(
                        "{name} is larger than {mb} MB, WeCom's limit",
                        name=repr(name),
                        mb=max_bytes(part) // (1024 * 1024),
                    ),
                    code="too_large",
                ),
                413,
            )
        try:
            stored = await app.media.save_stream(request.stream(), name, part)
        except MediaTooLarge as exc:
            return JSONResponse(error_body(str(exc), code="too_large"), 413)
        except MediaTypeRefused as exc:
            return JSONResponse(error_body(str(exc), code="unsupported_media_type"), 415)
        except MediaError as exc:
            return JSONResponse(error_body(str(exc), code="invalid_request", field="body"), 422)
        m = stored.media
        view = MediaView(id=stored.id, name=m.name, kind=kind, mime=m.mime, size=m.size, created=stored.created)
        return JSONResponse(view.model_dump(), status_code=201 if stored.created else 200)

    # -- scheduler -------------------------------------------------------------------------------
    @r.get("/scheduler", response_model=SchedulerView, tags=["campaigns"], summary="What the scheduler is doing")
    def scheduler() -> SchedulerView:
        s = ctx.scheduler
        base: dict[str, Any] = {
            "dispatching": ctx.workers.running(),
            "contacts": SyncState(
                last_sync_at=ctx.workers.last_sync_at,
                syncing=ctx.workers.syncing,
                last_error=ctx.workers.last_sync_error or None,
            ),
        }
        if s is None:
            return SchedulerView(enabled=False, **base)
        return SchedulerView(
            enabled=True,
            **base,
            catch_up=s.config.catch_up,
            grace=s.config.grace.total_seconds(),
            loaded_at=s.loaded_at,
            campaigns=[SchedulerCampaign(id=cid, **s.describe(cid)) for cid in list(s.entries)],
            errors=Problem.all_of(s.errors),
            recent_fires=[asdict(f) for f in s.fires[-20:]],
        )

    # -- sandbox ---------------------------------------------------------------------------------
    @r.post(
        "/sandbox/scan",
        response_model=SandboxScanView,
        tags=["sandbox"],
        summary="Sandbox: the simulated phone scans the QR that is showing",
    )
    async def sandbox_scan() -> SandboxScanView:
        gw = _sandbox(ctx)
        status = await gw.login_status()
        if status.state is LoginState.WAITING_SCAN:
            status = await gw.sandbox_scan()
        elif status.state is LoginState.LOGGED_OUT:
            raise LoginError(tr("no QR is showing: call POST /goStart first"))
        ctx.login_state = status.state
        return SandboxScanView(**LoginView.from_status(status).model_dump(), phoneCode=gw.sandbox_phone_code())

    @r.get(
        "/sandbox/phone",
        response_model=SandboxPhoneView,
        tags=["sandbox"],
        summary="Sandbox: what the simulated phone shows (the 6-digit code)",
    )
    async def sandbox_phone() -> SandboxPhoneView:
        gw = _sandbox(ctx)
        status = await gw.login_status()
        code = gw.sandbox_phone_code()
        return SandboxPhoneView(
            verifyCode=code,
            qrcodeKey=status.qrcode_key,
            state=status.state.value,
            message=tr("WeCom on the phone shows the verification code {code}", code=code)
            if code
            else tr("the phone shows no code now"),
        )

    @r.get(
        "/sandbox/outbox",
        response_model=OutboxView,
        tags=["sandbox"],
        summary="Sandbox: messages the simulated customers received",
    )
    def sandbox_outbox(
        contact_id: Annotated[str | None, Query(max_length=200)] = None, limit: Limit = 50
    ) -> OutboxView:
        messages = _sandbox(ctx).outbox_messages(contact_id)
        return OutboxView(total=len(messages), messages=[OutboxMessageView(**asdict(m)) for m in messages[-limit:]])

    r.include_router(journeys_api.router(ctx))
    return r

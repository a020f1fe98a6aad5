"""The console's pages and the changes they make, under /console (see the package docstring).

Pages that only read the database are plain functions (FastAPI runs them in its threadpool); those that talk to
the gateway are async and run their database work off the event loop, as the API's routes do. Every change is a
POST that htmx sends as JSON with the session's CSRF token (checked by `engine.web.security.Authentication`
before the route runs), and answers with the HTML fragment to swap in. Errors are the API's: the same message
and status (`engine.web.errors.answer_for`), drawn as a notice instead of JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Annotated, Any, TypeVar
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.audience import ExclusionCategory
from engine.errors import CampaignError, LoginError, NotFoundError, WecastError
from engine.gateways.base import LoginState, LoginStatus
from engine.gateways.sandbox import SandboxGateway
from engine.i18n import Language, use_language
from engine.messages import IMAGE_TYPES, ImagePart, LinkPart, Media, Message, MiniProgramPart, TextPart
from engine.views import DeliveryView, PreviewView, Problem, RunView
from engine.web import api
from engine.web.attempts import FailedAttempts
from engine.web.console.charts import bars, sends_over_time
from engine.web.console.journeys import JourneyCounts, tree
from engine.web.console.tasks import staff_tasks
from engine.web.console.templating import build_environment, language_of, translator
from engine.web.context import WebContext
from engine.web.errors import answer_for, describe_invalid
from engine.web.models import TasksView, TestSendBody, VerifyCodeBody
from engine.web.security import CONSOLE, SIGNIN
from engine.web.sessions import COOKIE, Session, SessionKind, SessionTokens, cookie_header
from storage import contacts as contacts_db
from storage import deliveries as deliveries_db
from storage import events as events_db
from storage import journeys as journeys_db
from storage import optouts as optouts_db
from storage import runs as runs_db
from storage.contacts import ContactFilter
from storage.events import EventRow
from storage.journeys import StepCount
from storage.models import MAX_ID, DeliveryStatus, RunStatus

log = logging.getLogger("wecast.web")

LANG_COOKIE = "wecast_lang"
PAGE_SIZE = 50
RECENT_EVENTS = 15  # on the account page
# The console's pages load nothing from elsewhere: scripts and styles are this package's files. Images may be
# https (a link card's thumbnail is the campaign's URL).
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data: https:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}
FAILED_STATUSES = (DeliveryStatus.FAILED, DeliveryStatus.UNKNOWN)
DONE_STATUSES = frozenset({DeliveryStatus.SENT, DeliveryStatus.FAILED, DeliveryStatus.SKIPPED, DeliveryStatus.UNKNOWN})


class SignInBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    key: str = Field(max_length=1000)
    next: str = Field(default="", max_length=2000)


class TestSendForm(BaseModel):
    model_config = ConfigDict(extra="ignore")
    contacts: str = Field(max_length=20_000, description="contact ids separated by commas or spaces")


BodyT = TypeVar("BodyT", bound=BaseModel)


class Console:
    """Renders the console's pages for one `WebContext` (see the module docstring)."""

    def __init__(self, ctx: WebContext, sessions: SessionTokens) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self.tz = ZoneInfo(ctx.app.settings.timezone)
        self.env = build_environment(self.tz)

    # -- rendering -------------------------------------------------------------------------------
    def language(self, request: Request) -> Language:
        return language_of(
            request.query_params.get("lang"),
            request.cookies.get(LANG_COOKIE),
            request.headers.get("accept-language"),
            self.ctx.app.settings.language,
        )

    def session(self, request: Request) -> tuple[Session, str | None]:
        """The request's session, or a new anonymous one (and its cookie value) to bind the CSRF token to."""
        found = self.sessions.read(request.cookies.get(COOKIE))
        if found is not None:
            return found, None
        value = self.sessions.issue(SessionKind.ANONYMOUS)
        fresh = self.sessions.read(value)
        assert fresh is not None  # just issued
        return fresh, value

    def render(
        self,
        request: Request,
        template: str,
        *,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        **values: Any,
    ) -> HTMLResponse:
        session, new_cookie = self.session(request)
        lang = self.language(request)
        gettext, ngettext = translator(lang)
        html = self.env.get_template(template).render(
            _=gettext,
            ngettext=ngettext,
            lang=lang.value,
            csrf=self.sessions.csrf_token(session),
            signed_in=session.signed_in,
            key_required=self.sessions.key_required,
            login_state=self.ctx.login_state.value,
            gateway=self.ctx.app.gateway.name,
            path=request.url.path,
            query=dict(request.query_params),
            **values,
        )
        response = HTMLResponse(html, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})
        secure = request.url.scheme == "https"
        if new_cookie is not None:
            response.headers.append("set-cookie", cookie_header(new_cookie, secure=secure))
        asked = request.query_params.get("lang")
        if asked:
            response.set_cookie(LANG_COOKIE, lang.value, max_age=365 * 86400, samesite="strict", secure=secure)
        return response

    def notice(self, request: Request, exc: WecastError) -> HTMLResponse:
        """An engine error as the API answers it (status and message), drawn as a notice: into the page's notice
        area for htmx, as a page of its own otherwise."""
        code, extra = answer_for(exc)
        problems = Problem.all_of([exc]) if isinstance(exc, CampaignError) else []
        return self._notice(request, code, str(exc), problems, extra)

    def invalid(self, request: Request, exc: ValidationError) -> HTMLResponse:
        message, _ = describe_invalid(exc.errors())
        return self._notice(request, 422, message, [], {})

    def _notice(
        self, request: Request, code: int, error: str, problems: list[Problem], extra: dict[str, Any]
    ) -> HTMLResponse:
        if "hx-request" in request.headers:
            headers = {"hx-retarget": "#notice", "hx-reswap": "innerHTML"}
            return self.render(
                request, "_notice.html", status=code, headers=headers, error=error, problems=problems, extra=extra
            )
        return self.render(request, "error.html", status=code, error=error, problems=problems, extra=extra)


async def json_body(request: Request, model: type[BodyT]) -> BodyT:
    """The request's JSON body as `model` (an empty body is an empty object)."""
    raw = await request.body()
    return model.model_validate_json(raw or b"{}")


def login_version(status: LoginStatus) -> str:
    """A short fingerprint of what the login panel shows: the panel is redrawn only when it changes."""
    seen = (status.state.value, status.qrcode_key, status.second_verification, status.tries_left, status.account_id)
    return hashlib.sha256(json.dumps(seen).encode()).hexdigest()[:16]


def events_version(events: list[EventRow]) -> str:
    """A short fingerprint of the recent events shown: the card is redrawn only when it changes."""
    seen = [(e.at.isoformat() if e.at else "", e.kind, e.message) for e in events]
    return hashlib.sha256(json.dumps(seen, ensure_ascii=False).encode()).hexdigest()[:16]


def progress_of(run: RunView) -> dict[str, Any]:
    """What a run's progress bar shows: done of total, and whether it is still moving."""
    total = sum(run.counts.values())
    done = sum(n for s, n in run.counts.items() if s in DONE_STATUSES)
    active = run.status is RunStatus.RUNNING or bool(run.dispatching)
    return {"total": total, "done": done, "active": active, "percent": round(100 * done / total) if total else 100}


class MediaIndex:
    """The local image files this server's previews have shown, by key: the console serves those and nothing
    else (a media URL names content a campaign sends, never a path the browser chose)."""

    def __init__(self) -> None:
        self._files: dict[str, Media] = {}

    def src(self, media: Media) -> str:
        """Where the browser fetches `media`: its https URL, or this server's copy of a local file."""
        if media.url:
            return media.url
        key = media.sha256 or hashlib.sha256(str(media.path).encode()).hexdigest()
        self._files[key] = media
        return f"{CONSOLE}/media/{key}"

    def get(self, key: str) -> Media | None:
        return self._files.get(key)


def human_size(size: int) -> str:
    if size <= 0:
        return ""
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} KB"
    return f"{size / 1024 / 1024:.1f} MB"


def message_parts(message: Message, media: MediaIndex) -> list[dict[str, Any]]:
    """A message's parts as the templates draw them (text bubble, image, link and mini-program cards, file)."""
    out: list[dict[str, Any]] = []
    for part in message.parts:
        if isinstance(part, TextPart):
            out.append({"kind": "text", "text": part.text})
        elif isinstance(part, ImagePart):
            out.append(
                {
                    "kind": "image",
                    "src": media.src(part.media),
                    "name": part.media.name,
                    "size": human_size(part.media.size),
                }
            )
        elif isinstance(part, LinkPart):
            out.append(
                {
                    "kind": "link",
                    "url": part.url,
                    "title": part.title,
                    "description": part.description,
                    "thumb": part.thumb_url,
                }
            )
        elif isinstance(part, MiniProgramPart):
            out.append(
                {
                    "kind": "miniprogram",
                    "appid": part.appid,
                    "title": part.title,
                    "page": part.page,
                    "thumb": media.src(part.thumb) if part.thumb else "",
                }
            )
        else:
            out.append({"kind": "file", "name": part.media.name, "size": human_size(part.media.size)})
    return out


def tasks_notice(action: str, done: TasksView, gettext: Callable[..., str], ngettext: Callable[..., str]) -> str:
    """What a reconcile or remind did, in words (the problems, WeCom's, follow as they are)."""
    if action == "remind":
        text = ngettext("%(num)d task reminded.", "%(num)d tasks reminded.", done.reminded)
    else:
        text = gettext(
            "Checked %(tasks)s tasks: %(sent)s sent, %(failed)s failed, %(waiting)s still awaiting confirmation.",
            tasks=done.tasks,
            sent=done.sent,
            failed=done.failed,
            waiting=done.waiting,
        )
    return " ".join([text, *done.problems])


# What stays as given in the page to go to after signing in; everything else is percent-encoded.
_NEXT_KEEPS = "/?&=%#+,;:@!$'()*~"


def _safe_next(target: str) -> str:
    """Where to go after signing in: a console page of this server, never another site. It becomes a header
    (hx-redirect), so it is percent-encoded: a line break, a NUL or a character beyond Latin-1 in the form's
    `next` would plant a header or drop the connection."""
    if target.startswith(CONSOLE + "/") and not target.startswith("//") and "\\" not in target:
        return quote(target, safe=_NEXT_KEEPS)
    return CONSOLE + "/"


def router(ctx: WebContext, sessions: SessionTokens, attempts: FailedAttempts | None = None) -> APIRouter:
    """The console's routes, bound to `ctx`. `attempts`: the limit on wrong keys at sign-in (5 per 10 minutes
    from one address unless given)."""
    ui = Console(ctx, sessions)
    limiter = attempts or FailedAttempts()

    async def speak(request: Request) -> AsyncIterator[None]:
        """The whole request in the page's language: the engine's own words (errors, reasons) too."""
        with use_language(ui.language(request)):
            yield

    r = APIRouter(prefix=CONSOLE, include_in_schema=False, dependencies=[Depends(speak)])
    app = ctx.app
    media = MediaIndex()

    def page(request: Request, template: str, **values: Any) -> HTMLResponse:
        return ui.render(request, template, **values)

    # -- entry and sign-in -------------------------------------------------------------------------
    @r.get("")
    @r.get("/")
    def home() -> Response:
        target = "/campaigns" if ctx.login_state is LoginState.LOGGED_IN else "/login"
        return RedirectResponse(CONSOLE + target, status_code=303)

    @r.get("/signin", response_class=HTMLResponse)
    def signin_page(request: Request, next: Annotated[str, Query(max_length=2000)] = "") -> HTMLResponse:
        return page(request, "signin.html", next=_safe_next(next), error=None)

    @r.post("/signin", response_class=HTMLResponse)
    async def signin(request: Request) -> Response:
        try:
            body = await json_body(request, SignInBody)
        except ValidationError as exc:
            return ui.invalid(request, exc)
        if not sessions.key_required:
            return Response(status_code=204, headers={"hx-redirect": _safe_next(body.next)})
        address = request.client.host if request.client else ""
        wait = limiter.retry_after(address)
        if wait is not None:  # refused before the key is looked at: a guess now tells nothing
            return signin_refused(request, body.next, wait)
        if not sessions.check_key(body.key):
            if limiter.failed(address) >= limiter.limit:
                log.warning(
                    "console sign-in: %d wrong API keys from %s within %d s; refusing it for %d s",
                    limiter.limit,
                    address,
                    limiter.window,
                    limiter.retry_after(address) or 0,
                )
            return ui.render(request, "_signin_form.html", status=401, next=_safe_next(body.next), error="wrong key")
        limiter.succeeded(address)
        response = Response(status_code=204, headers={"hx-redirect": _safe_next(body.next)})
        value = sessions.issue(SessionKind.KEY)
        response.headers.append("set-cookie", cookie_header(value, secure=request.url.scheme == "https"))
        return response

    def signin_refused(request: Request, next_page: str, wait: int) -> HTMLResponse:
        """429: too many wrong keys from this address; the form says for how long (in minutes), Retry-After in
        seconds."""
        return ui.render(
            request,
            "_signin_form.html",
            status=429,
            headers={"retry-after": str(wait)},
            next=_safe_next(next_page),
            error="too many",
            minutes=max(1, math.ceil(wait / 60)),
        )

    @r.post("/signout")
    def signout(request: Request) -> Response:
        session = sessions.read(request.cookies.get(COOKIE))
        if session is not None:
            sessions.revoke(session)
        response = Response(status_code=204, headers={"hx-redirect": SIGNIN})
        response.headers.append("set-cookie", cookie_header("", secure=request.url.scheme == "https", max_age=0))
        return response

    # -- the WeCom account -----------------------------------------------------------------------
    async def login_panel(
        request: Request, status: LoginStatus, *, code: int = 200, error: str | None = None
    ) -> Response:
        ctx.login_state = status.state
        return ui.render(
            request,
            "_login_panel.html",
            status=code,
            oob=True,
            login=status,
            version=login_version(status),
            error=error,
            sandbox=isinstance(app.gateway, SandboxGateway),
        )

    @r.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request) -> HTMLResponse:
        status = await ctx.login_status()
        recent = await ctx.db(events_db.recent_events, app.db, limit=RECENT_EVENTS)
        return page(
            request,
            "login.html",
            login=status,
            version=login_version(status),
            error=None,
            sandbox=isinstance(app.gateway, SandboxGateway),
            events=recent,
            events_version=events_version(recent),
        )

    @r.get("/events", response_class=HTMLResponse)
    def events_poll(request: Request, v: Annotated[str, Query(max_length=64)] = "") -> Response:
        """The recent events card, polled by the page: 204 while nothing new happened (htmx keeps what shows)."""
        recent = events_db.recent_events(app.db, limit=RECENT_EVENTS)
        version = events_version(recent)
        if v == version:
            return Response(status_code=204)
        return page(request, "_events.html", events=recent, events_version=version)

    @r.get("/login/panel", response_class=HTMLResponse)
    async def login_poll(request: Request, v: Annotated[str, Query(max_length=64)] = "") -> Response:
        status = await ctx.login_status()
        if v == login_version(status):
            return Response(status_code=204)  # unchanged: htmx keeps what is showing
        return await login_panel(request, status)

    @r.post("/login/start", response_class=HTMLResponse)
    async def login_start(request: Request) -> Response:
        try:
            status = await app.gateway.start_login()
        except WecastError as exc:
            return ui.notice(request, exc)
        ctx.print_qr(status)
        return await login_panel(request, status)

    @r.post("/login/verify", response_class=HTMLResponse)
    async def login_verify(request: Request) -> Response:
        current = await ctx.login_status()
        try:
            body = await json_body(request, VerifyCodeBody)
            status = await app.gateway.submit_verify_code(body.verifyCode, current.qrcode_key)
        except ValidationError as exc:
            message, _ = describe_invalid(exc.errors())
            return await login_panel(request, await ctx.login_status(), code=422, error=message)
        except LoginError as exc:
            code, _ = answer_for(exc)
            return await login_panel(request, await ctx.login_status(), code=code, error=str(exc))
        return await login_panel(request, status)

    @r.post("/login/logout", response_class=HTMLResponse)
    async def login_logout(request: Request) -> Response:
        return await login_panel(request, await app.gateway.logout())

    @r.post("/login/switch", response_class=HTMLResponse)
    async def login_switch(request: Request) -> Response:
        """Log out and show the QR for the next account at once."""
        await app.gateway.logout()
        status = await app.gateway.start_login()
        ctx.print_qr(status)
        return await login_panel(request, status)

    @r.post("/login/sandbox-scan", response_class=HTMLResponse)
    async def login_sandbox_scan(request: Request) -> Response:
        gw = app.gateway
        if not isinstance(gw, SandboxGateway):
            return ui.notice(request, NotFoundError("only the sandbox has a simulated phone"))
        try:
            status = await gw.sandbox_scan()
        except WecastError as exc:
            return ui.notice(request, exc)
        return await login_panel(request, status)

    # -- customers -------------------------------------------------------------------------------
    @r.get("/customers", response_class=HTMLResponse)
    def customers(
        request: Request,
        q: Annotated[str, Query(max_length=100)] = "",
        tag: Annotated[list[str] | None, Query(max_length=10)] = None,
        city: Annotated[str, Query(max_length=100)] = "",
        province: Annotated[str, Query(max_length=100)] = "",
        gender: Annotated[str, Query(pattern=r"^[012]?$")] = "",
        cursor: Annotated[str, Query(max_length=200)] = "",
    ) -> HTMLResponse:
        tags = [t for t in (tag or []) if t]
        where = ContactFilter(
            tags_all=tags,
            city=city or None,
            province=province or None,
            gender=int(gender) if gender else None,
            text=q.strip() or None,
        )
        found = contacts_db.page_contacts(app.db, where, limit=PAGE_SIZE, cursor=cursor or None)
        filters = {"q": q, "tag": tags, "city": city, "province": province, "gender": gender}
        base = {k: v for k, v in filters.items() if v}
        next_url = f"?{urlencode({**base, 'cursor': found.next_cursor}, doseq=True)}" if found.next_cursor else None
        return page(
            request,
            "customers.html",
            rows=found.rows,
            total=found.total,
            filters=filters,
            # Names only: counting every tag's contacts scans the whole contact list (600 ms at 100,000).
            all_tags=contacts_db.tag_names(app.db),
            next_url=next_url,
            first_url=f"?{urlencode(base, doseq=True)}" if cursor else None,
        )

    @r.get("/customers/{contact_id}", response_class=HTMLResponse)
    def customer(request: Request, contact_id: Annotated[str, PathParam(max_length=200)]) -> HTMLResponse:
        found = contacts_db.page_contacts(app.db, ContactFilter(ids=[contact_id]), limit=1)
        if not found.rows:
            return ui.notice(request, NotFoundError(f"no contact {contact_id!r}"))
        history = deliveries_db.list_deliveries(app.db, contact_id=contact_id, limit=PAGE_SIZE)
        path = journeys_db.contact_path(app.db, contact_id)
        return page(
            request,
            "customer.html",
            contact=found.rows[0],
            deliveries=[DeliveryView.from_row(d) for d in history],
            opted_out=contact_id in optouts_db.opted_out(app.db, [contact_id]),
            enrolments=[
                (e, [p for p in path if p.enrolment_id == e.id])
                for e in journeys_db.enrolments(app.db, contact_id=contact_id, limit=PAGE_SIZE)
            ],
        )

    # -- campaigns -------------------------------------------------------------------------------
    @r.get("/campaigns", response_class=HTMLResponse)
    def campaigns(request: Request) -> HTMLResponse:
        found, errors = ctx.campaigns()
        items = []
        for c in sorted(found, key=lambda c: c.id):
            last = runs_db.list_runs(app.db, campaign_id=c.id, limit=1)
            items.append({"view": api.campaign_view(ctx, c), "last": api.run_view(ctx, last[0]) if last else None})
        return page(request, "campaigns.html", items=items, problems=Problem.all_of(errors))

    @r.get("/campaigns/{campaign_id}", response_class=HTMLResponse)
    def campaign(request: Request, campaign_id: Annotated[str, PathParam(max_length=64)]) -> HTMLResponse:
        try:
            c = ctx.campaign(campaign_id)
        except WecastError as exc:
            return ui.render(
                request,
                "campaign_broken.html",
                status=answer_for(exc)[0],
                campaign_id=campaign_id,
                error=str(exc),
                extra=answer_for(exc)[1],
                problems=Problem.all_of([exc]) if isinstance(exc, CampaignError) else [],
            )
        runs = [api.run_view(ctx, run) for run in runs_db.list_runs(app.db, campaign_id=c.id, limit=10)]
        return page(
            request,
            "campaign.html",
            c=api.campaign_view(ctx, c),
            yaml=c.file.read_text(encoding="utf-8", errors="replace") if c.file.is_file() else "",
            runs=runs,
        )

    @r.get("/campaigns/{campaign_id}/preview", response_class=HTMLResponse)
    def campaign_preview(
        request: Request,
        campaign_id: Annotated[str, PathParam(max_length=64)],
        show: Annotated[int, Query(ge=1, le=200)] = 20,
    ) -> HTMLResponse:
        try:
            preview = app.preview(ctx.campaign(campaign_id), keep=show)
        except WecastError as exc:
            return ui.notice(request, exc)
        view = PreviewView.from_preview(preview, sample=show)
        # Those the targeting never selected are counted, not listed: the list shows who was held back and why.
        held_back = [e for e in preview.excluded if e.category is not ExclusionCategory.AUDIENCE][:show]
        recipients = [
            {"id": r.contact_id, "name": r.name, "parts": message_parts(r.full_message(), media)}
            for r in preview.recipients[:show]
        ]
        return page(request, "_preview.html", p=view, recipients=recipients, held_back=held_back, show=show)

    @r.get("/media/{key}")
    def media_file(key: Annotated[str, PathParam(pattern=r"^[0-9a-f]{64}$")]) -> Response:
        found = media.get(key)
        if found is None or found.path is None or not found.path.is_file():
            raise NotFoundError("no such image in a preview of this server")
        mime = found.mime if found.mime in IMAGE_TYPES else "application/octet-stream"
        return FileResponse(found.path, media_type=mime, headers={"cache-control": "private, max-age=3600"})

    @r.post("/campaigns/{campaign_id}/run", response_class=HTMLResponse)
    async def campaign_run(request: Request, campaign_id: Annotated[str, PathParam(max_length=64)]) -> Response:
        try:
            started = await api.run_now(ctx, campaign_id)
        except WecastError as exc:
            return ui.notice(request, exc)
        return Response(status_code=204, headers={"hx-redirect": f"{CONSOLE}/runs/{started.run.id}"})

    @r.post("/campaigns/{campaign_id}/test-send", response_class=HTMLResponse)
    async def campaign_test_send(request: Request, campaign_id: Annotated[str, PathParam(max_length=64)]) -> Response:
        try:
            body = await json_body(request, TestSendForm)
            ids = list(dict.fromkeys(i for i in re.split(r"[\s,，、]+", body.contacts) if i))
            TestSendBody(contacts=ids)  # the API's limits: 1 to 50 ids
            started = await api.test_send(ctx, campaign_id, ids)
        except ValidationError as exc:
            return ui.invalid(request, exc)
        except WecastError as exc:
            return ui.notice(request, exc)
        return Response(status_code=204, headers={"hx-redirect": f"{CONSOLE}/runs/{started.run.id}"})

    # -- runs ------------------------------------------------------------------------------------
    def run_page_values(run_id: int) -> dict[str, Any]:
        run = api.run_by_id(ctx, run_id)
        times = deliveries_db.send_times(app.db, run_id, [DeliveryStatus.SENT, DeliveryStatus.SUBMITTED])
        reasons = deliveries_db.reason_counts(
            app.db, run_id, [DeliveryStatus.FAILED, DeliveryStatus.UNKNOWN, DeliveryStatus.SKIPPED]
        )
        failures = [(x.reason or x.status.value, x.count) for x in reasons if x.status in FAILED_STATUSES]
        skips = [(x.reason or x.status.value, x.count) for x in reasons if x.status is DeliveryStatus.SKIPPED]
        tasks = staff_tasks(app.db, run_id) if app.gateway.capabilities.batch_send else []
        return {
            "run": run,
            "progress": progress_of(run),
            "times": times,
            "failures": failures,
            "skips": skips,
            "tasks": tasks,
            "tasks_waiting": sum(t.waiting for t in tasks),
            "tasks_notice": "",
        }

    def run_charts(values: dict[str, Any], gettext: Callable[..., str]) -> dict[str, Any]:
        times = values["times"]
        return {
            "chart_sends": sends_over_time(
                times.start, times.width, times.counts, ui.tz, label=gettext("Sends over time")
            ),
            "chart_failures": bars(values["failures"], label=gettext("Failures by reason")),
            "chart_skips": bars(values["skips"], label=gettext("Skipped by reason"), kind="skip"),
        }

    @r.get("/runs", response_class=HTMLResponse)
    def runs(
        request: Request,
        campaign: Annotated[str, Query(max_length=64)] = "",
        status: Annotated[str, Query(max_length=20)] = "",
    ) -> HTMLResponse:
        wanted = RunStatus(status) if status in set(RunStatus) else None
        rows = runs_db.list_runs(app.db, campaign_id=campaign or None, status=wanted, limit=PAGE_SIZE)
        return page(
            request,
            "runs.html",
            runs=[api.run_view(ctx, row) for row in rows],
            filters={"campaign": campaign, "status": status},
            run_statuses=list(RunStatus),
        )

    @r.get("/runs/{run_id}", response_class=HTMLResponse)
    def run(request: Request, run_id: Annotated[int, PathParam(ge=1, le=MAX_ID)]) -> HTMLResponse:
        try:
            values = run_page_values(run_id)
        except WecastError as exc:
            return ui.notice(request, exc)
        gettext, _ = translator(ui.language(request))
        return page(request, "run.html", **values, **run_charts(values, gettext))

    @r.get("/runs/{run_id}/progress", response_class=HTMLResponse)
    def run_progress(request: Request, run_id: Annotated[int, PathParam(ge=1, le=MAX_ID)]) -> HTMLResponse:
        try:
            values = run_page_values(run_id)
        except WecastError as exc:
            return ui.notice(request, exc)
        gettext, _ = translator(ui.language(request))
        return page(request, "_run_live.html", **values, **run_charts(values, gettext))

    def run_action(name: str, act: Callable[[WebContext, int], Any]) -> None:
        async def route(request: Request, run_id: Annotated[int, PathParam(ge=1, le=MAX_ID)]) -> Response:
            try:
                done = await act(ctx, run_id)
                values = await ctx.db(run_page_values, run_id)
            except WecastError as exc:
                return ui.notice(request, exc)
            gettext, ngettext = translator(ui.language(request))
            if isinstance(done, TasksView):
                values["tasks_notice"] = tasks_notice(name, done, gettext, ngettext)
            return ui.render(request, "_run_live.html", **values, **run_charts(values, gettext))

        r.add_api_route(f"/runs/{{run_id}}/{name}", route, methods=["POST"], response_class=HTMLResponse)

    run_action("pause", lambda c, i: api.pause_run(c, i, "paused in the console"))
    run_action("resume", api.resume_run)
    run_action("cancel", lambda c, i: api.cancel_run(c, i, "cancelled in the console"))
    # 群发 tasks (task-based gateways): collect the staff's confirmations now, remind those who have not confirmed.
    run_action("reconcile", api.reconcile_run)
    run_action("remind", api.remind_run)

    # -- deliveries ------------------------------------------------------------------------------
    @r.get("/deliveries", response_class=HTMLResponse)
    def deliveries(
        request: Request,
        campaign: Annotated[str, Query(max_length=64)] = "",
        run: Annotated[str, Query(pattern=r"^\d{0,18}$")] = "",
        status: Annotated[str, Query(max_length=20)] = "",
        contact: Annotated[str, Query(max_length=200)] = "",
        before: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    ) -> HTMLResponse:
        wanted = DeliveryStatus(status) if status in set(DeliveryStatus) else None
        rows = deliveries_db.list_deliveries(
            app.db,
            campaign_id=campaign or None,
            run_id=int(run) if run else None,
            status=wanted,
            contact_id=contact or None,
            limit=PAGE_SIZE + 1,
            before=before,
        )
        filters = {"campaign": campaign, "run": run, "status": status, "contact": contact}
        base = {k: v for k, v in filters.items() if v}
        shown = rows[:PAGE_SIZE]
        return page(
            request,
            "deliveries.html",
            rows=[DeliveryView.from_row(d) for d in shown],
            filters=filters,
            statuses=list(DeliveryStatus),
            next_url=f"?{urlencode({**base, 'before': shown[-1].id})}" if len(rows) > PAGE_SIZE else None,
            first_url=f"?{urlencode(base)}" if before is not None else None,
        )

    # -- journeys --------------------------------------------------------------------------------
    def journey_counts(journey_id: str, counts: list[StepCount]) -> JourneyCounts:
        return JourneyCounts.from_rows(journey_id, counts, journeys_db.passed_counts(app.db, journey_id))

    @r.get("/journeys", response_class=HTMLResponse)
    def journeys(request: Request) -> HTMLResponse:
        counts = journeys_db.step_counts(app.db)
        loaded = sorted(app.journeys.journeys.values(), key=lambda j: j.id)
        _, errors = ctx.campaigns()
        return page(
            request,
            "journeys.html",
            items=[(j, journey_counts(j.id, counts)) for j in loaded],
            problems=Problem.all_of(errors),
        )

    @r.get("/journeys/{journey_id}", response_class=HTMLResponse)
    def journey(request: Request, journey_id: Annotated[str, PathParam(max_length=64)]) -> HTMLResponse:
        found = app.journeys.journeys.get(journey_id)
        if found is None:
            return ui.notice(request, NotFoundError(f"no journey {journey_id!r} in {app.settings.campaigns_dir}"))
        counts = journey_counts(found.id, journeys_db.step_counts(app.db, found.id))
        return page(
            request,
            "journey.html",
            j=found,
            counts=counts,
            nodes=tree(found, counts),
            recent=journeys_db.enrolments(app.db, journey_id=found.id, limit=PAGE_SIZE),
            yaml=found.file.read_text(encoding="utf-8", errors="replace") if found.file.is_file() else "",
        )

    return r

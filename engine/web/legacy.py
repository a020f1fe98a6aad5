"""The source document's six endpoints, with its paths, methods and body fields, so its users can switch
to wecast without changing their clients:

    POST /goStart               start the login: the QR is printed in the log and returned with its qrcodeKey
    POST /submit-verify-code    {verifyCode, qrcodeKey}: the 6-digit code the phone shows
    POST /get-all-user          {pageSize, page | cursor} -> {datas: [...], hasNextPage}
    POST /send-message          {id, message, attachments?}
    POST /send-message-all      {message, attachments?, ids | id | tag | tags}
    POST /goEnd                 log out (POST /goStart then shows a new QR for the next account)

`message` is the text, as in the source document; `attachments` (up to 9: images and files uploaded with
POST /api/v1/media or given by https URL, link and mini-program cards — `engine.message_spec.Attachment`) follow it,
so a poster goes out with its caption. Parts the gateway cannot send are refused (422) before anything is planned.

Sends go through the Dispatcher, the same deduplicating, logged path as campaigns: /send-message pooled with the
calls that arrive beside it into one run (`engine.web.sends`), /send-message-all as a run of its own
(`plan_adhoc`). A client retry with the same `Idempotency-Key` header answers the first result and never sends
twice; the same key for another send is refused (409). A send while logged out is refused at once (409); nothing
is queued behind the caller's back.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response

from engine.contacts import ListState, list_state_of
from engine.errors import NotFoundError, WecastError
from engine.i18n import tr
from engine.message_spec import Attachment, PartError, direct_message
from engine.messages import Message
from engine.plan import API_CAMPAIGN, plan_adhoc, run_key_problem
from engine.views import json_page
from engine.web.context import WebContext
from engine.web.errors import invalid
from engine.web.models import (
    AllUsersPage,
    GetAllUserBody,
    LoginView,
    SendAllBody,
    SendMessageBody,
    SendResult,
    SendResultItem,
    VerifyAnswer,
    VerifyCodeBody,
)
from engine.web.sends import KEY_REUSED, NO_CONTACT, DirectSends, run_open, send_summary
from storage import contacts as contacts_db
from storage import deliveries as deliveries_db
from storage import runs as runs_db
from storage.contacts import ContactFilter
from storage.models import MAX_RUN_KEY, OPEN_STATUSES, DeliveryStatus

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=MAX_RUN_KEY,
        description=(
            "Any unique string per logical send (a UUID). A retry with the same key returns the first result "
            "and never sends twice."
        ),
    ),
]


def check_idempotency_key(key: str | None) -> None:
    """A 422 naming the header when the key could not name one send (`engine.plan.run_key_problem`)."""
    if key and key.strip() and (problem := run_key_problem(key.strip())) is not None:
        raise invalid("Idempotency-Key", problem)


def _page_if_whole(ask: Callable[[], contacts_db.JsonPage]) -> contacts_db.JsonPage | None:
    """The page of all contacts `ask` reads, if the list it was read from is whole (else None:
    `WebContext.ensure_contacts` first). Whole is judged from the latest sync read in the page's own transaction
    and, never synced, from its total (of every contact): no second connection for the list's state."""
    page = ask()
    return page if list_state_of(page.latest_sync, lambda: page.total) is ListState.WHOLE else None


# -- sends -------------------------------------------------------------------------------------------


def body_message(ctx: WebContext, text: str | None, attachments: list[Attachment]) -> Message:
    """The message a send body asks for, checked (media exist, URLs https, WeCom's lengths, the gateway's parts).
    Raises a 422 naming the field."""
    gateway = ctx.app.gateway
    try:
        caps = gateway.capabilities
        return direct_message(
            text,
            attachments,
            store=ctx.app.media,
            supports=caps.supports,
            gateway=gateway.name,
            local_covers=caps.local_covers,
        )
    except PartError as exc:
        raise invalid(exc.field, exc.reason) from None


async def send_message(
    ctx: WebContext, contact_ids: list[str], message: Message, idempotency_key: str | None, *, what: str
) -> tuple[int, SendResult]:
    """Plan a direct send and dispatch it; wait up to `send_wait` for the result.

    Returns (HTTP status, body): 200 when every delivery is settled, 202 while some are still going out.
    """
    app = ctx.app
    run_key = idempotency_key.strip() if idempotency_key and idempotency_key.strip() else None
    existing = await ctx.db(runs_db.find_run, app.db, API_CAMPAIGN, run_key) if run_key else None
    if existing is None and run_key:
        earlier = await ctx.db(runs_db.earlier_sends, app.db, API_CAMPAIGN, [run_key])
        if earlier:  # a single send (/send-message) used it, pooled in a run of another key
            raise WecastError(tr(KEY_REUSED))
    if existing is None:
        await ctx.require_login()
        await ctx.ensure_contacts()
        names = await ctx.db(_known_contacts, ctx, contact_ids)
        plan = await ctx.db(
            plan_adhoc,
            app.db,
            messages=[(cid, message) for cid in contact_ids],
            run_key=run_key or f"api-{uuid.uuid4().hex}",
            now=app.clock.now(),
            timezone=app.settings.timezone,
            throttle_interval=app.settings.sending.throttle.interval,
            names=names,
        )
        run_id = plan.run_id
        if not plan.created:  # a concurrent request with the same key planned it first
            await ctx.db(_same_request, ctx, run_id, contact_ids, message)
    else:
        run_id = existing.id
        await ctx.db(_same_request, ctx, run_id, contact_ids, message)
    task = ctx.workers.task(run_id)
    if task is None and await ctx.db(run_open, ctx, run_id):
        task = ctx.dispatch(run_id, API_CAMPAIGN)
    if task is not None:
        await asyncio.wait({asyncio.shield(task)} if not task.done() else {task}, timeout=ctx.send_wait)
    body = await ctx.db(run_result, ctx, run_id, what=what, replayed=existing is not None)
    return (202 if body.pending else 200), body


def _same_request(ctx: WebContext, run_id: int, contact_ids: list[str], message: Message) -> None:
    rows = deliveries_db.recipients_and_messages(ctx.app.db, run_id)
    whole = None if message.is_plain_text() else message.dumps()
    if {cid for cid, _, _ in rows} != set(contact_ids) or any((t, m) != (message.text, whole) for _, t, m in rows):
        raise WecastError(tr(KEY_REUSED))


def _known_contacts(ctx: WebContext, contact_ids: list[str]) -> dict[str, str]:
    names = contacts_db.contact_names(ctx.app.db, contact_ids)
    unknown = [i for i in contact_ids if i not in names]
    if unknown:
        shown = ", ".join(unknown[:5]) + (tr(" and {n} more", n=len(unknown) - 5) if len(unknown) > 5 else "")
        raise NotFoundError(tr(NO_CONTACT, ids=shown))
    return names


def run_result(ctx: WebContext, run_id: int, *, what: str, replayed: bool = False, limit: int = 200) -> SendResult:
    """A send's outcome: counts and per-recipient results."""
    counts = deliveries_db.status_counts(ctx.app.db, run_id)
    rows = deliveries_db.list_deliveries(ctx.app.db, run_id=run_id, limit=limit)
    run = runs_db.get_run(ctx.app.db, run_id)
    pending = sum(counts.get(s, 0) for s in OPEN_STATUSES)
    sent = counts.get(DeliveryStatus.SENT, 0)
    failed = counts.get(DeliveryStatus.FAILED, 0) + counts.get(DeliveryStatus.UNKNOWN, 0)
    skipped = counts.get(DeliveryStatus.SKIPPED, 0)
    message = send_summary(what, run_id, sent=sent, failed=failed, pending=pending, skipped=skipped)
    return SendResult(
        message=message,
        runId=run_id,
        runKey=run.run_key if run else None,
        status=run.status if run else None,
        sent=sent,
        failed=failed,
        pending=pending,
        counts=counts,
        results=[
            SendResultItem(
                id=r.contact_id,
                name=r.contact_name,
                status=r.status,
                reason=r.reason,
                messageId=r.gateway_message_id or None,
            )
            for r in reversed(rows)
        ],
        replayed=replayed,
    )


def _tagged(ctx: WebContext, tags: list[str]) -> list[str]:
    """Friends (not coworkers) having any of `tags`; unknown tags are an error, not an empty send."""
    known = contacts_db.tag_keys(ctx.app.db)
    unknown = [x for x in tags if x not in known]
    if unknown:
        raise NotFoundError(tr("no tag {tags}; see GET /api/v1/tags", tags=", ".join(repr(u) for u in unknown)))
    return contacts_db.customers_tagged(ctx.app.db, tags)


# -- the routes --------------------------------------------------------------------------------------


def router(ctx: WebContext) -> APIRouter:
    """The source document's endpoints, bound to `ctx`."""
    r = APIRouter(tags=["source document (legacy)"])
    pool = DirectSends(ctx)

    @r.post("/goStart", response_model=LoginView, summary="Start the login: a QR to scan (printed in the log)")
    async def go_start() -> LoginView:
        status = await ctx.app.gateway.start_login()
        ctx.login_state = status.state
        if status.logged_in:
            return LoginView.from_status(status, tr("already logged in as {account}", account=status.account_name))
        ctx.print_qr(status)  # a QR already showing is printed again for whoever missed it
        return LoginView.from_status(status, status.message or tr("scan the QR code printed in the log"))

    @r.post("/submit-verify-code", response_model=VerifyAnswer, summary="Submit the 6-digit code the phone shows")
    async def submit_verify_code(body: VerifyCodeBody) -> VerifyAnswer:
        status = await ctx.app.gateway.submit_verify_code(body.verifyCode, body.qrcodeKey)
        ctx.login_state = status.state
        if status.logged_in:
            message = tr("verification code accepted: logged in as {account}", account=status.account_name)
        elif status.second_verification:
            ctx.print_qr(status)
            message = tr(
                "verification code accepted; WeCom asks for a second verification: scan the new QR code printed "
                "in the log"
            )
        else:
            message = tr("verification code accepted")
        view = LoginView.from_status(status, message)
        return VerifyAnswer(**view.model_dump(), verifyCode=body.verifyCode)

    @r.post("/get-all-user", response_model=AllUsersPage, summary="Contacts, a page at a time: {datas, hasNextPage}")
    async def get_all_user(body: GetAllUserBody | None = None) -> Response:
        body = body or GetAllUserBody()
        if body.page is not None and body.cursor:
            raise invalid("cursor", tr("give page or cursor, not both"))
        page = body.page or 1
        ask = functools.partial(
            contacts_db.page_contacts_json,
            ctx.app.db,
            ContactFilter(),
            limit=body.pageSize,
            offset=(page - 1) * body.pageSize,
            cursor=body.cursor,
        )
        # One trip off the loop when the list is whole (the usual case): its state and the page together.
        found = None if ctx.workers.syncing else await ctx.read_page(_page_if_whole, ask)
        if found is None:
            await ctx.ensure_contacts()
            found = await ctx.read_page(ask)
        # The page as AllUsersPage serializes it, its contacts as the database wrote them (the hot path).
        rest = {
            "hasNextPage": found.has_next,
            "nextCursor": found.next_cursor,
            "total": found.total,
            "page": None if body.cursor else page,
            "pageSize": body.pageSize,
        }
        return Response(json_page("datas", found.items, rest), media_type="application/json")

    @r.post(
        "/send-message",
        response_model=SendResult,
        summary="Send a text (and attachments) to one contact",
        responses={202: {"description": "accepted, still sending"}, 409: {"description": "not logged in"}},
    )
    async def send_one(body: SendMessageBody, idempotency_key: IdempotencyKey = None) -> JSONResponse:
        check_idempotency_key(idempotency_key)
        message = body_message(ctx, body.message, body.attachments)
        code, result = await pool.send(body.id.strip(), message, idempotency_key)
        if code == 200 and result.failed:
            first = result.results[0] if result.results else None
            result = result.model_copy(update={"error": (first.reason if first else "") or tr("not sent")})
            code = 502
        return JSONResponse(jsonable_encoder(result), status_code=code)

    @r.post(
        "/send-message-all",
        response_model=SendResult,
        summary="Send one message (text and attachments) to many contacts: by ids and/or tag",
        responses={202: {"description": "accepted, still sending"}, 409: {"description": "not logged in"}},
    )
    async def send_message_all(body: SendAllBody, idempotency_key: IdempotencyKey = None) -> JSONResponse:
        check_idempotency_key(idempotency_key)
        ids, tags = body.recipient_ids(), body.tag_names()
        if not ids and not tags:
            raise invalid("ids", tr("give the recipients: ids (or id) and/or tag"))
        message = body_message(ctx, body.message, body.attachments)
        recipients = list(ids)
        if tags:
            await ctx.require_login()
            await ctx.ensure_contacts()
            recipients += await ctx.db(_tagged, ctx, tags)
        recipients = list(dict.fromkeys(recipients))
        if not recipients:
            raise NotFoundError(tr("no contacts to send to: nobody has the tag {tags}", tags=", ".join(tags)))
        code, result = await send_message(ctx, recipients, message, idempotency_key, what="send-message-all")
        return JSONResponse(jsonable_encoder(result), status_code=code)

    @r.post("/goEnd", response_model=LoginView, summary="Log out (then /goStart shows a new QR)")
    async def go_end() -> LoginView:
        status = await ctx.app.gateway.logout()
        ctx.login_state = status.state
        return LoginView.from_status(status, tr("logged out: call /goStart for a new QR code"))

    return r

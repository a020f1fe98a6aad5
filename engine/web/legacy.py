"""The source document's six endpoints, with its paths, methods and body fields, so its users can switch
to wecast without changing their clients:

    POST /goStart               start the login: the QR is printed in the log and returned with its qrcodeKey
    POST /submit-verify-code    {verifyCode, qrcodeKey}: the 6-digit code the phone shows
    POST /get-all-user          {pageSize, page | cursor} -> {datas: [...], hasNextPage}
    POST /send-message          {id, message}
    POST /send-message-all      {message, ids | id | tag | tags}
    POST /goEnd                 log out (POST /goStart then shows a new QR for the next account)

Sends go through `plan_adhoc` and the Dispatcher, the same deduplicating, throttled, logged path as
campaigns. A client retry with the same `Idempotency-Key` header is the same run and never sends twice.
A send while logged out is refused at once (409); nothing is queued behind the caller's back.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Header
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import and_, func, or_, select

from engine.errors import NotFoundError, WecastError
from engine.gateways.base import LoginStatus
from engine.plan import plan_adhoc
from storage import queries
from storage.models import CONTACTS, OPEN_STATUSES, RUNS, TAGS, DeliveryStatus, RunStatus

if TYPE_CHECKING:
    from engine.web.app import WebContext

MAX_MESSAGE = 4000


class Legacy(BaseModel):
    """Bodies as the source document's clients send them: unknown keys ignored, numbers taken as text."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)


class VerifyCodeBody(Legacy):
    verifyCode: str = Field(description="the 6-digit code WeCom shows on the phone after the scan")
    qrcodeKey: str | None = Field(default=None, max_length=200, description="the key /goStart returned")

    @field_validator("verifyCode")
    @classmethod
    def _six_digits(cls, v: str) -> str:
        digits = re.sub(r"\s", "", v)
        if not re.fullmatch(r"\d{6}", digits):
            raise ValueError("must be the 6 digits shown on the phone")
        return digits


class GetAllUserBody(Legacy):
    pageSize: int = Field(default=100, ge=1, le=1000, description="contacts per page")
    page: int | None = Field(default=None, ge=1, le=1_000_000, description="1-based page number")
    cursor: str | None = Field(default=None, max_length=200, description="`nextCursor` of the previous page")


def _text(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    return v


class SendMessageBody(Legacy):
    id: str = Field(min_length=1, max_length=200, description="the contact id from /get-all-user")
    message: str = Field(min_length=1, max_length=MAX_MESSAGE, description="the text to send")

    _nonblank = field_validator("message")(_text)


class SendAllBody(Legacy):
    message: str = Field(min_length=1, max_length=MAX_MESSAGE, description="the text to send")
    ids: list[str] | None = Field(default=None, max_length=100_000, description="contact ids")
    id: str | list[str] | None = Field(default=None, description="a contact id or a list (the document's name)")
    tag: str | list[str] | None = Field(default=None, description="a tag name or id, or a list: its contacts")
    tags: list[str] | None = Field(default=None, description="several tags (contacts with any of them)")

    _nonblank = field_validator("message")(_text)

    def recipient_ids(self) -> list[str]:
        ids = list(self.ids or [])
        ids += [self.id] if isinstance(self.id, str) else list(self.id or [])
        return [i for i in dict.fromkeys(x.strip() for x in ids) if i]

    def tag_names(self) -> list[str]:
        tags = [self.tag] if isinstance(self.tag, str) else list(self.tag or [])
        return [t for t in dict.fromkeys(x.strip() for x in [*tags, *(self.tags or [])]) if t]


IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description=(
            "Any unique string per logical send (a UUID). A retry with the same key returns the first result "
            "and never sends twice."
        ),
    ),
]


def invalid(field: str, message: str) -> RequestValidationError:
    """A 422 naming `field`, for checks that span several fields."""
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": "value_error"}])


# -- contacts as the document shows them -----------------------------------------------------------


def contact_json(row: dict[str, Any], tags: list[tuple[str, str]]) -> dict[str, Any]:
    """A contact with the source document's field names (the WorkPro/wechaty contact payload)."""
    return {
        "id": row["id"],
        "handle": row["id"],
        "name": row["name"],
        "alias": row["alias"],
        "avatar": row["avatar"],
        "gender": row["gender"],
        "city": row["city"],
        "province": row["province"],
        "address": row["address"],
        "corporation": row["corporation"],
        "title": row["title"],
        "phone": list(row["phones"] or []),
        "weixin": row["weixin"],
        "description": row["description"],
        "signature": row["signature"],
        "friend": bool(row["friend"]),
        "coworker": bool(row["coworker"]),
        "star": bool(row["star"]),
        "type": row["type"],
        "realName": row["real_name"],
        "aka": row["aka"],
        "additionalInfo": row["additional_info"] or {},
        "corpId": row["corp_id"],
        "tags": [name for _, name in tags],
        "tagIds": [tid for tid, _ in tags],
        "addedAt": row["added_at"],
    }


def tags_of(conn: Any, ids: list[str]) -> dict[str, list[tuple[str, str]]]:
    ct, t = queries.CT, queries.T
    out: dict[str, list[tuple[str, str]]] = {i: [] for i in ids}
    for i in range(0, len(ids), 900):
        stmt = (
            select(ct.contact_id, t.id, t.name)
            .join(TAGS, t.id == ct.tag_id)
            .where(ct.contact_id.in_(ids[i : i + 900]))
            .order_by(t.group_name, t.name)
        )
        for cid, tid, name in conn.execute(stmt):
            out[cid].append((tid, name))
    return out


def tag_filter(names: list[str]) -> Any:
    """Contacts having any of these tags (by name or id)."""
    ct, t = queries.CT, queries.T
    tagged = select(ct.contact_id).join(TAGS, t.id == ct.tag_id).where(or_(t.name.in_(names), t.id.in_(names)))
    return queries.C.id.in_(tagged)


async def ensure_contacts(ctx: WebContext) -> None:
    """Contacts are served from the local copy; fill it if it is empty (just logged in)."""
    if ctx.app.contact_count() > 0:
        return
    if ctx.workers.syncing:
        await ctx.workers.wait_sync()
    if ctx.app.contact_count() == 0:
        await ctx.require_login()
        await ctx.workers.sync(ctx.app)


def page_contacts(
    ctx: WebContext, *, where: list[Any], limit: int, offset: int = 0, cursor: str | None = None
) -> dict[str, Any]:
    c = queries.C
    conds = [c.removed_at.is_(None), *where]
    with ctx.app.db.connect() as conn:
        total = conn.execute(select(func.count()).select_from(CONTACTS).where(and_(*conds))).scalar() or 0
        stmt = select(CONTACTS).where(and_(*conds))
        stmt = stmt.where(c.id > cursor) if cursor else stmt.offset(offset)
        rows = [dict(r._mapping) for r in conn.execute(stmt.order_by(c.id).limit(limit + 1))]
        more = len(rows) > limit
        rows = rows[:limit]
        tags = tags_of(conn, [r["id"] for r in rows])
    return {
        "datas": [contact_json(r, tags[r["id"]]) for r in rows],
        "hasNextPage": more,
        "nextCursor": rows[-1]["id"] if more and rows else None,
        "total": int(total),
    }


# -- sends -------------------------------------------------------------------------------------------


async def send_text(
    ctx: WebContext, contact_ids: list[str], text: str, idempotency_key: str | None, *, what: str
) -> tuple[int, dict[str, Any]]:
    """Plan a direct send and dispatch it; wait up to `send_wait` for the result.

    Returns (HTTP status, body): 200 when every delivery is settled, 202 while some are still going out.
    """
    app = ctx.app
    run_key = idempotency_key.strip() if idempotency_key and idempotency_key.strip() else None
    existing = _api_run(ctx, run_key) if run_key else None
    if existing is None:
        await ctx.require_login()
        names = _known_contacts(ctx, contact_ids)
        plan = plan_adhoc(
            app.db,
            contact_ids=contact_ids,
            text=text,
            run_key=run_key or f"api-{uuid.uuid4().hex}",
            now=app.clock.now(),
            timezone=app.settings.timezone,
            throttle_interval=app.settings.sending.throttle.interval,
            names=names,
        )
        run_id = plan.run_id
        if not plan.created:  # a concurrent request with the same key planned it first
            _same_request(ctx, run_id, contact_ids, text)
    else:
        run_id = int(existing["id"])
        _same_request(ctx, run_id, contact_ids, text)
    task = ctx.workers.task(run_id)
    run = queries.get_run(app.db, run_id)
    if task is None and run is not None and run["status"] == RunStatus.RUNNING and _open(ctx, run_id):
        task = ctx.dispatch(run_id, "api")
    if task is not None:
        await asyncio.wait({asyncio.shield(task)} if not task.done() else {task}, timeout=ctx.send_wait)
    body = run_result(ctx, run_id, what=what)
    body["replayed"] = existing is not None
    return (202 if body["pending"] else 200), body


def _api_run(ctx: WebContext, run_key: str) -> dict[str, Any] | None:
    r = queries.R
    with ctx.app.db.connect() as conn:
        row = conn.execute(select(RUNS).where(r.campaign_id == "api", r.run_key == run_key)).first()
    return dict(row._mapping) if row else None


def _same_request(ctx: WebContext, run_id: int, contact_ids: list[str], text: str) -> None:
    d = queries.D
    with ctx.app.db.connect() as conn:
        rows = conn.execute(select(d.contact_id, d.text).where(d.run_id == run_id)).all()
    if {r.contact_id for r in rows} != set(contact_ids) or any(r.text != text for r in rows):
        raise WecastError(
            "this Idempotency-Key was already used for a different send (other recipients or "
            "text); use a new key for a new message"
        )


def _known_contacts(ctx: WebContext, contact_ids: list[str]) -> dict[str, str]:
    c = queries.C
    names: dict[str, str] = {}
    with ctx.app.db.connect() as conn:
        for i in range(0, len(contact_ids), 900):
            part = contact_ids[i : i + 900]
            for cid, name in conn.execute(select(c.id, c.name).where(c.id.in_(part), c.removed_at.is_(None))):
                names[cid] = name
    unknown = [i for i in contact_ids if i not in names]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise NotFoundError(
            f"no contact with id {shown} (ids come from /get-all-user; after changes on the "
            "phone, re-sync with POST /api/v1/contacts/sync)"
        )
    return names


def _open(ctx: WebContext, run_id: int) -> bool:
    with ctx.app.db.connect() as conn:
        counts = queries.status_counts(conn, run_id)
    return any(counts.get(s, 0) for s in OPEN_STATUSES)


def run_result(ctx: WebContext, run_id: int, *, what: str, limit: int = 200) -> dict[str, Any]:
    """A send's outcome: counts and per-recipient results."""
    with ctx.app.db.connect() as conn:
        counts = queries.status_counts(conn, run_id)
        rows = queries.deliveries(conn, run_id=run_id, limit=limit)
    run = queries.get_run(ctx.app.db, run_id) or {}
    pending = sum(counts.get(s, 0) for s in OPEN_STATUSES)
    sent = counts.get(DeliveryStatus.SENT, 0)
    failed = counts.get(DeliveryStatus.FAILED, 0) + counts.get(DeliveryStatus.UNKNOWN, 0)
    if pending:
        message = f"{what}: {sent} sent, {pending} still going out (see /api/v1/runs/{run_id})"
    elif failed:
        message = f"{what}: {sent} sent, {failed} not sent (see results)"
    else:
        message = f"{what}: 发送成功 (sent {sent})"
    return {
        "message": message,
        "runId": run_id,
        "runKey": run.get("run_key"),
        "status": run.get("status"),
        "sent": sent,
        "failed": failed,
        "pending": pending,
        "counts": counts,
        "results": [
            {
                "id": r["contact_id"],
                "name": r["contact_name"],
                "status": r["status"],
                "reason": r["reason"],
                "messageId": r["gateway_message_id"] or None,
            }
            for r in reversed(rows)
        ],
    }


def login_json(status: LoginStatus) -> dict[str, Any]:
    return {
        "state": status.state.value,
        "message": status.message,
        "qrcodeKey": status.qrcode_key,
        "qrcodeUrl": status.qr_url,
        "secondVerification": status.second_verification,
        "triesLeft": status.tries_left,
        "accountId": status.account_id,
        "accountName": status.account_name,
        "qrcodePng": "/api/v1/login/qr.png" if status.qr_url else None,
    }


# -- the routes --------------------------------------------------------------------------------------


def router(ctx: WebContext) -> APIRouter:
    """The source document's endpoints, bound to `ctx`."""
    r = APIRouter(tags=["source document (legacy)"])

    @r.post("/goStart", summary="Start the login: a QR to scan (printed in the log, returned with qrcodeKey)")
    async def go_start() -> dict[str, Any]:
        status = await ctx.app.gateway.start_login()
        ctx.login_state = status.state
        if status.logged_in:
            return {**login_json(status), "message": f"已登录 (already logged in as {status.account_name})"}
        ctx.print_qr(status)  # a QR already showing is printed again for whoever missed it
        return {**login_json(status), "message": status.message or "请扫描日志中的二维码"}

    @r.post("/submit-verify-code", summary="Submit the 6-digit code the phone shows after the scan")
    async def submit_verify_code(body: VerifyCodeBody) -> dict[str, Any]:
        status = await ctx.app.gateway.submit_verify_code(body.verifyCode, body.qrcodeKey)
        ctx.login_state = status.state
        if status.logged_in:
            return {
                **login_json(status),
                "message": f"验证码已接收，登录成功 (logged in as {status.account_name})",
                "verifyCode": body.verifyCode,
            }
        if status.second_verification:
            ctx.print_qr(status)
            return {
                **login_json(status),
                "verifyCode": body.verifyCode,
                "message": "验证码已接收；企业微信要求二次验证：请扫描日志中的新二维码 "
                "(WeCom asks for a second verification: scan the new QR in the log)",
            }
        return {**login_json(status), "verifyCode": body.verifyCode, "message": "验证码已接收"}

    @r.post("/get-all-user", summary="Contacts, a page at a time: {datas, hasNextPage}")
    async def get_all_user(body: GetAllUserBody | None = None) -> dict[str, Any]:
        body = body or GetAllUserBody()
        if body.page is not None and body.cursor:
            raise invalid("cursor", "give page or cursor, not both")
        await ensure_contacts(ctx)
        page = body.page or 1
        result = page_contacts(
            ctx, where=[], limit=body.pageSize, offset=(page - 1) * body.pageSize, cursor=body.cursor
        )
        return {**result, "page": None if body.cursor else page, "pageSize": body.pageSize}

    @r.post(
        "/send-message",
        summary="Send a text to one contact",
        responses={202: {"description": "accepted, still sending"}, 409: {"description": "not logged in"}},
    )
    async def send_message(body: SendMessageBody, idempotency_key: IdempotencyKey = None) -> JSONResponse:
        code, result = await send_text(ctx, [body.id.strip()], body.message, idempotency_key, what="send-message")
        if code == 200 and result["failed"]:
            first = result["results"][0] if result["results"] else {}
            result["error"] = first.get("reason") or "not sent"
            code = 502
        return JSONResponse(jsonable(result), status_code=code)

    @r.post(
        "/send-message-all",
        summary="Send one text to many contacts: by ids and/or tag",
        responses={202: {"description": "accepted, still sending"}, 409: {"description": "not logged in"}},
    )
    async def send_message_all(body: SendAllBody, idempotency_key: IdempotencyKey = None) -> JSONResponse:
        ids, tags = body.recipient_ids(), body.tag_names()
        if not ids and not tags:
            raise invalid("ids", "give the recipients: ids (or id) and/or tag")
        recipients = list(ids)
        if tags:
            recipients += _tagged(ctx, tags)
        recipients = list(dict.fromkeys(recipients))
        if not recipients:
            raise NotFoundError(f"no contacts to send to: nobody has the tag {', '.join(tags)}")
        code, result = await send_text(ctx, recipients, body.message, idempotency_key, what="send-message-all")
        return JSONResponse(jsonable(result), status_code=code)

    @r.post("/goEnd", summary="Log out (then /goStart shows a new QR, for this or another account)")
    async def go_end() -> dict[str, Any]:
        status = await ctx.app.gateway.logout()
        ctx.login_state = status.state
        return {
            **login_json(status),
            "message": "已退出登录：调用 /goStart 获取新的二维码 (logged out: call /goStart for a new QR)",
        }

    return r


def _tagged(ctx: WebContext, tags: list[str]) -> list[str]:
    """Friends (not coworkers) having any of `tags`; unknown tags are an error, not an empty send."""
    c, t = queries.C, queries.T
    with ctx.app.db.connect() as conn:
        known = {name for row in conn.execute(select(t.id, t.name)) for name in row}
        unknown = [x for x in tags if x not in known]
        if unknown:
            raise NotFoundError(f"no tag {', '.join(repr(u) for u in unknown)}; see GET /api/v1/tags")
        stmt = (
            select(c.id)
            .where(c.removed_at.is_(None), c.friend.is_(True), c.coworker.is_(False), tag_filter(tags))
            .order_by(c.id)
        )
        return [row.id for row in conn.execute(stmt)]


def jsonable(value: Any) -> Any:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(value)

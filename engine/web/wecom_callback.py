"""WeCom's callback URL (接收事件服务器) in `wecast serve`: `GET /wecom/callback` (the URL check) and
`POST /wecom/callback` (change_external_contact events), for the wecom gateway.

The routes need no API key — WeCom cannot send one — and take XML, not JSON (`engine.web.security` lets this path
through both rules); what authenticates a callback is its signature, checked with the callback token and decrypted
with the EncodingAESKey by the gateway (`engine.gateways.wecom.callbacks`). A callback that does not check out
(signature, another corp, stale, replayed, malformed) is answered 403 with the reason and logged; a duplicate of one
already received is acknowledged and not processed again. The answer comes at once — decrypting takes
microseconds — and the event is emitted to the journeys after it (WeCom wants an answer within a second).
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse

from engine.gateways.wecom.callbacks import MAX_BODY
from engine.gateways.wecom.crypto import CallbackError
from engine.gateways.wecom.gateway import WecomGateway
from engine.web.context import WebContext

log = logging.getLogger("wecast.web")

PATH = "/wecom/callback"
Param = Annotated[str, Query(max_length=128)]
Encrypted = Annotated[str, Query(max_length=4096)]


def router(ctx: WebContext) -> APIRouter:
    """The callback routes, answering 404 unless the gateway is wecom."""
    r = APIRouter(tags=["wecom"])

    def gateway() -> WecomGateway | None:
        gw = ctx.app.gateway
        return gw if isinstance(gw, WecomGateway) else None

    def refused(why: str) -> PlainTextResponse:
        log.warning("WeCom callback refused: %s", why)
        return PlainTextResponse(why, status_code=403)

    @r.get(PATH, response_class=PlainTextResponse, summary="WeCom's URL check: answers the decrypted echostr")
    def url_check(msg_signature: Param, timestamp: Param, nonce: Param, echostr: Encrypted) -> PlainTextResponse:
        gw = gateway()
        if gw is None:
            return PlainTextResponse("the gateway is not wecom", status_code=404)
        try:
            return PlainTextResponse(gw.verify_callback_url(msg_signature, timestamp, nonce, echostr))
        except CallbackError as exc:
            return refused(str(exc))

    @r.post(PATH, response_class=PlainTextResponse, summary="WeCom's change_external_contact events (XML)")
    async def callback(request: Request, msg_signature: Param, timestamp: Param, nonce: Param) -> PlainTextResponse:
        gw = gateway()
        if gw is None:
            return PlainTextResponse("the gateway is not wecom", status_code=404)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return PlainTextResponse(f"a callback is at most {MAX_BODY} bytes", status_code=413)
        try:
            gw.receive_callback(msg_signature, timestamp, nonce, body)
        except CallbackError as exc:
            return refused(str(exc))
        return PlainTextResponse("success")

    return r

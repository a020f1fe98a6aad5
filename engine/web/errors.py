"""Errors become answers at one boundary: every `WecastError` a clear JSON body with a fitting status (the database's
condition — full, locked, unreadable — a 503 saying what to do), a bad request a 422 naming the field, anything
unexpected a 500 that points to the log (never a stack trace).

Each body is `{"error": words for people, in the request's language (engine.web.language), "code": a stable
English code for scripts, ...machine-readable extras}`. The codes:

    invalid_request       422  the request's body, query or path is wrong (`field`, `problems`)
    invalid_campaign      422  a campaign file or text is invalid (`problems`: file, line, field)
    not_found             404  no such contact, campaign, run, tag, QR
    not_logged_in         409  the account is logged out (`state`)
    login_failed          400  a wrong verification code (`triesLeft`); 409 when nothing is waiting for one
    gateway_error         502  the gateway failed (`kind` says how)
    database_unavailable  503  the database cannot be used now (`reason`: full, busy, unavailable, ...)
    conflict              409  not possible in the current state (a run's status, a reused Idempotency-Key)
    too_large             413  the request body is over the limit (engine.web.security), an upload over WeCom's
    internal_error        500  a bug: see the server log
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.dberrors import explain
from engine.errors import (
    CampaignError,
    DatabaseError,
    GatewayError,
    LoginError,
    NotFoundError,
    NotLoggedInError,
    WecastError,
)
from engine.i18n import N_, tr
from engine.validation_words import pydantic_words
from engine.views import Problem
from storage.errors import StorageError

log = logging.getLogger("wecast.web")


def error_body(message: str, **extra: Any) -> dict[str, Any]:
    """The JSON of every error answer: `error` (one line, for people) plus machine-readable extras."""
    return {"error": message, **extra}


BODY_PARSE_ERROR = "There was an error parsing the body"  # fastapi.routing's words for a body it cannot decode


class Code:
    """The machine-readable `code` of each error answer (see the module docstring)."""

    INVALID_REQUEST = "invalid_request"
    INVALID_CAMPAIGN = "invalid_campaign"
    NOT_FOUND = "not_found"
    NOT_LOGGED_IN = "not_logged_in"
    LOGIN_FAILED = "login_failed"
    GATEWAY_ERROR = "gateway_error"
    DATABASE_UNAVAILABLE = "database_unavailable"
    CONFLICT = "conflict"
    INTERNAL_ERROR = "internal_error"


def invalid(field: str, message: str) -> RequestValidationError:
    """A 422 naming `field`, for checks that span several fields."""
    return RequestValidationError([{"loc": ("body", field), "msg": message, "type": "value_error"}])


def _field_name(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or str(loc[0] if loc else "body")


def answer_for(exc: WecastError) -> tuple[int, dict[str, Any]]:
    """The HTTP status of an engine error and the machine-readable extras of its answer (the API's JSON and the
    console's pages answer the same error the same way)."""
    extra: dict[str, Any] = {}
    if isinstance(exc, LoginError):
        extra["code"], extra["triesLeft"] = Code.LOGIN_FAILED, exc.tries_left
        code = 400 if exc.tries_left is not None else 409
    elif isinstance(exc, NotLoggedInError):
        code, extra["code"], extra["state"] = 409, Code.NOT_LOGGED_IN, "logged_out"
    elif isinstance(exc, NotFoundError):
        code, extra["code"] = 404, Code.NOT_FOUND
    elif isinstance(exc, CampaignError):
        code, extra["code"] = 422, Code.INVALID_CAMPAIGN
        extra["problems"] = [p.model_dump() for p in Problem.all_of([exc])]
    elif isinstance(exc, GatewayError):
        code, extra["code"], extra["kind"] = 502, Code.GATEWAY_ERROR, exc.kind
    elif isinstance(exc, DatabaseError):
        code, extra["code"], extra["reason"] = 503, Code.DATABASE_UNAVAILABLE, exc.kind
    else:
        code, extra["code"] = 409, Code.CONFLICT
    return code, extra


# pydantic's words for the mistakes people make most, in the request's language (the rest stay pydantic's).
_REASONS = {
    "missing": N_("required field is missing"),
    "extra_forbidden": N_("unknown field"),
    "json_invalid": N_("the body is not valid JSON"),
    "model_attributes_type": N_("expected a JSON object"),
    "dict_type": N_("expected a JSON object"),
    "string_type": N_("expected text"),
    "int_parsing": N_("expected a whole number"),
    "int_type": N_("expected a whole number"),
    "list_type": N_("expected a list"),
}


def _reason(error: Any) -> str:
    kind = str(error.get("type", ""))
    known = _REASONS.get(kind)
    if known:
        return tr(known)
    ctx = error.get("ctx") or {}
    if kind == "too_long" and "max_length" in ctx:  # a list over its length (attachments: WeCom's nine)
        return tr("at most {n} items (found {found})", n=ctx["max_length"], found=ctx.get("actual_length", "?"))
    # A validator's own reason is already in the request's language; pydantic prefixes it with "Value error, ".
    return pydantic_words(error) or str(error.get("msg", "invalid")).removeprefix("Value error, ")


def describe_invalid(errors: Sequence[Any]) -> tuple[str, list[dict[str, str]]]:
    """A bad request's one-line message (`invalid request: field: why`) and its problems, one per field."""
    problems = []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        # A body that is not JSON is located at the character the decoder stopped at (("body", 0)): the field is
        # the body, not "0".
        field = "body" if e.get("type") == "json_invalid" else _field_name(loc)
        problems.append({"field": field, "in": str(loc[0]) if loc else "body", "message": _reason(e)})
    first = problems[0] if problems else {"field": "body", "message": tr("invalid request")}
    message = tr("invalid request: {field}: {reason}", field=first["field"], reason=first["message"])
    if len(problems) > 1:
        message += tr(" (and {n} more)", n=len(problems) - 1)
    return message, problems


def install_error_handlers(api: FastAPI) -> None:
    """Map errors to answers (see the module docstring)."""

    @api.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, problems = describe_invalid(exc.errors())
        first = problems[0] if problems else {"field": "body"}
        body = error_body(message, code=Code.INVALID_REQUEST, field=first["field"], problems=problems)
        return JSONResponse(body, status_code=422)

    @api.exception_handler(StarletteHTTPException)
    async def unreadable_body(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI's answer to a JSON body its decoder cannot take (nested 100,000 deep: a RecursionError) was an
        # English {"detail": ...}; it is a bad request like any other. Other HTTP errors keep Starlette's answer.
        if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR:
            # The decoder's own error is the cause: a body in another encoding is not a nesting problem.
            if isinstance(exc.__cause__, UnicodeDecodeError):
                message = tr("invalid request: body: the body is not UTF-8 text; send JSON encoded as UTF-8")
            else:
                message = tr("invalid request: body: the body could not be read as JSON (nested too deeply?)")
            return JSONResponse(error_body(message, code=Code.INVALID_REQUEST, field="body"), status_code=400)
        return await http_exception_handler(request, exc)

    @api.exception_handler(WecastError)
    async def wecast_error(_: Request, exc: WecastError) -> JSONResponse:
        code, extra = answer_for(exc)
        return JSONResponse(error_body(str(exc), **extra), status_code=code)

    @api.exception_handler(StorageError)
    async def storage_error(request: Request, exc: StorageError) -> JSONResponse:
        return await wecast_error(request, explain(exc))

    @api.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error handling a request")
        message = tr("internal error ({kind}); see the server log", kind=type(exc).__name__)
        return JSONResponse(error_body(message, code=Code.INTERNAL_ERROR), status_code=500)

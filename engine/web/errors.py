"""Errors become answers at one boundary: every `WecastError` a clear JSON body with a fitting status (the database's
condition — full, locked, unreadable — a 503 saying what to do), a bad request a 422 naming the field, anything
unexpected a 500 that points to the log (never a stack trace)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

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
from engine.views import Problem
from storage.errors import StorageError

log = logging.getLogger("wecast.web")


def error_body(message: str, **extra: Any) -> dict[str, Any]:
    """The JSON of every error answer: `error` (one line, for people) plus machine-readable extras."""
    return {"error": message, **extra}


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
        extra["triesLeft"] = exc.tries_left
        code = 400 if exc.tries_left is not None else 409
    elif isinstance(exc, NotLoggedInError):
        code, extra["state"] = 409, "logged_out"
    elif isinstance(exc, NotFoundError):
        code = 404
    elif isinstance(exc, CampaignError):
        code = 422
        extra["problems"] = [p.model_dump() for p in Problem.all_of([exc])]
    elif isinstance(exc, GatewayError):
        code = 502
    elif isinstance(exc, DatabaseError):
        code, extra["reason"] = 503, exc.kind
    else:
        code = 409
    return code, extra


def describe_invalid(errors: Sequence[Any]) -> tuple[str, list[dict[str, str]]]:
    """A bad request's one-line message (`invalid request: field: why`) and its problems, one per field."""
    problems = []
    for e in errors:
        loc = tuple(e.get("loc", ()))
        problems.append(
            {"field": _field_name(loc), "in": str(loc[0]) if loc else "body", "message": str(e.get("msg", "invalid"))}
        )
    first = problems[0] if problems else {"field": "body", "message": "invalid request"}
    message = f"invalid request: {first['field']}: {first['message']}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more)"
    return message, problems


def install_error_handlers(api: FastAPI) -> None:
    """Map errors to answers (see the module docstring)."""

    @api.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, problems = describe_invalid(exc.errors())
        first = problems[0] if problems else {"field": "body"}
        return JSONResponse(error_body(message, field=first["field"], problems=problems), status_code=422)

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
        return JSONResponse(error_body(f"internal error ({type(exc).__name__}); see the server log"), status_code=500)

"""The one place a gRPC failure from WorkPro becomes an engine error: a pure function over one table.

WorkPro reports most failures as INTERNAL or UNKNOWN with the meaning in the details text (a JavaScript error's
first line, e.g. `WorkproErrorCode: 20001, Feature temporarily unavailable.`), so the table matches status codes
*and* substrings of the details' first line (lower-cased). The first matching row names a `Failure`; `to_error`
turns it into the engine's error, where `mutating` (the call may have had effects: a send) decides whether a
broken call is an unknown outcome or safe to retry. An `Upload` (a file's bytes before the send that names
them) is not a delivery: every failure of it is safe to retry, a refusal included.

    classify(code, details, method) -> Failure          the table (RULES), first match wins
    map_rpc_error(code, details, ...) -> GatewayError   classify + to_error, with the server's text scrubbed

The login flow reads `Failure.WRONG_CODE` / `TOO_MANY_TRIES` from `classify` itself (they are LoginErrors with
the tries left, which only the login state machine knows).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeAlias

import grpc

from engine.errors import (
    AuthError,
    GatewayError,
    NotLoggedInError,
    PermanentError,
    RateLimitedError,
    TransientError,
    UnknownOutcomeError,
)
from engine.gateways.workpro.payloads import first_line
from engine.i18n import tr

Code: TypeAlias = grpc.StatusCode  # grpc ships no type information: this is Any to mypy


class Failure(StrEnum):
    """What went wrong, as far as the engine cares."""

    RATE_LIMITED = "rate_limited"  # WorkPro's own throttle (20001) or RESOURCE_EXHAUSTED
    AUTH = "auth"  # the token was refused
    NOT_LOGGED_IN = "not_logged_in"
    WRONG_CODE = "wrong_code"  # EnterVerifyCode: that was not the code on the phone
    TOO_MANY_TRIES = "too_many_tries"  # EnterVerifyCode: WeCom wants a new scan
    TIMEOUT = "timeout"  # the deadline passed: the request may have been processed
    BROKEN = "broken"  # the connection died mid-call: the request may have been processed
    UNAVAILABLE = "unavailable"  # could not connect: the request never left
    CANCELLED = "cancelled"
    STREAM_TAKEN = "stream_taken"  # another client holds the token's one event stream
    UNSUPPORTED = "unsupported"  # the server lacks this RPC (UNIMPLEMENTED, or Node's "is not a function")
    REFUSED = "refused"  # anything else: the server said no to this request, and will again


NEW_DEVICE_MARKERS = ("新设备", "安全验证", "secondaryequipment")
TOO_MANY_TRIES_MARKERS = ("次数超过阈值", "too many", "exceed", "请重新扫码")
WRONG_CODE_MARKERS = ("invalid verify code", "验证码错误", "wrong code", "wrong verify code")
NOT_LOGGED_IN_MARKERS = ("not logged in", "no this.__currentuserid", "未登录", "not login")
NOT_IMPLEMENTED_MARKERS = ("is not a function", "not implemented", "unimplemented")
# UNAVAILABLE texts that mean the connection died mid-call, unless a text says the request never left.
AFTER_SEND_MARKERS = (
    "stream removed",
    "rst_stream",
    "connection reset",
    "socket closed",
    "goaway",
    "broken pipe",
    "stream closed",
    "end of tcp stream",
    "cancelling all calls",  # the server shut down with the call in flight (gRPC's own server-stop text)
    "keepalive watchdog timeout",  # the connection was found dead mid-call
)
STATUS_LOST = "internal error from core"  # gRPC's client: a write failed on a call that ended, its status lost
BEFORE_SEND_MARKERS = (
    "failed to connect",
    "connection refused",
    "connect failed",
    "dns resolution",
    "name resolution",
    "no connection established",
    "unreachable",
    "failed to pick subchannel",
)


@dataclass(frozen=True)
class Rule:
    """One row: every condition that is set must hold (an empty one holds always)."""

    failure: Failure
    codes: frozenset[Code] = frozenset()  # the status code is one of these
    markers: tuple[str, ...] = ()  # the details contain one of these
    unless: tuple[str, ...] = ()  # ... and none of these
    methods: frozenset[str] = frozenset()  # the RPC is one of these

    def matches(self, code: Code | None, text: str, method: str) -> bool:
        return (
            (not self.codes or code in self.codes)
            and (not self.markers or any(m in text for m in self.markers))
            and not any(m in text for m in self.unless)
            and (not self.methods or method in self.methods)
        )


def _codes(*codes: Code) -> frozenset[Code]:
    return frozenset(codes)


VERIFY = frozenset({"EnterVerifyCode"})
# Calls that deliver nothing: however they fail, nothing reached a customer, so retrying is always safe.
NOT_A_DELIVERY = frozenset({"Upload"})
NOT_DELIVERED_RETRIED = frozenset(
    {Failure.TIMEOUT, Failure.BROKEN, Failure.UNAVAILABLE, Failure.CANCELLED, Failure.REFUSED}
)

# Order matters: a 20001 arrives as INTERNAL, a wrong code too; texts beat codes wherever a text is known.
RULES: tuple[Rule, ...] = (
    Rule(Failure.RATE_LIMITED, markers=("workproerrorcode: 20001",)),
    Rule(Failure.AUTH, codes=_codes(Code.UNAUTHENTICATED)),
    Rule(Failure.AUTH, markers=("invalid wechaty token", "no authorization found")),
    Rule(Failure.TOO_MANY_TRIES, methods=VERIFY, markers=TOO_MANY_TRIES_MARKERS),
    Rule(Failure.WRONG_CODE, methods=VERIFY, markers=WRONG_CODE_MARKERS),
    Rule(Failure.NOT_LOGGED_IN, markers=NOT_LOGGED_IN_MARKERS),
    Rule(Failure.TIMEOUT, codes=_codes(Code.DEADLINE_EXCEEDED)),
    Rule(Failure.BROKEN, codes=_codes(Code.UNAVAILABLE), markers=AFTER_SEND_MARKERS, unless=BEFORE_SEND_MARKERS),
    Rule(Failure.UNAVAILABLE, codes=_codes(Code.UNAVAILABLE)),
    # gRPC's transport reports a stream reset by the peer as INTERNAL ("Received RST_STREAM with error code 2"):
    # the connection broke mid-call, not a refusal from WorkPro, whose own errors never name RST_STREAM.
    Rule(Failure.BROKEN, codes=_codes(Code.INTERNAL), markers=("rst_stream",)),
    # gRPC's own client reports a message it could not write on a call that had just ended this way (an Upload
    # the server answered, e.g. UNIMPLEMENTED, while chunks were still going out): its real status is lost.
    Rule(Failure.BROKEN, codes=_codes(Code.INTERNAL), markers=(STATUS_LOST,)),
    Rule(Failure.STREAM_TAKEN, codes=_codes(Code.ALREADY_EXISTS), methods=frozenset({"Event"})),
    Rule(Failure.CANCELLED, codes=_codes(Code.CANCELLED)),
    Rule(Failure.UNSUPPORTED, codes=_codes(Code.UNIMPLEMENTED)),
    Rule(Failure.UNSUPPORTED, markers=NOT_IMPLEMENTED_MARKERS),
    Rule(Failure.RATE_LIMITED, codes=_codes(Code.RESOURCE_EXHAUSTED), unless=("larger than max",)),
)


def status_lost(code: Code | None, details: str | None) -> bool:
    """gRPC's own client failed to write on a call the server had just ended: the server's answer is lost."""
    return code == Code.INTERNAL and STATUS_LOST in first_line(details or "").lower()


def server_text(details: str | None, secrets: Iterable[str] = ()) -> str:
    """The part of a server's details fit to show: the first line, without `Error: `, secrets replaced."""
    text = first_line(details or "").removeprefix("Error: ")
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def classify(code: Code | None, details: str | None, method: str) -> Failure:
    """The failure the table names for this status code, details text and RPC (REFUSED when no row matches)."""
    text = first_line(details or "").lower()
    for rule in RULES:
        if rule.matches(code, text, method):
            return rule.failure
    return Failure.REFUSED


def to_error(
    failure: Failure, text: str, *, method: str, mutating: bool, throttle_backoff: float, what: str = ""
) -> GatewayError:
    """The engine error for a failure. `text`: the scrubbed server text; `what`: what was being done, for
    REFUSED (e.g. "the image poster.jpg"), so a refused part says which part and why."""
    shown = text or "no details"
    if method in NOT_A_DELIVERY and failure in NOT_DELIVERED_RETRIED:
        # Broken, timed out, cancelled or refused (the server's disk, a stream it could not read): nothing reached
        # anyone, so the send is tried again later; the dispatcher's retry limit ends it if this keeps happening.
        return TransientError(f"not sent: the upload of {what or 'a file'} to WorkPro failed ({shown})")
    if failure is Failure.RATE_LIMITED:
        return RateLimitedError(f"WorkPro is throttling requests ({shown}); slow down", retry_after=throttle_backoff)
    if failure is Failure.AUTH:
        return AuthError(
            tr(
                "the WorkPro puppet rejected the token (UNAUTHENTICATED): check workpro.token "
                "(or WECAST_WORKPRO_TOKEN) and that it is a puppet_workpro_… token for this server"
            )
        )
    if failure is Failure.NOT_LOGGED_IN:
        return NotLoggedInError(tr("the WorkPro account is not logged in ({text})", text=shown))
    if failure is Failure.TIMEOUT:
        if mutating:
            return UnknownOutcomeError(f"WorkPro {method} timed out after the request was sent; it may have been done")
        return TransientError(f"WorkPro {method} timed out")
    if failure is Failure.BROKEN:
        if mutating:
            return UnknownOutcomeError(
                f"the connection to WorkPro broke during {method} ({shown}); it may have been done"
            )
        return TransientError(f"the connection to WorkPro broke during {method} ({shown})")
    if failure is Failure.UNAVAILABLE:
        return TransientError(f"WorkPro is unavailable ({shown})")
    if failure is Failure.CANCELLED:
        if mutating:
            return UnknownOutcomeError(f"WorkPro {method} was cancelled mid-call; it may have been done")
        return TransientError(f"WorkPro {method} was cancelled")
    if failure is Failure.STREAM_TAKEN:
        return TransientError(
            tr(
                "another client is already connected with this WorkPro token (one event stream is allowed); "
                "stop it, or wait for its connection to time out"
            )
        )
    if failure is Failure.UNSUPPORTED:
        return PermanentError(f"this WorkPro server does not offer {method} ({shown})")
    if failure in (Failure.WRONG_CODE, Failure.TOO_MANY_TRIES):
        return PermanentError(tr("WorkPro did not accept the verification code: {text}", text=shown))
    return PermanentError(f"WorkPro refused {what}: {shown}" if what else f"WorkPro {method} failed: {shown}")


def map_rpc_error(
    code: Code | None,
    details: str | None,
    *,
    method: str,
    mutating: bool,
    throttle_backoff: float,
    secrets: Iterable[str] = (),
    what: str = "",
) -> GatewayError:
    """A gRPC failure (status code and details) as the engine's error: `classify`, then `to_error`."""
    failure = classify(code, details, method)
    text = server_text(details, secrets)
    return to_error(failure, text, method=method, mutating=mutating, throttle_backoff=throttle_backoff, what=what)

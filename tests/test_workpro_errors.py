"""The WorkPro error table (`engine.gateways.workpro.rpc_errors`): gRPC status codes and details texts in, the
engine's error kinds out — pure, no server. Each row is a failure seen from WorkPro or juzi's open-source server
(`shared/reference/workpro_puppet.md` §6, §8.9)."""

from __future__ import annotations

import grpc
import pytest

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
from engine.gateways.workpro.rpc_errors import RULES, Failure, classify, map_rpc_error

TOKEN = "puppet_workpro_s3cr3t7f0e9d8c7b6a5"
JS = "\n    at PuppetWorkPro.messageSendText (/app/node_modules/@juzi/puppet-workpro/dist/cjs/src/puppet.js:233:17)"
C = grpc.StatusCode

# (status code, details, method, mutating) -> (failure, engine error type)
CASES: list[tuple[grpc.StatusCode, str, str, bool, Failure, type[GatewayError]]] = [
    (
        C.INTERNAL,
        "WorkproErrorCode: 20001, Feature temporarily unavailable.",
        "MessageSendText",
        True,
        Failure.RATE_LIMITED,
        RateLimitedError,
    ),
    (
        C.UNKNOWN,
        "Error: WorkproErrorCode: 20001, Feature temporarily unavailable." + JS,
        "MessageSendFile",
        True,
        Failure.RATE_LIMITED,
        RateLimitedError,
    ),
    (C.RESOURCE_EXHAUSTED, "quota exhausted", "MessageSendText", True, Failure.RATE_LIMITED, RateLimitedError),
    (
        C.RESOURCE_EXHAUSTED,
        "Received message larger than max (90000000 vs. 83886080)",
        "MessageSendFile",
        True,
        Failure.REFUSED,
        PermanentError,
    ),
    (C.UNAUTHENTICATED, f'Invalid Wechaty TOKEN "{TOKEN}"', "Start", False, Failure.AUTH, AuthError),
    (C.UNKNOWN, f'Invalid Wechaty TOKEN "{TOKEN}"', "ContactList", False, Failure.AUTH, AuthError),
    (C.UNAUTHENTICATED, "No Authorization found.", "Event", False, Failure.AUTH, AuthError),
    (
        C.UNKNOWN,
        "Error: not logged in, no this.__currentUserId yet." + JS,
        "MessageSendText",
        True,
        Failure.NOT_LOGGED_IN,
        NotLoggedInError,
    ),
    (C.INTERNAL, "账号未登录", "ContactList", False, Failure.NOT_LOGGED_IN, NotLoggedInError),
    (C.DEADLINE_EXCEEDED, "Deadline Exceeded", "MessageSendText", True, Failure.TIMEOUT, UnknownOutcomeError),
    (C.DEADLINE_EXCEEDED, "Deadline Exceeded", "ContactList", False, Failure.TIMEOUT, TransientError),
    (C.UNAVAILABLE, "Socket closed", "MessageSendUrl", True, Failure.BROKEN, UnknownOutcomeError),
    (C.UNAVAILABLE, "Stream removed", "MessageSendText", True, Failure.BROKEN, UnknownOutcomeError),
    (C.UNAVAILABLE, "Socket closed", "ContactList", False, Failure.BROKEN, TransientError),
    (
        C.INTERNAL,
        "Received RST_STREAM with error code 2",
        "MessageSendText",
        True,
        Failure.BROKEN,
        UnknownOutcomeError,
    ),
    # the service restarted with the send in flight (what tests/test_workpro.py's restart sees): maybe sent
    (C.UNAVAILABLE, "Cancelling all calls", "MessageSendText", True, Failure.BROKEN, UnknownOutcomeError),
    (C.UNAVAILABLE, "keepalive watchdog timeout", "MessageSendFile", True, Failure.BROKEN, UnknownOutcomeError),
    (
        C.UNAVAILABLE,
        "failed to connect to all addresses; last error: Connection refused",
        "MessageSendText",
        True,
        Failure.UNAVAILABLE,
        TransientError,
    ),
    (
        C.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNAVAILABLE: Socket closed",
        "MessageSendText",
        True,
        Failure.UNAVAILABLE,
        TransientError,
    ),
    (C.UNAVAILABLE, "", "MessageSendText", True, Failure.UNAVAILABLE, TransientError),
    (C.CANCELLED, "Cancelled", "MessageSendMiniProgram", True, Failure.CANCELLED, UnknownOutcomeError),
    (C.CANCELLED, "Cancelled", "TagTagList", False, Failure.CANCELLED, TransientError),
    (
        C.ALREADY_EXISTS,
        "GrpcServerImpl.event() can not call twice.",
        "Event",
        False,
        Failure.STREAM_TAKEN,
        TransientError,
    ),
    (C.ALREADY_EXISTS, "tag already exists", "TagTagAdd", True, Failure.REFUSED, PermanentError),
    (C.UNIMPLEMENTED, "Method not found!", "BatchContactPayload", False, Failure.UNSUPPORTED, PermanentError),
    (
        C.UNKNOWN,
        "TypeError: this.puppet.batchContactPayload is not a function" + JS,
        "BatchContactPayload",
        False,
        Failure.UNSUPPORTED,
        PermanentError,
    ),
    (C.INTERNAL, "Invalid verify code!", "EnterVerifyCode", False, Failure.WRONG_CODE, PermanentError),
    (C.INTERNAL, "验证码错误输入错误，请重新输入", "EnterVerifyCode", False, Failure.WRONG_CODE, PermanentError),
    (
        C.INTERNAL,
        "验证码错误次数超过阈值，请重新扫码",
        "EnterVerifyCode",
        False,
        Failure.TOO_MANY_TRIES,
        PermanentError,
    ),
    # The verify-code texts mean something only for EnterVerifyCode.
    (C.INTERNAL, "too many members", "MessageSendText", True, Failure.REFUSED, PermanentError),
    (
        C.UNKNOWN,
        "Error: conversation 7881 not found" + JS,
        "MessageSendText",
        True,
        Failure.REFUSED,
        PermanentError,
    ),
    (
        C.INTERNAL,
        "WorkproErrorCode: 23060, cgi error code: (-4048)",
        "MessageSendFile",
        True,
        Failure.REFUSED,
        PermanentError,
    ),
    # An Upload delivers nothing: however it fails, the send is safe to retry (TransientError, never unknown).
    (C.UNAVAILABLE, "Connection reset by peer", "Upload", False, Failure.BROKEN, TransientError),
    (C.DEADLINE_EXCEEDED, "Deadline Exceeded", "Upload", False, Failure.TIMEOUT, TransientError),
    (C.UNKNOWN, "Error: ENOSPC: no space left on device, write", "Upload", False, Failure.REFUSED, TransientError),
    (C.UNIMPLEMENTED, "Method not found!", "Upload", False, Failure.UNSUPPORTED, PermanentError),
    # gRPC's client failing to write on a call that just ended: the call broke; for a send, maybe delivered.
    (C.INTERNAL, "Internal error from Core", "Upload", False, Failure.BROKEN, TransientError),
    (C.INTERNAL, "Internal error from Core", "MessageSendFile", True, Failure.BROKEN, UnknownOutcomeError),
]


@pytest.mark.parametrize(("code", "details", "method", "mutating", "failure", "expected"), CASES)
def test_error_table(
    code: grpc.StatusCode,
    details: str,
    method: str,
    mutating: bool,
    failure: Failure,
    expected: type[GatewayError],
) -> None:
    """Each known failure is classified by code and details text, and becomes the engine error that tells the
    sender what to do; the message is one line, with no stack trace and no token."""
    assert classify(code, details, method) is failure
    error = map_rpc_error(code, details, method=method, mutating=mutating, throttle_backoff=7.0, secrets=[TOKEN])
    assert type(error) is expected
    text = str(error)
    assert TOKEN not in text
    assert "\n" not in text
    assert " at " not in text
    if isinstance(error, RateLimitedError):
        assert error.retry_after == 7.0


def test_every_rule_is_reached() -> None:
    """No row of the table is dead or shadowed by the rows above it: each is the first match of some case."""
    first_matches = set()
    for code, details, method, *_ in CASES:
        text = first_line(details).lower()
        first_matches.add(next((i for i, rule in enumerate(RULES) if rule.matches(code, text, method)), None))
    assert first_matches - {None} == set(range(len(RULES)))


def test_refusal_names_the_part_and_the_server_reason() -> None:
    """A refused send names what was refused and keeps the server's own reason (its first line, no stack)."""
    error = map_rpc_error(
        C.INTERNAL,
        "WorkproErrorCode: 23060, cgi error code: (-4048)" + JS,
        method="MessageSendFile",
        mutating=True,
        throttle_backoff=30.0,
        what="the image poster.jpg",
    )
    assert type(error) is PermanentError
    assert str(error) == "WorkPro refused the image poster.jpg: WorkproErrorCode: 23060, cgi error code: (-4048)"

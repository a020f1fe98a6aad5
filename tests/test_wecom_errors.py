"""The errcode table: each code maps to the engine error that makes the dispatcher do the right thing, with a
stable reason code, and the messages never carry a request (or its token)."""

from __future__ import annotations

import pytest

from engine.errors import (
    AuthError,
    GatewayError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from engine.gateways.wecom.errors import CODES, Handling, error_for, short_errmsg
from engine.outcome import Verdict, classify

ERRMSG = "api freq out of limit, hint: [1700000000_12_abc], from ip: 203.0.113.9, more info at https://open.work.weixin.qq.com/devtool/query?e=45009"

CASES = [
    # errcode, engine class, dispatcher verdict, reason code
    (40001, AuthError, Verdict.HALT, "bad_secret"),
    (40013, AuthError, Verdict.HALT, "bad_corp_id"),
    (48002, AuthError, Verdict.HALT, "api_forbidden"),
    (60020, AuthError, Verdict.HALT, "ip_not_trusted"),
    (45009, RateLimitedError, Verdict.RETRY, "rate_limited"),
    (45033, RateLimitedError, Verdict.RETRY, "too_concurrent"),
    (-1, TransientError, Verdict.RETRY, "busy"),
    (41063, TransientError, Verdict.RETRY, "task_dispatching"),
    (84061, PermanentError, Verdict.FAILED, "not_friend"),
    (40096, PermanentError, Verdict.FAILED, "unknown_contact"),
    (41050, PermanentError, Verdict.FAILED, "welcome_code_invalid"),
    (41094, PermanentError, Verdict.FAILED, "remind_limit"),
    (41064, PermanentError, Verdict.FAILED, "too_many_attachments"),
]


@pytest.mark.parametrize(("errcode", "kind", "verdict", "reason_code"), CASES)
def test_errcodes_map_to_engine_errors(
    errcode: int, kind: type[GatewayError], verdict: Verdict, reason_code: str
) -> None:
    """Each errcode becomes its engine error, which the one outcome classifier turns into the right verdict."""
    error = error_for("externalcontact/add_msg_template", errcode, "whatever")
    assert isinstance(error, kind)
    assert getattr(error, "reason_code", None) == reason_code
    assert getattr(error, "errcode", None) == errcode
    assert classify(error, timeout=30).verdict is verdict
    assert f"errcode {errcode}" in str(error)
    assert "externalcontact/add_msg_template" in str(error)


def test_45009_waits_the_configured_block() -> None:
    """45009 says to retry after the rate-limit wait (WeCom blocks a minute limit for 60 s); 45033 after a short one."""
    slow = error_for("x", 45009, ERRMSG, rate_limit_wait=60, concurrency_wait=1.5)
    busy = error_for("x", 45033, "", rate_limit_wait=60, concurrency_wait=1.5)
    assert isinstance(slow, RateLimitedError) and slow.retry_after == 60
    assert isinstance(busy, RateLimitedError) and busy.retry_after == 1.5


def test_an_unknown_errcode_is_permanent_and_named() -> None:
    """A code not in the table fails the item with the code and WeCom's phrase, without the hint and IP tail."""
    error = error_for("externalcontact/get", 99999, "something new, hint: [x], from ip: 203.0.113.9, more info at y")
    assert isinstance(error, PermanentError)
    assert "99999" in str(error) and "something new" in str(error)
    assert "203.0.113.9" not in str(error)


def test_every_row_has_a_meaning_and_a_reason_code() -> None:
    """No row of the table is left without words for people and a code for machines; token codes are there."""
    assert all(code.meaning and code.reason_code for code in CODES.values())
    assert {c for c, row in CODES.items() if row.handling is Handling.REFRESH_TOKEN} == {40014, 42001, 41001}


def test_short_errmsg_cuts_the_tail() -> None:
    """WeCom's errmsg keeps its phrase only."""
    assert short_errmsg(ERRMSG) == "api freq out of limit"

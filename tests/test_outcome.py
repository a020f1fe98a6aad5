"""One outcome classifier for both send paths, one backoff formula, one pair of status sets."""

from __future__ import annotations

import random

import pytest

from engine.backoff import backoff_delay
from engine.errors import (
    AuthError,
    GatewayError,
    NotLoggedInError,
    PermanentError,
    RateLimitedError,
    TransientError,
    UnknownOutcomeError,
    WecastError,
)
from engine.outcome import Verdict, classify
from storage.models import OPEN_STATUSES, TERMINAL_STATUSES, DeliveryStatus


@pytest.mark.parametrize(
    ("exc", "verdict", "retry_after", "slow_down", "logged_out"),
    [
        (TimeoutError(), Verdict.UNKNOWN, None, False, False),
        (RateLimitedError("slow down", retry_after=7.0), Verdict.RETRY, 7.0, True, False),
        (NotLoggedInError("logged out"), Verdict.REQUEUE, None, False, True),
        (AuthError("token refused"), Verdict.HALT, None, False, False),
        (TransientError("blip"), Verdict.RETRY, None, False, False),
        (UnknownOutcomeError("maybe"), Verdict.UNKNOWN, None, False, False),
        (PermanentError("not a friend"), Verdict.FAILED, None, False, False),
        (GatewayError("odd"), Verdict.FAILED, None, False, False),
        (RuntimeError("bug"), Verdict.UNKNOWN, None, False, False),
        (WecastError("not a gateway error"), Verdict.UNKNOWN, None, False, False),
    ],
)
def test_classify_table(
    exc: Exception, verdict: Verdict, retry_after: float | None, slow_down: bool, logged_out: bool
) -> None:
    """Each kind of failure maps to the verdict of the outcome table (first match wins: an AuthError is a
    PermanentError but halts the run; a RateLimitedError is transient but slows every send)."""
    outcome = classify(exc, timeout=30)
    assert (outcome.verdict, outcome.retry_after, outcome.slow_down, outcome.logged_out) == (
        verdict,
        retry_after,
        slow_down,
        logged_out,
    )
    assert outcome.reason


def test_classify_says_why() -> None:
    """A timeout names the send timeout; an unexpected exception names its type; gateway errors keep their text."""
    assert "within 30s" in classify(TimeoutError(), timeout=30).reason
    assert classify(KeyError("x"), timeout=1).reason == "unexpected error: KeyError: 'x'"
    assert classify(PermanentError("not a friend"), timeout=1).reason == "not a friend"


def test_backoff_doubles_up_to_the_cap_with_equal_jitter() -> None:
    """Delays double per retry up to the cap, stay within [step/2, step], and repeat exactly for one seed."""
    rng = random.Random(7)
    delays = [backoff_delay(n, base=1.0, cap=10.0, rng=rng) for n in range(8)]
    for n, delay in enumerate(delays):
        step = min(10.0, 2.0**n)
        assert step / 2 <= delay <= step
    again = random.Random(7)
    assert delays == [backoff_delay(n, base=1.0, cap=10.0, rng=again) for n in range(8)]
    assert backoff_delay(10_000, base=1.0, cap=60.0, rng=rng) <= 60.0  # huge retry counts do not overflow


def test_every_status_is_open_or_terminal_never_both() -> None:
    """OPEN_STATUSES and TERMINAL_STATUSES split the delivery states: `submitted` is open, not forgotten."""
    assert set(DeliveryStatus) == OPEN_STATUSES | TERMINAL_STATUSES
    assert not OPEN_STATUSES & TERMINAL_STATUSES
    assert DeliveryStatus.SUBMITTED in OPEN_STATUSES

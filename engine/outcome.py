"""What the result of a gateway call means for its deliveries: one classifier for every send path.

Both the direct path (`send_text`, one delivery per call) and the batch path (`submit_batch`, a 群发 task
for many deliveries) turn whatever a gateway call raised into an `Outcome` with `classify`, and act on it
in one place (`engine.dispatch`). The table (first match wins):

    raised                           verdict   the delivery                        the run
    TimeoutError (send_timeout)      UNKNOWN   unknown: the request may have left  -
    RateLimitedError                 RETRY     pending, after `retry_after`        every send slows down
    NotLoggedInError                 REQUEUE   pending; not an attempt             waits for a login
    AuthError                        HALT      pending; not an attempt             paused with the reason
    TransientError                   RETRY     pending, after a backoff            -
    UnknownOutcomeError              UNKNOWN   unknown                             -
    DatabaseError (the gateway's     REQUEUE   pending; not an attempt             stops: the error is raised
      own store: its disk full)                                                    once sends in flight are recorded
    any other GatewayError           FAILED    failed with the reason              counts toward max_errors
    any other Exception              UNKNOWN   unknown: a bug behind the gateway   -
                                               boundary, and the request may have left

A RETRY whose attempts are used up becomes FAILED (`dispatch` decides: it knows the attempt count).
`BaseException`s that are not `Exception`s (cancellation, KeyboardInterrupt) are not classified: they end the
process or the task, and the rows they leave `sending` are settled by crash recovery.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from engine.errors import (
    AuthError,
    DatabaseError,
    GatewayError,
    NotLoggedInError,
    RateLimitedError,
    TransientError,
    UnknownOutcomeError,
)


class Verdict(StrEnum):
    """What to do with the deliveries of a failed gateway call."""

    RETRY = "retry"  # try again later (backoff, or the gateway's retry_after)
    REQUEUE = "requeue"  # nothing was sent and it was not the delivery's fault: back to pending, no attempt used
    HALT = "halt"  # nothing can be sent at all: requeue, and pause the run
    UNKNOWN = "unknown"  # it may have been delivered: never retried silently
    FAILED = "failed"  # it will never work: failed, with the reason


@dataclass(frozen=True)
class Outcome:
    """The classified result of one gateway call that did not succeed."""

    verdict: Verdict
    reason: str
    retry_after: float | None = None  # RETRY: the gateway said how long to wait (None: back off)
    slow_down: bool = False  # the gateway is throttling us: every send of the run slows down
    logged_out: bool = False  # the account is logged out: hold every send until it logs in again
    stop: bool = False  # nothing can be sent or recorded (a full disk): stop the run and raise the error


def classify(exc: BaseException, *, timeout: float) -> Outcome:
    """The outcome of a gateway call that raised `exc` (see the module docstring); `timeout` is the
    send timeout that a TimeoutError means was exceeded."""
    if isinstance(exc, TimeoutError):
        return Outcome(Verdict.UNKNOWN, f"no answer from the gateway within {timeout:g}s; it may have been delivered")
    if isinstance(exc, RateLimitedError):
        return Outcome(Verdict.RETRY, str(exc), retry_after=exc.retry_after, slow_down=True)
    if isinstance(exc, NotLoggedInError):
        return Outcome(Verdict.REQUEUE, str(exc), logged_out=True)
    if isinstance(exc, AuthError):
        return Outcome(Verdict.HALT, str(exc))
    if isinstance(exc, TransientError):
        return Outcome(Verdict.RETRY, str(exc))
    if isinstance(exc, UnknownOutcomeError):
        return Outcome(Verdict.UNKNOWN, str(exc))
    if isinstance(exc, DatabaseError):
        return Outcome(Verdict.REQUEUE, str(exc), stop=True)
    if isinstance(exc, GatewayError):
        return Outcome(Verdict.FAILED, str(exc))
    return Outcome(Verdict.UNKNOWN, f"unexpected error: {type(exc).__name__}: {exc}")

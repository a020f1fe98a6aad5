"""The exception tree. Every error a user can cause says *where* (file, line, field) and *why*.

WecastError                       base; `str(e)` is the one-line message the CLI prints
├── ConfigError                   config.yaml or environment is wrong (file, line, field)
├── CampaignError                 a campaign file is wrong (file, line, field)
│   └── TemplateError             a message template does not compile or render
├── AudienceError                 a rule cannot be evaluated against the data
├── NotFoundError                 a campaign, run, contact or delivery does not exist
├── LoginError                    login flow misuse: wrong verify code, expired QR, ...
├── RunBusyError                  another live process is sending that run: leave it to that process (or
│                                 stop it first); `wecast run --resume` goes on with the other runs
├── DatabaseError                 a database failed (full, locked too long, unreadable, written by a newer
│                                 wecast): nothing of that step was written; the message says what to do
│                                 (`engine.dberrors` words wecast's own database's failures)
└── GatewayError                  a gateway call failed; `kind` tells the sender what to do
    ├── TransientError            retry with backoff (network blip, 5xx, UNAVAILABLE)
    │   └── RateLimitedError      retry after `retry_after` seconds and slow down
    ├── NotLoggedInError          nothing can be sent until the account logs in again
    ├── PermanentError            this recipient/message will never work (not a friend, bad id)
    │   └── AuthError             the gateway refused our credentials (token, secret): nothing will
    │                             work until the configuration is fixed; stop sending, keep the rest
    └── UnknownOutcomeError       the gateway may or may not have delivered (timeout after
                                  the request left); never retried silently
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class WecastError(Exception):
    """Base class for every error wecast raises on purpose."""


@dataclass(frozen=True)
class Location:
    """Where in a user's file something is wrong."""

    file: str | None = None
    line: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = self.file or "<input>"
        if self.line is not None:
            where += f":{self.line}"
        if self.field:
            where += f": {self.field}"
        return where


class LocatedError(WecastError):
    """An error in a user's file: the message starts with `file:line: field:`."""

    def __init__(self, message: str, location: Location | None = None) -> None:
        self.location = location or Location()
        self.reason = message
        super().__init__(f"{self.location}: {message}" if location else message)


class ConfigError(LocatedError):
    """config.yaml or an environment variable is invalid."""


class CampaignError(LocatedError):
    """A campaign file is invalid. `problems` holds every problem found, not just the first."""

    def __init__(self, message: str, location: Location | None = None, problems: Sequence[CampaignError] = ()) -> None:
        super().__init__(message, location)
        self.problems: list[CampaignError] = list(problems) or [self]


class TemplateError(CampaignError):
    """A message template does not compile, names an unknown field, or lacks data for some recipients."""


class AudienceError(WecastError):
    """An audience rule cannot be evaluated."""


class NotFoundError(WecastError):
    """A campaign, run, contact or delivery that was asked for does not exist."""


class LoginError(WecastError):
    """The login flow was used wrongly: wrong verify code, no QR pending, too many tries."""

    def __init__(self, message: str, *, tries_left: int | None = None) -> None:
        super().__init__(message)
        self.tries_left = tries_left


class RunBusyError(WecastError):
    """Another live process is sending the run (or took it over a moment ago): nothing was done to it here."""


class DatabaseError(WecastError):
    """A database could not do what was asked: wecast's own (`engine.dberrors.explain` words `storage`'s errors) or
    one a gateway keeps (the sandbox's state file). Nothing of that step was written. `kind` is the machine-readable
    cause (`storage.errors.Failure`'s values: full, busy, unavailable, unreachable, schema_newer, schema_unreadable,
    migration)."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class GatewayError(WecastError):
    """A gateway call failed. Subclasses tell the sender whether and when to retry."""

    kind = "failed"


class TransientError(GatewayError):
    """Worth retrying later: a network blip, a 5xx, gRPC UNAVAILABLE before the request was sent."""

    kind = "transient"


class RateLimitedError(TransientError):
    """The gateway or WeCom is throttling us: wait `retry_after` seconds, and slow down."""

    kind = "rate_limited"

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotLoggedInError(GatewayError):
    """The account is logged out: hold sends until it logs in again."""

    kind = "not_logged_in"


class PermanentError(GatewayError):
    """This send will never succeed (unknown contact, not a friend, message rejected)."""

    kind = "failed"


class AuthError(PermanentError):
    """The gateway refused our credentials (a wrong or expired token or secret). No send can succeed until the
    configuration is fixed: a run stops (paused, its deliveries still pending) instead of failing them all."""

    kind = "auth"


class UnknownOutcomeError(GatewayError):
    """The request may have reached WeCom: retrying could send twice, so it is recorded as unknown."""

    kind = "unknown"

"""The WeCom server API over httpx: one access token per app, every answer's errcode checked, a limiter per API.

* **Token.** Fetched with `gettoken` on first use and cached until shortly before `expires_in`. When a call answers
  40014 / 42001 / 41001 / 40001 (`errors.TOKEN_REFUSED`) the token is dropped (only if it is still the current one)
  and fetched again — by one caller only (a lock: many calls failing together cause one `gettoken`) — and the call
  is retried once. A `gettoken` refused for the credentials (40001 / 40013 / 40091) is fatal: every later call
  raises the same `AuthError` without asking WeCom again until `reset()` (WeCom blocks an IP for an hour after
  repeated secret errors). Each process keeps its own token in memory, never on disk: WeCom answers `gettoken` with
  the token still valid (reference §1), so processes sharing the state file do not end each other's, and one whose
  token is refused refreshes its own (once, as above).
* **Errcodes.** HTTP 200 with a non-zero errcode is an error, mapped by `errors.error_for` (one table). -1, 6000,
  41063, 45009 and 45033 are retried inside the call (up to `max_retries`) before the error is raised to the caller.
* **HTTP 429 and 5xx** (WeCom's front end, or a proxy before it). A 429 refused the request before anything was
  done, so it is retried for every call; a 5xx only for calls safe to repeat (for the others it may have taken
  effect: `UnknownOutcomeError`). Both honour `Retry-After` (seconds or an HTTP-date).
* **Waits** (`_wait`, the one policy for every retry inside a call): the backoff of `engine.backoff` from
  `retry_delay` (45009: `rate_limit_wait`, the minute WeCom blocks), at least what `Retry-After` asked, and never
  more than `rate_limit_wait` for one retry. When the retries run out, the error raised carries `retry_after` — what
  the server asked, bounded by `MAX_RETRY_AFTER` — and the dispatcher waits that long (its attempts are counted: a
  delivery whose attempts run out ends `failed`, never left pending). Inside `waiting_at_most(seconds)` — the
  gateway's sends, which the dispatcher times with `sending.send_timeout` and records `unknown` past it — the waits
  of every call add up to at most that: a retry that would wait longer raises its error now, for the dispatcher to
  reschedule (a 45009 minute waited out inside a 30-second send_timeout would leave a refused task unknown).
* **Answers** are checked before the caller sees them: a body that is not a JSON object (an HTML page from a proxy,
  an empty or cut-off body) is an error like a 5xx; so is an errcode 0 answer without a list the API always
  returns, or with one of the wrong type (`ANSWER_LISTS`): WeCom answering "ok" without `external_contact_list`
  must never read as "no customers". Calls safe to repeat are retried; then a TransientError naming the API and
  the field.
* **Transport.** A connection that never opened is retried like -1. A request that left but got no (or a garbled)
  answer is retried only for calls that are safe to repeat (`idempotent=True`); for the others it raises
  `UnknownOutcomeError`, and the caller decides (the 群发 path looks for the task it may have created).
* **Limits.** `limiter.ApiLimiter`, per API, from `wecom.limits`.
* **Secrets.** The corpid and secret go only into `gettoken`'s query, the token only into query strings; no message
  this module raises or logs contains a request, and httpx's own request log lines have these values masked.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from engine.backoff import backoff_delay
from engine.clock import Clock
from engine.errors import (
    AuthError,
    GatewayError,
    PermanentError,
    RateLimitedError,
    TransientError,
    UnknownOutcomeError,
)
from engine.gateways.wecom.errors import (
    TOKEN_REFUSED,
    Handling,
    WecomAnswerError,
    WecomHttpError,
    error_for,
    handling_of,
)
from engine.gateways.wecom.limiter import ApiLimiter, Window
from engine.settings import WecomSettings

log = logging.getLogger("wecast.wecom")

JSON = dict[str, Any]
MAX_RETRY_AFTER = 600.0  # seconds: a longer Retry-After is cut to this (a run never waits an hour on one header)
# The lists each API always returns when its errcode is 0 (shared/reference/wecom_api.md §2-§4: WeCom sends them,
# empty when there is nothing, even beside most errcodes). An answer without one is refused, never read as empty.
ANSWER_LISTS: dict[str, tuple[str, ...]] = {
    "externalcontact/get_follow_user_list": ("follow_user",),
    "externalcontact/list": ("external_userid",),
    "externalcontact/get": ("follow_user",),
    "externalcontact/batch/get_by_user": ("external_contact_list",),
    "externalcontact/get_corp_tag_list": ("tag_group",),
    "externalcontact/get_groupmsg_list_v2": ("group_msg_list",),
    "externalcontact/get_groupmsg_task": ("task_list",),
    "externalcontact/get_groupmsg_send_result": ("send_list",),
}
_SECRET_PARAMS = re.compile(r"((?:access_token|corpsecret|corpid|key)=)[^&\s\"']+", re.IGNORECASE)


@dataclass
class _Budget:
    left: float  # seconds of retry waits the calls inside `waiting_at_most` may still spend


_budget: ContextVar[_Budget | None] = ContextVar("wecom_wait_budget", default=None)


@contextmanager
def waiting_at_most(seconds: float) -> Iterator[None]:
    """The calls made inside (in this task) spend at most `seconds` waiting to retry, all together; a retry that
    would wait past that raises its error at once (see the module docstring)."""
    token = _budget.set(_Budget(seconds))
    try:
        yield
    finally:
        _budget.reset(token)


def _spend(wait: float) -> bool:
    """Whether a retry may wait `wait` seconds within the current budget (and spend them); True without one."""
    budget = _budget.get()
    if budget is None:
        return True
    if wait > budget.left:
        return False
    budget.left -= wait
    return True


def redact(text: str) -> str:
    """`text` with the values of access_token, corpsecret, corpid and key query parameters masked."""
    return _SECRET_PARAMS.sub(r"\1***", text)


class _RedactQueryStrings(logging.Filter):
    """Masks secrets in the URLs that httpx logs for every request ("HTTP Request: GET https://…?access_token=…")."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(str(a)) if isinstance(a, httpx.URL | str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def install_log_redaction() -> None:
    """Put the masking filter on httpx's logger (once)."""
    logger = logging.getLogger("httpx")
    if not any(isinstance(f, _RedactQueryStrings) for f in logger.filters):
        logger.addFilter(_RedactQueryStrings())


class WecomClient:
    """Calls to `{base_url}/cgi-bin/{api}` for one app (corpid + secret)."""

    def __init__(
        self,
        settings: WecomSettings,
        clock: Clock,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.rng = rng or random.Random()
        limits = settings.limits
        self.limiter = ApiLimiter(
            clock, [Window(limits.per_minute, 60.0), Window(limits.per_hour, 3600.0)], limits.concurrency
        )
        self.calls: Counter[str] = Counter()  # calls made per API (the answers WeCom gave, including errors)
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._token: str | None = None
        self._token_until = 0.0
        self._token_lock: asyncio.Lock | None = None  # made in the running loop
        self._refused: AuthError | None = None
        install_log_redaction()

    def __repr__(self) -> str:
        return f"WecomClient({self.settings.base_url!r})"

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                base_url=self.settings.base_url.rstrip("/") + "/cgi-bin/",
                transport=self._transport,
                timeout=self.settings.call_timeout.total_seconds(),
                trust_env=False,
            )
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def reset(self) -> None:
        """Forget the token and any refusal of the credentials (after the configuration was fixed, or a logout)."""
        self._token = None
        self._token_until = 0.0
        self._refused = None

    @property
    def has_token(self) -> bool:
        return self._token is not None and self.clock.monotonic() < self._token_until

    # -- the token -------------------------------------------------------------------------------
    async def token(self) -> str:
        """A valid access token (fetched when there is none, or it is about to expire)."""
        if self._refused is not None:
            raise self._refused
        if self.has_token and self._token:
            return self._token
        if self._token_lock is None:
            self._token_lock = asyncio.Lock()
        async with self._token_lock:
            if self._refused is not None:
                raise self._refused
            if self.has_token and self._token:
                return self._token
            corp_id, secret = self.settings.corp_id, self.settings.secret
            if corp_id is None or secret is None:
                raise AuthError(
                    "gateway wecom needs wecom.corp_id and wecom.secret "
                    "(or WECAST_WECOM_CORP_ID and WECAST_WECOM_SECRET)"
                )
            params = {"corpid": corp_id.get_secret_value(), "corpsecret": secret.get_secret_value()}
            try:
                data = await self._call("gettoken", "GET", params=params, with_token=False, idempotent=True)
            except AuthError as exc:
                self._refused = exc
                raise
            token = data.get("access_token")
            if not isinstance(token, str) or not token.strip():
                what = "without an access_token" if not token else f"an access_token that is a {type(token).__name__}"
                raise WecomAnswerError(f"WeCom gettoken answered ok, but {what}", "gettoken", "access_token")
            expires = data.get("expires_in")
            expires_in = float(str(expires)) if _numeric(expires) and float(str(expires)) > 0 else 7200.0
            # Refresh a little early (WeCom may also drop a token sooner: a call then refreshes it).
            self._token = token
            self._token_until = self.clock.monotonic() + max(1.0, expires_in - min(300.0, expires_in / 10))
            log.info("WeCom: new access token, valid %.0fs", expires_in)
            return token

    def _drop_token(self, token: str) -> None:
        if self._token == token:
            self._token = None
            self._token_until = 0.0

    # -- calls -----------------------------------------------------------------------------------
    async def get(self, api: str, params: dict[str, str] | None = None) -> JSON:
        """A GET (reads only: always safe to repeat)."""
        return await self._call(api, "GET", params=params, idempotent=True)

    async def post(self, api: str, body: JSON, *, idempotent: bool = True) -> JSON:
        """A POST with a JSON body. `idempotent=False` for calls that must not be repeated blindly."""
        return await self._call(api, "POST", body=body, idempotent=idempotent)

    async def webhook(self, key: str, body: JSON) -> JSON:
        """A group robot's `webhook/send` (its key is its credential: no access token; masked in httpx's log)."""
        return await self._call(
            "webhook/send", "POST", params={"key": key}, body=body, with_token=False, idempotent=False
        )

    async def upload(self, media_type: str, filename: str, content: bytes, mime: str) -> JSON:
        """`media/upload` of one file (a new media id each time: repeating it only wastes an upload)."""
        files = {"media": (filename, content, mime or "application/octet-stream")}
        return await self._call("media/upload", "POST", params={"type": media_type}, files=files, idempotent=True)

    async def _call(
        self,
        api: str,
        method: str,
        *,
        params: dict[str, str] | None = None,
        body: JSON | None = None,
        files: dict[str, tuple[str, bytes, str]] | None = None,
        with_token: bool = True,
        idempotent: bool,
    ) -> JSON:
        token_retried = False
        retries = 0
        while True:
            token = await self.token() if with_token else None
            query = dict(params or {})
            if token is not None:
                query["access_token"] = token
            try:
                data = await self._send(api, method, query, body, files, idempotent=idempotent)
            except TransientError as exc:
                hint = exc.retry_after if isinstance(exc, WecomHttpError) else None
                wait = self._wait(Handling.RETRY, retries, hint)
                if retries >= self.settings.max_retries or not _spend(wait):
                    raise self._gave_up(exc, hint) from None
                log.warning("%s; retrying in %.1fs", exc, wait)
                await self.clock.sleep(wait)
                retries += 1
                continue
            errcode = _int(data.get("errcode"))
            if errcode == 0:
                return data
            errmsg = str(data.get("errmsg") or "")
            handling = handling_of(errcode)
            if errcode in TOKEN_REFUSED and token is not None:
                if token_retried:
                    raise AuthError(
                        f"WeCom {api}: a freshly fetched access token was refused too (errcode {errcode}); "
                        "check that wecom.secret belongs to the app that may call this API"
                    )
                log.info("WeCom %s: access token refused (errcode %s); fetching a new one", api, errcode)
                token_retried = True
                self._drop_token(token)
                continue
            retried = handling in (Handling.RATE_LIMITED, Handling.CONCURRENCY, Handling.RETRY)
            wait = self._wait(handling, retries, None) if retried and handling is not None else 0.0
            error = error_for(
                api,
                errcode,
                errmsg,
                rate_limit_wait=self.settings.rate_limit_wait.total_seconds(),
                concurrency_wait=wait,
            )
            if retried and retries < self.settings.max_retries and _spend(wait):
                log.warning("WeCom %s: %s; retrying in %.1fs", api, error, wait)
                await self.clock.sleep(wait)
                retries += 1
                continue
            raise error

    def _wait(self, handling: Handling, retries: int, hint: float | None) -> float:
        """Seconds before retry number `retries` (0 for the first) of a call that failed so (see the module
        docstring): the backoff from `retry_delay`, at least what `Retry-After` asked (`hint`), never more than
        `rate_limit_wait` (the cap) — which 45009 waits whole (WeCom blocks a minute limit for the minute: a shorter
        wait is only refused again)."""
        cap = max(self.settings.rate_limit_wait.total_seconds(), self.settings.retry_delay.total_seconds())
        if handling is Handling.RATE_LIMITED:
            return cap
        delay = backoff_delay(retries, base=self.settings.retry_delay.total_seconds(), cap=cap, rng=self.rng)
        return min(cap, max(delay, hint or 0.0))

    def _gave_up(self, exc: TransientError, hint: float | None) -> TransientError:
        """The error to raise when a call's retries are used up: a 429, or a 5xx that said when to come back, as a
        RateLimitedError whose `retry_after` (bounded by MAX_RETRY_AFTER) the dispatcher waits before its next
        attempt; anything else as it was."""
        if isinstance(exc, WecomHttpError) and (exc.status == 429 or hint is not None):
            wait = hint if hint is not None else self.settings.rate_limit_wait.total_seconds()
            return RateLimitedError(str(exc), retry_after=min(MAX_RETRY_AFTER, wait))
        return exc

    async def _send(
        self,
        api: str,
        method: str,
        query: dict[str, str],
        body: JSON | None,
        files: dict[str, tuple[str, bytes, str]] | None,
        *,
        idempotent: bool,
    ) -> JSON:
        """One HTTP exchange, its answer checked; transport failures mapped to engine errors (never showing the URL
        or the body: a proxy's error page may quote the request, token and all)."""
        try:
            async with self.limiter.call(api):
                response = await self.http.request(method, api, params=query, json=body, files=files)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise TransientError(f"WeCom {api}: could not connect ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise self._no_answer(api, f"no answer ({type(exc).__name__})", idempotent=idempotent) from None
        self.calls[api] += 1
        status = response.status_code
        if status == 429 or status >= 500:
            hint = retry_after(response.headers.get("retry-after"), self.clock.now())
            if status == 429:  # refused before anything was done: safe to repeat, writes included
                raise WecomHttpError(f"WeCom {api}: HTTP 429 (too many requests)", status, hint)
            if idempotent:
                raise WecomHttpError(f"WeCom {api}: HTTP {status}", status, hint)
            raise self._no_answer(api, f"HTTP {status}", idempotent=False)
        if status != 200:
            raise PermanentError(f"WeCom {api}: HTTP {status} (is wecom.base_url right?)")
        return self._answer(api, response, idempotent=idempotent)

    def _answer(self, api: str, response: httpx.Response, *, idempotent: bool) -> JSON:
        """The JSON object of a 200 answer, with an errcode, and (errcode 0) the lists `api` always returns."""
        what = ""
        try:
            data = response.json()
        except ValueError:
            kind = response.headers.get("content-type", "").split(";")[0].strip() or "no content type"
            what = "an empty answer" if not response.content.strip() else f"an answer that is not JSON ({kind})"
            data = None
        if not what and not isinstance(data, dict):
            what = f"a JSON {type(data).__name__}, not an object"
        if not what and isinstance(data, dict) and not _numeric(data.get("errcode")):
            what = "an answer without an errcode" if data.get("errcode") is None else "an errcode that is not a number"
        if what:
            if not idempotent:
                raise self._no_answer(api, what, idempotent=False)
            raise WecomAnswerError(f"WeCom {api}: {what}", api, "body")
        assert isinstance(data, dict)
        if _int(data.get("errcode")) == 0:
            for name in ANSWER_LISTS.get(api, ()):
                value = data.get(name)
                if not isinstance(value, list):
                    found = "is missing" if value is None else f"is a {type(value).__name__}, not a list"
                    raise WecomAnswerError(
                        f"WeCom {api} answered ok, but its {name} {found}: the answer is not used", api, name
                    )
        return data

    @staticmethod
    def _no_answer(api: str, what: str, *, idempotent: bool) -> GatewayError:
        if idempotent:
            return TransientError(f"WeCom {api}: {what}")
        return UnknownOutcomeError(f"WeCom {api}: the request was sent but got {what}; it may have taken effect")


def retry_after(value: str | None, now: datetime) -> float | None:
    """The seconds a Retry-After header asks for — a number of seconds, or an HTTP-date (`now`: the clock's time) —
    never negative; None when there is none, or it is neither."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        log.warning("WeCom: a Retry-After that is neither seconds nor a date: %r", text[:40])
        return None
    if when.tzinfo is None:  # an HTTP-date is in GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def _numeric(value: object) -> bool:
    """Whether an errcode is one (an int, or a string of one: WeCom's answers may quote numbers)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def _int(value: object) -> int:
    """An errcode `_answer` has checked (`_numeric`): an int, or a string of one."""
    return value if isinstance(value, int) else int(str(value).strip())

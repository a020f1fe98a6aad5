"""WeCom's errcodes -> the engine's error kinds: one table, one function (`error_for`), table-tested.

WeCom answers HTTP 200 with a non-zero `errcode` for every business error (shared/reference/wecom_api.md §6), so
every answer goes through `error_for` unless its errcode is 0. What the client and the dispatcher do per handling:

    handling        codes (examples)                       raised as            what happens
    REFRESH_TOKEN   40014 42001 41001                      (not raised)         token dropped, refetched, call
                                                                                retried once (then AuthError)
    CONFIG          40001 40013 40091 48002 60020 301002   AuthError            never retried (a wrong secret
                                                                                retried gets the IP blocked); the
                                                                                run pauses with sends pending

40001 is CONFIG from `gettoken`; from a call made with a token (`TOKEN_REFUSED`) it means the token's credential no
longer holds — the secret was reset, or WeCom dropped the token, since it was issued — so it is refreshed once like
42001: `gettoken` then answers for the secret itself (40001 again: fatal, one call, no loop).
    RATE_LIMITED    45009                                  RateLimitedError     wait `rate_limit_wait` (WeCom blocks
                                                                                a minute limit for 60 s), retry
    CONCURRENCY     45033 (45035, if it ever appears)      RateLimitedError     short backoff, retry
    RETRY           -1 6000 41063 41096                    TransientError       backoff, retry (≤ max_retries)
    RECIPIENT       84061 40096 60011 41050 41051 …        PermanentError       that delivery / item failed, with
                                                                                the reason and a reason_code
    REQUEST         40058 41064 41065 45002 …              PermanentError       our request is wrong: failed

An errcode the table does not know is a PermanentError naming it and WeCom's errmsg (with the hint and IP cut off),
and is logged, so a new code is seen rather than retried blindly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

from engine.errors import AuthError, GatewayError, PermanentError, RateLimitedError, TransientError

log = logging.getLogger("wecast.wecom")


class Handling(StrEnum):
    REFRESH_TOKEN = "refresh_token"
    CONFIG = "config"
    RATE_LIMITED = "rate_limited"
    CONCURRENCY = "concurrency"
    RETRY = "retry"
    RECIPIENT = "recipient"
    REQUEST = "request"


@dataclass(frozen=True)
class Code:
    """One row of the table: what an errcode means and how it is handled."""

    handling: Handling
    reason_code: str  # stable machine code, for the ledger and JSON output
    meaning: str  # for people; WeCom's own wording (D90313) after the dash


CODES: dict[int, Code] = {
    # -- the access token ------------------------------------------------------------------------------------
    40014: Code(Handling.REFRESH_TOKEN, "token_invalid", "the access token is invalid — 不合法的access_token"),
    42001: Code(Handling.REFRESH_TOKEN, "token_expired", "the access token expired — access_token已过期"),
    41001: Code(Handling.REFRESH_TOKEN, "token_missing", "the access token is missing — 缺少access_token参数"),
    # -- configuration: nothing works until it is fixed -------------------------------------------------------
    40001: Code(
        Handling.CONFIG,
        "bad_secret",
        "the app secret was refused (wrong or reset secret, or the app is disabled): check wecom.secret "
        "(WECAST_WECOM_SECRET) — 不合法的secret参数",
    ),
    40013: Code(Handling.CONFIG, "bad_corp_id", "the corp id was refused: check wecom.corp_id — 不合法的CorpID"),
    40091: Code(Handling.CONFIG, "bad_secret", "the secret belongs to another corp: check wecom.secret — secret不合法"),
    48002: Code(
        Handling.CONFIG,
        "api_forbidden",
        "this app may not call the API: add it under 客户联系 → 可调用接口的应用 — API接口无权限调用",
    ),
    60020: Code(
        Handling.CONFIG,
        "ip_not_trusted",
        "this server's IP is not among the app's trusted IPs (企业可信IP) — 不安全的访问IP",
    ),
    301002: Code(
        Handling.CONFIG, "wrong_agent", "the token's app does not match wecom.agent_id — 无权限操作指定的应用"
    ),
    40056: Code(Handling.CONFIG, "bad_agent_id", "wecom.agent_id is not a valid AgentId — 不合法的agentid"),
    # -- throttling ---------------------------------------------------------------------------------------------
    45009: Code(Handling.RATE_LIMITED, "rate_limited", "over WeCom's call frequency limit — 接口调用超过限制"),
    45033: Code(Handling.CONCURRENCY, "too_concurrent", "too many concurrent calls — 接口并发调用超过限制"),
    45035: Code(Handling.CONCURRENCY, "too_concurrent", "too many concurrent calls (45035)"),
    # -- try again ------------------------------------------------------------------------------------------------
    -1: Code(Handling.RETRY, "busy", "WeCom is busy — 系统繁忙"),
    6000: Code(Handling.RETRY, "conflict", "a concurrent change conflicted — 数据版本冲突"),
    41063: Code(Handling.RETRY, "task_dispatching", "the task is still being dispatched — 群发消息正在被派发中"),
    41096: Code(Handling.RETRY, "welcome_in_progress", "the welcome message is being sent — 欢迎语已在发送中"),
    # -- that recipient / item ---------------------------------------------------------------------------------------
    84061: Code(
        Handling.RECIPIENT, "not_friend", "the customer is not a contact of that staff member — 不存在外部联系人的关系"
    ),
    40096: Code(Handling.RECIPIENT, "unknown_contact", "not a customer id of this corp — 不合法的外部联系人userid"),
    40003: Code(Handling.RECIPIENT, "unknown_staff", "not a valid staff member (userid) — 无效的UserID"),
    60011: Code(
        Handling.RECIPIENT, "no_privilege", "outside the app's visibility scope — 指定的成员/部门/标签参数无权限"
    ),
    40068: Code(Handling.RECIPIENT, "unknown_tag", "no such tag or tag group — 不合法的标签/标签组ID"),
    41048: Code(Handling.RECIPIENT, "no_recipients", "none of the customers can be sent to — 无可发送的客户"),
    41049: Code(Handling.RECIPIENT, "welcome_code_missing", "the welcome code is missing — 缺少欢迎语code参数"),
    41050: Code(
        Handling.RECIPIENT,
        "welcome_code_invalid",
        "the welcome code is invalid, used, or past its 20-second window — 无效的欢迎语code",
    ),
    41051: Code(
        Handling.RECIPIENT,
        "welcome_not_allowed",
        "the customer and the staff member already chat (or another app sent the welcome) "
        "— 客户和服务人员已经开始聊天了",
    ),
    41053: Code(
        Handling.RECIPIENT, "archive_not_agreed", "the customer has not agreed to chat archiving — 客户未同意存档"
    ),
    81013: Code(Handling.RECIPIENT, "no_recipients", "every recipient is invalid — UserID、部门ID、标签ID全部非法"),
    82001: Code(Handling.RECIPIENT, "no_recipients", "no recipients given — 指定的成员/部门/标签全部为空"),
    701008: Code(
        Handling.RECIPIENT,
        "no_licence",
        "no listed member has an interoperability licence — 没有合法的有互通license的用户",
    ),
    # -- our request is wrong ---------------------------------------------------------------------------------------
    40058: Code(Handling.REQUEST, "bad_request", "a parameter is invalid or too long — 不合法的参数"),
    40004: Code(Handling.REQUEST, "bad_media", "the media type is not allowed — 不合法的媒体文件类型"),
    40005: Code(Handling.REQUEST, "bad_media", "the file type is not allowed — 不合法的文件类型"),
    40006: Code(Handling.REQUEST, "bad_media", "the file size is not allowed — 不合法的文件大小"),
    40007: Code(Handling.REQUEST, "bad_media", "the media id is invalid or expired — 不合法的媒体文件id"),
    41046: Code(Handling.REQUEST, "unknown_task", "the task id is missing — 缺少企业群发消息id"),
    41047: Code(Handling.REQUEST, "unknown_task", "no such task — 无效的企业群发消息id"),
    41064: Code(Handling.REQUEST, "too_many_attachments", "more than 9 attachments — 附件数量超过限制"),
    41065: Code(Handling.REQUEST, "bad_attachment", "an attachment's type is invalid — 无效的附件类型"),
    41093: Code(Handling.REQUEST, "cancelled", "the task was cancelled — 群发任务已取消"),
    41094: Code(
        Handling.REQUEST, "remind_limit", "WeCom allows 3 reminders per task per 24 hours — 群发提醒超过频率限制"
    ),
    44004: Code(Handling.REQUEST, "empty_text", "the text is empty — 文本消息content参数为空"),
    45002: Code(Handling.REQUEST, "too_long", "the message is too long — 消息内容大小超过限制"),
}


# Codes that, answered to a call made with an access token, drop the token and fetch a new one (once per call).
TOKEN_REFUSED = frozenset({40014, 42001, 41001, 40001})


class WecomAuthError(AuthError):
    """WeCom refused the configuration (credentials, permissions, IP): nothing works until it is fixed."""

    def __init__(self, message: str, errcode: int, reason_code: str) -> None:
        super().__init__(message)
        self.errcode = errcode
        self.reason_code = reason_code


class WecomPermanentError(PermanentError):
    """This request or recipient will not work; `reason_code` says why in a stable word."""

    def __init__(self, message: str, errcode: int, reason_code: str) -> None:
        super().__init__(message)
        self.errcode = errcode
        self.reason_code = reason_code


class WecomTransientError(TransientError):
    """WeCom asked us to try again later."""

    def __init__(self, message: str, errcode: int, reason_code: str) -> None:
        super().__init__(message)
        self.errcode = errcode
        self.reason_code = reason_code


class WecomRateLimitedError(RateLimitedError):
    """WeCom throttled us (45009 frequency, 45033 concurrency)."""

    def __init__(self, message: str, errcode: int, reason_code: str, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after)
        self.errcode = errcode
        self.reason_code = reason_code


class WecomHttpError(TransientError):
    """WeCom's front end (or a proxy before it) answered HTTP 429 or a 5xx to a call that may be repeated.
    `retry_after`: the seconds its Retry-After asked for (None: it said nothing)."""

    def __init__(self, message: str, status: int, retry_after: float | None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class WecomAnswerError(TransientError):
    """WeCom answered, but not what the API returns: a body that is not a JSON object (an HTML page from a proxy,
    an empty or cut-off body), no errcode, or errcode 0 without a list the API always sends (or with one of the wrong
    shape). Nothing in it is used: a sync fails instead of reading a missing list as "no customers"."""

    def __init__(self, message: str, api: str, field: str) -> None:
        super().__init__(message)
        self.api = api
        self.field = field


WecomError = WecomAuthError | WecomPermanentError | WecomTransientError | WecomRateLimitedError


def short_errmsg(errmsg: str) -> str:
    """WeCom's errmsg without the ", hint: [...], from ip: ..., more info at ..." tail."""
    return errmsg.split(", hint:")[0].split(", more info")[0].strip()


def error_for(
    api: str, errcode: int, errmsg: str, *, rate_limit_wait: float = 60.0, concurrency_wait: float = 1.0
) -> GatewayError:
    """The engine error for a non-zero errcode answered by `api` (see the module docstring). The message names the
    API, the code and what it means; it never contains the request (whose URL holds the access token)."""
    code = CODES.get(errcode)
    if code is None:
        log.warning("WeCom %s answered an errcode wecast does not know: %s %r", api, errcode, short_errmsg(errmsg))
        return WecomPermanentError(f"WeCom {api}: errcode {errcode}: {short_errmsg(errmsg)}", errcode, "wecom_error")
    message = f"WeCom {api}: {code.meaning} (errcode {errcode})"
    if code.handling is Handling.CONFIG or code.handling is Handling.REFRESH_TOKEN:
        return WecomAuthError(message, errcode, code.reason_code)
    if code.handling is Handling.RATE_LIMITED:
        return WecomRateLimitedError(message, errcode, code.reason_code, retry_after=rate_limit_wait)
    if code.handling is Handling.CONCURRENCY:
        return WecomRateLimitedError(message, errcode, code.reason_code, retry_after=concurrency_wait)
    if code.handling is Handling.RETRY:
        return WecomTransientError(message, errcode, code.reason_code)
    return WecomPermanentError(message, errcode, code.reason_code)


def handling_of(errcode: int) -> Handling | None:
    """How an errcode is handled (None: not in the table)."""
    code = CODES.get(errcode)
    return code.handling if code else None

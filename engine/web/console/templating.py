"""The console's page templates: a Jinja environment of their own (not the campaign-template sandbox), with
autoescaping on for every template and undefined names as errors, and interface text through gettext.

Interface text is written in the templates as `_("English text", name=value)` and translated per request
(`language_of`: `?lang=`, remembered in a cookie, then Accept-Language, then config.yaml's `language:`, then
Chinese). The console's words are a gettext domain of their own (`console`: `locale/zh_CN/LC_MESSAGES/console.po`,
compiled to `.mo`, extracted from the templates and this package with Babel: `babel.cfg`), beside the engine's
(`engine.i18n`, domain `wecast`), which speaks the same language for the request: errors and reasons the engine
words come out in the language of the page that shows them.
"""

from __future__ import annotations

import gettext as gettext_module
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from jinja2 import Environment, PackageLoader, StrictUndefined

from engine.audience import ExclusionCategory
from engine.gateways.base import EventKind, LoginState
from engine.i18n import Language, negotiate
from engine.journeys.preview import describe_entry, describe_trigger
from storage.models import DeliveryStatus, EnrolmentStatus, RunStatus

LOCALE_DIR = Path(__file__).parent / "locale"
DOMAIN = "console"


def N_(message: str) -> str:
    """Marks text for extraction that is translated later, where it is shown."""
    return message


STATUS_TEXT: dict[str, str] = {
    DeliveryStatus.PENDING: N_("pending"),
    DeliveryStatus.CLAIMED: N_("queued"),
    DeliveryStatus.SENDING: N_("sending"),
    DeliveryStatus.SUBMITTED: N_("awaiting staff"),
    DeliveryStatus.SENT: N_("sent"),
    DeliveryStatus.FAILED: N_("failed"),
    DeliveryStatus.SKIPPED: N_("skipped"),
    DeliveryStatus.UNKNOWN: N_("unknown"),
    RunStatus.RUNNING: N_("running"),
    RunStatus.PAUSED: N_("paused"),
    RunStatus.COMPLETED: N_("completed"),
    RunStatus.CANCELLED: N_("cancelled"),
}


LOGIN_TEXT: dict[str, str] = {
    LoginState.LOGGED_OUT: N_("Logged out"),
    LoginState.WAITING_SCAN: N_("Waiting for the scan"),
    LoginState.SCANNED: N_("Scanned: confirm on the phone"),
    LoginState.WAITING_VERIFY_CODE: N_("Waiting for the code"),
    LoginState.LOGGED_IN: N_("Logged in"),
}

ENROLMENT_TEXT: dict[str, str] = {
    EnrolmentStatus.ACTIVE: N_("in progress"),
    EnrolmentStatus.SENDING: N_("sending"),
    EnrolmentStatus.COMPLETED: N_("completed"),
    EnrolmentStatus.EXITED: N_("left early"),
}

# A gateway event's kind as the account page's "recent events" shows it (the kind itself is a code).
EVENT_TEXT: dict[str, str] = {
    EventKind.QR: N_("QR code"),
    EventKind.SCANNED: N_("Scanned"),
    EventKind.VERIFY_CODE: N_("Code shown"),
    EventKind.VERIFY_CODE_WRONG: N_("Wrong code"),
    EventKind.LOGIN: N_("Login"),
    EventKind.READY: N_("Contacts loaded"),
    EventKind.LOGOUT: N_("Logout"),
    EventKind.SECOND_VERIFICATION: N_("Security check"),
    EventKind.CONTACT_CHANGED: N_("Customer changed"),
    EventKind.MESSAGE: N_("Message"),
    EventKind.CONTACT_ADDED: N_("Customer added"),
    EventKind.CONTACT_REMOVED: N_("Customer removed"),
    EventKind.ERROR: N_("Error"),
    EventKind.CONNECTION: N_("Connection"),
}

CATEGORY_TEXT: dict[str, str] = {
    ExclusionCategory.AUDIENCE: N_("not targeted"),
    ExclusionCategory.EXCLUSION: N_("excluded"),
    ExclusionCategory.DEDUPE: N_("already sent"),
    ExclusionCategory.FREQUENCY_CAP: N_("frequency cap"),
    ExclusionCategory.MISSING_FIELD: N_("missing data"),
}


def query_string(query: Mapping[str, str], **changes: str) -> str:
    """The page's query string with some parameters changed (the language switch keeps the filters)."""
    return urlencode({**query, **changes})


def language_of(request_lang: str | None, cookie: str | None, accept: str | None, config: Language | None) -> Language:
    """The console's language for a request: `?lang=`, then the one it remembered (cookie), then the browser's
    Accept-Language, then config.yaml's `language:`, then Chinese."""
    for given in (request_lang, cookie):
        lang = Language.parse(given) if given else None
        if lang is not None:
            return lang
    return negotiate(accept) or config or Language.ZH


@cache
def translations(language: Language) -> gettext_module.NullTranslations:
    """The compiled catalog of `language` (English, the msgids, needs none)."""
    return gettext_module.translation(DOMAIN, LOCALE_DIR, [language.value], fallback=True)


def translator(language: Language) -> tuple[Callable[..., str], Callable[..., str]]:
    """(gettext, ngettext) for templates: `_("Hello %(name)s", name=x)`, `ngettext("one", "%(num)d many", n)`."""
    catalog = translations(language)

    def gettext(message: str, **values: Any) -> str:
        text = catalog.gettext(message)
        return text % values if values else text

    def ngettext(singular: str, plural: str, n: int, **values: Any) -> str:
        return catalog.ngettext(singular, plural, n) % {"num": n, **values}

    return gettext, ngettext


def local_time(value: datetime | None, tz: ZoneInfo, *, seconds: bool = False) -> str:
    """A stored (UTC) time as the operator reads it: local, `YYYY-MM-DD HH:mm`."""
    if value is None:
        return "—"
    return value.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def schedule_text(schedule: Mapping[str, Any]) -> str:
    """A campaign's schedule as its file says it, without the fields it leaves out: `cron 0 10 * * *`."""
    return " · ".join(f"{key} {value}" for key, value in schedule.items() if value is not None)


def build_environment(tz: ZoneInfo) -> Environment:
    """The console's environment: templates from this package, autoescaped, strict about undefined names."""
    env = Environment(
        loader=PackageLoader("engine.web.console", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["local"] = lambda value, seconds=False: local_time(value, tz, seconds=seconds)
    env.filters["number"] = lambda n: f"{n:,}"
    env.filters["schedule"] = schedule_text
    # A journey's trigger and entry policy in the request's language (engine.i18n: the request runs under it).
    env.filters["trigger_text"] = describe_trigger
    env.filters["entry_text"] = describe_entry
    env.globals.update(
        STATUS_TEXT=STATUS_TEXT,
        LOGIN_TEXT=LOGIN_TEXT,
        ENROLMENT_TEXT=ENROLMENT_TEXT,
        CATEGORY_TEXT=CATEGORY_TEXT,
        EVENT_TEXT=EVENT_TEXT,
        qs=query_string,
    )
    return env

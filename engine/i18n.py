"""Two languages, Chinese first: every word a person reads comes from a gettext catalog.

    from engine.i18n import tr, ntr, N_

    tr("no contact has the tag {tag}", tag=name)          # translated now, then formatted
    Lazy(N_("no run {run}"), run=5)                       # translated each time it is shown (str())
    ntr("{n} recipient", "{n} recipients", n)             # plural; `n` is passed to the format too
    HELP = N_("send a campaign now")                      # marked for extraction, translated when shown: tr(HELP)

The messages are English in the code (the msgid) and in the catalogs `engine/locale/{zh_CN,en}/LC_MESSAGES/
wecast.po`, compiled to `.mo` files that are committed beside them and shipped as package data (so an editable
install, a wheel and the Docker image all find them without a build step; `tests/test_i18n.py` fails when a
`.mo` is older than its `.po`, when a catalog lacks a message of the code, or when a translation's placeholders
differ from the msgid's). `python -m engine.catalogs update` extracts, merges and compiles (Babel).

Which language is in force:

* the process default, chosen once by the CLI (`choose`: `--lang`, then config.yaml's `language:`, then
  `LC_ALL` / `LC_MESSAGES` / `LANG` / `LANGUAGE` starting with `zh` → Chinese, else English) with `set_language`;
* for one request or call, `use_language(lang)` (the web side: `?lang=`, then Accept-Language, then the config).
  It lives in a `ContextVar`, not a global: each request, each asyncio task and each thread started with a copied
  context sees its own language, so two requests in different languages never mix.

Machine-readable output never goes through this module: JSON keys and codes (`reason_code`) stay English.
"""

from __future__ import annotations

import gettext
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from enum import StrEnum
from functools import cache
from pathlib import Path

DOMAIN = "wecast"
LOCALE_DIR = Path(__file__).resolve().parent / "locale"


class Language(StrEnum):
    """The languages wecast speaks; the value is the catalog's folder name."""

    ZH = "zh_CN"
    EN = "en"

    @classmethod
    def parse(cls, value: str) -> Language | None:
        """A language from what people write: zh, zh_CN, zh-CN, zh_CN.UTF-8, zh-Hans, 中文, en, en_US, English, ...
        (None for anything else, including C and POSIX)."""
        key = value.strip().lower().replace("-", "_")
        if key in ("中文", "简体中文", "chinese") or key == "zh" or key.startswith("zh_"):
            return cls.ZH
        if key in ("english", "英文") or key == "en" or key.startswith(("en_", "en.")):
            return cls.EN
        if key.startswith("zh."):
            return cls.ZH
        return None

    @property
    def tag(self) -> str:
        """The BCP 47 tag, for HTTP (`Content-Language`) and HTML (`lang=`)."""
        return "zh-CN" if self is Language.ZH else "en"


ENV_VARS = ("LC_ALL", "LC_MESSAGES", "LANG", "LANGUAGE")


def from_environment(environ: Mapping[str, str]) -> Language | None:
    """The language of the locale, as POSIX reads it: the first of LC_ALL, LC_MESSAGES, LANG that is set decides
    (LANGUAGE, a GNU list, last); `zh…` is Chinese, anything else set (C, en_US.UTF-8, de_DE) is English."""
    for name in ENV_VARS:
        value = environ.get(name, "").strip()
        if not value:
            continue
        first = value.split(":")[0]
        return Language.ZH if first.lower().startswith("zh") else Language.EN
    return None


def choose(*, cli: str | None, config: str | None, environ: Mapping[str, str]) -> Language:
    """The CLI's language: `--lang`, then config.yaml's `language:`, then the locale, then English. An unknown
    value given explicitly is an error the caller reports (see `parse_choice`)."""
    for given in (cli, config):
        if given:
            lang = Language.parse(given)
            if lang is not None:
                return lang
    return from_environment(environ) or Language.EN


_Q = re.compile(r"^\s*q\s*=\s*([0-9.]+)\s*$")


def negotiate(accept_language: str | None) -> Language | None:
    """The best language of an HTTP Accept-Language header that wecast speaks (None if none fits)."""
    if not accept_language:
        return None
    ranked: list[tuple[float, int, Language]] = []
    for index, item in enumerate(accept_language.split(",")):
        tag, *params = item.split(";")
        quality = 1.0
        for param in params:
            match = _Q.match(param)
            if match:
                try:
                    quality = float(match.group(1))
                except ValueError:
                    quality = 0.0
        lang = Language.parse(tag) if tag.strip() != "*" else None
        if lang is not None and quality > 0:
            ranked.append((-quality, index, lang))
    return min(ranked)[2] if ranked else None


# The process default (set once by the CLI or the server at start) and the per-request / per-call override.
_default = Language.EN
_current: ContextVar[Language | None] = ContextVar("wecast_language", default=None)


def set_language(lang: Language) -> None:
    """Make `lang` the process default (the CLI does this once it knows `--lang` and config.yaml)."""
    global _default
    _default = lang


def process_language() -> Language:
    """The process default (the CLI's `--lang` / config.yaml / locale, also `wecast serve`'s): the language of log
    lines, which a request's own language (`?lang=en` on a Chinese server) must not change."""
    return _default


def current() -> Language:
    """The language in force here: this context's (a request, a call), else the process default."""
    return _current.get() or _default


@contextmanager
def use_language(lang: Language | None) -> Iterator[Language]:
    """Speak `lang` inside the block, in this context only (None: keep the current one)."""
    token = _current.set(lang or current())
    try:
        yield current()
    finally:
        _current.reset(token)


@cache
def translations(lang: Language) -> gettext.GNUTranslations:
    """The compiled catalog of `lang` (a missing `.mo` is a packaging bug: it fails loudly)."""
    with (LOCALE_DIR / lang.value / "LC_MESSAGES" / f"{DOMAIN}.mo").open("rb") as fp:
        return gettext.GNUTranslations(fp)


def tr(message: str, /, **fields: object) -> str:
    """`message` in the current language; with fields, formatted (`{name}` placeholders, as str.format)."""
    text = translations(current()).gettext(message)
    return text.format(**fields) if fields else text


def ntr(singular: str, plural: str, n: int, /, **fields: object) -> str:
    """The singular or plural form for `n` in the current language, formatted with `n` and the fields."""
    return translations(current()).ngettext(singular, plural, n).format(n=n, **fields)


class Lazy:
    """Text translated when it is shown, in the language in force *then*: for an error made in one context and shown
    in another (a pooled send refused in a background task, answered to each waiting request in its own language).
    `str(Lazy(N_("no run {run}"), run=5))`; an exception given one shows it translated."""

    __slots__ = ("fields", "message")

    def __init__(self, message: str, /, **fields: object) -> None:
        self.message = message
        self.fields = fields

    def __str__(self) -> str:
        return tr(self.message, **self.fields)


def N_(message: str) -> str:  # gettext's name for "mark for extraction, translate later"
    """Mark text for the catalog without translating it (module-level text, translated by `tr` when shown)."""
    return message

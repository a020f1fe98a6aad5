"""Keywords in what customers write: matched width- and case-insensitively, so ＴＤ, td and TD are one keyword.

Customers type on phones with full-width input methods: `ＴＤ`, `ｔｄ` and `TD` must mean the same, and so must
`退订` with or without spaces around it. Text and keywords are compared after `normalize`: Unicode NFKC (full-width
letters, digits and punctuation become their ASCII forms), then case folding, then trimming.

Three ways to match (`KeywordSpec.match`):

* `contains` — the keyword appears anywhere in the message (价格 in "请问价格多少").
* `exact` — the whole message is the keyword, give or take surrounding spaces and punctuation ("TD", "td。",
  " 退订！"). The default for opt-out, where "我不想退订" must not unsubscribe anyone.
* `regex` — a regular expression searched in the normalized message (case-insensitive), in bounded time
  (engine.patterns: a search that backtracks past its time is no match).

This module is a leaf (stdlib, pydantic and engine.patterns): config, journeys and opt-out all use it.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from engine.i18n import tr
from engine.patterns import IGNORECASE, Pattern, PatternError, PatternTimeout, compile_pattern

MatchKind = Literal["contains", "exact", "regex"]
# Stripped from both ends before an exact comparison: spaces, and the punctuation people add to a short reply.
_EDGES = " \t\r\n.,!?;:~…。，！？；：、～\"'“”‘’()（）[]【】"


def normalize(text: str) -> str:
    """The form messages and keywords are compared in: NFKC (full width -> ASCII), case-folded, trimmed."""
    return unicodedata.normalize("NFKC", text).casefold().strip()


def _bare(text: str) -> str:
    return normalize(text).strip(_EDGES)


class KeywordSpec(BaseModel):
    """A set of keywords and how to match them (a journey's `message` trigger, opt-out in config.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: MatchKind = "contains"  # before keywords: their check reads it
    keywords: list[str] = Field(default_factory=list)

    @field_validator("keywords")
    @classmethod
    def _usable(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for word in value:
            if not _bare(str(word)):
                raise ValueError(tr("a keyword cannot be empty or only spaces and punctuation"))
            if info.data.get("match") == "regex":
                try:
                    compile_pattern(normalize(word))
                except PatternError as exc:
                    raise ValueError(tr("invalid regular expression {word!r}: {error}", word=word, error=exc)) from None
        return value

    def matcher(self) -> Matcher:
        return Matcher.build(self.keywords, self.match)


@dataclass(frozen=True)
class Matcher:
    """A compiled `KeywordSpec`. An empty keyword list matches every message (a journey on any reply)."""

    keywords: tuple[str, ...]
    match: MatchKind
    _normalized: tuple[str, ...]
    _patterns: tuple[Pattern, ...]

    @classmethod
    def build(cls, keywords: Sequence[str], match: MatchKind = "contains") -> Matcher:
        words = tuple(str(k) for k in keywords)
        if match == "regex":
            patterns = tuple(compile_pattern(normalize(w), IGNORECASE) for w in words)
            return cls(words, match, (), patterns)
        normal = tuple(_bare(w) if match == "exact" else normalize(w) for w in words)
        return cls(words, match, normal, ())

    def find(self, text: str) -> str | None:
        """The keyword (as written in the spec) that `text` matches, or None. With no keywords: "" for any text."""
        if not self.keywords:
            return ""
        if self.match == "regex":
            subject = normalize(text)
            for word, pattern in zip(self.keywords, self._patterns, strict=True):
                with suppress(PatternTimeout):  # out of time on this text (logged): not a match
                    if pattern.search(subject):
                        return word
            return None
        subject = _bare(text) if self.match == "exact" else normalize(text)
        for word, normal in zip(self.keywords, self._normalized, strict=True):
            if (subject == normal) if self.match == "exact" else (normal in subject):
                return word
        return None

    def __call__(self, text: str) -> bool:
        return self.find(text) is not None

    def describe(self) -> str:
        if not self.keywords:
            return tr("any message")
        words = " / ".join(self.keywords)
        if self.match == "exact":
            return tr("message is {words}", words=words)
        if self.match == "regex":
            return tr("message matches {words}", words=words)
        return tr("message contains {words}", words=words)

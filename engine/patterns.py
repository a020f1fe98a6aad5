"""Regular expressions that campaigns and journeys write, run in bounded time on what customers write.

A pattern comes from whoever writes campaigns (`matches` in audience rules and `if:` conditions, `match: regex`
keywords of journey triggers and opt-out); the text it searches comes from customers (their nickname, the message
they send). Python's `re` backtracks without limit: `^(\\w+\\s?)+$`, written in good faith, took hours of CPU on a
33-character message ("aaaa…!") and `wecast serve` answered nothing meanwhile. So patterns are compiled with the
`regex` module (the same syntax and Unicode classes as `re`) and every search stops after `TIMEOUT` seconds with
`PatternTimeout`; the callers decide what an undecided search means (engine.keywords: no match; engine.audience:
the contact is left out, whatever `not` stands around the rule) and log it.

This module is a leaf (the standard library and `regex`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import regex

log = logging.getLogger("wecast.patterns")

TIMEOUT = 0.1  # seconds one search may take; a sound pattern takes microseconds on a message
IGNORECASE = regex.IGNORECASE


class PatternError(ValueError):
    """The text is not a regular expression; `str(e)` says why."""


class PatternTimeout(TimeoutError):
    """A search took longer than `TIMEOUT`: the pattern backtracks without end on this text."""


@dataclass(frozen=True)
class Pattern:
    """A compiled pattern whose searches are bounded in time."""

    source: str
    _compiled: regex.Pattern[str]

    def search(self, text: str) -> bool:
        """Whether the pattern is found in `text`. Raises PatternTimeout after `TIMEOUT` seconds."""
        try:
            return self._compiled.search(text, timeout=TIMEOUT) is not None
        except TimeoutError:
            log.warning(
                "the regular expression %r took more than %.1f s on a text of %d characters: not decided "
                "(rewrite it without nested repetition such as (a+)+)",
                self.source,
                TIMEOUT,
                len(text),
            )
            raise PatternTimeout(self.source) from None


def compile_pattern(source: str, flags: int = 0) -> Pattern:
    """`source` compiled (VERSION0: the syntax of Python's `re`). Raises PatternError."""
    try:
        return Pattern(source, regex.compile(source, flags | regex.VERSION0))
    except (regex.error, OverflowError, RecursionError) as exc:
        raise PatternError(str(exc)) from None

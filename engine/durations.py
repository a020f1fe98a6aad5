"""Durations written the way people write them: `90s`, `15m`, `2h`, `7d`, `1w` (or a number of seconds).

A duration is at most `MAX_DURATION` (about 100 years): longer ones, and numbers that are not finite, are
errors — never an OverflowError from `timedelta`, whose own limit is 999,999,999 days. Likewise dates are
between `MIN_YEAR` and `MAX_YEAR` (`check_date_range`): Python's own range ends at years 1 and 9999, where
converting to or from a time zone overflows.
"""

from __future__ import annotations

import math
import re
from datetime import date, timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

from engine.i18n import tr

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_RE = re.compile(r"^\s*(\d+)(\.\d+)?\s*([smhdw])\s*$")
MAX_DURATION = timedelta(days=36_500)


MIN_YEAR, MAX_YEAR = 1900, 9998


class DurationTooLong(ValueError):
    """A duration past MAX_DURATION (or infinite)."""


def check_date_range(value: date) -> None:
    """Raise ValueError for a date (or date and time) outside MIN_YEAR..MAX_YEAR."""
    if not MIN_YEAR <= value.year <= MAX_YEAR:
        raise ValueError(
            tr(
                "dates must be in the years {low} to {high} (got {value})",
                low=MIN_YEAR,
                high=MAX_YEAR,
                value=value.isoformat(),
            )
        )


def parse_duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return _bounded(value.total_seconds(), value)
    if isinstance(value, bool):
        raise ValueError(tr("expected a duration like 30s, 15m, 2h or 7d"))
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(tr("a duration cannot be negative"))
        return _bounded(value, value)
    if isinstance(value, str):
        match = _RE.match(value)
        if match:
            whole, fraction, unit = match.groups()
            if len(whole) > 15:  # thousands of digits: too long, without float() making it inf
                return _bounded(math.inf, value)
            return _bounded(float(whole + (fraction or "")[:16]) * _UNITS[unit], value)
    raise ValueError(tr("{value} is not a duration; write it like 30s, 15m, 2h, 7d or 1w", value=_short(value)))


def _bounded(seconds: float, written: Any) -> timedelta:
    if math.isnan(seconds):
        raise ValueError(tr("{value} is not a duration; write it like 30s, 15m, 2h, 7d or 1w", value=_short(written)))
    if seconds > MAX_DURATION.total_seconds():
        raise DurationTooLong(
            tr(
                "{value} is longer than the longest duration allowed ({days}d)",
                value=_short(written),
                days=MAX_DURATION.days,
            )
        )
    return timedelta(seconds=seconds)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


Duration = Annotated[timedelta, BeforeValidator(parse_duration), PlainSerializer(format_duration)]

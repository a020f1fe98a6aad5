"""Charts for a run's summary: sends over time (columns) and deliveries by reason (bars).

Drawn on the server (no chart library, no script): the shapes are inline SVG stretched to the page width, and the
words and numbers are HTML beside them, so they keep their size on a phone as on a desktop. Every label is escaped
here, and the result is `Markup` only because it was built from escaped parts.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from markupsafe import Markup, escape

HEIGHT = 100  # the columns' drawing height, in SVG units (the chart's CSS sets its height on the page)


def sends_over_time(start: datetime | None, width: float, counts: list[int], tz: ZoneInfo, *, label: str) -> Markup:
    """Columns of sends per time bucket from `start` (`width` seconds each), the busiest bucket's count above and
    the first and last moment (local time) below. `label`: the chart's accessible name."""
    if start is None or not counts:
        return Markup("")
    top = max(counts) or 1
    step = 100 / len(counts)
    columns = []
    for i, n in enumerate(counts):
        h = HEIGHT * n / top
        when = start + timedelta(seconds=width * i)
        columns.append(
            f'<rect x="{i * step + step * 0.08:.2f}" y="{HEIGHT - h:.2f}" width="{step * 0.84:.2f}" '
            f'height="{h:.2f}" class="bar"><title>{escape(_clock(when, tz))}: {n}</title></rect>'
        )
    end = start + timedelta(seconds=width * len(counts))
    return Markup(
        f'<figure class="chart" role="img" aria-label="{escape(label)}">'
        f'<div class="chart-top">{top}</div>'
        f'<svg viewBox="0 0 100 {HEIGHT}" preserveAspectRatio="none" class="columns">{"".join(columns)}</svg>'
        f'<div class="chart-axis"><span>{escape(_clock(start, tz))}</span><span>{escape(_clock(end, tz))}</span></div>'
        "</figure>"
    )


def bars(rows: list[tuple[str, int]], *, label: str, kind: str = "fail") -> Markup:
    """One bar per (reason, count), scaled to the largest, in the order given; `kind` colours them (fail, skip)."""
    if not rows:
        return Markup("")
    top = max(n for _, n in rows) or 1
    items = [
        f'<li><span class="reason">{escape(text)}</span><b>{n}</b>'
        f'<svg viewBox="0 0 100 1" preserveAspectRatio="none" class="meter">'
        f'<rect width="{max(100 * n / top, 1):.1f}" height="1" class="bar {escape(kind)}"/></svg></li>'
        for text, n in rows
    ]
    return Markup(f'<ul class="reasons" aria-label="{escape(label)}">{"".join(items)}</ul>')


def _clock(when: datetime, tz: ZoneInfo) -> str:
    return when.astimezone(tz).strftime("%m-%d %H:%M:%S")

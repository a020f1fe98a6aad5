"""Inline SVG charts for a run's summary: sends over time (columns) and deliveries by reason (bars).

Drawn on the server as plain SVG (no chart library, no script): every label is escaped here, and the result is
`Markup` only because it was built from escaped parts. The charts scale to the page width (`viewBox`,
`width="100%"`), so they read on a phone as on a desktop.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from markupsafe import Markup, escape

WIDTH = 600
HEIGHT = 160
AXIS = 22  # room under the columns for the time labels


def sends_over_time(start: datetime | None, width: float, counts: list[int], tz: ZoneInfo, *, label: str) -> Markup:
    """Columns of sends per time bucket from `start` (`width` seconds each); labels in local time. `label`: the
    chart's accessible name."""
    if start is None or not counts:
        return Markup("")
    top = max(counts) or 1
    step = WIDTH / len(counts)
    plot = HEIGHT - AXIS
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" aria-label="{escape(label)}" '
        'preserveAspectRatio="none">'
    ]
    for i, n in enumerate(counts):
        h = plot * n / top
        when = start + timedelta(seconds=width * i)
        parts.append(
            f'<rect x="{i * step + 1:.1f}" y="{plot - h:.1f}" width="{max(step - 2, 1):.1f}" height="{h:.1f}" '
            f'class="bar"><title>{escape(_clock(when, tz))}: {n}</title></rect>'
        )
    end = start + timedelta(seconds=width * len(counts))
    parts.append(f'<line x1="0" y1="{plot}" x2="{WIDTH}" y2="{plot}" class="axis"/>')
    parts.append(f'<text x="0" y="{HEIGHT - 6}" class="tick">{escape(_clock(start, tz))}</text>')
    parts.append(f'<text x="{WIDTH}" y="{HEIGHT - 6}" class="tick" text-anchor="end">{escape(_clock(end, tz))}</text>')
    parts.append(f'<text x="4" y="12" class="tick">{top}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def bars(rows: list[tuple[str, int]], *, label: str) -> Markup:
    """Horizontal bars, one per (label, count), longest first as given."""
    if not rows:
        return Markup("")
    top = max(n for _, n in rows) or 1
    row_h = 26
    height = row_h * len(rows)
    parts = [
        f'<svg class="chart bars" viewBox="0 0 {WIDTH} {height}" width="100%" role="img" aria-label="{escape(label)}">'
    ]
    for i, (text, n) in enumerate(rows):
        y = i * row_h
        w = (WIDTH - 60) * n / top
        parts.append(f'<rect x="0" y="{y + 3}" width="{max(w, 2):.1f}" height="{row_h - 6}" class="bar fail"/>')
        parts.append(f'<text x="6" y="{y + row_h / 2 + 5}" class="bar-label">{escape(_short(text))}</text>')
        parts.append(f'<text x="{WIDTH}" y="{y + row_h / 2 + 5}" class="tick" text-anchor="end">{n}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _clock(when: datetime, tz: ZoneInfo) -> str:
    return when.astimezone(tz).strftime("%m-%d %H:%M:%S")


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"

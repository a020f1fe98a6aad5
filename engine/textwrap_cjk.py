"""Line breaking for Chinese text in terminal tables.

rich wraps at spaces; a Chinese sentence has none, so it folds at the exact column edge, wherever that is:
"满500再减5" on one line and "0。" on the next. `Wrapped` is a renderable that breaks lines as Chinese
typesetting does instead (a simple form of UAX #14 and the 禁则 rules):

* a line may break between two Chinese characters, and at spaces;
* never inside a run of Latin letters and digits (a price, a URL, an English word), unless the run alone is wider
  than the line;
* never before closing punctuation (。，、！？ and closing brackets and quotes) and never after an opening bracket or
  quote: they stay with the character they belong to.

Widths are terminal cells (`rich.cells.cell_len`: a Chinese character takes two).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style

CLOSING = set("。，、！？；：）」』】》〉”’…—,.!?;:)]}%")
OPENING = set("（「『【《〈“‘([{")
# A token is a run that must not be broken: Latin letters, digits and the signs inside numbers and URLs, or
# white space, or one other character.
_TOKEN = re.compile(r"[A-Za-z0-9_@#&%+\-=/.:~?'$¥￥]+|\s+|.", re.S)


def tokens(line: str) -> list[str]:
    """`line` in pieces no break may fall inside, punctuation already joined to its neighbour."""
    out: list[str] = []
    glue_next = False
    for tok in _TOKEN.findall(line):
        if out and (glue_next or tok[0] in CLOSING) and not tok.isspace():
            out[-1] += tok
        else:
            out.append(tok)
        glue_next = tok[-1] in OPENING
    return out


def wrap(text: str, width: int) -> list[str]:
    """`text` broken into lines of at most `width` cells (its own line breaks kept)."""
    width = max(width, 2)
    lines: list[str] = []
    for source in text.split("\n"):
        line = ""
        for tok in tokens(source):
            if cell_len(line) + cell_len(tok) <= width:
                line += tok
                continue
            if line.strip():
                lines.append(line.rstrip())
            line = "" if tok.isspace() else tok
            while cell_len(line) > width:  # a run wider than the whole line: fold it by cells
                cut = _fit(line, width)
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line.rstrip())
    return lines


def _fit(text: str, width: int) -> int:
    used = 0
    for i, ch in enumerate(text):
        used += cell_len(ch)
        if used > width:
            return max(i, 1)
    return len(text)


class Wrapped:
    """Plain text that a rich table cell wraps with `wrap` (no markup is read from it)."""

    def __init__(self, text: str, style: str | Style = "") -> None:
        self.text = text
        self.style = style

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        lines = self.text.split("\n")
        widest = max((cell_len(line) for line in lines), default=0)
        unbreakable = max((cell_len(tok) for line in lines for tok in tokens(line)), default=0)
        return Measurement(min(unbreakable, widest), widest).clamp(max_width=options.max_width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        style = console.get_style(self.style) if self.style else Style()
        yield from self._segments(wrap(self.text, options.max_width), style)

    @staticmethod
    def _segments(lines: list[str], style: Style) -> Iterator[Segment]:
        for line in lines:
            yield Segment(line, style)
            yield Segment.line()

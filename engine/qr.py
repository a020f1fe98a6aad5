"""The login QR code, drawn once for every place that shows it: PNG (browsers, the API), SVG, and terminal text
(`wecast login`, and the log of `wecast serve`, like the source
document's `qrcode-terminal`). Encoding is the `qrcode` package's; the SVG and terminal renderings are
drawn here from its module matrix so they stay small, crisp and easy to check.
"""

from __future__ import annotations

import io

import qrcode
from qrcode.constants import ERROR_CORRECT_M
from qrcode.image.pil import PilImage

BORDER = 2  # quiet-zone modules; 4 is the standard, 2 is what phones need and keeps the log readable


def qr_matrix(data: str, *, border: int = BORDER) -> list[list[bool]]:
    """The QR modules of `data` (True = dark), quiet zone included."""
    qr = qrcode.QRCode(error_correction=ERROR_CORRECT_M, border=border)
    qr.add_data(data)
    qr.make(fit=True)
    return [[bool(cell) for cell in row] for row in qr.get_matrix()]


def qr_png(data: str, *, scale: int = 8, border: int = 4) -> bytes:
    """A PNG image of the QR code (`scale` pixels per module)."""
    qr = qrcode.QRCode(error_correction=ERROR_CORRECT_M, box_size=scale, border=border, image_factory=PilImage)
    qr.add_data(data)
    qr.make(fit=True)
    buf = io.BytesIO()
    qr.make_image().save(buf)
    return buf.getvalue()


def qr_svg(data: str, *, border: int = 4, size: str = "300") -> str:
    """An SVG image of the QR code: one path of unit squares in a viewBox of modules."""
    matrix = qr_matrix(data, border=border)
    n = len(matrix)
    squares = "".join(f"M{x} {y}h1v1h-1z" for y, row in enumerate(matrix) for x, dark in enumerate(row) if dark)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {n} {n}" width="{size}" height="{size}" '
        f'shape-rendering="crispEdges"><rect width="{n}" height="{n}" fill="#fff"/>'
        f'<path fill="#000" d="{squares}"/></svg>\n'
    )


_HALF = {(False, False): " ", (True, False): "▀", (False, True): "▄", (True, True): "█"}


def qr_terminal(data: str, *, invert: bool = True, border: int = BORDER) -> str:
    """The QR code as text, two modules per character cell (upper/lower half blocks).

    `invert=True` draws the *light* modules: log consoles are light-on-dark, so the blocks show as the
    light background and the unprinted cells as the dark modules, which is what phone cameras expect.
    """
    matrix = qr_matrix(data, border=border)
    if len(matrix) % 2:
        matrix.append([False] * len(matrix[0]))  # a light row, like the quiet zone
    lines = []
    for top, bottom in zip(matrix[0::2], matrix[1::2], strict=True):
        cells = [(t != invert, b != invert) for t, b in zip(top, bottom, strict=True)]
        lines.append("".join(_HALF[c] for c in cells))
    return "\n".join(lines) + "\n"

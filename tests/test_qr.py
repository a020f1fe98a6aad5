"""The login QR rendered as PNG, SVG and terminal text, each decoded back to the login URL."""

from __future__ import annotations

import io
import re

import pytest
import zxingcpp
from PIL import Image, ImageDraw

from engine.qr import qr_matrix, qr_png, qr_svg, qr_terminal

URL = "https://wx.work.weixin.qq.com/cgi-bin/crtx_auth?key=3F9A2C7B11D04E8AB6C5D2E1F0A9B8C7&wx=1&sandbox=1"


def image_of(matrix: list[list[bool]], scale: int = 6, quiet: int = 4) -> Image.Image:
    """Draw a module matrix (True = dark) with a white quiet zone, as a camera would see it."""
    n = len(matrix)
    img = Image.new("L", ((n + 2 * quiet) * scale, (n + 2 * quiet) * scale), 255)
    draw = ImageDraw.Draw(img)
    for y, row in enumerate(matrix):
        for x, dark in enumerate(row):
            if dark:
                x0, y0 = (x + quiet) * scale, (y + quiet) * scale
                draw.rectangle((x0, y0, x0 + scale - 1, y0 + scale - 1), fill=0)
    return img


def decode(img: Image.Image) -> str:
    found = zxingcpp.read_barcodes(img)
    assert found, "no QR code found in the image"
    return str(found[0].text)


def test_png_decodes_to_the_login_url() -> None:
    """The PNG is a real image whose QR decodes to the URL."""
    data = qr_png(URL)
    assert data.startswith(b"\x89PNG")
    assert decode(Image.open(io.BytesIO(data))) == URL


def test_svg_decodes_to_the_login_url() -> None:
    """The SVG's squares, drawn back as pixels, decode to the URL."""
    svg = qr_svg(URL)
    n = int(re.search(r'viewBox="0 0 (\d+) \d+"', svg).group(1))  # type: ignore[union-attr]
    matrix = [[False] * n for _ in range(n)]
    for x, y in re.findall(r"M(\d+) (\d+)h1v1h-1z", svg):
        matrix[int(y)][int(x)] = True
    assert matrix == qr_matrix(URL, border=4)
    assert decode(image_of(matrix)) == URL


@pytest.mark.parametrize("invert", [True, False])
def test_terminal_text_decodes_to_the_login_url(invert: bool) -> None:
    """Each half-block character carries two modules; read back, they decode to the URL."""
    text = qr_terminal(URL, invert=invert)
    halves = {" ": (False, False), "▀": (True, False), "▄": (False, True), "█": (True, True)}
    matrix: list[list[bool]] = []
    for line in text.splitlines():
        cells = [halves[ch] for ch in line]
        # A drawn half is a light module when inverted (for light-on-dark consoles).
        matrix.append([top != invert for top, _ in cells])
        matrix.append([bottom != invert for _, bottom in cells])
    assert decode(image_of(matrix)) == URL

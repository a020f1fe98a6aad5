"""Draw the example campaigns' poster and mini-program cover (campaigns/media/*.png) with Pillow.

    python campaigns/media/make_poster.py            # rewrites poster_1111.png and cover_coupon.png beside it
    python campaigns/media/make_poster.py OUT_DIR    # or writes them into OUT_DIR

The images are committed; this script is how they were made, so anyone can change the words and draw them again.
Chinese text is drawn when a CJK font is found (Noto CJK, WenQuanYi, or `WECAST_CJK_FONT=/path/to/font`);
without one the poster is drawn in shapes and digits only, never with missing-glyph boxes. The PNGs are
palette-quantised so they stay small (tens of KB; WeCom's limit is 10 MB).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
RED, GOLD, CREAM, DARK = (200, 30, 45), (250, 200, 80), (255, 244, 225), (90, 10, 20)
CJK_FONTS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/msyh.ttc",
)
LATIN_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


def cjk_font() -> str | None:
    """A font file that draws Chinese, or None."""
    given = os.environ.get("WECAST_CJK_FONT")
    candidates = (given,) if given else CJK_FONTS
    return next((p for p in candidates if p and Path(p).is_file()), None)


def font(path: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path and Path(path).is_file():
        return ImageFont.truetype(path, size)
    return ImageFont.load_default(size)


def centred(
    draw: ImageDraw.ImageDraw,
    y: int,
    text: str,
    face: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    fill: tuple[int, int, int],
    width: int,
) -> None:
    left, _, right, _ = draw.textbbox((0, 0), text, font=face)
    draw.text(((width - (right - left)) // 2, y), text, font=face, fill=fill)


def poster(cjk: str | None) -> Image.Image:
    """A 750 x 1000 双十一 coupon poster: a red field, a gold coupon, the offer."""
    w, h = 750, 1000
    img = Image.new("RGB", (w, h), RED)
    d = ImageDraw.Draw(img)
    for i in range(12):  # rays behind the headline
        d.pieslice((-250, -450, w + 250, 650), i * 30, i * 30 + 12, fill=(215, 50, 60))
    d.ellipse((w // 2 - 215, 125, w // 2 + 215, 555), fill=GOLD)
    d.ellipse((w // 2 - 190, 150, w // 2 + 190, 530), fill=RED)
    centred(d, 245, "11.11", font(LATIN_FONT, 112), GOLD, w)
    d.rounded_rectangle((90, 590, w - 90, 820), radius=28, fill=CREAM)
    d.line((w // 2 + 80, 610, w // 2 + 80, 800), fill=RED, width=4)
    d.ellipse((w // 2 + 60, 570, w // 2 + 100, 610), fill=RED)
    d.ellipse((w // 2 + 60, 800, w // 2 + 100, 840), fill=RED)
    if cjk:
        centred(d, 30, "双十一会员日", font(cjk, 64), CREAM, w)
        centred(d, 400, "全场狂欢", font(cjk, 52), CREAM, w)
        d.text((130, 620), "满300减50", font=font(cjk, 64), fill=DARK)
        d.text((130, 720), "会员专享券", font=font(cjk, 44), fill=RED)
        d.text((w // 2 + 110, 675), "立即\n领取", font=font(cjk, 48), fill=RED, spacing=12)
        centred(d, 880, "11月9日—11月11日 全国门店同享", font(cjk, 36), CREAM, w)
    else:  # shapes and digits: no glyph boxes where Chinese would be
        d.text((130, 630), "300-50", font=font(LATIN_FONT, 80), fill=DARK)
        for x in range(w // 2 + 120, w - 110, 40):
            d.ellipse((x, 690, x + 24, 714), fill=RED)
        for x in range(120, w - 120, 60):
            d.rectangle((x, 880, x + 36, 916), fill=GOLD)
    return img


def cover(cjk: str | None) -> Image.Image:
    """A 500 x 400 mini-program cover (WeCom shows it at 5:4): a coupon on cream."""
    w, h = 500, 400
    img = Image.new("RGB", (w, h), CREAM)
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((40, 70, w - 40, h - 70), radius=24, fill=RED)
    d.line((w - 170, 90, w - 170, h - 90), fill=CREAM, width=4)
    d.text((70, 120), "¥50", font=font(LATIN_FONT, 110), fill=GOLD)
    if cjk:
        d.text((w - 150, 150), "领券", font=font(cjk, 52), fill=CREAM)
        d.text((70, 260), "满300可用", font=font(cjk, 36), fill=CREAM)
    else:
        d.ellipse((w - 140, 160, w - 60, 240), fill=GOLD)
    return img


def save(img: Image.Image, path: Path) -> None:
    img.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path.name}: {img.width}x{img.height}, {path.stat().st_size // 1024} KB")


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else HERE
    cjk = cjk_font()
    if cjk is None:
        print("no CJK font found (set WECAST_CJK_FONT): drawing shapes instead of Chinese text", file=sys.stderr)
    save(poster(cjk), out / "poster_1111.png")
    save(cover(cjk), out / "cover_coupon.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The rich example campaigns in campaigns/ (a poster image, a link card, a mini-program card) validate, preview
every part per recipient and send on the sandbox: each recipient receives each part once, the poster by the
committed file's content. The poster and cover are drawn by campaigns/media/make_poster.py, small PNGs."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import demo_workdir

from engine.cli import main
from engine.media import sniff

ROOT = Path(__file__).resolve().parent.parent
MEDIA = ROOT / "campaigns" / "media"
# campaign id -> the kinds of its parts, in order
EXAMPLES = {
    "double11_poster": ["image", "text"],
    "mall_link_1111": ["text", "link"],
    "coupon_miniprogram": ["text", "miniprogram"],
}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The shipped campaigns in a fresh folder, sending as fast as the sandbox takes them, at any hour."""
    return demo_workdir(tmp_path)


def wecast(workdir: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["-c", str(workdir / "config.yaml"), *args], catch_exceptions=False)
    return result.exit_code, result.stdout


def wecast_json(workdir: Path, *args: str) -> Any:
    code, out = wecast(workdir, *args, "--json")
    assert code == 0, out
    return json.loads(out)


def test_every_example_is_a_shipped_campaign() -> None:
    """The examples listed here are the campaigns in campaigns/ whose message has more than a text."""
    rich = {
        re.search(r"(?m)^id: (\S+)", p.read_text(encoding="utf-8")).group(1)  # type: ignore[union-attr]
        for p in (ROOT / "campaigns").glob("*.yaml")
        if "\n  parts:" in p.read_text(encoding="utf-8")
    }
    assert rich == set(EXAMPLES)


@pytest.mark.parametrize("campaign", sorted(EXAMPLES))
def test_example_previews_and_sends_every_part_once_per_recipient(workdir: Path, campaign: str) -> None:
    """Validation passes; the preview shows each recipient's parts rendered (the card's fields per recipient, the
    poster and the cover by name, size and hash); a run sends each recipient each part exactly once, and what the
    sandbox received is what the preview showed."""
    code, out = wecast(workdir, "validate")
    assert code == 0, out
    preview = wecast_json(workdir, "preview", campaign)
    recipients = preview["recipients"]
    assert preview["problems"] == [] and len(recipients) >= 5
    for r in recipients:
        assert [p["kind"] for p in r["parts"]] == EXAMPLES[campaign]
        [text] = [p["text"] for p in r["parts"] if p["kind"] == "text"]
        assert r["message"] == text and r["name"] and "{{" not in text.replace("{{ 7*7 }}", "")
    [run] = wecast_json(workdir, "run", campaign)
    assert run["status"] == "completed"
    assert run["counts"]["sent"] == len(recipients)
    outbox = wecast_json(workdir, "sandbox", "outbox", "--limit", "0")
    got = Counter((m["contact_id"], m["kind"]) for m in outbox)
    assert got == Counter((r["id"], kind) for r in recipients for kind in EXAMPLES[campaign])
    previewed = {(r["id"], p["kind"]): p for r in recipients for p in r["parts"]}
    for m in outbox:
        shown = previewed[(m["contact_id"], m["kind"])]
        if m["kind"] == "text":  # the outbox keeps a text as its text
            assert m["text"] == shown["text"]
        else:
            assert json.loads(m["part"]) == shown


def test_the_poster_is_sent_by_its_content(workdir: Path) -> None:
    """Every poster the sandbox received is the committed PNG: its sha256 and size."""
    poster = (MEDIA / "poster_1111.png").read_bytes()
    wecast_json(workdir, "run", "double11_poster")
    images = [m for m in wecast_json(workdir, "sandbox", "outbox", "--limit", "0") if m["kind"] == "image"]
    assert images
    assert {(m["content_hash"], m["size"]) for m in images} == {(hashlib.sha256(poster).hexdigest(), len(poster))}


def test_link_and_miniprogram_fields_are_rendered_per_recipient(workdir: Path) -> None:
    """The link's URL and title and the mini-program's page carry each recipient's own id and name."""
    for r in wecast_json(workdir, "preview", "mall_link_1111")["recipients"]:
        link = r["parts"][1]
        assert link["url"] == f"https://mall.example.com/1111?c={r['id']}"
        assert link["title"].endswith("的双十一专属会场") and "{{" not in link["title"].replace("{{ 7*7 }}", "")
    for r in wecast_json(workdir, "preview", "coupon_miniprogram")["recipients"]:
        mini = r["parts"][1]
        assert mini["page"] == f"pages/coupon/index?from=birthday&c={r['id']}"
        assert mini["thumb"]["name"] == "media/cover_coupon.png" and mini["thumb"]["mime"] == "image/png"


def test_preview_text_names_images_and_covers_with_their_size(workdir: Path) -> None:
    """The terminal preview lists the poster and the mini-program's cover by name and size."""
    code, out = wecast(workdir, "--lang", "en", "preview", "double11_poster")
    assert code == 0
    assert re.search(r"image media/poster_1111\.png \(\d+ KB\)", out)
    code, out = wecast(workdir, "--lang", "en", "preview", "coupon_miniprogram")
    assert code == 0
    assert re.search(r"cover media/cover_coupon\.png \(\d+ KB\)", out)


@pytest.mark.parametrize("name", ["poster_1111.png", "cover_coupon.png"])
def test_committed_images_are_small_pngs(name: str) -> None:
    """The committed poster and cover are PNGs by content and small (WeCom allows 10 MB; the repo wants ~100 KB)."""
    data = (MEDIA / name).read_bytes()
    assert sniff(data[:16]) == "image/png"
    assert len(data) <= 100 * 1024


def test_make_poster_draws_both_images(tmp_path: Path) -> None:
    """The script draws the poster and the cover into a folder it is given: PNGs of the committed sizes."""
    from PIL import Image

    done = subprocess.run(
        [sys.executable, str(MEDIA / "make_poster.py"), str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    for name in ("poster_1111.png", "cover_coupon.png"):
        with Image.open(tmp_path / name) as drawn, Image.open(MEDIA / name) as committed:
            assert (drawn.format, drawn.size) == ("PNG", committed.size)
        assert (tmp_path / name).stat().st_size <= 100 * 1024


def test_wecast_send_sends_the_text_then_the_poster(workdir: Path) -> None:
    """`wecast send CONTACT --text T --image poster.png`: the text, then the image by its content; an --image that
    is not a JPG/PNG by content is refused before anything is sent."""
    [contact] = [r["id"] for r in wecast_json(workdir, "preview", "double11_poster")["recipients"][:1]]
    poster = MEDIA / "poster_1111.png"
    [result] = [wecast_json(workdir, "send", contact, "--text", "会员日海报请查收", "--image", str(poster))]
    assert result["counts"] == {"sent": 1}
    got = [(m["kind"], m["content_hash"]) for m in wecast_json(workdir, "sandbox", "outbox", "--contact", contact)]
    assert [k for k, _ in got] == ["text", "image"]
    assert got[1][1] == hashlib.sha256(poster.read_bytes()).hexdigest()
    args = ["-c", str(workdir / "config.yaml"), "--lang", "en", "send", contact, "--image", str(ROOT / "README.md")]
    refused = CliRunner().invoke(main, args, catch_exceptions=False)
    assert refused.exit_code == 2
    assert "'README.md' is not a JPG or PNG image (by its content" in refused.stderr
    assert len(wecast_json(workdir, "sandbox", "outbox", "--contact", contact)) == 2


def test_test_to_an_unknown_contact_is_one_error_line(workdir: Path) -> None:
    """`wecast run CAMPAIGN --test-to NOSUCH` says there is no such contact, exit 1, and nothing else: it drew an
    empty "sending 0/?" progress bar first, as if something had started."""
    args = ["-c", str(workdir / "config.yaml"), "--lang", "en", "run", "double11_poster", "--test-to", "nosuch"]
    done = CliRunner().invoke(main, args, catch_exceptions=False)
    assert done.exit_code == 1
    assert done.stderr.strip() == "error: no contact nosuch (see `wecast contacts list`)", done.stderr
    assert wecast_json(workdir, "sandbox", "outbox", "--limit", "0") == []


def test_test_to_sends_the_exact_message_to_named_contacts_only(workdir: Path) -> None:
    """`wecast run CAMPAIGN --test-to A,B` sends every part to A and B only, in a run marked test, outside
    dedupe: the real run afterwards still reaches everyone, A and B included."""
    recipients = [r["id"] for r in wecast_json(workdir, "preview", "double11_poster")["recipients"]]
    named = recipients[:2]
    [test] = wecast_json(workdir, "run", "double11_poster", "--test-to", ",".join(named))
    assert test["counts"] == {"sent": 2}
    outbox = wecast_json(workdir, "sandbox", "outbox", "--limit", "0")
    assert Counter((m["contact_id"], m["kind"]) for m in outbox) == Counter(
        (cid, kind) for cid in named for kind in ("image", "text")
    )
    assert [r["trigger"] for r in wecast_json(workdir, "runs")] == ["test"]
    [real] = wecast_json(workdir, "run", "double11_poster")
    assert real["counts"]["sent"] == len(recipients)
    images = Counter(
        m["contact_id"] for m in wecast_json(workdir, "sandbox", "outbox", "--limit", "0") if m["kind"] == "image"
    )
    assert images == Counter(recipients) + Counter(named)

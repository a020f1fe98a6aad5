"""The message value (engine.messages): JSON round trips, content hashes and per-part idempotency keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.messages import FilePart, ImagePart, LinkPart, Media, Message, MiniProgramPart, PartKind, TextPart, part_key

POSTER = Media(name="poster.png", path=Path("/srv/campaigns/poster.png"), size=1234, sha256="ab" * 32, mime="image/png")


def rich() -> Message:
    return Message(
        (
            TextPart("王女士您好，店庆海报请查收"),
            ImagePart(POSTER),
            LinkPart("https://shop.example.com/sale", "店庆特卖", "全场八折", "https://shop.example.com/t.png"),
            MiniProgramPart("wx1234567890", "领券", "pages/coupon/index?id=42", thumb=POSTER, username="gh_abc"),
            FilePart(Media(name="menu.pdf", url="https://shop.example.com/menu.pdf")),
        )
    )


def test_json_round_trip_keeps_every_part() -> None:
    """A message written to the ledger as JSON reads back equal, part by part, with kinds first."""
    message = rich()
    data = message.to_json()
    assert [p["kind"] for p in data] == ["text", "image", "link", "miniprogram", "file"]
    assert Message.from_json(data) == message


def test_text_and_attachments() -> None:
    """`text` is the text part, `attachments` the rest; a text-only message says so."""
    message = rich()
    assert message.text == "王女士您好，店庆海报请查收"
    assert [p.kind for p in message.attachments] == [PartKind.IMAGE, PartKind.LINK, PartKind.MINIPROGRAM, PartKind.FILE]
    assert Message.of_text("hi").is_plain_text()
    assert not message.is_plain_text()


def test_content_hash_compares_media_by_content() -> None:
    """Two messages with the same image content (same hash, other path) group together; other text does not."""
    moved = Media(name="poster.png", path=Path("/elsewhere/p.png"), size=1234, sha256="ab" * 32, mime="image/png")
    a = Message((TextPart("店庆"), ImagePart(POSTER)))
    b = Message((TextPart("店庆"), ImagePart(moved)))
    c = Message((TextPart("店庆！"), ImagePart(POSTER)))
    assert a.content_hash() == b.content_hash()
    assert a.content_hash() != c.content_hash()


def test_part_keys() -> None:
    """A one-part message keeps the delivery's key; parts of a longer message get distinct keys."""
    assert part_key("c|r|7881", 0, 1) == "c|r|7881"
    keys = {part_key("c|r|7881", i, 3) for i in range(3)}
    assert len(keys) == 3


def test_media_names_exactly_one_source() -> None:
    """A Media is a local file or a URL, never both or neither."""
    with pytest.raises(ValueError, match="exactly one"):
        Media(name="x")
    with pytest.raises(ValueError, match="exactly one"):
        Media(name="x", path=Path("/a"), url="https://b")

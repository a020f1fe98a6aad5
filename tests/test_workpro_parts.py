"""Message parts as WorkPro requests (`engine.gateways.workpro.parts`): the FileBox JSON that npm file-box's
`fromJSON` reads on the server, link and mini-program payloads. Pure, no server."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from engine.errors import PermanentError
from engine.gateways.workpro.parts import (
    filebox_inline,
    filebox_name,
    filebox_url,
    filebox_uuid,
    mini_program,
    url_link,
)
from engine.messages import LinkPart, Media, MiniProgramPart


def test_inline_filebox_is_file_box_json() -> None:
    """An inline box has FileBoxType Base64 (1) under `type` and the pre-1.0 `boxType`, the name, the size and
    the content as base64 that decodes to the bytes."""
    data = bytes(range(256)) * 3
    box = json.loads(filebox_inline("价目表.pdf", data))
    assert (box["type"], box["boxType"], box["name"], box["size"]) == (1, 1, "价目表.pdf", len(data))
    assert base64.b64decode(box["base64"], validate=True) == data
    assert box["metadata"] == {}


def test_url_filebox() -> None:
    """A box by URL has FileBoxType Url (2) and the URL; the size only when known."""
    box = json.loads(filebox_url("poster.jpg", "https://img.example.com/p.jpg", 2048))
    assert (box["type"], box["boxType"], box["url"], box["size"]) == (2, 2, "https://img.example.com/p.jpg", 2048)
    assert "size" not in json.loads(filebox_url("poster.jpg", "https://img.example.com/p.jpg"))


def test_uuid_filebox_names_an_upload() -> None:
    """A box naming an upload has FileBoxType Uuid (7) under `type` and `boxType`, the upload's id, the name and
    the size — the shape file-box's `toJSON` gives `FileBoxUuid.fromUuid(uuid, {name, size})` (no md5 when
    unknown) — and carries no content."""
    box = json.loads(filebox_uuid("海报.png", "6f88b03c-1237-4f46-8db2-98ef23200551", 5242880))
    assert box == {
        "metadata": {},
        "name": "海报.png",
        "size": 5242880,
        "uuid": "6f88b03c-1237-4f46-8db2-98ef23200551",
        "type": 7,
        "boxType": 7,
    }


def test_image_names_carry_their_type() -> None:
    """The server tells images from files by the name's extension: an image without one gets its type's."""
    assert filebox_name(Media(name="海报", path=Path("x"), mime="image/png"), image=True) == "海报.png"
    assert filebox_name(Media(name="poster.JPG", path=Path("x"), mime="image/jpeg"), image=True) == "poster.JPG"
    assert filebox_name(Media(name="notes", path=Path("x")), image=False) == "notes"


def test_cards() -> None:
    """Link and mini-program cards map field by field; a mini-program cover must be a URL the puppet can fetch."""
    link = url_link(LinkPart("https://shop.example.com", "店庆", "八折", "https://img.example.com/t.jpg"))
    assert (link.url, link.title, link.description, link.thumbnail_url) == (
        "https://shop.example.com",
        "店庆",
        "八折",
        "https://img.example.com/t.jpg",
    )
    cover = Media(name="cover.jpg", url="https://img.example.com/c.jpg")
    card = mini_program(MiniProgramPart("wx4ff94de0d8038c25", "领券", "pages/c?id=1", cover, "gh_1@app", "desc"))
    assert (card.appid, card.title, card.page_path, card.thumb_url, card.username, card.description) == (
        "wx4ff94de0d8038c25",
        "领券",
        "pages/c?id=1",
        "https://img.example.com/c.jpg",
        "gh_1@app",
        "desc",
    )
    with pytest.raises(PermanentError, match="URL"):
        mini_program(MiniProgramPart("wx1", "领券", "pages/c", Media(name="c.jpg", path=Path("c.jpg"))))
    with pytest.raises(PermanentError, match="appid"):
        mini_program(MiniProgramPart("", "领券", "pages/c"))

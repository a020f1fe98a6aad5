"""Rich messages over HTTP, against a real uvicorn on loopback and the sandbox: `POST /api/v1/media` keeps a file
only when its content is a JPG/PNG (for an image) within WeCom's size, whatever its name, and refuses the rest
keeping nothing; `/send-message` and `/send-message-all` send the attachments after the text, each part once per
recipient, and refuse a bad part naming its field before anything is sent."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from engine.gateways.base import Capabilities
from engine.gateways.sandbox import SandboxGateway
from engine.messages import PartKind

try:
    from web_harness import LiveServer, login, make_settings
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.web_harness import LiveServer, login, make_settings

MB = 1024 * 1024


def png(color: tuple[int, int, int] = (200, 30, 45)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root: Path = tmp_path_factory.mktemp("rich-web")
    with LiveServer(make_settings(root, media_dir=str(root / "media"))) as server:
        login(server.client)
        yield server


@pytest.fixture
def client(live: LiveServer) -> httpx.Client:
    return live.client


def sandbox(live: LiveServer) -> SandboxGateway:
    assert isinstance(live.app.gateway, SandboxGateway)
    return live.app.gateway


def media_files(live: LiveServer) -> list[Path]:
    root = live.app.settings.media_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def upload(client: httpx.Client, body: Any, **params: str) -> httpx.Response:
    return client.post("/api/v1/media", params=params, content=body, headers={"content-type": "image/png"})


def friends(client: httpx.Client, n: int, offset: int = 0) -> list[str]:
    page = client.get("/api/v1/contacts", params={"friend": True, "coworker": False, "limit": n, "offset": offset})
    return [c["id"] for c in page.json()["items"]]


def test_an_upload_is_stored_once_by_its_content(live: LiveServer, client: httpx.Client) -> None:
    """A PNG is stored under its sha256 (201), the same bytes again are the same file (200, created false), and
    its type comes from the content, not from the name it was given."""
    data = png()
    first = upload(client, data, name="海报.jpg")
    assert first.status_code == 201, first.text
    body = first.json()
    assert body == {
        "id": hashlib.sha256(data).hexdigest(),
        "name": "海报.jpg",
        "kind": "image",
        "mime": "image/png",
        "size": len(data),
        "created": True,
    }
    again = upload(client, data, name="again.png")
    assert (again.status_code, again.json()["id"], again.json()["created"]) == (200, body["id"], False)
    assert live.app.media.get(body["id"]).path.read_bytes() == data  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("content", "params", "status", "words"),
    [
        (b"GIF89a" + b"\x00" * 100, {"name": "动图.png"}, 415, "is not a JPG or PNG image (by its content: image/gif)"),
        ("只是文字".encode(), {"name": "notes.png"}, 415, "not an image wecast recognises"),
        (b"%PDF-1.4 price list", {"name": "价目表.jpg"}, 415, "application/pdf"),
        (b"", {"name": "empty.png"}, 422, "is empty"),
    ],
    ids=["gif", "text-named-png", "pdf-named-jpg", "empty"],
)
def test_an_upload_that_is_not_an_image_is_refused_by_content(
    live: LiveServer, client: httpx.Client, content: bytes, params: dict[str, str], status: int, words: str
) -> None:
    """Whatever the name says, an image upload must be a JPG or PNG by its bytes; nothing of a refusal is kept."""
    before = media_files(live)
    answer = upload(client, content, **params)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]
    assert media_files(live) == before


def test_a_pdf_is_a_file_not_an_image(live: LiveServer, client: httpx.Client) -> None:
    """The same PDF is refused as an image and kept as a file (kind=file takes any content)."""
    pdf = b"%PDF-1.4 " + bytes(range(256)) * 4
    assert upload(client, pdf, name="价目表.pdf").status_code == 415
    kept = upload(client, pdf, name="价目表.pdf", kind="file")
    assert kept.status_code == 201 and kept.json()["mime"] == "application/pdf"


def streamed(data: bytes, chunk: int = MB) -> Iterator[bytes]:
    """The body in chunks without a Content-Length (chunked transfer): the limit is found while reading."""
    for i in range(0, len(data), chunk):
        yield data[i : i + chunk]


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize(("kind", "limit_mb"), [("image", 10), ("file", 20)])
def test_an_upload_over_wecoms_size_is_refused(
    live: LiveServer, client: httpx.Client, kind: str, limit_mb: int, declared: bool
) -> None:
    """An image over 10 MB or a file over 20 MB is a 413, whether the size is declared up front or found while the
    body streams in; nothing is kept (no partial upload left beside the store)."""
    before = media_files(live)
    big = b"\x89PNG\r\n\x1a\n" + b"\x00" * (limit_mb * MB - 7)  # one byte over
    answer = upload(client, big if declared else streamed(big), name="big.png", kind=kind)
    assert answer.status_code == 413, answer.text
    assert f"larger than {limit_mb} MB" in answer.json()["error"]
    assert media_files(live) == before


def test_an_upload_of_exactly_the_limit_is_kept(live: LiveServer, client: httpx.Client) -> None:
    """10 MB exactly is still an image WeCom takes."""
    exact = b"\x89PNG\r\n\x1a\n" + b"\x01" * (10 * MB - 8)
    answer = upload(client, streamed(exact), name="exact.png")
    assert answer.status_code == 201 and answer.json()["size"] == 10 * MB


def rich_body(client: httpx.Client) -> dict[str, Any]:
    """A caption with a poster, a price list, a link card and a mini-program card (its cover uploaded too)."""
    poster = upload(client, png((10, 120, 200)), name="poster.png").json()["id"]
    cover = upload(client, png((250, 200, 80)), name="cover.png").json()["id"]
    prices = upload(client, b"%PDF-1.4 prices", name="价目表.pdf", kind="file").json()["id"]
    return {
        "message": "双十一会员日，海报和会场请查收",
        "attachments": [
            {"kind": "image", "media_id": poster},
            {"kind": "file", "media_id": prices},
            {
                "kind": "link",
                "url": "https://mall.example.com/1111",
                "title": "双十一主会场",
                "description": "满300减50",
            },
            {
                "kind": "miniprogram",
                "appid": "wx1234567890abcdef",
                "title": "领取会员券",
                "page": "pages/coupon/index?from=api",
                "thumbnail_media_id": cover,
            },
        ],
    }


KINDS = [PartKind.TEXT, PartKind.IMAGE, PartKind.FILE, PartKind.LINK, PartKind.MINIPROGRAM]


def received(live: LiveServer, contact_id: str) -> list[tuple[str, str]]:
    return [(m.kind, m.content_hash) for m in sandbox(live).outbox_messages(contact_id)]


def test_send_message_sends_the_text_then_every_attachment_once(live: LiveServer, client: httpx.Client) -> None:
    """/send-message: the text, then each attachment in order, each once; the poster and price list by content;
    a retry under the same Idempotency-Key sends nothing again."""
    body = rich_body(client)
    [contact] = friends(client, 1, offset=7)
    headers = {"Idempotency-Key": "rich-once"}
    answer = client.post("/send-message", json={"id": contact, **body}, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["sent"] == 1
    got = sandbox(live).outbox_messages(contact)
    assert [m.kind for m in got] == KINDS
    media = {a["kind"]: a.get("media_id") for a in body["attachments"]}
    assert got[1].content_hash == media["image"] and got[2].content_hash == media["file"]
    mini = json.loads(got[4].part)
    assert (mini["page"], mini["thumb"]["sha256"]) == (
        "pages/coupon/index?from=api",
        body["attachments"][3]["thumbnail_media_id"],
    )
    again = client.post("/send-message", json={"id": contact, **body}, headers=headers)
    assert again.status_code == 200 and again.json()["replayed"] is True
    assert len(sandbox(live).outbox_messages(contact)) == len(KINDS)


def test_send_message_all_sends_every_part_to_every_recipient(live: LiveServer, client: httpx.Client) -> None:
    """/send-message-all to a list of ids: each recipient receives each part exactly once."""
    body = rich_body(client)
    ids = friends(client, 4, offset=12)
    before = Counter((m.contact_id, m.kind) for m in sandbox(live).outbox_messages())
    answer = client.post("/send-message-all", json={"ids": ids, **body})
    assert answer.status_code == 200, answer.text
    assert answer.json()["sent"] == len(ids)
    after = Counter((m.contact_id, m.kind) for m in sandbox(live).outbox_messages())
    assert after - before == Counter((cid, kind) for cid in ids for kind in KINDS)


def test_attachments_only_need_no_text(live: LiveServer, client: httpx.Client) -> None:
    """A poster alone (no `message`) is a message of one image part."""
    body = rich_body(client)
    [contact] = friends(client, 1, offset=20)
    answer = client.post("/send-message", json={"id": contact, "attachments": body["attachments"][:1]})
    assert answer.status_code == 200, answer.text
    assert [k for k, _ in received(live, contact)] == [PartKind.IMAGE]


def bad_attachment(client: httpx.Client, index: int, change: dict[str, Any]) -> dict[str, Any]:
    body = rich_body(client)
    body["attachments"][index] = {**body["attachments"][index], **change}
    return body


@pytest.mark.parametrize(
    ("index", "change", "field", "words"),
    [
        (0, {"media_id": "0" * 64}, "attachments[0]", "no stored media"),
        (0, {"media_id": "../../etc/passwd"}, "attachments[0]", "64 hex digits"),
        (1, {"kind": "image"}, "attachments[1]", "is not a JPG or PNG"),  # a stored PDF sent as an image
        (2, {"url": "http://mall.example.com"}, "attachments[2].url", "is not an https URL"),
        (2, {"title": "双十一" * 15}, "attachments[2].title", "longer than 128 bytes"),
        (2, {"title": "  "}, "attachments[2].title", "is empty"),
        (3, {"appid": " "}, "attachments[3].appid", "AppID"),
        (3, {"title": "领取会员券" * 5}, "attachments[3].title", "longer than 64 bytes"),
        (3, {"thumbnail_media_id": None}, "attachments[3].thumbnail", "give media_id"),
    ],
    ids=[
        "unknown-media",
        "not-a-media-id",
        "pdf-as-image",
        "http-link",
        "long-link-title",
        "empty-link-title",
        "empty-appid",
        "long-miniprogram-title",
        "no-cover",
    ],
)
def test_a_bad_attachment_is_a_422_naming_it_and_nothing_is_sent(
    live: LiveServer, client: httpx.Client, index: int, change: dict[str, Any], field: str, words: str
) -> None:
    """Each bad part is refused before anything is planned, with the field in the answer; nobody receives the
    message's other parts either."""
    [contact] = friends(client, 1, offset=25)
    body = bad_attachment(client, index, change)
    for path, extra in (("/send-message", {"id": contact}), ("/send-message-all", {"ids": [contact]})):
        answer = client.post(path, json={**extra, **body})
        assert answer.status_code == 422, answer.text
        assert field in answer.text and words in answer.text, answer.text
    assert received(live, contact) == []


def test_ten_attachments_are_refused(live: LiveServer, client: httpx.Client) -> None:
    """WeCom's 群发 carries at most nine attachments: a tenth is a 422 on `attachments`."""
    [contact] = friends(client, 1, offset=26)
    link = {"kind": "link", "url": "https://mall.example.com", "title": "会场"}
    answer = client.post("/send-message", json={"id": contact, "message": "您好", "attachments": [link] * 10})
    assert answer.status_code == 422 and "attachments" in answer.text
    assert received(live, contact) == []


def test_a_part_the_gateway_cannot_send_is_refused(
    live: LiveServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a gateway that sends no mini-programs, an attachment of one is a 422 naming the gateway, not a failed send."""
    body = rich_body(client)
    gateway = sandbox(live)
    only = Capabilities(supports=frozenset({PartKind.TEXT, PartKind.IMAGE, PartKind.FILE, PartKind.LINK}))
    monkeypatch.setattr(type(gateway), "capabilities", property(lambda self: only))
    [contact] = friends(client, 1, offset=27)
    answer = client.post("/send-message", json={"id": contact, **body})
    assert answer.status_code == 422
    assert "attachments[3]" in answer.text and "cannot send miniprogram parts" in answer.text
    assert received(live, contact) == []


def test_a_local_cover_is_refused_where_covers_go_by_url(
    live: LiveServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a gateway that takes mini-program covers by URL only (WorkPro), an uploaded cover is a 422 on the
    attachment's thumbnail; the same card with an https cover is sent."""
    body = rich_body(client)
    gateway = sandbox(live)
    url_only = Capabilities(supports=frozenset(PartKind), local_covers=False)
    monkeypatch.setattr(type(gateway), "capabilities", property(lambda self: url_only))
    [contact] = friends(client, 1, offset=28)
    answer = client.post("/send-message", json={"id": contact, **body})
    assert answer.status_code == 422
    assert "attachments[3].thumbnail" in answer.text and "by https URL only" in answer.text
    assert received(live, contact) == []
    card = {**body["attachments"][3], "thumbnail_media_id": None, "thumbnail_url": "https://cdn.example.com/c.jpg"}
    sent = client.post("/send-message", json={"id": contact, "attachments": [card]})
    assert sent.status_code == 200, sent.text
    assert [k for k, _ in received(live, contact)] == [PartKind.MINIPROGRAM]

"""The message a customer receives: a typed value the whole pipeline carries, from the campaign to the gateway.

A `Message` is an ordered tuple of parts, as WeCom's 群发 allows: at most one text and up to nine attachments.

    Message
    ├── TextPart          the rendered text
    ├── ImagePart         a JPG/PNG (Media), ≤ 10 MB
    ├── LinkPart          a link card: url, title, description, thumbnail url
    ├── MiniProgramPart   appid, title, page path (query templated), cover image (Media)
    └── FilePart          any file (Media), ≤ 20 MB

Parts here are *rendered*: every templated field has already been filled in the sandbox (engine.render). Media is
described, not loaded: a `Media` names a file (checked to be under the campaigns folder, or in wecast's media store)
or an https URL, with its size and content hash, and gateways read it once per campaign (`Media.read()` is cached
by hash in the gateway), never once per recipient.

Ledger and dedupe (issue 10): a delivery's message is stored with it; the dispatcher sends the parts one by one
and records each part's gateway id, so a crash between two parts resends only the parts not yet sent. Each part has
its own idempotency key: `part_key(delivery_key, index)`. The dedupe key and the frequency cap count a message once,
however many parts it has.

This module is a leaf: it imports nothing from the engine but `engine.errors`, so gateways and storage-facing code
can both use it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

MAX_ATTACHMENTS = 9
IMAGE_MAX_BYTES = 10 * 1024 * 1024
FILE_MAX_BYTES = 20 * 1024 * 1024
IMAGE_TYPES = ("image/jpeg", "image/png")
LINK_TITLE_MAX = 128  # WeCom: link.title ≤ 128 bytes (see shared/reference/wecom_api.md)
LINK_DESC_MAX = 512
MINIPROGRAM_TITLE_MAX = 64


class PartKind(StrEnum):
    TEXT = "text"
    IMAGE = "image"
    LINK = "link"
    MINIPROGRAM = "miniprogram"
    FILE = "file"


@dataclass(frozen=True)
class Media:
    """A file to send: a local file (`path`) or an https URL (`url`); exactly one is set.

    `sha256` and `size` describe the content (known for local files; for URLs when the campaign declares them or
    after a first download). `mime` is detected from the content, not from the name.
    """

    name: str
    path: Path | None = None
    url: str | None = None
    size: int = 0
    sha256: str = ""
    mime: str = ""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.url is None):
            raise ValueError("a Media names exactly one of a local path or a URL")

    def read(self) -> bytes:
        """The content of a local file (URL media is fetched by the gateway or handed over as a URL)."""
        if self.path is None:
            raise ValueError(f"{self.name} is a URL, not a local file")
        return self.path.read_bytes()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "url": self.url,
            "size": self.size,
            "sha256": self.sha256,
            "mime": self.mime,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Media:
        path = data.get("path")
        return cls(
            name=str(data.get("name") or ""),
            path=Path(path) if path else None,
            url=data.get("url"),
            size=int(data.get("size") or 0),
            sha256=str(data.get("sha256") or ""),
            mime=str(data.get("mime") or ""),
        )


@dataclass(frozen=True)
class TextPart:
    text: str
    kind: PartKind = field(default=PartKind.TEXT, init=False)


@dataclass(frozen=True)
class ImagePart:
    media: Media
    kind: PartKind = field(default=PartKind.IMAGE, init=False)


@dataclass(frozen=True)
class FilePart:
    media: Media
    kind: PartKind = field(default=PartKind.FILE, init=False)


@dataclass(frozen=True)
class LinkPart:
    url: str
    title: str
    description: str = ""
    thumb_url: str = ""
    kind: PartKind = field(default=PartKind.LINK, init=False)


@dataclass(frozen=True)
class MiniProgramPart:
    appid: str
    title: str
    page: str  # the page path with its (rendered) query, e.g. "pages/coupon/index?id=42"
    thumb: Media | None = None  # the cover image; WeCom requires one for 群发 (uploaded as pic_media_id)
    username: str = ""  # the mini-program's original id (gh_…), which the WorkPro puppet's payload carries
    description: str = ""
    kind: PartKind = field(default=PartKind.MINIPROGRAM, init=False)


Part = TextPart | ImagePart | FilePart | LinkPart | MiniProgramPart


@dataclass(frozen=True)
class Message:
    """What one recipient receives: an ordered tuple of rendered parts."""

    parts: tuple[Part, ...]

    @classmethod
    def of_text(cls, text: str) -> Message:
        return cls((TextPart(text),))

    @property
    def text(self) -> str:
        """The text part ('' when the message has none)."""
        for part in self.parts:
            if isinstance(part, TextPart):
                return part.text
        return ""

    @property
    def kinds(self) -> frozenset[PartKind]:
        return frozenset(p.kind for p in self.parts)

    @property
    def attachments(self) -> tuple[Part, ...]:
        return tuple(p for p in self.parts if not isinstance(p, TextPart))

    def is_plain_text(self) -> bool:
        return len(self.parts) == 1 and isinstance(self.parts[0], TextPart)

    def to_json(self) -> list[dict[str, Any]]:
        """A JSON-ready list of parts (stable keys; `kind` first) for the ledger, the API and `--json`."""
        out: list[dict[str, Any]] = []
        for part in self.parts:
            data = {k: v for k, v in asdict(part).items() if k != "kind"}
            for key in ("media", "thumb"):
                media = getattr(part, key, None)
                if media is not None:
                    data[key] = media.to_json()
            out.append({"kind": part.kind.value, **data})
        return out

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> Message:
        parts: list[Part] = []
        for item in data:
            kind = PartKind(item["kind"])
            fields = {k: v for k, v in item.items() if k != "kind"}
            if kind is PartKind.TEXT:
                parts.append(TextPart(str(fields["text"])))
            elif kind is PartKind.IMAGE:
                parts.append(ImagePart(Media.from_json(fields["media"])))
            elif kind is PartKind.FILE:
                parts.append(FilePart(Media.from_json(fields["media"])))
            elif kind is PartKind.LINK:
                parts.append(LinkPart(**fields))
            else:
                thumb = fields.pop("thumb", None)
                parts.append(MiniProgramPart(**fields, thumb=Media.from_json(thumb) if thumb else None))
        return cls(tuple(parts))

    def dumps(self) -> str:
        """The message as compact JSON text: what a delivery stores (`deliveries.message`)."""
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def loads(cls, text: str) -> Message:
        """A message from `dumps`' text."""
        return cls.from_json(json.loads(text))

    def content_hash(self) -> str:
        """Equal for messages with identical content (media by content hash): what 群发 grouping compares."""
        return _hash([_by_content(item) for item in self.to_json()])

    def part_hashes(self) -> list[str]:
        """The content hash of each part, in order (media by content): what the ledger records per part sent."""
        return [_hash(_by_content(item)) for item in self.to_json()]


def _by_content(item: dict[str, Any]) -> dict[str, Any]:
    """A part's JSON with its media named by content (sha256), else by URL or path."""
    for key in ("media", "thumb"):
        media = item.get(key)
        if media:
            item[key] = media["sha256"] or media["url"] or media["path"]
    return item


def _hash(value: object) -> str:
    blob = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def part_key(delivery_key: str, index: int, count: int) -> str:
    """The idempotency key of part `index` of a message with `count` parts. A one-part message keeps the
    delivery's key, so plain-text sends keep the keys they always had (the sandbox outbox dedupes on them)."""
    return delivery_key if count == 1 else f"{delivery_key}#{index}"


def describe(part: Part) -> str:
    """One line for people: what a part is (`image poster.png (312 KB)`, `link 店庆特卖 <https://…>`)."""
    if isinstance(part, TextPart):
        return part.text
    if isinstance(part, ImagePart | FilePart):
        size = f" ({_size(part.media.size)})" if part.media.size else ""
        where = f" <{part.media.url}>" if part.media.url else ""
        return f"{part.kind.value} {part.media.name}{size}{where}"
    if isinstance(part, LinkPart):
        desc = f" – {part.description}" if part.description else ""
        return f"link {part.title}{desc} <{part.url}>"
    cover = (
        f" cover {part.thumb.name}" + (f" ({_size(part.thumb.size)})" if part.thumb.size else "") if part.thumb else ""
    )
    return f"mini-program {part.title} ({part.appid}) {part.page}{cover}"


def _size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MB"
    if n >= 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n} bytes"

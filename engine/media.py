"""Files a message carries: recognised by their content, hashed once, and kept where the engine can trust them.

* `sniff(head)` names a file's type from its first bytes (never from its name): an image part must be a JPEG or
  a PNG, whatever it is called.
* `describe(checked, kind)` turns a campaign file that `engine.paths` has already confined and size-checked into
  a `Media` (size, sha256, type): the file is read once, in chunks, so a 10 MB poster never sits in memory, and
  the answer is remembered per (device, inode, size, mtime) so reloading campaigns does not hash it again.
* `MediaStore` keeps what API users upload (`POST /api/v1/media`) and what `wecast send --image` is given: one
  file per content, named by its sha256 under the data directory (`<media_dir>/ab/ab12…`, with the original
  name and type beside it in `ab12….json`). A stored file never changes, so a delivery planned with it sends
  exactly what was checked.

Sizes follow WeCom's limits (`engine.messages`: image ≤ 10 MB, file ≤ 20 MB).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import tempfile
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass
from pathlib import Path

from engine.i18n import tr
from engine.messages import FILE_MAX_BYTES, IMAGE_MAX_BYTES, IMAGE_TYPES, Media, PartKind
from engine.paths import CampaignFile, CampaignFileError, file_kind

CHUNK = 1024 * 1024
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF-", "application/pdf"),
    (b"PK\x03\x04", "application/zip"),  # also docx, xlsx, pptx
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),  # doc, xls, ppt
)
MEDIA_ID = re.compile(r"^[0-9a-f]{64}$")


def sniff(head: bytes) -> str:
    """The type of a file from its first bytes ("application/octet-stream" when unrecognised)."""
    for signature, mime in _SIGNATURES:
        if head.startswith(signature):
            return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def max_bytes(kind: PartKind) -> int:
    """The largest file a part of this kind may carry (WeCom's limits)."""
    return FILE_MAX_BYTES if kind is PartKind.FILE else IMAGE_MAX_BYTES


def check_type(kind: PartKind, mime: str, name: str) -> None:
    """Refuse content a part of `kind` cannot carry: images must be JPEG or PNG. Raises MediaError."""
    if kind is not PartKind.FILE and mime not in IMAGE_TYPES:
        what = tr("not an image wecast recognises") if mime == "application/octet-stream" else mime
        raise MediaTypeRefused(
            tr("{name} is not a JPG or PNG image (by its content: {what})", name=repr(name), what=what)
        )


class MediaError(ValueError):
    """A file cannot be used as a message part; `str(e)` says why (never the file's content)."""


class MediaTooLarge(MediaError):
    """Over WeCom's size limit for its kind."""


class MediaTypeRefused(MediaError):
    """Content a part of its kind cannot carry (an image that is not a JPG or PNG)."""


_described: dict[tuple[int, int, int, int, str], Media] = {}


def describe(checked: CampaignFile, kind: PartKind) -> Media:
    """The `Media` of a campaign file `engine.paths` has checked: its sha256 and type read from the content, once
    per version of the file. Raises MediaError (wrong type) or CampaignFileError (changed while read)."""
    info = os.stat(checked.path)
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, kind.value)
    known = _described.get(key)
    if known is not None and known.path == checked.path:
        return Media(name=checked.name, path=known.path, size=known.size, sha256=known.sha256, mime=known.mime)
    digest = hashlib.sha256()
    size = 0
    head = b""
    with checked.open() as handle:
        while chunk := handle.read(CHUNK):
            if not head:
                head = chunk[:16]
            digest.update(chunk)
            size += len(chunk)
            if size > checked.max_bytes:
                raise CampaignFileError(
                    tr(
                        "{kind} {name} grew past the size limit while read",
                        kind=file_kind(kind.value),
                        name=repr(checked.name),
                    )
                )
    if size == 0:
        raise MediaError(tr("{kind} {name} is empty", kind=file_kind(kind.value), name=repr(checked.name)))
    mime = sniff(head)
    check_type(kind, mime, checked.name)
    media = Media(name=checked.name, path=checked.path, size=size, sha256=digest.hexdigest(), mime=mime)
    _described[key] = media
    return media


@dataclass(frozen=True)
class Stored:
    """A file in the media store: its id (the sha256 of its content) and its `Media`."""

    id: str
    media: Media
    created: bool  # False: the same content was stored before


class MediaStore:
    """Uploaded files, one per content, under `root` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, media_id: str) -> Path:
        return self.root / media_id[:2] / media_id

    def get(self, media_id: str) -> Media:
        """The stored file `media_id`. Raises MediaError when there is none (or the id is not one)."""
        media_id = media_id.strip().lower()
        if not MEDIA_ID.match(media_id):
            raise MediaError(tr("a media id is the 64 hex digits POST /api/v1/media returned"))
        path = self._path(media_id)
        try:
            meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            size = path.stat().st_size
        except (OSError, ValueError):
            raise MediaError(tr("no stored media {id}; upload it with POST /api/v1/media", id=media_id)) from None
        return Media(name=str(meta["name"]), path=path, size=size, sha256=media_id, mime=str(meta["mime"]))

    def save(self, chunks: Iterable[bytes], name: str, kind: PartKind) -> Stored:
        """Store content given in chunks as a part of `kind`: at most that kind's size, of a type it can carry
        (read from the content). Raises MediaError; nothing is kept of a refused file."""
        with self._receiving(name, kind) as receiving:
            for chunk in chunks:
                receiving.add(chunk)
            return receiving.keep()

    async def save_stream(self, chunks: AsyncIterable[bytes], name: str, kind: PartKind) -> Stored:
        """`save` for content arriving asynchronously (an HTTP upload): the size limit stops reading at once, and
        the writing and hashing run in a worker thread, off the event loop."""
        receiving = await asyncio.to_thread(self._receiving, name, kind)
        with receiving:
            async for chunk in chunks:
                if chunk:
                    await asyncio.to_thread(receiving.add, chunk)
            return await asyncio.to_thread(receiving.keep)

    def _receiving(self, name: str, kind: PartKind) -> _Receiving:
        clean = _clean_name(name)
        self.root.mkdir(parents=True, exist_ok=True)
        return _Receiving(self, clean, kind)


class _Receiving:
    """One upload being written to a temporary file beside the store, hashed and measured as it arrives."""

    def __init__(self, store: MediaStore, name: str, kind: PartKind) -> None:
        self.store, self.name, self.kind = store, name, kind
        self.limit = max_bytes(kind)
        self.digest = hashlib.sha256()
        self.size = 0
        self.head = b""
        fd, tmp = tempfile.mkstemp(dir=store.root, prefix=".upload-")
        self.tmp = Path(tmp)
        self.handle = os.fdopen(fd, "wb")

    def __enter__(self) -> _Receiving:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()
        self.tmp.unlink(missing_ok=True)

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise MediaTooLarge(
                tr("{name} is larger than {mb} MB, WeCom's limit", name=repr(self.name), mb=self.limit // (1024 * 1024))
            )
        if len(self.head) < 16:
            self.head += chunk[: 16 - len(self.head)]
        self.digest.update(chunk)
        self.handle.write(chunk)

    def keep(self) -> Stored:
        if self.size == 0:
            raise MediaError(tr("{name} is empty", name=repr(self.name)))
        mime = sniff(self.head)
        check_type(self.kind, mime, self.name)
        self.handle.close()
        media_id = self.digest.hexdigest()
        path = self.store._path(media_id)
        path.parent.mkdir(exist_ok=True)
        meta = path.with_suffix(".json")
        created = not path.exists()
        if created:
            os.chmod(self.tmp, 0o444)  # a stored file never changes
            os.replace(self.tmp, path)
        # The name and type of the latest upload of this content (the content, which is what is sent, is the same).
        meta.write_text(json.dumps({"name": self.name, "mime": mime}, ensure_ascii=False), encoding="utf-8")
        media = Media(name=self.name, path=path, size=self.size, sha256=media_id, mime=mime)
        return Stored(media_id, media, created)


def _clean_name(name: str) -> str:
    """A file name safe to show and to hand to a gateway: its last path component, without control characters."""
    base = re.split(r"[\\/]", name.strip())[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()[:200]
    return base or "file"

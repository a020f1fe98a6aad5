"""Message parts as WorkPro requests (pure): images and files as FileBox JSON for `MessageSendFile`, link cards as
`UrlLinkPayload` for `MessageSendUrl`, mini-program cards as `MiniProgramPayload` for `MessageSendMiniProgram`.

The FileBox JSON is what npm `file-box` 1.x's `toJSON()` writes and `FileBox.fromJSON()` (on the server) reads:

    {"metadata": {}, "name": "poster.jpg", "size": 5242880, "base64": "...", "type": 1, "boxType": 1}   inline
    {"metadata": {}, "name": "poster.jpg", "url": "https://...", "type": 2, "boxType": 2}              by URL
    {"metadata": {}, "name": "poster.jpg", "size": 5242880, "uuid": "6f88b03c-...", "type": 7, "boxType": 7}
                                                                                      uploaded (the Upload RPC)

(`type` is FileBoxType: 1 Base64, 2 Url, 7 Uuid; `boxType` repeats it for servers older than file-box 1.0; `size`
is left out when unknown.) Juzi's own client sends local content only the third way: it streams the bytes with
`Upload` first and sends the box naming the upload (wechaty-puppet-service `normalizeFileBoxUuid`, whose
`FileBoxUuid.fromUuid(uuid, {md5, name, size})` leaves `md5` out when unknown, as here).
The server treats a box as an image or a file by the name's extension, so an image's name is given the extension
of its type.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from engine.errors import PermanentError
from engine.gateways.proto import puppet_pb2 as pb
from engine.messages import FilePart, ImagePart, LinkPart, Media, MiniProgramPart

FILEBOX_BASE64 = 1
FILEBOX_URL = 2
FILEBOX_UUID = 7
IMAGE_EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png"}


def filebox_name(media: Media, *, image: bool) -> str:
    """The name the FileBox carries: the media's own, with the image type's extension when it lacks one."""
    name = media.name or (media.path.name if media.path else "") or "file"
    if image:
        lower = name.lower()
        if not lower.endswith((".jpg", ".jpeg", ".png")):
            name += IMAGE_EXTENSIONS.get(media.mime, ".jpg")
    return name


def _box(fields: dict[str, Any], box_type: int) -> str:
    return json.dumps(
        {"metadata": {}, **fields, "type": box_type, "boxType": box_type}, ensure_ascii=False, separators=(",", ":")
    )


def filebox_inline(name: str, data: bytes) -> str:
    """A FileBox carrying the content itself (base64)."""
    return _box({"name": name, "size": len(data), "base64": base64.b64encode(data).decode("ascii")}, FILEBOX_BASE64)


def filebox_url(name: str, url: str, size: int = 0) -> str:
    """A FileBox the server fetches from `url` (size when known)."""
    fields: dict[str, Any] = {"name": name, "url": url}
    if size > 0:
        fields["size"] = size
    return _box(fields, FILEBOX_URL)


def filebox_uuid(name: str, uuid: str, size: int) -> str:
    """A FileBox naming content uploaded before with the Upload RPC (`uuid` is the upload's id)."""
    return _box({"name": name, "size": size, "uuid": uuid}, FILEBOX_UUID)


def describe(part: ImagePart | FilePart | LinkPart | MiniProgramPart) -> str:
    """How a refusal names the part: "the image poster.jpg", "the link card 店庆"."""
    if isinstance(part, ImagePart):
        return f"the image {part.media.name}"
    if isinstance(part, FilePart):
        return f"the file {part.media.name}"
    if isinstance(part, LinkPart):
        return f"the link card {part.title!r}"
    return f"the mini-program card {part.title!r}"


def url_link(part: LinkPart) -> pb.UrlLinkPayload:
    if not part.url or not part.title:
        raise PermanentError("a link card needs a url and a title")
    return pb.UrlLinkPayload(url=part.url, title=part.title, description=part.description, thumbnail_url=part.thumb_url)


def mini_program(part: MiniProgramPart) -> pb.MiniProgramPayload:
    """The card's payload. The puppet runs on juzi's servers: its cover must be a URL it can fetch."""
    if not part.appid or not part.title:
        raise PermanentError("a mini-program card needs an appid and a title")
    thumb_url = ""
    if part.thumb is not None:
        if part.thumb.url is None:
            raise PermanentError(
                f"WorkPro takes a mini-program cover by URL only, and {part.thumb.name} is a local file: "
                "give the cover as an https URL"
            )
        thumb_url = part.thumb.url
    return pb.MiniProgramPayload(
        appid=part.appid,
        title=part.title,
        page_path=part.page,
        description=part.description,
        username=part.username,
        thumb_url=thumb_url,
    )

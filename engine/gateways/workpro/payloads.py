"""What WorkPro sends us, parsed: event payloads (JSON text inside `EventResponse.payload`) into small typed values,
and contact payloads into `ContactRecord`. Pure functions: no gRPC calls, no state, nothing that can fail loudly —
the server's payloads vary (`shared/reference/workpro_puppet.md` §2.3, §8.15), so odd values become defaults.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from engine.gateways.base import ContactRecord
from engine.gateways.proto import puppet_pb2 as pb

log = logging.getLogger("wecast.gateway.workpro")

# ScanStatus (juzi/wechaty-puppet src/schemas/event.ts)
SCAN_UNKNOWN, SCAN_CANCEL, SCAN_WAITING, SCAN_SCANNED, SCAN_CONFIRMED, SCAN_TIMEOUT, SCAN_IDLE = range(7)
SCAN_TYPE_VERIFY = 2  # ScanType.Verify (UNCERTAIN whether WorkPro fills `type`)
# VerifyCodeStatus (src/schemas/verify-code.ts); VerifySlideStatus (verify-slide.ts) shares 1 and 2
VERIFY_WAITING, VERIFY_EXPIRED, VERIFY_WRONG = 1, 2, 3
# VerifyCodeScene / VerifySlideScene
SCENE_UNKNOWN, SCENE_LOGIN = 0, 1

_INVISIBLE = re.compile(r"[\s\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")


def clean_verify_code(code: str) -> str:
    """The code as WorkPro wants it: a string with every space, newline and invisible character removed."""
    text = unicodedata.normalize("NFKC", str(code))  # full-width digits from a Chinese IME -> ASCII
    return "".join(ch for ch in _INVISIBLE.sub("", text) if unicodedata.category(ch)[0] not in ("C", "Z"))


def qr_key(url: str) -> str | None:
    """The `key` query parameter of a WeCom QR URL (it equals the VERIFY_CODE event's id)."""
    try:
        values = parse_qs(urlsplit(url).query).get("key")
    except ValueError:
        return None
    return values[0] if values else None


def first_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of a server message: never a JavaScript stack trace, never a novel."""
    for line in (text or "").splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return ""


def parse_payload(raw: str) -> dict[str, Any]:
    """An event payload (JSON text) as a dict; tolerant of empty or broken payloads."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        log.warning("workpro event payload is not JSON: %.200r", raw)
        return {}
    return value if isinstance(value, dict) else {"data": value}


def _int(value: Any, default: int) -> int:
    if isinstance(value, bool):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _str(payload: dict[str, Any], *keys: str) -> str:
    """The first of `keys` that holds a non-empty value, as text (juzi sends camelCase; some servers snake_case)."""
    for key in keys:
        value = payload.get(key)
        if value not in (None, ""):
            return str(value)
    return ""


# -- events -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanEvent:
    """SCAN(22): a QR to show (status 2), or the phone's progress with it."""

    status: int
    url: str = ""
    key: str | None = None  # the QR URL's `key` (= the VERIFY_CODE id), when it has one
    type: int | None = None  # ScanType, when the server fills it

    @property
    def shows_qr(self) -> bool:
        return self.status == SCAN_WAITING or (self.status == SCAN_UNKNOWN and bool(self.url))

    @property
    def verification(self) -> bool:
        """The QR is WeCom's "new device" security check (by URL marker or ScanType.Verify)."""
        return "secondaryequipment" in self.url.lower() or self.type == SCAN_TYPE_VERIFY


def parse_scan(payload: dict[str, Any]) -> ScanEvent:
    url = _str(payload, "qrcode")
    type_ = payload.get("type")
    return ScanEvent(
        status=_int(payload.get("status"), SCAN_UNKNOWN),
        url=url,
        key=qr_key(url) or _str(payload, "qrcodeKey") or None,
        type=_int(type_, 0) if type_ is not None else None,
    )


@dataclass(frozen=True)
class VerifyCodeEvent:
    """VERIFY_CODE(33): the phone shows a 6-digit code for the QR whose key is `id`."""

    id: str
    status: int = VERIFY_WAITING
    scene: int = 0
    message: str = ""


def parse_verify_code(payload: dict[str, Any]) -> VerifyCodeEvent:
    return VerifyCodeEvent(
        id=_str(payload, "id"),
        status=_int(payload.get("status"), VERIFY_WAITING),
        scene=_int(payload.get("scene"), 0),
        message=_str(payload, "message"),
    )


@dataclass(frozen=True)
class VerifySlideEvent:
    """VERIFY_SLIDE(34): WeCom wants a slider puzzle solved before it logs in (`sliderExeUrl` and
    `sliderVerifyEncrypt` are for juzi's own tool; no RPC of @juzi/wechaty-grpc 1.0.100 answers it)."""

    status: int
    scene: int = SCENE_UNKNOWN


def parse_verify_slide(payload: dict[str, Any]) -> VerifySlideEvent:
    return VerifySlideEvent(
        status=_int(payload.get("status"), VERIFY_WAITING), scene=_int(payload.get("scene"), SCENE_UNKNOWN)
    )


def parse_login(payload: dict[str, Any]) -> str:
    """LOGIN(25): the account's contact id."""
    return _str(payload, "contactId", "contact_id")


def parse_logout_reason(payload: dict[str, Any]) -> str:
    """LOGOUT(26): the reason text WeCom or the puppet gave ('' when none)."""
    return _str(payload, "data")


@dataclass(frozen=True)
class DirtyEvent:
    """DIRTY(27): a payload changed on the server; `payload_type` is a PayloadType."""

    payload_type: int
    payload_id: str

    @property
    def contact_id(self) -> str | None:
        return self.payload_id if self.payload_type == pb.PAYLOAD_TYPE_CONTACT and self.payload_id else None


def parse_dirty(payload: dict[str, Any]) -> DirtyEvent:
    return DirtyEvent(
        payload_type=_int(payload.get("payloadType", payload.get("payload_type")), 0),
        payload_id=_str(payload, "payloadId", "payload_id"),
    )


def parse_error_text(payload: dict[str, Any], raw: str) -> str:
    """ERROR(16): the text to show (`data`, else the serialized GError, else the raw payload)."""
    return first_line(_str(payload, "data", "gerror") or raw)


# -- contacts ---------------------------------------------------------------------------------------------
def parse_additional_info(raw: str) -> dict[str, Any]:
    """ContactPayload.additional_info: a stringified JSON object; anything else becomes {}."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        log.debug("contact additional_info is not JSON: %.120r", raw)
        return {}
    return value if isinstance(value, dict) else {}


def epoch_to_datetime(value: Any) -> datetime | None:
    """addContactTime arrives as ms or s since the epoch, as a number or a string; anything odd is None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if number <= 0:
        return None
    if number > 1e11:  # no one added a contact in the year 5138: this is milliseconds
        number /= 1000.0
    try:
        return datetime.fromtimestamp(number, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def contact_record(p: pb.ContactPayloadResponse, follow_user_id: str = "") -> ContactRecord:
    """Map juzi's ContactPayloadResponse (fields 1–22) to our contact model. `follow_user_id`: the logged-in
    account, the one staff member a puppet speaks for."""
    info = parse_additional_info(p.additional_info)
    corp_id = info.get("corpId", info.get("corp_id", ""))
    return ContactRecord(
        id=p.id,
        name=p.name,
        alias=p.alias,
        avatar=p.avatar,
        gender=int(p.gender),
        city=p.city,
        province=p.province,
        address=p.address,
        corporation=p.corporation,
        title=p.title,
        phones=tuple(phone for phone in p.phones if phone),
        weixin=p.weixin,
        description=p.description,
        signature=p.signature,
        friend=p.friend,
        coworker=p.coworker,
        star=p.star,
        type=int(p.type),
        real_name=p.real_name,
        aka=p.aka,
        additional_info=info,
        corp_id=str(corp_id) if corp_id else "",
        added_at=epoch_to_datetime(info.get("addContactTime", info.get("add_contact_time"))),
        tag_ids=tuple(dict.fromkeys(tag for tag in p.tag_ids if tag)),
        follow_user_ids=(follow_user_id,) if follow_user_id else (),
    )


# -- customer events --------------------------------------------------------------------------------------
def parse_message_id(payload: dict[str, Any]) -> str:
    """MESSAGE(2): the id of the message to look up with MessagePayload."""
    return _str(payload, "messageId", "message_id")


def parse_friendship_id(payload: dict[str, Any]) -> str:
    """FRIENDSHIP(17): the id of the friendship to look up with FriendshipPayload."""
    return _str(payload, "friendshipId", "friendship_id", "id")


def message_type_name(value: int) -> str:
    """A MessageType as a short lower-case name ("text", "image", "url", "mini_program", ...)."""
    try:
        return str(pb.MessageType.Name(value)).removeprefix("MESSAGE_TYPE_").lower()
    except ValueError:
        return f"type_{value}"


@dataclass(frozen=True)
class IncomingMessage:
    """A customer wrote to the account (one-to-one): the data of a MESSAGE gateway event."""

    contact_id: str
    message_id: str
    text: str  # the text of a text message; "" for any other type
    type: str  # message_type_name

    def data(self) -> dict[str, str]:
        return {"contact_id": self.contact_id, "message_id": self.message_id, "text": self.text, "type": self.type}


def incoming_message(p: pb.MessagePayloadResponse, account_id: str) -> IncomingMessage | None:
    """The customer's message, or None for what is not one: our own outgoing messages (the server announces
    those too), group-chat messages, and payloads without a sender."""
    if not p.talker_id or p.talker_id == account_id or p.room_id:
        return None
    text = p.text if p.type == pb.MESSAGE_TYPE_TEXT else ""
    return IncomingMessage(p.talker_id, p.id, text, message_type_name(p.type))

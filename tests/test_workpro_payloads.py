"""WorkPro's payload parsers (`engine.gateways.workpro.payloads`): event JSON and contact payloads in, typed values
out, tolerant of the variations servers send. Pure, no server."""

from __future__ import annotations

import json

from engine.gateways.proto import puppet_pb2 as pb
from engine.gateways.workpro.payloads import (
    SCAN_SCANNED,
    SCAN_WAITING,
    clean_verify_code,
    contact_record,
    first_line,
    incoming_message,
    parse_dirty,
    parse_friendship_id,
    parse_message_id,
    parse_payload,
    parse_scan,
    parse_verify_code,
    qr_key,
)


def test_verify_code_is_cleaned() -> None:
    """Spaces, newlines, zero-width characters and full-width digits do not reach the server."""
    assert clean_verify_code(" 12 34\u200b56\n") == "123456"
    assert clean_verify_code("\ufeff１２３４５６\t") == "123456"


def test_qr_key_and_first_line() -> None:
    """The key comes from the QR URL; server texts are cut to their first line."""
    assert qr_key("https://wx.work.weixin.qq.com/cgi-bin/crtx_auth?key=ABCDEF0123&wx=1") == "ABCDEF0123"
    assert qr_key("https://example.com/no-key") is None
    assert first_line("Error: boom\n    at foo (/app/x.js:1:2)") == "Error: boom"


def test_broken_payloads_become_empty() -> None:
    """An empty, non-JSON or non-object payload never raises: it parses to {} (or wraps the value)."""
    assert parse_payload("") == {}
    assert parse_payload("{not json") == {}
    assert parse_payload("[1, 2]") == {"data": [1, 2]}


def test_scan_payloads() -> None:
    """A SCAN names its status, QR URL and key; the security QR is known by URL marker or ScanType.Verify."""
    url = "https://wx.work.weixin.qq.com/cgi-bin/crtx_auth?key=AB12&wx=1"
    scan = parse_scan({"status": 2, "qrcode": url, "timestamp": 1})
    assert (scan.status, scan.key, scan.shows_qr, scan.verification) == (SCAN_WAITING, "AB12", True, False)
    assert parse_scan({"status": 2, "qrcode": url + "&secondaryEquipment=1"}).verification
    assert parse_scan({"status": 2, "qrcode": "https://x.example/q?key=CD", "type": 2}).verification
    scanned = parse_scan({"status": "3"})
    assert (scanned.status, scanned.shows_qr) == (SCAN_SCANNED, False)
    assert parse_scan({"status": None, "qrcode": url}).shows_qr  # status unknown but a QR: show it


def test_verify_code_and_dirty_payloads() -> None:
    """VERIFY_CODE carries the QR key as its id; DIRTY names a contact only for PayloadType CONTACT."""
    verify = parse_verify_code({"id": "AB12", "scene": 1, "status": 1, "message": "请输入验证码"})
    assert (verify.id, verify.status, verify.scene, verify.message) == ("AB12", 1, 1, "请输入验证码")
    assert parse_dirty({"payloadId": "7881", "payloadType": 2}).contact_id == "7881"
    assert parse_dirty({"payload_id": "7881", "payload_type": "2"}).contact_id == "7881"
    assert parse_dirty({"payloadId": "r1", "payloadType": 3}).contact_id is None


def test_contact_mapping_tolerates_odd_additional_info() -> None:
    """Fields 19–22 map through; addContactTime in ms or s becomes a date; bad JSON becomes {}; the account
    the gateway speaks for is the contact's follow user."""
    ms = pb.ContactPayloadResponse(
        id="7881",
        name="王芳",
        phones=["13800000000", ""],
        tag_ids=["a", "a", "b"],
        additional_info=json.dumps({"addContactTime": 1_700_000_000_000, "corpId": "ww1"}),
        real_name="王芳芳",
        aka="Fang",
        gender=2,
        type=1,
    )
    record = contact_record(ms, "1688850000000001")
    assert record.phones == ("13800000000",)
    assert record.tag_ids == ("a", "b")
    assert record.corp_id == "ww1"
    assert record.real_name == "王芳芳"
    assert record.aka == "Fang"
    assert record.gender == 2
    assert record.follow_user_ids == ("1688850000000001",)
    assert record.added_at is not None
    assert record.added_at.year == 2023
    seconds = contact_record(pb.ContactPayloadResponse(id="x", additional_info='{"addContactTime": "1700000000"}'))
    assert seconds.added_at == record.added_at
    assert seconds.follow_user_ids == ()
    broken = contact_record(pb.ContactPayloadResponse(id="y", additional_info="{not json"))
    assert broken.additional_info == {}
    assert broken.added_at is None
    assert contact_record(pb.ContactPayloadResponse(id="z", additional_info="[1]")).additional_info == {}


def test_incoming_messages() -> None:
    """A one-to-one message from a customer becomes a MESSAGE's data; our own sends, group-chat messages and
    payloads without a sender do not; non-text messages carry no text, only their type."""
    me = "1688850000000001"
    text = pb.MessagePayloadResponse(
        id="m1", text="价格多少？", type=pb.MESSAGE_TYPE_TEXT, talker_id="7881", listener_id=me
    )
    message = incoming_message(text, me)
    assert message is not None
    assert message.data() == {"contact_id": "7881", "message_id": "m1", "text": "价格多少？", "type": "text"}
    own = pb.MessagePayloadResponse(id="m2", text="您好", type=pb.MESSAGE_TYPE_TEXT, talker_id=me, listener_id="7881")
    assert incoming_message(own, me) is None
    room = pb.MessagePayloadResponse(
        id="m3", text="hi", type=pb.MESSAGE_TYPE_TEXT, talker_id="7881", room_id="r@chatroom"
    )
    assert incoming_message(room, me) is None
    assert incoming_message(pb.MessagePayloadResponse(id="m4", text="x"), me) is None
    image = incoming_message(
        pb.MessagePayloadResponse(id="m5", text="<img>", type=pb.MESSAGE_TYPE_IMAGE, talker_id="7881"), me
    )
    assert image is not None
    assert (image.text, image.type) == ("", "image")
    card = incoming_message(pb.MessagePayloadResponse(id="m6", type=9, talker_id="7881"), me)
    assert card is not None
    assert card.type == "mini_program"


def test_event_ids() -> None:
    """MESSAGE and FRIENDSHIP events name the payload to look up, in camelCase or snake_case."""
    assert parse_message_id({"messageId": "m1"}) == parse_message_id({"message_id": "m1"}) == "m1"
    assert parse_friendship_id({"friendshipId": "f1"}) == parse_friendship_id({"friendship_id": "f1"}) == "f1"
    assert parse_message_id({}) == ""

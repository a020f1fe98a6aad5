"""WeCom callback crypto and event parsing: vectors computed independently of wecast's decryptor.

Two independent sources: WeCom's own published sample vectors (developer.work.weixin.qq.com document 90968: the
token QDG6eK, the EncodingAESKey jWmYm7…B2C and corp wx5823bf96d3bd56c7), and `tests/wecom_reference.py`, a
plain-Python AES-256 + WXBizMsgCrypt framing written from the spec. Then what must be refused: a tampered signature
or ciphertext, another corp's message, a stale or replayed callback, and XML with a DOCTYPE.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from engine.clock import FakeClock
from engine.gateways.wecom.callbacks import CallbackReceiver
from engine.gateways.wecom.crypto import CallbackError, MessageCrypt, aes_key

try:
    from wecom_reference import (
        aes256_encrypt_block,
        event_xml,
        reference_callback,
        reference_encrypt,
        reference_signature,
    )
except ImportError:  # pragma: no cover
    from tests.wecom_reference import (
        aes256_encrypt_block,
        event_xml,
        reference_callback,
        reference_encrypt,
        reference_signature,
    )

# WeCom's sample (document 90968).
OFFICIAL_TOKEN = "QDG6eK"
OFFICIAL_KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
OFFICIAL_CORP = "wx5823bf96d3bd56c7"
OFFICIAL_POST = {
    "msg_signature": "477715d11cdb4164915debcba66cb864d751f3e6",
    "timestamp": "1409659813",
    "nonce": "1372623149",
    "encrypt": "RypEvHKD8QQKFhvQ6QleEB4J58tiPdvo+rtK1I9qca6aM/wvqnLSV5zEPeusUiX5L5X/0lWfrf0QADHHhGd3QczcdCUpj911L3vg3W/"
    "sYYvuJTs3TUUkSUXxaccAS0qhxchrRYt66wiSpGLYL42aM6A8dTT+6k4aSknmPj48kzJs8qLjvd4Xgpue06DOdnLxAUHzM6+kDZ+HMZfJYuR+"
    "LtwGc2hgf5gsijff0ekUNXZiqATP7PF5mZxZ3Izoun1s4zG4LUMnvw2r+KqCKIw+3IQH03v+BCA9nMELNqbSf6tiWSrXJB3LAVGUcallcrw8"
    "V2t9EL4EhzJWrQUax5wLVMNS0+rUPA3k22Ncx4XXZS9o0MBH27Bo6BpNelZpS+/uh9KsNlY6bHCmJU9p8g7m3fVKn28H3KDYA5Pl/T8Z1ptDA"
    "Ve0lXdQ2YoyyH2uyPIGHBZZIs2pDBS8R07+qN+E7Q==",
}
OFFICIAL_URL_CHECK = {
    "msg_signature": "5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3",
    "timestamp": "1409659589",
    "nonce": "263014780",
    "echostr": "P9nAzCzyDtyTWESHep1vC5X9xho/qYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp+4RPcs8TgAE7OaBO+FZXvnaqQ==",
}

TOKEN = "wecast-cb-token"
KEY = "Q8vQ2zJm4nE7rT1yU5iO9pA3sD6fG0hJ2kL4zX8cV1b"
CORP = "ww1234567890abcdef"
NOW = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def receiver(clock: FakeClock, *, corp: str = CORP, max_age: float = 300) -> CallbackReceiver:
    return CallbackReceiver(MessageCrypt(TOKEN, KEY, corp), clock, max_age=max_age)


def added(ext: str = "wmCustomer001", code: str = "WELCOME-CODE-1", at: datetime = NOW) -> str:
    return event_xml(
        {
            "ToUserName": CORP,
            "FromUserName": "sys",
            "CreateTime": str(int(at.timestamp())),
            "MsgType": "event",
            "Event": "change_external_contact",
            "ChangeType": "add_external_contact",
            "UserID": "zhangwei",
            "ExternalUserID": ext,
            "State": "门店海报",
            "WelcomeCode": code,
        }
    )


def signed(
    inner: str, *, nonce: str = "n1", at: datetime = NOW, corp: str = CORP, seed: int = 1
) -> tuple[dict[str, str], bytes]:
    return reference_callback(
        token=TOKEN,
        encoding_aes_key=KEY,
        corp_id=corp,
        inner_xml=inner,
        timestamp=str(int(at.timestamp())),
        nonce=nonce,
        random16=random.Random(seed).randbytes(16),
    )


def test_the_reference_aes_is_fips_197() -> None:
    """The reference AES-256 gives FIPS-197 appendix C.3's ciphertext (so the vectors below rest on a checked AES)."""
    block = aes256_encrypt_block(bytes(range(32)), bytes.fromhex("00112233445566778899aabbccddeeff"))
    assert block.hex() == "8ea2b7ca516745bfeafc49904b496089"


def test_wecoms_published_vectors_decrypt() -> None:
    """WeCom's own sample callback verifies and decrypts to its message, and its URL check to the echo string."""
    crypt = MessageCrypt(OFFICIAL_TOKEN, OFFICIAL_KEY, OFFICIAL_CORP)
    p = OFFICIAL_POST
    crypt.verify(p["msg_signature"], p["timestamp"], p["nonce"], p["encrypt"])
    message = crypt.decrypt(p["encrypt"])
    assert "<Content><![CDATA[hello]]></Content>" in message
    assert "<MsgId>4561255354251345929</MsgId>" in message
    u = OFFICIAL_URL_CHECK
    crypt.verify(u["msg_signature"], u["timestamp"], u["nonce"], u["echostr"])
    assert crypt.decrypt(u["echostr"]) == "1616140317555161061"


@pytest.mark.parametrize("length", [0, 1, 11, 12, 13, 43, 44, 45, 300])
def test_reference_encrypted_messages_decrypt(length: int) -> None:
    """Messages of every padding case (12 + 20 + corpid bytes lands on a 32-byte boundary: a full pad block) encrypted
    by the reference decrypt to the same text, and wecast's encryptor gives the reference's bytes."""
    message = ("会员日🎉" * 100)[:length]
    prefix = random.Random(length).randbytes(16)
    encrypted = reference_encrypt(KEY, message, CORP, prefix)
    crypt = MessageCrypt(TOKEN, KEY, CORP)
    assert crypt.decrypt(encrypted) == message
    assert crypt.encrypt(message, random_prefix=prefix) == encrypted


def test_an_event_built_by_the_reference_is_received() -> None:
    """A signed, encrypted add_external_contact from the reference becomes an event with its fields."""
    clock = FakeClock(NOW)
    query, body = signed(added())
    event = receiver(clock).receive(query["msg_signature"], query["timestamp"], query["nonce"], body)
    assert event is not None
    assert (event.event, event.change_type) == ("change_external_contact", "add_external_contact")
    assert (event.staff_id, event.contact_id, event.welcome_code) == ("zhangwei", "wmCustomer001", "WELCOME-CODE-1")
    assert event.fields["State"] == "门店海报"
    assert event.created_at == NOW


def test_a_tampered_signature_is_refused() -> None:
    """A signature changed in one digit, or computed with another token, is refused before decryption."""
    clock = FakeClock(NOW)
    query, body = signed(added())
    wrong = query["msg_signature"][:-1] + ("0" if query["msg_signature"][-1] != "0" else "1")
    with pytest.raises(CallbackError, match="signature"):
        receiver(clock).receive(wrong, query["timestamp"], query["nonce"], body)
    with pytest.raises(CallbackError, match="signature"):
        receiver(clock).receive(query["msg_signature"], query["timestamp"], "another-nonce", body)


def test_a_tampered_ciphertext_is_refused() -> None:
    """A ciphertext changed after signing fails the signature check."""
    clock = FakeClock(NOW)
    query, body = signed(added())
    text = body.decode()
    start = text.index("<Encrypt><![CDATA[") + len("<Encrypt><![CDATA[")
    flipped = text[:start] + ("A" if text[start] != "A" else "B") + text[start + 1 :]
    with pytest.raises(CallbackError, match="signature"):
        receiver(clock).receive(query["msg_signature"], query["timestamp"], query["nonce"], flipped.encode())


def test_another_corps_message_is_refused() -> None:
    """A correctly signed and encrypted message whose receive id is another corp's is refused."""
    clock = FakeClock(NOW)
    query, body = signed(added(), corp="wwsomeoneelse00001")
    with pytest.raises(CallbackError, match="another corp"):
        receiver(clock).receive(query["msg_signature"], query["timestamp"], query["nonce"], body)


def test_a_wrong_aes_key_is_refused() -> None:
    """A message encrypted with another EncodingAESKey (and signed with our token) does not decrypt."""
    clock = FakeClock(NOW)
    other = reference_encrypt("Z" * 43, added(), CORP, bytes(16))
    ts = str(int(NOW.timestamp()))
    crypt = MessageCrypt(TOKEN, KEY, CORP)
    body = f"<xml><Encrypt><![CDATA[{other}]]></Encrypt></xml>".encode()
    with pytest.raises(CallbackError):
        receiver(clock).receive(crypt.sign(ts, "n", other), ts, "n", body)


def test_a_replayed_callback_is_refused() -> None:
    """The same signed callback twice: the second is refused as a replay."""
    clock = FakeClock(NOW)
    r = receiver(clock)
    query, body = signed(added())
    assert r.receive(query["msg_signature"], query["timestamp"], query["nonce"], body) is not None
    clock.advance(2)
    with pytest.raises(CallbackError, match="replayed"):
        r.receive(query["msg_signature"], query["timestamp"], query["nonce"], body)


def test_a_stale_callback_is_refused() -> None:
    """A callback signed more than max_age ago (a captured one played back later) is refused."""
    clock = FakeClock(NOW)
    query, body = signed(added())
    clock.advance(301)
    with pytest.raises(CallbackError, match="timestamp"):
        receiver(clock).receive(query["msg_signature"], query["timestamp"], query["nonce"], body)


def test_the_same_event_redelivered_is_a_duplicate() -> None:
    """WeCom's retry of the same event (new nonce, same content) is acknowledged as a duplicate (None), once."""
    clock = FakeClock(NOW)
    r = receiver(clock)
    first = signed(added(), nonce="first")
    again = signed(added(), nonce="retry", seed=2)
    assert r.receive(first[0]["msg_signature"], first[0]["timestamp"], first[0]["nonce"], first[1]) is not None
    assert r.receive(again[0]["msg_signature"], again[0]["timestamp"], again[0]["nonce"], again[1]) is None
    other = signed(added(ext="wmCustomer002", code="WELCOME-CODE-2"), nonce="other")
    assert r.receive(other[0]["msg_signature"], other[0]["timestamp"], other[0]["nonce"], other[1]) is not None


def test_xml_with_a_doctype_is_refused_before_parsing() -> None:
    """A body declaring a DOCTYPE or entities (entity expansion, external entities) is refused."""
    clock = FakeClock(NOW)
    bomb = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><xml><Encrypt>&a;</Encrypt></xml>'
    with pytest.raises(CallbackError, match="DOCTYPE"):
        receiver(clock).receive("0" * 40, str(int(NOW.timestamp())), "n", bomb)


def test_the_url_check_answers_the_echo() -> None:
    """The GET URL check decrypts echostr (reference-encrypted) after checking its signature."""
    clock = FakeClock(NOW)
    echo = reference_encrypt(KEY, "8217461286145", CORP, bytes(range(16)))
    ts = str(int(NOW.timestamp()))
    sig = reference_signature(TOKEN, ts, "echo-nonce", echo)
    assert receiver(clock).verify_url(sig, ts, "echo-nonce", echo) == "8217461286145"
    with pytest.raises(CallbackError):
        receiver(clock).verify_url("f" * 40, ts, "echo-nonce", echo)


def test_an_encoding_aes_key_of_the_wrong_size_is_refused() -> None:
    """An EncodingAESKey that is not 43 Base64 characters is refused with a reason, not a crash."""
    with pytest.raises(CallbackError):
        aes_key("tooshort")
    assert len(aes_key(KEY)) == 32

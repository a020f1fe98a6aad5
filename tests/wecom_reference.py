"""A test-only reference encryptor for WeCom callbacks, written from the spec and sharing no code with wecast's.

AES-256 is implemented here in plain Python from FIPS-197 (checked against its appendix C.3 vector), CBC and the
WXBizMsgCrypt framing from WeCom's description (issue 12; shared/reference/wecom_api.md §11):

    key = b64decode(EncodingAESKey + "="); IV = key[:16]; PKCS#7 padding to a multiple of 32 bytes;
    plaintext = 16 random bytes + len(msg) as 4 bytes big-endian + msg + receiveid;
    signature = sha1(sorted([token, timestamp, nonce, ciphertext_b64]) joined).hexdigest()

So a callback built here that wecast's decryptor (which uses the `cryptography` package) accepts shows that both
read the spec the same way, not that one mirrors the other.
"""

from __future__ import annotations

import base64
import hashlib


def _xtime(a: int) -> int:
    a <<= 1
    return (a ^ 0x11B) & 0xFF if a & 0x100 else a


def _mul(a: int, b: int) -> int:
    out = 0
    while b:
        if b & 1:
            out ^= a
        a = _xtime(a)
        b >>= 1
    return out


def _sbox() -> list[int]:
    """FIPS-197 §5.1.1: the multiplicative inverse in GF(2^8), then the affine transform."""
    box = []
    for x in range(256):
        inv = next((y for y in range(1, 256) if _mul(x, y) == 1), 0) if x else 0
        s = inv
        for shift in range(1, 5):
            s ^= ((inv << shift) | (inv >> (8 - shift))) & 0xFF
        box.append(s ^ 0x63)
    return box


SBOX = _sbox()


def _expand(key: bytes) -> list[list[int]]:
    """FIPS-197 §5.2 for Nk = 8: 15 round keys of 16 bytes."""
    words = [list(key[i : i + 4]) for i in range(0, 32, 4)]
    rcon = 1
    for i in range(8, 60):
        temp = list(words[i - 1])
        if i % 8 == 0:
            temp = [SBOX[b] for b in temp[1:] + temp[:1]]
            temp[0] ^= rcon
            rcon = _xtime(rcon)
        elif i % 8 == 4:
            temp = [SBOX[b] for b in temp]
        words.append([a ^ b for a, b in zip(words[i - 8], temp, strict=True)])
    return [[b for word in words[r * 4 : r * 4 + 4] for b in word] for r in range(15)]


def aes256_encrypt_block(key: bytes, block: bytes) -> bytes:
    """One 16-byte block (state in column order, as the standard lays it out)."""
    rounds = _expand(key)
    state = [b ^ k for b, k in zip(block, rounds[0], strict=True)]
    for r in range(1, 15):
        state = [SBOX[b] for b in state]
        state = [state[(i + 4 * (i % 4)) % 16] for i in range(16)]  # ShiftRows
        if r != 14:
            mixed = []
            for c in range(4):
                a = state[4 * c : 4 * c + 4]
                mixed += [
                    _mul(a[0], 2) ^ _mul(a[1], 3) ^ a[2] ^ a[3],
                    a[0] ^ _mul(a[1], 2) ^ _mul(a[2], 3) ^ a[3],
                    a[0] ^ a[1] ^ _mul(a[2], 2) ^ _mul(a[3], 3),
                    _mul(a[0], 3) ^ a[1] ^ a[2] ^ _mul(a[3], 2),
                ]
            state = mixed
        state = [b ^ k for b, k in zip(state, rounds[r], strict=True)]
    return bytes(state)


def aes256_cbc_encrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    assert len(data) % 16 == 0
    out, previous = b"", iv
    for i in range(0, len(data), 16):
        previous = aes256_encrypt_block(key, bytes(a ^ b for a, b in zip(data[i : i + 16], previous, strict=True)))
        out += previous
    return out


def reference_encrypt(encoding_aes_key: str, message: str, receive_id: str, random16: bytes) -> str:
    key = base64.b64decode(encoding_aes_key + "=")
    body = message.encode("utf-8")
    plain = random16 + len(body).to_bytes(4, "big") + body + receive_id.encode()
    pad = 32 - len(plain) % 32
    plain += bytes([pad]) * pad
    return base64.b64encode(aes256_cbc_encrypt(key, key[:16], plain)).decode()


def reference_signature(token: str, timestamp: str, nonce: str, encrypted: str) -> str:
    return hashlib.sha1("".join(sorted([token, timestamp, nonce, encrypted])).encode()).hexdigest()


def reference_callback(
    *, token: str, encoding_aes_key: str, corp_id: str, inner_xml: str, timestamp: str, nonce: str, random16: bytes
) -> tuple[dict[str, str], bytes]:
    """The query and body of a POSTed callback carrying `inner_xml`."""
    encrypted = reference_encrypt(encoding_aes_key, inner_xml, corp_id, random16)
    query = {
        "msg_signature": reference_signature(token, timestamp, nonce, encrypted),
        "timestamp": timestamp,
        "nonce": nonce,
    }
    body = f"<xml><ToUserName><![CDATA[{corp_id}]]></ToUserName><Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>"
    return query, body.encode()


def event_xml(fields: dict[str, str]) -> str:
    return "<xml>" + "".join(f"<{k}><![CDATA[{v}]]></{k}>" for k, v in fields.items()) + "</xml>"

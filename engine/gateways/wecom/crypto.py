"""WeCom's callback encryption (WXBizMsgCrypt), with the `cryptography` package.

As WeCom's published sample code does it (shared/reference/wecom_api.md §11):

* key = base64 of the EncodingAESKey plus "=" (43 characters -> 32 bytes); AES-256-CBC with IV = the key's first
  16 bytes; PKCS#7 padding to a multiple of 32 bytes (not AES's 16);
* plaintext = 16 random bytes + the message's length (4 bytes, big-endian) + the message (the event XML, UTF-8) +
  the receive id (the corpid), which must be ours;
* signature = hex SHA-1 of the sorted concatenation of the callback token, timestamp, nonce and the Base64
  ciphertext, compared in constant time.

Every refusal is a `CallbackError` saying why, never echoing the key, token or plaintext.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from engine.errors import WecastError

BLOCK = 32  # WeCom pads to 32 bytes
RANDOM_BYTES = 16


class CallbackError(WecastError):
    """A callback was refused: bad signature, undecryptable, another corp's, stale or replayed."""


def aes_key(encoding_aes_key: str) -> bytes:
    """The 32-byte AES key an EncodingAESKey stands for."""
    try:
        key = base64.b64decode(encoding_aes_key + "=", validate=True)
    except (binascii.Error, ValueError):
        raise CallbackError("the EncodingAESKey is not valid Base64") from None
    if len(key) != 32:
        raise CallbackError("the EncodingAESKey must be 43 characters (a 32-byte key)")
    return key


def signature(token: str, timestamp: str, nonce: str, encrypted: str) -> str:
    """WeCom's msg_signature: hex SHA-1 of the four values sorted and joined."""
    return hashlib.sha1("".join(sorted([token, timestamp, nonce, encrypted])).encode()).hexdigest()


class MessageCrypt:
    """Checks, decrypts (and, for the fake server and demos, encrypts) callback messages for one app."""

    def __init__(self, token: str, encoding_aes_key: str, receive_id: str) -> None:
        self._token = token
        self._key = aes_key(encoding_aes_key)
        self._receive_id = receive_id

    def __repr__(self) -> str:
        return "MessageCrypt(<secrets hidden>)"

    def sign(self, timestamp: str, nonce: str, encrypted: str) -> str:
        return signature(self._token, timestamp, nonce, encrypted)

    def verify(self, msg_signature: str, timestamp: str, nonce: str, encrypted: str) -> None:
        """Raise CallbackError unless `msg_signature` is the signature of the other three."""
        expected = self.sign(timestamp, nonce, encrypted)
        if not hmac.compare_digest(expected.encode(), msg_signature.strip().lower().encode()):
            raise CallbackError("the callback's signature does not match (wrong token, or the message was altered)")

    def decrypt(self, encrypted: str) -> str:
        """The message inside `encrypted` (Base64); raises CallbackError if it is malformed or another corp's."""
        try:
            data = base64.b64decode(encrypted, validate=True)
        except (binascii.Error, ValueError):
            raise CallbackError("the callback's ciphertext is not valid Base64") from None
        if not data or len(data) % 16:
            raise CallbackError("the callback's ciphertext is not a whole number of AES blocks")
        decryptor = Cipher(algorithms.AES(self._key), modes.CBC(self._key[:16])).decryptor()
        plain = decryptor.update(data) + decryptor.finalize()
        pad = plain[-1]
        if not 1 <= pad <= BLOCK or plain[-pad:] != bytes([pad]) * pad:
            raise CallbackError("the callback does not decrypt (bad padding: a wrong EncodingAESKey?)")
        plain = plain[:-pad]
        if len(plain) < RANDOM_BYTES + 4:
            raise CallbackError("the callback's plaintext is too short")
        (length,) = struct.unpack(">I", plain[RANDOM_BYTES : RANDOM_BYTES + 4])
        body = plain[RANDOM_BYTES + 4 :]
        if length > len(body):
            raise CallbackError("the callback's length field is larger than its content")
        message, receive_id = body[:length], body[length:]
        if not hmac.compare_digest(receive_id, self._receive_id.encode()):
            raise CallbackError("the callback is for another corp (its receive id is not our corp id)")
        try:
            return message.decode("utf-8")
        except UnicodeDecodeError:
            raise CallbackError("the callback's message is not UTF-8") from None

    def encrypt(self, message: str, *, random_prefix: bytes | None = None) -> str:
        """`message` encrypted as WeCom would send it (Base64). `random_prefix`: the 16 random bytes (tests)."""
        prefix = random_prefix if random_prefix is not None else os.urandom(RANDOM_BYTES)
        if len(prefix) != RANDOM_BYTES:
            raise ValueError("the random prefix is 16 bytes")
        body = message.encode("utf-8")
        plain = prefix + struct.pack(">I", len(body)) + body + self._receive_id.encode()
        pad = BLOCK - len(plain) % BLOCK
        plain += bytes([pad]) * pad
        encryptor = Cipher(algorithms.AES(self._key), modes.CBC(self._key[:16])).encryptor()
        return base64.b64encode(encryptor.update(plain) + encryptor.finalize()).decode()

"""Personal data at rest: AES-256-GCM with key ids, and a keyed blind index for look-ups.

    blob = b"\\x01" ‖ len(key_id) ‖ key_id ‖ nonce(12) ‖ ciphertext+tag

The associated data binds a blob to its column (`context`), so a ciphertext copied into
another column does not decrypt. New writes use the active key; every configured key still
decrypts, so a key can be rotated while old rows stay readable (`fundgate keys rotate`
re-encrypts them). The blind index is HMAC-SHA256 under its own key: equality look-ups
(whitelist, idempotency) without storing the value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from config.models import SecurityConfig

VERSION = 1
NONCE_BYTES = 12


class CryptoError(Exception):
    """A blob that cannot be decrypted: unknown key id, wrong key, or damaged data."""


def decode_key(text: str, what: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{what}: not base64") from e
    if len(key) != 32:
        raise ValueError(f"{what}: must be 32 bytes (base64 of 32 random bytes), got {len(key)}")
    return key


class Vault:
    def __init__(self, security: SecurityConfig) -> None:
        self.active = security.active_key
        self._keys = {
            kid: AESGCM(decode_key(k.get_secret_value(), f"security.data_keys.{kid}"))
            for kid, k in security.data_keys.items()
        }
        self._index_key = decode_key(
            security.blind_index_key.get_secret_value(), "security.blind_index_key"
        )

    def encrypt(self, value: str, context: str) -> bytes:
        kid = self.active.encode()
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._keys[self.active].encrypt(nonce, value.encode(), context.encode())
        return bytes([VERSION, len(kid)]) + kid + nonce + sealed

    @staticmethod
    def key_id(blob: bytes) -> str:
        if len(blob) < 2 or blob[0] != VERSION:
            raise CryptoError("not a fundgate ciphertext (version byte)")
        return blob[2 : 2 + blob[1]].decode(errors="replace")

    def decrypt(self, blob: bytes, context: str) -> str:
        kid = self.key_id(blob)
        aead = self._keys.get(kid)
        if aead is None:
            raise CryptoError(f"{context}: encrypted with key {kid!r}, which is not configured")
        start = 2 + blob[1]
        nonce, sealed = blob[start : start + NONCE_BYTES], blob[start + NONCE_BYTES :]
        try:
            return aead.decrypt(nonce, sealed, context.encode()).decode()
        except InvalidTag as e:
            raise CryptoError(f"{context}: key {kid!r} does not open this value") from e

    def blind(self, value: str, context: str) -> bytes:
        return hmac.new(
            self._index_key, context.encode() + b"\x00" + value.encode(), hashlib.sha256
        ).digest()

    def keyed_digest(self, data: bytes) -> bytes:
        """A digest of data holding personal values that cannot be brute-forced offline."""
        return hmac.new(self._index_key, data, hashlib.sha256).digest()

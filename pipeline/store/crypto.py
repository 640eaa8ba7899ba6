"""Key material at rest in the store: AES-256-GCM under the fleet key.

The fleet key file holds at least 32 bytes (raw, or text such as base64; surrounding whitespace
is not part of it) and must be readable by its owner only: a group- or world-readable file is
refused. The AES key is derived from the file's bytes with HKDF-SHA256, so any such encoding
gives a full-strength key, and a key id (also derived, not the key) lets a node with a different
fleet key say so instead of reporting a bare authentication failure.

Sealed blob layout (all in the store value, base64 in JSON records)::

    version (1 byte, 1) | key id (4) | nonce (12, random) | ciphertext | GCM tag (16)

The associated data is the store key the blob is written under, so a blob copied to another
record (another tunnel's SA, another SPI) does not decrypt. Random 96-bit nonces: stay well
under 2**32 seals per fleet key (NIST SP 800-38D section 8.3); rotate the key long before.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..secret import Secret

FLEET_KEY_MIN_BYTES = 32
SEAL_VERSION = 1
_HEADER = 1 + 4 + 12
_TAG = 16


class FleetKeyError(Exception):
    """The fleet key file is missing, unsafe or unusable (the message names the file)."""


class SealError(Exception):
    """A sealed blob does not open: wrong fleet key, damaged, or moved to another record."""


class FleetKey:
    """The AES-GCM key that seals key material in the store. Never printed."""

    __slots__ = ("_aead", "key_id")

    def __init__(self, material: Secret | bytes) -> None:
        raw = material.reveal() if isinstance(material, Secret) else bytes(material)
        if len(raw) < FLEET_KEY_MIN_BYTES:
            raise FleetKeyError(f"fleet key is shorter than {FLEET_KEY_MIN_BYTES} bytes")
        aes = HKDF(hashes.SHA256(), 32, salt=None, info=b"xtransit store v1 aes-gcm").derive(raw)
        kid = HKDF(hashes.SHA256(), 4, salt=None, info=b"xtransit store v1 key id").derive(raw)
        self._aead = AESGCM(aes)
        self.key_id = kid

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> FleetKey:
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise FleetKeyError(f"fleet key file not found: '{p}'") from None
        except OSError as e:
            raise FleetKeyError(f"cannot open fleet key file '{p}': {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FleetKeyError(f"fleet key file '{p}' is not a regular file")
            if st.st_mode & 0o077:
                raise FleetKeyError(
                    f"fleet key file '{p}' has mode {stat.S_IMODE(st.st_mode):04o}: it must be "
                    f"readable by its owner only (chmod 600 '{p}')")
            if st.st_uid not in (0, os.geteuid()):
                raise FleetKeyError(f"fleet key file '{p}' is owned by uid {st.st_uid}, "
                                    f"not by root or this user")
            data = b""
            while chunk := os.read(fd, 4096):
                data += chunk
        finally:
            os.close(fd)
        material = data.strip()
        if len(material) < FLEET_KEY_MIN_BYTES:
            raise FleetKeyError(f"fleet key in '{p}' is shorter than {FLEET_KEY_MIN_BYTES} bytes")
        return cls(Secret(material))

    def seal(self, plaintext: bytes, aad: str) -> bytes:
        nonce = os.urandom(12)
        head = bytes([SEAL_VERSION]) + self.key_id + nonce
        return head + self._aead.encrypt(nonce, plaintext, head + aad.encode())

    def open(self, blob: bytes, aad: str) -> bytes:
        if len(blob) < _HEADER + _TAG:
            raise SealError(f"sealed data for {aad!r} is too short ({len(blob)} bytes)")
        if blob[0] != SEAL_VERSION:
            raise SealError(f"sealed data for {aad!r} has unknown version {blob[0]}")
        if blob[1:5] != self.key_id:
            raise SealError(f"sealed data for {aad!r} was written with another fleet key "
                            f"(key id {blob[1:5].hex()}, ours {self.key_id.hex()})")
        head = blob[:_HEADER]
        try:
            return self._aead.decrypt(blob[5:_HEADER], blob[_HEADER:], head + aad.encode())
        except InvalidTag:
            raise SealError(f"sealed data for {aad!r} failed authentication (damaged, or "
                            f"copied from another record)") from None

    def __repr__(self) -> str:
        return f"FleetKey(id={self.key_id.hex()})"

    def __reduce__(self):
        raise TypeError("a FleetKey cannot be pickled")

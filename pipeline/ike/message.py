"""IKE message: header, payload chain, SK/SKF protection and RFC 7383 fragmentation.

IKE header (RFC 7296 section 3.1)::

    |                       IKE SA Initiator's SPI                  |
    |                       IKE SA Responder's SPI                  |
    |  Next Payload | MjVer | MnVer | Exchange Type |     Flags     |
    |                          Message ID                           |
    |                            Length                             |
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .constants import ExchangeType, Flag, Notify, PayloadType, enum_or_int
from .crypto import CryptoError, SkCipher
from .payloads import (
    EncryptedFragmentPayload,
    EncryptedPayload,
    IkeProtocolError,
    NotifyPayload,
    Payload,
    UnknownPayload,
    decode_chain,
    encode_chain,
    syntax,
)

HEADER = struct.Struct("!8s8sBBBBII")
HEADER_LEN = HEADER.size  # 28
MAX_MESSAGE = 65535


class DropMessage(Exception):
    """The message is silently dropped (RFC 7296 sections 2.21, 3.14); ``reason`` is counted."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Message:
    spi_i: bytes
    spi_r: bytes
    exchange: int
    flags: int
    msg_id: int
    payloads: list[Payload] = field(default_factory=list)
    version: int = 0x20
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def is_response(self) -> bool:
        return bool(self.flags & Flag.RESPONSE)

    @property
    def from_initiator(self) -> bool:
        return bool(self.flags & Flag.INITIATOR)

    # -- access helpers
    def get(self, ptype: int) -> Payload | None:
        for p in self.payloads:
            if p.type == ptype:
                return p
        return None

    def all(self, ptype: int) -> list[Payload]:
        return [p for p in self.payloads if p.type == ptype]

    def notifies(self) -> list[NotifyPayload]:
        return [p for p in self.payloads if isinstance(p, NotifyPayload)]

    def notify(self, ntype: int) -> NotifyPayload | None:
        for p in self.notifies():
            if p.notify == ntype:
                return p
        return None

    def check_critical(self) -> None:
        """RFC 7296 section 2.5: an unknown payload with the critical bit set rejects the message."""
        for p in self.payloads:
            if isinstance(p, UnknownPayload) and p.critical:
                raise IkeProtocolError(
                    Notify.UNSUPPORTED_CRITICAL_PAYLOAD, f"unsupported critical payload {p.type}",
                    bytes([p.type]),
                )

    # -- wire
    def header(self, next_payload: int, length: int) -> bytes:
        return HEADER.pack(self.spi_i, self.spi_r, next_payload, self.version, self.exchange,
                           self.flags, self.msg_id, length)

    def serialize(self) -> bytes:
        first, body = encode_chain(self.payloads)
        return self.header(first, HEADER_LEN + len(body)) + body

    @classmethod
    def parse(cls, data: bytes) -> Message:
        """Parse header and outer payload chain; an SK/SKF payload stays encrypted."""
        if len(data) < HEADER_LEN:
            raise DropMessage("truncated_header")
        spi_i, spi_r, nxt, version, exch, flags, msg_id, length = HEADER.unpack_from(data)
        if length != len(data):
            raise DropMessage("length_mismatch")
        if version >> 4 != 2:
            # RFC 7296 section 2.5: a higher major version gets INVALID_MAJOR_VERSION.
            raise IkeProtocolError(Notify.INVALID_MAJOR_VERSION, f"major version {version >> 4}")
        payloads = decode_chain(nxt, data[HEADER_LEN:], HEADER_LEN)
        return cls(spi_i, spi_r, exch, flags, msg_id, payloads, version, bytes(data))

    def __repr__(self) -> str:
        e = enum_or_int(ExchangeType, self.exchange)
        kind = "response" if self.is_response else "request"
        return (f"Message({getattr(e, 'name', e)} {kind} id={self.msg_id} "
                f"spi={self.spi_i.hex()}/{self.spi_r.hex()} {self.payloads})")


@dataclass
class SkKeys:
    """Outbound and inbound keys for SK payloads of one IKE SA (never printed)."""

    cipher: SkCipher
    ekey_out: bytes = field(repr=False)
    akey_out: bytes = field(repr=False)
    ekey_in: bytes = field(repr=False)
    akey_in: bytes = field(repr=False)


def encrypt(msg: Message, inner: list[Payload], keys: SkKeys) -> bytes:
    """Build the datagram for ``msg`` with ``inner`` payloads inside one SK payload."""
    first, plain = encode_chain(inner)
    return encrypt_raw(msg, first, plain, keys)


def encrypt_raw(msg: Message, first: int, plain: bytes, keys: SkKeys) -> bytes:
    """Same as ``encrypt`` for an already encoded inner chain (first payload type, bytes)."""
    c = keys.cipher
    padded_len = len(c.pad(plain))
    sk_len = 4 + c.iv_size + padded_len + c.icv_size
    outer_first, outer = encode_chain(msg.payloads)  # normally empty
    total = HEADER_LEN + len(outer) + sk_len
    hdr = msg.header(outer_first if msg.payloads else PayloadType.SK, total)
    sk_hdr = struct.pack("!BBH", first, 0, sk_len)
    prefix = hdr + outer + sk_hdr
    return prefix + c.encrypt(keys.ekey_out, keys.akey_out, prefix, plain)


def decrypt(msg: Message, keys: SkKeys) -> list[Payload]:
    """Decrypt the SK payload of a parsed message and parse its inner chain."""
    sk = msg.payloads[-1] if msg.payloads else None
    if not isinstance(sk, EncryptedPayload):
        raise DropMessage("no_encrypted_payload")
    hdr_end = sk.offset + 4
    try:
        plain = keys.cipher.decrypt(keys.ekey_in, keys.akey_in, msg.raw[:hdr_end], sk.data)
    except CryptoError as exc:
        raise DropMessage("integrity_check_failed") from exc
    return decode_chain(sk.inner_first, plain)


def decrypt_fragment(msg: Message, keys: SkKeys) -> bytes:
    """Verify and decrypt one SKF payload (RFC 7383 section 2.6); returns its plaintext."""
    skf = msg.payloads[-1] if msg.payloads else None
    if not isinstance(skf, EncryptedFragmentPayload):
        raise DropMessage("no_encrypted_fragment")
    if skf.number < 1 or skf.total < 1 or skf.number > skf.total:
        raise DropMessage("bad_fragment_number")
    hdr_end = skf.offset + 8
    try:
        return keys.cipher.decrypt(keys.ekey_in, keys.akey_in, msg.raw[:hdr_end], skf.data)
    except CryptoError as exc:
        raise DropMessage("integrity_check_failed") from exc


def encrypt_fragments(msg: Message, inner: list[Payload], keys: SkKeys, max_size: int) -> list[bytes]:
    """Split into SKF payloads so each datagram is at most ``max_size`` bytes (RFC 7383 2.5)."""
    first, plain = encode_chain(inner)
    c = keys.cipher
    overhead = HEADER_LEN + 8 + c.iv_size + c.icv_size + c.block_size  # pad + pad length bound
    room = max_size - overhead
    room -= room % c.block_size
    if room <= 0:
        raise ValueError("fragment size too small")
    chunks = [plain[i : i + room] for i in range(0, len(plain), room)] or [b""]
    out = []
    for n, chunk in enumerate(chunks, 1):
        padded_len = len(c.pad(chunk))
        skf_len = 8 + c.iv_size + padded_len + c.icv_size
        total = HEADER_LEN + skf_len
        hdr = msg.header(PayloadType.SKF, total)
        skf_hdr = struct.pack("!BBHHH", first if n == 1 else 0, 0, skf_len, n, len(chunks))
        prefix = hdr + skf_hdr
        out.append(prefix + c.encrypt(keys.ekey_out, keys.akey_out, prefix, chunk))
    return out


class Reassembly:
    """Collects decrypted fragments of one message (RFC 7383 section 2.6)."""

    MAX_FRAGMENTS = 64

    def __init__(self, msg_id: int, total: int, is_response: bool = False):
        self.msg_id = msg_id
        self.is_response = is_response
        self.total = total
        self.parts: dict[int, bytes] = {}
        self.first_type = 0
        self.first: Message | None = None

    def add(self, msg: Message, plain: bytes) -> list[Payload] | None:
        skf = msg.payloads[-1]
        if not isinstance(skf, EncryptedFragmentPayload):
            raise DropMessage("no_encrypted_fragment")
        if skf.total != self.total or self.total > self.MAX_FRAGMENTS:
            raise DropMessage("fragment_total_mismatch")
        if skf.number == 1:
            self.first_type = skf.inner_first
            self.first = msg
        self.parts.setdefault(skf.number, plain)
        if len(self.parts) < self.total:
            return None
        data = b"".join(self.parts[i] for i in range(1, self.total + 1))
        return decode_chain(self.first_type, data)


def notify_only(msg: Message) -> list[int]:
    return [n.notify for n in msg.notifies()]


__all__ = [
    "HEADER_LEN",
    "DropMessage",
    "Message",
    "Reassembly",
    "SkKeys",
    "decrypt",
    "decrypt_fragment",
    "encrypt",
    "encrypt_fragments",
    "syntax",
]

"""IKEv2 payloads (RFC 7296 section 3): small classes with parse/serialize.

Every payload starts with the generic payload header (RFC 7296 section 3.2)::

                         1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    | Next Payload  |C|  RESERVED   |         Payload Length        |
    +---------------+---------------+---------------+---------------+

The classes below hold the body only; ``encode_chain``/``decode_chain`` add and read the generic
headers. Payload types this module does not model (CERT, CERTREQ, CP, EAP, anything unassigned)
parse into ``UnknownPayload`` and serialize back byte for byte. Malformed input raises
``IkeProtocolError`` carrying the notify type to answer with (INVALID_SYNTAX by default).
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import ClassVar

from .constants import (
    ATTR_KEY_LENGTH,
    IdType,
    Notify,
    PayloadType,
    ProtocolId,
    TransformType,
    TsType,
    enum_or_int,
)

MAX_PAYLOADS = 64  # more than any legitimate IKE message carries; bounds the work per datagram


class IkeProtocolError(Exception):
    """A protocol error that maps to a NOTIFY type (RFC 7296 section 3.10.1)."""

    def __init__(self, notify: int, reason: str, data: bytes = b""):
        super().__init__(reason)
        self.notify = notify
        self.reason = reason
        self.data = data


def syntax(reason: str) -> IkeProtocolError:
    return IkeProtocolError(Notify.INVALID_SYNTAX, reason)


class Payload:
    type: ClassVar[int]
    critical: bool = False

    def body(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def parse(cls, body: bytes) -> Payload:
        raise NotImplementedError


# --------------------------------------------------------------------------- SA payload
#
#  Transform substructure (RFC 7296 section 3.3.2):
#  | Last Substruc |   RESERVED    |        Transform Length       |
#  |Transform Type |   RESERVED    |          Transform ID         |
#  ~                      Transform Attributes                     ~
#
#  Attribute (section 3.3.5): |A| Attribute Type (15) | AF=1: Value (16) / AF=0: Length, Value


@dataclass
class Transform:
    type: int
    id: int
    attrs: list[tuple[int, int | bytes]] = field(default_factory=list)

    @property
    def key_length(self) -> int | None:
        for t, v in self.attrs:
            if t == ATTR_KEY_LENGTH and isinstance(v, int):
                return v
        return None

    @classmethod
    def make(cls, ttype: int, tid: int, key_length: int | None = None) -> Transform:
        return cls(ttype, tid, [(ATTR_KEY_LENGTH, key_length)] if key_length else [])

    def serialize(self, last: bool) -> bytes:
        attrs = bytearray()
        for atype, value in self.attrs:
            if isinstance(value, int):
                attrs += struct.pack("!HH", 0x8000 | atype, value)
            else:
                attrs += struct.pack("!HH", atype, len(value)) + value
        return struct.pack("!BBHBBH", 0 if last else 3, 0, 8 + len(attrs), self.type, 0, self.id) + attrs

    def __repr__(self) -> str:
        tt = enum_or_int(TransformType, self.type)
        kl = f" {self.key_length}" if self.key_length else ""
        return f"Transform({getattr(tt, 'name', tt)} {self.id}{kl})"


@dataclass
class Proposal:
    num: int
    protocol: int
    spi: bytes
    transforms: list[Transform]

    def serialize(self, last: bool) -> bytes:
        tr = b"".join(t.serialize(i == len(self.transforms) - 1) for i, t in enumerate(self.transforms))
        hdr = struct.pack(
            "!BBHBBBB", 0 if last else 2, 0, 8 + len(self.spi) + len(tr), self.num, self.protocol,
            len(self.spi), len(self.transforms),
        )
        return hdr + self.spi + tr

    def of_type(self, ttype: int) -> list[Transform]:
        return [t for t in self.transforms if t.type == ttype]


def _parse_transform(data: bytes) -> Transform:
    _, _, length, ttype, _, tid = struct.unpack_from("!BBHBBH", data)
    attrs: list[tuple[int, int | bytes]] = []
    off = 8
    while off < length:
        if off + 4 > length:
            raise syntax("truncated transform attribute")
        atype, val = struct.unpack_from("!HH", data, off)
        if atype & 0x8000:
            attrs.append((atype & 0x7FFF, val))
            off += 4
        else:
            if off + 4 + val > length:
                raise syntax("transform attribute overruns transform")
            attrs.append((atype, bytes(data[off + 4 : off + 4 + val])))
            off += 4 + val
    return Transform(ttype, tid, attrs)


@dataclass
class SaPayload(Payload):
    type: ClassVar[int] = PayloadType.SA
    proposals: list[Proposal]

    def body(self) -> bytes:
        return b"".join(p.serialize(i == len(self.proposals) - 1) for i, p in enumerate(self.proposals))

    @classmethod
    def parse(cls, body: bytes) -> SaPayload:
        proposals = []
        off = 0
        last = 2
        while off < len(body):
            if last != 2:
                raise syntax("data after the last proposal")
            if off + 8 > len(body):
                raise syntax("truncated proposal")
            last, _, plen, num, proto, spisize, ntrans = struct.unpack_from("!BBHBBBB", body, off)
            if last not in (0, 2) or plen < 8 + spisize or off + plen > len(body):
                raise syntax("bad proposal length")
            pdata = body[off : off + plen]
            spi = bytes(pdata[8 : 8 + spisize])
            toff = 8 + spisize
            transforms = []
            tlast = 3
            while toff < plen:
                if tlast != 3:
                    raise syntax("data after the last transform")
                if toff + 8 > plen:
                    raise syntax("truncated transform")
                tlast, _, tlen = struct.unpack_from("!BBH", pdata, toff)
                if tlast not in (0, 3) or tlen < 8 or toff + tlen > plen:
                    raise syntax("bad transform length")
                transforms.append(_parse_transform(pdata[toff : toff + tlen]))
                toff += tlen
            if len(transforms) != ntrans:
                raise syntax("transform count mismatch")
            proposals.append(Proposal(num, proto, spi, transforms))
            off += plen
        if not proposals:
            raise syntax("SA payload without proposals")
        if last != 0:
            raise syntax("last proposal not marked last")
        return cls(proposals)


# --------------------------------------------------------------------------- KE, Nonce
#
#  KE (section 3.4):  | Diffie-Hellman Group Num | RESERVED | Key Exchange Data ~
#  Nonce (section 3.9): | Nonce Data ~ (16..256 octets)


@dataclass
class KePayload(Payload):
    type: ClassVar[int] = PayloadType.KE
    group: int
    data: bytes = field(repr=False)

    def body(self) -> bytes:
        return struct.pack("!HH", self.group, 0) + self.data

    @classmethod
    def parse(cls, body: bytes) -> KePayload:
        if len(body) < 4:
            raise syntax("truncated KE payload")
        return cls(struct.unpack_from("!H", body)[0], bytes(body[4:]))


@dataclass
class NoncePayload(Payload):
    type: ClassVar[int] = PayloadType.NONCE
    data: bytes

    def body(self) -> bytes:
        return self.data

    @classmethod
    def parse(cls, body: bytes) -> NoncePayload:
        if not 16 <= len(body) <= 256:  # RFC 7296 section 3.9
            raise syntax("nonce length out of range")
        return cls(bytes(body))


# --------------------------------------------------------------------------- ID, AUTH
#
#  ID (section 3.5):   |   ID Type     |                 RESERVED                      |
#                      ~                   Identification Data                         ~
#  AUTH (section 3.8): | Auth Method   |                 RESERVED                      |
#                      ~                      Authentication Data                      ~


@dataclass
class IdPayload(Payload):
    type: int  # IDI or IDR
    id_type: int
    data: bytes

    def body(self) -> bytes:
        return bytes([self.id_type, 0, 0, 0]) + self.data

    @classmethod
    def parse_typed(cls, ptype: int, body: bytes) -> IdPayload:
        if len(body) < 4:
            raise syntax("truncated ID payload")
        return cls(ptype, body[0], bytes(body[4:]))

    def __repr__(self) -> str:
        t = enum_or_int(IdType, self.id_type)
        return f"IdPayload({getattr(t, 'name', t)} {self.data!r})"


@dataclass
class AuthPayload(Payload):
    type: ClassVar[int] = PayloadType.AUTH
    method: int
    data: bytes = field(repr=False)

    def body(self) -> bytes:
        return bytes([self.method, 0, 0, 0]) + self.data

    @classmethod
    def parse(cls, body: bytes) -> AuthPayload:
        if len(body) < 4:
            raise syntax("truncated AUTH payload")
        return cls(body[0], bytes(body[4:]))


# --------------------------------------------------------------------------- Notify, Delete
#
#  Notify (section 3.10): | Protocol ID | SPI Size | Notify Message Type | SPI ~ | Data ~
#  Delete (section 3.11): | Protocol ID | SPI Size | Num of SPIs         | SPIs ~


@dataclass
class NotifyPayload(Payload):
    type: ClassVar[int] = PayloadType.NOTIFY
    notify: int
    data: bytes = b""
    protocol: int = 0
    spi: bytes = b""

    def body(self) -> bytes:
        return struct.pack("!BBH", self.protocol, len(self.spi), self.notify) + self.spi + self.data

    @classmethod
    def parse(cls, body: bytes) -> NotifyPayload:
        if len(body) < 4:
            raise syntax("truncated Notify payload")
        proto, spisize, ntype = struct.unpack_from("!BBH", body)
        if 4 + spisize > len(body):
            raise syntax("Notify SPI overruns payload")
        return cls(ntype, bytes(body[4 + spisize :]), proto, bytes(body[4 : 4 + spisize]))

    def __repr__(self) -> str:
        n = enum_or_int(Notify, self.notify)
        return f"NotifyPayload({getattr(n, 'name', n)} {self.data.hex()})"


@dataclass
class DeletePayload(Payload):
    type: ClassVar[int] = PayloadType.DELETE
    protocol: int
    spis: list[bytes]

    def body(self) -> bytes:
        size = 0 if self.protocol == ProtocolId.IKE else 4
        return struct.pack("!BBH", self.protocol, size, len(self.spis)) + b"".join(self.spis)

    @classmethod
    def parse(cls, body: bytes) -> DeletePayload:
        if len(body) < 4:
            raise syntax("truncated Delete payload")
        proto, size, n = struct.unpack_from("!BBH", body)
        if 4 + size * n != len(body):
            raise syntax("Delete payload length mismatch")
        return cls(proto, [bytes(body[4 + i * size : 4 + (i + 1) * size]) for i in range(n)])


@dataclass
class VendorPayload(Payload):
    type: ClassVar[int] = PayloadType.VENDOR
    data: bytes

    def body(self) -> bytes:
        return self.data

    @classmethod
    def parse(cls, body: bytes) -> VendorPayload:
        return cls(bytes(body))


# --------------------------------------------------------------------------- Traffic selectors
#
#  TS payload (section 3.13): | Number of TSs | RESERVED |  then Traffic Selectors:
#  |   TS Type     |IP Protocol ID*|       Selector Length         |
#  |           Start Port*         |           End Port*           |
#  ~                         Starting Address*                     ~
#  ~                         Ending Address*                       ~


@dataclass(frozen=True)
class TrafficSelector:
    ts_type: int
    ip_proto: int
    start_port: int
    end_port: int
    start_addr: bytes
    end_addr: bytes

    @classmethod
    def from_network(cls, net: str, ip_proto: int = 0) -> TrafficSelector:
        n = ipaddress.ip_network(net, strict=False)
        t = TsType.IPV4_ADDR_RANGE if n.version == 4 else TsType.IPV6_ADDR_RANGE
        return cls(t, ip_proto, 0, 65535, n.network_address.packed, n.broadcast_address.packed)

    def serialize(self) -> bytes:
        return struct.pack(
            "!BBHHH", self.ts_type, self.ip_proto, 8 + 2 * len(self.start_addr), self.start_port,
            self.end_port,
        ) + self.start_addr + self.end_addr

    def __str__(self) -> str:
        a = ipaddress.ip_address(self.start_addr)
        b = ipaddress.ip_address(self.end_addr)
        return f"{a}-{b} proto {self.ip_proto} ports {self.start_port}-{self.end_port}"


@dataclass
class TsPayload(Payload):
    type: int  # TSI or TSR
    selectors: list[TrafficSelector]

    def body(self) -> bytes:
        return bytes([len(self.selectors), 0, 0, 0]) + b"".join(s.serialize() for s in self.selectors)

    @classmethod
    def parse_typed(cls, ptype: int, body: bytes) -> TsPayload:
        if len(body) < 4:
            raise syntax("truncated TS payload")
        n = body[0]
        off = 4
        sels = []
        for _ in range(n):
            if off + 8 > len(body):
                raise syntax("truncated traffic selector")
            ttype, proto, slen, sp, ep = struct.unpack_from("!BBHHH", body, off)
            alen = {TsType.IPV4_ADDR_RANGE: 4, TsType.IPV6_ADDR_RANGE: 16}.get(ttype)
            if alen is None:
                raise IkeProtocolError(Notify.TS_UNACCEPTABLE, f"unsupported TS type {ttype}")
            if slen != 8 + 2 * alen or off + slen > len(body):
                raise syntax("bad traffic selector length")
            sels.append(TrafficSelector(
                ttype, proto, sp, ep, bytes(body[off + 8 : off + 8 + alen]),
                bytes(body[off + 8 + alen : off + slen]),
            ))
            off += slen
        if off != len(body):
            raise syntax("TS payload length mismatch")
        return cls(ptype, sels)


# --------------------------------------------------------------------------- SK, SKF, unknown
#
#  Encrypted payload (section 3.14): generic header whose Next Payload is the type of the first
#  inner payload, then | IV | Encrypted IKE Payloads | Padding | Pad Length | ICV |.
#  Encrypted Fragment (RFC 7383 section 2.5) adds | Fragment Number | Total Fragments | before IV.


@dataclass
class EncryptedPayload(Payload):
    type: ClassVar[int] = PayloadType.SK
    inner_first: int
    data: bytes = field(repr=False)  # IV | ciphertext | ICV
    offset: int = 0  # offset of the generic header in the message (set by the parser)

    def body(self) -> bytes:
        return self.data


@dataclass
class EncryptedFragmentPayload(Payload):
    type: ClassVar[int] = PayloadType.SKF
    inner_first: int
    number: int
    total: int
    data: bytes = field(repr=False)
    offset: int = 0

    def body(self) -> bytes:
        return struct.pack("!HH", self.number, self.total) + self.data


@dataclass
class UnknownPayload(Payload):
    type: int
    data: bytes
    critical: bool = False

    def body(self) -> bytes:
        return self.data


_SIMPLE: dict[int, type[Payload]] = {
    PayloadType.SA: SaPayload,
    PayloadType.KE: KePayload,
    PayloadType.NONCE: NoncePayload,
    PayloadType.AUTH: AuthPayload,
    PayloadType.NOTIFY: NotifyPayload,
    PayloadType.DELETE: DeletePayload,
    PayloadType.VENDOR: VendorPayload,
}


def encode_chain(payloads: list[Payload]) -> tuple[int, bytes]:
    """Serialize payloads with generic headers; returns (type of the first, bytes)."""
    out = bytearray()
    for i, p in enumerate(payloads):
        if i + 1 < len(payloads):
            nxt = payloads[i + 1].type
        elif isinstance(p, (EncryptedPayload, EncryptedFragmentPayload)):
            nxt = p.inner_first
        else:
            nxt = 0
        if isinstance(p, (EncryptedPayload, EncryptedFragmentPayload)) and i + 1 < len(payloads):
            raise ValueError("the Encrypted payload must be last")
        body = p.body()
        out += struct.pack("!BBH", nxt, 0x80 if p.critical else 0, 4 + len(body)) + body
    return (payloads[0].type if payloads else 0), bytes(out)


def decode_chain(first: int, data: bytes, base_offset: int = 0) -> list[Payload]:
    """Parse a payload chain. An SK/SKF payload ends the chain (RFC 7296 section 3.14)."""
    payloads: list[Payload] = []
    nxt = first
    off = 0
    while nxt != PayloadType.NONE:
        if len(payloads) >= MAX_PAYLOADS:
            raise syntax("too many payloads")
        if off + 4 > len(data):
            raise syntax("truncated payload header")
        following, flags, length = struct.unpack_from("!BBH", data, off)
        if length < 4 or off + length > len(data):
            raise syntax(f"payload length {length} out of range")
        body = data[off + 4 : off + length]
        critical = bool(flags & 0x80)
        if nxt == PayloadType.SK:
            if off + length != len(data):
                raise syntax("Encrypted payload is not last")
            payloads.append(EncryptedPayload(following, bytes(body), base_offset + off))
            return payloads
        if nxt == PayloadType.SKF:
            if off + length != len(data) or len(body) < 4:
                raise syntax("bad Encrypted Fragment payload")
            num, total = struct.unpack_from("!HH", body)
            payloads.append(
                EncryptedFragmentPayload(following, num, total, bytes(body[4:]), base_offset + off)
            )
            return payloads
        cls = _SIMPLE.get(nxt)
        if cls is not None:
            p: Payload = cls.parse(body)
        elif nxt in (PayloadType.IDI, PayloadType.IDR):
            p = IdPayload.parse_typed(nxt, body)
        elif nxt in (PayloadType.TSI, PayloadType.TSR):
            p = TsPayload.parse_typed(nxt, body)
        else:
            p = UnknownPayload(nxt, bytes(body), critical)
        p.critical = critical
        payloads.append(p)
        off += length
        nxt = following
    if off != len(data):
        raise syntax("data after the last payload")
    return payloads

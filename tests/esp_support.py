"""Test support for the native ESP module: an independent reference ESP in Python `cryptography`,
packet builders, and loaders for ../shared/vectors. No code here is shared with native/."""
from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline import esp

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "vectors"  # shared/ beside the repo


def load_vectors(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


def csum(hdr: bytes) -> int:
    s = sum(struct.unpack(f"!{len(hdr) // 2}H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4(payload: bytes, src: str = "192.0.2.1", dst: str = "198.51.100.7", proto: int = 17,
         tos: int = 0, ttl: int = 63, ident: int = 0x1234) -> bytes:
    import ipaddress

    h = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), ident, 0, ttl, proto, 0,
                    ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


def ipv6(payload: bytes, nh: int = 17) -> bytes:
    return (struct.pack("!IHBB", 0x60000000, len(payload), nh, 64) + bytes(range(1, 17))
            + bytes(range(17, 33)) + payload)


@dataclass
class RefSa:
    """The reference's view of an SA (same keys as an EspSaParams)."""

    spi: int
    encryption: str
    enc_key: bytes = b""
    salt: bytes = b""
    integrity: str = "none"
    auth_key: bytes = b""

    @property
    def iv_len(self) -> int:
        return {"aes-gcm-16": 8, "aes-cbc": 16}.get(self.encryption, 0)

    @property
    def icv_len(self) -> int:
        if self.encryption == "aes-gcm-16":
            return 16
        return {"hmac-sha2-256-128": 16, "hmac-sha1-96": 12}.get(self.integrity, 0)

    def mac(self, data: bytes) -> bytes:
        if self.integrity == "hmac-sha2-256-128":
            return hmac.new(self.auth_key, data, hashlib.sha256).digest()[:16]
        if self.integrity == "hmac-sha1-96":
            return hmac.new(self.auth_key, data, hashlib.sha1).digest()[:12]
        return b""


def ref_encrypt(sa: RefSa, inner: bytes, seq: int, iv: bytes, nh: int | None = None,
                pad: bytes | None = None) -> bytes:
    """ESP packet (from the SPI on). `pad` overrides the RFC padding (for bad-padding tests)."""
    if nh is None:
        nh = 4 if inner[0] >> 4 == 4 else 41
    align = 16 if sa.encryption == "aes-cbc" else 4
    if pad is None:
        n = (align - (len(inner) + 2) % align) % align
        pad = bytes(range(1, n + 1))
    pt = inner + pad + bytes([len(pad), nh])
    hdr = struct.pack("!II", sa.spi, seq)
    if sa.encryption == "aes-gcm-16":
        ct = AESGCM(sa.enc_key).encrypt(sa.salt + iv, pt, hdr)
        return hdr + iv + ct
    if sa.encryption == "aes-cbc":
        enc = Cipher(algorithms.AES(sa.enc_key), modes.CBC(iv)).encryptor()
        body = hdr + iv + enc.update(pt) + enc.finalize()
    else:
        body = hdr + pt
    return body + sa.mac(body)


def ref_decrypt(sa: RefSa, packet: bytes) -> tuple[int, bytes, int]:
    """(next header, payload without padding, seq) of an ESP packet; raises ValueError."""
    hdr, iv = packet[:8], packet[8:8 + sa.iv_len]
    spi, seq = struct.unpack("!II", hdr)
    if spi != sa.spi:
        raise ValueError("spi")
    body = packet[8 + sa.iv_len:]
    if sa.encryption == "aes-gcm-16":
        pt = AESGCM(sa.enc_key).decrypt(sa.salt + iv, body, hdr)
    else:
        icv = sa.icv_len
        data, tag = (packet[:-icv], packet[-icv:]) if icv else (packet, b"")
        if not hmac.compare_digest(sa.mac(data), tag):
            raise ValueError("icv")
        ct = body[:len(body) - icv]
        if sa.encryption == "aes-cbc":
            dec = Cipher(algorithms.AES(sa.enc_key), modes.CBC(iv)).decryptor()
            pt = dec.update(ct) + dec.finalize()
        else:
            pt = ct
    pad_len, nh = pt[-2], pt[-1]
    if pt[-2 - pad_len:-2] != bytes(range(1, pad_len + 1)):
        raise ValueError("padding")
    return nh, pt[:-2 - pad_len], seq


# Algorithm suites used across the tests: (name, encryption, enc key len, integrity, auth key len)
SUITES = [
    ("gcm128", "aes-gcm-16", 16, "none", 0),
    ("gcm256", "aes-gcm-16", 32, "none", 0),
    ("cbc128-sha256", "aes-cbc", 16, "hmac-sha2-256-128", 32),
    ("cbc256-sha256", "aes-cbc", 32, "hmac-sha2-256-128", 32),
    ("cbc128-sha1", "aes-cbc", 16, "hmac-sha1-96", 20),
    ("cbc256-sha1", "aes-cbc", 32, "hmac-sha1-96", 20),
    ("null-sha256", "null", 0, "hmac-sha2-256-128", 32),
    ("null-sha1", "null", 0, "hmac-sha1-96", 20),
]

LOCAL, REMOTE = "203.0.113.1", "203.0.113.2"


def suite_sas(suite: tuple, spi: int = 0x1000, tunnel: int = 5, seed: int = 1, **extra
              ) -> tuple[esp.EspSaParams, esp.EspSaParams, RefSa]:
    """An outbound and an inbound SA with the same keys, and the reference view of them."""
    import random

    rnd = random.Random(seed)
    _, enc, klen, integ, alen = suite
    key = rnd.randbytes(klen)
    salt = rnd.randbytes(4) if enc == "aes-gcm-16" else b""
    akey = rnd.randbytes(alen)
    common = {"spi": spi, "encryption": enc, "enc_key": key, "salt": salt, "integrity": integ, "auth_key": akey,
                  "tunnel_id": tunnel, "allow_null": enc == "null"}
    out_extra = {k: v for k, v in extra.items() if k in ("encap_sport", "encap_dport", "node_id",
                                                           "ttl", "hard_packets", "soft_packets",
                                                           "hard_bytes", "soft_bytes")}
    in_extra = {k: v for k, v in extra.items() if k in ("replay_window", "hard_packets",
                                                          "soft_packets", "hard_bytes",
                                                          "soft_bytes", "check_dst")}
    out = esp.EspSaParams(direction="out", local=LOCAL, remote=REMOTE, **common, **out_extra)
    inn = esp.EspSaParams(direction="in", local=REMOTE, **common, **in_extra)
    return out, inn, RefSa(spi, enc, key, salt, integ, akey)


def outer_ipv4(esp_packet: bytes, udp: tuple[int, int] | None = None, src: str = LOCAL,
               dst: str = REMOTE) -> bytes:
    if udp:
        esp_packet = struct.pack("!HHHH", udp[0], udp[1], 8 + len(esp_packet), 0) + esp_packet
        return ipv4(esp_packet, src, dst, proto=17, ttl=64, ident=0)
    return ipv4(esp_packet, src, dst, proto=50, ttl=64, ident=0)


def run(worker: esp.EspWorker, packets: list[bytes], op: str = "decrypt", tunnel: int = 0,
        headroom: int = 128, frame_size: int = 2048) -> list[tuple[str, bytes | None]]:
    b = esp.PacketBatch(max(1, len(packets)), frame_size=frame_size, headroom=headroom)
    b.fill(packets, tunnel=tunnel)
    getattr(worker, op)(b)
    return b.results()

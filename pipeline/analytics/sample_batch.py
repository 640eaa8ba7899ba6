"""Packet samples parsed and counted a batch at a time with numpy (no Python work per record).

The ring buffer consumer (native/ring.c, ``pipeline._ring``) leaves a batch of ``struct
xt_sample`` records (bpf/sample.h) in a flat buffer; :data:`RECORD_DTYPE` views it as a numpy
structured array. :func:`parse` does, for every record at once, what
:func:`pipeline.analytics.samples.headers` does for one frame (that function stays the
reference; tests/test_analytics_batch.py checks both agree): Ethernet, then IPv4 or IPv6, through
one level of GRE (RFC 2784 section 2, with the RFC 2890 key and sequence number fields) to the
innermost IP header, its protocol, and for TCP/UDP/SCTP the destination port and for TCP the
flags. :func:`count` turns a parsed batch into (tunnel, value) -> count pairs per kind with
``np.unique``; only the distinct values are made into Python objects (address strings, names)
by :meth:`pipeline.analytics.samples.Mix.add_batch`.

The rules, as the reference parser has them (``L`` is the captured length, at most 128):
  - no Ethernet header (L < 14), an EtherType other than IPv4 / IPv6, an IPv4 header with a
    version other than 4, IHL < 5 or shorter than 20 bytes in the capture, an IPv6 header with a
    version other than 6 or shorter than 40 bytes: nothing (no source);
  - IPv4 with a fragment offset: addresses and protocol, no ports (only the first fragment
    carries them, RFC 791 section 3.2);
  - protocol 47 in the outer header (not a fragment): the GRE header, when version 0 without
    the routing bit and complete in the capture, leads to the inner packet; when that parses
    (same rules, one level only) the inner packet is the answer, else the outer one (protocol
    47, no ports);
  - IPv6 next header is taken as the protocol (extension headers are not walked);
  - TCP (6), UDP (17), SCTP (132) with 4 bytes at the transport offset: the destination port;
    TCP with 14 bytes: the flags byte.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

SAMPLE_BYTES = 128   # XT_SAMPLE_BYTES
RECORD_DTYPE = np.dtype([("tunnel", "=u4"), ("reason", "=u4"), ("action", "=u4"),
                         ("flags", "=u4"), ("len", "=u4"), ("cap", "=u4"),
                         ("data", "u1", (SAMPLE_BYTES,))])
assert RECORD_DTYPE.itemsize == 24 + SAMPLE_BYTES   # struct xt_sample has no padding

_DATA = RECORD_DTYPE.fields["data"][1]              # offset of data[] in a record
_V6_SPAN = np.arange(16)


class Parsed(NamedTuple):
    """Per record: whether an IP source was found, and what the innermost IP header says."""
    ok: np.ndarray         # bool: a source address (the reference's ``src is not None``)
    v6: np.ndarray         # bool: the address is IPv6
    src4: np.ndarray       # uint32: the IPv4 source, meaningful where ok and not v6
    src6: np.ndarray       # (count of ok & v6, 16) uint8: the IPv6 sources of those rows, in order
    proto: np.ndarray      # int64, meaningful where ok
    has_dport: np.ndarray  # bool
    dport: np.ndarray      # int64, meaningful where has_dport
    has_flags: np.ndarray  # bool
    tcp_flags: np.ndarray  # int64, meaningful where has_flags


def parse(recs: np.ndarray) -> Parsed:
    """Parse every record of ``recs`` (an array of :data:`RECORD_DTYPE`)."""
    recs = np.ascontiguousarray(recs)
    n = len(recs)
    # one flat byte view of the batch: a byte of every record is one np.take at
    # (record start + offset of data[] + offset in the frame)
    flat = recs.view(np.uint8).reshape(-1)
    base = np.arange(n, dtype=np.int64) * RECORD_DTYPE.itemsize + _DATA
    length = np.minimum(recs["cap"], SAMPLE_BYTES).astype(np.int64)

    def u8(off) -> np.ndarray:
        # offsets past the capture read a clamped byte; every use is masked by a length check
        return flat.take(base + np.minimum(off, SAMPLE_BYTES - 1)).astype(np.int64)

    def u16(off) -> np.ndarray:
        return (u8(off) << 8) | u8(off + 1)

    def ip(off, ethertype: np.ndarray, valid: np.ndarray):
        b0 = u8(off)
        v4 = (valid & (ethertype == 0x0800) & (length >= off + 20) & (b0 >> 4 == 4)
              & ((b0 & 0xF) >= 5))
        v6 = valid & (ethertype == 0x86DD) & (length >= off + 40) & (b0 >> 4 == 6)
        proto = np.where(v4, u8(off + 9), u8(off + 6))
        frag = v4 & ((u16(off + 6) & 0x1FFF) != 0)
        l4 = np.where(v4, off + (b0 & 0xF) * 4, off + 40)
        return v4, v6, proto, frag, l4, off

    v4o, v6o, proto_o, frag_o, l4_o, _ = ip(14, u16(12), length >= 14)
    # GRE (RFC 2784 section 2): C (0x8000), K (0x2000, RFC 2890), S (0x1000) add 4 bytes each;
    # a version other than 0 or the (RFC 1701) routing bit 0x4000: not looked through
    gre = (v4o | v6o) & ~frag_o & (proto_o == 47) & (length >= l4_o + 4)
    gflags = u16(l4_o)
    gre &= ((gflags & 0x0007) == 0) & ((gflags & 0x4000) == 0)
    inner_off = (l4_o + 4 + 4 * ((gflags >> 15) & 1) + 4 * ((gflags >> 13) & 1)
                 + 4 * ((gflags >> 12) & 1))
    v4i, v6i, proto_i, frag_i, l4_i, _ = ip(inner_off, u16(l4_o + 2), gre)

    inner = v4i | v6i
    v4 = np.where(inner, v4i, v4o)
    v6 = np.where(inner, v6i, v6o)
    ok = v4 | v6
    proto = np.where(inner, proto_i, proto_o)
    frag = np.where(inner, frag_i, frag_o)
    l4 = np.where(inner, l4_i, l4_o)
    ip_off = np.where(inner, inner_off, 14)
    # GRE itself (47) is not a port protocol, so an outer header that led nowhere gets no ports
    has_dport = (ok & ~frag & ((proto == 6) | (proto == 17) | (proto == 132))
                 & (length >= l4 + 4))
    dport = u16(l4 + 2)
    has_flags = has_dport & (proto == 6) & (length >= l4 + 14)
    tcp_flags = u8(l4 + 13)
    # sources: IPv4 at +12 (4 bytes, always inside the 128 bytes when v4), IPv6 at +8 (16)
    pos4 = base + np.minimum(ip_off + 12, SAMPLE_BYTES - 4)
    src4 = flat.take(pos4[:, None] + _V6_SPAN[:4]).view(">u4").reshape(-1).astype(np.uint32)
    rows6 = np.flatnonzero(v6)
    src6 = flat.take((base[rows6] + ip_off[rows6] + 8)[:, None] + _V6_SPAN)
    return Parsed(ok, v6, src4, src6, proto, has_dport, dport, has_flags, tcp_flags)


def count_codes(tunnel: np.ndarray, code: np.ndarray,
                mask: np.ndarray | None = None) -> list[tuple[int, int, int]]:
    """(tunnel, code, count) for every distinct pair among the selected records (code < 2^32)."""
    if mask is not None:
        tunnel, code = tunnel[mask], code[mask]
    if not len(tunnel):
        return []
    key = (tunnel.astype(np.uint64) << np.uint64(32)) | code.astype(np.uint64)
    uniq, counts = np.unique(key, return_counts=True)
    return list(zip((uniq >> np.uint64(32)).tolist(), (uniq & np.uint64(0xFFFFFFFF)).tolist(),
                    counts.tolist(), strict=True))


def count_sources(tunnel: np.ndarray, p: Parsed) -> list[tuple[int, bool, bytes, int]]:
    """(tunnel, is IPv6, address bytes (4 or 16), count) for every distinct source."""
    out = [(t, False, a.to_bytes(4, "big"), c)
           for t, a, c in count_codes(tunnel, p.src4, p.ok & ~p.v6)]
    if len(p.src6):
        k = np.empty((len(p.src6), 20), dtype=np.uint8)
        k[:, :4] = tunnel[p.v6].astype(">u4").view(np.uint8).reshape(-1, 4)
        k[:, 4:] = p.src6
        uniq, counts = np.unique(k.view("V20").reshape(-1), return_counts=True)
        out += [(int.from_bytes(raw[:4], "big"), True, raw[4:], c)
                for raw, c in zip(uniq.tolist(), counts.tolist(), strict=True)]
    return out

"""Packet samples from the data plane's ring buffer (bpf/sample.h) and their per-minute mix.

The XDP program sends the first bytes of 1 in N frames, and of dropped frames up to a per-CPU
limit per second, as ``struct xt_sample`` records. :func:`parse_record` reads one record,
:func:`headers` parses the frame down to the innermost IP header (through GRE) and its TCP/UDP
ports and TCP flags, and :class:`Mix` counts them per tunnel and minute: top source addresses,
top destination ports, protocols and TCP flag combinations. Those three are the reference, one
record at a time; the sampler itself goes a batch at a time: :meth:`Mix.add_batch` parses and
counts a numpy array of records with :mod:`.sample_batch` (the same rules, checked against the
reference by tests/test_analytics_batch.py).

:class:`Sampler` owns the program side: writes the rate and the drop limit into
``xt_sample_state`` (every CPU's slot), maps the ring buffer with the native batch consumer
(native/ring.c, ``pipeline._ring``: every waiting record copied into one flat buffer per call, no
Python callback per record) and counts each batch into a :class:`Mix`.
"""
from __future__ import annotations

import struct
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from socket import AF_INET, AF_INET6, inet_ntop
from typing import NamedTuple

import numpy as np

from ..xdp import reasons as _reasons
from . import sample_batch as _batch

SAMPLE_BYTES = 128                 # XT_SAMPLE_BYTES
F_PERIODIC, F_DROP = 0x1, 0x2      # XT_SAMPLE_F_*
_HDR = struct.Struct("=6I")        # tunnel, reason, action, flags, len, cap
_U16, _PORTS = struct.Struct("!H"), struct.Struct("!HH")
RECORD_SIZE = _HDR.size + SAMPLE_BYTES
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 58: "icmpv6", 132: "sctp"}
_TCP_FLAGS = ((0x02, "SYN"), (0x10, "ACK"), (0x01, "FIN"), (0x04, "RST"), (0x08, "PSH"),
              (0x20, "URG"), (0x40, "ECE"), (0x80, "CWR"))
KINDS = ("src", "dport", "proto", "tcp_flags")


class Record(NamedTuple):
    tunnel: int
    reason: int
    action: int
    flags: int
    length: int
    data: bytes


def parse_record(raw: bytes) -> Record:
    if len(raw) != RECORD_SIZE:
        raise ValueError(f"sample record of {len(raw)} bytes, expected {RECORD_SIZE}")
    tunnel, reason, action, flags, length, cap = _HDR.unpack_from(raw)
    cap = min(cap, SAMPLE_BYTES, len(raw) - _HDR.size)
    return Record(tunnel, reason, action, flags, length, bytes(raw[_HDR.size:_HDR.size + cap]))


class Headers(NamedTuple):
    """What a sampled frame says about the innermost IP packet (None: not present/truncated)."""
    src: str | None = None
    dst: str | None = None
    proto: int | None = None
    sport: int | None = None
    dport: int | None = None
    tcp_flags: int | None = None


def _gre_inner(b: bytes, off: int) -> tuple[int, int] | None:
    """(offset of the inner packet, EtherType) after a GRE header at ``off`` (RFC 2784 section
    2, RFC 2890 section 2), or None when truncated or not version 0."""
    if len(b) < off + 4:
        return None
    flags, proto = struct.unpack_from("!HH", b, off)
    if flags & 0x0007 or flags & 0x4000:
        return None
    hlen = 4 + 4 * bool(flags & 0x8000) + 4 * bool(flags & 0x2000) + 4 * bool(flags & 0x1000)
    return off + hlen, proto


def _ip(b: bytes, off: int, ethertype: int, depth: int = 0) -> Headers:
    if ethertype == 0x0800:
        if len(b) < off + 20 or b[off] >> 4 != 4 or (b[off] & 0xF) < 5:
            return Headers()
        ihl = (b[off] & 0xF) * 4
        proto = b[off + 9]
        frag = _U16.unpack_from(b, off + 6)[0] & 0x1FFF
        src = inet_ntop(AF_INET, b[off + 12:off + 16])
        dst = inet_ntop(AF_INET, b[off + 16:off + 20])
        l4 = off + ihl
        if frag:
            return Headers(src, dst, proto)
    elif ethertype == 0x86DD:
        if len(b) < off + 40 or b[off] >> 4 != 6:
            return Headers()
        proto = b[off + 6]
        src = inet_ntop(AF_INET6, b[off + 8:off + 24])
        dst = inet_ntop(AF_INET6, b[off + 24:off + 40])
        l4 = off + 40
    else:
        return Headers()
    if proto == 47 and depth == 0:
        inner = _gre_inner(b, l4)
        if inner is not None:
            h = _ip(b, inner[0], inner[1], depth + 1)
            if h.src is not None:
                return h
        return Headers(src, dst, proto)
    if proto in (6, 17, 132) and len(b) >= l4 + 4:
        sport, dport = _PORTS.unpack_from(b, l4)
        flags = b[l4 + 13] if proto == 6 and len(b) >= l4 + 14 else None
        return Headers(src, dst, proto, sport, dport, flags)
    return Headers(src, dst, proto)


def headers(frame: bytes) -> Headers:
    """The innermost IP packet's addresses, protocol, ports and TCP flags of an Ethernet frame
    (one level of GRE is looked through; ESP is opaque)."""
    if len(frame) < 14:
        return Headers()
    return _ip(frame, 14, _U16.unpack_from(frame, 12)[0])


def protocol_name(proto: int) -> str:
    return PROTO_NAMES.get(proto, str(proto))


def flag_names(flags: int) -> str:
    names = [n for bit, n in _TCP_FLAGS if flags & bit]
    return "|".join(names) if names else "none"


_FLAG_NAMES = [flag_names(f) for f in range(256)]


@dataclass
class Mix:
    """Sample counts per (minute, tunnel index, kind, key); kinds are :data:`KINDS` plus
    ``samples`` (key ``periodic`` / ``drop``: how many of each the minute holds)."""
    counts: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, rec: Record, when: float) -> None:
        minute = int(when) // 60 * 60
        t = rec.tunnel
        h = headers(rec.data)
        keys = []
        if rec.flags & F_PERIODIC:
            keys.append((minute, t, "samples", "periodic"))
        if rec.flags & F_DROP:
            keys.append((minute, t, "samples", "drop"))
            keys.append((minute, t, "drop_reason", _reasons.load().name(rec.reason)))
        if h.src is not None:
            keys.append((minute, t, "src", h.src))
            keys.append((minute, t, "proto", PROTO_NAMES.get(h.proto) or str(h.proto)))
            if h.dport is not None:
                keys.append((minute, t, "dport", str(h.dport)))
            if h.tcp_flags is not None:
                keys.append((minute, t, "tcp_flags", _FLAG_NAMES[h.tcp_flags]))
        with self.lock:
            counts = self.counts
            for k in keys:
                counts[k] += 1

    def add_batch(self, recs: np.ndarray, when: float) -> None:
        """Count a batch of records (an array of :data:`sample_batch.RECORD_DTYPE`), all filed
        under the minute of ``when``: the same counts as :meth:`add` of each record."""
        if not len(recs):
            return
        minute = int(when) // 60 * 60
        tunnel, flags = recs["tunnel"], recs["flags"]
        p = _batch.parse(recs)
        out: Counter = Counter()
        one = np.ones(len(recs), dtype=np.int64)
        for t, _c, n in _batch.count_codes(tunnel, one, (flags & F_PERIODIC) != 0):
            out[(minute, t, "samples", "periodic")] += n
        drop = (flags & F_DROP) != 0
        if drop.any():
            names = _reasons.load()
            for t, _c, n in _batch.count_codes(tunnel, one, drop):
                out[(minute, t, "samples", "drop")] += n
            for t, r, n in _batch.count_codes(tunnel, recs["reason"], drop):
                out[(minute, t, "drop_reason", names.name(r))] += n
        for t, v6, addr, n in _batch.count_sources(tunnel, p):
            out[(minute, t, "src", inet_ntop(AF_INET6 if v6 else AF_INET, addr))] += n
        for t, proto, n in _batch.count_codes(tunnel, p.proto, p.ok):
            out[(minute, t, "proto", PROTO_NAMES.get(proto) or str(proto))] += n
        for t, port, n in _batch.count_codes(tunnel, p.dport, p.has_dport):
            out[(minute, t, "dport", str(port))] += n
        for t, f, n in _batch.count_codes(tunnel, p.tcp_flags, p.has_flags):
            out[(minute, t, "tcp_flags", _FLAG_NAMES[f])] += n
        with self.lock:
            self.counts.update(out)

    def take(self) -> Counter:
        """The counts gathered since the last call (and forget them)."""
        with self.lock:
            out, self.counts = self.counts, Counter()
        return out


class SamplerError(RuntimeError):
    """The ring buffer could not be mapped or drained."""


BATCH = 4096   # records per native drain call (the 1 MiB ring holds about 6,500)


class Sampler:
    """The program side of sampling: configure ``xt_sample_state`` and drain ``xt_samples``.

    ``bpf`` is the bcc BPF object of a program built with -DXT_FEATURE_SAMPLE. ``clock`` gives
    the wall-clock time the records of a drain are filed under (their minute: one reading per
    batch); the last ``keep`` records are kept as parsed in ``recent`` (for inspection).

    The ring is mapped by the native consumer (``pipeline._ring``), not opened through bcc: one
    consumer per ring, so open one Sampler per program. ``received`` counts the records drained,
    ``malformed`` those of another size than ``struct xt_sample`` (consumed, not counted in
    the mix)."""

    def __init__(self, bpf, rate: int, drop_limit: int, clock=None, keep: int = 0,
                 batch: int = BATCH) -> None:
        import time

        from pipeline._ring import ffi, lib
        self.bpf = bpf
        self.recent: deque[Record] = deque(maxlen=keep)   # the last ``keep`` records, as parsed
        self.clock = clock or time.time
        self.mix = Mix()
        self.received = 0
        self.malformed = 0
        self._consume = threading.Lock()     # one consumer of the ring at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.configure(rate, drop_limit)
        if not 1 <= batch < 1 << 32:
            raise ValueError(f"batch of {batch} records")
        err = ffi.new("int *")
        ring = lib.xt_ring_open(bpf[b"xt_samples"].map_fd, err)
        if ring == ffi.NULL:
            raise SamplerError(f"cannot map the xt_samples ring buffer: {_ring_error(err[0])}")
        self._lib = lib
        self._ring = ffi.gc(ring, lib.xt_ring_close)     # unmapped with the Sampler
        self._buf = bytearray(batch * RECORD_SIZE)
        self._view = np.frombuffer(self._buf, dtype=_batch.RECORD_DTYPE)
        self._ptr = ffi.from_buffer(self._buf)
        self._skipped = ffi.new("uint64_t *")

    def reset(self) -> None:
        """Zero the per-CPU bookkeeping and counters, keeping the configuration (tests, a
        restarted collector)."""
        self.configure(*self.config, keep_counters=False)

    def configure(self, rate: int, drop_limit: int, keep_counters: bool = True) -> None:
        """Write rate and drop limit into every CPU's slot of xt_sample_state."""
        if not 0 <= rate < 1 << 32 or not 0 <= drop_limit < 1 << 32:
            raise ValueError(f"sample rate {rate} / drop limit {drop_limit} outside 0..2^32-1")
        t = self.bpf[b"xt_sample_state"]
        key = t.Key(0)
        vals = t[key] if keep_counters else t.Leaf()
        for v in vals:
            v.rate, v.drop_limit = rate, drop_limit
        t[key] = vals
        self.config = (rate, drop_limit)

    def drain(self) -> int:
        """Consume every record waiting in the ring buffer (non-blocking), a batch per native
        call, and count each batch into the mix; returns how many records (malformed included)."""
        lib = self._lib
        with self._consume:
            before = self.received + self.malformed
            cap = len(self._view)
            while True:
                self._skipped[0] = 0
                n = lib.xt_ring_drain(self._ring, self._ptr, RECORD_SIZE, cap, self._skipped)
                if n < 0:
                    raise SamplerError(f"draining xt_samples: {_ring_error(n)}")
                self.malformed += int(self._skipped[0])
                if n == 0:
                    break
                recs = self._view[:n]
                self.received += n
                self.mix.add_batch(recs, self.clock())
                keep = self.recent.maxlen
                if keep:
                    self.recent.extend(_record(r) for r in recs[-keep:])
                if n < cap:
                    break
            return self.received + self.malformed - before

    def start(self, every: float = 0.1) -> Sampler:
        """Drain every ``every`` seconds in a thread, so a burst of samples never waits a
        whole collection interval in the ring (the program does not wake consumers: it submits
        with BPF_RB_NO_WAKEUP); ``close()`` stops it."""
        def loop() -> None:
            while not self._stop.wait(every):
                self.drain()
        self._thread = threading.Thread(target=loop, name="xtransit-samples", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.drain()
        self._stop.clear()

    def counters(self) -> dict[str, int]:
        """The program's per-CPU sampler counters, summed: sent, lost, suppressed."""
        t = self.bpf[b"xt_sample_state"]
        vals = t[t.Key(0)]
        return {k: sum(getattr(v, k) for v in vals) for k in ("sent", "lost", "suppressed")}


def _record(r: np.void) -> Record:
    cap = min(int(r["cap"]), SAMPLE_BYTES)
    return Record(int(r["tunnel"]), int(r["reason"]), int(r["action"]), int(r["flags"]),
                  int(r["len"]), r["data"][:cap].tobytes())


def _ring_error(code: int) -> str:
    import os

    from pipeline._ring import lib
    if code == lib.XT_RING_E_NOT_RINGBUF:
        return "not a BPF ring buffer map"
    if code == lib.XT_RING_E_RECORD_SIZE:
        return f"record size {RECORD_SIZE} does not fit the ring"
    return os.strerror(-code) if code < 0 else f"error {code}"

"""The batch parser and counter (pipeline/analytics/sample_batch.py, Mix.add_batch) against the
reference, one record at a time (samples.headers, parse_record, Mix.add).

A corpus of frames crafted with scapy (plain IPv4/IPv6; GRE with and without key, checksum,
sequence number, version 1, routing bit, GRE over IPv6, GRE in GRE; IPv4 options and fragments;
TCP flag mixes, UDP, SCTP, ICMP, ICMPv6, ESP; non-IP; every truncation of some of them; frames
longer than the 128 captured bytes), then the same frames with random header bytes changed
(a fixed seed, so every run checks the same records). Both sides must give identical counters,
and identical per-record header fields.
"""
from __future__ import annotations

from collections import Counter
from socket import AF_INET, AF_INET6, inet_ntop

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.ipsec import ESP
from scapy.layers.l2 import ARP, GRE, Dot1Q, Ether
from scapy.layers.sctp import SCTP

from pipeline.analytics import sample_batch as B
from pipeline.analytics import samples as S
from pipeline.xdp.reasons import load as load_reasons

E = Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01")
V4 = IP(src="198.51.100.7", dst="203.0.113.5")
V6 = IPv6(src="2001:db8::7", dst="2001:db8:1::5")
OUT4 = IP(src="192.0.2.1", dst="192.0.2.2")
OUT6 = IPv6(src="2001:db8:ff::1", dst="2001:db8:ff::2")
FLAG_MIXES = ("S", "SA", "A", "FA", "R", "RA", "PA", "", "FSRPAUEC", "SE", "SEC", "U")


def _inner():
    """Inner packets of every kind the parser distinguishes."""
    out = [V4 / TCP(sport=1000 + i, dport=80 + i, flags=f) for i, f in enumerate(FLAG_MIXES)]
    out += [V6 / TCP(dport=443, flags=f) for f in ("S", "SA", "FA")]
    out += [IP(src="10.1.2.3", dst="10.9.9.9") / UDP(sport=5353, dport=53) / b"q",
            V6 / UDP(dport=4500) / b"x",
            V4 / SCTP(sport=1, dport=2905),
            V4 / ICMP(), V6 / ICMPv6EchoRequest(),
            IP(src="10.0.0.9", dst="10.0.0.1", proto=50) / ESP(spi=7, seq=1),
            IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x01" * 8) / TCP(dport=22, flags="S"),
            IP(src="10.0.0.3", dst="10.0.0.4", flags="MF") / UDP(dport=1234),   # first fragment
            IP(src="10.0.0.5", dst="10.0.0.6", frag=100) / UDP(dport=9),        # not first
            IP(src="10.0.0.7", dst="10.0.0.8", proto=99) / (b"\0" * 8),
            IPv6(src="::ffff:10.1.1.1", dst="::1", nh=0) / (b"\0" * 8)]
    return out


def corpus() -> list[bytes]:
    frames = []
    for pkt in _inner():
        frames.append(bytes(E / pkt))
        frames.append(bytes(E / OUT4 / GRE() / pkt))
        frames.append(bytes(E / OUT4 / GRE(key_present=1, key=0x1234) / pkt))
        frames.append(bytes(E / OUT6 / GRE(key_present=1, key=7) / pkt))
        frames.append(bytes(E / OUT4 / GRE(chksum_present=1, seqnum_present=1, key_present=1,
                                           key=1, sequence_number=9) / pkt))
    syn = V4 / TCP(dport=80, flags="S")
    frames += [
        bytes(E / OUT4 / GRE(version=1, key_present=1) / syn),        # PPTP GRE: not looked into
        bytes(E / OUT4 / GRE(routing_present=1) / syn),               # routing bit: not looked into
        bytes(E / OUT4 / GRE(proto=0x6558) / Ether() / syn),          # Ethernet in GRE
        bytes(E / OUT4 / GRE() / OUT4 / GRE() / syn),                 # GRE in GRE: one level
        bytes(E / IP(src="192.0.2.9", dst="192.0.2.10", frag=3) / GRE() / syn),  # fragment
        bytes(E / IP(src="192.0.2.9", dst="192.0.2.10", options=b"\x01" * 40) /
              GRE(chksum_present=1, seqnum_present=1, key_present=1) / V6 / TCP(dport=8080)),
        bytes(E / OUT4 / GRE(proto=0x86DD) / syn),                    # says IPv6, carries IPv4
        bytes(E / OUT4 / GRE(proto=0x0800) / V6 / TCP()),             # and the other way round
        bytes(E / ARP()),
        bytes(E / Dot1Q(vlan=5) / syn),
        bytes(Ether(type=0x88B5) / (b"\x45" * 60)),
        bytes(Ether(type=0x0800) / (b"\x46" + b"\0" * 60)),            # IHL 6, zeros after
        bytes(Ether(type=0x0800) / (b"\x44" + b"\0" * 60)),            # IHL 4: invalid
        bytes(Ether(type=0x0800) / (b"\x65" + b"\0" * 60)),            # version 6 in an IPv4 frame
        bytes(Ether(type=0x86DD) / (b"\x45" + b"\0" * 60)),
        b"", b"\x00" * 13,
    ]
    # every truncation of a few frames: plain, GRE + key + IPv6 inner, GRE + IPv4 + TCP
    for f in (bytes(E / syn), bytes(E / OUT4 / GRE(key_present=1, key=5) / V6 / TCP(flags="SA")),
              bytes(E / OUT6 / GRE() / syn / b"payload")):
        frames += [f[:cut] for cut in range(len(f))]
    return frames


REASONS = load_reasons()
REASON_NUMBERS = sorted(REASONS.by_number) + [999]
TUNNELS = (0, 1, 7, 65535, 2**32 - 1)
FLAGS = (S.F_PERIODIC, S.F_DROP, S.F_PERIODIC | S.F_DROP, 0)


def records(frames: list[bytes], seed: int = 0, cap_noise: bool = False) -> np.ndarray:
    """One record per frame; tunnel, reason and flags cycle through the interesting values; with
    cap_noise some caps claim more than 128 bytes or fewer than the frame has."""
    rng = np.random.default_rng(seed)
    recs = np.zeros(len(frames), dtype=B.RECORD_DTYPE)
    for i, f in enumerate(frames):
        r = recs[i]
        r["tunnel"] = TUNNELS[i % len(TUNNELS)]
        r["reason"] = REASON_NUMBERS[i % len(REASON_NUMBERS)]
        r["action"] = i % 5
        r["flags"] = FLAGS[(i // 3) % len(FLAGS)]
        r["len"] = len(f)
        cap = min(len(f), S.SAMPLE_BYTES)
        r["data"][:cap] = np.frombuffer(f[:cap], dtype=np.uint8)
        if cap_noise and i % 7 == 0:
            cap = int(rng.integers(0, 400))
        r["cap"] = cap
    return recs


def raw_records(recs: np.ndarray) -> list[bytes]:
    """The records as the ring buffer carries them, one bytes object each."""
    b = recs.tobytes()
    return [b[i * S.RECORD_SIZE:(i + 1) * S.RECORD_SIZE] for i in range(len(recs))]


def reference(recs: np.ndarray, when: float) -> Counter:
    mix = S.Mix()
    for raw in raw_records(recs):
        mix.add(S.parse_record(raw), when)
    return mix.take()


def batch(recs: np.ndarray, when: float) -> Counter:
    mix = S.Mix()
    mix.add_batch(recs, when)
    return mix.take()


def per_record_fields(recs: np.ndarray) -> tuple[list, list]:
    """(reference, batch) per record: src, proto, dport, tcp_flags (None where absent)."""
    p = B.parse(recs)
    row6 = np.cumsum(p.v6) - 1          # row i's place among the IPv6 sources
    ref, got = [], []
    for i, raw in enumerate(raw_records(recs)):
        h = S.headers(S.parse_record(raw).data)
        ref.append((h.src, h.proto, h.dport, h.tcp_flags))
        if not p.ok[i]:
            got.append((None, None, None, None))
            continue
        if p.v6[i]:
            src = inet_ntop(AF_INET6, p.src6[row6[i]].tobytes())
        else:
            src = inet_ntop(AF_INET, int(p.src4[i]).to_bytes(4, "big"))
        got.append((src, int(p.proto[i]),
                    int(p.dport[i]) if p.has_dport[i] else None,
                    int(p.tcp_flags[i]) if p.has_flags[i] else None))
    return ref, got


def mutate(frames: list[bytes], n: int, seed: int) -> list[bytes]:
    """n frames from the corpus with 1-4 header bytes (offsets 12..99) set at random, and some
    cut short at random: EtherTypes, versions, IHLs, fragment fields, protocols, GRE flags."""
    rng = np.random.default_rng(seed)
    out = []
    full = [f for f in frames if len(f) >= 34]
    for _ in range(n):
        f = bytearray(full[int(rng.integers(len(full)))])
        for _ in range(int(rng.integers(1, 5))):
            off = int(rng.integers(12, min(len(f), 100)))
            f[off] = int(rng.integers(256))
        if rng.random() < 0.2:
            f = f[:int(rng.integers(0, len(f) + 1))]
        out.append(bytes(f))
    return out


def test_corpus_covers_the_cases():
    """The corpus exercises what it claims to: inner IPv6 through GRE with a key, TCP flags,
    UDP / ICMP without ports or flags, fragments, and frames with no source at all."""
    c = batch(records(corpus()), 125.0)
    src = {k[3] for k in c if k[2] == "src"}
    assert {"2001:db8::7", "198.51.100.7", "10.1.2.3", "192.0.2.1", "::ffff:10.1.1.1"} <= src
    protos = {k[3] for k in c if k[2] == "proto"}
    assert {"tcp", "udp", "sctp", "icmp", "icmpv6", "esp", "gre", "99", "0"} <= protos
    flags = {k[3] for k in c if k[2] == "tcp_flags"}
    assert {"SYN", "SYN|ACK", "ACK", "ACK|FIN", "none", "SYN|ACK|FIN|RST|PSH|URG|ECE|CWR"} <= flags
    assert {"reason_999"} <= {k[3] for k in c if k[2] == "drop_reason"}
    assert {k[1] for k in c} == set(TUNNELS)
    assert {k[0] for k in c} == {120}


@pytest.mark.parametrize("cap_noise", [False, True])
def test_corpus_identical_counts(cap_noise):
    recs = records(corpus(), cap_noise=cap_noise)
    ref = reference(recs, 125.0)
    assert sum(ref.values()) > len(recs)
    assert batch(recs, 125.0) == ref
    r, g = per_record_fields(recs)
    assert g == r


def test_mutated_frames_identical_counts():
    recs = records(mutate(corpus(), 20_000, seed=8), seed=8, cap_noise=True)
    ref = reference(recs, 3600.0)
    got = batch(recs, 3600.0)
    assert got == ref
    r, g = per_record_fields(recs)
    assert g == r
    # the mutations reach every outcome: no source, source without ports, ports without flags
    assert sum(1 for x in r if x[0] is None) > 1000
    assert sum(1 for x in r if x[0] is not None and x[2] is None) > 1000
    assert sum(1 for x in r if x[2] is not None and x[3] is None) > 1000


def test_batches_add_up_and_minutes_split():
    """Counting in pieces gives the same total as counting at once; records are filed under the
    minute of the batch's time."""
    recs = records(corpus())
    whole = batch(recs, 59.0)
    mix = S.Mix()
    for lo in range(0, len(recs), 17):
        mix.add_batch(recs[lo:lo + 17], 59.0)
    mix.add_batch(recs[:0], 59.0)
    assert mix.take() == whole
    mix.add_batch(recs[:5], 59.9)
    mix.add_batch(recs[5:10], 60.0)
    c = mix.take()
    assert {k[0] for k in c} == {0, 60}
    assert c + Counter() == reference(recs[:5], 0.0) + reference(recs[5:10], 60.0)


def test_syn_flood_sources_and_port():
    """Many sources, one port, SYN only, through a keyed GRE tunnel: every source counted once
    per SYN it sent, under the tunnel, and nothing else."""
    frames = [bytes(E / OUT4 / GRE(key_present=1, key=3) /
                    IP(src=f"100.64.{i // 250}.{i % 250 + 1}", dst="203.0.113.80") /
                    TCP(sport=40000 + i, dport=443, flags="S"))
              for i in range(1000) for _ in range(1 + i % 3)]
    recs = np.zeros(len(frames), dtype=B.RECORD_DTYPE)
    for i, f in enumerate(frames):
        recs[i]["data"][:len(f)] = np.frombuffer(f, dtype=np.uint8)
        recs[i]["cap"], recs[i]["len"] = len(f), len(f)
    recs["tunnel"], recs["flags"] = 3, S.F_PERIODIC
    c = batch(recs, 600.0)
    assert c == reference(recs, 600.0)
    assert c[(600, 3, "src", "100.64.0.3")] == 3 and c[(600, 3, "src", "100.64.3.250")] == 1
    assert sum(v for k, v in c.items() if k[2] == "src") == len(frames)
    assert len([k for k in c if k[2] == "src"]) == 1000
    assert (c[(600, 3, "dport", "443")], c[(600, 3, "tcp_flags", "SYN")],
            c[(600, 3, "proto", "tcp")], c[(600, 3, "samples", "periodic")]) == (len(frames),) * 4
    assert len(c) == 1000 + 4

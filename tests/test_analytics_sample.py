"""bpf/sample.h through BPF_PROG_TEST_RUN (bpf/xdp_sample_test.c), and the header parser.

The test entry leaves every frame with a verdict the test sets; the sampler's records come back
through the real ring buffer. Runs are pinned to one CPU, so the per-CPU 1-in-N count is exact.
"""
from __future__ import annotations

import os

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import GRE, Ether

from pipeline.analytics import samples as S
from pipeline.xdp import testrun
from pipeline.xdp.dataplane import BPF_DIR, compile_program
from pipeline.xdp.reasons import load as load_reasons

pytestmark = pytest.mark.netns   # needs root for BPF

R = load_reasons()


@pytest.fixture(scope="module")
def compiled():
    from bcc import BPF
    p = compile_program(["-DXT_FEATURE_SAMPLE"], path=BPF_DIR / "xdp_sample_test.c")
    fn = p.bpf.load_func(b"xdp_sample_test", BPF.XDP)
    sampler = S.Sampler(p.bpf, 0, 0, clock=lambda: 125.0, keep=100)
    yield p, fn.fd, sampler
    p.close()


@pytest.fixture
def prog(compiled):
    """(program, entry fd, sampler) with the sampler state zeroed, on one CPU."""
    p, fd, sampler = compiled
    sampler.drain()
    sampler.reset()
    sampler.recent.clear()
    sampler.received = sampler.malformed = 0
    sampler.mix.take()
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(saved)})
    try:
        yield p, fd, sampler
    finally:
        os.sched_setaffinity(0, saved)


def verdict(p, action: int, reason: str, tunnel: int) -> None:
    t = p.bpf[b"xt_sample_test_out"]
    leaf = t.Leaf()
    leaf.action, leaf.reason, leaf.tunnel = action, R.number(reason), tunnel
    t[t.Key(0)] = leaf


SYN = bytes(Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01") /
            IP(src="198.51.100.7", dst="203.0.113.5") / TCP(sport=1234, dport=80, flags="S"))


def test_one_in_n_exact_records(prog):
    p, fd, sampler = prog
    sampler.configure(4, 0)
    verdict(p, testrun.XdpAction.REDIRECT, "encap_forwarded", 7)
    frames = [SYN[:-2] + i.to_bytes(2, "big") for i in range(20)]  # distinguishable tails
    for f in frames:
        assert testrun.run(fd, f).action == testrun.XdpAction.REDIRECT
    assert sampler.drain() == 5
    records = list(sampler.recent)
    assert [r.data for r in records] == [frames[i] for i in (3, 7, 11, 15, 19)]
    assert {(r.tunnel, r.reason, r.action, r.flags, r.length) for r in records} == {
        (7, R.number("encap_forwarded"), 4, S.F_PERIODIC, len(SYN))}
    c = sampler.mix.take()
    assert (c[(120, 7, "src", "198.51.100.7")], c[(120, 7, "dport", "80")],
            c[(120, 7, "tcp_flags", "SYN")], c[(120, 7, "proto", "tcp")]) == (5, 5, 5, 5)
    assert sampler.counters() == {"sent": 5, "lost": 0, "suppressed": 0}


def test_drain_in_small_batches(prog):
    """A drain goes on batch after batch until the ring is empty: a Sampler with room for 3
    records per native call gets all 10, in order, with the same counts."""
    p, fd, sampler = prog
    sampler.configure(1, 0)
    verdict(p, testrun.XdpAction.PASS, "not_ours", 2)
    frames = [SYN[:-2] + i.to_bytes(2, "big") for i in range(10)]
    for f in frames:
        testrun.run(fd, f)
    small = S.Sampler(p.bpf, 1, 0, clock=lambda: 125.0, keep=100, batch=3)
    assert small.drain() == 10
    assert [r.data for r in small.recent] == frames
    assert (small.received, small.malformed, sampler.drain()) == (10, 0, 0)
    c = small.mix.take()
    assert (c[(120, 2, "src", "198.51.100.7")], c[(120, 2, "samples", "periodic")],
            c[(120, 2, "tcp_flags", "SYN")], len(c)) == (10, 10, 10, 5)


def test_drops_sampled_up_to_the_limit_and_long_frames_cut(prog):
    p, fd, sampler = prog
    sampler.configure(0, 3)
    verdict(p, testrun.XdpAction.DROP, "unknown_tunnel", 0)
    big = bytes(Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01") / IP(src="192.0.2.9", dst="192.0.2.1") / GRE() /
                IP(src="10.0.0.1", dst="10.0.0.2") / UDP(dport=53) / (b"x" * 400))
    for _ in range(10):
        assert testrun.run(fd, big).action == testrun.XdpAction.DROP
    verdict(p, testrun.XdpAction.PASS, "not_ours", 0)
    for _ in range(5):                   # passes are never drop-sampled; rate 0: no periodic
        testrun.run(fd, big)
    assert sampler.drain() == 3
    c = sampler.mix.take()
    assert c[(120, 0, "samples", "drop")] == 3
    assert c[(120, 0, "drop_reason", "unknown_tunnel")] == 3
    assert c[(120, 0, "src", "10.0.0.1")] == 3          # the inner packet, through GRE
    assert c[(120, 0, "dport", "53")] == 3
    assert sampler.counters() == {"sent": 3, "lost": 0, "suppressed": 7}


def test_record_layout_short_frame(prog):
    p, fd, sampler = prog
    sampler.configure(1, 0)
    verdict(p, testrun.XdpAction.PASS, "not_ours", 0)
    frame = bytes(Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01") /
                  IP(src="192.0.2.1", dst="192.0.2.2") / ICMP())
    testrun.run(fd, frame)
    assert sampler.drain() == 1
    assert (sampler.received, sampler.malformed) == (1, 0)   # exactly RECORD_SIZE bytes
    rec = sampler.recent[-1]
    assert (rec.length, rec.data, rec.flags, rec.tunnel) == (len(frame), frame, S.F_PERIODIC, 0)


def test_headers_independent_bytes():
    h = S.headers(SYN)
    assert (h.src, h.dst, h.proto, h.sport, h.dport, h.tcp_flags) == (
        "198.51.100.7", "203.0.113.5", 6, 1234, 80, 0x02)
    gre6 = bytes(Ether() / IP(src="192.0.2.1", dst="198.51.100.1") / GRE(key_present=1, key=5) /
                 IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(dport=443, flags="SA"))
    h = S.headers(gre6)
    assert (h.src, h.dport, S.flag_names(h.tcp_flags)) == ("2001:db8::1", 443, "SYN|ACK")
    frag = bytes(Ether() / IP(src="192.0.2.1", dst="192.0.2.2", frag=10) / UDP(dport=9))
    assert S.headers(frag) == S.Headers("192.0.2.1", "192.0.2.2", 17)
    for cut in range(len(SYN)):       # every truncation parses to something, never raises
        S.headers(SYN[:cut])
    assert S.headers(SYN[:30]) == S.Headers()
    with pytest.raises(ValueError):
        S.parse_record(b"\0" * 10)
    with pytest.raises(ValueError):
        S.parse_record(b"\0" * (S.RECORD_SIZE + 1))

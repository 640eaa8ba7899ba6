"""The live-frames load generator, the counting sink and the rate harness's smoke mode.

Frame builders are checked against scapy (independent bytes and checksums); the generator and
sink on real veth pairs in namespaces, with exact packet and byte counts, native and generic
sink; frame contents captured byte for byte; the page-reuse pitfall proven both ways (a receiver
that rewrites headers never sees its own rewrite come back, and does when the generator copies
too little); the harness delivers exactly N frames through all three paths.
"""
from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import GRE, IP, TCP, UDP
from scapy.layers.l2 import Ether

from pipeline import loadgen as lg

REPO = Path(__file__).resolve().parent.parent
SCRIBBLE = Path(__file__).parent / "bpf" / "scribble.c"
MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def _udp_frame(payload: bytes = b"x" * 18, sport: int = 1000) -> bytes:
    l4 = lg.udp_segment("10.0.0.1", "10.0.0.2", sport, 9, payload)
    return lg.ethernet(MAC_B, MAC_A, 0x0800, lg.ipv4_packet("10.0.0.1", "10.0.0.2", 17, l4))


def _checksums_ok(frame: bytes) -> bool:
    """scapy recomputes every IPv4/TCP/UDP checksum (outer and inner); the bytes must not move."""
    fresh = Ether(frame)
    for layer in (IP, TCP, UDP):
        nb = 1
        while (lay := fresh.getlayer(layer, nb)) is not None:
            del lay.chksum
            nb += 1
    return bytes(fresh) == frame


# --- frame builders (no privileges needed) -----------------------------------------------------

def test_udp_frame_matches_scapy():
    frame = _udp_frame()
    ref = (Ether(dst=MAC_B, src=MAC_A) / IP(src="10.0.0.1", dst="10.0.0.2", ttl=64, flags="DF",
                                             id=0) / UDP(sport=1000, dport=9) / (b"x" * 18))
    assert frame == bytes(ref)


def test_syn_with_mss_matches_scapy():
    seg = lg.tcp_syn_segment("10.0.0.1", "10.0.0.2", 1234, 80, mss=1460, payload=b"ab")
    pkt = lg.ipv4_packet("10.0.0.1", "10.0.0.2", 6, seg)
    ref = IP(src="10.0.0.1", dst="10.0.0.2", ttl=64, flags="DF", id=0) / TCP(
        sport=1234, dport=80, seq=0x01020304, flags="S", window=64240,
        options=[("MSS", 1460)]) / b"ab"
    assert pkt == bytes(ref)


def test_gre_keyed_frame_and_flow_field():
    inner = lg.pad_ipv4_to(64, lambda p: lg.ipv4_packet(
        "10.1.0.1", "10.2.0.1", 6, lg.tcp_syn_segment("10.1.0.1", "10.2.0.1", 5000, 80, payload=p)))
    assert len(inner) == 64
    outer = lg.ipv4_packet("192.0.2.2", "192.0.2.1", 47, lg.gre_header(0x0800, key=7) + inner)
    frame = lg.ethernet(MAC_B, MAC_A, 0x0800, outer)
    pkt = Ether(frame)
    assert pkt[GRE].key == 7 and pkt[GRE].key_present == 1 and pkt[GRE].proto == 0x0800
    assert pkt[GRE][IP][TCP].sport == 5000
    # 14 Ethernet + 20 outer IPv4 + 8 GRE (with key) + 20 inner IPv4 = 62
    assert lg.l4_source_port(frame) == (62, 62 + 16, False)
    assert _checksums_ok(frame)


def test_flow_field_refusals():
    frame = _udp_frame()
    assert lg.l4_source_port(frame) == (34, 40, True)
    # a GRE checksum (C bit) would go stale if the inner port changed: not varied
    gre_c = lg.ethernet(MAC_B, MAC_A, 0x0800, lg.ipv4_packet(
        "192.0.2.2", "192.0.2.1", 47, struct.pack("!HHHH", 0x8000, 0x0800, 0, 0) + frame[14:]))
    assert lg.l4_source_port(gre_c) is None
    assert lg.Frame.flows(gre_c, 100).vary_range == 1
    # IPv4 fragment: the port is not where it seems
    frag = bytearray(frame)
    frag[20:22] = b"\x20\x00"
    assert lg.l4_source_port(bytes(frag)) is None
    # ARP: nothing to vary
    assert lg.l4_source_port(MAC_B.encode()[:12] + b"\x08\x06" + b"\0" * 28) is None


def test_flow_field_ipv6_udp():
    seg = struct.pack("!HHHH", 1000, 9, 8 + 4, 0) + b"abcd"
    ip6 = struct.pack("!IHBB", 6 << 28, len(seg), 17, 64) + bytes(16) + bytes(15) + b"\x01"
    frame = lg.ethernet(MAC_B, MAC_A, 0x86DD, ip6 + seg)
    assert lg.l4_source_port(frame) == (54, 60, True)


@pytest.mark.parametrize("kw, msg", [
    ({"data": b"\0" * 13}, "14 to 2048"),
    ({"data": b"\0" * 2049}, "14 to 2048"),
    ({"data": b"\0" * 60, "vary_off": 59}, "vary_off=59"),
    ({"data": b"\0" * 60, "vary_off": 34, "vary_range": 0}, "vary_range"),
    ({"data": b"\0" * 60, "csum_off": 40}, "csum_off without vary_off"),
    ({"data": b"\0" * 60, "copy_len": 61}, "copy_len"),
])
def test_frame_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        lg.Frame(**kw)


# --- on real veth pairs ------------------------------------------------------------------------

def _pair(lab, queues: int = 1):
    """gen (g0) -- rcv (r0) with IPv6 off in both (no stray router solicitations to count)."""
    a, b = lab.namespace("lga"), lab.namespace("lgb")
    for ns in (a, b):
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", 1)
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", 1)
    lab.veth(a, "g0", b, "r0", mac_a=MAC_A, mac_b=MAC_B)
    if queues > 1:
        a.run("ethtool", "-L", "g0", "rx", str(queues), "tx", str(queues))
        b.run("ethtool", "-L", "r0", "rx", str(queues), "tx", str(queues))
    return a, b


def _diag(ns, ifname) -> str:
    return f"{ifname}: {lg.ethtool_stats(ns, ifname)} {lg.link_stats(ns, ifname)}"


@pytest.mark.netns
@pytest.mark.parametrize("mode", ["native", "generic"])
def test_sends_exactly_n_and_sink_counts_exact_bytes(lab, mode):
    a, b = _pair(lab)
    frame = _udp_frame(b"y" * 100)
    n = 100_000
    # generic mode: the veth's NAPI must run for XDP frames to be received at all: GRO on
    with lg.Sink(b, "r0", mode, gro=(mode == "generic")) as sink, \
            lg.LoadGen(a, "g0", [lg.Frame.flows(frame, 64)], peer=(b, "r0")) as gen:
        before = sink.count()
        res = gen.send(n)
        got = sink.count() - before
        assert (res.packets, res.bytes, res.errors) == (n, n * len(frame), 0)
        assert gen.counters()["runs"] == n
        assert got == lg.SinkCount(n, n * len(frame)), _diag(b, "r0")
        assert lg.xdp_attached(b, "r0") == mode
    assert lg.xdp_attached(b, "r0") is None  # detached on close


@pytest.mark.netns
def test_two_cpus_exact_count(lab):
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        pytest.skip("needs two CPUs to run on")
    a, b = _pair(lab, queues=2)
    frame = _udp_frame()
    with lg.Sink(b, "r0") as sink, lg.LoadGen(a, "g0", [frame], cpus=cpus) as gen:
        res = gen.send(100_001)
        assert res.packets == 100_001 and res.per_thread == [50_001, 50_000]
        assert sink.count() == lg.SinkCount(100_001, 100_001 * len(frame)), _diag(b, "r0")


@pytest.mark.netns
def test_frames_on_the_wire_exact(lab):
    """Round-robin of two templates of different lengths, the first with a varying source
    port: captured at the receiver's stack, byte for byte, checksums valid."""
    a, b = _pair(lab)
    b.ethtool("r0", "gro", "on")  # no XDP on r0: its NAPI must run (see pipeline/loadgen.py)
    port = lab.port(b, "r0")
    f1 = _udp_frame(b"A" * 30, sport=1000)
    l4 = lg.tcp_syn_segment("10.0.0.1", "10.0.0.2", 4000, 80, payload=b"B" * 300)
    f2 = lg.ethernet(MAC_B, MAC_A, 0x0800, lg.ipv4_packet("10.0.0.1", "10.0.0.2", 6, l4))
    with lg.LoadGen(a, "g0", [lg.Frame.flows(f1, 3), f2], peer=(b, "r0")) as gen:
        gen.send(8)
    got = port.recv_all(8, timeout=3, match=lambda fr: fr[12:14] == b"\x08\x00")
    assert len(got) == 8
    # runs 0,2,4,6 send f1 with step 0,1,2,0 (step = run / nframes % range on CPU 0); odd: f2
    cpu = min(os.sched_getaffinity(0))
    for i, fr in enumerate(got):
        if i % 2:
            assert fr == f2
            continue
        step = (i // 2 + cpu * 7919) % 3
        expect = Ether(f1)
        expect[UDP].sport = 1000 + step
        del expect[UDP].chksum
        assert fr == bytes(expect), f"frame {i}"


@pytest.mark.netns
@pytest.mark.parametrize("copy_len, stale_expected", [(None, False), (14, True)])
def test_receiver_rewrites_never_come_back(lab, copy_len, stale_expected):
    """Live-frame pages are recycled unreset: the receiver sets TTL 1 in every frame it drops.
    With the default copy (headers rewritten per run) no frame arrives with TTL != 64; copying
    only the Ethernet header (copy_len=14) lets the rewrite come back, proving the check."""
    a, b = _pair(lab)
    bpf = lg._compile(SCRIBBLE, ["-DSCRIBBLE_TTL=64"])
    try:
        lg.attach(bpf, "xdp_scribble", b, "r0", "native")
        frame = _udp_frame()
        n = 20_000
        with lg.LoadGen(a, "g0", [lg.Frame(frame, copy_len=copy_len)]) as gen:
            gen.send(n)
        counts = bpf[b"scribble_counts"]
        seen = sum(counts[counts.Key(0)])
        stale = sum(counts[counts.Key(1)])
        assert seen == n
        if stale_expected:
            assert stale > n // 2
        else:
            assert stale == 0
        lg.detach(b, "r0", "native")
    finally:
        bpf.cleanup()


@pytest.mark.netns
def test_refuses_a_peer_that_would_drop(lab):
    a, b = _pair(lab)
    why = lg.veth_ready(b, "r0")
    assert why is not None and "gro on" in why
    with pytest.raises(lg.LoadGenError, match="dropped"):
        lg.LoadGen(a, "g0", [_udp_frame()], peer=(b, "r0"))
    b.ethtool("r0", "gro", "on")
    assert lg.veth_ready(b, "r0") is None


@pytest.mark.netns
def test_unknown_interface_is_a_clear_error(lab):
    a, _b = _pair(lab)
    with pytest.raises(lg.LoadGenError, match="no interface 'nope0'"):
        lg.LoadGen(a, "nope0", [_udp_frame()])


@pytest.mark.netns
def test_cli_sends_count(lab, capsys):
    a, b = _pair(lab)
    with lg.Sink(b, "r0") as sink:
        rc = lg.main(["--netns", a.name, "--dev", "g0", "--dst-mac", MAC_B, "--src-mac", MAC_A,
                      "--flow", "10.0.0.1:1000", "10.0.0.2:9", "--gre", "192.0.2.2", "192.0.2.1",
                      "--gre-key", "0x10", "--tcp-syn", "--size", "64", "--count", "5000"])
        assert rc == 0
        # 14 + 20 + 8 (GRE with key) + 64
        assert sink.count() == lg.SinkCount(5000, 5000 * 106)
    assert "sent 5000 frames of 106 bytes" in capsys.readouterr().out


# --- the harness (bench/rates.py) in its smoke mode --------------------------------------------

@pytest.fixture
def rates():
    sys.path.insert(0, str(REPO))
    try:
        from bench import rates as mod
        yield mod
    finally:
        sys.path.remove(str(REPO))


@pytest.mark.netns
def test_harness_delivers_exactly_n_on_every_path(rates):
    """XDP_DROP ceiling, kernel forwarding and the reference XDP forwarder (native and generic):
    each measurement sends exactly N frames and the far end counts exactly N, with the bytes
    the path implies (same length: forwarding only decrements the TTL)."""
    n = 20_000
    frames = [rates.to_dut(rates.plain_udp(64))]
    size = len(frames[0].data)
    cases = [rates.drop_case("drop", frames), rates.kernel_case("kernel", frames),
             rates.xdp_case("fwd", frames, rates.reference_forwarder),
             rates.xdp_case("fwd_generic", frames,
                            lambda t: rates.reference_forwarder(t, "generic"))]
    with rates.Topology() as topo:
        bench = rates.Bench(topo, cases, cpus=[min(os.sched_getaffinity(0))],
                            warmup=0, count=n)
        try:
            bench.run(1)
            # a path that delivers frames of another length than the case expects is refused
            wrong = rates.xdp_case("fwd_wrong_len", frames, rates.reference_forwarder,
                                   out_len=size + 24)
            bench.results[wrong.name] = []
            with pytest.raises(rates.BenchError, match=f"not {size + 24} bytes each"):
                bench.measure(wrong)
        finally:
            bench.close()
    for name in ("drop", "kernel", "fwd", "fwd_generic"):
        m = bench.results[name][0]
        assert (m.offered, m.delivered, m.delivered_bytes) == (n, n, n * size), (name, m.dut)
        assert m.pps > 0
    assert bench.results["drop"][0].dut["d0.rxq_xdp_drops"] == n
    assert bench.results["kernel"][0].dut["d1.tx_packets"] == n
    assert bench.results["fwd"][0].dut["d0.rxq_xdp_redirect"] == n
    assert "ratio fwd / drop" in bench.table([("fwd", "drop")])


# --- trafgen configurations (bench/trafgen) ----------------------------------------------------

TRAFGEN = REPO / "bench" / "trafgen"


@pytest.mark.netns
@pytest.mark.parametrize("cfg, defines, frame_len, inner_len, key", [
    ("gre_syn_64.cfg", [], 102, 64, None),
    ("gre_syn_64.cfg", ["-D", "GRE_KEY=7"], 106, 64, 7),
    ("gre_syn_1400.cfg", [], 1438, 1400, None),
    ("ipv4_syn_64.cfg", [], 78, 64, None),
    ("ipv4_syn_1400.cfg", [], 1414, 1400, None),
    ("ipv4_udp_64.cfg", [], 60, 46, None),
])
def test_trafgen_config(lab, cfg, defines, frame_len, inner_len, key):
    """trafgen parses the config and sends one packet into a veth; captured and checked with
    scapy: exact length, every checksum, GRE fields, the MSS option; -D overrides the MACs."""
    a, b = _pair(lab)
    port = lab.port(b, "r0")
    a.run("trafgen", "--cpp", "--no-sock-mem", "-q", "--conf", str(TRAFGEN / cfg), "--dev", "g0",
          "-n", "1", "-D", "DST_MAC=0x02,0x00,0x00,0x00,0x00,0x0b",
          "-D", "SRC_MAC=0x02,0x00,0x00,0x00,0x00,0x0a", *defines, timeout=30)
    frame = port.recv(timeout=3, match=lambda fr: fr[12:14] == b"\x08\x00")
    assert frame is not None
    assert len(frame) == frame_len
    pkt = Ether(frame)
    assert (pkt.dst, pkt.src) == (MAC_B, MAC_A)
    assert _checksums_ok(frame)
    if cfg.startswith("gre"):
        assert (pkt[IP].src, pkt[IP].dst, pkt[IP].proto) == ("192.0.2.2", "192.0.2.1", 47)
        assert pkt[GRE].proto == 0x0800 and pkt[GRE].chksum_present == 0
        assert pkt[GRE].key_present == (key is not None) and pkt[GRE].key == key
        inner = pkt[GRE][IP]
    else:
        inner = pkt[IP]
    assert inner.len == inner_len and inner.ttl == 64 and inner.flags == "DF"
    if "syn" in cfg:
        assert inner[TCP].flags == "S" and inner[TCP].options == [("MSS", 1460)]
        assert (inner.src, inner.dst, inner[TCP].dport) == ("198.51.100.10", "198.18.0.1", 80)
    else:
        assert inner[UDP].dport == 9 and inner[UDP].len == 26


# --- the cost rig (per-packet program cost on frames the program rewrites) ---------------------

@pytest.mark.netns
def test_cost_rig_times_every_run_on_the_template(rates):
    """A plain repeated test run drifts: the reference forwarder decrements the TTL of the one
    buffer until it passes the packet to the kernel (TTL 1), and push4 runs out of headroom.
    Through the rig every run sees the template: the forwarder redirects every time, push4
    passes every time (its head is moved back); ``expect`` checks the verdict of every timed
    run. (The costs themselves are timing: bench/, not asserted here.)"""
    from bcc import BPF

    from pipeline.xdp import testrun
    from pipeline.xdp.testrun import XdpAction
    frame = rates.to_dut(rates.plain_udp(64))
    with rates.Topology() as topo:
        ref = topo.compiled("parse", lambda: lg._compile(lg.BPF_DIR / "bench_parse_tx.c"))
        tx = ref.load_func(b"xdp_bench_tx", BPF.XDP)
        fwd = topo.compiled("fwd", lambda: lg._compile(lg.BPF_DIR / "bench_fwd.c"))
        fwd_fn = fwd.load_func(b"xdp_bench_fwd", BPF.XDP)
        probe = topo.compiled("probe", lambda: lg._compile(REPO / "tests/bpf/testrun_probe.c"))
        push4 = probe.load_func(b"push4", BPF.XDP)
        with lg._thread_in_netns(topo.dut.name):
            d0 = lg._ifindex("d0")
            assert testrun.run(fwd_fn.fd, frame.data, ingress_ifindex=d0).action is \
                XdpAction.REDIRECT
            assert testrun.run(fwd_fn.fd, frame.data, repeat=100,
                               ingress_ifindex=d0).action is XdpAction.PASS
            assert testrun.run(push4.fd, frame.data, repeat=100).action is XdpAction.ABORTED
        with lg.CostRig(frame, tx.fd) as rig:
            rig.cost_ns(fwd_fn.fd, ns=topo.dut, ifname="d0", repeat=1000, rounds=1,
                        expect=XdpAction.REDIRECT)
            rig.cost_ns(push4.fd, ns=topo.dut, ifname="d0", repeat=1000, rounds=1,
                        expect=XdpAction.PASS)
            assert rig.counters()["errors"] == 0
            with pytest.raises(lg.LoadGenError, match="expected"):
                rig.cost_ns(fwd_fn.fd, ns=topo.dut, ifname="d0", repeat=10, rounds=1,
                            expect=XdpAction.TX)


# --- the GRE rate benchmark's plug (bench/bench_gre_rate.py), smoke -----------------------------

@pytest.mark.netns
def test_gre_bench_delivers_exactly_n_decapsulated_and_encapsulated(rates):
    """The GRE benchmark's cases, counted instead of timed: N GRE frames in, N decapsulated
    inner packets (14 + 64 bytes) at the sink; N plain packets in, N encapsulated ones
    (14 + 20 + 8 + 64 bytes, keyed GRE) at the sink; the ceiling and kernel cases exact too."""
    from bench import bench_gre_rate as gre
    n = 10_000
    cases, _ratios = gre.gre_cases([64])
    with rates.Topology() as topo:
        gre.prepare(topo)
        bench = rates.Bench(topo, cases, cpus=[min(os.sched_getaffinity(0))], warmup=0,
                            count=n)
        try:
            bench.run(1)
        finally:
            bench.close()
    want = {"xdp_drop/gre/64": 106, "xdp_drop/plain/64": 78, "kernel_fwd/64": 78,
            "gre_decap/64": 78, "gre_encap/64": 106}
    for name, size in want.items():
        m = bench.results[name][0]
        assert (m.offered, m.delivered, m.delivered_bytes) == (n, n, n * size), (name, m.dut)
    assert bench.results["gre_decap/64"][0].dut["d0.rxq_xdp_redirect"] == n


@pytest.mark.netns
def test_udp_checksum_that_steps_to_zero_is_sent_as_ffff(lab):
    """RFC 768: a computed UDP checksum of 0 is sent as 0xFFFF (0 means "none"). The payload is
    chosen so that the template's source port + 1 sums to exactly 0xFFFF; the generator's
    incremental update must send 0xFFFF for that step, as the independent builder does."""
    def seg(sport: int, payload: bytes) -> bytes:
        return lg.udp_segment("10.0.0.1", "10.0.0.2", sport, 9, payload)

    zero_sum = seg(1001, b"\0\0")  # checksum = ~S with payload word 0, so S = ~checksum
    s_val = ~struct.unpack_from("!H", zero_sum, 6)[0] & 0xFFFF
    payload = struct.pack("!H", ~s_val & 0xFFFF)  # makes the sum 0xFFFF: checksum 0 -> 0xFFFF
    assert struct.unpack_from("!H", seg(1001, payload), 6)[0] == 0xFFFF
    frames = {sport: lg.ethernet(MAC_B, MAC_A, 0x0800, lg.ipv4_packet(
        "10.0.0.1", "10.0.0.2", 17, seg(sport, payload))) for sport in (1000, 1001)}
    a, b = _pair(lab)
    b.ethtool("r0", "gro", "on")
    port = lab.port(b, "r0")
    with lg.LoadGen(a, "g0", [lg.Frame.flows(frames[1000], 2)]) as gen:
        gen.send(2)
    got = port.recv_all(2, timeout=3, match=lambda fr: fr[12:14] == b"\x08\x00")
    assert sorted(got) == sorted(frames.values())

"""XDP steering of the IPsec data path through BPF_PROG_TEST_RUN: bytes in, verdict and bytes out.

The program (bpf/xdp_esp_test.c, core in bpf/esp_steer.h) runs with ctx->ingress_ifindex set to a
veth whose queue 0 has a real AF_XDP socket in the XSKMAP, so a steered packet reports
XDP_REDIRECT and its output starts with the 16 bytes of metadata the worker reads.
"""
from __future__ import annotations

import ipaddress
import struct

import pytest
from esp_support import csum, ipv4, outer_ipv4

from pipeline import esp, ipsec, netns, xsk
from pipeline.xdp import testrun
from pipeline.xdp.testrun import XdpAction

pytestmark = pytest.mark.netns

EP, ROUTER = "192.0.2.1", "192.0.2.2"
ETH = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00"
META_LEN = 16


def meta(kind: int, tunnel: int = 0, mss: int = 0) -> bytes:
    return struct.pack("<IHHII", 0x58544553, kind, mss, tunnel, 0)


class Rig:
    def __init__(self, lab: netns.Lab) -> None:
        self.ns = lab.namespace("steer")
        peer = lab.namespace("peer")
        lab.veth(self.ns, "v0", peer, "v1")
        lab.veth(self.ns, "t0", self.ns, "t1")
        self.ifindex = self.ns.index("v0")
        with self.ns.enter():
            self.st = ipsec.Steering()
        self.st.add_endpoint(EP)
        self.st.add_route("10.10.0.0/24", 7, 0)
        self.st.add_route("10.20.0.0/16", 9, 1200)
        self.st.add_route("2001:db8:10::/48", 11, 0)
        self.ctx = esp.EspContext()
        self.w = self.ctx.worker()
        with self.ns.enter():
            self.x = xsk.XskWorker(self.w, [("v0", 0)], "t0", "02:00:00:00:00:01",
                                   "02:00:00:00:00:02")
        self.st.set_slot(self.ifindex, 0)
        self.x.insert_into(self.st.xsk_map_fd(), 0, 0)

    def run(self, ip_packet: bytes, ifindex: int | None = None) -> testrun.TestRunResult:
        with self.ns.enter():
            return testrun.run(self.st.steer_fn.fd, ETH + ip_packet,
                               ingress_ifindex=self.ifindex if ifindex is None else ifindex)

    def delta(self, before: dict[str, int]) -> dict[str, int]:
        now = self.st.counters()
        return {k: now[k] - before[k] for k in now if now[k] != before[k]}

    def close(self) -> None:
        self.x.close()
        self.w.close()
        self.ctx.close()
        with self.ns.enter():
            self.st.close()


@pytest.fixture(scope="module")
def rig():
    lab = netns.Lab("steer")
    r = None
    try:
        r = Rig(lab)
        yield r
    finally:
        if r is not None:
            r.close()
        lab.close()


def udp(sport: int, dport: int, payload: bytes, dst: str = EP) -> bytes:
    return ipv4(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload, ROUTER, dst,
                proto=17, ttl=64, ident=3)


def test_raw_esp_to_endpoint_goes_to_worker(rig):
    b = rig.st.counters()
    pkt = outer_ipv4(struct.pack("!II", 0x1234, 1) + bytes(32), src=ROUTER, dst=EP)
    r = rig.run(pkt)
    assert r.action is XdpAction.REDIRECT
    assert r.packet == meta(1) + ETH + pkt
    assert rig.delta(b) == {"decrypt": 1}


def test_esp_in_udp_goes_to_worker(rig):
    b = rig.st.counters()
    pkt = udp(4500, 4500, struct.pack("!II", 0x1234, 1) + bytes(32))
    r = rig.run(pkt)
    assert (r.action, r.packet) == (XdpAction.REDIRECT, meta(1) + ETH + pkt)
    assert rig.delta(b) == {"decrypt": 1}


@pytest.mark.parametrize("pkt", [
    udp(500, 500, b"\x11" * 40),                          # IKE
    udp(4500, 4500, b"\0\0\0\0" + b"\x22" * 40),          # IKE behind the non-ESP marker
    udp(4500, 4500, b"\0\0\0\0"),                         # marker alone
], ids=["udp500", "marker", "marker-only"])
def test_ike_passes_untouched(rig, pkt):
    b = rig.st.counters()
    r = rig.run(pkt)
    assert (r.action, r.packet) == (XdpAction.PASS, ETH + pkt)
    assert rig.delta(b) == {"ike_pass": 1}


def test_nat_keepalive_dropped_and_counted(rig):
    b = rig.st.counters()
    r = rig.run(udp(4500, 4500, b"\xff"))
    assert r.action is XdpAction.DROP
    assert rig.delta(b) == {"keepalive": 1}


def test_one_byte_not_ff_is_not_a_keepalive(rig):
    b = rig.st.counters()
    r = rig.run(udp(4500, 4500, b"\xfe"))
    assert r.action is XdpAction.REDIRECT    # the worker counts it (not_esp)
    assert rig.delta(b) == {"decrypt": 1}


@pytest.mark.parametrize("frag_off", [0x2000, 0x0001, 0x2005], ids=["MF", "offset", "MF+offset"])
def test_outer_fragments_go_to_kernel(rig, frag_off):
    pkt = bytearray(outer_ipv4(struct.pack("!II", 0x1234, 1) + bytes(32), src=ROUTER, dst=EP))
    pkt[6:8] = struct.pack("!H", frag_off)
    pkt[10:12] = b"\0\0"
    pkt[10:12] = struct.pack("!H", csum(bytes(pkt[:20])))
    b = rig.st.counters()
    r = rig.run(bytes(pkt))
    assert (r.action, r.packet) == (XdpAction.PASS, ETH + bytes(pkt))
    assert rig.delta(b) == {"fragment": 1}


def test_not_ours_passes_untouched(rig):
    b = rig.st.counters()
    for pkt in (outer_ipv4(bytes(40), src=ROUTER, dst="192.0.2.99"),   # ESP, not an endpoint
                udp(4501, 4501, bytes(20)),                            # other port
                ipv4(b"\x08\0\0\0\0\0\0\0", ROUTER, EP, proto=1, ttl=64)):  # ICMP to endpoint
        r = rig.run(pkt)
        assert (r.action, r.packet) == (XdpAction.PASS, ETH + pkt)
    assert rig.delta(b) == {}


def test_no_worker_on_device_drops_counted(rig):
    b = rig.st.counters()
    pkt = outer_ipv4(struct.pack("!II", 0x1234, 1) + bytes(32), src=ROUTER, dst=EP)
    r = rig.run(pkt, ifindex=rig.ns.index("t1"))     # no slot for that device
    assert r.action is XdpAction.DROP
    assert rig.delta(b) == {"no_worker": 1}


def test_customer_prefix_ttl_decremented_and_steered(rig):
    inner = ipv4(b"x" * 30, "198.51.100.2", "10.10.0.9", proto=17, ttl=64, ident=9)
    b = rig.st.counters()
    r = rig.run(inner)
    assert r.action is XdpAction.REDIRECT
    expect = ipv4(b"x" * 30, "198.51.100.2", "10.10.0.9", proto=17, ttl=63, ident=9)
    assert r.packet == meta(2, 7, 1360) + ETH + expect
    assert rig.delta(b) == {"encrypt": 1}


@pytest.mark.parametrize("ttl", [0, 1])
def test_customer_prefix_ttl_expired_goes_to_kernel(rig, ttl):
    inner = ipv4(b"x" * 30, "198.51.100.2", "10.10.0.9", proto=17, ttl=ttl, ident=9)
    b = rig.st.counters()
    r = rig.run(inner)
    assert (r.action, r.packet) == (XdpAction.PASS, ETH + inner)
    assert rig.delta(b) == {"ttl_exceeded": 1}


def syn(opts: bytes, dst: str = "10.10.0.9", flags: int = 0x02) -> tuple[bytes, bytes]:
    """(IPv4 + TCP with a valid checksum, pseudo header)."""
    assert len(opts) % 4 == 0
    tcp = struct.pack("!HHIIBBHHH", 443, 50000, 1, 0, (5 + len(opts) // 4) << 4, flags, 65535,
                      0, 0) + opts
    src_b = ipaddress.IPv4Address("198.51.100.2").packed
    pseudo = src_b + ipaddress.IPv4Address(dst).packed + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    return ipv4(tcp, "198.51.100.2", dst, proto=6, ttl=64, ident=5), pseudo


@pytest.mark.parametrize("opts,want", [
    (b"\x02\x04\x05\xb4", b"\x02\x04\x05\x50"),                                   # offset 0
    (b"\x01\x02\x04\x05\xb4\x01\x01\x01", b"\x01\x02\x04\x05\x50\x01\x01\x01"),   # odd offset
    (b"\x01\x01\x02\x04\x05\xb4\x01\x01", b"\x01\x01\x02\x04\x05\x50\x01\x01"),   # even, later
    (b"\x04\x02\x08\x0a" + bytes(8) + b"\x02\x04\xff\xff",                        # after SACK/TS
     b"\x04\x02\x08\x0a" + bytes(8) + b"\x02\x04\x05\x50"),
], ids=["first", "odd", "even", "after-ts"])
def test_mss_clamped_with_valid_checksum(rig, opts, want):
    pkt, pseudo = syn(opts)
    b = rig.st.counters()
    r = rig.run(pkt)
    assert r.action is XdpAction.REDIRECT
    out_ip = r.packet[META_LEN + 14:]
    tcp = out_ip[20:]
    assert tcp[20:] == want
    assert csum(pseudo + tcp) == 0                       # independent full recomputation
    assert rig.delta(b) == {"encrypt": 1, "mss_clamped": 1}


@pytest.mark.parametrize("opts", [
    b"\x02\x04\x04\xb0",                  # 1200: below the clamp, never raised
    b"\x02\x03\x05\xb4",                  # MSS option with length 3
    b"\x02\x00\x05\xb4",                  # length 0
    b"\x01\x01\x01\x02",                  # kind alone at the end
    b"\x08\x0a\x00\x00\x00\x00\x02\x04",  # option running past the header
    b"\x00\x02\x04\x05\xb4\x00\x00\x00"[:4] + b"\x02\x04\x05\xb4",  # EOL first
], ids=["below", "len3", "len0", "kind-alone", "overrun", "eol"])
def test_mss_left_alone(rig, opts):
    pkt, _ = syn(opts)
    b = rig.st.counters()
    r = rig.run(pkt)
    assert r.action is XdpAction.REDIRECT
    out_ip = r.packet[META_LEN + 14:]
    assert out_ip[20:] == pkt[20:]                   # TCP untouched
    assert rig.delta(b) == {"encrypt": 1}


def test_mss_clamp_of_the_route_and_not_on_plain_ack(rig):
    pkt, pseudo = syn(b"\x02\x04\x05\xb4", dst="10.20.3.4")        # route with mss 1200
    r = rig.run(pkt)
    assert r.packet[:META_LEN] == meta(2, 9, 1200)
    assert r.packet[META_LEN + 14 + 40:][:4] == b"\x02\x04\x04\xb0"
    assert csum(pseudo + r.packet[META_LEN + 14 + 20:]) == 0
    ack, _ = syn(b"\x02\x04\x05\xb4", flags=0x10)                   # not a SYN
    r = rig.run(ack)
    assert r.packet[META_LEN + 14 + 20:] == ack[20:]


def ipv6_udp(dst: str, hop: int) -> bytes:
    udp = struct.pack("!HHHH", 1, 2, 8 + 10, 0) + b"v6-payload"
    return (struct.pack("!IHBB", 0x60000000, len(udp), 17, hop)
            + ipaddress.IPv6Address("2001:db8:2::2").packed + ipaddress.IPv6Address(dst).packed
            + udp)


ETH6 = ETH[:12] + b"\x86\xdd"


def test_ipv6_customer_prefix_hop_limit_and_steered(rig):
    pkt = ipv6_udp("2001:db8:10:1::9", 64)
    b = rig.st.counters()
    with rig.ns.enter():
        r = testrun.run(rig.st.steer_fn.fd, ETH6 + pkt, ingress_ifindex=rig.ifindex)
    assert r.action is XdpAction.REDIRECT
    assert r.packet == meta(2, 11, 1360) + ETH6 + pkt[:7] + b"\x3f" + pkt[8:]
    assert rig.delta(b) == {"encrypt": 1}


def test_ipv6_hop_limit_expired_and_not_ours(rig):
    b = rig.st.counters()
    with rig.ns.enter():
        for pkt in (ipv6_udp("2001:db8:10::9", 1), ipv6_udp("2001:db8:99::9", 64)):
            r = testrun.run(rig.st.steer_fn.fd, ETH6 + pkt, ingress_ifindex=rig.ifindex)
            assert (r.action, r.packet) == (XdpAction.PASS, ETH6 + pkt)
    assert rig.delta(b) == {"ttl_exceeded": 1}

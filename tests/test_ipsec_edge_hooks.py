"""The ESP hooks of bpf/esp_steer.h inside the edge program (bpf/xdp_edge.c built with
-DXT_FEATURE_ESP), through BPF_PROG_TEST_RUN: the wiring the dispatcher needs, on exact bytes.

drop_reasons.h does not list the three ESP reasons the hooks use yet (see the note in
esp_steer.h); until it does, this test passes them as -D with numbers above every reason in use.
A real AF_XDP socket sits in the edge object's XSKMAP, so a steered packet reports XDP_REDIRECT
and its output starts with the worker's metadata.
"""
from __future__ import annotations

import ctypes
import ipaddress
import re
import struct
from pathlib import Path

import pytest
from esp_support import csum, ipv4, outer_ipv4

from pipeline import esp, netns, xsk
from pipeline.xdp import testrun
from pipeline.xdp.source import amalgamate
from pipeline.xdp.testrun import XdpAction

pytestmark = pytest.mark.netns

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
ESP_REASONS = ("XT_R_ESP_IKE", "XT_R_ESP_KEEPALIVE", "XT_R_ESP_NO_WORKER")
EP, ROUTER = "192.0.2.1", "192.0.2.2"
ETH = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00"
TUNNEL = 42
XT_KIND_IPSEC = 2


def reasons() -> dict[str, int]:
    text = (BPF_DIR / "drop_reasons.h").read_text()
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"#define (XT_R_\w+)\s+(\d+)", text) if m.group(1) != "XT_R_MAX"}


def cflags(known: dict[str, int]) -> list[str]:
    assert set(ESP_REASONS) <= set(known)         # bpf/drop_reasons.h names every outcome
    return ["-DXT_FEATURE_ESP"]


def meta(kind: int, tunnel: int = 0, mss: int = 0) -> bytes:
    return struct.pack("<IHHII", 0x58544553, kind, mss, tunnel, 0)


class Edge:
    def __init__(self, lab: netns.Lab) -> None:
        from bcc import BPF

        self.ns = lab.namespace("edgehk")
        peer = lab.namespace("peer")
        lab.veth(self.ns, "v0", peer, "v1")
        lab.veth(self.ns, "t0", self.ns, "t1")
        self.ifindex = self.ns.index("v0")
        known = reasons()
        flags = cflags(known)
        self.reason = dict(known)
        for f in flags[1:]:
            name, num = f[2:].split("=")
            self.reason[name] = int(num)
        self.bpf = BPF(text=amalgamate(BPF_DIR / "xdp_edge.c").encode(), cflags=flags)
        self.fn = self.bpf.load_func(b"xdp_edge", BPF.XDP)
        ep = self.bpf[b"xt_endpoints"]
        ep[ep.Key(int.from_bytes(ipaddress.IPv4Address(EP).packed, "little"))] = ep.Leaf(1)
        tun = self.bpf[b"xt_tunnels"]
        t = tun.Leaf()
        t.kind, t.mtu, t.mss, t.ttl = XT_KIND_IPSEC, 1436, 1360, 64
        tun[tun.Key(TUNNEL)] = t
        r4 = self.bpf[b"xt_routes4"]
        k = r4.Key()
        k.prefixlen = 24
        k.addr[:] = list(ipaddress.IPv4Address("10.10.0.0").packed)
        v = r4.Leaf()
        v.count = 1
        v.tunnels[0] = TUNNEL
        r4[k] = v
        self.ctx = esp.EspContext()
        self.w = self.ctx.worker()
        with self.ns.enter():
            self.x = xsk.XskWorker(self.w, [("v0", 0)], "t0", "02:00:00:00:00:01",
                                   "02:00:00:00:00:02")
        sl = self.bpf[b"esp_xsk_slot"]
        sl[sl.Key(self.ifindex)] = sl.Leaf(0)
        self.x.insert_into(self.bpf[b"esp_xsks"].map_fd, 0, 0)

    def run(self, ip_packet: bytes) -> testrun.TestRunResult:
        with self.ns.enter():
            return testrun.run(self.fn.fd, ETH + ip_packet, ingress_ifindex=self.ifindex)

    def counts(self) -> dict[int, int]:
        t = self.bpf[b"xt_reason_stats"]
        return {i: sum(c.packets for c in t[ctypes.c_int(i)]) for i in range(32)}

    def delta(self, before: dict[int, int]) -> dict[int, int]:
        now = self.counts()
        return {i: now[i] - before[i] for i in now if now[i] != before[i]}

    def close(self) -> None:
        self.x.close()
        self.w.close()
        self.ctx.close()
        self.bpf.cleanup()


@pytest.fixture(scope="module")
def edge():
    lab = netns.Lab("edgehk")
    e = None
    try:
        e = Edge(lab)
        yield e
    finally:
        if e is not None:
            e.close()
        lab.close()


def udp(dport: int, payload: bytes) -> bytes:
    return ipv4(struct.pack("!HHHH", 4500, dport, 8 + len(payload), 0) + payload, ROUTER, EP,
                proto=17, ttl=64, ident=3)


def test_esp_and_esp_in_udp_steered(edge):
    for pkt in (outer_ipv4(struct.pack("!II", 7, 1) + bytes(40), src=ROUTER, dst=EP),
                udp(4500, struct.pack("!II", 7, 1) + bytes(40))):
        b = edge.counts()
        r = edge.run(pkt)
        assert (r.action, r.packet) == (XdpAction.REDIRECT, meta(1) + ETH + pkt)
        assert edge.delta(b) == {edge.reason["XT_R_ESP_STEERED"]: 1}


@pytest.mark.parametrize("pkt,action,reason", [
    (udp(500, b"ike"), XdpAction.PASS, "XT_R_ESP_IKE"),
    (udp(4500, bytes(4) + b"ike"), XdpAction.PASS, "XT_R_ESP_IKE"),
    (udp(4500, b"\xff"), XdpAction.DROP, "XT_R_ESP_KEEPALIVE"),
], ids=["ike500", "marker", "keepalive"])
def test_ike_and_keepalive(edge, pkt, action, reason):
    b = edge.counts()
    r = edge.run(pkt)
    assert r.action is action
    if action is XdpAction.PASS:
        assert r.packet == ETH + pkt
    assert edge.delta(b) == {edge.reason[reason]: 1}


def test_prefix_routed_to_ipsec_tunnel_is_steered_ttl_and_mss_done(edge):
    opts = b"\x02\x04\x05\xb4"
    tcp = struct.pack("!HHIIBBHHH", 443, 50000, 1, 0, 6 << 4, 0x02, 65535, 0, 0) + opts
    src, dst = ipaddress.IPv4Address("198.51.100.2").packed, ipaddress.IPv4Address("10.10.0.9").packed
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    pkt = ipv4(tcp, "198.51.100.2", "10.10.0.9", proto=6, ttl=64, ident=5)
    b = edge.counts()
    r = edge.run(pkt)
    assert r.action is XdpAction.REDIRECT
    assert r.packet[:16] == meta(2, TUNNEL, 1360)
    ip = r.packet[16 + 14:]
    assert ip[:20] == ipv4(tcp, "198.51.100.2", "10.10.0.9", proto=6, ttl=63, ident=5)[:20]
    assert ip[40:44] == b"\x02\x04\x05\x50"              # clamped at the dispatcher's exit
    assert csum(pseudo + ip[20:]) == 0
    assert edge.delta(b) == {edge.reason["XT_R_ESP_STEERED"]: 1}

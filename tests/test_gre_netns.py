"""GRE data plane on real veths in network namespaces, native and generic XDP.

customer-router ns --veth-- edge ns (the data plane on e0 and e1) --veth-- Internet ns.
Frames are sent and captured with raw packet ports; expected frames are built with scapy.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from gre_support import CUSTOMER, EDGE, config, toml
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import GRE, Ether

from pipeline.xdp.dataplane import Dataplane, compile_program

pytestmark = pytest.mark.netns

CC, EC, EI, II = "02:00:00:00:0c:01", "02:00:00:00:0e:01", "02:00:00:00:0e:02", "02:00:00:00:01:01"
OUTSIDE, HOST = "100.64.0.9", "203.0.113.5"
N = 50


@pytest.fixture(scope="module")
def prog():
    p = compile_program()
    yield p
    p.close()


@pytest.fixture(params=["native", "generic"])
def edge(request, lab, prog, tmp_path):
    cust, edge_ns, inet = lab.namespace("cust"), lab.namespace("edge"), lab.namespace("inet")
    lab.veth(cust, "c0", edge_ns, "e0", "10.1.0.2/24", "10.1.0.1/24", mac_a=CC, mac_b=EC)
    lab.veth(inet, "i0", edge_ns, "e1", "10.2.0.2/24", "10.2.0.1/24", mac_a=II, mac_b=EI)
    edge_ns.sysctl("net.ipv4.ip_forward", 1)
    edge_ns.add_neighbour("e0", "10.1.0.2", CC)
    edge_ns.add_neighbour("e1", "10.2.0.2", II)
    edge_ns.add_route("198.51.100.0/24", gateway="10.1.0.2")
    edge_ns.add_route("0.0.0.0/0", gateway="10.2.0.2")
    node = f"edge-it-{os.getpid()}-{request.param}"
    cfg = config(node=node, interfaces=("e0", "e1"))
    path = tmp_path / "edge.toml"
    path.write_text(toml(node=node, interfaces=("e0", "e1")))
    dp = Dataplane(cfg, mode=request.param, program=prog)
    with edge_ns.enter():
        dp.start()
    try:
        yield dp, lab.port(cust, "c0"), lab.port(inet, "i0"), path
    finally:
        dp.close()


def test_decap_exact_inner_no_loss(edge):
    dp, cust, inet, _ = edge
    inner = IP(src="203.0.113.7", dst=OUTSIDE, ttl=64, id=3) / TCP(
        sport=40000, dport=443, flags="S", options=[("MSS", 1460), ("NOP", None)])
    frame = bytes(Ether(dst=EC, src=CC) / IP(src=CUSTOMER, dst=EDGE) / GRE() / inner)
    want = inner.copy()
    want.ttl -= 1
    want[TCP].options = [("MSS", 1436), ("NOP", None)]
    del want.chksum, want[TCP].chksum
    want = bytes(Ether(dst=II, src=EI) / want)
    inet.drain()
    for _ in range(N):
        cust.send(frame)
    got = inet.recv_all(N, timeout=3, match=lambda f: f[12:14] == b"\x08\x00" and f[23] == 6)
    assert got == [want] * N
    c = dp.counters()
    assert (c.tunnels[1].decap_packets, c.tunnels[1].decap_bytes) == (N, N * len(inner))
    assert c.reasons["decap_forwarded"][0] == N


def test_encap_exact_gre_no_loss(edge):
    dp, cust, inet, _ = edge
    inner = IP(src=OUTSIDE, dst=HOST, ttl=30, flags="DF") / UDP(sport=5353, dport=53) / b"q"
    want_inner = inner.copy()
    want_inner.ttl -= 1
    del want_inner.chksum
    want = bytes(Ether(dst=CC, src=EC) / IP(src=EDGE, dst=CUSTOMER, ttl=64, id=0, flags="DF")
                 / GRE(key_present=1, key=42) / want_inner)
    cust.drain()
    for _ in range(N):
        inet.send(bytes(Ether(dst=EI, src=II) / inner))
    got = cust.recv_all(N, timeout=3, match=lambda f: f[12:14] == b"\x08\x00" and f[23] == 47)
    assert got == [want] * N
    c = dp.counters()
    assert (c.tunnels[2].encap_packets, c.tunnels[2].encap_bytes) == (N, N * len(inner))


def test_gre_keepalive_comes_back(edge):
    dp, cust, _inet, _ = edge
    reply = IP(src=EDGE, dst=CUSTOMER, ttl=255, id=9) / GRE(proto=0)
    frame = bytes(Ether(dst=EC, src=CC) / IP(src=CUSTOMER, dst=EDGE) / GRE() / reply)
    want = reply.copy()
    want.ttl -= 1
    del want.chksum
    cust.drain()
    cust.send(frame)
    got = cust.recv(timeout=3, match=lambda f: f[12:14] == b"\x08\x00" and f[23] == 47)
    assert got == bytes(Ether(dst=CC, src=EC) / want)
    assert dp.counters().tunnels[1].decap_packets == 1


def test_stats_command_reads_pinned_maps(edge):
    """`xtransit stats` in a separate process reads the pinned per-CPU counters."""
    _dp, cust, inet, path = edge
    inner = IP(src="203.0.113.7", dst=OUTSIDE, ttl=64) / UDP()
    cust.send(bytes(Ether(dst=EC, src=CC) / IP(src=CUSTOMER, dst=EDGE) / GRE() / inner))
    stranger = bytes(Ether(dst=EC, src=CC) / IP(src="198.51.100.99", dst=EDGE) / GRE() / inner)
    cust.send(stranger)
    assert inet.recv(timeout=3, match=lambda f: f[23] == 17) is not None
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "stats", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["plain", "1", "1", str(len(inner)), "0", "0", "-"]
    assert f"unknown_tunnel  1  {len(stranger)}" in lines

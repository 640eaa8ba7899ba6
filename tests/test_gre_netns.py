"""GRE data plane on real veths in network namespaces, native and generic XDP.

customer-router ns --veth-- edge ns (the data plane on e0 and e1) --veth-- Internet ns.
Frames are sent and captured with raw packet ports; expected frames are built with scapy.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from gre_support import CUSTOMER, EDGE, config, toml
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import GRE, Ether

from pipeline.xdp.dataplane import Dataplane, LoadError, compile_program

pytestmark = pytest.mark.netns

CC, EC, EI, II = "02:00:00:00:0c:01", "02:00:00:00:0e:01", "02:00:00:00:0e:02", "02:00:00:00:01:01"
OUTSIDE, HOST = "100.64.0.9", "203.0.113.5"
N = 50
SO_RCVBUFFORCE = 33


@pytest.fixture(scope="module")
def prog():
    p = compile_program()
    yield p
    p.close()


REPO = Path(__file__).resolve().parents[1]


def build(lab):
    """customer ns (c0) -- edge ns (e0, e1) -- Internet ns (i0), routes and neighbours."""
    cust, edge_ns, inet = lab.namespace("cust"), lab.namespace("edge"), lab.namespace("inet")
    lab.veth(cust, "c0", edge_ns, "e0", "10.1.0.2/24", "10.1.0.1/24", mac_a=CC, mac_b=EC)
    lab.veth(inet, "i0", edge_ns, "e1", "10.2.0.2/24", "10.2.0.1/24", mac_a=II, mac_b=EI)
    edge_ns.sysctl("net.ipv4.ip_forward", 1)
    edge_ns.add_neighbour("e0", "10.1.0.2", CC)
    edge_ns.add_neighbour("e1", "10.2.0.2", II)
    edge_ns.add_route("198.51.100.0/24", gateway="10.1.0.2")
    edge_ns.add_route("0.0.0.0/0", gateway="10.2.0.2")
    return cust, edge_ns, inet


@pytest.fixture(params=["native", "generic"])
def edge(request, lab, prog, tmp_path):
    cust, edge_ns, inet = build(lab)
    node = f"edge-it-{os.getpid()}-{request.param}"
    cfg = config(node=node, interfaces=("e0", "e1"))
    path = tmp_path / "edge.toml"
    path.write_text(toml(node=node, interfaces=("e0", "e1")))
    dp = Dataplane(cfg, mode=request.param, program=prog)
    with edge_ns.enter():
        dp.start()
    ports = lab.port(cust, "c0"), lab.port(inet, "i0")
    for p in ports:   # XDP frames become page-sized skbs: room for a few hundred of them
        p.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    try:
        yield dp, *ports, path
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


def test_stats_rates_and_watch_from_another_process(edge):
    """`xtransit stats --rates` / `--watch --count 2`: packets per second over the interval,
    read from the pins by a separate process while frames flow."""
    import threading
    _dp, cust, _inet, path = edge
    inner = IP(src="203.0.113.7", dst=OUTSIDE, ttl=64) / UDP()
    frame = bytes(Ether(dst=EC, src=CC) / IP(src=CUSTOMER, dst=EDGE) / GRE() / inner)
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            cust.send(frame)
            time.sleep(0.001)
    t = threading.Thread(target=send)
    t.start()
    try:
        runs = [subprocess.run([sys.executable, "-m", "pipeline.cli", "stats", "-c", str(path),
                                *args, "--interval", "0.5"], capture_output=True, text=True,
                               timeout=60, check=False)
                for args in (("--rates",), ("--watch", "--count", "2"))]
    finally:
        stop.set()
        t.join()
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
    rates, watched = (p.stdout.splitlines() for p in runs)
    assert rates[0].split()[:3] == ["TUNNEL", "INDEX", "DECAP"]       # totals first
    assert sum("UTC, rates over" in line for line in rates) == 1
    assert sum("UTC, rates over" in line for line in watched) == 2
    assert not any(line.startswith("TUNNEL  INDEX") for line in watched)
    row = next(line.split() for line in watched[::-1] if line.startswith("plain"))
    assert row[1:3] == ["0", "0"] and float(row[3].rstrip("kM")) > 0   # out (decap) only


def xdp_mode(ns, ifname: str) -> str:
    """IFLA_XDP_ATTACHED as pyroute2 names it: none, xdp (native), xdpgeneric, xdpmulti."""
    with ns.ipr() as ipr:
        xdp = ipr.get_links(ns.index(ifname))[0].get("IFLA_XDP")
    mode = xdp.get("IFLA_XDP_ATTACHED") if xdp is not None else None
    return {0: "none", None: "none", 1: "xdp", 2: "xdpgeneric", 4: "xdpmulti"}.get(mode, mode)


def decap_frame_and_want():
    inner = IP(src="203.0.113.7", dst=OUTSIDE, ttl=64, id=3) / UDP(sport=1, dport=2)
    want = inner.copy()
    want.ttl -= 1
    del want.chksum
    return (bytes(Ether(dst=EC, src=CC) / IP(src=CUSTOMER, dst=EDGE) / GRE() / inner),
            bytes(Ether(dst=II, src=EI) / want))


@pytest.mark.parametrize("leftover", ["native", "generic"])
def test_program_left_by_a_crashed_run_is_replaced(lab, prog, leftover):
    from bcc import BPF
    cust, edge_ns, inet = build(lab)
    flags = {"native": 1 << 2, "generic": 1 << 1}[leftover]
    with edge_ns.enter():
        BPF.attach_xdp(b"e0", prog.peer_pass, flags)     # a pass-only program, as if crashed
    assert xdp_mode(edge_ns, "e0") == {"native": "xdp", "generic": "xdpgeneric"}[leftover]
    dp = Dataplane(config(node=f"edge-crash-{os.getpid()}", interfaces=("e0", "e1")),
                   mode="native", program=prog, pin=False)
    with edge_ns.enter():
        dp.start()
    try:
        assert xdp_mode(edge_ns, "e0") == "xdp"            # one program, native: ours
        frame, want = decap_frame_and_want()
        c, i = lab.port(cust, "c0"), lab.port(inet, "i0")
        c.send(frame)
        assert i.recv(timeout=3, match=lambda f: f[23] == 17) == want
    finally:
        dp.close()
    assert (xdp_mode(edge_ns, "e0"), xdp_mode(cust, "c0")) == ("none", "none")


def test_config_change_applied_without_loss(edge):
    dp, cust, inet, _ = edge
    frame, want = decap_frame_and_want()
    inet.drain()
    done = threading.Event()
    sent = []

    def sender():
        # paced: a burst larger than the veth ring would be dropped whatever the data plane does
        while (not done.is_set() or len(sent) < 200) and len(sent) < 400:
            cust.send(frame)
            sent.append(1)
            time.sleep(0.0005)
    t = threading.Thread(target=sender)
    t.start()
    for routes in ('[[routes]]\nprefix = "203.0.113.0/24"\ntunnel = "plain"\n',
                   '[[routes]]\nprefix = "10.9.0.0/16"\ntunnel = "other"\n'):
        changed = dp.apply(config(node=dp.config.node.name, interfaces=("e0", "e1"),
                                  routes=routes))
        assert changed["tunnels"] == 0 and changed["decap"] == 0
    done.set()
    t.join()
    got = inet.recv_all(len(sent), timeout=3, match=lambda f: f[23] == 17)
    c = dp.counters()
    assert (c.tunnels[1].decap_packets, c.reasons["decap_forwarded"][0]) == (len(sent),) * 2, \
        c.reasons
    assert len(got) == len(sent) and set(got) == {want}


def test_serve_detaches_on_sigterm(lab, tmp_path):
    cust, edge_ns, inet = build(lab)
    path = tmp_path / "edge.toml"
    path.write_text(toml(node=f"edge-serve-{os.getpid()}", interfaces=("e0", "e1")))
    proc = edge_ns.popen(sys.executable, "-m", "pipeline.xdp.dataplane", str(path), "e0", "e1",
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "attached to e0, e1" in line, proc.stderr.read() if proc.poll() else line
        assert (xdp_mode(edge_ns, "e0"), xdp_mode(inet, "i0")) == ("xdp", "xdp")  # peer: pass
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [xdp_mode(edge_ns, "e0"), xdp_mode(edge_ns, "e1"), xdp_mode(cust, "c0"),
            xdp_mode(inet, "i0")] == ["none"] * 4


def test_verifier_rejection_shows_the_whole_log():
    with pytest.raises(LoadError) as e:
        compile_program(path=REPO / "tests" / "bpf" / "verifier_reject.c")
    assert "invalid access to packet" in e.value.log
    assert "processed" in str(e.value)                      # the log is in the message too


def test_native_redirect_into_a_bare_veth_is_lost(lab, prog):
    """The veth fact the peer step exists for: without an XDP program (or GRO) on the receiving
    peer, native XDP_REDIRECT into the veth drops every frame, silently."""
    cust, edge_ns, inet = build(lab)
    dp = Dataplane(config(node=f"edge-bare-{os.getpid()}", interfaces=("e0", "e1")),
                   mode="native", program=prog, pin=False, prepare_peers=False)
    with edge_ns.enter():
        dp.start()
    try:
        frame, _ = decap_frame_and_want()
        c, i = lab.port(cust, "c0"), lab.port(inet, "i0")
        for _ in range(10):
            c.send(frame)
        assert i.recv_all(10, timeout=1, match=lambda f: f[23] == 17) == []
        assert dp.counters().reasons["decap_forwarded"][0] == 10     # the program did its part
    finally:
        dp.close()

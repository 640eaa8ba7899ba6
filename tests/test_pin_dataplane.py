"""Pinned IPsec tunnels (bpf/pin.h) on bytes: BPF_PROG_TEST_RUN of bpf/xdp_edge.c built with ESP
steering (as `xtransit run` builds it for IPsec), exact packets, verdicts and reasons.

Three fleet nodes A, B, C (ids 1, 2, 3; fleet addresses 172.31.0.1-3); the tunnel `site`
(index 7) carries 10.10.1.0/24 and 2001:db8:10::/48. The program under test plays B when the
tunnel is pinned elsewhere (forward to the pin node in GRE) and A when it is pinned here
(GRE from a fleet node, decapsulated and steered to the AF_XDP worker). A real AF_XDP socket
sits in the XSKMAP, so a steered packet reports XDP_REDIRECT with the worker's metadata in
front. Expected packets are built with scapy (its own checksums).
"""
from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import GRE, Ether

from pipeline import esp, netns, xsk
from pipeline.config import loads
from pipeline.xdp import testrun
from pipeline.xdp.dataplane import Dataplane, compile_program
from pipeline.xdp.testrun import XdpAction

pytestmark = pytest.mark.netns

ANYCAST = "192.0.2.1"
FLEET = {1: "172.31.0.1", 2: "172.31.0.2", 3: "172.31.0.3"}
INET_MAC, INET_PEER = "02:00:00:00:02:01", "02:00:00:00:02:02"
OUTSIDE, HOST, HOST6 = "198.51.100.2", "10.10.1.1", "2001:db8:10::1"
INDEX = 7
ESP_MSS = 1360
META_MAGIC, KIND_ENCRYPT = 0x58544553, 2


def config(node: int, pin: int | None, fleet_address: bool = True):
    pin_line = f"pin_node = {pin}" if pin is not None else ""
    addr = f'fleet_address = "{FLEET[node]}"' if fleet_address else ""
    nodes = "".join(f'[[fleet.nodes]]\nid = {i}\naddress = "{a}"\n' for i, a in FLEET.items())
    return loads(f"""
[node]
id = {node}
name = "pin-test"
ipsec_domain = "ipsec.example.net"
tunnel_endpoints = ["{ANYCAST}"]
{addr}

[[node.interfaces]]
name = "inet0"
role = "internet"

[tunnels.ipsec.site]
id = "site"
account_id = "acct"
index = {INDEX}
edge_endpoint = "{ANYCAST}"
interface_address = "10.255.0.0/31"
psk_env = "PSK"
{pin_line}

[[routes]]
prefix = "10.10.1.0/24"
tunnel = "site"

[[routes]]
prefix = "2001:db8:10::/48"
tunnel = "site"

{nodes}
""", file="pin.toml", env={"PSK": "p" * 20})


@pytest.fixture(scope="module")
def prog():
    p = compile_program(("-DXT_FEATURE_ESP",))
    yield p
    p.close()


@pytest.fixture(scope="module")
def ns():
    with netns.Lab("pin") as lab:
        n = lab.namespace("pin")
        lab.veth(n, "inet0", n, "inet1", "10.2.0.1/24", mac_a=INET_MAC, mac_b=INET_PEER)
        lab.veth(n, "t0", n, "t1")
        n.add_neighbour("inet0", "10.2.0.2", INET_PEER)
        n.add_route("172.31.0.0/24", gateway="10.2.0.2")     # the other nodes' fleet addresses
        n.add_route("0.0.0.0/0", gateway="10.2.0.2")
        n.sysctl("net.ipv4.ip_forward", 1)
        yield n


@pytest.fixture(scope="module")
def worker(prog, ns):
    """An AF_XDP socket on inet0 queue 0 in the program's XSKMAP (never started: the test
    reads the steered frame from BPF_PROG_TEST_RUN's output)."""
    ctx = esp.EspContext()
    w = ctx.worker()
    with ns.enter():
        x = xsk.XskWorker(w, [("inet0", 0)], "t0", ns.mac("t0"), ns.mac("t1"))
    slots = prog.table("esp_xsk_slot")
    slots[slots.Key(ns.index("inet0"))] = slots.Leaf(0)
    x.insert_into(prog.table("esp_xsks").map_fd, 0, 0)
    yield x
    x.close()
    w.close()
    ctx.close()


@pytest.fixture
def node(prog, ns, worker):
    """start(node id, pin node): a data plane with that config (counters from zero)."""
    made = []

    def start(node_id: int, pin: int | None) -> Dataplane:
        d = Dataplane(config(node_id, pin), ifaces=[], program=prog, pin=False)
        with ns.enter():
            d.start()
        made.append(d)
        return d
    yield start
    for d in made:
        d.close()


def run(ns, prog, frame: bytes):
    with ns.enter():
        return testrun.run(prog.fd, bytes(frame), ingress_ifindex=ns.index("inet0"))


def from_internet(inner) -> bytes:
    return bytes(Ether(dst=INET_MAC, src=INET_PEER) / inner)


def from_fleet(inner, src: int | str = 2, dst: int = 1, **gre) -> bytes:
    """GRE from fleet node ``src`` (or any address) to node ``dst``'s fleet address."""
    proto = 0x86DD if isinstance(inner, IPv6) else 0x0800
    return bytes(Ether(dst=INET_MAC, src=INET_PEER)
                 / IP(src=FLEET.get(src, src), dst=FLEET[dst], ttl=63, id=0, flags="DF")
                 / GRE(proto=proto, **gre) / inner)


def forwarded(inner, src: int, dst: int, df: bool = True) -> bytes:
    """What B sends to the pin node: inner untouched, in GRE between fleet addresses, out
    inet0 to the next hop (10.2.0.2)."""
    tos = inner.tc if isinstance(inner, IPv6) else inner.tos
    proto = 0x86DD if isinstance(inner, IPv6) else 0x0800
    return bytes(Ether(dst=INET_PEER, src=INET_MAC)
                 / IP(src=FLEET[src], dst=FLEET[dst], ttl=64, id=0, tos=tos,
                      flags="DF" if df else 0)
                 / GRE(proto=proto) / inner)


def meta(tunnel: int = INDEX, mss: int = ESP_MSS) -> bytes:
    return struct.pack("<IHHII", META_MAGIC, KIND_ENCRYPT, mss, tunnel, 0)


def reasons(dp) -> dict[str, int]:
    return {k: v[0] for k, v in dp.counters().reasons.items()}


def udp4(dst: str = HOST, ttl: int = 64, **ip):
    return IP(src=OUTSIDE, dst=dst, ttl=ttl, id=9, tos=0x28, **ip) / UDP(sport=1234, dport=5678) \
        / b"pinned payload"


def syn4():
    return IP(src=OUTSIDE, dst=HOST, ttl=64, id=11, flags="DF") / TCP(
        sport=40000, dport=443, flags="S", seq=1, options=[("MSS", 1460)])


def udp6():
    return IPv6(src="2001:db8:1::5", dst=HOST6, hlim=64, tc=0xB8) / UDP(sport=1, dport=2) / b"v6"


# --- not the pin node: carried to it --------------------------------------------------------

@pytest.mark.parametrize("inner,df", [
    (udp4(flags="DF"), True), (udp4(), False), (syn4(), True), (udp6(), True)],
    ids=["udp-df", "udp-no-df", "tcp-syn-unclamped", "ipv6"])
def test_pinned_elsewhere_is_carried_to_the_pin_node_in_gre(node, ns, prog, inner, df):
    dp = node(2, 1)                                   # B; the tunnel is pinned to A
    res = run(ns, prog, from_internet(inner))
    assert res.action is XdpAction.TX                 # out inet0, where it came in
    # TTL, MSS, DSCP/ECN of the inner packet untouched: the pin node encrypts it as if it had
    # arrived there; outer TOS copied (RFC 6040 normal mode), DF as the inner's (IPv6: set)
    assert res.packet == forwarded(inner, 2, 1, df)
    assert reasons(dp) == {"pinned_forwarded": 1}
    assert dp.counters().tunnel_reasons == {INDEX: {"pinned_forwarded": 1}}


def test_the_pin_node_follows_the_config_live(node, ns, prog):
    """Map updates only (as on SIGHUP / config push): B pinned to A, then to B itself,
    then to C, then unpinned."""
    dp = node(2, 1)
    frame = from_internet(udp4(flags="DF"))
    assert run(ns, prog, frame).packet == forwarded(udp4(flags="DF"), 2, 1)
    assert dp.apply(config(2, 2))["tunnels"] == 1
    res = run(ns, prog, frame)                        # pinned here: encrypted here
    assert (res.action, res.packet[:16]) == (XdpAction.REDIRECT, meta())
    assert res.packet[16:] == from_internet(udp4(flags="DF", ttl=63))
    assert dp.apply(config(2, 3))["tunnels"] == 1
    res = run(ns, prog, frame)
    assert (res.action, res.packet) == (XdpAction.TX, forwarded(udp4(flags="DF"), 2, 3))
    assert dp.apply(config(2, None))["tunnels"] == 1
    assert run(ns, prog, frame).action is XdpAction.REDIRECT
    assert reasons(dp) == {"pinned_forwarded": 2, "esp_steered": 2}


def test_pinned_to_a_node_without_an_entry_is_dropped(node, ns, prog):
    dp = node(2, 1)
    tun = prog.table("xt_tunnels")
    leaf = tun[tun.Key(INDEX)]
    leaf.pin_node = 99                                # no xt_pin_nodes entry (the loader refuses)
    tun[tun.Key(INDEX)] = leaf
    frame = from_internet(udp4())
    res = run(ns, prog, frame)
    assert (res.action, res.packet) == (XdpAction.DROP, frame)
    assert reasons(dp) == {"pinned_no_node": 1}


# --- the pin node: GRE from a fleet node, decapsulated and steered --------------------------

def test_pin_node_decapsulates_and_steers_to_its_worker(node, ns, prog):
    dp = node(1, 1)                                   # A, the pin node
    res = run(ns, prog, from_fleet(syn4()))
    assert res.action is XdpAction.REDIRECT
    assert res.packet[:16] == meta()
    want = IP(src=OUTSIDE, dst=HOST, ttl=63, id=11, flags="DF") / TCP(
        sport=40000, dport=443, flags="S", seq=1, options=[("MSS", ESP_MSS)])
    assert res.packet[16:] == from_internet(want)    # TTL - 1 and MSS clamped, as from the Internet
    assert reasons(dp) == {"pinned_steered": 1}
    assert dp.counters().tunnel_reasons == {INDEX: {"pinned_steered": 1}}


def test_pin_node_steers_ipv6(node, ns, prog):
    dp = node(1, 1)
    res = run(ns, prog, from_fleet(udp6(), src=3))
    inner = udp6()
    inner.hlim = 63
    assert (res.action, res.packet) == (XdpAction.REDIRECT,
                                        meta() + bytes(Ether(dst=INET_MAC, src=INET_PEER) / inner))
    assert reasons(dp) == {"pinned_steered": 1}


def test_a_packet_from_a_fleet_node_is_never_carried_on(node, ns, prog):
    """A still thinks the tunnel is pinned to B (configs disagree during a change): what B
    sends A is encrypted at A, not sent back to B."""
    dp = node(1, 2)
    res = run(ns, prog, from_fleet(udp4(), src=2, dst=1))
    assert (res.action, res.packet[:16]) == (XdpAction.REDIRECT, meta())
    assert reasons(dp) == {"pinned_steered": 1}


@pytest.mark.parametrize("frame,action,reason", [
    (from_fleet(udp4(), src="172.31.0.9"), XdpAction.DROP, "pinned_unknown_peer"),
    (from_fleet(udp4(), key_present=1, key=5), XdpAction.DROP, "pinned_unknown_peer"),
    (from_fleet(udp4(dst="8.8.8.8")), XdpAction.DROP, "pinned_no_route"),
    (bytes(Ether(dst=INET_MAC, src=INET_PEER) / IP(src=OUTSIDE, dst=FLEET[1]) / ICMP()),
     XdpAction.PASS, "not_ours"),
    (from_fleet(udp4())[:14 + 20 + 4 + 10], XdpAction.DROP, "outer_malformed"),
], ids=["unknown-peer", "keyed", "no-route", "ping-to-fleet-address", "truncated"])
def test_fleet_address_refuses_what_no_fleet_node_sends(node, ns, prog, frame, action, reason):
    dp = node(1, 1)
    res = run(ns, prog, frame)
    assert res.action is action
    if action is XdpAction.PASS or reason != "pinned_no_route":
        assert res.packet == frame
    assert reasons(dp) == {reason: 1}


def test_without_a_pin_the_fleet_address_takes_nothing(node, ns, prog):
    """Unpinned IPsec traffic on a node with a fleet address: encrypted where it arrives."""
    dp = node(2, None)
    res = run(ns, prog, from_internet(udp4()))
    assert (res.action, res.packet[:16]) == (XdpAction.REDIRECT, meta())
    assert reasons(dp) == {"esp_steered": 1}

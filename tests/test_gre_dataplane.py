"""GRE data plane on bytes: BPF_PROG_TEST_RUN of bpf/xdp_edge.c, exact packets and verdicts.

Expected packets are built with scapy, which computes every checksum itself (never our code).
The program is compiled once for the module; FIB lookups run in a namespace with static routes
and neighbours (ingress: cust0; Internet side: inet0).
"""
from __future__ import annotations

import pytest
from gre_support import CUSTOMER, CUSTOMER2, EDGE, config
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import GRE, Ether

from pipeline import netns
from pipeline.xdp import testrun
from pipeline.xdp.dataplane import Dataplane, compile_program, flow_hash4, pick
from pipeline.xdp.testrun import XdpAction

pytestmark = pytest.mark.netns

CUST_MAC, CUST_PEER = "02:00:00:00:01:01", "02:00:00:00:01:02"
INET_MAC, INET_PEER = "02:00:00:00:02:01", "02:00:00:00:02:02"
OUTSIDE = "100.64.0.9"          # an Internet host: default route via inet0
HOST = "203.0.113.5"            # inside a customer prefix


@pytest.fixture(scope="module")
def prog():
    p = compile_program()
    yield p
    p.close()


@pytest.fixture(scope="module")
def fwd_ns():
    with netns.Lab("gre") as lab:
        ns = lab.namespace("fwd")
        ns.sysctl("net.ipv6.conf.all.accept_dad", 0)
        ns.sysctl("net.ipv6.conf.default.accept_dad", 0)
        lab.veth(ns, "cust0", ns, "cust1", "10.1.0.1/24", mac_a=CUST_MAC, mac_b=CUST_PEER)
        lab.veth(ns, "inet0", ns, "inet1", "10.2.0.1/24", mac_a=INET_MAC, mac_b=INET_PEER)
        ns.add_address("inet0", "fd00:2::1/64")
        ns.sysctl("net.ipv4.ip_forward", 1)
        ns.sysctl("net.ipv6.conf.all.forwarding", 1)
        ns.add_neighbour("cust0", "10.1.0.2", CUST_PEER)
        ns.add_neighbour("inet0", "10.2.0.2", INET_PEER)
        ns.add_neighbour("inet0", "fd00:2::2", INET_PEER)
        ns.add_route("198.51.100.0/24", gateway="10.1.0.2")
        ns.add_route("0.0.0.0/0", gateway="10.2.0.2")
        ns.add_route("::/0", gateway="fd00:2::2")
        ns.add_route("100.65.0.0/16", gateway="10.2.0.3")   # no neighbour entry for 10.2.0.3
        yield ns


@pytest.fixture
def dp(prog, fwd_ns):
    d = Dataplane(config(), ifaces=[], program=prog, pin=False)
    with fwd_ns.enter():
        d.start()
    yield d
    d.close()


def run(fwd_ns, prog, frame: bytes, ingress: str = "cust0"):
    with fwd_ns.enter():
        return testrun.run(prog.fd, bytes(frame), ingress_ifindex=fwd_ns.index(ingress))


def gre_in(inner, key: int | None = None, src: str = CUSTOMER, **gre) -> bytes:
    g = GRE(proto=0x86DD if isinstance(inner, IPv6) else 0x0800, **gre)
    if key is not None:
        g.key_present, g.key = 1, key
    return bytes(Ether(dst=CUST_MAC, src=CUST_PEER) / IP(src=src, dst=EDGE) / g / inner)


def syn(options, dst: str = OUTSIDE, src: str = "203.0.113.7", ttl: int = 64, **ip):
    return IP(src=src, dst=dst, ttl=ttl, id=7, **ip) / TCP(sport=40000, dport=443, flags="S",
                                                          seq=1, options=options)


def forwarded(inner, mac_dst=INET_PEER, mac_src=INET_MAC, ttl_delta=1, mss=None) -> bytes:
    """What the Internet side must receive: ``inner`` with TTL - 1 and MSS clamped, checksums
    recomputed by scapy."""
    p = inner.copy()
    if isinstance(p, IPv6):
        p.hlim -= ttl_delta
    else:
        p.ttl -= ttl_delta
        del p.chksum
    if mss is not None:
        p[TCP].options = [("MSS", mss) if o[0] == "MSS" else o for o in p[TCP].options]
        del p[TCP].chksum
    return bytes(Ether(dst=mac_dst, src=mac_src, type=0x86DD if isinstance(p, IPv6) else 0x0800)
                 / p)


def reason_count(dp, name: str) -> int:
    return dp.counters().reasons.get(name, (0, 0))[0]


# --- decapsulation --------------------------------------------------------------------------

@pytest.mark.parametrize("c", [0, 1])
@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("s", [0, 1])
def test_decap_every_gre_flag_combination(dp, prog, fwd_ns, c, k, s):
    inner = syn([("MSS", 1460)])
    gre = {"chksum_present": c, "seqnum_present": s}
    if s:
        gre["sequence_number"] = 99
    frame = gre_in(inner, key=42 if k else None, **gre)
    assert len(frame) == 14 + 20 + 4 + 4 * (c + k + s) + len(inner)
    res = run(fwd_ns, prog, frame)
    assert res.action is XdpAction.REDIRECT
    assert res.packet == forwarded(inner, mss=1436)
    c_ = dp.counters()
    tunnel = 2 if k else 1
    assert c_.tunnels[tunnel].decap_packets == 1
    assert c_.tunnels[tunnel].decap_bytes == len(inner)
    assert c_.reasons["decap_forwarded"] == (1, len(res.packet))


def test_decap_ipv6_inner(dp, prog, fwd_ns):
    inner = IPv6(src="2001:db8:100::7", dst="2001:db8:ffff::1", hlim=64) / TCP(
        sport=1, dport=2, flags="SA", options=[("NOP", None), ("MSS", 8960)])
    res = run(fwd_ns, prog, gre_in(inner, key=42))
    assert res.action is XdpAction.REDIRECT
    assert res.packet == forwarded(inner, mss=1436)


@pytest.mark.parametrize("options", [
    [("MSS", 1460)],                                                      # offset 0
    [("NOP", None), ("MSS", 1460)],                                       # 1 (odd)
    [("NOP", None), ("NOP", None), ("MSS", 1460)],                        # 2
    [("SAckOK", b""), ("MSS", 1460)],                                     # 2
    [("NOP", None), ("WScale", 7), ("MSS", 9000)],                        # 4
    [("Timestamp", (1, 2)), ("MSS", 65535)],                              # 10
    [("NOP", None), ("NOP", None), ("Timestamp", (5, 0)), ("NOP", None), ("MSS", 1437)],  # 13
    [("SAckOK", b""), ("Timestamp", (1, 2)), ("Timestamp", (3, 4)), ("Timestamp", (5, 6)),
     ("MSS", 1500)],                                                      # 32
], ids=["0", "1", "2", "2sack", "4", "10", "13", "32"])
def test_mss_clamped_at_any_offset(dp, prog, fwd_ns, options):
    inner = syn(options)
    res = run(fwd_ns, prog, gre_in(inner))
    assert res.action is XdpAction.REDIRECT
    assert res.packet == forwarded(inner, mss=1436)
    assert TCP in Ether(res.packet) and dict(Ether(res.packet)[TCP].options)["MSS"] == 1436


def test_mss_walk_limit_is_sixteen_items(dp, prog, fwd_ns):
    """bpf/mss.h looks at 16 option items (verifier budget): the 16th is clamped, the 17th not."""
    sixteenth = syn([("NOP", None)] * 15 + [("MSS", 1460)] + [("EOL", None)] * 3)
    seventeenth = syn([("NOP", None)] * 16 + [("MSS", 1460)] + [("EOL", None)] * 2)
    assert run(fwd_ns, prog, gre_in(sixteenth)).packet == forwarded(sixteenth, mss=1436)
    assert run(fwd_ns, prog, gre_in(seventeenth)).packet == forwarded(seventeenth)


def test_mss_checksum_fold_carries_twice(dp, prog, fwd_ns):
    """RFC 1624 eqn. 3 with a sum that carries out of 16 bits twice: MSS 1536 -> 1436 at an odd
    offset (bytes swapped in the sum) and a source port chosen so ~HC + ~m + m' == 0x1ffff."""
    def pkt(sport):
        return IP(src="203.0.113.7", dst=OUTSIDE, ttl=64, id=7) / TCP(
            sport=sport, dport=443, flags="S", seq=1, options=[("NOP", None), ("MSS", 1536)])
    s0 = ~IP(bytes(pkt(0)))[TCP].chksum & 0xFFFF          # one's complement sum with sport 0
    sport = (0x6401 - s0) % 0xFFFF                         # makes ~HC == 0x6401
    inner = pkt(sport)
    hc = IP(bytes(inner))[TCP].chksum
    total = (~hc & 0xFFFF) + (~0x0006 & 0xFFFF) + 0x9C05    # swapped 0x0600 -> swapped 0x059c
    assert total == 0x1FFFF and (total & 0xFFFF) + (total >> 16) == 0x10000
    res = run(fwd_ns, prog, gre_in(inner))
    assert res.packet == forwarded(inner, mss=1436)


@pytest.mark.parametrize("options", [[("MSS", 1400)], [("MSS", 1436)], [("WScale", 2)], []],
                         ids=["below", "equal", "no-mss", "no-options"])
def test_mss_never_raised_nor_added(dp, prog, fwd_ns, options):
    inner = syn(options)
    res = run(fwd_ns, prog, gre_in(inner))
    assert res.packet == forwarded(inner)


def test_mss_not_clamped_without_syn(dp, prog, fwd_ns):
    inner = IP(src="203.0.113.7", dst=OUTSIDE, ttl=64) / TCP(flags="A", options=[("MSS", 1460)])
    assert run(fwd_ns, prog, gre_in(inner)).packet == forwarded(inner)


def _raw_tcp(dataofs: int, options: bytes, payload: bytes = b"") -> IP:
    tcp = TCP(sport=40000, dport=443, flags="S", dataofs=dataofs) / (options + payload)
    return IP(src="203.0.113.7", dst=OUTSIDE, ttl=64, id=7) / tcp


@pytest.mark.parametrize("dataofs,opts", [
    (4, b""),                                          # doff < 5
    (15, b"\x02\x04\x05\xb4"),                         # doff beyond the packet
    (6, b"\x03\x00\x02\x04"),                          # option length 0 before MSS
    (6, b"\x03\x01\x02\x04"),                          # option length 1
    (6, b"\x01\x08\x06\x05"),                          # length running past the header
    (6, b"\x01\x01\x01\x02"),                          # a kind byte alone at the end
    (7, b"\x02\x03\x05\x02\x04\x05\xb4\x00"),          # MSS with length 3
    (7, b"\x02\x05\x05\xb4\x00\x01\x01\x00"),          # MSS with length 5
], ids=["doff<5", "doff-beyond", "len0", "len1", "past-header", "kind-alone", "mss-len3",
        "mss-len5"])
def test_malformed_options_untouched(dp, prog, fwd_ns, dataofs, opts):
    inner = _raw_tcp(dataofs, opts)
    res = run(fwd_ns, prog, gre_in(inner))
    assert res.action is XdpAction.REDIRECT
    assert res.packet == forwarded(inner)     # only the TTL changed


@pytest.mark.parametrize("dst,reason", [("100.65.0.1", "fib_no_neigh"),
                                        ("10.2.0.1", "fib_pass")], ids=["no-neigh", "local"])
def test_fib_miss_goes_to_kernel_decapsulated_ttl_untouched(dp, prog, fwd_ns, dst, reason):
    """No neighbour yet (the kernel resolves it) or not forwarded here (a local address): the
    decapsulated packet goes to the kernel, which forwards it and decrements the TTL itself."""
    inner = syn([("MSS", 1460)], dst=dst)
    res = run(fwd_ns, prog, gre_in(inner))
    assert res.action is XdpAction.PASS
    assert res.packet == forwarded(inner, mac_dst=CUST_MAC, mac_src=CUST_PEER, ttl_delta=0,
                                   mss=1436)
    assert dp.counters().tunnel_reasons == {1: {reason: 1}}


def test_ttl_expiring_goes_to_kernel_decapsulated(dp, prog, fwd_ns):
    inner = syn([("MSS", 1400)], ttl=1)
    res = run(fwd_ns, prog, gre_in(inner))
    assert res.action is XdpAction.PASS
    assert res.packet == bytes(Ether(dst=CUST_MAC, src=CUST_PEER) / inner)
    assert dp.counters().tunnel_reasons == {1: {"ttl_expired": 1}}


def test_ethernet_padding_and_outer_slack_trimmed(dp, prog, fwd_ns):
    inner = IP(src="203.0.113.7", dst=OUTSIDE, ttl=9) / UDP(sport=1, dport=2)
    frame = gre_in(inner) + b"\0" * 10            # padding after the outer packet
    res = run(fwd_ns, prog, frame)
    assert res.packet == forwarded(inner)


def test_outer_fragment_passes_counted(dp, prog, fwd_ns):
    frame = bytes(Ether(dst=CUST_MAC, src=CUST_PEER) / IP(src=CUSTOMER, dst=EDGE, flags="MF")
                  / GRE() / syn([]))
    res = run(fwd_ns, prog, frame)
    assert (res.action, res.packet) == (XdpAction.PASS, frame)
    assert reason_count(dp, "outer_fragment") == 1


@pytest.mark.parametrize("frame,reason", [
    (gre_in(syn([]), src="198.51.100.99"), "unknown_tunnel"),
    (gre_in(syn([]), key=43), "unknown_tunnel"),
    (gre_in(syn([]), version=1), "gre_version"),
    (gre_in(syn([]), routing_present=1), "gre_routing"),
    (bytes(Ether(dst=CUST_MAC, src=CUST_PEER) / IP(src=CUSTOMER, dst=EDGE, proto=47)
           / b"\x30\x00"), "gre_truncated"),
    (bytes(Ether(dst=CUST_MAC, src=CUST_PEER) / IP(src=CUSTOMER, dst=EDGE) / GRE(proto=0x6558)
           / Ether()), "gre_protocol"),
    (gre_in(b"\x44" + bytes(IP(src="1.1.1.1", dst=OUTSIDE) / UDP())[1:]), "inner_malformed"),
    (gre_in(IP(src="1.1.1.1", dst=OUTSIDE, len=200) / (b"x" * 10)), "inner_malformed"),
    (gre_in(IPv6(dst="2001:db8::1", plen=500) / (b"x" * 10)), "inner_malformed"),
    (bytes(Ether(dst=CUST_MAC, src=CUST_PEER) / IP(src=CUSTOMER, dst=EDGE, len=400) / GRE()
           / syn([])), "outer_malformed"),
], ids=["stranger", "wrong-key", "version1", "routing", "truncated", "proto", "ihl4",
        "inner-too-long", "v6-too-long", "outer-too-long"])
def test_malformed_gre_dropped_with_reason(dp, prog, fwd_ns, frame, reason):
    res = run(fwd_ns, prog, frame)
    assert res.action is XdpAction.DROP
    assert dp.counters().reasons == {reason: (1, len(frame))}


def test_not_ours_passes_untouched(dp, prog, fwd_ns):
    frame = bytes(Ether(dst=CUST_MAC, src=CUST_PEER) / IP(src="10.1.0.2", dst="9.9.9.9") / UDP())
    res = run(fwd_ns, prog, frame)
    assert (res.action, res.packet) == (XdpAction.PASS, frame)
    assert dp.counters().reasons == {"not_ours": (1, len(frame))}


# --- encapsulation --------------------------------------------------------------------------

def encap_expected(inner, key: int | None, customer: str = CUSTOMER, df: bool = True) -> bytes:
    p = inner.copy()
    if isinstance(p, IPv6):
        p.hlim -= 1
        tos = p.tc
    else:
        p.ttl -= 1
        del p.chksum
        tos = p.tos
    if TCP in p and any(o[0] == "MSS" and o[1] > 1436 for o in p[TCP].options):
        p[TCP].options = [("MSS", 1436) if o[0] == "MSS" else o for o in p[TCP].options]
        del p[TCP].chksum
    g = GRE(proto=0x86DD if isinstance(p, IPv6) else 0x0800)
    if key is not None:
        g.key_present, g.key = 1, key
    return bytes(Ether(dst=CUST_PEER, src=CUST_MAC) / IP(
        src=EDGE, dst=customer, ttl=64, id=0, tos=tos, flags="DF" if df else 0) / g / p)


def test_encap_ipv4_keyed_tunnel(dp, prog, fwd_ns):
    inner = syn([("MSS", 1460), ("NOP", None)], src=OUTSIDE, dst=HOST, flags="DF", tos=0x28)
    frame = bytes(Ether(dst=INET_MAC, src=INET_PEER) / inner)
    res = run(fwd_ns, prog, frame, ingress="inet0")
    assert res.action is XdpAction.REDIRECT
    assert res.packet == encap_expected(inner, key=42)
    t = dp.counters().tunnels[2]
    assert (t.encap_packets, t.encap_bytes) == (1, len(inner))


def test_encap_ipv6_and_short_frame_padding(dp, prog, fwd_ns):
    inner = IPv6(src="2001:db8:ffff::1", dst="2001:db8:100::7", hlim=3, tc=0x10) / UDP(
        sport=5, dport=6)
    frame = bytes(Ether(dst=INET_MAC, src=INET_PEER) / inner) + b"\0" * 6
    res = run(fwd_ns, prog, frame, ingress="inet0")
    assert res.action is XdpAction.REDIRECT
    assert res.packet == encap_expected(inner, key=42)


def test_lowest_priority_wins(dp, prog, fwd_ns):
    inner = IP(src=OUTSIDE, dst="203.0.113.200", ttl=20) / UDP()
    res = run(fwd_ns, prog, bytes(Ether(dst=INET_MAC, src=INET_PEER) / inner), ingress="inet0")
    assert res.packet == encap_expected(inner, key=None, df=False)   # "plain", priority 50


def test_equal_priorities_share_by_flow_hash(dp, prog, fwd_ns):
    seen = {}
    for sport in range(1000, 1032):
        inner = IP(src=OUTSIDE, dst="198.18.0.5", ttl=20) / UDP(sport=sport, dport=53)
        frame = bytes(Ether(dst=INET_MAC, src=INET_PEER) / inner)
        outs = {run(fwd_ns, prog, frame, ingress="inet0").packet for _ in range(3)}
        assert len(outs) == 1                                # same 5-tuple, same tunnel
        out = Ether(outs.pop())
        want = pick((2, 3), flow_hash4(OUTSIDE, "198.18.0.5", 17, sport, 53))
        assert out[IP].dst == {2: CUSTOMER, 3: CUSTOMER2}[want]
        seen[sport] = want
    assert set(seen.values()) == {2, 3}


def test_fragments_of_one_datagram_take_one_tunnel(dp, prog, fwd_ns):
    """Ports are left out of the hash for any fragment, so all pieces take the same tunnel."""
    tunnels = set()
    for flags, frag in (("MF", 0), ("MF", 100), (0, 200)):
        inner = IP(src=OUTSIDE, dst="198.18.0.5", ttl=20, id=77, flags=flags, frag=frag,
                   proto=17) / (b"u" * 40)
        out = run(fwd_ns, prog, bytes(Ether(dst=INET_MAC, src=INET_PEER) / inner),
                  ingress="inet0")
        assert out.action is XdpAction.REDIRECT
        tunnels.add(Ether(out.packet)[IP].dst)
    assert tunnels == {{2: CUSTOMER, 3: CUSTOMER2}[pick((2, 3), flow_hash4(OUTSIDE, "198.18.0.5",
                                                                           17))]}


def test_too_big_with_df_answers_icmp_frag_needed(dp, prog, fwd_ns):
    inner = IP(src=OUTSIDE, dst=HOST, ttl=50, flags="DF", id=321) / UDP(sport=7, dport=9) / (
        b"z" * (1477 - 28))
    frame = bytes(Ether(dst=INET_MAC, src=INET_PEER) / inner)
    res = run(fwd_ns, prog, frame, ingress="inet0")
    assert res.action is XdpAction.TX
    quote = bytes(inner)[:28]
    want = Ether(dst=INET_PEER, src=INET_MAC) / IP(src=EDGE, dst=OUTSIDE, tos=0xC0, id=0,
                                                   ttl=64) / ICMP(type=3, code=4,
                                                                  nexthopmtu=1476) / quote
    assert res.packet == bytes(want)
    assert dp.counters().tunnel_reasons == {2: {"frag_needed": 1}}


def test_too_big_without_df_passes_counted(dp, prog, fwd_ns):
    inner = IP(src=OUTSIDE, dst=HOST, ttl=50) / UDP() / (b"z" * 1470)
    frame = bytes(Ether(dst=INET_MAC, src=INET_PEER) / inner)
    res = run(fwd_ns, prog, frame, ingress="inet0")
    assert (res.action, res.packet) == (XdpAction.PASS, frame)
    assert reason_count(dp, "too_big") == 1


def test_encap_ttl_expiring_passes_untouched(dp, prog, fwd_ns):
    frame = bytes(Ether(dst=INET_MAC, src=INET_PEER) / IP(src=OUTSIDE, dst=HOST, ttl=1) / UDP())
    res = run(fwd_ns, prog, frame, ingress="inet0")
    assert (res.action, res.packet) == (XdpAction.PASS, frame)


# --- control ----------------------------------------------------------------------------------

def test_apply_changes_only_what_changed(dp, prog, fwd_ns):
    cfg = config(extra="", routes="""
[[routes]]
prefix = "203.0.113.0/24"
tunnel = "plain"
""")
    changed = dp.apply(cfg)
    assert changed["tunnels"] == 0 and changed["decap"] == 0 and changed["endpoints"] == 0
    inner = IP(src=OUTSIDE, dst=HOST, ttl=20) / UDP()
    res = run(fwd_ns, prog, bytes(Ether(dst=INET_MAC, src=INET_PEER) / inner), ingress="inet0")
    assert res.packet == encap_expected(inner, key=None, df=False)
    assert changed == {"routes4": 3, "routes6": 1, "tunnels": 0, "decap": 0, "endpoints": 0,
                       "pin_nodes": 0}
    assert dp.apply(cfg) == {"routes4": 0, "routes6": 0, "tunnels": 0, "decap": 0,
                             "endpoints": 0, "pin_nodes": 0}


def test_encap_ipv6_syn_clamped(dp, prog, fwd_ns):
    inner = IPv6(src="2001:db8:ffff::1", dst="2001:db8:100::7", hlim=64) / TCP(
        sport=443, dport=40000, flags="SA", options=[("SAckOK", b""), ("MSS", 1440)])
    frame = bytes(Ether(dst=INET_MAC, src=INET_PEER) / inner)
    res = run(fwd_ns, prog, frame, ingress="inet0")
    assert res.action is XdpAction.REDIRECT
    assert res.packet == encap_expected(inner, key=42)
    assert dict(Ether(res.packet)[TCP].options)["MSS"] == 1436


def test_prefix_routed_to_ipsec_tunnel_goes_to_kernel_counted(prog, fwd_ns, monkeypatch):
    monkeypatch.setenv("XT_TEST_PSK", "0123456789abcdef0123456789abcdef")
    ipsec = """
[tunnels.ipsec.vpn]
id = "t-vpn"
account_id = "42"
index = 9
customer_endpoint = "198.51.100.30"
edge_endpoint = "192.0.2.1"
interface_address = "10.200.0.8/31"
psk_env = "XT_TEST_PSK"
"""
    cfg = config(extra=ipsec, routes='[[routes]]\nprefix = "203.0.113.0/24"\ntunnel = "vpn"\n')
    d = Dataplane(cfg, ifaces=[], program=prog, pin=False)
    with fwd_ns.enter():
        d.start()
    try:
        frame = bytes(Ether(dst=INET_MAC, src=INET_PEER) / IP(src=OUTSIDE, dst=HOST) / UDP())
        res = run(fwd_ns, prog, frame, ingress="inet0")
        assert (res.action, res.packet) == (XdpAction.PASS, frame)
        assert d.counters().tunnel_reasons == {9: {"ipsec_not_built": 1}}
    finally:
        d.close()


def test_bad_interface_fails_cleanly(prog, fwd_ns):
    from pipeline.xdp.dataplane import DataplaneError
    d = Dataplane(config(interfaces=("cust0", "nosuch0")), program=prog, pin=False)
    with fwd_ns.enter(), pytest.raises(DataplaneError, match="nosuch0"):
        d.start()
    with fwd_ns.ipr() as ipr:    # cust0 was attached first: detached again
        xdp = ipr.get_links(fwd_ns.index("cust0"))[0].get("IFLA_XDP")
    assert xdp is None or xdp.get("IFLA_XDP_ATTACHED") in (None, 0, "none")

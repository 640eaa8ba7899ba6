"""Direct TX of the IPsec worker: frames leave the egress device the kernel FIB chooses, and follow
it when routes and neighbours change; what the worker must not send itself takes the internal
veth, where the kernel handles it (TTL expiry, too big, no route).

Lab: tests/ipsec_lab.py in the "direct" design (one worker receiving on cust0 and inet0 and
transmitting straight out of both), the steering program in native and in generic XDP mode. Packets are decrypted from a static SA (tests/esp_support.py
builds the ESP independently) so every case is the worker's transit path.
"""
from __future__ import annotations

import ipaddress
import struct
import time

import ipsec_lab as L
import pytest
from esp_support import ipv4, ref_decrypt
from test_ipsec_datapath import Tun, inner_udp, with_ttl

pytestmark = pytest.mark.netns

NEW_MAC = "02:00:00:00:02:99"
FAR_PREFIX, FAR_HOST = "203.0.113.0/24", "203.0.113.7"


@pytest.fixture(scope="module", params=["native", "generic"])
def el(request):
    with L.running("ipdirect", xdp_mode=request.param, design="direct") as e:
        yield e


@pytest.fixture
def tun(el):
    t = Tun(el, "gcm128")
    yield t
    t.delete()


def udp_tagged(tag: bytes):
    """A plain IPv4/UDP frame carrying tag (not an ICMP error quoting it)."""
    return lambda f: f[12:14] == b"\x08\x00" and f[23] == 17 and tag in f


def icmp_frame(icmp_type: int, code: int):
    return lambda f: f[12:14] == b"\x08\x00" and f[23] == 1 and f[34:36] == bytes([icmp_type, code])


def worker(el):
    return el.edge_dp.workers[0].stats()


def send(el, t, dst: str, tag: bytes, ttl: int = 64, size: int = 0) -> bytes:
    inner = inner_udp("10.10.0.5", dst, tag, ttl=ttl, size=size)
    el.to_edge_from_customer(t.esp_from_router(inner))
    return inner


def wait_flush(el, before: int) -> None:
    """Until the route watch has passed a netlink change on to the worker."""
    deadline = time.monotonic() + 3
    while worker(el).nh_flushes == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker(el).nh_flushes > before, "the netlink change did not reach the worker"


def test_direct_sockets_on_both_devices(el):
    w = el.edge_dp.workers[0]
    with el.edge.enter():
        assert w.direct_status() == {"cust0": el.edge.index("cust0"),
                                     "inet0": el.edge.index("inet0")}
    assert worker(el).direct_ports == 2


def test_neighbour_change_moves_the_next_hop(el, tun):
    el.i0.drain()
    s0 = worker(el)
    send(el, tun, L.INET_HOST, b"nb-old")
    f = el.i0.recv(2.0, match=udp_tagged(b"nb-old"))
    assert f is not None and f[:6] == L.mac(L.MAC_I0)
    try:
        el.edge.run("ip", "neigh", "replace", L.INET_HOST, "lladdr", NEW_MAC, "dev", "inet0",
                    "nud", "permanent")
        wait_flush(el, s0.nh_flushes)
        inner = send(el, tun, L.INET_HOST, b"nb-new")
        f = el.i0.recv(2.0, match=udp_tagged(b"nb-new"))
        assert f is not None
        assert f[:6] == L.mac(NEW_MAC) and f[6:12] == L.mac(L.MAC_INET0)
        assert f[14:] == with_ttl(inner, 63)
    finally:
        el.edge.run("ip", "neigh", "replace", L.INET_HOST, "lladdr", L.MAC_I0, "dev", "inet0",
                    "nud", "permanent")
    s1 = worker(el)
    assert (s1.tx_direct - s0.tx_direct, s1.tx_slow - s0.tx_slow) == (2, 0)


def test_route_change_follows_the_fib(el, tun):
    el.i0.drain()
    el.c0.drain()
    try:
        el.edge.run("ip", "route", "add", FAR_PREFIX, "via", L.INET_HOST, "dev", "inet0")
        s0 = worker(el)
        send(el, tun, FAR_HOST, b"rt-inet")
        f = el.i0.recv(2.0, match=udp_tagged(b"rt-inet"))
        assert f is not None and f[:6] == L.mac(L.MAC_I0)
        # the route moves to the customer side: the same destination leaves on cust0
        el.edge.run("ip", "route", "replace", FAR_PREFIX, "via", L.ROUTER, "dev", "cust0")
        wait_flush(el, s0.nh_flushes)
        send(el, tun, FAR_HOST, b"rt-cust")
        f = el.c0.recv(2.0, match=udp_tagged(b"rt-cust"))
        assert f is not None
        assert f[:6] == L.mac(L.MAC_C0) and f[6:12] == L.mac(L.MAC_CUST0)
        assert el.i0.recv(0.2, match=udp_tagged(b"rt-cust")) is None
        s1 = worker(el)
        assert (s1.tx_direct - s0.tx_direct, s1.tx_slow - s0.tx_slow) == (2, 0)
        # no route at all: the worker sends it to the kernel, which drops it and says so
        el.edge.run("ip", "route", "del", FAR_PREFIX)
        wait_flush(el, s1.nh_flushes)
        send(el, tun, FAR_HOST, b"rt-none")
        assert el.c0.recv(2.0, match=icmp_frame(3, 0)) is not None   # net unreachable
        assert el.i0.recv(0.2, match=udp_tagged(b"rt-none")) is None
        s2 = worker(el)
        assert (s2.tx_direct - s1.tx_direct, s2.tx_slow - s1.tx_slow) == (0, 1)
        assert s2.nh_no_route - s1.nh_no_route == 1
    finally:
        el.edge.run("ip", "route", "del", FAR_PREFIX, check=False)


def test_ttl_expiring_takes_the_kernel_path(el, tun):
    el.c0.drain()
    el.i0.drain()
    s0 = worker(el)
    steer0 = el.edge_dp.stats()["steering"]
    send(el, tun, L.INET_HOST, b"ttl-1", ttl=1)
    f = el.c0.recv(2.0, match=icmp_frame(11, 0))        # time exceeded, from the kernel
    assert f is not None
    # from the address of the route back to the source (the internal veth has none)
    assert f[26:30] == ipaddress.IPv4Address(L.EDGE_EP).packed
    assert el.i0.recv(0.2, match=udp_tagged(b"ttl-1")) is None
    s1 = worker(el)
    assert (s1.tx_direct - s0.tx_direct, s1.tx_slow - s0.tx_slow) == (0, 1)
    assert s1.slow_ttl - s0.slow_ttl == 1
    assert el.edge_dp.stats()["steering"]["fwd_ttl"] - steer0["fwd_ttl"] == 1


def test_too_big_for_the_egress_mtu_is_fragmented_by_the_kernel(el, tun):
    el.i0.drain()
    s0 = worker(el)
    try:
        el.edge.run("ip", "link", "set", "inet0", "mtu", "1000")
        wait_flush(el, s0.nh_flushes)
        s0 = worker(el)
        inner = send(el, tun, L.INET_HOST, b"big", size=1300)
        frags = el.i0.recv_all(2, 2.0, match=lambda f: f[12:14] == b"\x08\x00" and
                               f[18:20] == b"\x42\x42")   # the inner packet's IP ID
        assert len(frags) == 2
        first, second = (f[14:] for f in frags)
        assert struct.unpack("!HH", first[2:4] + first[6:8]) == (996, 0x2000)   # MF, offset 0
        assert struct.unpack("!HH", second[2:4] + second[6:8]) == (
            20 + len(inner) - 20 - 976, 976 // 8)
        s1 = worker(el)
        assert (s1.tx_direct - s0.tx_direct, s1.tx_slow - s0.tx_slow) == (0, 1)
        assert s1.slow_mtu - s0.slow_mtu == 1
        # a packet that fits still leaves directly
        send(el, tun, L.INET_HOST, b"small", size=100)
        assert el.i0.recv(2.0, match=udp_tagged(b"small")) is not None
        assert worker(el).tx_direct - s1.tx_direct == 1
    finally:
        el.edge.run("ip", "link", "set", "inet0", "mtu", "1500")


def test_many_destinations_all_delivered(el, tun):
    """200 destinations in one burst: each is a cache miss; lookups beyond the per-batch budget
    take the internal veth, so every packet arrives either way."""
    el.i0.drain()
    try:
        el.edge.run("ip", "route", "add", FAR_PREFIX, "via", L.INET_HOST, "dev", "inet0")
        s0 = worker(el)
        for i in range(1, 201):
            send(el, tun, f"203.0.113.{i}", b"many-%03d" % i)
        got = el.i0.recv_all(200, 5.0, match=lambda f: f[23] == 17 and b"many-" in f)
        assert sorted(f[30:34] for f in got) == sorted(
            ipaddress.IPv4Address(f"203.0.113.{i}").packed for i in range(1, 201))
        s1 = worker(el)
        assert (s1.tx_direct - s0.tx_direct) + (s1.tx_slow - s0.tx_slow) == 200
        assert s1.nh_lookups - s0.nh_lookups == s1.tx_direct - s0.tx_direct
        assert s1.nh_lookup_errors == s0.nh_lookup_errors
    finally:
        el.edge.run("ip", "route", "del", FAR_PREFIX, check=False)


def test_encrypted_packet_over_the_mtu_is_fragmented_outside(el, tun):
    """A 1486-byte packet to the customer encrypts to more than cust0's 1500: the worker hands it
    to the kernel through the internal veth, which fragments the outer ESP packet (DF clear)
    instead of dropping it as coming from one of its own addresses."""
    el.c0.drain()
    s0 = worker(el)
    inner = inner_udp(L.INET_HOST, "10.10.0.5", b"big-out-", size=1450)
    assert len(inner) == 1486
    el.to_edge_from_internet(inner)
    frags = el.c0.recv_all(2, 2.0, match=lambda f: f[12:14] == b"\x08\x00" and f[23] == 50)
    assert len(frags) == 2
    ips = sorted((f[14:] for f in frags), key=lambda ip: struct.unpack("!H", ip[6:8])[0] & 0x1fff)
    assert [struct.unpack("!H", ip[6:8])[0] for ip in ips] == [0x2000, 1480 // 8]   # MF; offset
    assert struct.unpack("!H", ips[0][2:4])[0] == 1500
    esp = ips[0][20:1500] + ips[1][20:struct.unpack("!H", ips[1][2:4])[0]]
    nh, plain, seq = ref_decrypt(tun.ref_out, esp)
    assert (nh, plain, seq) == (4, with_ttl(inner, 63), 1)   # the tunnel's first packet out
    s1 = worker(el)
    assert (s1.tx_direct - s0.tx_direct, s1.tx_slow - s0.tx_slow) == (0, 1)
    assert s1.slow_mtu - s0.slow_mtu == 1


RTM_NEWRULE, RTM_NEWNEXTHOP = 32, 104          # include/uapi/linux/rtnetlink.h
AF_INET, AF_INET6 = 2, 10


@pytest.mark.parametrize(("cmd", "message"), [
    (("ip", "-6", "rule", "add", "from", "2001:db8:10::/48", "lookup", "100"),
     (RTM_NEWRULE, AF_INET6)),
    (("ip", "rule", "add", "from", "10.10.0.0/24", "lookup", "100"), (RTM_NEWRULE, AF_INET)),
    (("ip", "nexthop", "add", "id", "77", "via", L.INET_HOST, "dev", "inet0"),
     (RTM_NEWNEXTHOP, AF_INET)),
], ids=["ipv6-rule", "ipv4-rule", "nexthop-object"])
def test_rule_and_nexthop_changes_flush_the_cache(el, cmd, message):
    watch = el.edge_dp.route_watch
    seen = watch.seen.get(message, 0)
    before = worker(el).nh_flushes
    undo = ("ip", "nexthop", "del", "id", "77") if cmd[1] == "nexthop" else \
        tuple(c if c != "add" else "del" for c in cmd)
    try:
        el.edge.run(*cmd)
        deadline = time.monotonic() + 3
        while watch.seen.get(message, 0) == seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watch.seen.get(message, 0) == seen + 1   # the change itself reached the watch
        wait_flush(el, before)
    finally:
        el.edge.run(*undo, check=False)


def udp_flow(dst: str, sport: int, dport: int, tag: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(tag), 0) + tag
    return ipv4(udp, "10.10.0.5", dst, proto=17, ttl=64, ident=0x4343)


def wait_l4(el, want: bool) -> None:
    deadline = time.monotonic() + 3
    while el.edge_dp.route_watch.l4 != want and time.monotonic() < deadline:
        time.sleep(0.01)
    assert el.edge_dp.route_watch.l4 is want


def kernel_dev(el, dst: str, sport: int, dport: int) -> str:
    """Where the kernel itself forwards this flow arriving on the internal veth."""
    out = el.edge.run("ip", "route", "get", dst, "from", "10.10.0.5", "iif", "xtesp1",
                      "ipproto", "udp", "sport", str(sport), "dport", str(dport)).stdout
    words = out.split()
    return words[words.index("dev") + 1]


def where(el, tags: list[bytes]) -> dict[bytes, str]:
    """Which side each tagged UDP frame came out on."""
    seen: dict[bytes, str] = {}
    for port, dev in ((el.i0, "inet0"), (el.c0, "cust0")):
        for f in port.recv_all(len(tags), 1.0, match=lambda f: f[23] == 17 and f[42:46] == b"flow"):
            seen[bytes(f[42:50])] = dev
    return seen


def test_port_rules_are_followed(el, tun):
    el.i0.drain()
    el.c0.drain()
    try:
        el.edge.run("ip", "route", "add", FAR_PREFIX, "via", L.INET_HOST, "dev", "inet0")
        el.edge.run("ip", "route", "add", FAR_PREFIX, "via", L.ROUTER, "dev", "cust0",
                    "table", "100")
        before = worker(el).nh_flushes
        el.edge.run("ip", "rule", "add", "ipproto", "udp", "dport", "9", "lookup", "100")
        wait_l4(el, True)
        wait_flush(el, before)
        s0 = worker(el)
        for dport, tag in ((9, b"flow0009"), (10, b"flow0010")):
            el.to_edge_from_customer(tun.esp_from_router(udp_flow(FAR_HOST, 5000, dport, tag)))
        assert where(el, [b"flow0009", b"flow0010"]) == {b"flow0009": "cust0",
                                                         b"flow0010": "inet0"}
        s1 = worker(el)
        assert (s1.tx_direct - s0.tx_direct, s1.tx_slow - s0.tx_slow) == (2, 0)
    finally:
        el.edge.run("ip", "rule", "del", "ipproto", "udp", "dport", "9", "lookup", "100",
                    check=False)
        el.edge.run("ip", "route", "del", FAR_PREFIX, "table", "100", check=False)
        el.edge.run("ip", "route", "del", FAR_PREFIX, check=False)
    wait_l4(el, False)


def test_l4_multipath_hash_matches_the_kernel(el, tun):
    el.i0.drain()
    el.c0.drain()
    try:
        el.edge.sysctl("net.ipv4.fib_multipath_hash_policy", 1)
        el.edge.run("ip", "route", "add", FAR_PREFIX, "nexthop", "via", L.INET_HOST, "dev",
                    "inet0", "nexthop", "via", L.ROUTER, "dev", "cust0")
        wait_l4(el, True)   # noticed by the sysctl poll, within about a second
        sports = range(1000, 1032)
        want = {b"flow%04d" % (s - 1000): kernel_dev(el, FAR_HOST, s, 9) for s in sports}
        assert set(want.values()) == {"inet0", "cust0"}   # the hash spreads these flows
        for s in sports:
            el.to_edge_from_customer(tun.esp_from_router(
                udp_flow(FAR_HOST, s, 9, b"flow%04d" % (s - 1000))))
        assert where(el, list(want)) == want
    finally:
        el.edge.sysctl("net.ipv4.fib_multipath_hash_policy", 0)
        el.edge.run("ip", "route", "del", FAR_PREFIX, check=False)
    wait_l4(el, False)

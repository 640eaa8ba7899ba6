"""Test support for the IPsec data path: a three-namespace lab with the edge in the middle.

    customer router ns (c0 192.0.2.2) <-> (cust0 192.0.2.1) edge ns (inet0 198.51.100.1) <->
    (i0 198.51.100.2) Internet ns

The edge's tunnel endpoint is 192.0.2.1; the customer prefix 10.10.0.0/24 sits behind the customer
router. Static neighbour entries everywhere; GRO on the outer ends so native-mode XDP redirects into
the edge's veths are delivered. ESP is built and checked with tests/esp_support.py (Python
`cryptography`, no code shared with native/).
"""
from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline import ipsec, netns
from pipeline.sa import ChildSaParams

MAC_C0, MAC_CUST0 = "02:00:00:00:01:02", "02:00:00:00:01:01"
MAC_I0, MAC_INET0 = "02:00:00:00:02:02", "02:00:00:00:02:01"
EDGE_EP, ROUTER = "192.0.2.1", "192.0.2.2"
INET_EDGE, INET_HOST = "198.51.100.1", "198.51.100.2"
CUST_PREFIX = "10.10.0.0/24"
INET6_EDGE, INET6_HOST = "2001:db8:2::1", "2001:db8:2::2"
CUST6_PREFIX = "2001:db8:10::/48"
SO_RCVBUFFORCE = 33


def mac(s: str) -> bytes:
    return bytes.fromhex(s.replace(":", ""))


def eth(dst: str, src: str, payload: bytes, etype: int = 0x0800) -> bytes:
    return mac(dst) + mac(src) + struct.pack("!H", etype) + payload


@dataclass
class EdgeLab:
    lab: netns.Lab
    cust: netns.Namespace
    edge: netns.Namespace
    inet: netns.Namespace
    dp: ipsec.IpsecDataPath
    edge_dp: ipsec.IpsecEdge
    c0: netns.PacketPort
    i0: netns.PacketPort

    def to_edge_from_customer(self, ip_packet: bytes) -> None:
        self.c0.send(eth(MAC_CUST0, MAC_C0, ip_packet))

    def to_edge_from_internet(self, ip_packet: bytes) -> None:
        self.i0.send(eth(MAC_INET0, MAC_I0, ip_packet))


def build(lab: netns.Lab, xdp_mode: str = "native", design: str = "veth") -> EdgeLab:
    """``design``: "veth" - two workers (the customer side's queue on one, the Internet side's
    on the other, so a tunnel is decrypted by one worker and encrypted by the other, NAT-T peers
    shared), everything sent through the internal veth and routed by its XDP program;
    "direct" - one worker receiving on both devices and transmitting straight out of them, next
    hops from the kernel FIB (pipeline/ipsec.py)."""
    cust, edge, inet = lab.namespace("cust"), lab.namespace("edge"), lab.namespace("inet")
    lab.veth(cust, "c0", edge, "cust0", f"{ROUTER}/24", f"{EDGE_EP}/24", mac_a=MAC_C0,
             mac_b=MAC_CUST0)
    lab.veth(inet, "i0", edge, "inet0", f"{INET_HOST}/24", f"{INET_EDGE}/24", mac_a=MAC_I0,
             mac_b=MAC_INET0)
    cust.ethtool("c0", "gro", "on")
    inet.ethtool("i0", "gro", "on")
    for ns in (edge, inet):   # static IPv6 addresses usable at once (no duplicate detection)
        ns.sysctl("net.ipv6.conf.all.accept_dad", 0)
        ns.sysctl("net.ipv6.conf.default.accept_dad", 0)
    edge.add_address("inet0", f"{INET6_EDGE}/64")
    inet.add_address("i0", f"{INET6_HOST}/64")
    edge.add_neighbour("inet0", INET6_HOST, MAC_I0)
    edge.add_neighbour("cust0", ROUTER, MAC_C0)
    edge.add_neighbour("inet0", INET_HOST, MAC_I0)
    edge.add_route(CUST_PREFIX, gateway=ROUTER)
    edge.sysctl("net.ipv4.ip_forward", 1)
    cust.add_neighbour("c0", EDGE_EP, MAC_CUST0)
    inet.add_neighbour("i0", INET_EDGE, MAC_INET0)
    c0 = lab.port(cust, "c0")
    i0 = lab.port(inet, "i0")
    for port in (c0, i0):   # room for every frame of a test burst while nobody reads
        port.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    dp = ipsec.IpsecDataPath({}, node_id=7)
    with edge.enter():
        direct = design == "direct"
        e = ipsec.IpsecEdge(dp, [ipsec.RxDevice("cust0", (0,), xdp_mode),
                                 ipsec.RxDevice("inet0", (0,), xdp_mode)], [EDGE_EP],
                            workers=1 if direct else 2, direct_tx=direct)
    return EdgeLab(lab, cust, edge, inet, dp, e, c0, i0)


@contextlib.contextmanager
def running(tag: str, xdp_mode: str = "native", design: str = "veth") -> Iterator[EdgeLab]:
    """:func:`build` in a fresh lab; the data path closed and the namespaces removed after."""
    lab = netns.Lab(tag)
    try:
        e = build(lab, xdp_mode, design)
        yield e
        with e.edge.enter():
            e.edge_dp.close()
        e.dp.close()
    finally:
        lab.close()


def child_sa(tunnel: str, spi_in: int, spi_out: int, encr: str, key_in: bytes, key_out: bytes,
             salt_in: bytes = b"", salt_out: bytes = b"", integ: str | None = None,
             ikey_in: bytes = b"", ikey_out: bytes = b"", encap: tuple[int, int] | None = None,
             replay_window: int = 1024) -> ChildSaParams:
    return ChildSaParams(
        tunnel_name=tunnel, tunnel_id=tunnel, account_id="acct", ike_sa="test",
        spi_in=spi_in, spi_out=spi_out, encr=encr, encr_key_bits=len(key_in) * 8, integ=integ,
        local_addr=EDGE_EP, remote_addr=ROUTER,
        encap_local_port=encap[0] if encap else None,
        encap_remote_port=encap[1] if encap else None, replay_window=replay_window,
        enc_key_in=key_in, enc_key_out=key_out, salt_in=salt_in, salt_out=salt_out,
        integ_key_in=ikey_in, integ_key_out=ikey_out)

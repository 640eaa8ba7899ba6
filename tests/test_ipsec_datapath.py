"""The IPsec data path end to end in network namespaces with real veth, XDP and AF_XDP.

A customer-router namespace sends ESP (raw protocol 50 and UDP 4500) built by an independent
implementation (tests/esp_support.py on Python `cryptography`); the Internet namespace must
receive the exact inner packet (TTL - 1, checksum right). The other way, a packet to the customer
prefix must come out as ESP that the same independent code decrypts to the original bytes (with
TTL - 1). Bad input is counted under its reason; IKE reaches a UDP socket in the edge namespace
untouched; a rekey while traffic flows loses nothing sent under the new SA.
"""
from __future__ import annotations

import ipaddress
import random
import socket
import struct
import threading
import time

import ipsec_lab as L
import pytest
from esp_support import SUITES, RefSa, csum, ipv4, outer_ipv4, ref_decrypt, ref_encrypt

from pipeline import ipsec
from pipeline.esp import EspError

pytestmark = pytest.mark.netns

SUITE = {s[0]: s for s in SUITES}
TESTED = ["gcm128", "gcm256", "cbc128-sha256", "cbc256-sha1", "null-sha256"]
_idx = iter(range(10, 60000))


@pytest.fixture(scope="module", params=["direct", "veth"])
def el(request):
    with L.running("ipsec", design=request.param) as e:
        with e.edge.enter():
            e.edge_dp.route(L.CUST_PREFIX, 0)   # re-pointed per test by _tunnel()
        yield e


class Tun:
    """One tunnel with a static SA pair and the reference's view of both directions."""

    def __init__(self, el: L.EdgeLab, suite: str, *, encap: tuple[int, int] | None = None,
                 replay: bool = False, spi_base: int | None = None) -> None:
        _name, enc, klen, integ, alen = SUITE[suite]
        rnd = random.Random(suite)
        self.el = el
        self.index = next(_idx)
        self.name = f"t{self.index}"
        self.enc, self.integ = enc, integ
        base = spi_base or (self.index << 8)
        self.spi_in, self.spi_out = base | 1, base | 2
        k_in, k_out = rnd.randbytes(klen), rnd.randbytes(klen)
        s_in = rnd.randbytes(4) if enc == "aes-gcm-16" else b""
        s_out = rnd.randbytes(4) if enc == "aes-gcm-16" else b""
        a_in, a_out = rnd.randbytes(alen), rnd.randbytes(alen)
        self.ref_in = RefSa(self.spi_in, enc, k_in, s_in, integ, a_in)
        self.ref_out = RefSa(self.spi_out, enc, k_out, s_out, integ, a_out)
        el.dp.add_tunnel(self.name, ipsec.TunnelInfo(self.name, self.index, replay_protection=replay,
                                                     allow_null=enc == "null"))
        self.sa = L.child_sa(self.name, self.spi_in, self.spi_out, enc, k_in, k_out, s_in, s_out,
                             integ if integ != "none" else None, a_in, a_out, encap)
        el.dp.install(self.sa)
        el.edge_dp.route(L.CUST_PREFIX, self.index)
        el.edge_dp.route(L.CUST6_PREFIX, self.index)
        self.encap = encap
        self.seq = 0

    def esp_from_router(self, inner: bytes, seq: int | None = None, udp: bool | None = None,
                        ref: RefSa | None = None) -> bytes:
        if seq is None:
            self.seq += 1
            seq = self.seq
        ref = ref or self.ref_in
        iv = random.randbytes(ref.iv_len)
        esp = ref_encrypt(ref, inner, seq, iv)
        use_udp = self.encap is not None if udp is None else udp
        return outer_ipv4(esp, udp=(4500, 4500) if use_udp else None, src=L.ROUTER,
                          dst=L.EDGE_EP)

    def delete(self) -> None:
        self.el.dp.delete(self.spi_in)


def inner_udp(src: str, dst: str, tag: bytes, ttl: int = 64, size: int = 0) -> bytes:
    payload = tag + bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    return ipv4(udp, src, dst, proto=17, ttl=ttl, ident=0x4242)


def with_ttl(pkt: bytes, ttl: int) -> bytes:
    h = bytearray(pkt[:20])
    h[8] = ttl
    h[10:12] = b"\0\0"
    h[10:12] = struct.pack("!H", csum(bytes(h)))
    return bytes(h) + pkt[20:]


def paths(el: L.EdgeLab) -> tuple[int, int]:
    """(frames the workers sent straight out of an egress device, frames through the veth)."""
    ws = el.edge_dp.stats()["workers"]
    return sum(w["tx_direct"] for w in ws), sum(w["tx_slow"] for w in ws)


def path_delta(el: L.EdgeLab, before: tuple[int, int], n: int) -> tuple[int, int]:
    """What (direct, slow) must have grown by after n frames: the design decides the path."""
    direct = el.edge_dp.route_watch is not None
    return before[0] + (n if direct else 0), before[1] + (0 if direct else n)


def tagged(tag: bytes):
    return lambda f: f[12:14] == b"\x08\x00" and tag in f


def esp_to_router(spi: int):
    def match(f: bytes) -> bool:
        if f[12:14] != b"\x08\x00":
            return False
        ip = f[14:]
        if ip[9] == 50:
            return ip[20:24] == struct.pack("!I", spi)
        return ip[9] == 17 and ip[28:32] == struct.pack("!I", spi)
    return match


def recv_esp(el: L.EdgeLab, t: Tun, timeout: float = 2.0) -> tuple[bytes, bytes]:
    """(outer IP header + UDP if any, ESP) of the next ESP frame for t's outbound SPI at c0."""
    f = el.c0.recv(timeout, match=esp_to_router(t.spi_out))
    assert f is not None, "no ESP frame reached the customer router"
    assert f[:6] == L.mac(L.MAC_C0) and f[6:12] == L.mac(L.MAC_CUST0)
    ip = f[14:]
    assert csum(ip[:20]) == 0, "outer IPv4 checksum"
    assert ip[8] == 64, "outer TTL is the tunnel's (not decremented by the forwarder)"
    assert ip[12:16] == ipaddress.IPv4Address(L.EDGE_EP).packed
    assert ip[16:20] == ipaddress.IPv4Address(L.ROUTER).packed
    total = struct.unpack("!H", ip[2:4])[0]
    ip = ip[:total]
    hl = 28 if ip[9] == 17 else 20
    return ip[:hl], ip[hl:]


@pytest.mark.parametrize("udp", [False, True], ids=["esp", "esp-in-udp"])
@pytest.mark.parametrize("suite", TESTED)
def test_decrypt_and_forward_exact_inner(el, suite, udp):
    t = Tun(el, suite, encap=(4500, 4500) if udp else None)
    try:
        el.i0.drain()
        before = paths(el)
        sent = []
        for size in (0, 100, 1300):
            tag = f"dec-{suite}-{udp}-{size}".encode()
            inner = inner_udp("10.10.0.5", L.INET_HOST, tag, size=size)
            el.to_edge_from_customer(t.esp_from_router(inner))
            f = el.i0.recv(2.0, match=tagged(tag))
            assert f is not None, f"inner packet of {size} bytes did not reach the Internet side"
            assert f[:6] == L.mac(L.MAC_I0) and f[6:12] == L.mac(L.MAC_INET0)
            assert f[14:] == with_ttl(inner, 63)
            sent.append(len(inner))
        assert paths(el) == path_delta(el, before, 3)
        st = el.dp.stats()["tunnels"][t.name]
        assert st["in"]["packets"] == 3
        assert st["in"]["bytes"] == sum(sent)
        assert st["in"]["drops"] == {}
    finally:
        t.delete()


@pytest.mark.parametrize("udp", [False, True], ids=["esp", "esp-in-udp"])
@pytest.mark.parametrize("suite", TESTED)
def test_encrypt_and_forward_decrypts_to_original(el, suite, udp):
    t = Tun(el, suite, encap=(4500, 4500) if udp else None)
    try:
        el.c0.drain()
        before = paths(el)
        for n, size in enumerate((0, 100, 1300), 1):
            inner = inner_udp(L.INET_HOST, "10.10.0.9", f"enc-{suite}-{size}".encode(), size=size)
            el.to_edge_from_internet(inner)
            hdr, esp = recv_esp(el, t)
            assert hdr[9] == (17 if udp else 50)
            if udp:
                assert struct.unpack("!HHHH", hdr[20:28]) == (4500, 4500, 8 + len(esp), 0)
            nh, plain, seq = ref_decrypt(t.ref_out, esp)
            assert (nh, seq) == (4, n)
            assert plain == with_ttl(inner, 63)
        assert paths(el) == path_delta(el, before, 3)
        st = el.dp.stats()["tunnels"][t.name]
        assert st["out"]["packets"] == 3
    finally:
        t.delete()


def test_null_cipher_needs_opt_in(el):
    name = "nonull"
    el.dp.add_tunnel(name, ipsec.TunnelInfo(name, next(_idx), allow_null=False))
    sa = L.child_sa(name, 0x7777_0001, 0x7777_0002, "null", b"", b"", integ="hmac-sha2-256-128",
                    ikey_in=b"k" * 32, ikey_out=b"k" * 32)
    with pytest.raises(EspError, match="NULL"):
        el.dp.install(sa)
    assert 0x7777_0001 not in el.dp.installed()


def _counts(el: L.EdgeLab) -> dict:
    s = el.edge_dp.stats()
    return {"no_sa": dict(s["no_sa"]), "steer": dict(s["steering"])}


def test_bad_input_counted_by_reason(el):
    t = Tun(el, "gcm128", replay=True)
    try:
        el.i0.drain()
        before = _counts(el)
        inner = inner_udp("10.10.0.5", L.INET_HOST, b"bad-input")
        good = t.esp_from_router(inner, seq=5)
        ip = bytearray(good)
        # bad ICV: flip the last byte of the tag, fix nothing else
        bad_icv = bytes(ip[:-1]) + bytes([ip[-1] ^ 1])
        # truncated: ESP header and 3 bytes of IV only (outer length consistent)
        trunc = outer_ipv4(good[20:31], src=L.ROUTER, dst=L.EDGE_EP)
        # 3 bytes on UDP 4500: neither marker, keepalive nor ESP (RFC 3948 2.2): not_esp
        runt = ipv4(struct.pack("!HHHH", 4500, 4500, 11, 0) + b"\x01\x02\x03", L.ROUTER,
                    L.EDGE_EP, proto=17, ttl=64, ident=0)
        # unknown SPI
        unknown = outer_ipv4(struct.pack("!II", 0x0BAD0BAD, 1) + bytes(40), src=L.ROUTER,
                             dst=L.EDGE_EP)
        for pkt in (bad_icv, trunc, runt, unknown, good, good):  # the second `good` is a replay
            el.to_edge_from_customer(pkt)
        assert el.i0.recv(2.0, match=tagged(b"bad-input")) is not None
        assert el.i0.recv(0.5, match=tagged(b"bad-input")) is None   # replay not forwarded
        # keepalive (RFC 3948 2.3): one 0xFF byte on UDP 4500
        keepalive = ipv4(struct.pack("!HHHH", 4500, 4500, 9, 0) + b"\xff", L.ROUTER, L.EDGE_EP,
                         proto=17, ttl=64, ident=0)
        el.to_edge_from_customer(keepalive)
        time.sleep(0.3)
        after = _counts(el)
        sa = el.dp.stats()["tunnels"][t.name]
        assert sa["in"]["packets"] == 1
        # the truncated packet names a known SPI: counted against that SA
        assert sa["in"]["drops"] == {"icv_mismatch": 1, "replay": 1, "truncated": 1}
        assert after["no_sa"]["unknown_spi"] - before["no_sa"]["unknown_spi"] == 1
        assert after["steer"]["keepalive"] - before["steer"]["keepalive"] == 1
        assert after["no_sa"]["not_esp"] - before["no_sa"]["not_esp"] == 1
        assert after["steer"]["decrypt"] - before["steer"]["decrypt"] == 6
    finally:
        t.delete()


def test_ike_reaches_udp_sockets_untouched(el):
    """UDP 500 and UDP 4500 with the zero non-ESP marker go to the kernel, byte for byte."""
    socks = []
    with el.edge.enter():
        for port in (500, 4500):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((L.EDGE_EP, port))
            s.settimeout(2.0)
            socks.append(s)
    try:
        before = _counts(el)["steer"]["ike_pass"]
        ike = bytes(range(8)) * 8 + b"IKEv2-ish"
        el.to_edge_from_customer(ipv4(struct.pack("!HHHH", 500, 500, 8 + len(ike), 0) + ike,
                                      L.ROUTER, L.EDGE_EP, proto=17, ttl=64, ident=1))
        marked = b"\0\0\0\0" + ike
        el.to_edge_from_customer(ipv4(struct.pack("!HHHH", 4500, 4500, 8 + len(marked), 0)
                                      + marked, L.ROUTER, L.EDGE_EP, proto=17, ttl=64, ident=2))
        assert socks[0].recvfrom(2048) == (ike, (L.ROUTER, 500))
        assert socks[1].recvfrom(2048) == (marked, (L.ROUTER, 4500))
        assert _counts(el)["steer"]["ike_pass"] - before == 2
    finally:
        for s in socks:
            s.close()


def test_natt_outbound_follows_last_authenticated_source_port(el):
    t = Tun(el, "gcm128", encap=(4500, 4500))
    try:
        # the router's NAT maps it to source port 62000: ESP-in-UDP from there
        inner = inner_udp("10.10.0.5", L.INET_HOST, b"natt-in")
        esp = ref_encrypt(t.ref_in, inner, 1, random.randbytes(8))
        el.to_edge_from_customer(outer_ipv4(esp, udp=(62000, 4500), src=L.ROUTER, dst=L.EDGE_EP))
        assert el.i0.recv(2.0, match=tagged(b"natt-in")) is not None
        assert el.edge_dp.workers[0].natt_peer(t.index) == (L.ROUTER, 62000)
        el.c0.drain()
        enc = el.edge_dp.workers[-1]   # the worker that receives on the Internet side
        rewrites = enc.stats().natt_rewrites
        out = inner_udp(L.INET_HOST, "10.10.0.5", b"natt-out")
        el.to_edge_from_internet(out)
        hdr, esp = recv_esp(el, t)
        assert struct.unpack("!HH", hdr[20:24]) == (4500, 62000)
        assert ref_decrypt(t.ref_out, esp)[1] == with_ttl(out, 63)
        assert enc.stats().natt_rewrites == rewrites + 1
        if len(el.edge_dp.workers) == 2:
            # learned by the worker that decrypts (customer side), used by the one that encrypts
            assert el.edge_dp.workers[0].stats().natt_rewrites == 0
        # a forged packet from another port (bad ICV) does not move the peer
        bad = bytearray(outer_ipv4(ref_encrypt(t.ref_in, inner, 2, bytes(8)),
                                   udp=(1234, 4500), src=L.ROUTER, dst=L.EDGE_EP))
        bad[-1] ^= 0xFF
        el.to_edge_from_customer(bytes(bad))
        time.sleep(0.3)
        assert el.edge_dp.workers[0].natt_peer(t.index) == (L.ROUTER, 62000)
        # the tunnel's last pair deleted: the learned peer is forgotten
        t.delete()
        assert el.edge_dp.workers[0].natt_peer(t.index) is None
    finally:
        if t.spi_in in el.dp.installed():
            t.delete()


def test_mss_clamped_before_encryption(el):
    t = Tun(el, "gcm128")
    try:
        el.c0.drain()
        # TCP SYN with MSS 1460 (after a NOP: the option at an odd offset)
        opts = b"\x01\x02\x04\x05\xb4\x01\x01\x01"
        tcp = struct.pack("!HHIIBBHHH", 443, 50000, 1, 0, (5 + 2) << 4, 0x02, 65535, 0, 0) + opts
        src, dst = ipaddress.IPv4Address(L.INET_HOST).packed, ipaddress.IPv4Address("10.10.0.7").packed
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
        inner = ipv4(tcp, L.INET_HOST, "10.10.0.7", proto=6, ttl=64, ident=7)
        el.to_edge_from_internet(inner)
        _, esp = recv_esp(el, t)
        plain = ref_decrypt(t.ref_out, esp)[1]
        got_tcp = plain[20:]
        assert got_tcp[20:28] == b"\x01\x02\x04\x05\x50\x01\x01\x01"   # 1360
        assert csum(pseudo + got_tcp) == 0                              # independent check
        assert plain[:20] == with_ttl(inner, 63)[:20]
    finally:
        t.delete()


def test_rekey_while_traffic_flows(el):
    """Replace the SA pair while the customer keeps sending: nothing sent under the new SA is
    lost, the old inbound SA works until deleted, outbound switches to the new SPI at once."""
    t = Tun(el, "gcm256", replay=True)
    try:
        el.i0.drain()
        stop = threading.Event()
        sent_old: list[bytes] = []

        def old_sender() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                tag = b"old-%06d" % n
                el.to_edge_from_customer(t.esp_from_router(inner_udp("10.10.0.5", L.INET_HOST,
                                                                     tag)))
                sent_old.append(tag)
                time.sleep(0.002)

        th = threading.Thread(target=old_sender)
        th.start()
        time.sleep(0.1)
        rnd = random.Random(99)
        new_in = RefSa(t.spi_in + 0x100000, "aes-gcm-16", rnd.randbytes(32), rnd.randbytes(4))
        new_out = RefSa(t.spi_out + 0x100000, "aes-gcm-16", rnd.randbytes(32), rnd.randbytes(4))
        new_sa = L.child_sa(t.name, new_in.spi, new_out.spi, "aes-gcm-16", new_in.enc_key,
                            new_out.enc_key, new_in.salt, new_out.salt)
        el.dp.replace(t.spi_in, new_sa)
        # new SA traffic, interleaved with old-SA traffic still flowing
        new_tags = []
        for n in range(1, 201):
            tag = b"new-%06d" % n
            pkt = outer_ipv4(ref_encrypt(new_in, inner_udp("10.10.0.5", L.INET_HOST, tag), n,
                                         random.randbytes(8)), src=L.ROUTER, dst=L.EDGE_EP)
            el.to_edge_from_customer(pkt)
            new_tags.append(tag)
            if n % 20 == 0:
                time.sleep(0.005)
        time.sleep(0.1)
        stop.set()
        th.join()
        got_tags = {f[-10:] for f in el.i0.recv_all(100000, 3.0,
                                                     match=lambda f: f[-10:-6] in (b"new-",
                                                                                   b"old-"))}
        assert set(new_tags) <= got_tags, f"lost {len(set(new_tags) - got_tags)} new-SA packets"
        # the old inbound SA is still installed and accepted what was sent under it
        st = el.dp.stats()["tunnels"][t.name]
        old_in = [s for s in st["sas"] if s["spi"] == t.spi_in]
        assert old_in and old_in[0]["packets"] == len(sent_old)
        # outbound uses the new SA at once
        el.c0.drain()
        el.to_edge_from_internet(inner_udp(L.INET_HOST, "10.10.0.5", b"after-rekey"))
        f = el.c0.recv(2.0, match=esp_to_router(new_out.spi))
        assert f is not None
        assert ref_decrypt(new_out, f[34:])[2] == 1
        # deleting the old pair: old inbound SA gone, tunnel totals keep its counts
        el.dp.delete(t.spi_in)
        el.to_edge_from_customer(t.esp_from_router(inner_udp("10.10.0.5", L.INET_HOST,
                                                             b"old-after-del")))
        assert el.i0.recv(0.5, match=tagged(b"old-after-del")) is None
        st = el.dp.stats()["tunnels"][t.name]
        assert st["in"]["packets"] == len(sent_old) + len(new_tags)
        t.spi_in = new_in.spi
    finally:
        t.delete()


def inner_udp6(src: str, dst: str, tag: bytes, hop: int = 64) -> bytes:
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(tag), 0) + tag
    return (struct.pack("!IHBB", 0x60000000, len(udp), 17, hop)
            + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + udp)


def with_hop(pkt: bytes, hop: int) -> bytes:
    return pkt[:7] + bytes([hop]) + pkt[8:]


def test_ipv6_inner_both_directions(el):
    t = Tun(el, "gcm128")
    try:
        el.i0.drain()
        inner = inner_udp6("2001:db8:10::5", L.INET6_HOST, b"v6-decrypt")
        el.to_edge_from_customer(t.esp_from_router(inner))
        f = el.i0.recv(2.0, match=lambda f: f[12:14] == b"\x86\xdd" and b"v6-decrypt" in f)
        assert f is not None
        assert f[:6] == L.mac(L.MAC_I0) and f[14:] == with_hop(inner, 63)
        el.c0.drain()
        out = inner_udp6(L.INET6_HOST, "2001:db8:10::5", b"v6-encrypt")
        el.i0.send(L.eth(L.MAC_INET0, L.MAC_I0, out, 0x86DD))
        _, esp = recv_esp(el, t)
        nh, plain, seq = ref_decrypt(t.ref_out, esp)
        assert (nh, plain, seq) == (41, with_hop(out, 63), 1)
    finally:
        t.delete()

"""Cross-check against an independent implementation (Python `cryptography` + hashlib, see
esp_support.py): for every suite and every inner payload size 0..1500, our encrypt is opened by the
reference and the reference's packets are opened by our decrypt, byte for byte."""
from __future__ import annotations

import random
import struct

import pytest
from esp_support import SUITES, csum, ipv4, outer_ipv4, ref_decrypt, ref_encrypt, suite_sas

from pipeline import esp

SIZES = list(range(1501))
BATCH = 256


def inner_packets(seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    return [ipv4(rnd.randbytes(n), proto=rnd.choice([6, 17, 1])) for n in SIZES]


def chunks(items: list, n: int = BATCH):
    for i in range(0, len(items), n):
        yield i, items[i:i + n]


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s[0])
def test_our_encrypt_opens_with_reference(suite):
    out_sa, _, ref = suite_sas(suite, node_id=0x0A0B)
    pkts = inner_packets(1)
    with esp.EspContext() as ctx, ctx.worker() as w:
        ctx.add_sa(out_sa)
        b = esp.PacketBatch(BATCH, frame_size=2048, headroom=64)
        ivs = set()
        for base, group in chunks(pkts):
            b.fill(group, tunnel=5)
            assert w.encrypt(b) == len(group)
            for i, inner in enumerate(group):
                wire = b.get(i)
                assert len(wire) == b.pkts[i].len
                # outer IPv4: ours, checksum valid, addresses from the SA, protocol ESP
                assert wire[0] == 0x45 and csum(wire[:20]) == 0
                assert struct.unpack("!H", wire[2:4])[0] == len(wire)
                assert wire[9] == 50 and wire[12:16] == bytes([203, 0, 113, 1])
                assert wire[16:20] == bytes([203, 0, 113, 2]) and wire[8] == 64
                nh, payload, seq = ref_decrypt(ref, wire[20:])
                assert (nh, payload, seq) == (4, inner, base + i + 1)
                if ref.iv_len:
                    iv = wire[28:28 + ref.iv_len]
                    ivs.add(iv)
                    if suite[1] == "aes-gcm-16":  # node id || 48-bit counter, counter from 0
                        assert iv == struct.pack("!H", 0x0A0B) + (base + i).to_bytes(6, "big")
                # padding: to 4 bytes (GCM, NULL) or the AES block (CBC), and no more
                esp_len = len(wire) - 20 - 8 - ref.iv_len - ref.icv_len
                align = 16 if suite[1] == "aes-cbc" else 4
                assert esp_len % align == 0 and esp_len - len(inner) - 2 < align
        if ref.iv_len:
            assert len(ivs) == len(pkts)
        st = ctx.sa_stats("out", 5)
        assert (st.packets, st.seq, st.bytes) == (len(pkts), len(pkts), sum(map(len, pkts)))


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s[0])
def test_reference_packets_open_with_our_decrypt(suite):
    _, in_sa, ref = suite_sas(suite)
    rnd = random.Random(2)
    pkts = inner_packets(3)
    wires = [outer_ipv4(ref_encrypt(ref, p, i + 1, rnd.randbytes(ref.iv_len)))
             for i, p in enumerate(pkts)]
    with esp.EspContext() as ctx, ctx.worker() as w:
        ctx.add_sa(in_sa)
        b = esp.PacketBatch(BATCH, frame_size=2048, headroom=0)
        for base, group in chunks(wires):
            b.fill(group)
            assert w.decrypt(b) == len(group), b.verdicts()
            for i in range(len(group)):
                assert b.get(i) == pkts[base + i]
                assert (b.spi(i), b.tunnel(i)) == (0x1000, 5)
                # headroom/tailroom account for every byte of the frame
                pk = b.pkts[i]
                assert pk.headroom == b.offset(i) - i * 2048
                assert pk.headroom + pk.len + pk.tailroom == 2048
        st = ctx.sa_stats("in", 0x1000)
        assert (st.packets, st.seq, st.bytes) == (len(pkts), len(pkts), sum(map(len, pkts)))
        assert sum(st.drops.values()) == 0


def test_gcm128_1446_inner_is_exactly_1500_on_the_wire():
    out_sa, _, ref = suite_sas(SUITES[0])
    inner = ipv4(bytes(1426))
    assert len(inner) == 1446
    with esp.EspContext() as ctx, ctx.worker() as w:
        ctx.add_sa(out_sa)
        b = esp.PacketBatch(1)
        b.set(0, inner, tunnel=5)
        assert w.encrypt(b) == 1
        wire = b.get(0)
        # 20 outer IP + 8 ESP header + 8 IV + 1446 + 0 padding + 2 + 16 ICV
        assert len(wire) == 1500
        assert ref_decrypt(ref, wire[20:])[1] == inner


@pytest.mark.parametrize("suite", [SUITES[0], SUITES[2]], ids=lambda s: s[0])
def test_udp_encapsulation_both_ways(suite):
    out_sa, in_sa, ref = suite_sas(suite, encap_sport=4500, encap_dport=4501)
    inner = ipv4(b"hello over NAT-T")
    with esp.EspContext() as ctx, ctx.worker() as w:
        ctx.add_sa(out_sa)
        ctx.add_sa(in_sa)
        b = esp.PacketBatch(1)
        b.set(0, inner, tunnel=5)
        assert w.encrypt(b) == 1
        wire = b.get(0)
        assert wire[9] == 17 and csum(wire[:20]) == 0
        sport, dport, ulen, ucsum = struct.unpack("!HHHH", wire[20:28])
        assert (sport, dport, ulen, ucsum) == (4500, 4501, len(wire) - 20, 0)  # RFC 3948 2.1
        assert ref_decrypt(ref, wire[28:])[1] == inner
        b.set(0, wire)
        assert w.decrypt(b) == 1 and b.get(0) == inner


def test_caller_owned_buffer_like_a_umem():
    """An anonymous mmap stands in for the AF_XDP UMEM: frames are described in place, with the
    headroom each one happens to have, and results are read back from the same memory."""
    import mmap

    out_sa, in_sa, ref = suite_sas(SUITES[0])
    umem = mmap.mmap(-1, 8 * 2048)
    inner = [ipv4(bytes([k]) * (10 + 100 * k)) for k in range(8)]
    with esp.EspContext() as ctx, ctx.worker() as w:
        ctx.add_sa(out_sa)
        ctx.add_sa(in_sa)
        b = esp.PacketBatch(8, frame_size=2048, buffer=umem)
        for k, pkt in enumerate(inner):
            off = 40 + 16 * k
            umem[k * 2048 + off:k * 2048 + off + len(pkt)] = pkt
            b.place(k, off, len(pkt), tunnel=5)
        assert w.encrypt(b) == 8
        for k in range(8):
            off = b.offset(k)
            assert off == k * 2048 + 40 + 16 * k - 36  # outer IPv4 + ESP header + IV in front
            assert umem[off:off + b.pkts[k].len] == b.get(k)
            assert ref_decrypt(ref, b.get(k)[20:])[1] == inner[k]
        assert w.decrypt(b) == 8  # in place again: the encrypted frames where they are
        assert [b.get(k) for k in range(8)] == inner
        assert [b.offset(k) - k * 2048 for k in range(8)] == [40 + 16 * k for k in range(8)]
        b.release()
        with pytest.raises(esp.EspError, match="released"):
            w.decrypt(b)
    umem.close()

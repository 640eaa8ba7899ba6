"""Analytics over the IPsec data path with real ESP traffic in namespaces.

The lab and the independent ESP implementation are the IPsec data path tests' own
(tests/ipsec_lab.py, tests/esp_support.py, test_ipsec_datapath.Tun); the collector reads
IpsecDataPath.stats() through EspSource. Both directions and a bad ICV must show exactly.
"""
from __future__ import annotations

import ipsec_lab as L
import pytest
from test_ipsec_datapath import Tun, el, inner_udp, recv_esp, tagged  # noqa: F401 - el: fixture

from pipeline.analytics.collector import EGRESS, INGRESS, Collector, EspSource

pytestmark = pytest.mark.netns


def test_esp_rates_and_drops_both_directions(el):  # noqa: F811
    t = Tun(el, "gcm128")
    try:
        coll = Collector([EspSource(el.dp.stats)])
        assert coll.tick() is None
        el.i0.drain()
        el.c0.drain()
        out_sizes, in_sizes = [], []
        for n in range(6):                         # from the customer: decrypted, egress
            inner = inner_udp("10.10.0.5", L.INET_HOST, f"an-dec-{n}".encode(), size=50 * n)
            el.to_edge_from_customer(t.esp_from_router(inner))
            assert el.i0.recv(2.0, match=tagged(f"an-dec-{n}".encode())) is not None
            out_sizes.append(len(inner))
        for n in range(4):                         # to the customer: encrypted, ingress
            inner = inner_udp(L.INET_HOST, "10.10.0.9", f"an-enc-{n}".encode(), size=100 * n)
            el.to_edge_from_internet(inner)
            recv_esp(el, t)
            in_sizes.append(len(inner))
        bad = bytearray(t.esp_from_router(inner_udp("10.10.0.5", L.INET_HOST, b"an-bad")))
        bad[-1] ^= 1                               # ICV no longer matches
        for _ in range(2):
            el.to_edge_from_customer(bytes(bad))
        assert el.i0.recv(0.5, match=tagged(b"an-bad")) is None
        tick = coll.tick()
        assert tick.traffic[(t.name, EGRESS)] == (6, sum(out_sizes))
        assert tick.traffic[(t.name, INGRESS)] == (4, sum(in_sizes))
        assert tick.drops == {(t.name, "esp_icv_mismatch"): 2}
        pps, bps = tick.rates()[(t.name, EGRESS)]
        assert round(pps * tick.interval) == 6
        assert round(bps * tick.interval) == 8 * sum(out_sizes)
    finally:
        t.delete()

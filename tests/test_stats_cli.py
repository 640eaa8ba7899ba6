"""`xtransit stats` rendering: IPsec rows come from the ESP module's counters (the daemon's
status file), GRE rows from the XDP maps."""
from __future__ import annotations

from pipeline.commands.stats import render
from pipeline.config import loads
from pipeline.xdp import maps

CFG = """
[node]
id = 1
name = "n"
ipsec_domain = "example.net"
tunnel_endpoints = ["192.0.2.1"]
[[node.interfaces]]
name = "e0"
role = "both"
[tunnels.gre.g]
id = "g1"
index = 1
customer_endpoint = "198.51.100.1"
edge_endpoint = "192.0.2.1"
interface_address = "10.0.0.0/31"
[tunnels.ipsec.s]
id = "s1"
account_id = "a1"
index = 2
edge_endpoint = "192.0.2.1"
interface_address = "10.0.0.2/31"
psk_env = "T_PSK"
"""


def test_ipsec_rows_from_the_esp_module_gre_rows_from_the_maps():
    cfg = loads(CFG, env={"T_PSK": "x" * 32})
    counters = maps.Counters(
        tunnels={1: maps.TunnelCounters(3, 300, 4, 400), 2: maps.TunnelCounters()},
        tunnel_reasons={1: {"too_big": 1}},
        reasons={"decap_forwarded": (3, 300), "esp_steered": (12, 1200)})
    esp = {"tunnels": {"s": {"in": {"packets": 5, "bytes": 500, "drops": {"auth_failed": 2}},
                             "out": {"packets": 7, "bytes": 700, "drops": {}}}}}
    lines = render(cfg, counters, esp)
    assert [line.split() for line in lines[1:3]] == [
        ["g", "1", "3", "300", "4", "400", "too_big=1"],
        ["s", "2", "5", "500", "7", "700", "esp_in_auth_failed=2"]]
    assert lines[4:] == ["REASON  PACKETS  BYTES (node-wide)", "decap_forwarded  3  300",
                         "esp_steered  12  1200",
                         ("IPsec rows: decrypted (DECAP) and encrypted (ENCAP) by the ESP "
                          "module (daemon status file)")]
    # without a daemon status file the IPsec row shows the XDP counters (zero)
    assert render(cfg, counters)[2].split() == ["s", "2", "0", "0", "0", "0", "-"]


def test_worker_rows_show_where_frames_went():
    cfg = loads(CFG, env={"T_PSK": "x" * 32})
    esp = {"tunnels": {}, "workers": [
        {"rx_packets": 10, "decrypt_ok": 6, "encrypt_ok": 3, "tx_direct": 7, "tx_slow": 2,
         "slow_ttl": 1, "slow_mtu": 1, "nh_no_route": 0, "nh_lookups": 4, "k_rx_ring_full": 5},
        {"rx_packets": 1}]}
    lines = render(cfg, maps.Counters(tunnels={}, tunnel_reasons={}, reasons={}), esp)
    assert [line.split() for line in lines[-3:]] == [
        ["WORKER", "RX", "DECRYPTED", "ENCRYPTED", "DIRECT", "VIA", "VETH", "TTL<=1", "TOO",
         "BIG", "NO", "ROUTE", "FIB", "LOOKUPS", "RX", "RING", "FULL"],
        ["0", "10", "6", "3", "7", "2", "1", "1", "0", "4", "5"],
        ["1", "1", "0", "0", "0", "0", "0", "0", "0", "0", "0"]]

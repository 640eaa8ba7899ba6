"""IPsec data path rates: XDP steering -> AF_XDP worker -> native ESP -> out, in one run.

Topology and harness: bench/rates.py (gen --veth-- dut --veth-- sink, load from XDP live frames,
pipeline/loadgen.py, counted at the far end by frame length). The generator runs on CPU 0 (which
also carries the DUT ingress veth's NAPI: steering and the AF_XDP copy); the worker thread is
pinned to CPU 1. Cases, per size (64 and 1400-byte inner IPv4/UDP packets):

  xdp_drop/esp/S          XDP_DROP of the ESP frames at d0: what reaching XDP costs (ceiling)
  xsk_fwd/S               AF_XDP forward-only, no crypto: steer -> worker -> next hop from the
                          kernel FIB (cached) -> TX straight out of d1 (the path's own ceiling)
  xsk_fwd_veth/S          the same with direct_tx=False: TX on the internal veth ->
                          bpf_fib_lookup + redirect -> d1 (the earlier design)
  decrypt_fwd/S           ESP (raw, protocol 50) pre-encrypted with GCM-128 by the independent
                          implementation -> decrypt -> inner packet forwarded to the sink
  decrypt_fwd_veth/S      decrypt_fwd through the internal veth (direct_tx=False)
  decrypt_fwd_udp/S       the same as ESP-in-UDP (RFC 3948)
  encrypt_fwd/S           plain packets to the customer prefix -> GCM-128 ESP to the router

and, on one core in the same run, the native module's batch decrypt/encrypt rate and OpenSSL's raw
AES-GCM ceiling (bench/bench_esp.py; crypto only, no packet I/O).

Anti-replay is off on the benchmark SA (the generator repeats the same pre-encrypted frame; the
configuration's default, `replay_protection = false`, is the same).

    .venv/bin/python -m bench.bench_ipsec_rate             # 5 interleaved rounds of 0.5 s
    .venv/bin/python -m bench.bench_ipsec_rate --smoke     # one short round, for CI
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import bench_esp, bench_ipsec_strongswan, rates
from pipeline import ipsec
from pipeline import loadgen as lg
from pipeline.sa import ChildSaParams

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from esp_support import RefSa, outer_ipv4, ref_encrypt  # the independent ESP (tests/)

EDGE_EP = "192.0.2.1"            # the DUT's tunnel endpoint (no address needed: XDP steers)
ROUTER = "192.0.2.2"             # the customer router: routed via the sink
CUSTOMER_HOST = "198.51.100.10"  # behind the router
CUSTOMER_PREFIX = "100.64.0.0/24"
CUSTOMER_DST = "100.64.0.10"
INTERNET_HOST = rates.BENCH_DST  # 198.18.0.1, routed to the sink
TUNNEL = 1
SPI_IN, SPI_OUT = 0x10000001, 0x20000001
KEY_IN, SALT_IN = bytes(range(16)), b"\x01\x02\x03\x04"
KEY_OUT, SALT_OUT = bytes(range(16, 32)), b"\x05\x06\x07\x08"
SIZES = (64, 1400)
GEN_CPU, WORKER_CPU = 0, 1


def esp_frame(size: int, udp: bool) -> lg.Frame:
    inner = rates.plain_udp(size, dst=INTERNET_HOST, src=CUSTOMER_HOST)
    esp = ref_encrypt(RefSa(SPI_IN, "aes-gcm-16", KEY_IN, SALT_IN), inner, 1,
                      random.Random(size).randbytes(8))
    outer = outer_ipv4(esp, udp=(4500, 4500) if udp else None, src=ROUTER, dst=EDGE_EP)
    return lg.Frame(lg.ethernet(rates.DUT_IN_MAC, rates.GEN_MAC, 0x0800, outer))


def plain_to_customer(size: int) -> lg.Frame:
    return rates.to_dut(rates.plain_udp(size, dst=CUSTOMER_DST))


def encrypted_len(size: int) -> int:
    """Frame length of a GCM-16 tunnel-mode ESP packet around an inner packet of `size` bytes:
    Ethernet, outer IPv4, SPI + sequence, 8-byte IV, payload + pad + 2 to a multiple of 4, ICV."""
    return 14 + 20 + 8 + 8 + (size + 2 + 3) // 4 * 4 + 16


def child_sa(udp: bool) -> ChildSaParams:
    return ChildSaParams(
        tunnel_name="bench", tunnel_id="bench", account_id="bench", ike_sa="bench",
        spi_in=SPI_IN, spi_out=SPI_OUT, encr="aes-gcm-16", encr_key_bits=128, integ=None,
        local_addr=EDGE_EP, remote_addr=ROUTER, encap_local_port=4500 if udp else None,
        encap_remote_port=4500 if udp else None, enc_key_in=KEY_IN, enc_key_out=KEY_OUT,
        salt_in=SALT_IN, salt_out=SALT_OUT)


@contextlib.contextmanager
def ipsec_plug(topo: rates.Topology, *, udp: bool = False, direct: bool = True,
               no_crypto: bool = False, tx_budget: int = 0):
    """Plug: the IPsec data path on the DUT (steering on d0, one worker pinned to WORKER_CPU)."""
    queues = tuple(range(os.cpu_count() or 1))   # rates.Topology: one queue per CPU
    dp = ipsec.IpsecDataPath({"bench": ipsec.TunnelInfo("bench", TUNNEL)}, node_id=1)
    edge = None
    try:
        steering = topo.compiled("esp_steering", ipsec.Steering)
        with topo.dut.enter():
            edge = ipsec.IpsecEdge(
                dp, [ipsec.RxDevice(topo.dut_in, queues)], [EDGE_EP],
                direct_tx=direct, egress=(topo.dut_out,),
                bench_no_crypto=no_crypto, worker_cpu=WORKER_CPU, steering=steering,
                tx_budget=tx_budget)
        dp.install(child_sa(udp))
        edge.route(CUSTOMER_PREFIX, TUNNEL)
        yield edge
    finally:
        if edge is not None:
            edge.close()
        dp.close()


def setup_routes(topo: rates.Topology) -> None:
    """The DUT's kernel FIB knows the router and the customer prefix via the sink (for the
    forwarder's bpf_fib_lookup); the static neighbour entry is there already."""
    topo.dut.add_route(f"{ROUTER}/32", gateway=rates.SINK_IP)
    topo.dut.add_route(CUSTOMER_PREFIX, gateway=rates.SINK_IP)


def cases(sizes: Sequence[int]) -> tuple[list[rates.Case], list[tuple[str, str]]]:
    out, ratios = [], []
    for s in sizes:
        esp, esp_udp, plain = esp_frame(s, False), esp_frame(s, True), plain_to_customer(s)
        out += [
            rates.drop_case(f"xdp_drop/esp/{s}", [esp]),
            rates.xdp_case(f"xsk_fwd/{s}", [plain],
                           lambda t: ipsec_plug(t, no_crypto=True), out_len=14 + s),
            rates.xdp_case(f"xsk_fwd_veth/{s}", [plain],
                           lambda t: ipsec_plug(t, no_crypto=True, direct=False), out_len=14 + s),
            rates.xdp_case(f"decrypt_fwd/{s}", [esp], lambda t: ipsec_plug(t), out_len=14 + s),
            rates.xdp_case(f"decrypt_fwd_veth/{s}", [esp],
                           lambda t: ipsec_plug(t, direct=False), out_len=14 + s),
            rates.xdp_case(f"decrypt_fwd_udp/{s}", [esp_udp],
                           lambda t: ipsec_plug(t, udp=True), out_len=14 + s),
            rates.xdp_case(f"encrypt_fwd/{s}", [plain], lambda t: ipsec_plug(t),
                           out_len=encrypted_len(s)),
        ]
        ratios += [(f"decrypt_fwd/{s}", f"xsk_fwd/{s}"),
                   (f"encrypt_fwd/{s}", f"xsk_fwd/{s}"),
                   (f"xsk_fwd/{s}", f"xsk_fwd_veth/{s}"),
                   (f"decrypt_fwd/{s}", f"decrypt_fwd_veth/{s}"),
                   (f"xsk_fwd/{s}", f"xdp_drop/esp/{s}")]
    return out, ratios


def crypto_only(sizes: Sequence[int], rounds: int, min_time: float) -> dict[str, float]:
    """Best-of-rounds pps on one core: our batch decrypt/encrypt and OpenSSL's raw GCM."""
    os.sched_setaffinity(0, {WORKER_CPU})
    best: dict[str, float] = {}
    try:
        made = {(s, op): bench_esp.make_case("gcm128", str(s), op)
                for s in sizes for op in ("decrypt", "encrypt")}
        for _ in range(rounds):
            for s in sizes:
                for op in ("decrypt", "encrypt"):
                    k = f"crypto_{op}/{s}"
                    best[k] = max(best.get(k, 0.0), bench_esp.time_ours(made[s, op], min_time))
                k = f"openssl_gcm/{s}"
                best[k] = max(best.get(k, 0.0), bench_esp.time_ceiling(str(s), min_time))
        for c in made.values():
            c.close()
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return best


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--smoke", action="store_true", help="one short round (CI)")
    ap.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    ap.add_argument("--json", type=Path, help="also write the summary here")
    ap.add_argument("--no-strongswan", action="store_true",
                    help="skip the strongSwan-to-strongSwan iperf3 baseline")
    a = ap.parse_args(argv)
    if a.smoke:
        a.rounds, a.seconds = 1, 0.2
    t0 = time.time()
    crypto = crypto_only(a.sizes, max(1, a.rounds // 2), 0.05 if a.smoke else 0.2)
    sw_runs: list[dict] = []
    with contextlib.ExitStack() as stack:
        sw = None if a.no_strongswan else stack.enter_context(
            bench_ipsec_strongswan.StrongswanTunnel())
        topo = stack.enter_context(rates.Topology())
        setup_routes(topo)
        cs, ratios = cases(a.sizes)
        bench = rates.Bench(topo, cs, cpus=[GEN_CPU], seconds=a.seconds, warmup=0.1)
        stack.callback(bench.close)
        log = lambda m: print(m, file=sys.stderr, flush=True)
        for r in range(a.rounds):
            # one round of every case, then (same round) the strongSwan baseline: a neighbour's
            # load hits both alike
            bench.run(1, log=log)
            if sw is not None:
                sw_runs.append(sw.iperf(1.0 if a.smoke else 2.0))
                log(f"round {r + 1}/{a.rounds} strongswan iperf3 "
                    f"{sw_runs[-1]['bits_per_second'] / 1e6:.1f} Mbit/s")
        print(bench.table(ratios))
        summary = bench.summary(ratios)
    print()
    for k, v in crypto.items():
        print(f"{k:<24} {v / 1e6:7.3f} Mpps (one core, no packet I/O)")
    for s in a.sizes:
        ceil = min(summary["cases"][f"xsk_fwd/{s}"]["mpps_best"] * 1e6,
                   crypto[f"crypto_decrypt/{s}"])
        dec = summary["cases"][f"decrypt_fwd/{s}"]["mpps_best"] * 1e6
        print(f"decrypt_fwd/{s} / min(xsk_fwd, crypto_decrypt): {dec / ceil:.3f}")
    summary["crypto_only_pps"] = {k: round(v) for k, v in crypto.items()}
    if sw_runs:
        best = max(sw_runs, key=lambda x: x["bits_per_second"])
        summary["strongswan"] = {"best": best,
                                 "rounds_mbps": [round(x["bits_per_second"] / 1e6, 1)
                                                 for x in sw_runs]}
        print(f"strongswan kernel-libipsec iperf3 TCP, best of {len(sw_runs)}: "
              f"{best['bits_per_second'] / 1e6:.1f} Mbit/s (rounds "
              f"{summary['strongswan']['rounds_mbps']})")
        for s in a.sizes:
            for case in (f"decrypt_fwd/{s}", f"decrypt_fwd_veth/{s}"):
                ours = summary["cases"][case]["mpps_best"] * 1e6 * s * 8
                print(f"{case}: {ours / 1e9:.2f} Gbit/s of inner packets = "
                      f"{ours / best['bits_per_second']:.1f}x strongSwan")
    summary["started"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0))
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

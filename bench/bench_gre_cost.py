"""Per-packet cost of the GRE data plane, BPF_PROG_TEST_RUN with repeat, against a baseline.

    .venv/bin/python bench/bench_gre_cost.py            # full: 10 .. 100,000 tunnels/prefixes
    .venv/bin/python bench/bench_gre_cost.py --smoke    # a few seconds, for CI
    .venv/bin/python bench/bench_gre_cost.py --attribution   # where the edge program's time goes

Programs (bpf/bench_gre.c), all behind the same frame-restoring prologue (the kernel does not
reset the buffer between repeats), whose own cost (bench_restore_only) is subtracted:
  baseline  parse Ethernet + IPv4, XDP_TX (the issue's reference program)
  decap     GRE decap of a TCP SYN (MSS clamped) + FIB lookup + redirect
  encap     IPv4 to a customer prefix: LPM, flow hash, MTU check, clamp, GRE push, FIB, redirect
  fib       the forwarding step alone (bpf_fib_lookup + MAC rewrite + redirect), for attribution
Target (issue 3): decap and encap cost at most 2.5 x the baseline; flat within 10% from 10 to
100,000 tunnels and prefixes. Runs as root inside a scratch network namespace (FIB routes and
static neighbours), never touching the host's interfaces.
"""
from __future__ import annotations

import argparse
import ipaddress
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import GRE, Ether

from pipeline import netns
from pipeline.config import loads
from pipeline.xdp import testrun
from pipeline.xdp.dataplane import Dataplane, _raw32, compile_program

BENCH_SRC = REPO / "bpf" / "bench_gre.c"
LEN = 128
EDGE, CUSTOMER, OUTSIDE, HOST = "192.0.2.1", "198.51.100.10", "100.64.0.9", "203.0.113.5"
IN_MAC, PEER_MAC = "02:00:00:00:01:01", "02:00:00:00:01:02"

CONFIG = f"""
[node]
id = 1
name = "bench-gre"
ipsec_domain = "ipsec.example.net"
tunnel_endpoints = ["{EDGE}"]
[[node.interfaces]]
name = "in0"
role = "both"
[tunnels.gre.site]
id = "bench"
index = 1
customer_endpoint = "{CUSTOMER}"
edge_endpoint = "{EDGE}"
interface_address = "10.200.0.0/31"
key = 42
[[routes]]
prefix = "203.0.113.0/24"
tunnel = "site"
"""


def frames() -> dict[str, bytes]:
    syn = IP(src="203.0.113.7", dst=OUTSIDE, ttl=64) / TCP(
        sport=40000, dport=443, flags="S", options=[("MSS", 1460), ("NOP", None),
                                                    ("WScale", 7)])
    decap = Ether(dst=IN_MAC, src=PEER_MAC) / IP(src=CUSTOMER, dst=EDGE) / GRE(
        key_present=1, key=42) / syn
    encap = Ether(dst=IN_MAC, src=PEER_MAC) / IP(src=OUTSIDE, dst=HOST, ttl=64) / UDP(
        sport=5000, dport=53) / (b"q" * 20)
    base = Ether(dst=IN_MAC, src=PEER_MAC) / IP(src=OUTSIDE, dst="100.64.0.10") / UDP()
    return {k: bytes(v).ljust(LEN, b"\0") for k, v in
            (("decap", decap), ("encap", encap), ("baseline", base))}


def attribution_frames() -> dict[str, bytes]:
    """Frames that stop at successive stages of the edge program (10 tunnels/prefixes)."""
    e = Ether(dst=IN_MAC, src=PEER_MAC)
    inner = IP(src="203.0.113.7", dst=OUTSIDE)
    out = {
        "not ours (endpoint + LPM miss)": e / IP(src="1.1.1.1", dst="100.64.0.10") / UDP(),
        "outer fragment (pass)": e / IP(src=CUSTOMER, dst=EDGE, flags="MF") / GRE() / inner,
        "unknown tunnel (GRE parsed, miss)": e / IP(src="198.51.100.99", dst=EDGE) / GRE()
        / inner / UDP(),
        "decap UDP (no MSS walk)": e / IP(src=CUSTOMER, dst=EDGE) / GRE(key_present=1, key=42)
        / inner / UDP(),
        "decap TCP SYN (MSS clamped)": e / IP(src=CUSTOMER, dst=EDGE) / GRE(key_present=1,
                                                                             key=42)
        / inner / TCP(flags="S", options=[("MSS", 1460)]),
        "encap UDP": e / IP(src=OUTSIDE, dst=HOST) / UDP(),
    }
    return {k: bytes(v).ljust(LEN, b"\0") for k, v in out.items()}


def fill(prog, n: int) -> None:
    """n tunnels and n prefixes in all (the configured one included), filler is random-free:
    tunnel i has customer 10.x.y.z and key i, prefix i is 100.96.0.0/11 + i as a /32."""
    tun, dec, r4 = prog.table("xt_tunnels"), prog.table("xt_gre_decap"), prog.table("xt_routes4")
    edge = _raw32(ipaddress.IPv4Address(EDGE).packed)
    base_net = int(ipaddress.IPv4Address("100.96.0.0"))
    for i in range(2, n + 1):
        cust = _raw32((0x0A000000 + i).to_bytes(4, "big"))
        leaf = tun.Leaf()
        leaf.kind, leaf.flags, leaf.edge, leaf.customer, leaf.mtu, leaf.mss, leaf.ttl = (
            1, 0, edge, cust, 1476, 1436, 64)
        tun[tun.Key(i)] = leaf
        dec[dec.Key(edge, cust, 0, 0)] = dec.Leaf(i)
        k = r4.Key()
        k.prefixlen = 32
        for j, b in enumerate((base_net + i).to_bytes(4, "big")):
            k.addr[j] = b
        v = r4.Leaf()
        v.count, v.tunnels[0] = 1, i
        r4[k] = v


def set_template(prog, frame: bytes, decap_delta: int, encap_delta: int) -> None:
    t = prog.table("xt_bench_frame")
    vals = t[t.Key(0)]
    for v in vals:
        v.decap_delta, v.encap_delta, v.last_delta = decap_delta, encap_delta, 0
        for i, b in enumerate(frame):
            v.bytes[i] = b
    t[t.Key(0)] = vals


def measure(fd: int, ifindex: int, repeat: int) -> float:
    return testrun.run(fd, frames()["baseline"], repeat=repeat, ingress_ifindex=ifindex
                       ).duration_ns


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--attribution", action="store_true")
    args = ap.parse_args()
    levels = [10, 1000] if args.smoke else [10, 1000, 10_000, 100_000]
    repeat, rounds = (20_000, 3) if args.smoke else (500_000, 5)
    fr = frames()
    with netns.Lab("bench") as lab:
        ns = lab.namespace("bench")
        lab.veth(ns, "in0", ns, "in1", "10.1.0.1/24", mac_a=IN_MAC, mac_b=PEER_MAC)
        lab.veth(ns, "out0", ns, "out1", "10.2.0.1/24")
        ns.sysctl("net.ipv4.ip_forward", 1)
        ns.add_neighbour("in0", "10.1.0.2", PEER_MAC)
        ns.add_neighbour("out0", "10.2.0.2", "02:00:00:00:02:02")
        ns.add_route("198.51.100.0/24", gateway="10.1.0.2")
        ns.add_route("0.0.0.0/0", gateway="10.2.0.2")
        with ns.enter():
            prog = compile_program(["-DXT_MAX_TUNNELS=131072"], path=BENCH_SRC)
            fns = {n: prog.bpf.load_func(n.encode(), prog.bpf.XDP).fd
                   for n in ("bench_restore_only", "bench_baseline", "bench_edge", "bench_fib")}
            dp = Dataplane(loads(CONFIG), ifaces=[], program=prog, pin=False,
                           cflags=("-DXT_MAX_TUNNELS=131072",)).start()
            ifindex = ns.index("in0")
            if args.attribution:
                r0 = statistics.median(testrun.run(
                    fns["bench_restore_only"], fr["baseline"], repeat=repeat,
                    ingress_ifindex=ifindex).duration_ns for _ in range(rounds))
                print(f"ns per packet, bench_restore_only ({r0} ns) subtracted:")
                for what, frame in attribution_frames().items():
                    set_template(prog, frame, 28, -28)
                    t = statistics.median(testrun.run(
                        fns["bench_edge"], frame, repeat=repeat,
                        ingress_ifindex=ifindex).duration_ns for _ in range(rounds))
                    print(f"  {what:<36} {t - r0:>5}")
                set_template(prog, fr["baseline"], 28, -28)
                t = statistics.median(testrun.run(
                    fns["bench_fib"], fr["baseline"], repeat=repeat,
                    ingress_ifindex=ifindex).duration_ns for _ in range(rounds))
                print(f"  {'bpf_fib_lookup + MAC rewrite alone':<36} {t - r0:>5}")
                dp.close()
                prog.close()
                return 0
            results = {}
            filled = 1
            for n in levels:
                if n > filled:
                    fill(prog, n)
                    filled = n
                row = {}
                for name, fn, frame in (("restore", "bench_restore_only", "baseline"),
                                        ("baseline", "bench_baseline", "baseline"),
                                        ("fib", "bench_fib", "baseline"),
                                        ("decap", "bench_edge", "decap"),
                                        ("encap", "bench_edge", "encap")):
                    # decap strips outer IPv4 + GRE with key (28); encap pushes 28 (keyed)
                    set_template(prog, fr[frame], 28, -28)
                    samples = []
                    for _ in range(rounds):
                        r = testrun.run(fns[fn], fr[frame], repeat=repeat,
                                        ingress_ifindex=ifindex)
                        samples.append(r.duration_ns)
                    row[name] = statistics.median(samples)
                reasons = dp.counters().reasons
                assert reasons.get("decap_forwarded", (0,))[0] > 0, reasons
                assert reasons.get("encap_forwarded", (0,))[0] > 0, reasons
                results[n] = row
            dp.close()
            prog.close()
    print("ns per packet (median of rounds); net = minus bench_restore_only; gross = as run")
    print(f"{'tunnels+prefixes':>16} {'restore':>8} {'baseline':>9} {'fib':>5} {'decap':>7}"
          f" {'encap':>7} {'decap/base':>11} {'encap/base':>11} {'gross d/b':>10}"
          f" {'gross e/b':>10}")
    net = {}
    for n, r in results.items():
        b, f, d, e = (r[k] - r["restore"] for k in ("baseline", "fib", "decap", "encap"))
        net[n] = (b, d, e)
        print(f"{n:>16} {r['restore']:>8} {b:>9} {f:>5} {d:>7} {e:>7} {d / max(b, 1):>11.1f}"
              f" {e / max(b, 1):>11.1f} {r['decap'] / r['baseline']:>10.2f}"
              f" {r['encap'] / r['baseline']:>10.2f}")
    for i, what in ((1, "decap"), (2, "encap")):
        vals = [v[i] for v in net.values()]
        print(f"{what} flatness: max/min over {list(net)} = {max(vals) / min(vals):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GRE data plane forwarding rates against the XDP_DROP ceiling and the kernel's own forwarding.

One run, one topology (bench/rates.py: gen --veth-- dut --veth-- sink), the same ingress veth d0
and the same generator for every case, at 64 and 1400-byte inner packets (IPv4 TCP SYN with an
MSS option of 1460, so the clamp to 1436 runs on every packet):

  xdp_drop/gre/S     XDP_DROP of the GRE frames at d0: the ceiling
  xdp_drop/plain/S   XDP_DROP of the plain inner packets at d0 (the encap input)
  kernel_fwd/S       the kernel forwarding the same inner packets, no XDP (the baseline;
                     there is no kernel GRE module here, so plain forwarding is the most the
                     kernel could do)
  gre_decap/S        customer -> Internet: GRE in, decap + MSS clamp + TTL + FIB + redirect
  gre_encap/S        Internet -> customer: plain in, LPM + encap + MSS clamp + FIB + redirect

Every case is verified at the far end by frame length (a decapsulated 64-byte inner packet is a
78-byte frame, an encapsulated one 102 with a keyed tunnel: 14 + 20 + 8 + 64), so a data plane that
passed frames to the kernel, or dropped them, cannot be mistaken for a fast one.

Issue targets: decap at least 50% of the ceiling and at least 2.5 times kernel forwarding.

    .venv/bin/python -m bench.bench_gre_rate            # 7 interleaved rounds of 0.5 s
    .venv/bin/python -m bench.bench_gre_rate --smoke    # one short round
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import rates
from pipeline import loadgen as lg

EDGE_ENDPOINT = "192.0.2.1"  # the edge's tunnel endpoint (TEST-NET-1)
CUSTOMER = "192.0.2.2"  # the customer router, tunnel remote; routed via the sink
GRE_KEY = 100
CUSTOMER_HOST = "198.51.100.10"  # behind the customer router (TEST-NET-2)
CUSTOMER_PREFIX = "100.64.0.0/24"  # routed to the tunnel (encap)
CUSTOMER_DST = "100.64.0.10"
INTERNET_HOST = rates.BENCH_DST  # 198.18.0.1, routed to the sink
XT_KIND_GRE, XT_TUN_F_KEY = 1, 0x1  # bpf/consts.h
EDGE_SRC = lg.BPF_DIR / "xdp_edge.c"
TUNNEL_MSS = 1436
TUNNEL_MTU = 1476
SIZES = (64, 1400)


def decap_frame(size: int) -> lg.Frame:
    """GRE (keyed) from the customer router to the edge around a SYN to the Internet."""
    inner = rates.syn(size, dst=INTERNET_HOST, src=CUSTOMER_HOST)
    outer = lg.ipv4_packet(CUSTOMER, EDGE_ENDPOINT, 47, lg.gre_header(0x0800, GRE_KEY) + inner)
    return lg.Frame.flows(lg.ethernet(rates.DUT_IN_MAC, rates.GEN_MAC, 0x0800, outer),
                          rates.FLOWS)


def inner_frame(size: int) -> lg.Frame:
    """The decap case's inner packet, arriving plain (the kernel baseline's input)."""
    return rates.to_dut(rates.syn(size, dst=INTERNET_HOST, src=CUSTOMER_HOST))


def encap_frame(size: int) -> lg.Frame:
    """A SYN from the Internet to a host in the customer prefix."""
    return rates.to_dut(rates.syn(size, dst=CUSTOMER_DST, src=INTERNET_HOST))


def prepare(topo: rates.Topology) -> None:
    """The edge endpoint on the DUT's loopback (as on a real edge), and the tunnel remote routed
    to the sink, so encapsulated packets leave towards the far-end counter. Internet
    destinations (rates.BENCH_NET) already go there. No route for the customer prefix: only the
    data plane knows it (were encap frames passed to the kernel, they would be dropped)."""
    topo.dut.add_address("lo", f"{EDGE_ENDPOINT}/32")
    topo.dut.add_route(f"{CUSTOMER}/32", gateway=rates.SINK_IP)


def _be32(addr_or_int) -> int:
    """A value whose in-memory bytes are the network-order bytes (for __be32 map fields)."""
    raw = (ipaddress.IPv4Address(addr_or_int).packed if isinstance(addr_or_int, str)
           else int(addr_or_int).to_bytes(4, "big"))
    return struct.unpack("=I", raw)[0]


def _compile_edge():
    from bcc import BPF

    from pipeline.xdp.source import amalgamate
    src = EDGE_SRC
    try:
        return BPF(text=amalgamate(src).encode(), cflags=[f"-I{src.parent}"])
    except Exception as exc:
        raise rates.BenchError(f"compiling {src.name}: {exc}") from exc


def fill_direct(bpf, tunnel: int = 1) -> None:
    """One keyed GRE tunnel written straight into the data plane's maps (layouts from
    bpf/structs.h), for as long as pipeline/xdp/dataplane.py (the product's loader) is not there
    to do it from a configuration."""
    ep = bpf[b"xt_endpoints"]
    ep[ep.Key(_be32(EDGE_ENDPOINT))] = ep.Leaf(1)
    dec = bpf[b"xt_gre_decap"]
    k = dec.Key()
    k.edge, k.customer, k.key, k.has_key = (_be32(EDGE_ENDPOINT), _be32(CUSTOMER),
                                            _be32(GRE_KEY), 1)
    dec[k] = dec.Leaf(tunnel)
    tun = bpf[b"xt_tunnels"]
    t = tun.Leaf()
    t.kind, t.flags = XT_KIND_GRE, XT_TUN_F_KEY
    t.edge, t.customer, t.key = _be32(EDGE_ENDPOINT), _be32(CUSTOMER), _be32(GRE_KEY)
    t.mtu, t.mss, t.ttl = TUNNEL_MTU, TUNNEL_MSS, 64
    tun[tun.Key(tunnel)] = t
    r4 = bpf[b"xt_routes4"]
    net = ipaddress.IPv4Network(CUSTOMER_PREFIX)
    rk = r4.Key()
    rk.prefixlen = net.prefixlen
    for i, b in enumerate(net.network_address.packed):
        rk.addr[i] = b
    rv = r4.Leaf()
    rv.count = 1
    rv.tunnels[0] = tunnel
    r4[rk] = rv


@contextlib.contextmanager
def gre_plug(topo: rates.Topology, mode: str = "native"):
    """Attach the product's data plane (bpf/xdp_edge.c) to the DUT's ingress with one keyed
    GRE tunnel: edge EDGE_ENDPOINT, customer CUSTOMER, key GRE_KEY, prefix CUSTOMER_PREFIX,
    MTU 1476, MSS 1436. Compiled and filled once per topology; attached per measurement."""
    bpf = topo.compiled("xdp_edge", _compile_edge)
    if "xdp_edge_filled" not in topo.cache:
        fill_direct(bpf)
        topo.cache["xdp_edge_filled"] = True
    lg.attach(bpf, "xdp_edge", topo.dut, topo.dut_in, mode)
    try:
        yield bpf
    finally:
        lg.detach(topo.dut, topo.dut_in, mode)


def gre_cases(sizes: Sequence[int], plug=gre_plug) -> tuple[list[rates.Case],
                                                            list[tuple[str, str]]]:
    cases: list[rates.Case] = []
    ratios: list[tuple[str, str]] = []
    for s in sizes:
        gre, inner, enc = [decap_frame(s)], [inner_frame(s)], [encap_frame(s)]
        cases += [
            rates.drop_case(f"xdp_drop/gre/{s}", gre),
            rates.drop_case(f"xdp_drop/plain/{s}", enc),
            rates.kernel_case(f"kernel_fwd/{s}", inner),
            rates.xdp_case(f"gre_decap/{s}", gre, plug, out_len=14 + s),
            rates.xdp_case(f"gre_encap/{s}", enc, plug, out_len=14 + 20 + 8 + s),
        ]
        ratios += [(f"gre_decap/{s}", f"xdp_drop/gre/{s}"), (f"gre_decap/{s}", f"kernel_fwd/{s}"),
                   (f"gre_encap/{s}", f"xdp_drop/plain/{s}"), (f"gre_encap/{s}", f"kernel_fwd/{s}"),
                   (f"kernel_fwd/{s}", f"xdp_drop/plain/{s}")]
    return cases, ratios


def targets(bench: rates.Bench, sizes: Sequence[int]) -> list[str]:
    out = []
    for s in sizes:
        ceil = bench.ratio(f"gre_decap/{s}", f"xdp_drop/gre/{s}")
        kern = bench.ratio(f"gre_decap/{s}", f"kernel_fwd/{s}")
        out.append(f"target decap/{s} >= 50% of the XDP_DROP ceiling: {ceil:.1%} "
                   f"({'met' if ceil >= 0.5 else 'MISSED'})")
        out.append(f"target decap/{s} >= 2.5x kernel forwarding: {kern:.2f}x "
                   f"({'met' if kern >= 2.5 else 'MISSED'})")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_gre_rate",
                                description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="inner packet sizes")
    p.add_argument("--seconds", type=float, default=0.5, help="per case and round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--cpus", help="generator CPUs, comma-separated (default: all allowed)")
    p.add_argument("--mode", choices=("native", "generic"), default="native")
    p.add_argument("--smoke", action="store_true", help="one round of 0.2 s, 64 bytes")
    p.add_argument("--json", help="write the summary here")
    a = p.parse_args(argv)
    if a.smoke:
        a.sizes, a.seconds, a.rounds = "64", 0.2, 1
    sizes = [int(s) for s in a.sizes.split(",")]
    cpus = [int(c) for c in a.cpus.split(",")] if a.cpus else None
    cases, ratios = gre_cases(sizes, lambda t: gre_plug(t, a.mode))
    t0 = time.monotonic()
    with rates.Topology() as topo:
        prepare(topo)
        bench = rates.Bench(topo, cases, cpus=cpus, seconds=a.seconds,
                            warmup=0.05 if a.smoke else 0.2)
        try:
            bench.run(a.rounds, log=lambda s: print(s, file=sys.stderr))
        finally:
            bench.close()
    print(bench.table(ratios))
    print("\n".join(targets(bench, sizes)))
    print(f"({len(bench.cpus)} generator CPUs, {a.mode} mode, {a.rounds} rounds of {a.seconds} s "
          f"per case, {time.monotonic() - t0:.0f} s in all)")
    if a.json:
        Path(a.json).write_text(json.dumps(bench.summary(ratios), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

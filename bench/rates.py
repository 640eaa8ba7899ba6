"""Forwarding-rate harness: gen-ns --veth-- dut-ns --veth-- sink-ns, load from XDP live frames.

    gen  g0 10.10.0.2 ---- d0 10.10.0.1  [dut]  d1 10.20.0.1 ---- s0 10.20.0.2  sink
         (LoadGen, XDP_TX)   ingress                egress           (Sink: count + drop)

In one run, on the same ingress veth d0, with the same generator:
  - ``drop``: an XDP_DROP counter on d0 (the ceiling: what reaching the DUT's XDP hook costs);
  - ``kernel``: no XDP on d0, ip_forward=1: the kernel's own forwarding (the baseline);
  - ``xdp``: a program under test, attached by a *plug* (below), forwarding to the sink.
The rate that counts is the one measured at the far end (the Sink's XDP counter on s0; for
``drop`` the counter on d0 itself); the generator's offered rate and the DUT's interface counters
(``ethtool -S``, ``ip -s link``) are recorded beside it, so a loss shows where it happened.

Cases are measured in short interleaved rounds (every case once per round, ``rounds`` times)
because the machine is shared: a neighbour's work only ever lowers a rate, so the headline
figure of a case is its best round and a ratio is best over best; the median rate and the
median of within-round ratios are reported beside them.

A plug is ``plug(topo) -> context manager``: entering attaches the data plane to the DUT
(``topo.dut``, interfaces ``topo.dut_in``/``topo.dut_out``, addresses in the constants below) and
configures it; exiting detaches. See :func:`reference_forwarder` and bench/bench_gre_rate.py.

veth facts the topology respects (see pipeline/loadgen.py): d0 has GRO on (its NAPI must run
for the generator's XDP frames to arrive when no native XDP program is attached, i.e. in the
``kernel`` case and for generic-mode plugs); s0 has the native Sink, so a native XDP_REDIRECT
from d0 into d1 is delivered. ``kernel.bpf_stats_enabled`` must be 0 (it halves the rates).

    .venv/bin/python -m bench.rates                  # 64 and 1400-byte IPv4, 7 rounds of 0.5 s
    .venv/bin/python -m bench.rates --smoke          # a few hundred ms, for CI
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from pipeline import loadgen as lg
from pipeline import netns

GEN_MAC, DUT_IN_MAC = "02:00:00:10:00:02", "02:00:00:10:00:01"
DUT_OUT_MAC, SINK_MAC = "02:00:00:20:00:01", "02:00:00:20:00:02"
GEN_IP, DUT_IN_IP = "10.10.0.2", "10.10.0.1"
DUT_OUT_IP, SINK_IP = "10.20.0.1", "10.20.0.2"
BENCH_NET = "198.18.0.0/15"  # RFC 2544 benchmarking range, routed to the sink
BENCH_DST = "198.18.0.1"
FLOWS = 256

Plug = Callable[["Topology"], contextlib.AbstractContextManager]


class BenchError(RuntimeError):
    pass


def bpf_stats_enabled() -> bool:
    try:
        return Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() != "0"
    except OSError:
        return False


class Topology:
    """The three namespaces and two veth pairs, torn down on close (a :class:`netns.Lab`)."""

    gen_if, dut_in, dut_out, sink_if = "g0", "d0", "d1", "s0"

    def __init__(self, sink_mode: str = "native"):
        self.lab = netns.Lab("bench")
        self.sink: lg.Sink | None = None
        # Compiled programs plugs keep between measurements (compiling takes a second of CPU
        # and must stay out of every timed window); cleaned up on close.
        self.cache: dict[str, object] = {}
        try:
            self.gen = self.lab.namespace("gen")
            self.dut = self.lab.namespace("dut")
            self.sink_ns = self.lab.namespace("sink")
            for ns in (self.gen, self.dut, self.sink_ns):
                # No IPv6: router solicitations and MLD reports would be counted by the sink.
                ns.sysctl("net.ipv6.conf.all.disable_ipv6", 1)
                ns.sysctl("net.ipv6.conf.default.disable_ipv6", 1)
            self.lab.veth(self.gen, self.gen_if, self.dut, self.dut_in,
                          f"{GEN_IP}/24", f"{DUT_IN_IP}/24", mac_a=GEN_MAC, mac_b=DUT_IN_MAC)
            self.lab.veth(self.dut, self.dut_out, self.sink_ns, self.sink_if,
                          f"{DUT_OUT_IP}/24", f"{SINK_IP}/24", mac_a=DUT_OUT_MAC, mac_b=SINK_MAC)
            self.dut.sysctl("net.ipv4.ip_forward", 1)
            for key in ("all", "default", self.dut_in, self.dut_out):
                self.dut.sysctl(f"net.ipv4.conf.{key}.rp_filter", 0)
            self.dut.add_neighbour(self.dut_out, SINK_IP, SINK_MAC)
            self.dut.add_neighbour(self.dut_in, GEN_IP, GEN_MAC)
            self.gen.add_neighbour(self.gen_if, DUT_IN_IP, DUT_IN_MAC)
            self.dut.add_route(BENCH_NET, gateway=SINK_IP)
            # One queue per CPU on every veth: a veth's XDP receive ring is chosen by the
            # sending CPU, so each generator CPU feeds its own ring and NAPI (as RSS would on
            # a NIC); with one queue two CPUs contend for one ring and it overflows.
            queues = str(os.cpu_count() or 1)
            for ns, ifname in ((self.gen, self.gen_if), (self.dut, self.dut_in),
                               (self.dut, self.dut_out), (self.sink_ns, self.sink_if)):
                ns.run("ethtool", "-L", ifname, "rx", queues, "tx", queues)
            self.dut.ethtool(self.dut_in, "gro", "on")
            self.sink = lg.Sink(self.sink_ns, self.sink_if, sink_mode,
                                gro=True if sink_mode == "generic" else None)
        except BaseException:
            self.close()
            raise

    def compiled(self, key: str, build: Callable[[], object]):
        """``build()`` once per topology (a bcc BPF object or anything with cleanup())."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
        for obj in self.cache.values():
            cleanup = getattr(obj, "cleanup", None) or getattr(obj, "close", None)
            if cleanup:
                cleanup()
        self.cache.clear()
        self.lab.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def dut_counters(self) -> dict[str, int]:
        """Interface counters of the DUT's two veths (ethtool -S and ip -s link), prefixed."""
        out: dict[str, int] = {}
        for ns, ifname in ((self.dut, self.dut_in), (self.dut, self.dut_out),
                           (self.sink_ns, self.sink_if)):
            for k, v in lg.ethtool_stats(ns, ifname).items():
                # per-queue veth counters summed: rx_queue_1_xdp_packets -> rxq_xdp_packets
                q = re.match(r"^(rx|tx)_queue_\d+_(.+)$", k)
                key = f"{ifname}.{q.group(1)}q_{q.group(2)}" if q else f"{ifname}.{k}"
                out[key] = out.get(key, 0) + v
            for k, v in lg.link_stats(ns, ifname).items():
                out[f"{ifname}.{k}"] = v
        return out


# --- frames --------------------------------------------------------------------------------------

def plain_udp(size: int, dst: str = BENCH_DST, src: str = GEN_IP) -> bytes:
    """An IPv4/UDP packet of ``size`` bytes (IP total length) from the generator to ``dst``."""
    return lg.pad_ipv4_to(size, lambda p: lg.ipv4_packet(
        src, dst, 17, lg.udp_segment(src, dst, 1024, 9, p)))


def syn(size: int, dst: str = BENCH_DST, src: str = GEN_IP, mss: int = 1460) -> bytes:
    """An IPv4 TCP SYN with an MSS option, padded with payload to ``size`` bytes."""
    return lg.pad_ipv4_to(size, lambda p: lg.ipv4_packet(
        src, dst, 6, lg.tcp_syn_segment(src, dst, 1024, 80, mss=mss, payload=p)))


def to_dut(ip_packet: bytes, flows: int = FLOWS) -> lg.Frame:
    """An IPv4 packet in an Ethernet frame from the generator to the DUT's ingress, its source
    port stepping through ``flows`` values."""
    return lg.Frame.flows(lg.ethernet(DUT_IN_MAC, GEN_MAC, 0x0800, ip_packet), flows)


# --- cases ---------------------------------------------------------------------------------------

@dataclass
class Case:
    """One measurement: what the generator sends, what the DUT runs, and the length every frame
    must have at the far end (``out_len``; None: the length sent). A frame of another length at
    the sink means the path did something else than intended (a GRE frame the data plane
    passed to the kernel, say): the measurement is refused rather than reported."""

    name: str
    kind: str  # "drop" | "kernel" | "xdp"
    frames: list[lg.Frame]
    plug: Plug | None = None
    out_len: int | None = None

    def expected_len(self) -> int | None:
        if self.out_len is not None:
            return self.out_len
        lengths = {len(f.data) for f in self.frames}
        return lengths.pop() if len(lengths) == 1 else None


def drop_case(name: str, frames: Sequence[lg.Frame]) -> Case:
    return Case(name, "drop", list(frames))


def kernel_case(name: str, frames: Sequence[lg.Frame]) -> Case:
    return Case(name, "kernel", list(frames))


def xdp_case(name: str, frames: Sequence[lg.Frame], plug: Plug,
             out_len: int | None = None) -> Case:
    return Case(name, "xdp", list(frames), plug, out_len)


@contextlib.contextmanager
def reference_forwarder(topo: Topology, mode: str = "native"):
    """Plug: bpf/bench_fwd.c (FIB lookup + redirect) on the DUT's ingress; with
    ``mode='generic'`` in generic mode (and then on the egress veth too, the XDP_REDIRECT of a
    generic program needs no peer setup)."""
    bpf = topo.compiled("bench_fwd", lambda: lg._compile(lg.BPF_DIR / "bench_fwd.c"))
    lg.attach(bpf, "xdp_bench_fwd", topo.dut, topo.dut_in, mode)
    try:
        yield bpf
    finally:
        lg.detach(topo.dut, topo.dut_in, mode)


@dataclass
class Measurement:
    case: str
    seconds: float
    offered: int  # frames the generator sent (its program returned XDP_TX)
    delivered: int  # frames counted at the far end (Sink on s0; on d0 for "drop")
    delivered_bytes: int
    dut: dict[str, int] = field(default_factory=dict)  # interface counter deltas

    @property
    def pps(self) -> float:
        return self.delivered / self.seconds

    @property
    def offered_pps(self) -> float:
        return self.offered / self.seconds


class Bench:
    """Runs cases in interleaved rounds on one :class:`Topology`; generators are built once per
    case (compiling is outside every timed window)."""

    def __init__(self, topo: Topology, cases: Sequence[Case], *, cpus: Sequence[int] | None = None,
                 seconds: float = 2.0, warmup: float = 0.2, count: int | None = None):
        if bpf_stats_enabled():
            raise BenchError("kernel.bpf_stats_enabled is 1: it halves XDP rates; "
                             "run `sysctl -w kernel.bpf_stats_enabled=0` first")
        names = [c.name for c in cases]
        if len(set(names)) != len(names):
            raise BenchError(f"case names must be unique: {names}")
        self.topo, self.cases, self.seconds, self.warmup = topo, list(cases), seconds, warmup
        self.count = count  # send exactly this many frames per measurement instead of timing
        self.cpus = list(cpus) if cpus else sorted(os.sched_getaffinity(0))
        self.results: dict[str, list[Measurement]] = {c.name: [] for c in cases}
        self._gens: dict[tuple, lg.LoadGen] = {}

    def _gen(self, case: Case) -> lg.LoadGen:
        key = tuple(case.frames)  # cases sending the same frames share one generator
        if key not in self._gens:
            self._gens[key] = lg.LoadGen(self.topo.gen, self.topo.gen_if, case.frames,
                                         cpus=self.cpus)
        return self._gens[key]

    @contextlib.contextmanager
    def _setup(self, case: Case):
        t = self.topo
        if case.kind == "drop":
            with lg.Sink(t.dut, t.dut_in, "native",
                         bpf=t.compiled("sink", lg.compile_sink)) as counter:
                yield counter
        elif case.kind == "kernel":
            if lg.xdp_attached(t.dut, t.dut_in):
                raise BenchError(f"kernel case: an XDP program is still on {t.dut_in}")
            yield t.sink
        elif case.kind == "xdp":
            with case.plug(t):
                yield t.sink
        else:
            raise BenchError(f"unknown case kind {case.kind!r}")

    def measure(self, case: Case) -> Measurement:
        gen = self._gen(case)
        with self._setup(case) as counter:
            if self.warmup:
                gen.run(self.warmup)
            dut0, c0 = self.topo.dut_counters(), counter.count()
            res = gen.send(self.count) if self.count else gen.run(self.seconds)
            c1, dut1 = counter.count(), self.topo.dut_counters()
        dut = {k: v - dut0.get(k, 0) for k, v in dut1.items()
               if k != f"{self.topo.sink_if}.peer_ifindex" and not k.endswith("peer_ifindex")}
        m = Measurement(case.name, res.seconds, res.packets, (c1 - c0).packets,
                        (c1 - c0).bytes, dut)
        want = case.expected_len()
        if want is not None and m.delivered_bytes != m.delivered * want:
            raise BenchError(
                f"{case.name}: the far end counted {m.delivered} frames of "
                f"{m.delivered_bytes} bytes, not {want} bytes each: the path did not do what "
                f"the case measures (DUT counters: {({k: v for k, v in dut.items() if v})})")
        self.results[case.name].append(m)
        return m

    def run(self, rounds: int = 3, log=None) -> Bench:
        for r in range(rounds):
            for case in self.cases:
                m = self.measure(case)
                if log:
                    log(f"round {r + 1}/{rounds} {case.name:<28} {m.pps / 1e6:7.3f} Mpps "
                        f"(offered {m.offered_pps / 1e6:.3f})")
        return self

    def close(self) -> None:
        for g in self._gens.values():
            g.close()
        self._gens.clear()

    # --- summaries ---
    # On a shared machine a neighbour's work only ever lowers a rate, so the best round is the
    # least disturbed estimate of what the path can do: headline rates and ratios use the best
    # round; the median and the median of per-round ratios are printed beside them.

    def rate(self, name: str) -> float:
        """Best round, frames per second at the far end."""
        return max(m.pps for m in self.results[name])

    def median(self, name: str) -> float:
        return statistics.median(m.pps for m in self.results[name])

    def ratio(self, num: str, den: str) -> float:
        """Best rate of ``num`` over best rate of ``den``."""
        return self.rate(num) / self.rate(den)

    def ratio_median(self, num: str, den: str) -> float:
        """Median over rounds of the within-round ratio."""
        pairs = zip(self.results[num], self.results[den], strict=True)
        return statistics.median(a.pps / b.pps for a, b in pairs if b.pps > 0)

    def summary(self, ratios: Sequence[tuple[str, str]] = ()) -> dict:
        cases = {}
        for c in self.cases:
            ms = self.results[c.name]
            cases[c.name] = {
                "frame_bytes": len(c.frames[0].data),
                "mpps_best": round(self.rate(c.name) / 1e6, 3),
                "mpps_median": round(self.median(c.name) / 1e6, 3),
                "mpps_rounds": [round(m.pps / 1e6, 3) for m in ms],
                "dut_in_mpps_rounds": [
                    round(m.dut.get(f"{self.topo.dut_in}.rx_packets", 0) / m.seconds / 1e6, 3)
                    for m in ms],
                "offered_mpps_rounds": [round(m.offered_pps / 1e6, 3) for m in ms],
                "lost_per_round": [m.offered - m.delivered for m in ms],
                # the round that lost most (where frames went missing), else the last one
                "dut_counters_worst_round": {
                    k: v for k, v in max(ms, key=lambda m: m.offered - m.delivered).dut.items()
                    if v},
            }
        return {
            "cpus": self.cpus, "seconds": self.seconds, "count": self.count,
            "rounds": len(self.results[self.cases[0].name]),
            "cases": cases,
            "ratios": {f"{n} / {d}": {"best": round(self.ratio(n, d), 3),
                                      "median_of_rounds": round(self.ratio_median(n, d), 3)}
                       for n, d in ratios},
        }

    def table(self, ratios: Sequence[tuple[str, str]] = ()) -> str:
        lines = [(f"{'case':<30} {'frame':>5} {'best':>7} {'median':>7} {'dut_in':>7} "
                  f"{'lost':>6}  rounds (Mpps at the far end)")]
        for c in self.cases:
            ms = self.results[c.name]
            lost = sum(m.offered - m.delivered for m in ms) / max(1, sum(m.offered for m in ms))
            # what the DUT's ingress veth says it received (its own counter, median round)
            dut_in = statistics.median(m.dut.get(f"{self.topo.dut_in}.rx_packets", 0) / m.seconds
                                       for m in ms)
            lines.append(
                f"{c.name:<30} {len(c.frames[0].data):>5} {self.rate(c.name) / 1e6:>7.3f} "
                f"{self.median(c.name) / 1e6:>7.3f} {dut_in / 1e6:>7.3f} {lost:>6.1%}  "
                + " ".join(f"{m.pps / 1e6:.2f}" for m in ms))
        for num, den in ratios:
            lines.append(f"ratio {num} / {den}: {self.ratio(num, den):.3f} "
                         f"(median of rounds {self.ratio_median(num, den):.3f})")
        return "\n".join(lines)


# --- per-packet program cost (BPF_PROG_TEST_RUN with repeat) -------------------------------------

def prog_cost_ns(ns, ifname: str, prog_fd: int, frame: bytes, *, repeat: int = 200_000,
                 rounds: int = 5, expect: int | None = None) -> float:
    """Nanoseconds per run of an XDP program on ``frame`` as the kernel times it, best of
    ``rounds`` (shared machine). Run from a thread inside ``ns`` with ``ifname`` as the ingress
    device, so FIB lookups and redirects resolve as on the wire. ``expect``: the XDP action every
    run must return (a cost measured on the wrong path is refused). Never with
    kernel.bpf_stats_enabled, which adds its own cost to every run."""
    from pipeline.xdp import testrun
    if bpf_stats_enabled():
        raise BenchError("kernel.bpf_stats_enabled is 1: program costs would include it")
    best = float("inf")
    with lg._thread_in_netns(getattr(ns, "name", ns)):
        ifindex = lg._ifindex(ifname)
        for _ in range(rounds):
            res = testrun.run(prog_fd, frame, repeat=repeat, ingress_ifindex=ifindex)
            if expect is not None and res.action != expect:
                raise BenchError(f"program returned {res.action!r}, expected {expect!r}")
            best = min(best, res.duration_ns)
    return float(best)


# --- the standalone run: plain IPv4, reference forwarder ----------------------------------------

def plain_cases(sizes: Sequence[int], fwd_modes: Sequence[str] = ("native",)) -> tuple[
        list[Case], list[tuple[str, str]]]:
    cases, ratios = [], []
    for size in sizes:
        frames = [to_dut(plain_udp(size))]
        cases += [drop_case(f"xdp_drop/{size}", frames), kernel_case(f"kernel_fwd/{size}", frames)]
        for mode in fwd_modes:
            name = f"xdp_fwd_{mode}/{size}"
            cases.append(xdp_case(name, frames,
                                  lambda t, mode=mode: reference_forwarder(t, mode)))
            ratios += [(name, f"xdp_drop/{size}"), (name, f"kernel_fwd/{size}")]
        ratios.append((f"kernel_fwd/{size}", f"xdp_drop/{size}"))
    return cases, ratios


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rates", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="64,1400", help="IPv4 packet sizes (comma-separated)")
    p.add_argument("--seconds", type=float, default=0.5, help="per case and round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--cpus", help="generator CPUs, comma-separated (default: all allowed)")
    p.add_argument("--generic", action="store_true", help="also the forwarder in generic mode")
    p.add_argument("--smoke", action="store_true", help="0.2 s per case, 1 round, 64 bytes")
    p.add_argument("--json", help="write the summary here")
    a = p.parse_args(argv)
    if a.smoke:
        a.sizes, a.seconds, a.rounds = "64", 0.2, 1
    sizes = [int(s) for s in a.sizes.split(",")]
    cpus = [int(c) for c in a.cpus.split(",")] if a.cpus else None
    cases, ratios = plain_cases(sizes, ("native", "generic") if a.generic else ("native",))
    t0 = time.monotonic()
    with Topology() as topo:
        bench = Bench(topo, cases, cpus=cpus, seconds=a.seconds,
                      warmup=0.05 if a.smoke else 0.2)
        try:
            bench.run(a.rounds, log=lambda s: print(s, file=sys.stderr))
        finally:
            bench.close()
    print(bench.table(ratios))
    print(f"({len(bench.cpus)} generator CPUs, {a.rounds} rounds of {a.seconds} s per case, "
          f"{time.monotonic() - t0:.0f} s in all)")
    if a.json:
        summary = bench.summary(ratios)
        Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

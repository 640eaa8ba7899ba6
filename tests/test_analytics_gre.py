"""Analytics over the GRE data plane with real traffic in namespaces.

customer ns (c0) -- edge ns (e0 | data plane | e1) -- Internet ns (i0), as tests/test_gre_netns.py
builds it, with the edge program compiled with the packet sampler (bpf/xdp_sample_test.c's
xdp_edge_sampled: the edge dispatcher with xt_sample() at its exit). The collector reads the
pinned maps and drains the ring buffer; what it reports (ticks, history, Prometheus, CLI) must
equal what was sent, packet for packet and byte for byte.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest
from gre_support import CUSTOMER, EDGE, config, toml
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import GRE, Ether
from test_gre_netns import CC, EC, EI, II, build

from pipeline.analytics.collector import EGRESS, INGRESS, NODE, Collector, XdpSource
from pipeline.analytics.exporter import Exporter, SampleTotals
from pipeline.analytics.samples import Sampler
from pipeline.analytics.store import History
from pipeline.xdp.dataplane import BPF_DIR, Dataplane, Program, compile_program

pytestmark = pytest.mark.netns

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTSIDE, HOST = "100.64.0.9", "203.0.113.5"


@pytest.fixture(scope="module")
def prog():
    from bcc import BPF
    p = compile_program(["-DXT_FEATURE_SAMPLE"], path=BPF_DIR / "xdp_sample_test.c")
    entry = p.bpf.load_func(b"xdp_edge_sampled", BPF.XDP)
    peer = p.bpf.load_func(b"xdp_peer_pass", BPF.XDP)
    sampler = Sampler(p.bpf, 0, 0)        # the ring buffer is opened once per program
    yield Program(p.bpf, entry, peer, p.cflags), sampler
    p.close()


class Rig:
    def __init__(self, lab, prog_sampler, tmp_path, rate: int = 1) -> None:
        prog, self.sampler = prog_sampler
        cust, self.edge_ns, inet = build(lab)
        self.node = f"edge-an-{os.getpid()}-{id(self) & 0xffff}"
        self.cfg_path = tmp_path / "edge.toml"
        extra = (f'\n[analytics]\nsample_rate = {rate}\nhistory_file = "{tmp_path}/an.db"\n'
                 f'http_port = 0\n')
        self.cfg_path.write_text(toml(node=self.node, interfaces=("e0", "e1")) + extra)
        self.cfg = config(node=self.node, interfaces=("e0", "e1"))
        self.prog = prog
        self.dp = self.start_dataplane()
        self.cust, self.inet = lab.port(cust, "c0"), lab.port(inet, "i0")
        for p in (self.cust, self.inet):
            p.sock.setsockopt(1, 33, 8 << 20)   # SOL_SOCKET, SO_RCVBUFFORCE
        self.names = {t.index: t.name for t in self.cfg.tunnels}
        self.hist = History(tmp_path / "an.db", tunnel_names=self.names)
        self.samples = SampleTotals(self.names)
        self.sampler.reset()
        self.sampler.configure(rate, 1000)
        self.sampler.drain()
        self.sampler.mix.take()
        self.coll = Collector([XdpSource(self.names, pin_dir=self.dp.pin_path)],
                              sinks=[self.hist, self.samples], samplers=[self.sampler])

    def start_dataplane(self) -> Dataplane:
        dp = Dataplane(self.cfg, mode="native", program=self.prog)
        with self.edge_ns.enter():
            dp.start()
        return dp

    def close(self) -> None:
        self.dp.close()
        self.hist.close()


@pytest.fixture
def rig(lab, prog, tmp_path):
    r = Rig(lab, prog, tmp_path)
    try:
        yield r
    finally:
        r.close()


def decap_frame(inner) -> bytes:
    return bytes(Ether(dst=EC, src=CC) / IP(src=CUSTOMER, dst=EDGE) / GRE() / inner)


def test_rates_totals_drops_prometheus_plot(rig, tmp_path):
    """Both directions and drops: the tick's deltas, the history, the Prometheus endpoint and
    `xtransit analytics` all carry exactly what was sent."""
    up = IP(src="203.0.113.7", dst=OUTSIDE, ttl=64) / UDP(sport=1000, dport=2000) / (b"u" * 100)
    down = IP(src=OUTSIDE, dst=HOST, ttl=30) / TCP(sport=443, dport=40000, flags="A") / (b"d" * 3)
    stranger = bytes(Ether(dst=EC, src=CC) / IP(src="198.51.100.99", dst=EDGE) / GRE() / up)
    bad_inner = bytes(Ether(dst=EC, src=CC) / IP(src=CUSTOMER, dst=EDGE) / GRE() /
                      IP(src="203.0.113.7", dst=OUTSIDE, len=400) / UDP())   # longer than carried
    n_up, n_down, n_stranger, n_bad = 40, 25, 7, 3
    coll = rig.coll
    assert coll.tick() is None                           # the baseline
    rig.inet.drain()
    rig.cust.drain()
    t0 = time.monotonic()
    for i in range(max(n_up, n_down)):
        if i < n_up:
            rig.cust.send(decap_frame(up))
        if i < n_down:
            rig.inet.send(bytes(Ether(dst=EI, src=II) / down))
        if i < n_stranger:
            rig.cust.send(stranger)
        if i < n_bad:
            rig.cust.send(bad_inner)
        time.sleep(0.0005)
    assert len(rig.inet.recv_all(n_up, timeout=3, match=lambda f: f[23] == 17)) == n_up
    assert len(rig.cust.recv_all(n_down, timeout=3, match=lambda f: f[23] == 47)) == n_down
    tick = coll.tick()
    elapsed = time.monotonic() - t0
    up_b, down_b = len(up), len(down)
    assert tick.traffic[("plain", EGRESS)] == (n_up, n_up * up_b)
    assert tick.traffic[("keyed", INGRESS)] == (n_down, n_down * down_b)
    assert tick.traffic[("plain", INGRESS)] == (0, 0)
    assert tick.traffic[("keyed", EGRESS)] == (0, 0)
    assert tick.drops == {("plain", "inner_malformed"): n_bad, (NODE, "unknown_tunnel"): n_stranger}
    assert tick.reasons["decap_forwarded"][0] == n_up
    assert tick.reasons["encap_forwarded"][0] == n_down
    # rates over the tick's interval (which spans the sending): bits exactly what was sent
    pps, bps = tick.rates()[("plain", EGRESS)]
    assert 0 < tick.interval <= elapsed + 0.01
    assert round(pps * tick.interval) == n_up
    assert round(bps * tick.interval) == 8 * n_up * up_b
    # every frame was sampled (rate 1): the mix saw them all, per tunnel index
    mix = {}
    for (_minute, index, kind, key), v in tick.samples.items():
        mix[(index, kind, key)] = mix.get((index, kind, key), 0) + v
    assert mix[(1, "src", "203.0.113.7")] == n_up + n_bad
    assert mix[(2, "dport", "40000")] == n_down
    assert mix[(0, "drop_reason", "unknown_tunnel")] == n_stranger

    # history: the 1-second points sum to the totals
    now = int(time.time())
    pts = rig.hist.points("plain", now - 60)
    assert sum(p.out_packets for p in pts) == n_up
    assert sum(p.out_bytes for p in pts) == n_up * up_b
    assert sum(p.drops for p in pts) == n_bad
    assert rig.hist.drops("plain", now - 60) == {"inner_malformed": n_bad}
    assert rig.hist.drops(NODE, now - 60) == {"unknown_tunnel": n_stranger}
    kp = rig.hist.points("keyed", now - 60)
    assert (sum(p.in_packets for p in kp), sum(p.in_bytes for p in kp)) == (n_down,
                                                                            n_down * down_b)

    # Prometheus: parsed with the official text parser, the same values
    with Exporter(coll, "127.0.0.1", 0, samples=rig.samples) as ex:
        body = urllib.request.urlopen(f"http://127.0.0.1:{ex.port}/metrics", timeout=5).read()
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    val = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in fams.values() for s in f.samples}
    assert fams["xtransit_tunnel_packets"].type == "counter"
    assert val[("xtransit_tunnel_packets_total",
                (("direction", "egress"), ("tunnel", "plain")))] == n_up
    assert val[("xtransit_tunnel_bytes_total",
                (("direction", "egress"), ("tunnel", "plain")))] == n_up * up_b
    assert val[("xtransit_tunnel_packets_total",
                (("direction", "ingress"), ("tunnel", "keyed")))] == n_down
    assert val[("xtransit_tunnel_bytes_total",
                (("direction", "ingress"), ("tunnel", "keyed")))] == n_down * down_b
    assert val[("xtransit_tunnel_drops_total",
                (("reason", "inner_malformed"), ("tunnel", "plain")))] == n_bad
    assert val[("xtransit_tunnel_drops_total",
                (("reason", "unknown_tunnel"), ("tunnel", "")))] == n_stranger
    assert val[("xtransit_frames_total", (("reason", "decap_forwarded"),))] == n_up
    assert val[("xtransit_packet_samples_total", (("kind", "periodic"), ("tunnel", "plain")))] \
        == n_up + n_bad
    assert val[("xtransit_packet_samples_total", (("kind", "drop"), ("tunnel", "plain")))] \
        == n_bad

    # the CLI: table totals and a PNG
    run = [sys.executable, "-m", "pipeline.cli", "analytics", "-c", str(rig.cfg_path)]
    out = subprocess.run(run + ["--tunnel", "plain", "--since", "5m"], capture_output=True,
                         text=True, timeout=60, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"total  in 0 packets 0 bytes  out {n_up} packets {n_up * up_b} bytes" in lines[-2]
    assert lines[-1] == f"drops  inner_malformed={n_bad}"
    png = tmp_path / "plain.png"
    out = subprocess.run(run + ["--tunnel", "plain", "--since", "5m", "--plot", str(png)],
                         capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr
    check_png(png)


def check_png(png) -> None:
    import matplotlib.image as mpimg
    import numpy as np
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(png)
    assert img.shape[:2] == (600, 1000)
    rgb = (img[..., :3] * 255).round().astype(int)
    def count(color: str) -> int:
        c = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(rgb - c).sum(axis=2) < 30).sum())
    assert count("#2ca02c") > 100      # tab:green: the out (egress) lines
    assert count("#d62728") > 20       # tab:red: drops
    assert (rgb.sum(axis=2) < 600).mean() > 0.01     # not a blank canvas


def test_restarted_dataplane_no_negative_rates(rig):
    frame = decap_frame(IP(src="203.0.113.7", dst=OUTSIDE) / UDP(sport=1, dport=2))
    coll = rig.coll
    coll.tick()
    for _ in range(30):
        rig.cust.send(frame)
        time.sleep(0.0005)
    assert len(rig.inet.recv_all(30, timeout=3, match=lambda f: f[23] == 17)) == 30
    assert coll.tick().traffic[("plain", EGRESS)][0] == 30
    rig.dp.close()                                  # a restart: counters start again at zero
    rig.dp = rig.start_dataplane()
    for _ in range(5):
        rig.cust.send(frame)
        time.sleep(0.0005)
    assert len(rig.inet.recv_all(5, timeout=3, match=lambda f: f[23] == 17)) == 5
    t = coll.tick()
    assert t.traffic[("plain", EGRESS)][0] == 5
    assert all(p >= 0 and b >= 0 for p, b in t.traffic.values())
    assert coll.snapshot()["traffic"][("plain", EGRESS)][0] == 35


def test_syn_flood_shows_in_top(rig):
    """SYNs from 24 sources to one customer host: `xtransit analytics top` names the sources
    with their exact counts (every frame sampled at rate 1) and port 80."""
    sources = [f"192.0.2.{i}" for i in range(10, 34)]
    counts = {s: 1 + i for i, s in enumerate(sources)}             # 1..24 SYNs each
    coll = rig.coll
    coll.tick()
    total = 0
    for s, n in counts.items():
        f = bytes(Ether(dst=EI, src=II) / IP(src=s, dst=HOST) /
                  TCP(sport=1024 + n, dport=80, flags="S"))
        for _ in range(n):
            rig.inet.send(f)
            total += 1
            time.sleep(0.0003)
    noise = bytes(Ether(dst=EI, src=II) / IP(src=OUTSIDE, dst=HOST) / UDP(sport=53, dport=5353))
    for _ in range(3):
        rig.inet.send(noise)
    got = rig.cust.recv_all(total + 3, timeout=5, match=lambda f: f[23] == 47)
    assert len(got) == total + 3
    coll.tick()
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "analytics", "top", "-c",
                          str(rig.cfg_path), "--tunnel", "keyed", "--since", "5m"],
                         capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr
    sections = parse_top(out.stdout)
    want = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    assert sections["SOURCE"] == [(s, n) for s, n in want]
    assert sections["DST PORT"] == [("80", total), ("5353", 3)]
    assert sections["PROTOCOL"] == [("tcp", total), ("udp", 3)]
    assert sections["TCP FLAGS"] == [("SYN", total)]
    assert sections["SAMPLE KIND"] == [("periodic", total + 3)]
    assert sections["DROP REASON"] == []


def parse_top(text: str) -> dict[str, list[tuple[str, int]]]:
    """Sections of `analytics top`: a title line `TITLE  SAMPLES  SHARE` (or `TITLE  -`), then
    `key  count  share%` rows, sections apart by a blank line."""
    out: dict[str, list[tuple[str, int]]] = {}
    cur = None
    for line in text.splitlines()[1:]:
        cols = line.split()
        if not cols:
            cur = None
        elif cur is None and cols[-2:] == ["SAMPLES", "SHARE"]:
            cur = " ".join(cols[:-2])
            out[cur] = []
        elif cur is None and cols[-1] == "-":
            out[" ".join(cols[:-1])] = []
        else:
            out[cur].append((cols[0], int(cols[1])))
    return out


def test_runtime_from_config_reads_pins_and_serves_metrics(rig, tmp_path):
    """Analytics.start with no data plane object: the pins of a data plane run elsewhere, the
    history file and the HTTP port from the [analytics] table."""
    import socket

    from pipeline.analytics.runtime import Analytics
    from pipeline.config import load
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = rig.cfg_path.read_text().replace("http_port = 0", f"http_port = {port}")
    text = text.replace("an.db", "runtime.db")
    path = tmp_path / "runtime.toml"
    path.write_text(text)
    cfg = load(path)
    frame = decap_frame(IP(src="203.0.113.7", dst=OUTSIDE) / UDP(sport=1, dport=2))
    with Analytics.start(cfg) as an:
        assert an.sampler is None and an.exporter.port == port
        for _ in range(12):
            rig.cust.send(frame)
            time.sleep(0.0005)
        assert len(rig.inet.recv_all(12, timeout=3, match=lambda f: f[23] == 17)) == 12
        deadline = time.monotonic() + 5
        while an.collector.snapshot()["traffic"].get(("plain", EGRESS), (0, 0))[0] < 12:
            assert time.monotonic() < deadline, an.collector.snapshot()
            time.sleep(0.1)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    got = {tuple(sorted(s.labels.items())): s.value
           for s in fams["xtransit_tunnel_packets"].samples}
    assert got[(("direction", "egress"), ("tunnel", "plain"))] == 12
    h = History(tmp_path / "runtime.db", readonly=True)
    assert sum(p.out_packets for p in h.points("plain", 0)) == 12


def test_live_rates_table(rig):
    """What `xtransit stats --watch` prints: a rates table per refresh, from the pins."""
    import threading

    from pipeline.analytics.live import rate_lines, watch
    frame = decap_frame(IP(src="203.0.113.7", dst=OUTSIDE) / UDP(sport=1, dport=2))
    stop = threading.Event()

    def send() -> None:
        while not stop.is_set():
            rig.cust.send(frame)
            time.sleep(0.002)
    t = threading.Thread(target=send)
    t.start()
    out: list[str] = []
    try:
        assert watch(rig.cfg, interval=0.3, count=2, echo=out.append, clear=False) == 2
    finally:
        stop.set()
        t.join()
    tables = [i for i, line in enumerate(out) if line.endswith("s") and "UTC, rates over" in line]
    assert len(tables) == 2
    header = out[tables[1] + 1].split()
    assert header[:3] == ["TUNNEL", "IN", "PPS"]
    plain = out[tables[1] + 2].split()
    assert plain[0] == "plain" and plain[1:3] == ["0", "0"] and float(plain[3]) > 0
    # exact arithmetic of one tick
    from pipeline.analytics.collector import Tick
    lines = rate_lines(rig.cfg, Tick(0.0, 2.0, {("keyed", INGRESS): (3000, 375_000)},
                                     {("keyed", "too_big_v6"): 4, (NODE, "unknown_tunnel"): 2},
                                     {}))
    assert lines[2].split() == ["keyed", "1.50k", "1.50M", "0", "0", "too_big_v6=2"]
    assert lines[-1].split() == ["(no", "tunnel)", "0", "0", "0", "0", "unknown_tunnel=1"]

"""State store benchmark: SA propagation latency between nodes, and SA install rate at scale.

1. Propagation (3-member etcd cluster on loopback, TLS, as in tests/etcd_cluster.py): node A
   (this process) writes Child SAs one at a time, paced; nodes B and C (separate processes, each
   on another etcd member) run ``SaSync`` into an installer that stamps each install with
   CLOCK_MONOTONIC (one clock for every process on the machine). Latency = last of B/C
   installed - A started the write. Baseline in the same run: the same writes as raw values
   watched by a plain ``EtcdStore.watch`` in another process (etcd's notification, our watch
   thread, no decode/unseal/install). The same measure for SQLite (two processes, one file).
2. Install rate: a node joining late rebuilds from N Child SAs already in the store (list at
   one revision, unseal, install into a ``RecordingSaInstaller``). Baseline in the same run: the
   bare paged list of the same records (the store's share).
3. The same into the real data path (``IpsecDataPath``, native ESP), and its memory: process RSS
   growth (/proc/self/statm) per Child SA (one inbound SA each, plus the tunnel's one outbound
   SA) over the install loop (idle SAs: the native module sets up a worker's cipher context on
   that worker's first packet for an SA), then after one valid packet through every SA (inbound
   SA i decrypted by worker i mod W, outbound SA of tunnel t encrypted by worker t mod W, as RSS
   would spread them), then after every worker has processed every SA (the worst case). The
   packets are built before the first RSS reading, so they are not counted. RSS growth depends
   on what the process freed before (a full run reuses heap pages its earlier phases freed and
   reads lower than ``--data-path-only``), so the malloc heap in use (glibc mallinfo2: every
   arena, so the native module's and libcrypto's allocations, not pymalloc's small objects) is
   reported beside it: it does not depend on that history.

    .venv/bin/python -m bench.bench_store              # full run (1000 paced writes, 200,000 SAs)
    .venv/bin/python -m bench.bench_store --quick      # smoke: 20 writes, 1,000 SAs
"""
from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from pipeline.sa import ChildSaParams, RecordingSaInstaller
from pipeline.store.crypto import FleetKey
from pipeline.store.etcd import EtcdStore, EtcdTls
from pipeline.store.schema import Layout, SharedState, encode_child_sa
from pipeline.store.sqlite import SqliteStore
from pipeline.sync import SaSync

FLEET_RAW = b"bench-fleet-key-0123456789abcdef-0123456789"
GAP_S = 0.01          # between paced writes: 100 SA writes per second
# SAs spread over this many tunnels: IpsecDataPath's tunnel index is 16 bits (1..65535), so
# the 100,000 tunnels do not fit one data path yet.
TUNNELS = 50_000
WARMUP = 10           # first writes of each pass, not counted (connections, first decode)


def make_sa(i: int) -> ChildSaParams:
    t = i % TUNNELS
    return ChildSaParams(
        tunnel_name=f"t{t:06d}", tunnel_id=f"{t:032x}", account_id="123456789",
        ike_sa=f"{i:016x}/{i + 1:016x}", spi_in=0x10000000 + i, spi_out=0x80000000 + i,
        encr="aes-gcm-16", encr_key_bits=256, integ=None, local_addr="192.0.2.1",
        remote_addr="198.51.100.7", encap_local_port=4500, encap_remote_port=4500,
        lifetime_soft_s=3000, lifetime_hard_s=3600,
        enc_key_in=os.urandom(32), enc_key_out=os.urandom(32), salt_in=os.urandom(4),
        salt_out=os.urandom(4))


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


# --- node processes ----------------------------------------------------------------------------
class StampInstaller:
    def __init__(self) -> None:
        self.t: dict[int, float] = {}

    def install(self, sa):
        self.t[sa.spi_in] = time.monotonic()

    def replace(self, old, sa):
        self.t[sa.spi_in] = time.monotonic()

    def delete(self, spi):
        pass


def _open(spec: dict):
    if spec["kind"] == "sqlite":
        return SqliteStore(spec["path"])
    tls = EtcdTls(*map(Path, spec["tls"]))
    return EtcdStore(spec["endpoints"], tls=tls, keepalive_s=1.0, keepalive_timeout_s=1.0)


def node_main(spec: dict, root: str, n: int, ready, out) -> None:
    """SaSync into a stamping installer until ``n`` SAs are in (or 120 s)."""
    store = _open(spec)
    inst = StampInstaller()
    sync = SaSync(SharedState(store, FleetKey(FLEET_RAW), Layout(root)), inst).start()
    ready.set()
    deadline = time.monotonic() + 120
    while len(inst.t) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    sync.stop()
    store.close()
    out.put(dict(inst.t))


def raw_main(spec: dict, prefix: str, n: int, ready, out) -> None:
    """A plain watch: stamps each raw event's arrival."""
    store = _open(spec)
    w = store.watch(prefix, store.revision() + 1)
    ready.set()
    t: dict[str, float] = {}
    deadline = time.monotonic() + 120
    while len(t) < n and time.monotonic() < deadline:
        for ev in w.get(0.5):
            t.setdefault(ev.key, time.monotonic())
    w.close()
    store.close()
    out.put(t)


def propagation(writer_spec: dict, node_specs: list[dict], n: int, tag: str) -> dict:
    ctx = mp.get_context("spawn")
    fleet = FleetKey(FLEET_RAW)
    root = f"/bench-{tag}-{time.monotonic_ns()}/"
    results = {}
    # Baseline: raw values of the same size, one plain watcher per node.
    out, readies, procs = ctx.Queue(), [], []
    prefix = root + "raw/"
    for spec in node_specs:
        ready = ctx.Event()
        p = ctx.Process(target=raw_main, args=(spec, prefix, n, ready, out))
        p.start()
        procs.append(p)
        readies.append(ready)
    for r in readies:
        r.wait(60)
    store = _open(writer_spec)
    layout = Layout(root)
    sas = [make_sa(i) for i in range(n)]
    values = [encode_child_sa(fleet, layout.sa(sa.tunnel_name, sa.spi_in), sa) for sa in sas]
    t0 = {}
    for i, v in enumerate(values):
        k = f"{prefix}{i:06d}"
        t0[k] = time.monotonic()
        store.put(k, v)
        time.sleep(GAP_S)
    stamps = [out.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
    results["raw"] = [max(s[k] for s in stamps) - t0[k] for k in list(t0)[WARMUP:]
                      if all(k in s for s in stamps)]
    # Ours: SaSync on each node, Child SAs written through SharedState.
    out, readies, procs = ctx.Queue(), [], []
    for spec in node_specs:
        ready = ctx.Event()
        p = ctx.Process(target=node_main, args=(spec, root, n, ready, out))
        p.start()
        procs.append(p)
        readies.append(ready)
    for r in readies:
        r.wait(60)
    shared = SharedState(store, fleet, layout, node=1)
    t0s = {}
    for sa in sas:
        t0s[sa.spi_in] = time.monotonic()
        shared.put_child_sa(sa)
        time.sleep(GAP_S)
    stamps = [out.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
    results["ours"] = [max(s[k] for s in stamps) - t0s[k] for k in list(t0s)[WARMUP:]
                       if all(k in s for s in stamps)]
    store.close()
    return results


# --- install rate ------------------------------------------------------------------------------
def load_etcd(store: EtcdStore, layout: Layout, fleet: FleetKey, sas) -> None:
    """Bulk load (setup, not timed): 128 puts per etcd transaction (its --max-txn-ops)."""
    from aetcd.rpc import rpc_pb2, rpc_pb2_grpc
    stub = rpc_pb2_grpc.KVStub(store._channel(0))
    ops = []
    for j, sa in enumerate(sas):
        key = layout.sa(sa.tunnel_name, sa.spi_in)
        ops.append(rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(
            key=key.encode(), value=encode_child_sa(fleet, key, sa))))
        if len(ops) == 128 or j == len(sas) - 1:
            stub.Txn(rpc_pb2.TxnRequest(success=ops), timeout=30)
            ops = []


def install_rate(store, layout: Layout, fleet: FleetKey, n: int) -> dict:
    t = time.perf_counter()
    listing = store.list(layout.sas)
    list_s = time.perf_counter() - t
    assert len(listing.records) == n, (len(listing.records), n)
    del listing
    inst = RecordingSaInstaller()
    sync = SaSync(SharedState(store, fleet, layout), inst)
    t = time.perf_counter()
    sync.rebuild()
    rebuild_s = time.perf_counter() - t
    assert len(inst.sas) == n and not sync.drops
    sync.stop()
    return {"n": n, "list_s": list_s, "rebuild_s": rebuild_s}


def _csum(h: bytes) -> int:
    s = sum(int.from_bytes(h[i:i + 2], "big") for i in range(0, len(h), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    import ipaddress
    h = bytearray(20)
    h[0], h[2:4], h[8], h[9] = 0x45, (20 + len(payload)).to_bytes(2, "big"), 64, proto
    h[12:16], h[16:20] = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    h[10:12] = _csum(bytes(h)).to_bytes(2, "big")
    return bytes(h) + payload


INNER = _ipv4("10.1.0.1", "10.2.0.1", 17, bytes(20))   # 40 bytes: 2 bytes of ESP padding


def esp_in_packet(sa: ChildSaParams) -> bytes:
    """One valid ESP packet (seq 1, RFC 4106 GCM) for sa's inbound SA, built with `cryptography`
    (independent of the native module), from the peer to our local address."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    hdr = sa.spi_in.to_bytes(4, "big") + (1).to_bytes(4, "big")
    iv = bytes(8)
    pt = INNER + bytes([1, 2, 2, 4])                       # padding 1 2, pad length, next header
    ct = AESGCM(sa.enc_key_in).encrypt(sa.salt_in + iv, pt, hdr)
    return _ipv4(sa.remote_addr, sa.local_addr, 50, hdr + iv + ct)


def one_packet_each(workers: list, wire: list[bytes], tunnels: list[int], spread: bool) -> float:
    """Every inbound SA decrypts its packet and every tunnel's outbound SA encrypts one, on worker
    i mod W (spread) or on every worker. Returns the seconds spent in the batch calls."""
    from pipeline.esp import PacketBatch
    nb = 256
    b = PacketBatch(nb, frame_size=256, headroom=96)
    spent = 0.0
    nw = len(workers)
    for wi, w in enumerate(workers):
        todo = wire[wi::nw] if spread else wire
        for j in range(0, len(todo), nb):
            b.fill(todo[j:j + nb])
            t = time.perf_counter()
            ok = w.decrypt(b)
            spent += time.perf_counter() - t
            # every worker on every SA: the packet (seq 1) is a replay after the first worker
            assert ok == b.count if spread else set(b.verdicts()) <= {"ok", "replay"}, \
                b.verdicts()[:4]
        todo = tunnels[wi::nw] if spread else tunnels
        for j in range(0, len(todo), nb):
            b.count = 0
            for k, tun in enumerate(todo[j:j + nb]):
                b.set(k, INNER, tunnel=tun)
            t = time.perf_counter()
            ok = w.encrypt(b)
            spent += time.perf_counter() - t
            assert ok == b.count, b.verdicts()[:4]
    return spent


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def heap_bytes() -> int:
    """Bytes of malloc'ed memory in use (glibc >= 2.33 mallinfo2, all arenas, mmap'ed blocks)."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def data_path_rate(store, layout: Layout, fleet: FleetKey, sas: list[ChildSaParams],
                   workers: int) -> dict:
    """Rebuild into the real native-ESP installer (pipeline.ipsec.IpsecDataPath); baseline: the
    same installer fed the already decoded SAs in a loop. The baseline's RSS growth per SA is
    the data path's memory (native SA table and IpsecDataPath's own bookkeeping), idle, then
    after one packet through each SA (see the module docstring)."""
    from pipeline.ipsec import IpsecDataPath, TunnelInfo
    n = len(sas)
    n_tunnels = min(TUNNELS, n)
    tunnels = {f"{t:032x}": TunnelInfo(f"t{t:06d}", t + 1) for t in range(n_tunnels)}
    buckets = max(4, min(24, n.bit_length()))     # about one SA per hash bucket
    wire = [esp_in_packet(sa) for sa in sas]      # before the first RSS reading
    dp = IpsecDataPath(tunnels, max_workers=workers, buckets_log2=buckets)
    esp_workers = [dp.ctx.worker() for _ in range(workers)]
    rss0, heap0 = rss_bytes(), heap_bytes()
    t = time.perf_counter()
    for sa in sas:
        dp.install(sa)
    direct_s = time.perf_counter() - t
    rss1, heap1 = rss_bytes(), heap_bytes()
    assert len(dp.installed()) == n
    first_s = one_packet_each(esp_workers, wire, list(range(1, n_tunnels + 1)), spread=True)
    rss2, heap2 = rss_bytes(), heap_bytes()
    one_packet_each(esp_workers, wire, list(range(1, n_tunnels + 1)), spread=False)
    rss3, heap3 = rss_bytes(), heap_bytes()
    for w in esp_workers:
        w.close()
    dp.close()
    dp = IpsecDataPath(tunnels, max_workers=workers, buckets_log2=buckets)
    sync = SaSync(SharedState(store, fleet, layout), dp)
    t = time.perf_counter()
    sync.rebuild()
    rebuild_s = time.perf_counter() - t
    assert len(dp.installed()) == n and not sync.drops
    sync.stop()
    dp.close()
    return {"n": n, "direct_s": direct_s, "rebuild_s": rebuild_s, "rss_idle": (rss1 - rss0) / n,
            "rss_active": (rss2 - rss0) / n, "rss_every": (rss3 - rss0) / n,
            "heap": [(h - heap0) / n for h in (heap1, heap2, heap3)],
            "first_us": first_s / (n + n_tunnels) * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--writes", type=int, default=1000)
    ap.add_argument("--sas", type=int, default=200_000)
    ap.add_argument("--dp-workers", type=int, default=4,
                    help="IpsecDataPath max_workers (its per-worker cipher contexts per SA)")
    ap.add_argument("--data-path-only", action="store_true",
                    help="only the IpsecDataPath rows (SQLite store)")
    a = ap.parse_args()
    writes, nsas = (30, 1000) if a.quick else (a.writes + WARMUP, a.sas)
    import logging

    from etcd_cluster import EtcdCluster
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    print(f"# bench_store: {platform.platform()}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs; {writes - WARMUP} paced writes ({1 / GAP_S:.0f}/s), {nsas} SAs")
    fleet = FleetKey(FLEET_RAW)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp, \
            EtcdCluster(Path(tmp) / "etcd") as cl:
        tls = [str(cl.tls.ca_file), str(cl.tls.cert_file), str(cl.tls.key_file)]
        eps = cl.endpoints

        def spec(first):
            return {"kind": "etcd", "endpoints": eps[first:] + eps[:first], "tls": tls}
        if not a.data_path_only:
            rows = []
            lat = propagation(spec(0), [spec(1), spec(2)], writes, "etcd")
            rows.append(("etcd, 3 members, A->B,C", lat))
            db = str(Path(tmp) / "state.db")
            SqliteStore(db).close()
            sq = {"kind": "sqlite", "path": db}
            rows.append(("sqlite, one file, A->B,C", propagation(sq, [sq, sq], writes, "sqlite")))
            print("\n| store | n | ours p50 (ms) | ours p99 (ms) | raw watch p50 (ms) "
                  "| raw watch p99 (ms) | p99 ours / raw |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for name, r in rows:
                o, w = r["ours"], r["raw"]
                print(f"| {name} | {len(o)} | {pct(o, 50) * 1e3:.2f} | {pct(o, 99) * 1e3:.2f} | "
                      f"{pct(w, 50) * 1e3:.2f} | {pct(w, 99) * 1e3:.2f} | "
                      f"{pct(o, 99) / pct(w, 99):.2f} |")
            etcd_p99 = pct(rows[0][1]["ours"], 99) * 1e3
            print(f"\ntarget etcd propagation p99 < 50 ms: {'met' if etcd_p99 < 50 else 'missed'} "
                  f"({etcd_p99:.2f} ms)")

        if not a.data_path_only:
            print("\n| store | SAs | rebuild (s) | installs/s | bare list (s) | list share |")
            print("|---|---:|---:|---:|---:|---:|")
        sas = [make_sa(i) for i in range(nsas)]
        for name in ("sqlite",) if a.data_path_only else ("sqlite", "etcd"):
            layout = Layout(f"/rate-{name}/")
            if name == "sqlite":
                store = SqliteStore(Path(tmp) / "rate.db", retain_revisions=0)
                for sa in sas:
                    key = layout.sa(sa.tunnel_name, sa.spi_in)
                    store.put(key, encode_child_sa(fleet, key, sa))
            else:
                store = cl.client(timeout=30.0)
                load_etcd(store, layout, fleet, sas)
            if not a.data_path_only:
                r = install_rate(store, layout, fleet, nsas)
                rate = r["n"] / r["rebuild_s"]
                print(f"| {name} | {r['n']:,} | {r['rebuild_s']:.2f} | {rate:,.0f} | "
                      f"{r['list_s']:.2f} | {r['list_s'] / r['rebuild_s']:.0%} |")
                print(f"target {name} >= 10,000 installs/s: "
                      f"{'met' if rate >= 10_000 else 'missed'}")
            if name == "sqlite":
                dpr = data_path_rate(store, layout, fleet, sas, a.dp_workers)
            store.close()
        rate = dpr["n"] / dpr["rebuild_s"]
        print(f"\nIpsecDataPath with max_workers={a.dp_workers}, {min(TUNNELS, nsas):,} tunnels")
        print("\n| into IpsecDataPath | SAs | rebuild (s) | installs/s | data path alone (s) "
              "| alone installs/s | rebuild / alone | RSS per SA pair, idle (bytes) "
              "| after one packet per SA | after every worker saw every SA "
              "| first packet of an SA on a worker (us) | malloc heap per SA pair: idle "
              "| after one packet | every worker |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| sqlite | {dpr['n']:,} | {dpr['rebuild_s']:.2f} | {rate:,.0f} | "
              f"{dpr['direct_s']:.2f} | {dpr['n'] / dpr['direct_s']:,.0f} | "
              f"{dpr['rebuild_s'] / dpr['direct_s']:.2f} | {dpr['rss_idle']:.0f} | "
              f"{dpr['rss_active']:.0f} | {dpr['rss_every']:.0f} | {dpr['first_us']:.2f} | "
              + " | ".join(f"{h:.0f}" for h in dpr["heap"]) + " |")
        print(f"target data path >= 10,000 installs/s: {'met' if rate >= 10_000 else 'missed'}; "
              f"< 1 KiB per SA pair: idle {'met' if dpr['rss_idle'] < 1024 else 'missed'}, "
              f"after one packet each {'met' if dpr['rss_active'] < 1024 else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

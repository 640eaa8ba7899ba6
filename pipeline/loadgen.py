"""Packet load generator on XDP live frames, and a counting sink for the far end.

:class:`LoadGen` runs bpf/loadgen.c through ``BPF_PROG_TEST_RUN`` with
``BPF_F_TEST_XDP_LIVE_FRAMES`` (the xdp-trafficgen technique): each run of the program really
transmits one frame out of a veth (XDP_TX out of the ingress device, or a redirect), at several
million frames per second on one core, where trafgen's AF_PACKET path stops near 0.5 Mpps here.
The program rebuilds the frame from a template on every run, because live-frame pages are recycled
without being reset and receivers rewrite headers in place.

:class:`Sink` attaches bpf/sink.c to an interface: it counts packets and bytes per CPU and drops.

veth facts that decide whether frames arrive at all (kernel 6.x):
  - a frame sent with XDP_TX/XDP_REDIRECT into a veth (``ndo_xdp_xmit``) is dropped unless the
    receiving peer has an XDP program in native mode or GRO enabled (that turns on the peer's NAPI);
    the loss shows only in the peer's ``ethtool -S`` ``rx_queue_0_drops`` (or the sender's
    ``tx_queue_0_xdp_xmit_errors``). :func:`veth_ready` checks it and :class:`LoadGen` refuses to
    start otherwise;
  - the receiver's NAPI runs on the sending CPU (the test run re-enables bottom halves after every
    batch), so one generator thread per CPU also carries the receivers' work on that CPU.

Dispatcher anchor: every XDP test run puts its program into the kernel's XDP dispatcher at the
start and takes it out at the end, and each change waits for an RCU grace period
(bpf_prog_test_run_xdp -> bpf_prog_change_xdp -> synchronize_rcu: 8-10 ms here, twice per
syscall of ~50 ms), during which nothing is sent. :class:`LoadGen` therefore keeps its program
attached in native mode to an idle veth of its own (``xlgd*``, nothing arrives there) while it
exists: a program already in the dispatcher only gains and loses a reference. Measured: without
the anchor the generator's CPU was ~45% idle during a timed run.

Threads: ``BPF_PROG_TEST_RUN`` resolves the ingress ifindex in the caller's network namespace,
so every generator thread enters the namespace with setns(2) (which affects only that thread),
pins itself to its CPU and runs the syscall with the GIL released (ctypes).

    .venv/bin/python -m pipeline.loadgen --netns NS --dev veth0 --dst-mac 02:00:00:00:00:02 \\
        --flow 10.0.0.1:1000 10.0.0.2:9 --size 64 --seconds 5 --cpus 0,1
    (--tcp-syn for SYNs with MSS 1460, --gre SRC DST [--gre-key K] to encapsulate them,
    --count N instead of --seconds)
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from pipeline.xdp import testrun

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
LOADGEN_SRC = BPF_DIR / "loadgen.c"
SINK_SRC = BPF_DIR / "sink.c"

FRAME_MAX = 2048  # LG_FRAME_MAX in bpf/loadgen.h (passed as -D, so the two always agree)
MAX_FRAMES = 64  # LG_MAX_FRAMES
HEADER_COPY = 256  # default bytes rewritten per run: every header a receiver may touch
LG_F_CSUM_UDP = 1
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODES = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
_CLONE_NEWNET = 0x40000000
_CHUNK_MAX = 1 << 22  # frames per syscall at most (~0.5 s; a syscall is not interrupted early)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class LoadGenError(RuntimeError):
    """The generator or sink cannot run as asked; the message says why and what to change."""


# --- frames ------------------------------------------------------------------------------------

def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _mac(text: str) -> bytes:
    b = bytes.fromhex(text.replace(":", "").replace("-", ""))
    if len(b) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    return b


def ipv4_packet(src: str, dst: str, proto: int, l4: bytes, *, ttl: int = 64, ident: int = 0,
                df: bool = True) -> bytes:
    """An IPv4 packet (20-byte header, valid checksum) around an L4 segment."""
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident, 0x4000 if df else 0, ttl,
                      proto, 0, ipaddress.IPv4Address(src).packed,
                      ipaddress.IPv4Address(dst).packed)
    return hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:] + l4


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    return (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
            + struct.pack("!BBH", 0, proto, length))


def udp_segment(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    c = _csum(_pseudo(src, dst, 17, len(seg)) + seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", c) + seg[8:]


def tcp_syn_segment(src: str, dst: str, sport: int, dport: int, *, mss: int | None = 1460,
                    payload: bytes = b"", seq: int = 0x01020304) -> bytes:
    """A TCP SYN (with an MSS option unless ``mss`` is None) and a valid checksum."""
    opts = struct.pack("!BBH", 2, 4, mss) if mss is not None else b""
    doff = (20 + len(opts)) // 4
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, doff << 4, 0x02, 64240, 0, 0)
    seg += opts + payload
    c = _csum(_pseudo(src, dst, 6, len(seg)) + seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def ethernet(dst_mac: str, src_mac: str, ethertype: int, payload: bytes) -> bytes:
    return _mac(dst_mac) + _mac(src_mac) + struct.pack("!H", ethertype) + payload


def pad_ipv4_to(inner_size: int, build) -> bytes:
    """Build an IPv4 packet of exactly ``inner_size`` bytes: ``build(payload)`` is called with the
    payload length that makes it so."""
    headers = len(build(b""))
    if inner_size < headers:
        raise ValueError(f"{inner_size} bytes is shorter than the headers ({headers})")
    pattern = bytes(range(256)) * (inner_size // 256 + 1)
    return build(pattern[: inner_size - headers])


def gre_header(proto: int = 0x0800, key: int | None = None) -> bytes:
    """A GRE header (RFC 2784; the key per RFC 2890), no checksum, no sequence number."""
    flags = 0x2000 if key is not None else 0
    return struct.pack("!HH", flags, proto) + (struct.pack("!I", key) if key is not None else b"")


# --- flow field detection ----------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    """One template frame and how it varies. ``vary_off`` names a 16-bit field that takes
    ``vary_range`` consecutive values (flows for receivers' hashes); ``csum_off`` the checksum
    covering it, adjusted incrementally. ``copy_len``: bytes rewritten per run (None: the
    headers, up to 256 bytes, or the whole frame when the templates differ in length)."""

    data: bytes
    vary_off: int = 0
    vary_range: int = 1
    csum_off: int = 0
    csum_udp: bool = False
    copy_len: int | None = None

    def __post_init__(self) -> None:
        n = len(self.data)
        if not 14 <= n <= FRAME_MAX:
            raise ValueError(f"a frame must have 14 to {FRAME_MAX} bytes, got {n}")
        for name, off in (("vary_off", self.vary_off), ("csum_off", self.csum_off)):
            if off and not 14 <= off <= n - 2:
                raise ValueError(f"{name}={off} is outside the frame (14..{n - 2})")
        if not 1 <= self.vary_range <= 0xFFFF:
            raise ValueError(f"vary_range must be 1..65535, got {self.vary_range}")
        if self.csum_off and not self.vary_off:
            raise ValueError("csum_off without vary_off")
        if self.copy_len is not None and not 14 <= self.copy_len <= n:
            raise ValueError(f"copy_len must be 14..{n}, got {self.copy_len}")

    @classmethod
    def flows(cls, data: bytes, count: int, **kw) -> Frame:
        """The frame with its innermost UDP/TCP source port stepping through ``count`` values
        (IPv4 or IPv6, plain or inside GRE without a GRE checksum), checksum kept valid.
        A frame without such a port is sent unchanged."""
        found = l4_source_port(data)
        if found is None or count <= 1:
            return cls(data, **kw)
        port_off, csum_off, is_udp = found
        if is_udp and data[csum_off:csum_off + 2] == b"\0\0":
            csum_off = 0  # UDP over IPv4 without a checksum stays without one
        return cls(data, vary_off=port_off, vary_range=count, csum_off=csum_off,
                   csum_udp=is_udp, **kw)


def l4_source_port(frame: bytes) -> tuple[int, int, bool] | None:
    """(offset of the source port, offset of the L4 checksum, is UDP) of the innermost UDP or TCP
    header in an Ethernet frame, looking through one GRE layer; None when there is none or when
    changing it would invalidate a checksum we do not update (a GRE checksum)."""
    off, ethertype = 14, struct.unpack_from("!H", frame, 12)[0] if len(frame) >= 14 else 0
    for _layer in range(2):
        if ethertype == 0x0800 and len(frame) >= off + 20:
            ihl = (frame[off] & 0x0F) * 4
            frag = struct.unpack_from("!H", frame, off + 6)[0] & 0x3FFF
            if frame[off] >> 4 != 4 or ihl < 20 or frag:
                return None
            proto, off = frame[off + 9], off + ihl
        elif ethertype == 0x86DD and len(frame) >= off + 40:
            proto, off = frame[off + 6], off + 40
        else:
            return None
        if proto == 17 and len(frame) >= off + 8:
            return off, off + 6, True
        if proto == 6 and len(frame) >= off + 20:
            return off, off + 16, False
        if proto != 47 or len(frame) < off + 4:
            return None
        flags, ethertype = struct.unpack_from("!HH", frame, off)
        if flags & 0x8000 or flags & 0x4007:  # checksum present, routing, version != 0
            return None
        off += 4 + (4 if flags & 0x2000 else 0) + (4 if flags & 0x1000 else 0)
    return None


# --- namespaces, attach ------------------------------------------------------------------------

@contextlib.contextmanager
def _thread_in_netns(name: str | None):
    """Move the calling thread into namespace ``name`` (None: stay) and back afterwards."""
    if name is None:
        yield
        return
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LoadGenError(f"setns into {name}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(back, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise LoadGenError(f"setns back from {name}: {os.strerror(err)}")
    finally:
        os.close(target)
        os.close(back)


def _ns_name(ns) -> str | None:
    return None if ns is None else getattr(ns, "name", ns)


def _run_in(ns_name: str | None, *cmd: str) -> str:
    full = list(cmd) if ns_name is None else ["ip", "netns", "exec", ns_name, *cmd]
    proc = subprocess.run(full, check=False, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise LoadGenError(f"{' '.join(full)}: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def _ifindex(ifname: str) -> int:
    """The index of ``ifname`` in the calling thread's namespace."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        raise LoadGenError(f"no interface {ifname!r} in this namespace") from None


def ethtool_stats(ns, ifname: str) -> dict[str, int]:
    """``ethtool -S`` of an interface in a namespace, as a dict of integers."""
    out = _run_in(_ns_name(ns), "ethtool", "-S", ifname)
    stats = {}
    for line in out.splitlines()[1:]:
        key, _, value = line.strip().partition(":")
        with contextlib.suppress(ValueError):
            stats[key.strip()] = int(value)
    return stats


def link_stats(ns, ifname: str) -> dict[str, int]:
    """The kernel's rtnl_link_stats64 counters (``ip -s link``) as a dict."""
    out = _run_in(_ns_name(ns), "ip", "-j", "-s", "-s", "link", "show", "dev", ifname)
    st = json.loads(out)[0]["stats64"]
    return {f"{d}_{k}": v for d in ("rx", "tx") for k, v in st[d].items()
            if isinstance(v, int)}


def features(ns, ifname: str) -> dict[str, str]:
    out = _run_in(_ns_name(ns), "ethtool", "-k", ifname)
    feats = {}
    for line in out.splitlines()[1:]:
        key, _, value = line.strip().partition(":")
        feats[key.strip()] = value.strip().split(" ")[0]
    return feats


def xdp_attached(ns, ifname: str) -> str | None:
    """'native', 'generic' or None: the XDP mode of the program on ``ifname``, if any."""
    link = json.loads(_run_in(_ns_name(ns), "ip", "-j", "-d", "link", "show", "dev", ifname))[0]
    mode = (link.get("xdp") or {}).get("mode")
    return {1: "native", 2: "generic"}.get(mode, None if mode in (None, 0) else str(mode))


def veth_ready(ns, ifname: str) -> str | None:
    """Why a frame transmitted by XDP *to* ``ifname`` (a veth end receiving from its peer's
    XDP_TX/redirect) would be dropped, or None when it will be received: the veth needs an XDP
    program in native mode or GRO on (either starts its NAPI; without, ``ndo_xdp_xmit`` drops)."""
    if xdp_attached(ns, ifname) == "native":
        return None
    if features(ns, ifname).get("generic-receive-offload") == "on":
        return None
    return (f"{_ns_name(ns) or ''}/{ifname}: XDP frames sent to this veth are dropped (it has no "
            f"native XDP program and GRO is off): attach one or run `ethtool -K {ifname} gro on`")


def attach(bpf, fn_name: str, ns, ifname: str, mode: str = "native") -> None:
    """Attach ``fn_name`` of a bcc BPF object to ``ifname`` in namespace ``ns`` (replacing any
    program already there in that mode)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    from bcc import BPF
    fn = bpf.load_func(fn_name.encode(), BPF.XDP)
    with _thread_in_netns(_ns_name(ns)):
        try:
            BPF.attach_xdp(ifname.encode(), fn, MODES[mode])
        except Exception as exc:  # bcc raises a bare Exception
            raise LoadGenError(f"attach {fn_name} to {ifname} ({mode}): {exc}") from exc


def detach(ns, ifname: str, mode: str = "native") -> None:
    from bcc import BPF
    with _thread_in_netns(_ns_name(ns)):
        try:
            BPF.remove_xdp(ifname.encode(), MODES[mode])
        except Exception as exc:
            raise LoadGenError(f"detach XDP from {ifname} ({mode}): {exc}") from exc


def _compile(src: Path, cflags: Iterable[str] = ()):
    from bcc import BPF
    flags = [f"-I{BPF_DIR}", f"-DLG_FRAME_MAX={FRAME_MAX}", f"-DLG_MAX_FRAMES={MAX_FRAMES}",
             *cflags]
    try:
        return BPF(src_file=str(src).encode(), cflags=flags)
    except Exception as exc:
        raise LoadGenError(f"compiling {src.name} failed: {exc}") from exc


def compile_sink():
    """bpf/sink.c compiled once, for several :class:`Sink` objects (``Sink(..., bpf=...)``)."""
    return _compile(SINK_SRC)


def _percpu_sum(table, fields: Sequence[str]) -> dict[str, int]:
    leaf = table[table.Key(0)]
    return {f: sum(getattr(v, f) for v in leaf) for f in fields}


# --- the sink ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SinkCount:
    packets: int
    bytes: int

    def __sub__(self, other: SinkCount) -> SinkCount:
        return SinkCount(self.packets - other.packets, self.bytes - other.bytes)


class Sink:
    """Counts and drops everything arriving at ``ifname`` in namespace ``ns`` (XDP, ``mode``
    'native' or 'generic'). Generic mode on a veth fed by XDP frames needs GRO on that veth (see
    the module docstring): ``gro=True`` turns it on."""

    def __init__(self, ns, ifname: str, mode: str = "native", *, gro: bool | None = None,
                 bpf=None):
        self.ns, self.ifname, self.mode = ns, ifname, mode
        self._owned = bpf is None  # a program from compile_sink() is the caller's to clean up
        self._bpf = compile_sink() if bpf is None else bpf
        self._attached = False
        try:
            if gro is not None:
                _run_in(_ns_name(ns), "ethtool", "-K", ifname, "gro", "on" if gro else "off")
            attach(self._bpf, "xdp_sink", ns, ifname, mode)
            self._attached = True
        except BaseException:
            if self._owned:
                self._bpf.cleanup()
            raise
        self._table = self._bpf[b"sink_counters"]
        self._base = self._raw()

    def _raw(self) -> SinkCount:
        c = _percpu_sum(self._table, ("packets", "bytes"))
        return SinkCount(c["packets"], c["bytes"])

    def count(self) -> SinkCount:
        """Packets and bytes counted since this Sink was attached."""
        return self._raw() - self._base

    def close(self) -> None:
        if self._attached:
            self._attached = False
            with contextlib.suppress(LoadGenError):  # the namespace may already be gone
                detach(self.ns, self.ifname, self.mode)
        if self._owned:
            self._bpf.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the generator -----------------------------------------------------------------------------

def _fill_templates(bpf, frames: Sequence[Frame], redirect_ifindex: int = 0) -> None:
    """Write the templates and settings into a compiled bpf/loadgen.c."""
    same_len = len({len(f.data) for f in frames}) == 1
    table = bpf[b"lg_frames"]
    for i, f in enumerate(frames):
        leaf = table.Leaf()
        leaf.len = len(f.data)
        leaf.copy_len = f.copy_len or (min(len(f.data), HEADER_COPY) if same_len
                                       else len(f.data))
        leaf.vary_off, leaf.vary_range, leaf.csum_off = f.vary_off, f.vary_range, f.csum_off
        leaf.flags = LG_F_CSUM_UDP if f.csum_udp else 0
        ctypes.memmove(ctypes.addressof(leaf.data), f.data, len(f.data))
        table[table.Key(i)] = leaf
    cfg = bpf[b"lg_config"]
    leaf = cfg.Leaf()
    leaf.nframes = len(frames)
    leaf.ifindex = redirect_ifindex
    cfg[cfg.Key(0)] = leaf


@dataclass
class GenResult:
    """What the generator's program sent (XDP_TX/redirect returned) and in how long. Whether the
    veth then delivered the frames is for the receiver's counters to say."""

    packets: int
    bytes: int
    errors: int
    seconds: float
    per_thread: list[int] = field(default_factory=list)

    @property
    def pps(self) -> float:
        return self.packets / self.seconds if self.seconds > 0 else 0.0


class LoadGen:
    """Send template frames at full speed out of ``ifname`` in namespace ``ns``.

    ``frames``: bytes or :class:`Frame` objects, sent round-robin. ``cpus``: one thread per CPU
    (default: the CPU the caller may run on, first one only). ``redirect_to``: an interface in
    the same namespace to redirect to (default: XDP_TX out of ``ifname`` itself, delivered to its
    veth peer). ``check_peer``: refuse to start when the frames would be dropped silently
    (requires ``peer_ns``/``peer_ifname``, the receiving end, when given).
    """

    def __init__(self, ns, ifname: str, frames: Sequence[bytes | Frame], *,
                 cpus: Sequence[int] | None = None, redirect_to: str | None = None,
                 batch_size: int = 64, peer: tuple[object, str] | None = None):
        if not frames:
            raise ValueError("at least one frame")
        if len(frames) > MAX_FRAMES:
            raise ValueError(f"at most {MAX_FRAMES} frames, got {len(frames)}")
        if not 1 <= batch_size <= 256:
            raise ValueError("batch_size must be 1..256 (the kernel's limit)")
        self.frames = [f if isinstance(f, Frame) else Frame(bytes(f)) for f in frames]
        self.ns_name = _ns_name(ns)
        self.ifname = ifname
        self.cpus = list(cpus) if cpus else [min(os.sched_getaffinity(0))]
        self.batch_size = batch_size
        self._stop = threading.Event()
        if peer is not None:
            why = veth_ready(*peer)
            if why:
                raise LoadGenError(why)
        with _thread_in_netns(self.ns_name):
            self.ifindex = _ifindex(ifname)
            self.redirect_ifindex = _ifindex(redirect_to) if redirect_to else 0
        self._bpf = _compile(LOADGEN_SRC)
        self._anchor: str | None = None
        try:
            from bcc import BPF
            self._fn = self._bpf.load_func(b"xdp_loadgen", BPF.XDP)
            self._fill_maps()
            self._anchor_in_dispatcher()
        except BaseException:
            self.close()
            raise

    _anchors = 0

    def _anchor_in_dispatcher(self) -> None:
        """Attach the program natively to an idle veth pair of its own (module docstring)."""
        LoadGen._anchors += 1
        name = f"xlgd{os.getpid() % 100000}.{LoadGen._anchors % 100}"
        _run_in(self.ns_name, "ip", "link", "add", name, "type", "veth", "peer", "name",
                name + "p")
        self._anchor = name
        with _thread_in_netns(self.ns_name):
            self._bpf.attach_xdp(name.encode(), self._fn, XDP_FLAGS_DRV_MODE)

    def _fill_maps(self) -> None:
        _fill_templates(self._bpf, self.frames, self.redirect_ifindex)

    def counters(self) -> dict[str, int]:
        return _percpu_sum(self._bpf[b"lg_counters"], ("runs", "sent", "bytes", "errors"))

    def _worker(self, cpu: int, count: int | None, seconds: float | None,
                out: list, slot: int, start: threading.Barrier) -> None:
        try:
            os.sched_setaffinity(0, {cpu})  # 0: the calling thread
            frame = self.frames[0].data
            sent = 0
            with _thread_in_netns(self.ns_name):
                start.wait()
                deadline = time.monotonic() + (seconds or 0.0)
                if count is not None:
                    while sent < count and not self._stop.is_set():
                        # whole syscalls are not interrupted by Ctrl-C (the signal goes to the
                        # main thread): chunks of at most _CHUNK_MAX keep a stop prompt
                        n = min(count - sent, _CHUNK_MAX)
                        testrun.live_frames(self._fn.fd, frame, repeat=n,
                                            ingress_ifindex=self.ifindex,
                                            batch_size=self.batch_size)
                        sent += n
                else:
                    chunk = 1 << 16
                    while not self._stop.is_set():
                        t0 = time.monotonic()
                        if t0 >= deadline:
                            break
                        testrun.live_frames(self._fn.fd, frame, repeat=chunk,
                                            ingress_ifindex=self.ifindex,
                                            batch_size=self.batch_size)
                        sent += chunk
                        took = time.monotonic() - t0
                        # aim at ~50 ms per call, never past the deadline by much
                        left = deadline - time.monotonic()
                        rate = chunk / max(took, 1e-6)
                        chunk = int(max(1024, min(_CHUNK_MAX, rate * min(0.05, left))))
            out[slot] = sent
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, re-raised
            out[slot] = exc
            with contextlib.suppress(threading.BrokenBarrierError):
                start.abort()

    def _run(self, count: int | None, seconds: float | None) -> GenResult:
        before = self.counters()
        n = len(self.cpus)
        out: list = [0] * n
        start = threading.Barrier(n + 1)
        counts = ([count // n + (1 if i < count % n else 0) for i in range(n)]
                  if count is not None else [None] * n)
        threads = []
        for i, cpu in enumerate(self.cpus):
            t = threading.Thread(target=self._worker, name=f"loadgen-cpu{cpu}",
                                 args=(cpu, counts[i], seconds, out, i, start))
            threads.append(t)
            t.start()
        try:
            start.wait()
        except threading.BrokenBarrierError:
            pass
        t0 = time.monotonic()
        try:
            for t in threads:
                t.join()
        except BaseException:  # Ctrl-C, SIGTERM turned into KeyboardInterrupt: stop them
            self._stop.set()
            for t in threads:
                t.join()
            raise
        finally:
            self._stop.clear()
        elapsed = time.monotonic() - t0
        errors = [x for x in out if isinstance(x, BaseException)]
        if errors:
            raise LoadGenError(f"generator thread failed: {errors[0]}") from errors[0]
        after = self.counters()
        return GenResult(after["sent"] - before["sent"], after["bytes"] - before["bytes"],
                         after["errors"] - before["errors"], elapsed, list(out))

    def send(self, count: int) -> GenResult:
        """Send exactly ``count`` frames (split evenly over the CPUs)."""
        if count < 1:
            raise ValueError("count must be at least 1")
        return self._run(count, None)

    def run(self, seconds: float) -> GenResult:
        """Send for about ``seconds`` (whole syscalls of ~50 ms; the result has the real time)."""
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        return self._run(None, seconds)

    def close(self) -> None:
        if self._anchor is not None:   # deleting the pair detaches the program
            with contextlib.suppress(LoadGenError):
                _run_in(self.ns_name, "ip", "link", "del", self._anchor)
            self._anchor = None
        self._bpf.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- per-packet program cost --------------------------------------------------------------------

class CostRig:
    """Per-packet cost of an XDP program with BPF_PROG_TEST_RUN and repeat, on a frame the
    program may rewrite.

    A plain repeated test run executes the program on one buffer over and over, so from the
    second run on a program that rewrites the packet sees its own output (a TTL decrement ends
    in XDP_PASS after 63 runs, a decapsulation decapsulates the inner packet). The rig is
    bpf/loadgen.c built with -DLG_COST_RIG: it restores the frame (head position and header
    bytes) and tail-calls the program under test, so every run sees the template. Its own cost,
    measured with a callee that returns at once (``reference_fd``), is subtracted, and the
    standalone cost of that callee added back (the test-run loop itself), so the figure is
    comparable with a plain repeated run of a program that does not rewrite packets.

    ``frames``: the :class:`Frame` (or bytes) to time the program on; ``copy_len`` of the
    frame covers every byte the program rewrites (default: the first 256 bytes).
    """

    def __init__(self, frame: bytes | Frame, reference_fd: int):
        self.frame = frame if isinstance(frame, Frame) else Frame(bytes(frame))
        self.reference_fd = reference_fd
        self._bpf = _compile(LOADGEN_SRC, ["-DLG_COST_RIG"])
        try:
            from bcc import BPF
            self._fn = self._bpf.load_func(b"xdp_loadgen", BPF.XDP)
            _fill_templates(self._bpf, [self.frame])
        except BaseException:
            self._bpf.cleanup()
            raise

    def _timed(self, fd: int, repeat: int, ifindex: int, rig: bool):
        if not rig:
            return testrun.run(fd, self.frame.data, repeat=repeat, ingress_ifindex=ifindex)
        target = self._bpf[b"lg_target"]
        target[ctypes.c_int(0)] = ctypes.c_int(fd)
        before = self.counters()
        res = testrun.run(self._fn.fd, self.frame.data, repeat=repeat, ingress_ifindex=ifindex)
        after = self.counters()
        runs, errors = after["runs"] - before["runs"], after["errors"] - before["errors"]
        if runs != repeat or errors:
            raise LoadGenError(f"cost rig: {runs} runs for {repeat} asked, {errors} failed "
                               f"(the program under test moved the tail, or no tail call)")
        return res

    def counters(self) -> dict[str, int]:
        return _percpu_sum(self._bpf[b"lg_counters"], ("runs", "sent", "bytes", "errors"))

    def cost_ns(self, prog_fd: int, *, ns=None, ifname: str | None = None,
                repeat: int = 200_000, rounds: int = 5, expect: int | None = None) -> float:
        """Nanoseconds per run of ``prog_fd`` on the frame: best of ``rounds`` of
        (rig + program) - (rig + reference) + (reference alone). Runs in ``ns`` with ``ifname``
        as the ingress device (FIB lookups resolve there). ``expect``: the action every timed
        run must end with (a cost measured on another path is refused)."""
        with _thread_in_netns(_ns_name(ns)):
            ifindex = _ifindex(ifname) if ifname else 0
            best = {"prog": float("inf"), "rig": float("inf"), "ref": float("inf")}
            for _ in range(rounds):
                for key, fd, rig in (("prog", prog_fd, True), ("rig", self.reference_fd, True),
                                     ("ref", self.reference_fd, False)):
                    res = self._timed(fd, repeat, ifindex, rig)
                    if key == "prog" and expect is not None and res.action != expect:
                        raise LoadGenError(f"program returned {res.action!r}, "
                                           f"expected {expect!r}")
                    best[key] = min(best[key], res.duration_ns)
        return best["prog"] - best["rig"] + best["ref"]

    def close(self) -> None:
        self._bpf.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- command line ------------------------------------------------------------------------------

def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return str(ipaddress.IPv4Address(host)), int(port)


def frame_from_args(a: argparse.Namespace) -> bytes:
    (src, sport), (dst, dport) = _endpoint(a.flow[0]), _endpoint(a.flow[1])
    proto = 6 if a.tcp_syn else 17

    def build(payload: bytes) -> bytes:
        l4 = (tcp_syn_segment(src, dst, sport, dport, payload=payload) if a.tcp_syn
              else udp_segment(src, dst, sport, dport, payload))
        return ipv4_packet(src, dst, proto, l4)

    inner = pad_ipv4_to(a.size, build)
    if a.gre:
        outer_src, outer_dst = a.gre
        inner = ipv4_packet(outer_src, outer_dst, 47, gre_header(0x0800, a.gre_key) + inner)
    return ethernet(a.dst_mac, a.src_mac, 0x0800, inner)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.loadgen",
        description="Send IPv4 UDP or TCP SYN frames (optionally inside GRE) at full speed out "
                    "of an interface with XDP live frames. Frames go to the interface's peer: "
                    "use a veth whose peer has a native XDP program or GRO on (else the "
                    "kernel drops them silently); on a real NIC use trafgen (bench/trafgen/).")
    p.add_argument("--netns", help="network namespace of the interface (default: this one)")
    p.add_argument("--dev", required=True, help="sending interface")
    p.add_argument("--src-mac", default="02:00:00:00:00:01")
    p.add_argument("--dst-mac", required=True, help="MAC of the receiving interface")
    p.add_argument("--flow", nargs=2, metavar=("SRC:PORT", "DST:PORT"), required=True)
    p.add_argument("--tcp-syn", action="store_true", help="TCP SYN with MSS 1460 (default UDP)")
    p.add_argument("--gre", nargs=2, metavar=("OUTER_SRC", "OUTER_DST"),
                   help="encapsulate in GRE (RFC 2784) between these addresses")
    p.add_argument("--gre-key", type=lambda s: int(s, 0), help="GRE key (RFC 2890)")
    p.add_argument("--size", type=int, default=46, help="inner IPv4 packet size (default 46)")
    p.add_argument("--flows", type=int, default=256, help="source ports to step through")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--count", type=int, help="send exactly this many frames")
    g.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--cpus", default=None, help="comma-separated CPUs, one thread each")
    a = p.parse_args(argv)
    if a.gre_key is not None and not a.gre:
        p.error("--gre-key needs --gre")
    frame = frame_from_args(a)
    cpus = [int(c) for c in a.cpus.split(",")] if a.cpus else None
    try:
        with LoadGen(a.netns, a.dev, [Frame.flows(frame, a.flows)], cpus=cpus) as gen:
            res = gen.send(a.count) if a.count else gen.run(a.seconds)
    except (LoadGenError, OSError, ValueError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loadgen: interrupted", file=sys.stderr)
        return 130
    print(f"sent {res.packets} frames of {len(frame)} bytes in {res.seconds:.3f} s: "
          f"{res.pps / 1e6:.3f} Mpps, {res.bytes * 8 / res.seconds / 1e9:.3f} Gbit/s "
          f"({res.errors} errors; delivery: see the receiver's counters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GRE data plane: compile bpf/xdp_edge.c with bcc, attach it, fill its maps from a Config.

    with Dataplane(cfg, ifaces=["eth0", "eth1"], mode="native") as dp:
        ...                      # forwarding
        dp.apply(new_cfg)        # map updates only: unchanged tunnels are not touched
        dp.counters()            # per-tunnel, per-reason counters summed over CPUs

Attaching replaces whatever XDP program an interface has (a crashed run's, in either mode)
instead of failing or stacking. Maps are pinned under /sys/fs/bpf/xtransit/<node name>/ so a
separate ``xtransit stats`` can read them. ``close()`` (also on leaving the ``with`` block, and
on SIGTERM under :func:`serve`) detaches everything and removes the pins.

veth: a native-mode XDP_REDIRECT or XDP_TX into a veth is dropped silently unless the receiving
(peer) end runs an XDP program or has GRO on. For every attached veth in native mode the data
plane attaches a pass-only program (``xdp_peer_pass``) to the peer when it has none, in the
peer's namespace when that namespace is named (/run/netns); otherwise it logs what is missing.
In generic mode it turns GRO on for the attached veths (the generic path needs it for speed).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import logging
import os
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from ..config import Config, GreTunnel, IpsecTunnel
from . import maps as _maps
from .source import amalgamate

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
PROGRAM = BPF_DIR / "xdp_edge.c"
ENTRY, PEER_PASS = b"xdp_edge", b"xdp_peer_pass"
XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 1 << 1, 1 << 2
MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
# IFLA_XDP_ATTACHED (XDP_ATTACHED_DRV / _SKB), as a number or as pyroute2 decodes it
ATTACHED_MODE = {1: "native", 2: "generic", "xdp": "native", "xdpgeneric": "generic"}
KIND_GRE, KIND_IPSEC = 1, 2                    # bpf/consts.h XT_KIND_*
TUN_F_KEY, TUN_F_PIN_FWD = 0x1, 0x2
EP_TUNNEL, EP_FLEET = 1, 2                     # xt_endpoints values
DECAP_FLEET_PEER = 0xFFFFFFFF                  # xt_gre_decap value of a fleet node's entry
PIN_TTL = 64                                   # outer TTL of GRE between fleet nodes
MAX_ECMP = 8
MAPS = ("xt_endpoints", "xt_gre_decap", "xt_tunnels", "xt_routes4", "xt_routes6",
        "xt_pin_nodes", "xt_tunnel_stats", "xt_reason_stats", "xt_tunnel_drops")
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


class DataplaneError(RuntimeError):
    """Loading, attaching or configuring the data plane failed; the message says how."""


class LoadError(DataplaneError):
    """bcc could not compile the program or the verifier rejected it. ``log`` holds the whole
    compiler output and verifier log, which the message includes too."""

    def __init__(self, what: str, log_text: str) -> None:
        self.log = log_text
        super().__init__(f"{what}\n--- compiler and verifier output ---\n{log_text.rstrip()}")


@contextlib.contextmanager
def _capture_stderr() -> Iterator[list[str]]:
    """Collect what bcc and libbpf write to fd 2 (clang diagnostics, the verifier log)."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


@dataclass
class Program:
    """The compiled and loaded program (no attachment, maps empty)."""
    bpf: object
    entry: object
    peer_pass: object
    cflags: tuple[str, ...]
    touched: set[int] = field(default_factory=set)   # tunnel slots ever written (array maps)

    @property
    def fd(self) -> int:
        return self.entry.fd

    def table(self, name: str):
        return self.bpf[name.encode()]

    def map_fds(self) -> dict[str, int]:
        return {n: self.table(n).map_fd for n in MAPS}

    def close(self) -> None:
        self.bpf.cleanup()


def compile_program(cflags: Iterable[str] = (), path: Path = PROGRAM) -> Program:
    """Compile and load. Feature switches and sizes come as -D flags (e.g. XT_MAX_TUNNELS)."""
    from bcc import BPF
    flags = (f"-I{path.parent}", *cflags)
    text = amalgamate(path)
    with _capture_stderr() as err:
        try:
            b = BPF(text=text.encode(), cflags=list(flags))
        except Exception as e:  # noqa: BLE001 - bcc raises plain Exception
            failure: tuple[str, Exception] | None = (f"cannot compile {path}: {e}", e)
        else:
            failure = None
    if failure:
        raise LoadError(failure[0], "".join(err)) from failure[1]
    with _capture_stderr() as err:
        try:
            entry = b.load_func(ENTRY, BPF.XDP)
            peer = b.load_func(PEER_PASS, BPF.XDP)
        except Exception as e:  # noqa: BLE001
            failure = (f"the kernel rejected {path}: {e}", e)
    if failure:
        b.cleanup()
        raise LoadError(failure[0], "".join(err)) from failure[1]
    warnings = "".join(err).strip()
    if warnings:
        log.warning("bcc: %s", warnings)
    return Program(b, entry, peer, tuple(flags))


# --- the flow hash, as bpf/route.h computes it ---------------------------------------------------

def _mix32(h: int) -> int:
    h &= 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    h ^= h >> 16
    return h


def _raw32(b: bytes) -> int:
    return int.from_bytes(b, "little")  # the C loads wire bytes into a host-order u32


def flow_hash4(src: str, dst: str, proto: int, sport: int = 0, dport: int = 0) -> int:
    ports = _raw32(sport.to_bytes(2, "big") + dport.to_bytes(2, "big"))
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    return _mix32(_raw32(s) ^ _mix32(_raw32(d) ^ _mix32(ports ^ proto)))


def flow_hash6(src: str, dst: str, proto: int, sport: int = 0, dport: int = 0) -> int:
    ports = _raw32(sport.to_bytes(2, "big") + dport.to_bytes(2, "big"))
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    h = _mix32(ports ^ proto)
    for i in range(4):
        h = _mix32(h ^ _raw32(s[4 * i:4 * i + 4]) ^ _mix32(_raw32(d[4 * i:4 * i + 4])))
    return h


def pick(tunnels: tuple[int, ...], h: int) -> int:
    """The tunnel index a route's flow hash selects (bpf/route.h xt_route_pick)."""
    return tunnels[h % len(tunnels)]


# --- desired map contents ------------------------------------------------------------------------

def _be32(addr: ipaddress.IPv4Address | None) -> int:
    return 0 if addr is None else _raw32(addr.packed)


@dataclass(frozen=True)
class MapState:
    """What the configuration maps should hold, as plain values (diffable)."""
    endpoints: dict[int, int]                             # address -> EP_TUNNEL / EP_FLEET
    decap: dict[tuple[int, int, int, int], int]          # (edge, customer, key, has_key) -> index
    tunnels: dict[int, tuple]                             # index -> xt_tunnel fields
    routes4: dict[tuple[int, bytes], tuple[int, ...]]    # (prefixlen, addr) -> tunnel indexes
    routes6: dict[tuple[int, bytes], tuple[int, ...]]
    pin_nodes: dict[int, tuple] = field(default_factory=dict)   # node id -> xt_tunnel fields


def desired_state(cfg: Config, max_tunnels: int = 65536) -> MapState:
    tunnels: dict[int, tuple] = {}
    decap = {}
    for t in (*cfg.gre_tunnels, *cfg.ipsec_tunnels):
        if not 0 < t.index < max_tunnels:
            raise DataplaneError(f"tunnel {t.name}: index {t.index} outside 1..{max_tunnels - 1}")
        if isinstance(t, GreTunnel):
            key = t.key if t.key is not None else 0
            tunnels[t.index] = (KIND_GRE, TUN_F_KEY if t.key is not None else 0,
                                _be32(t.edge_endpoint), _be32(t.customer_endpoint),
                                _raw32(key.to_bytes(4, "big")), t.mtu, t.mss, t.ttl, 0)
            decap[(_be32(t.edge_endpoint), _be32(t.customer_endpoint),
                   _raw32(key.to_bytes(4, "big")), int(t.key is not None))] = t.index
        elif isinstance(t, IpsecTunnel):
            # pinned to another node: carried there in GRE (bpf/pin.h) instead of encrypted
            elsewhere = t.pin_node is not None and t.pin_node != cfg.node.id
            tunnels[t.index] = (KIND_IPSEC, TUN_F_PIN_FWD if elsewhere else 0,
                                _be32(t.edge_endpoint), _be32(t.customer_endpoint), 0, t.mtu,
                                t.mss, t.ttl, t.pin_node if elsewhere else 0)
    by_prefix: dict = {}
    for r in cfg.routes:
        by_prefix.setdefault(r.prefix, []).append((r.priority, cfg.tunnel(r.tunnel).index))
    routes4, routes6 = {}, {}
    for prefix, entries in by_prefix.items():
        best = min(p for p, _ in entries)
        chosen = tuple(sorted(i for p, i in entries if p == best))
        if len(chosen) > MAX_ECMP:
            raise DataplaneError(f"route {prefix}: {len(chosen)} tunnels share priority {best}; "
                                 f"the data plane spreads over at most {MAX_ECMP}")
        target = routes4 if prefix.version == 4 else routes6
        target[(prefix.prefixlen, prefix.network_address.packed)] = chosen
    endpoints = {_be32(a): EP_TUNNEL for a in cfg.node.tunnel_endpoints}
    pin_nodes = {}
    me = cfg.node.fleet_address
    if me is not None:
        # our fleet address receives GRE from every other fleet node (pinned tunnels), and
        # each of them gets the GRE entry that carries packets there
        endpoints[_be32(me)] = EP_FLEET
        for n in cfg.fleet_nodes:
            if n.id == cfg.node.id:
                continue
            decap[(_be32(me), _be32(n.address), 0, 0)] = DECAP_FLEET_PEER
            pin_nodes[n.id] = (KIND_GRE, 0, _be32(me), _be32(n.address), 0, 0, 0, PIN_TTL, 0)
    for i, v in tunnels.items():
        if v[1] & TUN_F_PIN_FWD and v[8] not in pin_nodes:
            raise DataplaneError(f"tunnel index {i}: pinned to node {v[8]}, whose fleet address "
                                 "is unknown here ([[fleet.nodes]], node.fleet_address)")
    return MapState(endpoints, decap, tunnels, routes4, routes6, pin_nodes)


def _diff(old: dict, new: dict) -> tuple[dict, list]:
    """(entries to write, keys to delete): unchanged entries appear in neither."""
    return {k: v for k, v in new.items() if old.get(k) != v}, [k for k in old if k not in new]


@dataclass
class _Attached:
    ifname: str
    mode: str
    peer: tuple[str, str] | None = None     # (netns name or "", peer ifname) we attached to


@dataclass
class Dataplane:
    """Attach the edge program to interfaces and keep its maps equal to a Config."""
    config: Config
    ifaces: list[str] | None = None      # default: the config's node.interfaces
    mode: str | None = None              # "native" | "generic"; default: per interface config
    program: Program | None = None       # share a compiled program (tests); else compile one
    pin: bool = True
    cflags: tuple[str, ...] = ()
    prepare_peers: bool = True           # give native-mode veth peers a pass-only program
    _own_program: bool = field(default=False, init=False)
    _attached: list[_Attached] = field(default_factory=list, init=False)
    _state: MapState | None = field(default=None, init=False)
    _netns_fd: int | None = field(default=None, init=False)
    _pins: list[Path] = field(default_factory=list, init=False)

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> Dataplane:
        if self.program is None:
            self.program = compile_program(self.cflags)
            self._own_program = True
        self._netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            self._clear_maps()
            self.apply(self.config)
            if self.pin:
                self._pin_maps()
            for name, mode in self._interfaces():
                self._attach(name, mode)
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)   # a normal interpreter exit detaches too
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Detach from every interface (and peer), remove the pins. Idempotent."""
        atexit.unregister(self.close)
        with self._in_netns():
            for a in reversed(self._attached):
                self._detach(a)
        self._attached.clear()
        for p in self._pins:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if self._pins:
            with contextlib.suppress(OSError):
                self._pins[0].parent.rmdir()
        self._pins.clear()
        if self._own_program and self.program is not None:
            self.program.close()
            self.program = None
        if self._netns_fd is not None:
            os.close(self._netns_fd)
            self._netns_fd = None

    # --- configuration ---------------------------------------------------------------------
    def apply(self, cfg: Config) -> dict[str, int]:
        """Make the maps match ``cfg`` by individual updates, adding before removing so no
        packet sees a route to a missing tunnel. Returns how many entries each map changed."""
        new = desired_state(cfg, self._max_tunnels())
        old = self._state or MapState({}, {}, {}, {}, {})
        p = self.program
        tun, ep, dec = p.table("xt_tunnels"), p.table("xt_endpoints"), p.table("xt_gre_decap")
        r4, r6 = p.table("xt_routes4"), p.table("xt_routes6")
        pins = p.table("xt_pin_nodes")
        changed: dict[str, int] = {}
        # a tunnel entry never names a pin node before that node's entry exists
        n_put, n_del = _diff(old.pin_nodes, new.pin_nodes)
        for k, v in n_put.items():
            pins[pins.Key(k)] = self._tunnel_leaf(pins, v)
        t_put, t_del = _diff(old.tunnels, new.tunnels)
        for i, v in t_put.items():
            tun[tun.Key(i)] = self._tunnel_leaf(tun, v)
            p.touched.add(i)
        e_put, e_del = _diff(old.endpoints, new.endpoints)
        for e, kind in e_put.items():
            ep[ep.Key(e)] = ep.Leaf(kind)
        d_put, d_del = _diff(old.decap, new.decap)
        for k, i in d_put.items():
            dec[dec.Key(*k)] = dec.Leaf(i)
        route_changes = []
        for table, o, n in ((r4, old.routes4, new.routes4), (r6, old.routes6, new.routes6)):
            put, delete = _diff(o, n)
            for k, v in put.items():
                table[self._lpm_key(table, k)] = self._route_leaf(table, v)
            route_changes.append((table, delete))
        for name, (table, delete) in zip(("routes4", "routes6"), route_changes):
            for k in delete:
                del table[self._lpm_key(table, k)]
            changed[name] = len(delete) + len(_diff(old.routes4 if name == "routes4" else
                                                    old.routes6,
                                                    new.routes4 if name == "routes4" else
                                                    new.routes6)[0])
        for k in d_del:
            del dec[dec.Key(*k)]
        for e in e_del:
            del ep[ep.Key(e)]
        for i in t_del:
            tun[tun.Key(i)] = tun.Leaf()   # an array slot cannot be deleted: zero it (kind 0)
        for k in n_del:
            del pins[pins.Key(k)]
        changed.update(tunnels=len(t_put) + len(t_del), decap=len(d_put) + len(d_del),
                       endpoints=len(e_put) + len(e_del), pin_nodes=len(n_put) + len(n_del))
        self.config, self._state = cfg, new
        return changed

    def counters(self) -> _maps.Counters:
        idx = sorted({t.index for t in self.config.tunnels})
        return _maps.read_counters(self.program.map_fds(), idx)

    @property
    def pin_path(self) -> Path:
        return _maps.pin_dir(self.config.node.name)

    # --- internals -------------------------------------------------------------------------
    def _max_tunnels(self) -> int:
        for f in self.cflags:
            if f.startswith("-DXT_MAX_TUNNELS="):
                return int(f.split("=", 1)[1])
        return 65536

    @staticmethod
    def _tunnel_leaf(table, v: tuple):
        leaf = table.Leaf()
        (leaf.kind, leaf.flags, leaf.edge, leaf.customer, leaf.key, leaf.mtu, leaf.mss,
         leaf.ttl, leaf.pin_node) = v
        return leaf

    @staticmethod
    def _lpm_key(table, k: tuple[int, bytes]):
        key = table.Key()
        key.prefixlen = k[0]
        for i, b in enumerate(k[1]):
            key.addr[i] = b
        return key

    @staticmethod
    def _route_leaf(table, idx: tuple[int, ...]):
        leaf = table.Leaf()
        leaf.count = len(idx)
        for i, t in enumerate(idx):
            leaf.tunnels[i] = t
        return leaf

    def _clear_maps(self) -> None:
        """Start from empty maps and zero counters. Array slots cannot be deleted; zeroing all
        65,536 takes half a second from Python, so only slots a Dataplane wrote are zeroed (a
        freshly loaded program's arrays are zero already)."""
        p = self.program
        for name in ("xt_endpoints", "xt_gre_decap", "xt_routes4", "xt_routes6",
                     "xt_pin_nodes", "xt_tunnel_drops", "xt_reason_stats"):
            p.table(name).clear()
        slots = p.touched | {t.index for t in self.config.tunnels}
        for name in ("xt_tunnels", "xt_tunnel_stats"):
            table = p.table(name)
            for i in slots:
                if 0 <= i < table.max_entries:
                    del table[table.Key(i)]       # bcc: zeroes an array slot
        self._state = None

    def _pin_maps(self) -> None:
        _maps.ensure_bpffs()
        d = self.pin_path
        d.mkdir(parents=True, exist_ok=True)
        for name, fd in self.program.map_fds().items():
            path = d / name
            with contextlib.suppress(FileNotFoundError):
                path.unlink()          # left by a crashed run
            _maps.pin(fd, path)
            self._pins.append(path)

    def _interfaces(self) -> list[tuple[str, str]]:
        by_name = {i.name: i.xdp_mode for i in self.config.node.interfaces}
        names = self.ifaces if self.ifaces is not None else list(by_name)
        out = []
        for n in names:
            mode = self.mode or by_name.get(n, "native")
            if mode not in MODE_FLAGS:
                raise DataplaneError(f"{n}: unknown XDP mode {mode!r} (native or generic)")
            out.append((n, mode))
        return out

    def _link(self, ifname: str) -> dict:
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                raise DataplaneError(f"no interface {ifname!r} in this network namespace")
            msg = ipr.get_links(idx[0])[0]
        xdp = msg.get("IFLA_XDP")
        info = msg.get("IFLA_LINKINFO")
        return {"index": idx[0], "link": msg.get("IFLA_LINK"),
                "netnsid": msg.get("IFLA_LINK_NETNSID"),
                "kind": info.get("IFLA_INFO_KIND") if info is not None else None,
                "xdp": (xdp.get("IFLA_XDP_ATTACHED") if xdp is not None else 0) or 0}

    def _attach(self, ifname: str, mode: str) -> None:
        from bcc import BPF
        link = self._link(ifname)
        present = ATTACHED_MODE.get(link["xdp"])
        if present and present != mode:
            # a crashed run's program in the other mode would make the attach fail
            log.info("%s: removing an XDP program left in %s mode", ifname, present)
            BPF.remove_xdp(ifname.encode(), MODE_FLAGS[present])
        try:
            BPF.attach_xdp(ifname.encode(), self.program.entry, MODE_FLAGS[mode])  # replaces, no stacking
        except Exception as e:
            raise DataplaneError(f"{ifname}: XDP attach in {mode} mode failed: {e}") from e
        a = _Attached(ifname, mode)
        self._attached.append(a)
        if link["kind"] == "veth":
            if mode == "native" and self.prepare_peers:
                a.peer = self._prepare_peer(ifname, link)
            else:
                subprocess.run(["ethtool", "-K", ifname, "gro", "on"], capture_output=True, check=False)

    def _prepare_peer(self, ifname: str, link: dict) -> tuple[str, str] | None:
        """Give the veth peer an XDP program if it has none (see the module docstring)."""
        from bcc import BPF
        from pyroute2 import IPRoute
        candidates = [""] if link["netnsid"] is None else self._named_nsid(link["netnsid"])
        for name in candidates:
            with self._entered(name):
                with IPRoute() as ipr:
                    msgs = ipr.get_links(link["link"]) if ipr.link_lookup(index=link["link"]) \
                        else []
                if not msgs or msgs[0].get("IFLA_LINK") != link["index"]:
                    continue
                peer = msgs[0].get_attr("IFLA_IFNAME")
                xdp = msgs[0].get("IFLA_XDP")
                if xdp is not None and xdp.get("IFLA_XDP_ATTACHED") not in (None, 0, "none"):
                    return None          # it has a program already: redirects arrive
                BPF.attach_xdp(peer.encode(), self.program.peer_pass, XDP_FLAGS_DRV_MODE)
                return (name, peer)
        log.warning("%s: veth peer not found in a named namespace: native XDP_REDIRECT/XDP_TX "
                    "into %s are dropped unless its peer has an XDP program or GRO on "
                    "(xtransit doctor)", ifname, ifname)
        return None

    @staticmethod
    def _named_nsid(nsid: int) -> list[str]:
        """The named namespace (/run/netns) this namespace knows as ``nsid``, if any."""
        import json
        proc = subprocess.run(["ip", "-j", "netns", "list-id"], capture_output=True, text=True,
                              check=False)
        try:
            entries = json.loads(proc.stdout or "[]")
        except ValueError:
            return []
        return [e["name"] for e in entries if e.get("nsid") == nsid and e.get("name")]

    def _detach(self, a: _Attached) -> None:
        from bcc import BPF
        with contextlib.suppress(Exception):
            BPF.remove_xdp(a.ifname.encode(), MODE_FLAGS[a.mode])
        if a.peer:
            with self._entered(a.peer[0]), contextlib.suppress(Exception):
                BPF.remove_xdp(a.peer[1].encode(), XDP_FLAGS_DRV_MODE)

    @contextlib.contextmanager
    def _entered(self, ns_name: str):
        if not ns_name:
            yield
            return
        from pyroute2 import netns
        netns.pushns(ns_name)
        try:
            yield
        finally:
            netns.popns()

    @contextlib.contextmanager
    def _in_netns(self):
        """Run in the namespace start() ran in (close() may be called from elsewhere)."""
        if self._netns_fd is None:
            yield
            return
        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            if _libc.setns(self._netns_fd, CLONE_NEWNET) != 0:
                raise DataplaneError(f"setns: {os.strerror(ctypes.get_errno())}")
            yield
        finally:
            _libc.setns(here, CLONE_NEWNET)
            os.close(here)


def serve(cfg_path: str, ifaces: list[str] | None = None, mode: str | None = None) -> None:
    """Run the data plane until SIGTERM or SIGINT; SIGHUP re-reads the config and applies the
    difference. Detaches on every exit path."""
    from ..config import load
    stop = threading.Event()
    reload = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    with Dataplane(load(cfg_path), ifaces=ifaces, mode=mode) as dp:
        print(f"xtransit data plane: attached to {', '.join(a.ifname for a in dp._attached)}; "
              f"maps at {dp.pin_path}", flush=True)
        while not stop.is_set():
            stop.wait(0.2)
            if reload.is_set():
                reload.clear()
                try:
                    changed = dp.apply(load(cfg_path))
                    print(f"xtransit data plane: config applied {changed}", flush=True)
                except Exception as e:  # noqa: BLE001 - keep running on a bad new config
                    print(f"xtransit data plane: config not applied: {e}", flush=True)


if __name__ == "__main__":  # python -m pipeline.xdp.dataplane CONFIG [IFACE...] [--generic]
    import sys
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    serve(args[0], args[1:] or None, "generic" if "--generic" in sys.argv else None)

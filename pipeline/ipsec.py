"""The IPsec data path: SA installation into the native ESP module, XDP steering, AF_XDP worker.

Pieces (each usable alone, the tests use them that way):

* :class:`IpsecDataPath` is the real :class:`pipeline.sa.SaInstaller`. The IKE responder, the
  anycast state sync and the static-SA test mode all hand it ``ChildSaParams``; it installs the
  pair into one :class:`pipeline.esp.EspContext`: the inbound SA keyed by its SPI, the outbound SA
  keyed by the tunnel index. ``replace()`` (rekey) adds the new inbound SA and swaps the outbound
  one; the old inbound SA keeps accepting packets until ``delete(old_spi_in)`` (RFC 7296 2.8: the
  peer may still send under it until the old Child SA is deleted). Counters of deleted SAs are
  banked per tunnel, so tunnel totals never go backwards.
* :func:`load_static_sas` reads SAs from a TOML file (operators debugging without IKE);
  ``python -m pipeline.ipsec static FILE --dev ... --endpoint ... --route PREFIX=INDEX`` runs the
  data path with them until SIGTERM.
* :class:`Steering` compiles bpf/xdp_esp_test.c with bcc (local headers inlined, see
  :func:`bcc_source`), attaches the steering program to the outside devices and the forwarding
  program to the inner end of the internal veth pair, and fills the maps.
* :class:`IpsecEdge` puts it together in the current network namespace: internal veth pair
  ``xtesp0``/``xtesp1``, steering, AF_XDP workers (pipeline/xsk.py; ``workers=N`` threads, the
  RX (device, queue) pairs dealt out among them, one NAT-T peer table shared).
* Counters: :meth:`IpsecDataPath.stats` (per tunnel and per SA: packets and bytes each way, drops
  by reason, deleted SAs included; drops before an SA was found) and :meth:`IpsecEdge.stats`
  (that, plus the steering counters and each worker's ring and NAT-T counters).

Where processed packets go: where the kernel FIB routes them. The worker asks the FIB itself on
a next-hop cache miss (bpf/nexthop.h, run with BPF_PROG_TEST_RUN as if the packet had arrived on
the internal veth's router end; with the TCP/UDP ports when the kernel's routing looks at them)
and transmits straight out of the egress device when it has a socket there; every route, rule,
nexthop, neighbour, address or link change netlink reports empties the caches
(:class:`RouteWatch`), and entries live one second at most. Everything else - no neighbour yet,
TTL <= 1, too big for the path MTU, a device without a socket - it transmits on ``xtesp0``, and
``xtesp1``'s XDP program routes it with ``bpf_fib_lookup`` or passes it to the kernel, which
resolves the neighbour, fragments or answers ICMP. See bench/RESULTS.md for the measurement
behind that choice (direct_tx=False keeps everything on the internal veth).
"""
from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import re
import stat
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from pipeline import esp as _esp
from pipeline.sa import ChildSaParams

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BPF_DIR = REPO / "bpf"
STEER_SRC = BPF_DIR / "xdp_esp_test.c"
STEER_HEADER = BPF_DIR / "esp_steer.h"

INTERNAL_EDGE_END = "xtesp0"     # the worker transmits here
INTERNAL_ROUTER_END = "xtesp1"   # xdp_esp_fwd routes from here
INTERNAL_MTU = 2000              # room for an encrypted 1500-byte packet plus ESP overhead

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4


class IpsecError(ValueError):
    """An SA, static-SA file or data-path request that cannot be honoured; never holds keys."""


# --- the SA installer ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TunnelInfo:
    """What the data path needs to know of a tunnel (from config.IpsecTunnel or a static file)."""

    name: str
    index: int                  # 1..65535: the outbound SA key and the counter slot
    ttl: int = 64
    mss: int = 1360
    replay_protection: bool = False
    allow_null: bool = False

    @classmethod
    def from_config(cls, t: Any) -> TunnelInfo:
        return cls(name=t.name, index=t.index, ttl=t.ttl, mss=t.mss,
                   replay_protection=t.replay_protection, allow_null=t.allow_null_cipher)


@dataclass
class _Pair:
    tunnel: TunnelInfo
    spi_in: int
    spi_out: int


@dataclass
class _Totals:
    packets: int = 0
    bytes: int = 0
    drops: dict[str, int] = field(default_factory=dict)

    def add(self, s: _esp.SaStats) -> None:
        self.packets += s.packets
        self.bytes += s.bytes
        for k, v in s.drops.items():
            if v:
                self.drops[k] = self.drops.get(k, 0) + v

    def as_dict(self) -> dict[str, Any]:
        return {"packets": self.packets, "bytes": self.bytes, "drops": dict(self.drops)}


class IpsecDataPath:
    """The native-ESP ``SaInstaller``: install, replace and delete SA pairs for tunnels.

    ``tunnels`` maps the tunnel id of ``ChildSaParams.tunnel_id`` to its :class:`TunnelInfo`
    (usually from the config: :meth:`from_config`). ``node_id`` goes into every IV this node sends
    (unique per edge node sharing an SA). Thread-safe; control calls never block the workers.
    """

    def __init__(self, tunnels: dict[str, TunnelInfo], node_id: int = 0,
                 max_workers: int = 4, buckets_log2: int = 0) -> None:
        self.ctx = _esp.EspContext(max_workers=max_workers, buckets_log2=buckets_log2)
        self.node_id = node_id
        self._tunnels = dict(tunnels)
        self._lock = threading.Lock()
        self._pairs: dict[int, _Pair] = {}          # spi_in -> pair (current and retired)
        self._current: dict[int, int] = {}          # tunnel index -> spi_in of the current pair
        self._banked: dict[int, dict[str, _Totals]] = {}
        self.on_change: list[Any] = []               # callables(tunnel_index) after each change

    @classmethod
    def from_config(cls, cfg: Any, **kw: Any) -> IpsecDataPath:
        return cls({t.id: TunnelInfo.from_config(t) for t in cfg.ipsec_tunnels},
                   node_id=cfg.node.id, **kw)

    def add_tunnel(self, tunnel_id: str, info: TunnelInfo) -> None:
        with self._lock:
            self._tunnels[tunnel_id] = info

    def tunnel(self, tunnel_id: str) -> TunnelInfo:
        try:
            return self._tunnels[tunnel_id]
        except KeyError:
            raise IpsecError(f"unknown IPsec tunnel id {tunnel_id!r}") from None

    # SaInstaller ---------------------------------------------------------------------------
    def install(self, sa: ChildSaParams) -> None:
        t = self.tunnel(sa.tunnel_id)
        inbound, outbound = self._params(sa, t)
        with self._lock:
            if sa.spi_in in self._pairs:
                raise IpsecError(f"inbound SPI 0x{sa.spi_in:08x} is already installed")
            self.ctx.add_sa(inbound)
            prev_out = self._out_stats(t.index)
            try:
                self.ctx.add_sa(outbound)
            except _esp.EspError:
                self.ctx.del_sa("in", sa.spi_in)
                raise
            if prev_out is not None:
                self._bank(t.index, "out", prev_out)
            # a second install for a tunnel (a new IKE SA after INITIAL_CONTACT, ...) replaces
            # the outbound SA; an older inbound SA stays until it is deleted, as in a rekey
            self._pairs[sa.spi_in] = _Pair(t, sa.spi_in, sa.spi_out)
            self._current[t.index] = sa.spi_in
        log.info("IPsec SA pair installed: %s (tunnel index %d)", sa.describe(), t.index)
        self._changed(t.index)

    def replace(self, old_spi_in: int, sa: ChildSaParams) -> None:
        """Rekey: the new inbound SA is added, the tunnel's outbound SA is replaced (new packets
        go out under the new SA at once); the old inbound SA stays until ``delete``."""
        t = self.tunnel(sa.tunnel_id)
        inbound, outbound = self._params(sa, t)
        with self._lock:
            if sa.spi_in in self._pairs:
                raise IpsecError(f"inbound SPI 0x{sa.spi_in:08x} is already installed")
            self.ctx.add_sa(inbound)
            prev_out = self._out_stats(t.index)
            try:
                self.ctx.add_sa(outbound)   # replaces the tunnel's outbound SA in place
            except _esp.EspError:
                self.ctx.del_sa("in", sa.spi_in)
                raise
            if prev_out is not None:
                self._bank(t.index, "out", prev_out)
            self._pairs[sa.spi_in] = _Pair(t, sa.spi_in, sa.spi_out)
            self._current[t.index] = sa.spi_in
        log.info("IPsec SA pair 0x%08x replaced by %s", old_spi_in, sa.describe())
        self._changed(t.index)

    def delete(self, spi_in: int) -> None:
        with self._lock:
            pair = self._pairs.pop(spi_in, None)
            if pair is None:
                return
            idx = pair.tunnel.index
            with contextlib.suppress(_esp.EspError):
                self._bank(idx, "in", self.ctx.sa_stats("in", spi_in))
            with contextlib.suppress(_esp.EspError):
                self.ctx.del_sa("in", spi_in)
            if self._current.get(idx) == spi_in:
                # the tunnel's current pair: its outbound SA goes too
                del self._current[idx]
                with contextlib.suppress(_esp.EspError):
                    self._bank(idx, "out", self.ctx.sa_stats("out", idx))
                with contextlib.suppress(_esp.EspError):
                    self.ctx.del_sa("out", idx)
        log.info("IPsec SA 0x%08x deleted", spi_in)
        self._changed(idx)

    # helpers ---------------------------------------------------------------------------------
    def _params(self, sa: ChildSaParams, t: TunnelInfo) -> tuple[_esp.EspSaParams,
                                                                _esp.EspSaParams]:
        integ = sa.integ or _esp.INTEG_NONE
        allow_null = t.allow_null and (sa.encr == _esp.ENCR_NULL or integ == _esp.INTEG_NONE)
        window = sa.replay_window if t.replay_protection else 0
        common = {"encryption": sa.encr, "integrity": integ, "tunnel_id": t.index, "ttl": t.ttl,
                      "allow_null": allow_null, "esn": sa.esn}
        inbound = _esp.EspSaParams(
            spi=sa.spi_in, direction="in", enc_key=sa.enc_key_in, salt=sa.salt_in,
            auth_key=sa.integ_key_in if sa.integ else b"", local=sa.local_addr,
            remote=sa.remote_addr, replay_window=window, check_dst=True, **common)
        encap = {}
        if sa.udp_encap:
            encap = {"encap_sport": sa.encap_local_port or 4500,
                         "encap_dport": sa.encap_remote_port}
        outbound = _esp.EspSaParams(
            spi=sa.spi_out, direction="out", enc_key=sa.enc_key_out, salt=sa.salt_out,
            auth_key=sa.integ_key_out if sa.integ else b"", local=sa.local_addr,
            remote=sa.remote_addr, node_id=self.node_id, **encap, **common)
        return inbound, outbound

    def _out_stats(self, idx: int) -> _esp.SaStats | None:
        try:
            return self.ctx.sa_stats("out", idx)
        except _esp.EspError:
            return None

    def _bank(self, idx: int, direction: str, s: _esp.SaStats) -> None:
        self._banked.setdefault(idx, {"in": _Totals(), "out": _Totals()})[direction].add(s)

    def _changed(self, idx: int) -> None:
        for cb in list(self.on_change):
            cb(idx)

    # observation --------------------------------------------------------------------------
    def installed(self) -> dict[int, tuple[str, int, int, bool]]:
        """spi_in -> (tunnel name, tunnel index, spi_out, is the tunnel's current pair)."""
        with self._lock:
            return {spi: (p.tunnel.name, p.tunnel.index, p.spi_out,
                          self._current.get(p.tunnel.index) == spi)
                    for spi, p in self._pairs.items()}

    def stats(self) -> dict[str, Any]:
        """Counters per tunnel (packets and bytes each way, drops by reason, with deleted SAs
        included) and per installed SA, plus drops before an SA was found."""
        with self._lock:
            tunnels: dict[str, Any] = {}
            infos = {p.tunnel.index: p.tunnel for p in self._pairs.values()}
            infos.update({t.index: t for t in self._tunnels.values()})
            for idx, t in sorted(infos.items()):
                tot = {d: _Totals() for d in ("in", "out")}
                for d in ("in", "out"):
                    b = self._banked.get(idx, {}).get(d)
                    if b:
                        tot[d].packets, tot[d].bytes = b.packets, b.bytes
                        tot[d].drops = dict(b.drops)
                sas = []
                for spi, p in self._pairs.items():
                    if p.tunnel.index != idx:
                        continue
                    with contextlib.suppress(_esp.EspError):
                        s = self.ctx.sa_stats("in", spi)
                        tot["in"].add(s)
                        sas.append(_sa_dict("in", spi, s))
                if idx in self._current:
                    with contextlib.suppress(_esp.EspError):
                        s = self.ctx.sa_stats("out", idx)
                        tot["out"].add(s)
                        sas.append(_sa_dict("out", self._pairs[self._current[idx]].spi_out, s))
                tunnels[t.name] = {"index": idx, "in": tot["in"].as_dict(),
                                   "out": tot["out"].as_dict(), "sas": sas}
            return {"tunnels": tunnels, "no_sa": self.ctx.stats()["drops"]}

    def close(self) -> None:
        self.ctx.close()


def _sa_dict(direction: str, spi: int, s: _esp.SaStats) -> dict[str, Any]:
    return {"direction": direction, "spi": spi, "packets": s.packets, "bytes": s.bytes,
            "drops": {k: v for k, v in s.drops.items() if v}, "seq": s.seq,
            "lifetime": sorted(s.lifetime)}


# --- static SAs from a file ---------------------------------------------------------------------

_STATIC_KEYS = {"tunnel", "index", "local", "remote", "spi_in", "spi_out", "encryption",
                "integrity", "enc_key_in", "enc_key_out", "integ_key_in", "integ_key_out",
                "encap_local_port", "encap_remote_port", "replay_window", "allow_null", "ttl",
                "mss"}


def load_static_sas(path: str | Path, config: Any = None) -> list[tuple[TunnelInfo,
                                                                         ChildSaParams]]:
    """Static SA pairs for debugging without IKE (the operator's ``ip xfrm state add``).

    The file (TOML, readable by its owner only: it holds keys) has one ``[[sa]]`` table per pair::

        [[sa]]
        tunnel = "site-b"              # a tunnel of `config`, or any name with `index`
        index = 7                      # needed when the tunnel is not in `config`
        local = "192.0.2.1"            # the edge's tunnel endpoint
        remote = "198.51.100.2"        # the customer router
        spi_in = 0x10000001            # SPI the customer sends with
        spi_out = 0x20000001
        encryption = "aes-gcm-16"      # or "aes-cbc", "null"
        integrity = "hmac-sha2-256-128"  # AES-CBC/NULL only: or "hmac-sha1-96"
        enc_key_in = "hex"             # AES-GCM: key || 4-byte salt (RFC 4106 8.1)
        enc_key_out = "hex"
        integ_key_in = "hex"
        integ_key_out = "hex"
        encap_local_port = 4500        # both ports: ESP in UDP (RFC 3948)
        encap_remote_port = 4500
        replay_window = 1024           # 0 disables anti-replay for this pair
        allow_null = false             # explicit opt-in for "null" encryption

    Errors name the file, the entry and the field, never a key value.
    """
    p = Path(path)
    try:
        st = p.stat()
        raw = p.read_bytes()
    except OSError as e:
        raise IpsecError(f"{p}: cannot read static SA file: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IpsecError(f"{p}: holds keys but is accessible by group or others "
                         f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    try:
        doc = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise IpsecError(f"{p}: not valid TOML: {e}") from None
    unknown_top = set(doc) - {"sa"}
    if unknown_top:
        raise IpsecError(f"{p}: unknown top-level key(s) {sorted(unknown_top)}; expected [[sa]]")
    out = []
    for i, e in enumerate(doc.get("sa", [])):
        where = f"{p}: sa[{i}]"
        out.append(_static_entry(e, where, config))
    return out


def _static_entry(e: dict[str, Any], where: str, config: Any) -> tuple[TunnelInfo, ChildSaParams]:
    def need(k: str, typ: type) -> Any:
        if k not in e:
            raise IpsecError(f"{where}: missing {k}")
        v = e[k]
        if not isinstance(v, typ) or isinstance(v, bool) and typ is int:
            raise IpsecError(f"{where}.{k}: expected {typ.__name__}")
        return v

    def key(k: str) -> bytes:
        if k not in e:
            return b""
        v = e[k]
        if not isinstance(v, str) or not re.fullmatch(r"(?:0x)?(?:[0-9a-fA-F]{2})+", v):
            raise IpsecError(f"{where}.{k}: expected a hex string (value not shown)")
        return bytes.fromhex(v.removeprefix("0x"))

    extra = set(e) - _STATIC_KEYS
    if extra:
        raise IpsecError(f"{where}: unknown key(s) {sorted(extra)}")
    name = need("tunnel", str)
    info = None
    if config is not None:
        with contextlib.suppress(KeyError):
            t = config.tunnel(name)
            if t.kind == "ipsec":
                info = TunnelInfo.from_config(t)
    if info is None:
        index = need("index", int)
        if not 1 <= index <= 65535:
            raise IpsecError(f"{where}.index: must be 1..65535")
        info = TunnelInfo(name=name, index=index, ttl=e.get("ttl", 64), mss=e.get("mss", 1360),
                          replay_protection=True, allow_null=bool(e.get("allow_null", False)))
    else:
        info = TunnelInfo(name=info.name, index=info.index, ttl=info.ttl, mss=info.mss,
                          replay_protection=True,
                          allow_null=info.allow_null or bool(e.get("allow_null", False)))
    for k in ("local", "remote"):
        try:
            ipaddress.IPv4Address(need(k, str))
        except ValueError:
            raise IpsecError(f"{where}.{k}: not an IPv4 address") from None
    encr = need("encryption", str)
    integ = e.get("integrity")
    ek_in, ek_out = key("enc_key_in"), key("enc_key_out")
    salt_in = salt_out = b""
    bits = 0
    if encr == _esp.ENCR_AES_GCM_16:
        if len(ek_in) not in (20, 36) or len(ek_out) != len(ek_in):
            raise IpsecError(f"{where}: aes-gcm-16 keys are key || 4-byte salt: 20 or 36 bytes")
        ek_in, salt_in, ek_out, salt_out = ek_in[:-4], ek_in[-4:], ek_out[:-4], ek_out[-4:]
        bits = len(ek_in) * 8
    elif encr == _esp.ENCR_AES_CBC:
        bits = len(ek_in) * 8
    ports = [e.get("encap_local_port"), e.get("encap_remote_port")]
    if (ports[0] is None) != (ports[1] is None):
        raise IpsecError(f"{where}: UDP encapsulation needs encap_local_port and "
                         f"encap_remote_port")
    sa = ChildSaParams(
        tunnel_name=info.name, tunnel_id=info.name, account_id="static", ike_sa="static",
        spi_in=need("spi_in", int), spi_out=need("spi_out", int), encr=encr,
        encr_key_bits=bits, integ=integ, local_addr=e["local"], remote_addr=e["remote"],
        encap_local_port=ports[0], encap_remote_port=ports[1],
        replay_window=e.get("replay_window", 1024), enc_key_in=ek_in, enc_key_out=ek_out,
        salt_in=salt_in, salt_out=salt_out, integ_key_in=key("integ_key_in"),
        integ_key_out=key("integ_key_out"))
    return info, sa


def install_static(dp: IpsecDataPath, entries: list[tuple[TunnelInfo, ChildSaParams]]) -> None:
    """Install static SA pairs (registering their tunnels by name)."""
    for info, sa in entries:
        dp.add_tunnel(sa.tunnel_id, info)
        dp.install(sa)


# --- XDP steering ---------------------------------------------------------------------------------

def bcc_source(path: Path) -> str:
    """The program text with its local headers inlined (pipeline/xdp/source.py: bcc rewrites map
    calls only in the main file)."""
    from pipeline.xdp.source import amalgamate

    return amalgamate(path)


def steer_counter_names() -> list[str]:
    """XT_ESP_STEER_* counter names by number, read from bpf/esp_steer.h (the one list)."""
    names: dict[int, str] = {}
    for m in re.finditer(r"#define XT_ESP_STEER_(\w+)\s+(\d+)", STEER_HEADER.read_text()):
        if m.group(1) != "_COUNT":
            names[int(m.group(2))] = m.group(1).lower()
    return [names[i] for i in range(len(names))]


def _le32(addr: str) -> int:
    """A network-order IPv4 address as the u32 the BPF program compares (host = little endian)."""
    return int.from_bytes(ipaddress.IPv4Address(addr).packed, "little")


class Steering:
    """The steering and forwarding XDP programs (bpf/xdp_esp_test.c) and their maps.

    ``edge_bpf``: the edge program's bcc object when bpf/xdp_edge.c is built with
    -DXT_FEATURE_ESP. Its steering hooks then use the XSKMAP, slot map and counters in *that*
    object (``steer_maps``); this object still provides the forwarder for the internal veth.
    """

    def __init__(self, cflags: list[str] | None = None, edge_bpf: Any = None) -> None:
        from bcc import BPF  # imported late: bcc is heavy and needs root to load

        self._BPF = BPF
        self.bpf = BPF(text=bcc_source(STEER_SRC).encode(), cflags=cflags or [])
        self.steer_fn = self.bpf.load_func(b"xdp_esp_steer", BPF.XDP)
        self.fwd_fn = self.bpf.load_func(b"xdp_esp_fwd", BPF.XDP)
        self.nh_fn = self.bpf.load_func(b"esp_nexthop", BPF.SCHED_CLS)   # run, never attached
        self._attached: list[tuple[str, int]] = []
        self.steer_maps = edge_bpf if edge_bpf is not None else self.bpf
        self.external = edge_bpf is not None
        self.xsks = self.steer_maps[b"esp_xsks"]
        self._names = steer_counter_names()

    def attach(self, ifname: str, fn: Any, mode: str = "native") -> None:
        flags = XDP_FLAGS_SKB_MODE if mode == "generic" else XDP_FLAGS_DRV_MODE
        # a program left by a crashed run is replaced, not stacked
        self.bpf.attach_xdp(ifname.encode(), fn, flags)
        self._attached.append((ifname, flags))

    def add_endpoint(self, addr: str) -> None:
        t = self.bpf[b"esp_endpoints"]
        t[t.Key(_le32(addr))] = t.Leaf(1)

    def del_endpoint(self, addr: str) -> None:
        t = self.bpf[b"esp_endpoints"]
        with contextlib.suppress(KeyError):
            del t[t.Key(_le32(addr))]

    def _route_key(self, prefix: str) -> tuple[Any, Any]:
        net = ipaddress.ip_network(prefix)
        t = self.bpf[b"esp_routes4" if net.version == 4 else b"esp_routes6"]
        k = t.Key()
        k.prefixlen = net.prefixlen
        k.addr[:] = list(net.network_address.packed)
        return t, k

    def add_route(self, prefix: str, tunnel: int, mss: int = 0) -> None:
        """Route an IPv4 or IPv6 customer prefix into tunnel index ``tunnel``."""
        t, k = self._route_key(prefix)
        v = t.Leaf()
        v.tunnel, v.mss = tunnel, mss
        t[k] = v

    def del_route(self, prefix: str) -> None:
        t, k = self._route_key(prefix)
        with contextlib.suppress(KeyError):
            del t[k]

    def set_slot(self, ifindex: int, base: int) -> None:
        t = self.steer_maps[b"esp_xsk_slot"]
        t[t.Key(ifindex)] = t.Leaf(base)

    def xsk_map_fd(self) -> int:
        return self.xsks.map_fd

    def counters(self) -> dict[str, int]:
        """XT_ESP_STEER_* counters (the steering's and the forwarder's, summed over CPUs)."""
        tables = [self.bpf[b"esp_steer_stats"]]
        if self.external:
            tables.append(self.steer_maps[b"esp_steer_stats"])
        return {name: int(sum(sum(t[ctypes.c_int(i)]) for t in tables))
                for i, name in enumerate(self._names)}

    def detach_all(self) -> None:
        for ifname, flags in reversed(self._attached):
            with contextlib.suppress(Exception):
                self._BPF.remove_xdp(ifname.encode(), flags)
        self._attached.clear()

    def close(self) -> None:
        self.detach_all()
        self.bpf.cleanup()


# --- the whole data path in one namespace ----------------------------------------------------------

@dataclass(frozen=True)
class RxDevice:
    name: str
    queues: tuple[int, ...] = (0,)
    xdp_mode: str = "native"


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def _in_netns(fd: int | None):
    """Run the body with this thread in the network namespace of ``fd`` (None: stay)."""
    if fd is None:
        yield
        return
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns to the data path's namespace")
        try:
            yield
        finally:
            _libc.setns(here, _CLONE_NEWNET)
    finally:
        os.close(here)


RTM_NEWRULE, RTM_DELRULE = 32, 33   # include/uapi/linux/rtnetlink.h


def routing_uses_ports() -> bool:
    """Whether the kernel's routing in this namespace looks at TCP/UDP ports: a multipath hash
    over L4 fields (fib_multipath_hash_policy 1, or 3 with port fields), or a rule matching
    source or destination ports. Then next-hop lookups and their cache keys include the ports;
    otherwise one answer serves every flow between two addresses."""
    import json
    import subprocess

    for fam in ("ipv4", "ipv6"):
        try:
            policy = int(Path(f"/proc/sys/net/{fam}/fib_multipath_hash_policy").read_text())
            fields = int(Path(f"/proc/sys/net/{fam}/fib_multipath_hash_fields").read_text(), 0)
        except (OSError, ValueError):
            continue
        if policy == 1 or (policy == 3 and fields & 0x30):   # FIB_MULTIPATH_HASH_FIELD_*_PORT
            return True
    for flag in ("-4", "-6"):
        try:
            out = subprocess.run(["ip", "-j", flag, "rule", "show"], capture_output=True,
                                 text=True, timeout=5, check=True).stdout
            rules = json.loads(out or "[]")
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            log.debug("ip %s rule show: %s", flag, e)
            continue
        if any(k.startswith(("sport", "dport")) for r in rules for k in r):
            return True
    return False


class RouteWatch:
    """Empties the workers' next-hop caches whenever netlink reports a change of a route, rule
    (IPv4 or IPv6), nexthop object, neighbour, address or link in this network namespace (a
    thread; close() stops it).

    Any message is reason enough to flush; only its type and family are read (``seen``, and
    rule messages recheck :func:`routing_uses_ports`). A plain NETLINK_ROUTE socket bound to
    the multicast groups: pyroute2's IPRoute, which the rest of the module uses, would start an
    event loop in the reading thread and keep its descriptors."""

    # rtnetlink multicast groups (include/uapi/linux/rtnetlink.h RTMGRP_*)
    GROUPS = (0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x100 | 0x400)
    # LINK, NEIGH, IPV4_IFADDR, IPV4_ROUTE, IPV4_RULE, IPV6_IFADDR, IPV6_ROUTE; groups past the
    # legacy bit mask are joined by number (enum rtnetlink_groups): IPV6_RULE, NEXTHOP
    EXTRA_GROUPS = (19, 32)
    SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 270, 1

    def __init__(self, workers: list[Any]) -> None:
        import socket

        self._workers = workers
        self.flushes = 0
        self.seen: dict[tuple[int, int], int] = {}   # (RTM_* type, family) -> messages
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            self._sock.bind((0, self.GROUPS))
            for group in self.EXTRA_GROUPS:
                self._sock.setsockopt(self.SOL_NETLINK, self.NETLINK_ADD_MEMBERSHIP, group)
            self._sock.settimeout(0.2)
        except BaseException:
            self._sock.close()
            raise
        self.l4 = routing_uses_ports()
        for w in self._workers:
            w.nh_set_l4(self.l4)
        self._thread = threading.Thread(target=self._run, name="xt-route-watch", daemon=True)
        self._thread.start()

    def _recheck_l4(self) -> None:
        """Keys with or without ports, as the kernel's routing needs (routing_uses_ports)."""
        l4 = routing_uses_ports()
        if l4 != self.l4:
            self.l4 = l4
            log.info("next-hop lookups %s the TCP/UDP ports now", "use" if l4 else "ignore")
            for w in self._workers:
                with contextlib.suppress(Exception):
                    w.nh_set_l4(l4)

    def _run(self) -> None:
        import struct
        import time

        checked = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - checked >= 1.0:   # the hash policy sysctls send no message
                checked = time.monotonic()
                self._recheck_l4()
            try:
                data = self._sock.recv(65536)
                if not data:
                    continue
                rules_changed = False
                # (message type, address family) of each message, for the record
                off = 0
                while off + 17 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, off)
                    key = (kind, data[off + 16])
                    self.seen[key] = self.seen.get(key, 0) + 1
                    rules_changed |= kind in (RTM_NEWRULE, RTM_DELRULE)
                    off += max(16, (length + 3) & ~3)
                if rules_changed:
                    self._recheck_l4()
            except TimeoutError:
                continue
            except OSError as e:   # ENOBUFS: messages were lost - flush, as for any change
                if self._stop.is_set():
                    return
                log.debug("route watch: %s", e)
            self.flushes += 1
            for w in self._workers:
                with contextlib.suppress(Exception):
                    w.nh_flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()


class IpsecEdge:
    """Steering + internal veth + AF_XDP worker(s) in the calling thread's network namespace.

    ``devices``: the outside devices the steering program runs on; ``endpoints``: local tunnel
    endpoint addresses; routes are added with :meth:`route`. Close (or use as a context manager)
    to stop the worker, detach the programs and remove the internal veth pair.

    ``direct_tx``: the workers transmit straight out of the outside devices (and of ``egress``,
    devices that only send) when the kernel FIB routes a frame there (module docstring); False
    sends everything through the internal veth (the design the benchmark compares against).
    ``bench_no_crypto`` forwards frames unchanged (the AF_XDP path ceiling).
    ``steering``: a loaded :class:`Steering` to reuse (the caller keeps it; close() only detaches
    it), so repeated set-ups compile once. ``edge_bpf``: the edge program's bcc object (built
    with -DXT_FEATURE_ESP and attached by the GRE data plane): its hooks steer, so no steering
    program of ours is attached; the sockets go into its XSKMAP. ``workers``: threads, each with
    its own UMEM and TX queue; the RX (device, queue) pairs are dealt out round-robin (one worker
    per queue is the shape for a multi-queue NIC). They share one NAT-T peer table.
    """

    def __init__(self, datapath: IpsecDataPath, devices: list[RxDevice], endpoints: list[str],
                 *, xsk_mode: str = "auto", ring_size: int = 2048, batch: int = 64,
                 direct_tx: bool = True, egress: tuple[str, ...] = (),
                 bench_no_crypto: bool = False,
                 worker_cpu: int | None = None, steering: Steering | None = None,
                 edge_bpf: Any = None, workers: int = 1, tx_budget: int = 0) -> None:
        from pyroute2 import IPRoute

        from pipeline import xsk as _xsk

        self.datapath = datapath
        self.devices = devices
        self.steering: Steering | None = None
        self.workers: list[Any] = []
        self._esp_workers: list[_esp.EspWorker] = []
        # close() may run on another thread (or a signal handler): remember our namespace
        self._netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        self._ipr = IPRoute()
        self._own_steering = steering is None
        self.route_watch: RouteWatch | None = None
        try:
            self.steering = steering if steering is not None else Steering(edge_bpf=edge_bpf)
            for ep in endpoints:
                self.steering.add_endpoint(ep)
            self._make_internal_veth(workers)
            self.steering.attach(INTERNAL_ROUTER_END, self.steering.fwd_fn, "native")
            tx_dev = INTERNAL_EDGE_END
            src, dst = self._mac(INTERNAL_EDGE_END), self._mac(INTERNAL_ROUTER_END)
            rx: list[tuple[str, int, int]] = []   # (device, queue, XSKMAP key)
            for slot, dev in enumerate(devices):
                idx = self._ifindex(dev.name)
                self.steering.set_slot(idx, slot * 16)
                rx += [(dev.name, q, slot * 16 + q) for q in dev.queues]
                if not self.steering.external:
                    self.steering.attach(dev.name, self.steering.steer_fn, dev.xdp_mode)
            if not 1 <= workers <= len(rx):
                raise IpsecError(f"workers must be 1..{len(rx)} (one RX queue each at least)")
            self.natt = _xsk.NattTable()
            direct = self._direct_plan([d.name for d in devices] + list(egress), rx, workers) \
                if direct_tx else [[] for _ in range(workers)]
            nh_ifindex = self._ifindex(INTERNAL_ROUTER_END)
            for i in range(workers):
                mine = rx[i::workers]
                w = datapath.ctx.worker()
                self._esp_workers.append(w)
                xw = _xsk.XskWorker(w, [(d, q) for d, q, _ in mine], tx_dev, src, dst,
                                    mode=xsk_mode, ring_size=ring_size, batch=batch,
                                    bench_no_crypto=bench_no_crypto, tx_queue=i,
                                    natt_table=self.natt, tx_budget=tx_budget,
                                    direct=direct[i], nh_prog_fd=self.steering.nh_fn.fd,
                                    nh_ifindex=nh_ifindex)
                self.workers.append(xw)
                for name, status in xw.direct_status().items():
                    if status < 0:
                        log.warning("worker %d: no direct TX on %s (%s): frames routed there "
                                    "take the internal veth", i, name, os.strerror(-status))
                for j, (_, _, key) in enumerate(mine):
                    xw.insert_into(self.steering.xsk_map_fd(), j, key)
            if any(direct):
                self.route_watch = RouteWatch(self.workers)
            for xw in self.workers:
                xw.start(worker_cpu)
            datapath.on_change.append(self._sa_changed)
        except BaseException:
            self.close()
            raise

    def _direct_plan(self, names: list[str], rx: list[tuple[str, int, int]],
                     workers: int) -> list[list[tuple[str, int]]]:
        """Per worker, the direct egress devices as (name, queue). A worker that receives on a
        device transmits on that socket; the others need a TX queue of their own there (an AF_XDP
        queue belongs to one UMEM): the queues no worker receives on, one each. A worker left
        without one sends that device's frames through the internal veth."""
        plan: list[list[tuple[str, int]]] = [[] for _ in range(workers)]
        for name in dict.fromkeys(names):
            link = self._ipr.get_links(self._ifindex(name))[0]
            taken = {q for d, q, _ in rx if d == name}
            free = [q for q in range(link.get("IFLA_NUM_TX_QUEUES") or 1) if q not in taken]
            for i in range(workers):
                if any(d == name for d, _, _ in rx[i::workers]):
                    plan[i].append((name, 0))
                elif free:
                    plan[i].append((name, free.pop(0)))
                else:
                    log.info("worker %d: %s has no free TX queue: its frames take the internal "
                             "veth", i, name)
        return plan

    def _sa_changed(self, tunnel_index: int) -> None:
        """A tunnel without an SA pair forgets the NAT-T address/port its peer was seen at."""
        if not any(cur and idx == tunnel_index
                   for _, idx, _, cur in self.datapath.installed().values()):
            for w in self.workers:
                with contextlib.suppress(Exception):
                    w.natt_forget(tunnel_index)

    def route(self, prefix: str, tunnel_index: int, mss: int = 0) -> None:
        assert self.steering is not None
        self.steering.add_route(prefix, tunnel_index, mss)

    def _ifindex(self, name: str) -> int:
        found = self._ipr.link_lookup(ifname=name)
        if not found:
            raise IpsecError(f"no interface {name!r} in this namespace")
        return found[0]

    def _mac(self, name: str) -> str:
        return self._ipr.get_links(self._ifindex(name))[0].get("IFLA_ADDRESS")

    def _make_internal_veth(self, queues: int) -> None:
        for name in (INTERNAL_EDGE_END,):
            for idx in self._ipr.link_lookup(ifname=name):   # left by a crashed run
                self._ipr.link("del", index=idx)
        # one TX queue per worker (an AF_XDP socket binds one queue)
        self._ipr.link("add", ifname=INTERNAL_EDGE_END, kind="veth", num_tx_queues=queues,
                       num_rx_queues=queues,
                       peer={"ifname": INTERNAL_ROUTER_END, "num_tx_queues": queues,
                             "num_rx_queues": queues})
        # the kernel's own IPv6 chatter (MLD reports, router solicitations: hop limit 1 or 255)
        # from the edge end would reach the forwarder as if the worker had sent it
        with contextlib.suppress(FileNotFoundError), \
                open(f"/proc/sys/net/ipv6/conf/{INTERNAL_EDGE_END}/disable_ipv6", "w") as f:
            f.write("1")
        for name in (INTERNAL_EDGE_END, INTERNAL_ROUTER_END):
            self._ipr.link("set", index=self._ifindex(name), mtu=INTERNAL_MTU, state="up")
        # bpf_fib_lookup forwards only from a device with forwarding on
        with open(f"/proc/sys/net/ipv4/conf/{INTERNAL_ROUTER_END}/forwarding", "w") as f:
            f.write("1")
        # ESP the edge originates (source: a local tunnel endpoint) that the forwarder passes to
        # the kernel - too big for the egress MTU, or no neighbour yet - is otherwise dropped as a
        # martian source; with accept_local the kernel forwards it: fragments the outer packet
        # (its DF is clear, RFC 4303 3.3.4 / RFC 4301 8.1) or resolves the neighbour
        with open(f"/proc/sys/net/ipv4/conf/{INTERNAL_ROUTER_END}/accept_local", "w") as f:
            f.write("1")
        with contextlib.suppress(FileNotFoundError), \
                open(f"/proc/sys/net/ipv6/conf/{INTERNAL_ROUTER_END}/forwarding", "w") as f:
            f.write("1")   # absent when IPv6 is disabled

    def stats(self) -> dict[str, Any]:
        out = self.datapath.stats()
        out["steering"] = self.steering.counters() if self.steering else {}
        out["workers"] = [w.stats().__dict__ for w in self.workers]
        return out

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.datapath.on_change.remove(self._sa_changed)
        if self.route_watch is not None:
            self.route_watch.close()
            self.route_watch = None
        for w in self.workers:
            with contextlib.suppress(Exception):
                w.close()
        self.workers.clear()
        for w in self._esp_workers:
            with contextlib.suppress(Exception):
                w.close()
        self._esp_workers.clear()
        with _in_netns(self._netns):
            if self.steering is not None:
                with contextlib.suppress(Exception):
                    if self._own_steering:
                        self.steering.close()
                    else:
                        self.steering.detach_all()
                self.steering = None
            with contextlib.suppress(Exception):
                for idx in self._ipr.link_lookup(ifname=INTERNAL_EDGE_END):
                    self._ipr.link("del", index=idx)
        with contextlib.suppress(Exception):
            self._ipr.close()
        if self._netns is not None:
            os.close(self._netns)
            self._netns = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- operator's static-SA mode ------------------------------------------------------------------

def _route_arg(text: str) -> tuple[str, int]:
    prefix, _, index = text.partition("=")
    try:
        ipaddress.ip_network(prefix)
        return prefix, int(index)
    except ValueError:
        raise ValueError(f"--route wants PREFIX=TUNNEL_INDEX, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.ipsec static FILE --dev eth0 --endpoint 192.0.2.1 --route
    10.10.0.0/24=77``: run the IPsec data path in this namespace with static SAs (no IKE) until
    SIGTERM or Ctrl-C, logging the counters as one JSON line every ``--stats`` seconds."""
    import argparse
    import json
    import signal
    import time

    from pipeline import xsk as _xsk

    ap = argparse.ArgumentParser(prog="python -m pipeline.ipsec", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("static", help="data path with static SAs from a file")
    st.add_argument("file", type=Path, help="static SA file (TOML, mode 600)")
    st.add_argument("--config", type=Path, help="xtransit config (tunnels by name, node id)")
    st.add_argument("--dev", action="append", required=True,
                    help="outside device NAME or NAME:generic (repeatable)")
    st.add_argument("--endpoint", action="append", required=True, help="local tunnel endpoint")
    st.add_argument("--route", action="append", default=[], type=_route_arg,
                    help="customer prefix routed into a tunnel: PREFIX=TUNNEL_INDEX")
    st.add_argument("--workers", type=int, default=1)
    st.add_argument("--stats", type=float, default=10.0, help="seconds between counter lines")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = None
    if a.config:
        from pipeline import config as _config
        cfg = _config.load(a.config)
    entries = load_static_sas(a.file, cfg)
    dp = IpsecDataPath.from_config(cfg) if cfg else IpsecDataPath({})
    # every RX queue of a device gets a socket: a steered packet on a queue without one is dropped
    devices = [RxDevice(d.split(":")[0], _xsk.rx_queues(d.split(":")[0]),
                        "generic" if d.endswith(":generic") else "native") for d in a.dev]
    edge = None
    try:
        edge = IpsecEdge(dp, devices, a.endpoint, workers=a.workers)
        install_static(dp, entries)
        for prefix, index in a.route:
            edge.route(prefix, index)
        _xsk.stop_on_sigterm(edge)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.info("IPsec data path up: %d SA pair(s), devices %s", len(entries),
                 ", ".join(d.name for d in devices))
        print("ready", flush=True)
        while True:
            time.sleep(a.stats)
            print(json.dumps(edge.stats(), default=str), flush=True)
    except KeyboardInterrupt:
        return 130
    finally:
        if edge is not None:
            edge.close()
        dp.close()


if __name__ == "__main__":
    import sys

    sys.exit(main())

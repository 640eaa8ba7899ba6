"""xtransit configuration: one TOML file, validated into typed, frozen objects.

    cfg = load("examples/edge.toml")
    cfg.node.tunnel_endpoints, cfg.gre_tunnels, cfg.ipsec_tunnels, cfg.routes, cfg.state

Every problem is reported as a ``ConfigError`` naming the file, the field (a dotted path in TOML
syntax, e.g. ``tunnels.gre.site-a.customer_endpoint`` or ``routes[2].prefix``) and what is wrong.
The loader collects every error it can find before raising; when there is more than one it raises
``ConfigErrors`` (a ``ConfigError`` whose ``.errors`` lists them all). Unknown keys are errors, so a
typo is never silently ignored.

Pre-shared keys are read from a file or an environment variable and held in a ``Secret``; the
fleet key (etcd backend) is loaded by ``pipeline.store.crypto.FleetKey``. Neither ever appears in
an error, a ``repr()`` or the ``config check`` output.

Tunnel index: every tunnel has an ``index`` (1..65535, unique across GRE and IPsec) that the data
plane uses as its counter and map slot. Tunnels without an explicit ``index`` get the lowest free
numbers in the order (GRE before IPsec, then by name). That is deterministic for a given file, but
adding or renaming a tunnel can shift the index of others and so restart their counters: set
``index`` explicitly to keep counters stable across config changes.

The file layout is documented by examples/edge.toml.
"""
from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Network
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .secret import Secret

if TYPE_CHECKING:
    from .store.crypto import FleetKey

__all__ = [
    "Analytics", "Config", "ConfigError", "ConfigErrors", "EtcdState", "FleetNode", "GreTunnel",
    "IkeIdentities", "Interface", "IpsecTunnel", "Node", "Route", "SqliteState", "load", "loads",
]

# --- limits and defaults (one place, so the docs, the checks and the tests agree) -------------
INDEX_MIN, INDEX_MAX = 1, 65535
TTL_MIN, TTL_MAX, TTL_DEFAULT = 1, 255, 64
MTU_MIN, MTU_MAX = 576, 9000
MSS_MIN = 536                               # RFC 9293 section 3.7.1: the default send MSS
GRE_MTU_DEFAULT, GRE_MSS_DEFAULT = 1476, 1436       # 1500 - 20 (outer IPv4) - 4 (GRE)
# 1436 inner + 2 (pad length, next header) padded to 1440 + 8 ESP + 8 IV + 16 ICV (AES-GCM)
# + 8 UDP (NAT-T) + 20 outer IPv4 = 1500.
IPSEC_MTU_DEFAULT, IPSEC_MSS_DEFAULT = 1436, 1360
IKE_LIFETIME_MIN, IKE_LIFETIME_MAX, IKE_LIFETIME_DEFAULT = 30 * 60, 24 * 3600, 8 * 3600
CHILD_LIFETIME_MIN, CHILD_LIFETIME_MAX, CHILD_LIFETIME_DEFAULT = 30 * 60, 8 * 3600, 3600
DPD_INTERVAL_MAX, DPD_INTERVAL_DEFAULT = 3600, 30
DPD_TIMEOUT_MAX, DPD_TIMEOUT_DEFAULT = 24 * 3600, 150
PSK_MIN_BYTES = 16          # RFC 7296 section 2.15: a PSK must be as strong as the keys it protects
ROUTE_PRIORITY_DEFAULT = 100
SAMPLE_RATE_DEFAULT = 1000
HTTP_PORT_DEFAULT = 9469
HTTP_ADDRESS_DEFAULT = IPv4Address("127.0.0.1")
HISTORY_INTERVAL_DEFAULT, HISTORY_RETENTION_DEFAULT = 60, 30 * 24 * 3600   # 1-minute points, 30 days
SQLITE_PATH_DEFAULT = "/var/lib/xtransit/state.db"
# analytics history (pipeline/analytics/store.py): 1-second points kept this long, the file's
# size bound, and dropped-frame samples per CPU per second (bpf/sample.h)
FINE_RETENTION_DEFAULT = 3600
ANALYTICS_PATH_DEFAULT = "/var/lib/xtransit/analytics.db"
HISTORY_MAX_BYTES_DEFAULT = 256 << 20
DROP_SAMPLE_LIMIT_DEFAULT = 100
ETCD_PREFIX_DEFAULT = "/xtransit/"
FLEET_NODES_MAX = 1024      # bpf/consts.h XT_MAX_FLEET_NODES (xt_pin_nodes)

ROLES = ("internet", "customer", "both")
XDP_MODES = ("native", "generic")
BACKENDS = ("sqlite", "etcd")
CONFIG_SOURCES = ("file", "store")   # where tunnels and routes come from ([state] config_source)


# --- errors ------------------------------------------------------------------------------------

class ConfigError(ValueError):
    """One problem in a config file: ``file: field: message`` (field None: file-level)."""

    def __init__(self, file: str, field: str | None, message: str) -> None:
        self.file = file
        self.field = field
        self.message = message
        super().__init__(self._line())

    def _line(self) -> str:
        return ": ".join(p for p in (self.file, self.field, self.message) if p)

    def __str__(self) -> str:
        return self._line()

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        return (self,)

    def __reduce__(self):
        return (ConfigError, (self.file, self.field, self.message))


class ConfigErrors(ConfigError):
    """Several problems: ``.file``/``.field``/``.message`` of the first, ``.errors`` all."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self._errors = tuple(errors)
        first = self._errors[0]
        super().__init__(first.file, first.field, first.message)

    def __str__(self) -> str:
        return "\n".join(e._line() for e in self._errors)

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        return self._errors

    def __reduce__(self):
        return (ConfigErrors, (self._errors,))


# --- the model ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interface:
    name: str
    role: str = "both"          # "internet" | "customer" | "both"
    xdp_mode: str = "native"    # "native" | "generic"


@dataclass(frozen=True)
class Node:
    id: int                     # 0..65535, unique per node: part of the ESP IV
    name: str
    ipsec_domain: str
    tunnel_endpoints: tuple[IPv4Address, ...]
    interfaces: tuple[Interface, ...]
    # this node's own unicast address for fleet traffic (pinned tunnels' packets carried in
    # GRE between nodes); None: the node neither forwards to nor receives from a pin node
    fleet_address: IPv4Address | None = None


@dataclass(frozen=True)
class FleetNode:
    """``[[fleet.nodes]]``: another node's id and its fleet address (pinned tunnels)."""
    id: int
    address: IPv4Address


@dataclass(frozen=True)
class GreTunnel:
    kind: ClassVar[str] = "gre"
    name: str
    id: str
    index: int
    customer_endpoint: IPv4Address
    edge_endpoint: IPv4Address
    interface_address: IPv4Interface
    key: int | None = None
    ttl: int = TTL_DEFAULT
    mtu: int = GRE_MTU_DEFAULT
    mss: int = GRE_MSS_DEFAULT
    index_configured: bool = True   # False when the loader assigned the index
    description: str = ""


@dataclass(frozen=True)
class IkeIdentities:
    """The IKE identities (IDi) a customer router may send for this tunnel.

    The same three forms hosted transit services hand out: FQDN
    ``<id>.<account_id>.ipsec.<node.ipsec_domain>``, USER_FQDN ``ipsec@<fqdn>`` and KEY_ID
    ``<account_id>_<id>`` (RFC 7296 section 3.5 ID types).
    """
    fqdn: str
    user_fqdn: str
    key_id: bytes


@dataclass(frozen=True)
class IpsecTunnel:
    kind: ClassVar[str] = "ipsec"
    name: str
    id: str
    account_id: str
    index: int
    customer_endpoint: IPv4Address | None   # None: the router is behind NAT or dynamic
    edge_endpoint: IPv4Address
    interface_address: IPv4Interface
    psk: Secret
    psk_source: str                         # "file:<path>" or "env:<NAME>", never the key
    identities: IkeIdentities
    ttl: int = TTL_DEFAULT
    mtu: int = IPSEC_MTU_DEFAULT
    mss: int = IPSEC_MSS_DEFAULT
    allow_null_cipher: bool = False
    replay_protection: bool = False
    ike_lifetime: int = IKE_LIFETIME_DEFAULT
    child_lifetime: int = CHILD_LIFETIME_DEFAULT
    dpd_interval: int = DPD_INTERVAL_DEFAULT   # seconds; 0 disables dead peer detection
    dpd_timeout: int = DPD_TIMEOUT_DEFAULT
    index_configured: bool = True
    description: str = ""
    # the node id that alone encrypts this tunnel's outbound traffic (the others carry it
    # there in GRE, bpf/pin.h); None: every node encrypts what reaches it
    pin_node: int | None = None


Tunnel = GreTunnel | IpsecTunnel


@dataclass(frozen=True)
class Route:
    prefix: IPv4Network | IPv6Network
    tunnel: str
    priority: int = ROUTE_PRIORITY_DEFAULT  # lower wins; equal priorities share by flow hash


@dataclass(frozen=True)
class SqliteState:
    backend: ClassVar[str] = "sqlite"
    path: Path
    config_source: str = "file"     # "store": tunnels and routes from the store (fleet_config)


@dataclass(frozen=True)
class EtcdState:
    backend: ClassVar[str] = "etcd"
    endpoints: tuple[str, ...]
    fleet_key: FleetKey             # pipeline.store.crypto: seals key material in the store
    fleet_key_file: Path
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    prefix: str = ETCD_PREFIX_DEFAULT
    config_source: str = "file"


@dataclass(frozen=True)
class Analytics:
    sample_rate: int = SAMPLE_RATE_DEFAULT      # 1 in N packets; 1 samples every packet
    http_address: IPv4Address = HTTP_ADDRESS_DEFAULT
    http_port: int = HTTP_PORT_DEFAULT          # 0 disables the HTTP endpoint
    history_interval: int = HISTORY_INTERVAL_DEFAULT
    history_retention: int = HISTORY_RETENTION_DEFAULT
    fine_retention: int = FINE_RETENTION_DEFAULT        # seconds of 1-second points
    history_file: Path = Path(ANALYTICS_PATH_DEFAULT)
    history_max_bytes: int = HISTORY_MAX_BYTES_DEFAULT  # bound on the history file's size
    drop_sample_limit: int = DROP_SAMPLE_LIMIT_DEFAULT  # dropped-frame samples per CPU per second


@dataclass(frozen=True)
class Config:
    path: str
    node: Node
    gre_tunnels: tuple[GreTunnel, ...]
    ipsec_tunnels: tuple[IpsecTunnel, ...]
    routes: tuple[Route, ...]
    state: SqliteState | EtcdState
    analytics: Analytics
    fleet_nodes: tuple[FleetNode, ...] = ()     # [[fleet.nodes]], this node included or not

    def fleet_address_of(self, node_id: int) -> IPv4Address | None:
        """The fleet address of node ``node_id`` (this node's from [node])."""
        if node_id == self.node.id:
            return self.node.fleet_address
        return next((n.address for n in self.fleet_nodes if n.id == node_id), None)

    @property
    def tunnels(self) -> tuple[Tunnel, ...]:
        """All tunnels, ordered by index."""
        return tuple(sorted((*self.gre_tunnels, *self.ipsec_tunnels), key=lambda t: t.index))

    def tunnel(self, name: str) -> Tunnel:
        for t in (*self.gre_tunnels, *self.ipsec_tunnels):
            if t.name == name:
                return t
        raise KeyError(name)

    def routes_for(self, name: str) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if r.tunnel == name)


# --- value converters: each returns the typed value or raises _Invalid(message) ----------------

class _Invalid(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _type_name(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    return {int: "integer", float: "float", str: "string", dict: "table", list: "array"}.get(
        type(v), "date/time")


def _show(v: Any) -> str:
    """A short description of a wrong-typed value (never used for secret fields)."""
    if isinstance(v, (dict, list)):
        return _type_name(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return f"{_type_name(v)} {v!r}"


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def conv(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Invalid(f"expected an integer, got {_show(v)}")
        if not lo <= v <= hi:
            raise _Invalid(f"must be between {lo} and {hi}, got {v}")
        return v
    return conv


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Invalid(f"expected true or false, got {_show(v)}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise _Invalid(f"expected a string, got {_show(v)}")
    if not v.strip():
        raise _Invalid("must not be empty")
    return v


def _text(v: Any) -> str:
    """Free text for people (may be empty), one line."""
    if not isinstance(v, str):
        raise _Invalid(f"expected a string, got {_show(v)}")
    if len(v) > 255 or any(c in v for c in "\r\n\0"):
        raise _Invalid("must be one line of at most 255 characters")
    return v


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def conv(v: Any) -> str:
        s = _str(v)
        if s not in options:
            raise _Invalid(f"must be one of {', '.join(repr(o) for o in options)}, got {s!r}")
        return s
    return conv


def _matching(pattern: str, what: str) -> Callable[[Any], str]:
    rx = re.compile(pattern)

    def conv(v: Any) -> str:
        s = _str(v)
        if not rx.fullmatch(s):
            raise _Invalid(f"not {what}: {s!r}")
        return s
    return conv


_DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_name = _matching(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}",
                  "a valid name (letters, digits, '-' and '_', at most 63)")
_label = _matching(_DNS_LABEL, "a DNS label (letters, digits and '-', at most 63)")
_domain = _matching(rf"(?=.{{1,253}}$){_DNS_LABEL}(\.{_DNS_LABEL})+", "a DNS domain name")
_ifname = _matching(r"(?!\.\.?$)[A-Za-z0-9_.@-]{1,15}",
                    "a Linux interface name (at most 15 characters, no '/', ':' or spaces)")
_env_name = _matching(r"[A-Za-z_][A-Za-z0-9_]*", "an environment variable name")


def _unusable_reason(a: ipaddress.IPv4Address) -> str | None:
    if a.is_unspecified:
        return "unspecified"
    if a.is_multicast:
        return "multicast"
    if a.is_loopback:
        return "loopback"
    if a == IPv4Address("255.255.255.255"):
        return "broadcast"
    return None


def _ipv4(v: Any) -> IPv4Address:
    if not isinstance(v, str):
        raise _Invalid(f"expected a string with an IPv4 address, got {_show(v)}")
    try:
        a = IPv4Address(v)
    except ValueError:
        raise _Invalid(f"not an IPv4 address: {v!r}") from None
    why = _unusable_reason(a)
    if why:
        raise _Invalid(f"not a unicast address ({why}): {v!r}")
    return a


def _ipv4_interface(v: Any) -> IPv4Interface:
    """The edge side of a point-to-point tunnel network: a /31 (RFC 3021) or a /30."""
    if not isinstance(v, str):
        raise _Invalid(f"expected a string like '10.200.0.0/31', got {_show(v)}")
    if "/" not in v:
        raise _Invalid(f"missing prefix length (a /31 or /30 like '10.200.0.0/31'): {v!r}")
    try:
        i = IPv4Interface(v)
    except ValueError:
        raise _Invalid(f"not an IPv4 address with prefix length: {v!r}") from None
    if i.network.prefixlen not in (30, 31):
        raise _Invalid(f"must be a /31 or /30 point-to-point network, got /{i.network.prefixlen}")
    if i.network.prefixlen == 30 and i.ip in (i.network.network_address,
                                                i.network.broadcast_address):
        raise _Invalid(f"{i.ip} is the network or broadcast address of {i.network}")
    why = _unusable_reason(i.ip)
    if why:
        raise _Invalid(f"not a unicast address ({why}): {v!r}")
    return i


def _prefix(v: Any) -> IPv4Network | IPv6Network:
    if not isinstance(v, str):
        raise _Invalid(f"expected a string like '203.0.113.0/24', got {_show(v)}")
    if "/" not in v:
        raise _Invalid(f"missing prefix length (write {v}/32 or {v}/128 for one host): {v!r}")
    try:
        return ipaddress.ip_network(v, strict=True)
    except ValueError:
        pass
    try:
        net = ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise _Invalid(f"not an IPv4 or IPv6 prefix: {v!r}") from None
    raise _Invalid(f"host bits set in {v!r} (the network is {net})")


def _list_of(item: Callable[[Any], Any], *, nonempty: bool = True) -> Callable[[Any], tuple]:
    def conv(v: Any) -> tuple:
        if not isinstance(v, list):
            raise _Invalid(f"expected an array, got {_show(v)}")
        if nonempty and not v:
            raise _Invalid("must not be empty")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except _Invalid as e:
                raise _Invalid(f"item {i}: {e.message}") from None
        dup = next((x for i, x in enumerate(out) if x in out[:i]), None)
        if dup is not None:
            raise _Invalid(f"listed twice: {str(dup)!r}")
        return tuple(out)
    return conv


def _etcd_endpoint(v: Any) -> str:
    s = _str(v)
    u = urllib.parse.urlsplit(s)
    try:
        port = u.port
    except ValueError:
        port = None
    if u.scheme not in ("http", "https") or not u.hostname or port is None or u.path not in ("",
                                                                                            "/"):
        raise _Invalid(f"not an etcd endpoint like 'https://10.0.0.1:2379': {s!r}")
    return s


# --- tables ------------------------------------------------------------------------------------

_MISSING = object()     # "no default: the key is required"
_BAD = object()         # a value that failed validation (already reported)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(k: str) -> str:
    """A key as it would be written in a TOML dotted path."""
    if _BARE_KEY.fullmatch(k):
        return k
    return '"' + k.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _join(path: str, k: str) -> str:
    return f"{path}.{_key(k)}" if path else _key(k)


class _Ctx:
    def __init__(self, file: str, base_dir: Path, env: Mapping[str, str]) -> None:
        self.file = file
        self.base_dir = base_dir
        self.env = env
        self.errors: list[ConfigError] = []
        self.shared_file: str | None = None   # where [tunnels] / [[routes]] came from instead

    def error(self, field: str | None, message: str) -> None:
        file = self.file
        if self.shared_file and field and re.match(r"(tunnels|routes)\b", field):
            file = self.shared_file
        self.errors.append(ConfigError(file, field, message))

    def path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base_dir / q

    def table(self, path: str, v: Any, *, form: str = "a table") -> _Table | None:
        if not isinstance(v, dict):
            self.error(path, f"expected {form}, got {_show(v)}")
            return None
        return _Table(self, path, v)

    def array_of_tables(self, path: str, v: Any) -> list[_Table]:
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            self.error(path, f"expected an array of tables ([[{path}]]), got {_show(v)}")
            return []
        return [_Table(self, f"{path}[{i}]", x) for i, x in enumerate(v)]


class _Table:
    """One TOML table being read: remembers which keys were used so the rest can be reported."""

    def __init__(self, ctx: _Ctx, path: str, data: dict) -> None:
        self.ctx, self.path, self.data = ctx, path, data
        self.known: set[str] = set()
        self.ok = True

    def field(self, k: str) -> str:
        return _join(self.path, k)

    def error(self, k: str | None, message: str) -> None:
        self.ctx.error(self.field(k) if k else self.path, message)
        self.ok = False

    def has(self, k: str) -> bool:
        self.known.add(k)
        return k in self.data

    def get(self, k: str, conv: Callable[[Any], Any], default: Any = _MISSING) -> Any:
        self.known.add(k)
        if k not in self.data:
            if default is _MISSING:
                self.error(k, "missing (required)")
                return _BAD
            return default
        try:
            return conv(self.data[k])
        except _Invalid as e:
            self.error(k, e.message)
            return _BAD

    def finish(self, hints: Mapping[str, str] | None = None) -> None:
        """Report keys nobody asked for; ``hints`` gives a specific message for some of them."""
        hints = hints or {}
        for k in self.data:
            if k in self.known:
                continue
            if k in hints:
                self.error(k, hints[k])
                continue
            close = difflib.get_close_matches(k, sorted(self.known), n=1, cutoff=0.6)
            if close:
                self.error(k, f"unknown key (did you mean {close[0]!r}?)")
            else:
                self.error(k, f"unknown key; known keys: {', '.join(sorted(self.known))}")


# --- sections ----------------------------------------------------------------------------------

def _read_node(ctx: _Ctx, v: Any) -> Node | None:
    t = ctx.table("node", v)
    if t is None:
        return None
    node_id = t.get("id", _int(0, 65535))
    name = t.get("name", _label)
    domain = t.get("ipsec_domain", _domain)
    endpoints = t.get("tunnel_endpoints", _list_of(_ipv4))
    fleet_address = t.get("fleet_address", _ipv4, None)
    if fleet_address not in (None, _BAD) and endpoints is not _BAD and fleet_address in endpoints:
        t.error("fleet_address", f"{fleet_address} is one of tunnel_endpoints: the fleet "
                                 "address must be this node's own unicast address")
    interfaces: list[Interface] = []
    t.known.add("interfaces")
    if "interfaces" not in t.data:
        t.error("interfaces", "missing (required): add at least one [[node.interfaces]]")
    else:
        tables = ctx.array_of_tables("node.interfaces", t.data["interfaces"])
        if not tables and isinstance(t.data["interfaces"], list):
            t.error("interfaces", "must not be empty: add at least one [[node.interfaces]]")
        seen: dict[str, str] = {}
        for it in tables:
            ifname = it.get("name", _ifname)
            role = it.get("role", _choice(ROLES))
            mode = it.get("xdp_mode", _choice(XDP_MODES), "native")
            it.finish()
            if ifname is not _BAD and ifname in seen:
                it.error("name", f"interface {ifname!r} already listed as {seen[ifname]}")
            elif ifname is not _BAD:
                seen[ifname] = it.path
            if it.ok:
                interfaces.append(Interface(ifname, role, mode))
            else:
                t.ok = False
        all_ok = bool(interfaces) and len(interfaces) == len(tables)
        if all_ok and not any(i.role in ("internet", "both") for i in interfaces):
            t.error("interfaces", "no interface faces the internet (role \"internet\" or "
                                  "\"both\"): tunnels could not arrive")
    t.finish()
    if not t.ok:
        return None
    return Node(node_id, name, domain, endpoints, tuple(interfaces), fleet_address)


def _common_tunnel_fields(t: _Table, mtu_default: int, mss_default: int) -> dict[str, Any]:
    f: dict[str, Any] = {
        "index": t.get("index", _int(INDEX_MIN, INDEX_MAX), None),
        "edge_endpoint": t.get("edge_endpoint", _ipv4),
        "interface_address": t.get("interface_address", _ipv4_interface),
        "ttl": t.get("ttl", _int(TTL_MIN, TTL_MAX), TTL_DEFAULT),
        "mtu": t.get("mtu", _int(MTU_MIN, MTU_MAX), mtu_default),
    }
    mtu = f["mtu"]
    if t.has("mss"):
        mss = t.get("mss", _int(MSS_MIN, MTU_MAX - 40))
        if mss is not _BAD and mtu is not _BAD and mss > mtu - 40:
            t.error("mss", f"{mss} is larger than mtu - 40 = {mtu - 40} (IPv4 + TCP headers)")
            mss = _BAD
    else:
        # The default MSS follows a lowered MTU so that setting only mtu stays consistent.
        mss = min(mss_default, mtu - 40) if mtu is not _BAD else _BAD
    f["mss"] = mss
    return f


def _read_secret_file(t: _Table, k: str, min_bytes: int) -> tuple[Secret, Path] | None:
    raw = t.get(k, _str)
    if raw is _BAD:
        return None
    p = t.ctx.path(raw)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        t.error(k, f"file not found: '{p}'")
        return None
    except IsADirectoryError:
        t.error(k, f"is a directory, not a file: '{p}'")
        return None
    except OSError as e:
        t.error(k, f"cannot read '{p}': {e.strerror}")
        return None
    value = data.strip()   # a trailing newline from an editor or `echo` is not part of the key
    if not value:
        t.error(k, f"file is empty: '{p}'")
        return None
    if len(value) < min_bytes:
        t.error(k, f"key in '{p}' is shorter than {min_bytes} bytes")
        return None
    return Secret(value), p


def _read_psk(t: _Table) -> tuple[Secret, str] | None:
    has_file, has_env = t.has("psk_file"), t.has("psk_env")
    if has_file == has_env:
        which = "both are set" if has_file else "neither is set"
        t.error("psk_file", f"set exactly one of psk_file or psk_env ({which})")
        t.known.update(("psk_file", "psk_env"))
        return None
    if has_file:
        got = _read_secret_file(t, "psk_file", PSK_MIN_BYTES)
        return None if got is None else (got[0], f"file:{got[1]}")
    name = t.get("psk_env", _env_name)
    if name is _BAD:
        return None
    value = t.ctx.env.get(name)
    if value is None:
        t.error("psk_env", f"environment variable {name} is not set")
        return None
    value = value.strip()
    if not value:
        t.error("psk_env", f"environment variable {name} is empty")
        return None
    if len(value.encode()) < PSK_MIN_BYTES:
        t.error("psk_env", f"key in environment variable {name} is shorter than "
                           f"{PSK_MIN_BYTES} bytes")
        return None
    return Secret(value), f"env:{name}"


_INLINE_PSK = ("inline keys are not accepted (they end up in backups, diffs and tickets): "
               "put the key in a file (psk_file) or an environment variable (psk_env)")


# Names hosted transit APIs use for the same fields: say what this file calls them.
_HOSTED_NAMES = {
    "cloudflare_endpoint": "this file calls it edge_endpoint",
    "cloudflare_gre_endpoint": "this file calls it edge_endpoint",
    "customer_gre_endpoint": "this file calls it customer_endpoint",
    "customer_ipsec_endpoint": "this file calls it customer_endpoint",
    "name": "the tunnel's name is its table name: [tunnels.<kind>.<name>]",
}


def _read_gre(t: _Table, name: str) -> dict[str, Any] | None:
    f = {"name": name, "id": t.get("id", _str),
         "customer_endpoint": t.get("customer_endpoint", _ipv4),
         "key": t.get("key", _int(0, 2**32 - 1), None)}
    f.update(_common_tunnel_fields(t, GRE_MTU_DEFAULT, GRE_MSS_DEFAULT))
    f["description"] = t.get("description", _text, "")
    t.finish(_HOSTED_NAMES)
    return f if t.ok else None


def _read_ipsec(t: _Table, name: str) -> dict[str, Any] | None:
    f = {"name": name, "id": t.get("id", _label),
         "account_id": t.get("account_id", _label),
         "customer_endpoint": t.get("customer_endpoint", _ipv4, None)}
    f.update(_common_tunnel_fields(t, IPSEC_MTU_DEFAULT, IPSEC_MSS_DEFAULT))
    f["description"] = t.get("description", _text, "")
    psk = _read_psk(t)
    f["allow_null_cipher"] = t.get("allow_null_cipher", _bool, False)
    f["replay_protection"] = t.get("replay_protection", _bool, False)
    f["ike_lifetime"] = t.get("ike_lifetime", _int(IKE_LIFETIME_MIN, IKE_LIFETIME_MAX),
                              IKE_LIFETIME_DEFAULT)
    f["child_lifetime"] = t.get("child_lifetime", _int(CHILD_LIFETIME_MIN, CHILD_LIFETIME_MAX),
                                CHILD_LIFETIME_DEFAULT)
    interval = t.get("dpd_interval", _int(0, DPD_INTERVAL_MAX), DPD_INTERVAL_DEFAULT)
    timeout = t.get("dpd_timeout", _int(1, DPD_TIMEOUT_MAX), DPD_TIMEOUT_DEFAULT)
    if interval is not _BAD and timeout is not _BAD and interval and timeout <= interval:
        t.error("dpd_timeout", f"must be longer than dpd_interval ({interval}), got {timeout}")
    f["dpd_interval"], f["dpd_timeout"] = interval, timeout
    f["pin_node"] = t.get("pin_node", _int(0, 65535), None)
    t.finish({"psk": _INLINE_PSK, **_HOSTED_NAMES})
    if not t.ok or psk is None:
        return None
    f["psk"], f["psk_source"] = psk
    return f


def _identities(domain: str, tunnel_id: str, account_id: str) -> IkeIdentities:
    # Issue 6 scheme: <tunnel_id>.<account_id>.ipsec.<domain>; DNS names compare case-blind.
    fqdn = f"{tunnel_id}.{account_id}.ipsec.{domain}".lower()
    return IkeIdentities(fqdn, f"ipsec@{fqdn}", f"{account_id}_{tunnel_id}".encode())


def _read_routes(ctx: _Ctx, v: Any) -> list[tuple[_Table, dict[str, Any]]]:
    out = []
    for t in ctx.array_of_tables("routes", v):
        f = {"prefix": t.get("prefix", _prefix), "tunnel": t.get("tunnel", _name),
             "priority": t.get("priority", _int(0, 65535), ROUTE_PRIORITY_DEFAULT)}
        t.finish()
        out.append((t, f))
    return out


def _read_state(ctx: _Ctx, v: Any) -> SqliteState | EtcdState | None:
    t = ctx.table("state", v)
    if t is None:
        return None
    backend = t.get("backend", _choice(BACKENDS), "sqlite")
    source = t.get("config_source", _choice(CONFIG_SOURCES), "file")
    sqlite_keys = ("path",)
    etcd_keys = ("endpoints", "ca_file", "cert_file", "key_file", "fleet_key_file", "prefix")
    if backend == "sqlite":
        raw = t.get("path", _str, SQLITE_PATH_DEFAULT)
        wrong = {k: "only valid with backend = \"etcd\"" for k in etcd_keys}
        t.finish(wrong)
        return SqliteState(ctx.path(raw), source) if t.ok else None
    if backend != "etcd":
        t.known.update(sqlite_keys + etcd_keys)
        t.finish()
        return None
    endpoints = t.get("endpoints", _list_of(_etcd_endpoint))
    files: dict[str, Path | None] = {}
    for k in ("ca_file", "cert_file", "key_file"):
        raw = t.get(k, _str, None)
        files[k] = None if raw in (None, _BAD) else ctx.path(raw)
        if files[k] is not None and not files[k].is_file():
            t.error(k, f"file not found: '{files[k]}'")
    if (files["cert_file"] is None) != (files["key_file"] is None) and t.ok:
        t.error("key_file" if files["key_file"] is None else "cert_file",
                "cert_file and key_file go together (TLS client authentication)")
    # The same rules as the etcd client (pipeline/store/etcd.py): TLS for all or for none.
    if endpoints is not _BAD:
        schemes = {urllib.parse.urlsplit(e).scheme for e in endpoints}
        tls_set = any(files.values())
        if schemes == {"http", "https"}:
            t.error("endpoints", "mixes http:// and https:// endpoints: use TLS for all or none")
        elif schemes == {"https"} and files["ca_file"] is None and t.ok:
            t.error("ca_file", "missing: https:// endpoints need the CA that signed the servers' "
                               "certificates")
        elif schemes == {"http"} and tls_set:
            which = next(k for k, v in files.items() if v is not None)
            t.error(which, "set, but the endpoints are plain http://")
    prefix = t.get("prefix", _matching(r"/[^\s]*/", "a key prefix like '/xtransit/'"),
                   ETCD_PREFIX_DEFAULT)
    fleet = _read_fleet_key(t)
    t.finish({k: "only valid with backend = \"sqlite\"" for k in sqlite_keys})
    if not t.ok or fleet is None:
        return None
    return EtcdState(endpoints, fleet[0], fleet[1], files["ca_file"], files["cert_file"],
                     files["key_file"], prefix, source)


def _read_fleet_key(t: _Table) -> tuple[FleetKey, Path] | None:
    """The fleet key through the store's own loader, so `config check` refuses exactly what the
    running node would (missing, shorter than 32 bytes, readable by group or others, foreign
    owner)."""
    from .store.crypto import FleetKey, FleetKeyError

    raw = t.get("fleet_key_file", _str)
    if raw is _BAD:
        return None
    p = t.ctx.path(raw)
    try:
        return FleetKey.from_file(p), p
    except FleetKeyError as e:
        t.error("fleet_key_file", str(e))
        return None


def _read_analytics(ctx: _Ctx, v: Any) -> Analytics | None:
    t = ctx.table("analytics", v)
    if t is None:
        return None
    a = Analytics(
        sample_rate=t.get("sample_rate", _int(1, 1_000_000), SAMPLE_RATE_DEFAULT),
        http_address=t.get("http_address", _http_address, HTTP_ADDRESS_DEFAULT),
        http_port=t.get("http_port", _int(0, 65535), HTTP_PORT_DEFAULT),
        history_interval=t.get("history_interval", _int(1, 3600), HISTORY_INTERVAL_DEFAULT),
        history_retention=t.get("history_retention", _int(60, 366 * 24 * 3600),
                                HISTORY_RETENTION_DEFAULT),
        fine_retention=t.get("fine_retention", _int(60, 7 * 24 * 3600), FINE_RETENTION_DEFAULT),
        history_file=ctx.path(t.get("history_file", _str, ANALYTICS_PATH_DEFAULT)),
        history_max_bytes=t.get("history_max_bytes", _int(64 << 10, 1 << 40),
                                HISTORY_MAX_BYTES_DEFAULT),
        drop_sample_limit=t.get("drop_sample_limit", _int(0, 1_000_000),
                                DROP_SAMPLE_LIMIT_DEFAULT),
    )
    if t.ok and a.history_retention < a.history_interval:
        t.error("history_retention", f"must be at least history_interval ({a.history_interval})")
    t.finish()
    return a if t.ok else None


def _http_address(v: Any) -> IPv4Address:
    if not isinstance(v, str):
        raise _Invalid(f"expected a string with an IPv4 address, got {_show(v)}")
    try:
        return IPv4Address(v)
    except ValueError:
        raise _Invalid(f"not an IPv4 address: {v!r}") from None


def _read_fleet(ctx: _Ctx, node: Node | None, v: Any) -> tuple[FleetNode, ...] | None:
    """``[fleet]``: ``[[fleet.nodes]]`` with each node's ``id`` and fleet ``address``. The
    same table may be copied to every node's file: this node's own entry, if listed, must
    match ``[node] fleet_address``."""
    t = ctx.table("fleet", v)
    if t is None:
        return None
    out: list[FleetNode] = []
    t.known.add("nodes")
    tables = ctx.array_of_tables("fleet.nodes", t.data["nodes"]) if "nodes" in t.data else []
    if len(tables) > FLEET_NODES_MAX:
        t.error("nodes", f"{len(tables)} nodes: at most {FLEET_NODES_MAX}")
    ids: dict[int, str] = {}
    addrs: dict[IPv4Address, str] = {}
    endpoints = set(node.tunnel_endpoints) if node else set()
    for nt in tables:
        nid = nt.get("id", _int(0, 65535))
        addr = nt.get("address", _ipv4)
        nt.finish()
        if nid is not _BAD:
            if nid in ids:
                nt.error("id", f"node id {nid} already listed as {ids[nid]}")
            ids.setdefault(nid, nt.path)
        if addr is not _BAD:
            if addr in addrs:
                nt.error("address", f"{addr} already listed as {addrs[addr]}")
            elif addr in endpoints:
                nt.error("address", f"{addr} is one of node.tunnel_endpoints (the anycast "
                                    "address): a fleet address is one node's own")
            addrs.setdefault(addr, nt.path)
        if node is not None and nt.ok:
            if nid == node.id and addr != node.fleet_address:
                mine = node.fleet_address or "not set"
                nt.error("address", f"this node (id {nid}): {addr} differs from "
                                    f"node.fleet_address ({mine})")
            elif nid != node.id and addr == node.fleet_address:
                nt.error("address", f"{addr} is this node's fleet_address, listed for "
                                    f"node {nid}")
        if nt.ok:
            out.append(FleetNode(nid, addr))
        else:
            t.ok = False
    t.finish()
    return tuple(out) if t.ok else None


def _check_pins(ctx: _Ctx, node: Node, fleet: tuple[FleetNode, ...],
                tunnels: list[tuple[str, str, dict[str, Any]]]) -> None:
    """A pinned tunnel needs this node's fleet address and, unless pinned here, the pin
    node's (``[[fleet.nodes]]``)."""
    known = {n.id for n in fleet}
    for kind, path, f in tunnels:
        pin = f.get("pin_node")
        if kind != "ipsec" or pin is None:
            continue
        if node.fleet_address is None:
            ctx.error(_join(path, "pin_node"), "a pinned tunnel needs this node's "
                                               "node.fleet_address (fleet traffic in GRE)")
        elif pin != node.id and pin not in known:
            listed = ", ".join(str(i) for i in sorted(known)) or "none"
            ctx.error(_join(path, "pin_node"), f"node {pin} is not this node (id {node.id}) "
                                               f"and not in [[fleet.nodes]] (ids: {listed})")


# --- cross-table checks ------------------------------------------------------------------------

def _assign_indexes(ctx: _Ctx, tunnels: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Check explicit indexes are unique, then give the others the lowest free numbers."""
    owner: dict[int, str] = {}
    for kind, path, f in tunnels:
        i = f["index"]
        if i is None:
            continue
        if i in owner:
            ctx.error(_join(path, "index"), f"index {i} already used by {owner[i]}")
        else:
            owner[i] = path
    free = (i for i in range(INDEX_MIN, INDEX_MAX + 1) if i not in owner)
    for kind, path, f in sorted(tunnels, key=lambda x: (x[0] != "gre", x[2]["name"])):
        if f["index"] is None:
            f["index"], f["index_configured"] = next(free, None), False
            if f["index"] is None:
                ctx.error(_join(path, "index"), f"more than {INDEX_MAX} tunnels")


def _check_tunnels(ctx: _Ctx, node: Node | None,
                   tunnels: list[tuple[str, str, dict[str, Any]]]) -> None:
    endpoints = set(node.tunnel_endpoints) if node else None
    ids: dict[str, str] = {}
    ike_ids: dict[tuple[str, str], str] = {}
    gre_keys: dict[tuple, str] = {}
    nets: list[tuple[IPv4Network, str]] = []
    customers = [(f["customer_endpoint"], path) for _, path, f in tunnels
                 if f["customer_endpoint"] is not None]

    def bad(f: dict, path: str, k: str, message: str) -> None:
        ctx.error(_join(path, k), message)

    for kind, path, f in tunnels:
        if endpoints is not None and f["edge_endpoint"] not in endpoints:
            listed = ", ".join(str(a) for a in node.tunnel_endpoints)
            bad(f, path, "edge_endpoint", f"{f['edge_endpoint']} is not one of "
                                          f"node.tunnel_endpoints ({listed})")
        c = f["customer_endpoint"]
        if endpoints is not None and c is not None and c in endpoints:
            bad(f, path, "customer_endpoint", f"{c} is one of this node's tunnel_endpoints")
        if f["id"] in ids:
            bad(f, path, "id", f"id {f['id']!r} already used by {ids[f['id']]}")
        else:
            ids[f["id"]] = path
            if kind == "ipsec":
                ike = (f["id"].lower(), f["account_id"].lower())
                if ike in ike_ids:
                    bad(f, path, "id", f"same IKE identity as {ike_ids[ike]} (DNS names ignore "
                                       "case): a peer could not be told apart")
                else:
                    ike_ids[ike] = path
        if kind == "gre":
            k = (f["edge_endpoint"], c, f["key"])
            if k in gre_keys:
                bad(f, path, "customer_endpoint",
                    f"same edge_endpoint, customer_endpoint and key as {gre_keys[k]}: "
                    "the data plane could not tell them apart (set a distinct key)")
            else:
                gre_keys[k] = path
        net = f["interface_address"].network
        for other, opath in nets:
            if net.overlaps(other):
                bad(f, path, "interface_address",
                    f"{net} overlaps {_join(opath, 'interface_address')} ({other})")
        nets.append((net, path))
        inside = [str(a) for a in sorted(endpoints or ()) if a in net]
        inside += [f"{a} ({p}.customer_endpoint)" for a, p in customers if a in net]
        if inside:
            bad(f, path, "interface_address",
                f"{net} contains a tunnel endpoint: {', '.join(inside)}")


def _check_routes(ctx: _Ctx, node: Node | None, declared: dict[str, str],
                  routes: list[tuple[_Table, dict[str, Any]]],
                  tunnels: list[tuple[str, str, dict[str, Any]]]) -> list[Route]:
    out = []
    seen: dict[tuple, str] = {}
    customers = [(f["customer_endpoint"], path) for _, path, f in tunnels
                 if f["customer_endpoint"] is not None]
    for t, f in routes:
        name, prefix = f["tunnel"], f["prefix"]
        if name is not _BAD and name not in declared:
            known = ", ".join(sorted(declared)) or "none are configured"
            t.error("tunnel", f"unknown tunnel {name!r} (tunnels: {known})")
        if prefix is _BAD or name is _BAD:
            continue
        hits = [f"{a} (node.tunnel_endpoints)" for a in (node.tunnel_endpoints if node else ())
                if a.version == prefix.version and a in prefix]
        hits += [f"{a} ({p}.customer_endpoint)" for a, p in customers
                 if a.version == prefix.version and a in prefix]
        if hits:
            t.error("prefix", f"{prefix} contains a tunnel endpoint, so encapsulated packets "
                              f"would be routed into a tunnel: {', '.join(hits)}")
        k = (prefix, name)
        if k in seen:
            t.error("prefix", f"{prefix} via {name!r} is already listed as {seen[k]}")
        else:
            seen[k] = t.path
        if t.ok:
            out.append(Route(prefix, name, f["priority"]))
    return out


# --- entry points ------------------------------------------------------------------------------

_TOP = ("node", "tunnels", "routes", "state", "analytics", "fleet")


def _build(ctx: _Ctx, doc: dict[str, Any], shared: dict[str, Any] | None = None) -> Config | None:
    """``shared``: the ``tunnels`` and ``routes`` documents read from the store, used when the
    file says ``[state] config_source = "store"`` (pipeline/fleet_config.py reads them)."""
    st = doc.get("state")
    if isinstance(st, dict) and st.get("config_source") == "store":
        for k, what in (("tunnels", "[tunnels]"), ("routes", "[[routes]]")):
            if k in doc:
                ctx.error(k, f"{what} come from the store here ([state] config_source = "
                             "\"store\"): remove them from this file and publish them with "
                             "`xtransit config push`")
        doc = {**doc, **(shared or {})}
    top = _Table(ctx, "", doc)
    node = _read_node(ctx, doc["node"]) if top.has("node") else None
    if "node" not in doc:
        ctx.error("node", "missing (required): add a [node] table")

    tunnels: list[tuple[str, str, dict[str, Any]]] = []   # (kind, path, fields) that parsed
    declared: dict[str, str] = {}                           # every tunnel name -> its path
    if top.has("tunnels"):
        tt = ctx.table("tunnels", doc["tunnels"])
        if tt is not None:
            for kind in ("gre", "ipsec"):
                if not tt.has(kind):
                    continue
                kt = ctx.table(tt.field(kind), tt.data[kind], form=f"tables [tunnels.{kind}.NAME]")
                for name, v in (kt.data.items() if kt else ()):
                    kt.known.add(name)
                    path = kt.field(name)
                    if not _BARE_KEY.fullmatch(name) or len(name) > 63:
                        ctx.error(path, "tunnel names use letters, digits, '-' and '_' "
                                        "(at most 63)")
                        continue
                    if name in declared:
                        ctx.error(path, f"tunnel name also used by {declared[name]}; "
                                        "routes could not tell them apart")
                        continue
                    declared[name] = path
                    t = ctx.table(path, v)
                    if t is None:
                        continue
                    f = (_read_gre if kind == "gre" else _read_ipsec)(t, name)
                    if f is not None:
                        tunnels.append((kind, path, f))
            tt.finish()

    routes = _read_routes(ctx, doc["routes"]) if top.has("routes") else []
    state = (_read_state(ctx, doc["state"]) if top.has("state")
             else SqliteState(ctx.path(SQLITE_PATH_DEFAULT)))
    analytics = _read_analytics(ctx, doc["analytics"]) if top.has("analytics") else Analytics()
    fleet = _read_fleet(ctx, node, doc["fleet"]) if top.has("fleet") else ()
    top.known.update(_TOP)
    top.finish()

    _assign_indexes(ctx, tunnels)
    _check_tunnels(ctx, node, tunnels)
    route_objs = _check_routes(ctx, node, declared, routes, tunnels)
    if node is not None and fleet is not None:
        _check_pins(ctx, node, fleet, tunnels)
    if ctx.errors or node is None or state is None or analytics is None or fleet is None:
        return None
    gre, ipsec = [], []
    for kind, _path, f in tunnels:
        f.setdefault("index_configured", True)
        if kind == "gre":
            gre.append(GreTunnel(**f))
        else:
            f["identities"] = _identities(node.ipsec_domain, f["id"], f["account_id"])
            ipsec.append(IpsecTunnel(**f))
    return Config(ctx.file, node, tuple(gre), tuple(ipsec), tuple(route_objs), state, analytics,
                  fleet)


def loads(text: str, *, file: str = "<string>", base_dir: str | Path | None = None,
          env: Mapping[str, str] | None = None, shared: dict[str, Any] | None = None,
          shared_file: str = "state store") -> Config:
    """Validate TOML text. Relative file paths (psk_file, ...) are resolved against base_dir.
    ``shared``: tunnels and routes from the store, for ``config_source = "store"``; their
    errors name ``shared_file``."""
    ctx = _Ctx(file, Path(base_dir) if base_dir is not None else Path.cwd(),
               os.environ if env is None else env)
    if shared is not None:
        ctx.shared_file = shared_file
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, None, f"TOML syntax error: {e}") from None
    cfg = _build(ctx, doc, shared)
    if ctx.errors or cfg is None:
        if len(ctx.errors) == 1:
            raise ctx.errors[0]
        raise ConfigErrors(ctx.errors)
    return cfg


def load(path: str | Path, *, env: Mapping[str, str] | None = None,
         shared: dict[str, Any] | None = None, shared_file: str = "state store") -> Config:
    """Read and validate one config file; raise ConfigError (or ConfigErrors) on any problem."""
    file = str(path)
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(file, None, "file not found") from None
    except IsADirectoryError:
        raise ConfigError(file, None, "is a directory, not a config file") from None
    except OSError as e:
        raise ConfigError(file, None, f"cannot read: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(file, None, f"not UTF-8 text (byte {e.start})") from None
    return loads(text, file=file, base_dir=p.resolve().parent, env=env, shared=shared,
                 shared_file=shared_file)

"""What the edge nodes share through the store, and where: the one key layout and its encodings.

Key layout (``root`` defaults to ``/xtransit/``; every segment is percent-encoded)::

    <root>v1/tunnel/<tunnel name>              tunnel configuration        JSON
    <root>v1/route/<tunnel name>/<prefix>      one route                   JSON
    <root>v1/sa/<tunnel name>/<spi_in, 8 hex>  one Child SA pair           JSON, keys sealed
    <root>v1/ike/<spi_i hex>_<spi_r hex>       one IKE SA's state          JSON, state sealed

Values are JSON objects with ``"format": 1``. Key material never appears in clear: a Child SA's
six key fields are packed and sealed with the fleet key (``crypto.FleetKey``, AES-256-GCM, the
store key as associated data) into ``"keys"``; an IKE SA's state is an opaque blob sealed whole
(it holds SK_d, SK_a*, SK_e*). A tunnel's pre-shared key is never written (each node reads it
from its own configuration).

A rekey writes the new Child SA with ``"replaces": <old spi_in>`` and then deletes the old
record, so a watcher can turn the pair into one ``SaInstaller.replace`` call. IKE SA records
change only by compare-and-swap on their revision: concurrent updates from two nodes are
resolved, never silently overwritten (``IkeSaConflict``).
"""
from __future__ import annotations

import base64
import ipaddress
import json
import struct
from dataclasses import dataclass
from urllib.parse import quote, unquote

from ..config import GreTunnel, IpsecTunnel, Route
from ..sa import ChildSaParams, Selector
from .base import Record, Store
from .crypto import FleetKey, SealError

FORMAT = 1
ROOT_DEFAULT = "/xtransit/"


class SchemaError(ValueError):
    """A stored value does not decode (the message names the store key, never key bytes)."""


class IkeSaConflict(Exception):
    """A compare-and-swap on an IKE SA record lost: ``current`` is what the store holds now."""

    def __init__(self, key: str, expected: int, current: IkeSaState | None) -> None:
        now = "gone" if current is None else f"at revision {current.revision}"
        super().__init__(f"IKE SA {key}: expected revision {expected}, record is {now}")
        self.current = current


def _seg(s: str) -> str:
    if not s:
        raise ValueError("an empty key segment")
    return quote(s, safe="")


@dataclass(frozen=True)
class Layout:
    root: str = ROOT_DEFAULT

    def __post_init__(self) -> None:
        if not self.root.startswith("/") or not self.root.endswith("/"):
            raise ValueError(f"store root must start and end with '/': {self.root!r}")

    @property
    def base(self) -> str:
        return f"{self.root}v{FORMAT}/"

    @property
    def tunnels(self) -> str:
        return self.base + "tunnel/"

    @property
    def routes(self) -> str:
        return self.base + "route/"

    @property
    def sas(self) -> str:
        return self.base + "sa/"

    @property
    def ike_sas(self) -> str:
        return self.base + "ike/"

    def tunnel(self, name: str) -> str:
        return self.tunnels + _seg(name)

    def route(self, tunnel: str, prefix: str) -> str:
        return f"{self.routes}{_seg(tunnel)}/{_seg(prefix)}"

    def sa_prefix(self, tunnel: str) -> str:
        return f"{self.sas}{_seg(tunnel)}/"

    def sa(self, tunnel: str, spi_in: int) -> str:
        if not 0 < spi_in <= 0xFFFFFFFF:
            raise ValueError(f"SPI out of range: {spi_in}")
        return f"{self.sa_prefix(tunnel)}{spi_in:08x}"

    def ike_sa(self, spi_i: int, spi_r: int) -> str:
        return f"{self.ike_sas}{spi_i:016x}_{spi_r:016x}"

    def parse_sa(self, key: str) -> tuple[str, int]:
        """(tunnel name, spi_in) of a Child SA key."""
        rest = key.removeprefix(self.sas)
        parts = rest.split("/")
        if rest == key or len(parts) != 2 or len(parts[1]) != 8:
            raise SchemaError(f"not a Child SA key: {key!r}")
        try:
            return unquote(parts[0]), int(parts[1], 16)
        except ValueError:
            raise SchemaError(f"not a Child SA key: {key!r}") from None


def _dump(obj: dict) -> bytes:
    return json.dumps({"format": FORMAT, **obj}, separators=(",", ":"), sort_keys=True).encode()


def _load(key: str, value: bytes) -> dict:
    try:
        obj = json.loads(value.decode())    # str: json skips its encoding detection
    except (ValueError, UnicodeDecodeError):
        raise SchemaError(f"{key}: not JSON") from None
    if not isinstance(obj, dict):
        raise SchemaError(f"{key}: not a JSON object")
    if obj.get("format") != FORMAT:
        raise SchemaError(f"{key}: unknown format {obj.get('format')!r} (this node reads "
                          f"{FORMAT})")
    return obj


# --- Child SAs ----------------------------------------------------------------------------------
_KEY_FIELDS = ("enc_key_in", "enc_key_out", "salt_in", "salt_out", "integ_key_in",
               "integ_key_out")
_PLAIN_FIELDS = ("tunnel_name", "tunnel_id", "account_id", "ike_sa", "spi_in", "spi_out", "encr",
                 "encr_key_bits", "integ", "local_addr", "remote_addr", "encap_local_port",
                 "encap_remote_port", "replay_window", "esn", "lifetime_soft_s",
                 "lifetime_hard_s")


def _pack_keys(sa: ChildSaParams) -> bytes:
    out = bytearray()
    for f in _KEY_FIELDS:
        v = getattr(sa, f)
        out += struct.pack("!H", len(v)) + v
    return bytes(out)


def _unpack_keys(key: str, blob: bytes) -> dict[str, bytes]:
    out, off = {}, 0
    for f in _KEY_FIELDS:
        if off + 2 > len(blob):
            raise SchemaError(f"{key}: sealed keys truncated")
        (n,) = struct.unpack_from("!H", blob, off)
        if off + 2 + n > len(blob):
            raise SchemaError(f"{key}: sealed keys truncated")
        out[f] = blob[off + 2:off + 2 + n]
        off += 2 + n
    if off != len(blob):
        raise SchemaError(f"{key}: sealed keys have {len(blob) - off} trailing bytes")
    return out


def _selector_json(s: Selector) -> list:
    return [str(s.start), str(s.end), s.proto, s.start_port, s.end_port]


def _selector(key: str, v) -> Selector:
    try:
        start, end, proto, sp, ep = v
        return Selector(ipaddress.ip_address(start), ipaddress.ip_address(end), int(proto),
                        int(sp), int(ep))
    except (TypeError, ValueError):
        raise SchemaError(f"{key}: bad traffic selector {v!r}") from None


@dataclass(frozen=True)
class ChildSaRecord:
    sa: ChildSaParams
    replaces: int | None        # the spi_in this SA rekeys, if any
    node: int | None            # the node that negotiated it (for diagnostics)


def encode_child_sa(fleet: FleetKey, key: str, sa: ChildSaParams, *, replaces: int | None = None,
                    node: int | None = None) -> bytes:
    obj = {f: getattr(sa, f) for f in _PLAIN_FIELDS}
    obj["ts_local"] = [_selector_json(s) for s in sa.ts_local]
    obj["ts_remote"] = [_selector_json(s) for s in sa.ts_remote]
    obj["keys"] = base64.b64encode(fleet.seal(_pack_keys(sa), key)).decode()
    obj["replaces"] = replaces
    obj["node"] = node
    return _dump(obj)


def decode_child_sa(fleet: FleetKey, key: str, value: bytes) -> ChildSaRecord:
    obj = _load(key, value)
    try:
        sealed = base64.b64decode(obj["keys"], validate=True)
        plain = {f: obj[f] for f in _PLAIN_FIELDS}
        ts_local = tuple(_selector(key, s) for s in obj["ts_local"])
        ts_remote = tuple(_selector(key, s) for s in obj["ts_remote"])
        replaces, node = obj.get("replaces"), obj.get("node")
    except (KeyError, TypeError, ValueError) as e:
        raise SchemaError(f"{key}: bad Child SA record ({type(e).__name__}: "
                          f"{e if isinstance(e, KeyError) else 'bad field'})") from None
    try:
        keys = _unpack_keys(key, fleet.open(sealed, key))
    except SealError as e:
        raise SchemaError(str(e)) from None
    try:
        sa = ChildSaParams(**plain, ts_local=ts_local, ts_remote=ts_remote, **keys)
    except TypeError:
        raise SchemaError(f"{key}: bad Child SA fields") from None
    return ChildSaRecord(sa, replaces, node)


# --- IKE SAs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IkeSaState:
    """One IKE SA's shared state: an opaque blob in a versioned format (``state_format``,
    owned by the IKE code), sealed at rest, and the store revision it was read at."""

    spi_i: int
    spi_r: int
    state_format: int
    state: bytes
    node: int | None
    revision: int

    def __repr__(self) -> str:
        return (f"IkeSaState({self.spi_i:016x}_{self.spi_r:016x}, format={self.state_format}, "
                f"{len(self.state)} bytes, node={self.node}, revision={self.revision})")


def encode_ike_sa(fleet: FleetKey, key: str, state_format: int, state: bytes,
                  node: int | None) -> bytes:
    return _dump({"state_format": state_format, "node": node,
                  "state": base64.b64encode(fleet.seal(state, key)).decode()})


def decode_ike_sa(fleet: FleetKey, layout: Layout, rec: Record) -> IkeSaState:
    obj = _load(rec.key, rec.value)
    name = rec.key.removeprefix(layout.ike_sas)
    try:
        spi_i, spi_r = (int(x, 16) for x in name.split("_"))
        sealed = base64.b64decode(obj["state"], validate=True)
        fmt, node = int(obj["state_format"]), obj.get("node")
    except (KeyError, TypeError, ValueError):
        raise SchemaError(f"{rec.key}: bad IKE SA record") from None
    try:
        state = fleet.open(sealed, rec.key)
    except SealError as e:
        raise SchemaError(str(e)) from None
    return IkeSaState(spi_i, spi_r, fmt, state, node, rec.mod_revision)


# --- tunnels and routes ------------------------------------------------------------------------
def encode_tunnel(t: GreTunnel | IpsecTunnel) -> bytes:
    """The tunnel's configuration; an IPsec tunnel's pre-shared key is left out (each node
    reads it from its own configuration, ``psk_source``)."""
    obj: dict = {"kind": t.kind, "name": t.name, "id": t.id, "index": t.index,
                 "edge_endpoint": str(t.edge_endpoint),
                 "interface_address": str(t.interface_address),
                 "ttl": t.ttl, "mtu": t.mtu, "mss": t.mss}
    if t.description:
        obj["description"] = t.description
    if isinstance(t, GreTunnel):
        obj.update(customer_endpoint=str(t.customer_endpoint), key=t.key)
    else:
        obj.update(
            account_id=t.account_id, psk_source=t.psk_source,
            customer_endpoint=None if t.customer_endpoint is None else str(t.customer_endpoint),
            identities={"fqdn": t.identities.fqdn, "user_fqdn": t.identities.user_fqdn,
                        "key_id": t.identities.key_id.hex()},
            allow_null_cipher=t.allow_null_cipher, replay_protection=t.replay_protection,
            ike_lifetime=t.ike_lifetime, child_lifetime=t.child_lifetime,
            dpd_interval=t.dpd_interval, dpd_timeout=t.dpd_timeout)
        if t.pin_node is not None:       # only when set: unpinned records stay as they were
            obj["pin_node"] = t.pin_node
    return _dump(obj)


def decode_tunnel(key: str, value: bytes) -> dict:
    """The tunnel fields as a dict (IPsec tunnels are completed with the local PSK by the
    configuration code)."""
    obj = _load(key, value)
    if obj.get("kind") not in ("gre", "ipsec") or not isinstance(obj.get("name"), str):
        raise SchemaError(f"{key}: bad tunnel record")
    return obj


def encode_route(r: Route) -> bytes:
    return _dump({"prefix": str(r.prefix), "tunnel": r.tunnel, "priority": r.priority})


def decode_route(key: str, value: bytes) -> Route:
    obj = _load(key, value)
    try:
        return Route(ipaddress.ip_network(obj["prefix"]), str(obj["tunnel"]),
                     int(obj["priority"]))
    except (KeyError, TypeError, ValueError):
        raise SchemaError(f"{key}: bad route record") from None


# --- the shared state, on a store ---------------------------------------------------------------
class SharedState:
    """Typed reads and writes of the shared objects on one :class:`Store`."""

    def __init__(self, store: Store, fleet: FleetKey, layout: Layout | None = None,
                 node: int | None = None) -> None:
        self.store = store
        self.fleet = fleet
        self.layout = layout or Layout()
        self.node = node

    # Child SAs
    def put_child_sa(self, sa: ChildSaParams, *, replaces: int | None = None) -> int:
        key = self.layout.sa(sa.tunnel_name, sa.spi_in)
        return self.store.put(key, encode_child_sa(self.fleet, key, sa, replaces=replaces,
                                                   node=self.node))

    def rekey_child_sa(self, old_spi_in: int, sa: ChildSaParams) -> int:
        """Write the new SA (marked as replacing the old), then delete the old record."""
        rev = self.put_child_sa(sa, replaces=old_spi_in)
        res = self.store.delete(self.layout.sa(sa.tunnel_name, old_spi_in))
        return res.revision if res.ok else rev

    def delete_child_sa(self, tunnel: str, spi_in: int) -> bool:
        return self.store.delete(self.layout.sa(tunnel, spi_in)).ok

    def child_sa(self, tunnel: str, spi_in: int) -> ChildSaRecord | None:
        key = self.layout.sa(tunnel, spi_in)
        rec = self.store.get(key)
        return None if rec is None else decode_child_sa(self.fleet, key, rec.value)

    def decode_child_sa(self, rec: Record) -> ChildSaRecord:
        return decode_child_sa(self.fleet, rec.key, rec.value)

    # IKE SAs
    def create_ike_sa(self, spi_i: int, spi_r: int, state_format: int, state: bytes) -> int:
        """Create the record; IkeSaConflict if it already exists."""
        return self._ike_cas(spi_i, spi_r, state_format, state, 0)

    def update_ike_sa(self, spi_i: int, spi_r: int, state_format: int, state: bytes,
                      expected_revision: int) -> int:
        """Replace the record read at ``expected_revision``; IkeSaConflict if it changed."""
        if expected_revision < 1:
            raise ValueError("update_ike_sa needs the revision the record was read at")
        return self._ike_cas(spi_i, spi_r, state_format, state, expected_revision)

    def _ike_cas(self, spi_i, spi_r, state_format, state, expected) -> int:
        key = self.layout.ike_sa(spi_i, spi_r)
        res = self.store.cas(key, encode_ike_sa(self.fleet, key, state_format, state, self.node),
                             expected)
        if not res.ok:
            cur = None if res.current is None else decode_ike_sa(self.fleet, self.layout,
                                                                 res.current)
            raise IkeSaConflict(key, expected, cur)
        return res.revision

    def ike_sa(self, spi_i: int, spi_r: int) -> IkeSaState | None:
        rec = self.store.get(self.layout.ike_sa(spi_i, spi_r))
        return None if rec is None else decode_ike_sa(self.fleet, self.layout, rec)

    def delete_ike_sa(self, spi_i: int, spi_r: int, expected_revision: int) -> None:
        key = self.layout.ike_sa(spi_i, spi_r)
        res = self.store.delete(key, expected_revision)
        if not res.ok:
            cur = None if res.current is None else decode_ike_sa(self.fleet, self.layout,
                                                                 res.current)
            raise IkeSaConflict(key, expected_revision, cur)

    # Tunnels and routes
    def put_tunnel(self, t: GreTunnel | IpsecTunnel) -> int:
        return self.store.put(self.layout.tunnel(t.name), encode_tunnel(t))

    def put_route(self, r: Route) -> int:
        return self.store.put(self.layout.route(r.tunnel, str(r.prefix)), encode_route(r))

    def routes(self) -> list[Route]:
        return [decode_route(r.key, r.value) for r in self.store.list(self.layout.routes).records]

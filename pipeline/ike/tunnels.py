"""IPsec tunnels as the IKE core sees them, and the lookup of a tunnel from the peer's IDi.

``IkeTunnel`` is deliberately small; the configuration module adapts its ``IpsecTunnel`` to it.
The lookup goes by the ID payload's type byte, never by how the string looks (issue 6):

- ID_RFC822_ADDR  ``ipsec@<tunnel_id>.<account_id>.ipsec.<domain>``
- ID_FQDN         ``<tunnel_id>.<account_id>.ipsec.<domain>``
- ID_KEY_ID       ``<account_id>_<tunnel_id>``
- ID_IPV4_ADDR    the customer endpoint, only when (edge endpoint, customer endpoint) is unique
"""
from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass, field

from ..secret import Secret
from .constants import IdType

log = logging.getLogger(__name__)

CHILD_LIFETIME_MIN = 30 * 60
CHILD_LIFETIME_MAX = 8 * 3600


@dataclass(frozen=True)
class IkeTunnel:
    name: str
    tunnel_id: str
    account_id: str
    edge_endpoint: str
    customer_endpoint: str | None = None
    psk: bytes | Secret = field(default=b"", repr=False)
    allow_null_cipher: bool = False
    replay_protection: bool = True
    replay_window: int = 64
    ike_lifetime: int = 4 * 3600
    child_lifetime: int = 3600
    dpd_interval: int = 30
    dpd_timeout: int = 150
    # Traffic selectors we accept, as networks: local = behind the edge, remote = behind the peer.
    local_ts: tuple[str, ...] = ("0.0.0.0/0",)
    remote_ts: tuple[str, ...] = ("0.0.0.0/0",)

    def __post_init__(self) -> None:
        if not CHILD_LIFETIME_MIN <= self.child_lifetime <= CHILD_LIFETIME_MAX:
            raise ValueError(f"tunnel {self.name}: child_lifetime {self.child_lifetime} outside "
                             f"{CHILD_LIFETIME_MIN}..{CHILD_LIFETIME_MAX} seconds")

    @property
    def psk_bytes(self) -> bytes:
        """The PSK for the PRF. Never log or print it."""
        return self.psk.reveal() if isinstance(self.psk, Secret) else self.psk

    def fqdn(self, domain: str) -> str:
        return f"{self.tunnel_id}.{self.account_id}.ipsec.{domain}".lower()

    def key_id(self) -> bytes:
        return f"{self.account_id}_{self.tunnel_id}".encode()


class TunnelDirectory:
    """Maps IDi payloads to tunnels. Built once from the configured IPsec tunnels."""

    def __init__(self, tunnels: list[IkeTunnel] | tuple[IkeTunnel, ...], domain: str):
        self.domain = domain.lower().rstrip(".")
        self.tunnels = {t.name: t for t in tunnels}
        self._fqdn = {t.fqdn(self.domain): t for t in tunnels}
        self._key_id = {t.key_id(): t for t in tunnels}
        pairs = Counter((t.edge_endpoint, t.customer_endpoint) for t in tunnels
                        if t.customer_endpoint)
        self._ipv4 = {
            (t.edge_endpoint, t.customer_endpoint): t for t in tunnels
            if t.customer_endpoint and pairs[(t.edge_endpoint, t.customer_endpoint)] == 1
        }

    def lookup(self, id_type: int, data: bytes, edge_addr: str) -> IkeTunnel | None:
        if id_type == IdType.FQDN:
            return self._fqdn.get(_text(data))
        if id_type == IdType.RFC822_ADDR:
            text = _text(data)
            if text is None or not text.startswith("ipsec@"):
                return None
            return self._fqdn.get(text[len("ipsec@"):])
        if id_type == IdType.KEY_ID:
            return self._key_id.get(bytes(data))
        if id_type == IdType.IPV4_ADDR:
            if len(data) != 4:
                return None
            addr = str(ipaddress.IPv4Address(data))
            return self._ipv4.get((edge_addr, addr))
        return None

    def edge_id(self, tunnel: IkeTunnel) -> tuple[int, bytes]:
        """The edge's own IDr: an FQDN in the same scheme."""
        return IdType.FQDN, tunnel.fqdn(self.domain).encode()


def _text(data: bytes) -> str | None:
    try:
        return data.decode("ascii").lower().rstrip(".")
    except UnicodeDecodeError:
        return None


def from_config(cfg) -> TunnelDirectory:
    """Adapt a loaded ``pipeline.config.Config`` (its IPsec tunnels and node domain)."""
    tunnels = [
        IkeTunnel(
            name=t.name, tunnel_id=t.id, account_id=t.account_id,
            edge_endpoint=str(t.edge_endpoint),
            customer_endpoint=str(t.customer_endpoint) if t.customer_endpoint else None,
            psk=t.psk, allow_null_cipher=t.allow_null_cipher,
            replay_protection=t.replay_protection, ike_lifetime=t.ike_lifetime,
            child_lifetime=t.child_lifetime, dpd_interval=t.dpd_interval,
            dpd_timeout=t.dpd_timeout,
        )
        for t in cfg.ipsec_tunnels
    ]
    return TunnelDirectory(tunnels, cfg.node.ipsec_domain)

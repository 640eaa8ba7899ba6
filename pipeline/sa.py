"""The one SA interface between the IKE daemon and whatever installs ESP SAs.

The IKE core hands every established Child SA pair to an ``SaInstaller`` as one ``ChildSaParams``
object (the idea of strongSwan's ``kernel_ipsec_add_sa_t``: one parameter object for "add SA").
The native ESP data path, the shared state store and the test recorder all implement the same
protocol. Keys are fields with ``repr=False`` and are never logged.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)

# Algorithm names used on this interface (the data path maps them to its own constants).
ENCR_AES_GCM_16 = "aes-gcm-16"
ENCR_AES_CBC = "aes-cbc"
ENCR_NULL = "null"
INTEG_HMAC_SHA2_256_128 = "hmac-sha2-256-128"
INTEG_HMAC_SHA1_96 = "hmac-sha1-96"


@dataclass(frozen=True)
class Selector:
    """One traffic selector: an address range, an IP protocol (0 = any) and a port range."""

    start: ipaddress.IPv4Address | ipaddress.IPv6Address
    end: ipaddress.IPv4Address | ipaddress.IPv6Address
    proto: int = 0
    start_port: int = 0
    end_port: int = 65535

    def __str__(self) -> str:
        try:
            nets = list(ipaddress.summarize_address_range(self.start, self.end))
            addr = ",".join(str(n) for n in nets) if len(nets) == 1 else f"{self.start}-{self.end}"
        except (TypeError, ValueError):
            addr = f"{self.start}-{self.end}"
        extra = "" if self.proto == 0 else f" proto {self.proto}"
        if (self.start_port, self.end_port) != (0, 65535):
            extra += f" ports {self.start_port}-{self.end_port}"
        return addr + extra


@dataclass(frozen=True)
class ChildSaParams:
    """One ESP SA pair (inbound and outbound), tunnel mode.

    ``*_in`` protects traffic from the peer to us, ``*_out`` from us to the peer. For AES-GCM the
    4-byte salt is split off the key (RFC 4106 section 8.1); for NULL and AES-CBC it is empty.
    ``encap_local_port``/``encap_remote_port`` are set when ESP travels in UDP (RFC 3948).
    """

    tunnel_name: str
    tunnel_id: str
    account_id: str
    ike_sa: str  # "<spi_i hex>/<spi_r hex>" of the IKE SA that negotiated it
    spi_in: int
    spi_out: int
    encr: str
    encr_key_bits: int
    integ: str | None
    local_addr: str
    remote_addr: str
    encap_local_port: int | None = None
    encap_remote_port: int | None = None
    replay_window: int = 64
    esn: bool = False
    lifetime_soft_s: int = 0
    lifetime_hard_s: int = 0
    ts_local: tuple[Selector, ...] = ()
    ts_remote: tuple[Selector, ...] = ()
    enc_key_in: bytes = field(default=b"", repr=False)
    enc_key_out: bytes = field(default=b"", repr=False)
    salt_in: bytes = field(default=b"", repr=False)
    salt_out: bytes = field(default=b"", repr=False)
    integ_key_in: bytes = field(default=b"", repr=False)
    integ_key_out: bytes = field(default=b"", repr=False)

    @property
    def udp_encap(self) -> bool:
        return self.encap_remote_port is not None

    def with_encap(self, local_port: int | None, remote_port: int | None) -> ChildSaParams:
        return replace(self, encap_local_port=local_port, encap_remote_port=remote_port)

    def describe(self) -> str:
        alg = self.encr + (f"-{self.encr_key_bits}" if self.encr_key_bits else "")
        if self.integ:
            alg += "/" + self.integ
        nat = f" udp {self.encap_local_port}->{self.encap_remote_port}" if self.udp_encap else ""
        return (f"{self.tunnel_name} in 0x{self.spi_in:08x} out 0x{self.spi_out:08x} {alg} "
                f"{self.local_addr}<->{self.remote_addr}{nat}")


@runtime_checkable
class SaInstaller(Protocol):
    def install(self, sa: ChildSaParams) -> None:
        """Install a new SA pair; the inbound SPI is the key."""

    def replace(self, old_spi_in: int, sa: ChildSaParams) -> None:
        """Rekey: install ``sa`` and retire the pair whose inbound SPI is ``old_spi_in``.

        Outbound traffic moves to ``sa`` at once; an implementation may keep accepting inbound
        packets on the old SA until ``delete(old_spi_in)``, which the IKE core always calls once
        the rekey's DELETE exchange is done (the native data path does; the recorder below
        forgets the old pair at once). ``sa.spi_in`` must differ from every installed SPI."""

    def delete(self, spi_in: int) -> None:
        """Remove the pair whose inbound SPI is ``spi_in`` (no error if already gone)."""


class RecordingSaInstaller:
    """In-memory ``SaInstaller`` for tests and dry runs: keeps the SAs and an event list."""

    def __init__(self) -> None:
        self.sas: dict[int, ChildSaParams] = {}
        self.events: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def install(self, sa: ChildSaParams) -> None:
        with self._lock:
            self.sas[sa.spi_in] = sa
            self.events.append(("install", sa.spi_in))
            self._changed.notify_all()
        log.info("SA installed: %s", sa.describe())

    def replace(self, old_spi_in: int, sa: ChildSaParams) -> None:
        with self._lock:
            self.sas.pop(old_spi_in, None)
            self.sas[sa.spi_in] = sa
            self.events.append(("replace", sa.spi_in))
            self._changed.notify_all()
        log.info("SA replaced 0x%08x by %s", old_spi_in, sa.describe())

    def delete(self, spi_in: int) -> None:
        with self._lock:
            if self.sas.pop(spi_in, None) is not None:
                self.events.append(("delete", spi_in))
            self._changed.notify_all()
        log.info("SA deleted 0x%08x", spi_in)

    def wait_for(self, predicate, timeout: float) -> bool:
        """Block until ``predicate(self.sas)`` is true (for tests driving a real peer)."""
        with self._lock:
            return self._changed.wait_for(lambda: predicate(self.sas), timeout)

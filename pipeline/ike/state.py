"""IKE SA and Child SA state, and the small computations tasks share (AUTH, NAT-D, keys)."""
from __future__ import annotations

import hashlib
import ipaddress
import os
import struct
from dataclasses import dataclass, field
from enum import Enum

from ..sa import (
    ENCR_AES_CBC,
    ENCR_AES_GCM_16,
    ENCR_NULL,
    INTEG_HMAC_SHA1_96,
    INTEG_HMAC_SHA2_256_128,
    ChildSaParams,
    Selector,
)
from .constants import Encr, Integ
from .crypto import IkeKeys, IntegAlg, PrfAlg, derive_ike_keys, sk_cipher
from .message import SkKeys
from .payloads import TrafficSelector
from .proposal import Selection
from .tunnels import IkeTunnel

Endpoint = tuple[str, int]


class IkeState(Enum):
    INIT_SENT = "init-sent"          # initiator: IKE_SA_INIT request sent
    HALF_OPEN = "half-open"          # responder: IKE_SA_INIT answered, waiting for IKE_AUTH
    AUTH_SENT = "auth-sent"          # initiator: IKE_AUTH request sent
    ESTABLISHED = "established"
    REKEYED = "rekeyed"              # replaced by a new IKE SA, waiting for its DELETE
    DELETING = "deleting"
    DEAD = "dead"


@dataclass(frozen=True)
class ChildKeys:
    encr_i: bytes = field(repr=False)
    integ_i: bytes = field(repr=False)
    encr_r: bytes = field(repr=False)
    integ_r: bytes = field(repr=False)


def child_key_sizes(sel: Selection) -> tuple[int, int]:
    """(encryption key length incl. salt, integrity key length) for an ESP selection."""
    if sel.encr == Encr.AES_GCM_16:
        return sel.key_bits // 8 + 4, 0  # RFC 4106 section 8.1: 4-byte salt after the key
    encr_len = 0 if sel.encr == Encr.NULL else sel.key_bits // 8
    return encr_len, IntegAlg(sel.integ).key_size


def split_child_keymat(sel: Selection, keymat: bytes) -> ChildKeys:
    """RFC 7296 section 2.17: initiator-to-responder keys first, encryption before integrity."""
    e, a = child_key_sizes(sel)
    return ChildKeys(keymat[:e], keymat[e : e + a], keymat[e + a : 2 * e + a],
                     keymat[2 * e + a : 2 * (e + a)])


_ENCR_NAME = {Encr.AES_GCM_16: ENCR_AES_GCM_16, Encr.AES_CBC: ENCR_AES_CBC, Encr.NULL: ENCR_NULL}
_INTEG_NAME = {Integ.HMAC_SHA2_256_128: INTEG_HMAC_SHA2_256_128,
               Integ.HMAC_SHA1_96: INTEG_HMAC_SHA1_96}


def to_selector(ts: TrafficSelector) -> Selector:
    return Selector(ipaddress.ip_address(ts.start_addr), ipaddress.ip_address(ts.end_addr),
                    ts.ip_proto, ts.start_port, ts.end_port)


@dataclass
class ChildSa:
    spi_in: int
    spi_out: int
    sel: Selection
    ts_local: list[TrafficSelector]
    ts_remote: list[TrafficSelector]
    created: float
    rekey_at: float
    expire_at: float
    keys: ChildKeys = field(repr=False)
    initiator: bool  # we were the initiator of the exchange that created it
    rekeyed: bool = False
    rekey_pending: bool = False
    collision_nonce: bytes = field(default=b"", repr=False)  # lowest nonce of the peer's rekey
    bytes_in: int = 0
    bytes_out: int = 0

    def params(self, ike: IkeSa) -> ChildSaParams:
        tunnel = ike.tunnel
        if tunnel is None:
            raise ValueError("Child SA without a tunnel")
        e_out, a_out, e_in, a_in = (
            (self.keys.encr_i, self.keys.integ_i, self.keys.encr_r, self.keys.integ_r)
            if self.initiator else
            (self.keys.encr_r, self.keys.integ_r, self.keys.encr_i, self.keys.integ_i)
        )
        gcm = self.sel.encr == Encr.AES_GCM_16
        nat = ike.nat_detected
        return ChildSaParams(
            tunnel_name=tunnel.name, tunnel_id=tunnel.tunnel_id, account_id=tunnel.account_id,
            ike_sa=ike.name, spi_in=self.spi_in, spi_out=self.spi_out,
            encr=_ENCR_NAME[Encr(self.sel.encr)],
            encr_key_bits=self.sel.key_bits, integ=_INTEG_NAME.get(self.sel.integ),
            local_addr=ike.local[0], remote_addr=ike.remote[0],
            encap_local_port=ike.local[1] if nat else None,
            encap_remote_port=ike.remote[1] if nat else None,
            replay_window=tunnel.replay_window if tunnel.replay_protection else 0,
            lifetime_soft_s=int(self.rekey_at - self.created),
            lifetime_hard_s=int(self.expire_at - self.created),
            ts_local=tuple(to_selector(t) for t in self.ts_local),
            ts_remote=tuple(to_selector(t) for t in self.ts_remote),
            enc_key_in=e_in[:-4] if gcm else e_in, enc_key_out=e_out[:-4] if gcm else e_out,
            salt_in=e_in[-4:] if gcm else b"", salt_out=e_out[-4:] if gcm else b"",
            integ_key_in=a_in, integ_key_out=a_out,
        )


@dataclass
class Pending:
    """Our outstanding request (window size 1, RFC 7296 section 2.3)."""

    task: object
    msg_id: int
    datagrams: list[bytes]
    sent_at: float
    tries: int = 1
    deadline: float = 0.0  # give up after this time (0: after EngineConfig.retransmit_tries)


class IkeSa:
    """One IKE SA. Holds state only; the exchanges live in ``tasks``."""

    def __init__(self, *, initiator: bool, spi_i: bytes, spi_r: bytes, local: Endpoint,
                 remote: Endpoint, now: float, tunnel: IkeTunnel | None = None):
        self.initiator = initiator  # original initiator of this IKE SA
        self.spi_i = spi_i
        self.spi_r = spi_r
        self.local = local
        self.remote = remote
        self.tunnel = tunnel
        self.state = IkeState.INIT_SENT if initiator else IkeState.HALF_OPEN
        self.created = now
        self.last_heard = now
        self.established_at = 0.0
        self.rekey_at = 0.0
        self.rekeyed_at = 0.0
        self.sel: Selection | None = None
        self.prf: PrfAlg | None = None
        self.keys: IkeKeys | None = None
        self.sk: SkKeys | None = None
        self.ni = b""
        self.nr = b""
        self.init_key: tuple[bytes, str, int] | None = None  # responder: IKE_SA_INIT index
        self.init_request = b""
        self.init_response = b""
        self.nat_local = False   # we are behind a NAT
        self.nat_remote = False  # the peer is behind a NAT
        self.frag_supported = False
        self.children: dict[int, ChildSa] = {}
        # message IDs (RFC 7296 section 2.3)
        self.next_request_id = 0      # our next request
        self.expected_peer_id = 0     # the peer's next request
        self.last_response: list[bytes] = []
        self.last_response_id = -1
        self.pending: Pending | None = None
        self.queue: list[object] = []
        self.reassembly = None
        self.peer_ids: tuple[int, bytes] | None = None
        self.dpd_sent_at = 0.0

    @property
    def local_spi(self) -> bytes:
        return self.spi_i if self.initiator else self.spi_r

    @property
    def name(self) -> str:
        return f"{self.spi_i.hex()}/{self.spi_r.hex()}"

    @property
    def nat_detected(self) -> bool:
        return self.nat_local or self.nat_remote

    def child_by_spi_out(self, spi_out: int) -> ChildSa | None:
        for c in self.children.values():
            if c.spi_out == spi_out:
                return c
        return None

    def derive(self, sel: Selection, seed: bytes) -> None:
        """Install the IKE SA keys from SKEYSEED (RFC 7296 section 2.14)."""
        cipher = sk_cipher(sel.encr, sel.key_bits, sel.integ)
        prf = PrfAlg(sel.prf)
        keys = derive_ike_keys(prf, seed, self.ni, self.nr, self.spi_i, self.spi_r,
                               cipher.integ_key_size, cipher.encr_key_size)
        self.sel, self.prf, self.keys = sel, prf, keys
        if self.initiator:
            self.sk = SkKeys(cipher, keys.sk_ei, keys.sk_ai, keys.sk_er, keys.sk_ar)
        else:
            self.sk = SkKeys(cipher, keys.sk_er, keys.sk_ar, keys.sk_ei, keys.sk_ai)

    def __repr__(self) -> str:
        t = self.tunnel.name if self.tunnel else "-"
        return f"IkeSa({self.name} {self.state.value} tunnel={t} peer={self.remote})"


def psk_auth(prf: PrfAlg, psk: bytes, message: bytes, nonce: bytes, sk_p: bytes,
             id_body: bytes) -> bytes:
    """AUTH = prf(prf(Shared Secret, "Key Pad for IKEv2"), <SignedOctets>) (RFC 7296 2.15).

    SignedOctets = RealMessage | NonceData of the peer | prf(SK_p, RestOfIDPayload).
    """
    return prf(prf(psk, b"Key Pad for IKEv2"), message + nonce + prf(sk_p, id_body))


def nat_hash(spi_i: bytes, spi_r: bytes, ep: Endpoint) -> bytes:
    """SHA-1(SPIi | SPIr | IP | Port) (RFC 7296 section 2.23)."""
    return hashlib.sha1(
        spi_i + spi_r + ipaddress.ip_address(ep[0]).packed + struct.pack("!H", ep[1])
    ).digest()


def random_spi(size: int) -> bytes:
    while True:
        spi = os.urandom(size)
        if size == 4 and int.from_bytes(spi, "big") < 256:
            continue  # SPI values 1-255 are reserved (RFC 4303 section 2.1)
        if any(spi):
            return spi

"""IKEv2 exchanges as tasks (the shape of strongSwan's ``task_t``).

Each task has four steps; the initiator calls ``build_i`` then ``process_i`` on the response,
the responder calls ``process_r`` on the request then ``build_r``. The same classes serve both
roles, so the edge can start exchanges (Child SA rekey, liveness, DELETE) and the in-memory
tests can run two cores against each other. Tasks raise ``IkeProtocolError`` for errors that
are answered with a notify; the engine turns them into responses.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .constants import (
    AuthMethod,
    ExchangeType,
    Notify,
    PayloadType,
    ProtocolId,
    TransformType,
    is_error_notify,
)
from .crypto import (
    CryptoError,
    DhPrivate,
    PrfAlg,
    child_keymat,
    dh_generate,
    skeyseed,
)
from .payloads import (
    AuthPayload,
    DeletePayload,
    IdPayload,
    IkeProtocolError,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    Proposal,
    SaPayload,
    TrafficSelector,
    Transform,
    TsPayload,
    syntax,
)
from .proposal import DH_PREFERENCE, IKE_POLICY, Selection, esp_policy, ike_proposal, select
from .state import ChildSa, IkeSa, IkeState, nat_hash, psk_auth, random_spi, split_child_keymat
from .tunnels import IkeTunnel

if TYPE_CHECKING:
    from .engine import IkeEngine

log = logging.getLogger(__name__)

NONCE_SIZE = 32
ZERO_SPI = bytes(8)


class Retry(Exception):
    """The initiator must send this task's request again (COOKIE or INVALID_KE_PAYLOAD)."""


@dataclass
class InitiatorProfile:
    """What the initiator role proposes (tests and benchmark load; the edge uses tunnel config)."""

    tunnel: IkeTunnel
    id_type: int
    id_data: bytes
    ike_proposals: list[Proposal]
    esp_proposals: list[Proposal]
    ts_i: list[TrafficSelector] = field(default_factory=lambda: [
        TrafficSelector.from_network("0.0.0.0/0")])
    ts_r: list[TrafficSelector] = field(default_factory=lambda: [
        TrafficSelector.from_network("0.0.0.0/0")])
    initial_contact: bool = True
    transport_mode: bool = False
    ke_group: int | None = None  # first KE guess; default: group of the first proposal


def _need(payloads: list[Payload], ptype: int) -> Payload:
    for p in payloads:
        if p.type == ptype:
            return p
    raise syntax(f"missing payload {ptype}")


def _opt(payloads: list[Payload], ptype: int) -> Payload | None:
    for p in payloads:
        if p.type == ptype:
            return p
    return None


def _notify(payloads: list[Payload], ntype: int) -> NotifyPayload | None:
    for p in payloads:
        if isinstance(p, NotifyPayload) and p.notify == ntype:
            return p
    return None


def _first_error(payloads: list[Payload]) -> NotifyPayload | None:
    for p in payloads:
        if isinstance(p, NotifyPayload) and is_error_notify(p.notify):
            return p
    return None


class Task:
    exchange: ExchangeType
    destroy_after_response = False  # responder: tear the IKE SA down once the answer is out

    def build_i(self, ctx: IkeEngine, sa: IkeSa) -> list[Payload]:
        raise NotImplementedError

    def process_i(self, ctx: IkeEngine, sa: IkeSa, payloads: list[Payload]) -> None:
        raise NotImplementedError

    def process_r(self, ctx: IkeEngine, sa: IkeSa, payloads: list[Payload]) -> None:
        raise NotImplementedError

    def build_r(self, ctx: IkeEngine, sa: IkeSa) -> list[Payload]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__


# --------------------------------------------------------------------------- traffic selectors


def _ranges(net: str) -> tuple[int, int, int]:
    n = ipaddress.ip_network(net, strict=False)
    return n.version, int(n.network_address), int(n.broadcast_address)


def narrow(offered: list[TrafficSelector], allowed: tuple[str, ...]) -> list[TrafficSelector]:
    """Intersect the offered selectors with the configured networks (RFC 7296 section 2.9)."""
    out: list[TrafficSelector] = []
    for ts in offered:
        ver = 4 if len(ts.start_addr) == 4 else 6
        lo, hi = int.from_bytes(ts.start_addr, "big"), int.from_bytes(ts.end_addr, "big")
        if lo > hi or ts.start_port > ts.end_port:
            continue
        for net in allowed:
            v, nlo, nhi = _ranges(net)
            if v != ver or max(lo, nlo) > min(hi, nhi):
                continue
            size = len(ts.start_addr)
            narrowed = TrafficSelector(
                ts.ts_type, ts.ip_proto, ts.start_port, ts.end_port,
                max(lo, nlo).to_bytes(size, "big"), min(hi, nhi).to_bytes(size, "big"),
            )
            if narrowed not in out:
                out.append(narrowed)
    return out


def _child_lifetimes(now: float, tunnel: IkeTunnel) -> tuple[float, float]:
    """Rekey at 85-90% of the hard lifetime, with jitter so that peers do not collide."""
    hard = tunnel.child_lifetime
    soft = hard * (0.85 + 0.05 * random.random())
    return now + soft, now + hard


# --------------------------------------------------------------------------- IKE_SA_INIT


class IkeInitTask(Task):
    exchange = ExchangeType.IKE_SA_INIT

    def __init__(self, profile: InitiatorProfile | None = None):
        self.profile = profile
        self.dh: DhPrivate | None = None
        self.cookie: bytes | None = None
        self.sel: Selection | None = None
        self.peer_ke: KePayload | None = None
        self.peer_frag = False
        self.peer_natd = False
        if profile is not None:
            first_dh = next(t.id for t in profile.ike_proposals[0].transforms if t.type == TransformType.DH)
            self.group = profile.ke_group or first_dh

    # -- initiator
    def build_i(self, ctx, sa):
        if self.dh is None or self.dh.group != self.group:
            self.dh = dh_generate(self.group)
        if not sa.ni:
            sa.ni = os.urandom(NONCE_SIZE)
        out: list[Payload] = []
        if self.cookie is not None:
            out.append(NotifyPayload(Notify.COOKIE, self.cookie))  # first (RFC 7296 2.6)
        out += [
            SaPayload(self.profile.ike_proposals),
            KePayload(self.group, self.dh.public),
            NoncePayload(sa.ni),
            NotifyPayload(Notify.NAT_DETECTION_SOURCE_IP, nat_hash(sa.spi_i, ZERO_SPI, sa.local)),
            NotifyPayload(Notify.NAT_DETECTION_DESTINATION_IP,
                          nat_hash(sa.spi_i, ZERO_SPI, sa.remote)),
            NotifyPayload(Notify.IKEV2_FRAGMENTATION_SUPPORTED),
        ]
        return out

    def process_i(self, ctx, sa, payloads):
        cookie = _notify(payloads, Notify.COOKIE)
        if cookie is not None:
            self.cookie = cookie.data
            raise Retry()
        invalid_ke = _notify(payloads, Notify.INVALID_KE_PAYLOAD)
        if invalid_ke is not None and len(invalid_ke.data) == 2:
            group = int.from_bytes(invalid_ke.data, "big")
            offered = {t.id for p in self.profile.ike_proposals for t in p.transforms if t.type == TransformType.DH}
            if group in offered and group != self.group:
                self.group = group
                raise Retry()
            raise IkeProtocolError(Notify.INVALID_KE_PAYLOAD, f"peer wants unoffered group {group}")
        err = _first_error(payloads)
        if err is not None:
            raise IkeProtocolError(err.notify, "IKE_SA_INIT refused by peer")
        sa_p = _need(payloads, PayloadType.SA)
        ke = _need(payloads, PayloadType.KE)
        nonce = _need(payloads, PayloadType.NONCE)
        if len(sa_p.proposals) != 1:
            raise syntax("responder returned more than one proposal")
        sel = select(sa_p.proposals, IKE_POLICY, ke_group=ke.group)
        if sel.dh != self.group:
            raise syntax("responder chose a different DH group")
        sa.nr = nonce.data
        try:
            g_ir = self.dh.shared(ke.data)
        except CryptoError as exc:
            raise syntax(str(exc)) from exc
        sa.derive(sel, skeyseed(PrfAlg(sel.prf), sa.ni, sa.nr, g_ir))
        _nat_detect(sa, payloads, sa.spi_r)
        sa.frag_supported = _notify(payloads, Notify.IKEV2_FRAGMENTATION_SUPPORTED) is not None
        if sa.nat_detected and sa.local[1] == 500:
            # RFC 7296 section 2.23: float to port 4500 once a NAT is detected.
            sa.local = (sa.local[0], 4500)
            sa.remote = (sa.remote[0], 4500)
        sa.state = IkeState.AUTH_SENT
        sa.queue.insert(0, IkeAuthTask(self.profile))

    # -- responder (the engine creates the IKE SA first; no state is kept if this raises)
    def process_r(self, ctx, sa, payloads):
        sa_p = _need(payloads, PayloadType.SA)
        ke = _need(payloads, PayloadType.KE)
        nonce = _need(payloads, PayloadType.NONCE)
        self.sel = select(sa_p.proposals, IKE_POLICY, ke_group=ke.group)
        if self.sel.spi:
            raise syntax("non-empty SPI in IKE_SA_INIT proposal")
        self.dh = dh_generate(self.sel.dh)
        try:
            self.g_ir = self.dh.shared(ke.data)
        except CryptoError as exc:
            raise syntax(str(exc)) from exc
        sa.ni = nonce.data
        sa.nr = os.urandom(NONCE_SIZE)
        self.peer_natd = _nat_detect(sa, payloads, ZERO_SPI)
        self.peer_frag = _notify(payloads, Notify.IKEV2_FRAGMENTATION_SUPPORTED) is not None
        sa.frag_supported = self.peer_frag and ctx.config.fragmentation

    def build_r(self, ctx, sa):
        out: list[Payload] = [
            SaPayload([self.sel.to_proposal(b"")]),
            KePayload(self.sel.dh, self.dh.public),
            NoncePayload(sa.nr),
        ]
        if self.peer_natd:
            out += [
                NotifyPayload(Notify.NAT_DETECTION_SOURCE_IP, nat_hash(sa.spi_i, sa.spi_r, sa.local)),
                NotifyPayload(Notify.NAT_DETECTION_DESTINATION_IP,
                              nat_hash(sa.spi_i, sa.spi_r, sa.remote)),
            ]
        if sa.frag_supported:
            out.append(NotifyPayload(Notify.IKEV2_FRAGMENTATION_SUPPORTED))
        sa.derive(self.sel, skeyseed(PrfAlg(self.sel.prf), sa.ni, sa.nr, self.g_ir))
        return out


def _nat_detect(sa: IkeSa, payloads: list[Payload], spi_r: bytes) -> bool:
    """RFC 7296 section 2.23. Returns True when the peer sent NAT-D notifies."""
    src = [p.data for p in payloads
           if isinstance(p, NotifyPayload) and p.notify == Notify.NAT_DETECTION_SOURCE_IP]
    dst = [p.data for p in payloads
           if isinstance(p, NotifyPayload) and p.notify == Notify.NAT_DETECTION_DESTINATION_IP]
    if not src and not dst:
        return False
    if src:
        sa.nat_remote = nat_hash(sa.spi_i, spi_r, sa.remote) not in src
    if dst:
        sa.nat_local = nat_hash(sa.spi_i, spi_r, sa.local) not in dst
    return True


# --------------------------------------------------------------------------- Child SA helpers


@dataclass
class ChildOffer:
    """What the responder agreed to for one Child SA, before keys are derived."""

    sel: Selection
    spi_in: int
    ts_local: list[TrafficSelector]
    ts_remote: list[TrafficSelector]


def _negotiate_child_r(ctx, sa: IkeSa, payloads: list[Payload], *, ke_group: int | None,
                       in_auth: bool) -> ChildOffer:
    if _notify(payloads, Notify.USE_TRANSPORT_MODE) is not None:
        raise IkeProtocolError(Notify.NO_PROPOSAL_CHOSEN, "transport mode refused (tunnel only)")
    sa_p = _need(payloads, PayloadType.SA)
    tsi = _need(payloads, PayloadType.TSI)
    tsr = _need(payloads, PayloadType.TSR)
    tunnel = sa.tunnel
    sel = select(sa_p.proposals, esp_policy(tunnel.allow_null_cipher), ke_group=ke_group,
                 ignore_dh=in_auth)
    ts_remote = narrow(tsi.selectors, tunnel.remote_ts)
    ts_local = narrow(tsr.selectors, tunnel.local_ts)
    if not ts_remote or not ts_local:
        raise IkeProtocolError(Notify.TS_UNACCEPTABLE, "traffic selectors outside the tunnel")
    return ChildOffer(sel, ctx.allocate_child_spi(), ts_local, ts_remote)


def _make_child(ctx, sa: IkeSa, offer: ChildOffer, spi_out: int, ni: bytes, nr: bytes,
                g_ir: bytes, initiator: bool) -> ChildSa:
    from .state import child_key_sizes

    e, a = child_key_sizes(offer.sel)
    keymat = child_keymat(sa.prf, sa.keys.sk_d, ni, nr, 2 * (e + a), g_ir)
    rekey_at, expire_at = _child_lifetimes(ctx.now, sa.tunnel)
    return ChildSa(offer.spi_in, spi_out, offer.sel, offer.ts_local, offer.ts_remote, ctx.now,
                   rekey_at, expire_at, split_child_keymat(offer.sel, keymat), initiator)


def _spi_int(spi: bytes) -> int:
    if len(spi) != 4:
        raise syntax("ESP SPI must be 4 bytes")
    return int.from_bytes(spi, "big")


# --------------------------------------------------------------------------- IKE_AUTH


class IkeAuthTask(Task):
    exchange = ExchangeType.IKE_AUTH

    def __init__(self, profile: InitiatorProfile | None = None):
        self.profile = profile
        self.offer: ChildOffer | None = None
        self.child_error: IkeProtocolError | None = None
        self.child: ChildSa | None = None
        self.spi_in = 0

    def build_i(self, ctx, sa):
        p = self.profile
        sa.tunnel = p.tunnel
        idi = IdPayload(PayloadType.IDI, p.id_type, p.id_data)
        auth = psk_auth(sa.prf, p.tunnel.psk_bytes, sa.init_request, sa.nr, sa.keys.sk_pi, idi.body())
        self.spi_in = ctx.allocate_child_spi()
        spi = self.spi_in.to_bytes(4, "big")
        props = [Proposal(i + 1, pr.protocol, spi, pr.transforms)
                 for i, pr in enumerate(p.esp_proposals)]
        out: list[Payload] = [idi]
        if p.initial_contact:
            out.append(NotifyPayload(Notify.INITIAL_CONTACT))
        out.append(AuthPayload(AuthMethod.SHARED_KEY_MIC, auth))
        if p.transport_mode:
            out.append(NotifyPayload(Notify.USE_TRANSPORT_MODE))
        out += [SaPayload(props), TsPayload(PayloadType.TSI, p.ts_i),
                TsPayload(PayloadType.TSR, p.ts_r)]
        return out

    def process_i(self, ctx, sa, payloads):
        if _notify(payloads, Notify.AUTHENTICATION_FAILED) is not None:
            raise IkeProtocolError(Notify.AUTHENTICATION_FAILED, "peer refused our authentication")
        idr = _need(payloads, PayloadType.IDR)
        auth = _need(payloads, PayloadType.AUTH)
        expected = psk_auth(sa.prf, sa.tunnel.psk_bytes, sa.init_response, sa.ni, sa.keys.sk_pr,
                            idr.body())
        if auth.method != AuthMethod.SHARED_KEY_MIC or not hmac.compare_digest(expected, auth.data):
            raise IkeProtocolError(Notify.AUTHENTICATION_FAILED, "responder AUTH mismatch")
        ctx.established(sa)
        err = _first_error(payloads)
        if err is not None:
            log.info("IKE SA %s: peer refused the Child SA (%s)", sa.name, err.notify)
            ctx.stats["child_refused_by_peer"] += 1
            return
        sa_p = _need(payloads, PayloadType.SA)
        tsi = _need(payloads, PayloadType.TSI)
        tsr = _need(payloads, PayloadType.TSR)
        sel = select(sa_p.proposals, esp_policy(True), ignore_dh=True)
        offer = ChildOffer(sel, self.spi_in, tsi.selectors, tsr.selectors)
        child = _make_child(ctx, sa, offer, _spi_int(sel.spi), sa.ni, sa.nr, b"", True)
        ctx.add_child(sa, child)

    def process_r(self, ctx, sa, payloads):
        idi = _need(payloads, PayloadType.IDI)
        auth = _need(payloads, PayloadType.AUTH)
        tunnel = ctx.directory.lookup(idi.id_type, idi.data, sa.local[0])
        if tunnel is None:
            self.destroy_after_response = True
            ctx.stats["auth_unknown_id"] += 1
            raise IkeProtocolError(Notify.AUTHENTICATION_FAILED, "unknown identity")
        expected = psk_auth(sa.prf, tunnel.psk_bytes, sa.init_request, sa.nr, sa.keys.sk_pi, idi.body())
        if auth.method != AuthMethod.SHARED_KEY_MIC or not hmac.compare_digest(expected, auth.data):
            self.destroy_after_response = True
            ctx.stats["auth_failed"] += 1
            raise IkeProtocolError(Notify.AUTHENTICATION_FAILED, "AUTH mismatch")
        sa.tunnel = tunnel
        sa.peer_ids = (idi.id_type, idi.data)
        if _notify(payloads, Notify.INITIAL_CONTACT) is not None:
            ctx.initial_contact(sa)
        ctx.established(sa)
        try:
            self.offer = _negotiate_child_r(ctx, sa, payloads, ke_group=None, in_auth=True)
            spi_out = _spi_int(self.offer.sel.spi)
            self.child = _make_child(ctx, sa, self.offer, spi_out, sa.ni, sa.nr, b"", False)
        except IkeProtocolError as exc:
            # RFC 7296 section 2.21.2: the IKE SA stands, the Child SA is refused.
            self.child_error = exc
            ctx.stats["child_refused"] += 1
            log.info("IKE SA %s tunnel %s: Child SA refused: %s", sa.name, tunnel.name, exc.reason)

    def build_r(self, ctx, sa):
        id_type, id_data = ctx.directory.edge_id(sa.tunnel)
        idr = IdPayload(PayloadType.IDR, id_type, id_data)
        auth = psk_auth(sa.prf, sa.tunnel.psk_bytes, sa.init_response, sa.ni, sa.keys.sk_pr, idr.body())
        out: list[Payload] = [idr, AuthPayload(AuthMethod.SHARED_KEY_MIC, auth)]
        if self.child is not None:
            out += [SaPayload([self.offer.sel.to_proposal(self.offer.spi_in.to_bytes(4, "big"))]),
                    TsPayload(PayloadType.TSI, self.offer.ts_remote),
                    TsPayload(PayloadType.TSR, self.offer.ts_local)]
            ctx.add_child(sa, self.child)
        else:
            out.append(NotifyPayload(self.child_error.notify, self.child_error.data))
        return out


# --------------------------------------------------------------------------- CREATE_CHILD_SA


class ChildCreateTask(Task):
    """New Child SA, or the rekey of ``rekey`` (with PFS when a DH group is negotiated)."""

    exchange = ExchangeType.CREATE_CHILD_SA

    def __init__(self, rekey: ChildSa | None = None, pfs_group: int = 0,
                 proposals: list[Proposal] | None = None):
        self.rekey = rekey
        self.pfs_group = pfs_group
        self.proposals = proposals
        self.dh: DhPrivate | None = None
        self.ni = b""
        self.nr = b""
        self.spi_in = 0
        self.offer: ChildOffer | None = None
        self.child: ChildSa | None = None
        self.retried = False

    def _our_proposals(self, sa: IkeSa) -> list[Proposal]:
        if self.proposals is not None:
            return self.proposals
        from .proposal import esp_proposal

        s = self.rekey.sel
        props = []
        if self.pfs_group:
            # The KE group first, then every other group we accept, so that a peer configured
            # for another one answers INVALID_KE_PAYLOAD instead of NO_PROPOSAL_CHOSEN.
            pfs = esp_proposal(s.encr, s.key_bits, 0 if s.aead else s.integ, b"",
                               dh=self.pfs_group, num=1)
            extra = [Transform.make(TransformType.DH, g) for g in DH_PREFERENCE
                     if g != self.pfs_group]
            pfs.transforms[-1:-1] = extra  # before the ESN transform
            props.append(pfs)
        props.append(esp_proposal(s.encr, s.key_bits, 0 if s.aead else s.integ, b"",
                                  num=len(props) + 1))
        return props

    def build_i(self, ctx, sa):
        self.spi_in = self.spi_in or ctx.allocate_child_spi()
        spi = self.spi_in.to_bytes(4, "big")
        props = [Proposal(p.num, p.protocol, spi, p.transforms) for p in self._our_proposals(sa)]
        self.ni = os.urandom(NONCE_SIZE)
        out: list[Payload] = []
        if self.rekey is not None:
            out.append(NotifyPayload(Notify.REKEY_SA, b"", ProtocolId.ESP,
                                     self.rekey.spi_in.to_bytes(4, "big")))
        out += [SaPayload(props), NoncePayload(self.ni)]
        if self.pfs_group:
            if self.dh is None or self.dh.group != self.pfs_group:
                self.dh = dh_generate(self.pfs_group)
            out.append(KePayload(self.pfs_group, self.dh.public))
        ts_i = self.rekey.ts_local if self.rekey else [TrafficSelector.from_network("0.0.0.0/0")]
        ts_r = self.rekey.ts_remote if self.rekey else [TrafficSelector.from_network("0.0.0.0/0")]
        out += [TsPayload(PayloadType.TSI, ts_i), TsPayload(PayloadType.TSR, ts_r)]
        return out

    def process_i(self, ctx, sa, payloads):
        invalid_ke = _notify(payloads, Notify.INVALID_KE_PAYLOAD)
        if invalid_ke is not None and len(invalid_ke.data) == 2 and not self.retried:
            self.pfs_group = int.from_bytes(invalid_ke.data, "big")
            self.retried = True
            raise Retry()
        err = _first_error(payloads)
        if err is not None:
            ctx.stats["child_create_refused_by_peer"] += 1
            log.info("IKE SA %s: CREATE_CHILD_SA refused by peer (%s)", sa.name, err.notify)
            if self.rekey is not None:
                self.rekey.rekey_pending = False
            return
        sa_p = _need(payloads, PayloadType.SA)
        nonce = _need(payloads, PayloadType.NONCE)
        ke = _opt(payloads, PayloadType.KE)
        sel = select(sa_p.proposals, esp_policy(True),
                     ke_group=ke.group if ke is not None else None)
        g_ir = b""
        if sel.dh:
            if ke is None or self.dh is None or ke.group != self.dh.group:
                raise syntax("KE payload does not match the chosen group")
            try:
                g_ir = self.dh.shared(ke.data)
            except CryptoError as exc:
                raise syntax(str(exc)) from exc
        tsi = _need(payloads, PayloadType.TSI)
        tsr = _need(payloads, PayloadType.TSR)
        offer = ChildOffer(sel, self.spi_in, tsi.selectors, tsr.selectors)
        child = _make_child(ctx, sa, offer, _spi_int(sel.spi), self.ni, nonce.data, g_ir, True)
        if self.rekey is None:
            ctx.add_child(sa, child)
            return
        old = self.rekey
        if old.rekeyed and old.collision_nonce:
            # Both ends rekeyed the same SA at once (RFC 7296 section 2.8.1): the SA created by
            # the exchange holding the lowest of the four nonces is deleted by its creator.
            if min(self.ni, nonce.data) < old.collision_nonce:
                ctx.stats["rekey_collision_lost"] += 1
                sa.queue.append(InformationalTask(
                    [DeletePayload(ProtocolId.ESP, [child.spi_in.to_bytes(4, "big")])]))
                return
            ctx.stats["rekey_collision_won"] += 1
        ctx.replace_child(sa, old, child)
        sa.queue.append(InformationalTask(
            [DeletePayload(ProtocolId.ESP, [old.spi_in.to_bytes(4, "big")])]))

    def process_r(self, ctx, sa, payloads):
        rekey = _notify(payloads, Notify.REKEY_SA)
        if rekey is not None:
            old = sa.child_by_spi_out(int.from_bytes(rekey.spi, "big")) if len(rekey.spi) == 4 else None
            if old is None:
                raise IkeProtocolError(Notify.CHILD_SA_NOT_FOUND, "rekey of an unknown Child SA")
            self.rekey = old
        nonce = _need(payloads, PayloadType.NONCE)
        ke = _opt(payloads, PayloadType.KE)
        self.offer = _negotiate_child_r(ctx, sa, payloads,
                                        ke_group=ke.group if ke is not None else None,
                                        in_auth=False)
        g_ir = b""
        if self.offer.sel.dh:
            self.dh = dh_generate(self.offer.sel.dh)
            try:
                g_ir = self.dh.shared(ke.data)
            except CryptoError as exc:
                raise syntax(str(exc)) from exc
        self.ni, self.nr = nonce.data, os.urandom(NONCE_SIZE)
        self.child = _make_child(ctx, sa, self.offer, _spi_int(self.offer.sel.spi), self.ni,
                                 self.nr, g_ir, False)
        if self.rekey is not None:
            self.rekey.collision_nonce = min(self.ni, self.nr)  # see process_i (RFC 7296 2.8.1)

    def build_r(self, ctx, sa):
        out: list[Payload] = [
            SaPayload([self.offer.sel.to_proposal(self.offer.spi_in.to_bytes(4, "big"))]),
            NoncePayload(self.nr),
        ]
        if self.dh is not None:
            out.append(KePayload(self.dh.group, self.dh.public))
        out += [TsPayload(PayloadType.TSI, self.offer.ts_remote),
                TsPayload(PayloadType.TSR, self.offer.ts_local)]
        if self.rekey is not None:
            ctx.replace_child(sa, self.rekey, self.child)
        else:
            ctx.add_child(sa, self.child)
        return out


class IkeRekeyTask(Task):
    """Rekey the IKE SA with CREATE_CHILD_SA (RFC 7296 sections 1.3.2 and 2.18)."""

    exchange = ExchangeType.CREATE_CHILD_SA

    def __init__(self):
        self.dh: DhPrivate | None = None
        self.ni = b""
        self.nr = b""
        self.new_spi = b""
        self.sel: Selection | None = None
        self.new_sa: IkeSa | None = None

    def build_i(self, ctx, sa):
        s = sa.sel
        self.new_spi = random_spi(8)
        if self.dh is None:
            self.dh = dh_generate(s.dh)
        self.ni = os.urandom(NONCE_SIZE)
        prop = ike_proposal(s.encr, s.key_bits, 0 if s.aead else s.integ, s.prf, self.dh.group,
                            self.new_spi)
        return [SaPayload([prop]), NoncePayload(self.ni), KePayload(self.dh.group, self.dh.public)]

    def process_i(self, ctx, sa, payloads):
        invalid_ke = _notify(payloads, Notify.INVALID_KE_PAYLOAD)
        if invalid_ke is not None and len(invalid_ke.data) == 2 and self.dh.group != int.from_bytes(invalid_ke.data, "big"):
            self.dh = dh_generate(int.from_bytes(invalid_ke.data, "big"))
            raise Retry()
        err = _first_error(payloads)
        if err is not None:
            log.info("IKE SA %s: IKE rekey refused by peer (%s)", sa.name, err.notify)
            return
        sa_p = _need(payloads, PayloadType.SA)
        ke = _need(payloads, PayloadType.KE)
        nonce = _need(payloads, PayloadType.NONCE)
        sel = select(sa_p.proposals, IKE_POLICY, ke_group=ke.group)
        if len(sel.spi) != 8:
            raise syntax("IKE rekey without an 8-byte SPI")
        try:
            g_ir = self.dh.shared(ke.data)
        except CryptoError as exc:
            raise syntax(str(exc)) from exc
        ctx.rekey_ike(sa, sel, initiator=True, spi_i=self.new_spi, spi_r=sel.spi, ni=self.ni,
                      nr=nonce.data, g_ir=g_ir)
        sa.queue.append(InformationalTask([DeletePayload(ProtocolId.IKE, [])]))

    def process_r(self, ctx, sa, payloads):
        sa_p = _need(payloads, PayloadType.SA)
        ke = _need(payloads, PayloadType.KE)
        nonce = _need(payloads, PayloadType.NONCE)
        self.sel = select(sa_p.proposals, IKE_POLICY, ke_group=ke.group)
        if len(self.sel.spi) != 8:
            raise syntax("IKE rekey without an 8-byte SPI")
        self.dh = dh_generate(self.sel.dh)
        try:
            self.g_ir = self.dh.shared(ke.data)
        except CryptoError as exc:
            raise syntax(str(exc)) from exc
        self.ni, self.nr = nonce.data, os.urandom(NONCE_SIZE)
        self.new_spi = random_spi(8)

    def build_r(self, ctx, sa):
        ctx.rekey_ike(sa, self.sel, initiator=False, spi_i=self.sel.spi, spi_r=self.new_spi,
                      ni=self.ni, nr=self.nr, g_ir=self.g_ir)
        return [SaPayload([self.sel.to_proposal(self.new_spi)]), NoncePayload(self.nr),
                KePayload(self.dh.group, self.dh.public)]


# --------------------------------------------------------------------------- INFORMATIONAL


class InformationalTask(Task):
    """DELETE (IKE or ESP) or, with no payloads, a liveness check (RFC 7296 sections 1.4, 2.4)."""

    exchange = ExchangeType.INFORMATIONAL

    def __init__(self, payloads: list[Payload] | None = None):
        self.payloads = payloads or []
        self.response: list[Payload] = []

    @property
    def deletes_ike(self) -> bool:
        return any(isinstance(p, DeletePayload) and p.protocol == ProtocolId.IKE
                   for p in self.payloads)

    def build_i(self, ctx, sa):
        if self.deletes_ike:
            sa.state = IkeState.DELETING
        return list(self.payloads)

    def process_i(self, ctx, sa, payloads):
        if self.deletes_ike:
            ctx.destroy(sa, "deleted", uninstall=True)
            return
        for p in self.payloads:
            if isinstance(p, DeletePayload) and p.protocol == ProtocolId.ESP:
                for spi in p.spis:
                    ctx.remove_child(sa, int.from_bytes(spi, "big"))

    def process_r(self, ctx, sa, payloads):
        ours: list[bytes] = []
        for p in payloads:
            if not isinstance(p, DeletePayload):
                continue
            if p.protocol == ProtocolId.IKE:
                # Answer empty, then tear the IKE SA and its Child SAs down (RFC 7296 1.4.1).
                self.destroy_after_response = True
                self.response = []
                return
            if p.protocol != ProtocolId.ESP:
                continue
            for spi in p.spis:
                if len(spi) != 4:
                    continue
                child = sa.child_by_spi_out(int.from_bytes(spi, "big"))
                if child is not None:
                    ours.append(child.spi_in.to_bytes(4, "big"))
                    ctx.remove_child(sa, child.spi_in)
        self.response = [DeletePayload(ProtocolId.ESP, ours)] if ours else []

    def build_r(self, ctx, sa):
        return self.response


def responder_task(exchange: int, payloads: list[Payload]) -> Task:
    if exchange == ExchangeType.IKE_AUTH:
        return IkeAuthTask()
    if exchange == ExchangeType.INFORMATIONAL:
        return InformationalTask()
    if exchange == ExchangeType.CREATE_CHILD_SA:
        sa_p = _opt(payloads, PayloadType.SA)
        if isinstance(sa_p, SaPayload) and sa_p.proposals and sa_p.proposals[0].protocol == ProtocolId.IKE:
            return IkeRekeyTask()
        return ChildCreateTask()
    raise syntax(f"unsupported exchange {exchange}")

"""Proposal selection: one function, driven by a policy table (issue 6 "Algorithms").

The initiator's proposals are walked in its order of preference; within a proposal the first
acceptable transform of each type wins. A proposal is refused as a whole when it carries a
transform type we do not know (RFC 7296 section 3.3.6), when a required type has no acceptable
transform, or when an AEAD cipher is combined with a real integrity algorithm (RFC 5282 section 8).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .constants import DhGroup, Encr, Esn, Integ, Notify, Prf, ProtocolId, TransformType
from .payloads import IkeProtocolError, Proposal, Transform

AEAD = {Encr.AES_GCM_16}
_KNOWN_TYPES = frozenset(int(t) for t in TransformType)
DH_PREFERENCE = (DhGroup.ECP_384, DhGroup.MODP_2048, DhGroup.MODP_1536)


@dataclass(frozen=True)
class Policy:
    protocol: int
    # encryption id -> allowed key lengths in bits (0 = no key length attribute, e.g. NULL)
    encr: dict[int, tuple[int, ...]]
    # encryption id (non-AEAD) -> allowed integrity ids
    integ_for: dict[int, tuple[int, ...]]
    prf: tuple[int, ...] = ()
    dh: tuple[int, ...] = ()
    dh_optional: bool = False  # ESP: PFS group or none

    @property
    def spi_size(self) -> int:
        return 8 if self.protocol == ProtocolId.IKE else 4


IKE_POLICY = Policy(
    protocol=ProtocolId.IKE,
    encr={Encr.AES_GCM_16: (128, 256), Encr.AES_CBC: (256,)},
    integ_for={Encr.AES_CBC: (Integ.HMAC_SHA2_256_128,)},
    prf=(Prf.HMAC_SHA2_256, Prf.HMAC_SHA2_384, Prf.HMAC_SHA2_512),
    dh=DH_PREFERENCE,
)

_ESP_INTEG = (Integ.HMAC_SHA2_256_128, Integ.HMAC_SHA1_96)


def esp_policy(allow_null_cipher: bool) -> Policy:
    encr: dict[int, tuple[int, ...]] = {Encr.AES_GCM_16: (128, 256), Encr.AES_CBC: (128, 256)}
    integ_for: dict[int, tuple[int, ...]] = {Encr.AES_CBC: _ESP_INTEG}
    if allow_null_cipher:
        encr[Encr.NULL] = (0,)
        integ_for[Encr.NULL] = _ESP_INTEG
    return Policy(ProtocolId.ESP, encr, integ_for, dh=DH_PREFERENCE, dh_optional=True)


@dataclass(frozen=True)
class Selection:
    number: int
    protocol: int
    spi: bytes  # the initiator's SPI from its proposal
    encr: int
    key_bits: int
    integ: int
    prf: int = 0
    dh: int = 0
    esn: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def aead(self) -> bool:
        return self.encr in AEAD

    def transforms(self) -> list[Transform]:
        out = [Transform.make(TransformType.ENCR, self.encr, self.key_bits or None)]
        if self.protocol == ProtocolId.IKE:
            out.append(Transform.make(TransformType.PRF, self.prf))
        if not self.aead:
            out.append(Transform.make(TransformType.INTEG, self.integ))
        if self.protocol == ProtocolId.IKE or self.dh:
            out.append(Transform.make(TransformType.DH, self.dh))
        if self.protocol == ProtocolId.ESP:
            out.append(Transform.make(TransformType.ESN, Esn.NO))
        return out

    def to_proposal(self, our_spi: bytes) -> Proposal:
        return Proposal(self.number, self.protocol, our_spi, self.transforms())

    def describe(self) -> str:
        parts = [f"{Encr(self.encr).name}{('-' + str(self.key_bits)) if self.key_bits else ''}"]
        if not self.aead:
            parts.append(Integ(self.integ).name)
        if self.prf:
            parts.append("PRF_" + Prf(self.prf).name)
        if self.dh:
            parts.append(DhGroup(self.dh).name)
        return "/".join(parts)


class InvalidKe(IkeProtocolError):
    """The proposal is acceptable with another DH group (RFC 7296 section 1.2)."""

    def __init__(self, group: int):
        super().__init__(Notify.INVALID_KE_PAYLOAD, f"expected DH group {group}",
                         group.to_bytes(2, "big"))
        self.group = group


def _pick_dh(offered: list[Transform], policy: Policy, ke_group: int | None,
             ignore_dh: bool) -> int | None:
    """Return the DH group, 0 for none, or None when the proposal is unacceptable."""
    groups = [t.id for t in offered]
    if policy.dh_optional:
        if ignore_dh:
            return 0  # ESP in IKE_AUTH: no key exchange, DH transforms ignored (RFC 7296 1.2)
        if ke_group is None:
            return 0 if (not groups or DhGroup.NONE in groups) else None
    acceptable = [g for g in groups if g in policy.dh]
    if not acceptable:
        return None
    if ke_group in acceptable:
        return ke_group
    return acceptable[0]


def select(proposals: list[Proposal], policy: Policy, *, ke_group: int | None = None,
           ignore_dh: bool = False) -> Selection:
    """Choose one proposal or raise NO_PROPOSAL_CHOSEN / INVALID_KE_PAYLOAD.

    ``ke_group`` is the group of the KE payload received (None when there is none). A proposal
    whose chosen group differs from ``ke_group`` is only used to answer INVALID_KE_PAYLOAD when
    no proposal matches the KE payload (RFC 7296 sections 1.2 and 1.3).
    """
    candidates: list[Selection] = []
    for prop in proposals:
        sel = _select_one(prop, policy, ke_group, ignore_dh)
        if sel is None:
            continue
        if ke_group is None or ignore_dh or sel.dh == ke_group:
            return sel
        candidates.append(sel)
    if candidates:
        raise InvalidKe(candidates[0].dh)
    raise IkeProtocolError(Notify.NO_PROPOSAL_CHOSEN, "no acceptable proposal")


def _select_one(prop: Proposal, policy: Policy, ke_group: int | None,
                ignore_dh: bool) -> Selection | None:
    if prop.protocol != policy.protocol:
        return None
    if policy.protocol == ProtocolId.ESP and len(prop.spi) != 4:
        return None
    if policy.protocol == ProtocolId.IKE and len(prop.spi) not in (0, 8):
        return None
    if any(t.type not in _KNOWN_TYPES for t in prop.transforms):
        return None
    integs = prop.of_type(TransformType.INTEG)
    real_integ = [t.id for t in integs if t.id != Integ.NONE]
    encr = None
    for t in prop.of_type(TransformType.ENCR):
        if t.id not in policy.encr:
            continue
        bits = t.key_length or 0
        if bits not in policy.encr[t.id]:
            continue
        if t.id in AEAD:
            if real_integ:
                continue  # RFC 5282 section 8: AEAD with an integrity algorithm is invalid
            encr = (t.id, bits, Integ.NONE)
            break
        allowed = policy.integ_for.get(t.id, ())
        chosen = next((i for i in real_integ if i in allowed), None)
        if chosen is None:
            continue
        encr = (t.id, bits, chosen)
        break
    if encr is None:
        return None
    prf = 0
    if policy.protocol == ProtocolId.IKE:
        prf = next((t.id for t in prop.of_type(TransformType.PRF) if t.id in policy.prf), 0)
        if not prf:
            return None
    dh = _pick_dh(prop.of_type(TransformType.DH), policy, ke_group, ignore_dh)
    if dh is None:
        return None
    esn = False
    if policy.protocol == ProtocolId.ESP:
        esns = [t.id for t in prop.of_type(TransformType.ESN)]
        if esns and Esn.NO not in esns:
            return None  # ESN only: our data path has no extended sequence numbers
    elif prop.of_type(TransformType.ESN):
        return None
    return Selection(prop.num, prop.protocol, prop.spi, encr[0], encr[1], encr[2], prf, dh, esn)


def ike_proposal(encr: int, key_bits: int, integ: int, prf: int, dh: int, spi: bytes = b"",
                 num: int = 1) -> Proposal:
    """Build an initiator's single-choice IKE proposal (used by the initiator role and tests)."""
    tr = [Transform.make(TransformType.ENCR, encr, key_bits)]
    tr.append(Transform.make(TransformType.PRF, prf))
    if integ:
        tr.append(Transform.make(TransformType.INTEG, integ))
    tr.append(Transform.make(TransformType.DH, dh))
    return Proposal(num, ProtocolId.IKE, spi, tr)


def esp_proposal(encr: int, key_bits: int, integ: int, spi: bytes, dh: int = 0,
                 esn: tuple[int, ...] = (Esn.NO,), num: int = 1) -> Proposal:
    tr = [Transform.make(TransformType.ENCR, encr, key_bits or None)]
    if integ:
        tr.append(Transform.make(TransformType.INTEG, integ))
    if dh:
        tr.append(Transform.make(TransformType.DH, dh))
    tr.extend(Transform.make(TransformType.ESN, e) for e in esn)
    return Proposal(num, ProtocolId.ESP, spi, tr)

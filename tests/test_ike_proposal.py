"""Proposal selection: the algorithm policy of issue 6, one function."""
from __future__ import annotations

import pytest

from pipeline.ike.constants import DhGroup, Encr, Esn, Integ, Notify, Prf, ProtocolId, TransformType
from pipeline.ike.payloads import IkeProtocolError, Proposal, Transform
from pipeline.ike.proposal import (
    IKE_POLICY,
    InvalidKe,
    esp_policy,
    esp_proposal,
    ike_proposal,
    select,
)

T = Transform.make


def test_first_acceptable_proposal_and_transform_in_initiator_order():
    props = [
        Proposal(1, ProtocolId.IKE, b"", [T(1, Encr.AES_CTR, 256), T(2, Prf.HMAC_SHA2_256),
                                           T(3, Integ.HMAC_SHA2_256_128), T(4, DhGroup.ECP_384)]),
        Proposal(2, ProtocolId.IKE, b"", [T(1, Encr.AES_GCM_16, 128), T(1, Encr.AES_GCM_16, 256),
                                           T(2, Prf.HMAC_SHA1), T(2, Prf.HMAC_SHA2_512),
                                           T(4, DhGroup.MODP_1024), T(4, DhGroup.MODP_2048),
                                           T(4, DhGroup.ECP_384)]),
    ]
    sel = select(props, IKE_POLICY, ke_group=DhGroup.ECP_384)
    assert (sel.number, sel.encr, sel.key_bits, sel.prf, sel.dh, sel.integ) == (
        2, Encr.AES_GCM_16, 128, Prf.HMAC_SHA2_512, DhGroup.ECP_384, Integ.NONE)
    # the response carries exactly one transform of each type, GCM without integrity
    assert [(t.type, t.id, t.key_length) for t in sel.to_proposal(b"").transforms] == [
        (1, 20, 128), (2, 7, None), (4, 20, None)]


def test_gcm_with_integrity_none_accepted_with_real_integrity_refused():
    ok = ike_proposal(Encr.AES_GCM_16, 256, Integ.NONE, Prf.HMAC_SHA2_256, DhGroup.ECP_384)
    ok.transforms.insert(2, T(TransformType.INTEG, Integ.NONE))
    assert select([ok], IKE_POLICY, ke_group=20).encr == Encr.AES_GCM_16
    bad = ike_proposal(Encr.AES_GCM_16, 256, Integ.HMAC_SHA2_256_128, Prf.HMAC_SHA2_256, 20)
    with pytest.raises(IkeProtocolError) as e:
        select([bad], IKE_POLICY, ke_group=20)
    assert e.value.notify == Notify.NO_PROPOSAL_CHOSEN


def test_missing_key_length_or_unknown_transform_type_refuses_proposal():
    p = ike_proposal(Encr.AES_GCM_16, 256, 0, Prf.HMAC_SHA2_256, 20)
    p.transforms[0] = Transform(1, Encr.AES_GCM_16, [])
    with pytest.raises(IkeProtocolError):
        select([p], IKE_POLICY, ke_group=20)
    p = ike_proposal(Encr.AES_GCM_16, 256, 0, Prf.HMAC_SHA2_256, 20)
    p.transforms.append(Transform(9, 1))  # unknown transform type: whole proposal refused
    with pytest.raises(IkeProtocolError):
        select([p], IKE_POLICY, ke_group=20)


def test_invalid_ke_names_the_group_we_would_take():
    p = ike_proposal(Encr.AES_GCM_16, 256, 0, Prf.HMAC_SHA2_256, DhGroup.MODP_1536)
    p.transforms.append(T(4, DhGroup.ECP_384))
    with pytest.raises(InvalidKe) as e:
        select([p], IKE_POLICY, ke_group=DhGroup.MODP_1024)
    assert e.value.notify == Notify.INVALID_KE_PAYLOAD and e.value.data == b"\x00\x05"
    # a KE that matches a later acceptable proposal wins over INVALID_KE
    q = ike_proposal(Encr.AES_GCM_16, 128, 0, Prf.HMAC_SHA2_256, DhGroup.ECP_384, num=2)
    assert select([p, q], IKE_POLICY, ke_group=DhGroup.ECP_384).dh == DhGroup.ECP_384


@pytest.mark.parametrize("encr,bits,integ,null_ok,ok", [
    (Encr.AES_GCM_16, 128, 0, False, True),
    (Encr.AES_GCM_16, 256, 0, False, True),
    (Encr.AES_GCM_16, 192, 0, False, False),
    (Encr.AES_CBC, 128, Integ.HMAC_SHA2_256_128, False, True),
    (Encr.AES_CBC, 256, Integ.HMAC_SHA1_96, False, True),
    (Encr.AES_CBC, 256, 0, False, False),
    (Encr.AES_CBC, 256, Integ.HMAC_SHA2_512_256, False, False),
    (Encr.TRIPLE_DES, 0, Integ.HMAC_SHA1_96, False, False),
    (Encr.NULL, 0, Integ.HMAC_SHA2_256_128, False, False),
    (Encr.NULL, 0, Integ.HMAC_SHA2_256_128, True, True),
    (Encr.NULL, 0, 0, True, False),
])
def test_esp_policy(encr, bits, integ, null_ok, ok):
    prop = esp_proposal(encr, bits, integ, b"\x01\x02\x03\x04")
    if ok:
        sel = select([prop], esp_policy(null_ok), ignore_dh=True)
        assert (sel.encr, sel.key_bits, sel.spi, sel.esn) == (encr, bits, b"\x01\x02\x03\x04", False)
    else:
        with pytest.raises(IkeProtocolError):
            select([prop], esp_policy(null_ok), ignore_dh=True)


def test_esp_esn_rules_and_pfs():
    only_esn = esp_proposal(Encr.AES_GCM_16, 128, 0, b"\1\2\3\4", esn=(Esn.YES,))
    with pytest.raises(IkeProtocolError):
        select([only_esn], esp_policy(False), ignore_dh=True)
    both = esp_proposal(Encr.AES_GCM_16, 128, 0, b"\1\2\3\4", esn=(Esn.YES, Esn.NO))
    sel = select([both], esp_policy(False), ignore_dh=True)
    assert sel.esn is False and sel.to_proposal(b"\0\0\1\0").of_type(TransformType.ESN)[0].id == Esn.NO
    pfs = esp_proposal(Encr.AES_GCM_16, 128, 0, b"\1\2\3\4", dh=DhGroup.MODP_2048)
    assert select([pfs], esp_policy(False), ke_group=DhGroup.MODP_2048).dh == DhGroup.MODP_2048
    with pytest.raises(IkeProtocolError):  # PFS required by the proposal but no KE sent
        select([pfs], esp_policy(False))
    with pytest.raises(InvalidKe):
        select([pfs], esp_policy(False), ke_group=DhGroup.ECP_384)
    # in IKE_AUTH the DH transform is ignored (RFC 7296 section 1.2)
    assert select([pfs], esp_policy(False), ignore_dh=True).dh == 0


def test_wrong_protocol_or_spi_size_refused():
    with pytest.raises(IkeProtocolError):
        select([esp_proposal(Encr.AES_GCM_16, 128, 0, b"\1\2")], esp_policy(False), ignore_dh=True)
    with pytest.raises(IkeProtocolError):
        select([ike_proposal(Encr.AES_GCM_16, 128, 0, 5, 20)], esp_policy(False), ignore_dh=True)

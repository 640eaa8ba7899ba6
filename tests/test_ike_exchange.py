"""Two in-memory IKE cores: our responder against our initiator, every exchange of issue 6."""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import replace

import pytest
from ike_peers import CUSTOMER, EDGE, PSK, TUNNEL, Pair, profile

from pipeline.ike.constants import DhGroup, Encr, Esn, ExchangeType, IdType, Integ, Notify, Prf
from pipeline.ike.engine import EngineConfig
from pipeline.ike.message import Message
from pipeline.ike.payloads import DeletePayload
from pipeline.ike.proposal import esp_proposal, ike_proposal
from pipeline.ike.state import IkeState
from pipeline.ike.tasks import ChildCreateTask, IkeRekeyTask, InformationalTask
from pipeline.sa import ENCR_AES_CBC, ENCR_AES_GCM_16, ENCR_NULL, INTEG_HMAC_SHA1_96, Selector


def _check_pair(p: Pair):
    r, i = p.only_sa(p.ri), p.only_sa(p.ii)
    assert r.spi_in == i.spi_out and r.spi_out == i.spi_in
    assert r.enc_key_in == i.enc_key_out and r.enc_key_out == i.enc_key_in
    assert r.salt_in == i.salt_out and r.integ_key_in == i.integ_key_out
    assert (r.enc_key_in, r.integ_key_in) != (r.enc_key_out, r.integ_key_out)
    return r, i


def _established(p: Pair):
    (r,) = p.resp.established_sas()
    (i,) = p.init.established_sas()
    return r, i


IKE_SUITES = [(e, b, g, prf, dh)
              for (e, b, g) in [(Encr.AES_GCM_16, 128, 0), (Encr.AES_GCM_16, 256, 0),
                                (Encr.AES_CBC, 256, Integ.HMAC_SHA2_256_128)]
              for prf in (Prf.HMAC_SHA2_256, Prf.HMAC_SHA2_384, Prf.HMAC_SHA2_512)
              for dh in (DhGroup.ECP_384, DhGroup.MODP_2048, DhGroup.MODP_1536)]


@pytest.mark.parametrize("e,bits,integ,prf,dh", IKE_SUITES)
def test_ike_suites_establish(e, bits, integ, prf, dh):
    p = Pair()
    p.start(profile(ike=[ike_proposal(e, bits, integ, prf, dh)]))
    r, i = _established(p)
    assert (r.sel.encr, r.sel.key_bits, r.sel.integ, r.sel.prf, r.sel.dh) == (e, bits, integ or 0, prf, dh)
    assert r.keys.sk_d == i.keys.sk_d and len(r.keys.sk_d) == {5: 32, 6: 48, 7: 64}[prf]
    rs, _ = _check_pair(p)
    assert rs.encr == ENCR_AES_GCM_16 and rs.encr_key_bits == 256
    assert len(rs.enc_key_in) == 32 and len(rs.salt_in) == 4
    # the edge's IDr is an FQDN in the tunnel scheme; traffic selectors as offered (narrowed)
    assert rs.ts_remote == (Selector(ipaddress.ip_address("10.10.1.0"), ipaddress.ip_address("10.10.1.255")),)
    assert rs.ts_local == (Selector(ipaddress.ip_address("10.10.2.0"), ipaddress.ip_address("10.10.2.255")),)
    assert (rs.local_addr, rs.remote_addr, rs.tunnel_name) == (EDGE, CUSTOMER, "cust-a")
    assert not rs.udp_encap and rs.replay_window == 64


ESP_SUITES = [
    (Encr.AES_GCM_16, 128, 0, ENCR_AES_GCM_16, None, 16, 0),
    (Encr.AES_GCM_16, 256, 0, ENCR_AES_GCM_16, None, 32, 0),
    (Encr.AES_CBC, 128, Integ.HMAC_SHA2_256_128, ENCR_AES_CBC, "hmac-sha2-256-128", 16, 32),
    (Encr.AES_CBC, 256, Integ.HMAC_SHA2_256_128, ENCR_AES_CBC, "hmac-sha2-256-128", 32, 32),
    (Encr.AES_CBC, 128, Integ.HMAC_SHA1_96, ENCR_AES_CBC, INTEG_HMAC_SHA1_96, 16, 20),
    (Encr.AES_CBC, 256, Integ.HMAC_SHA1_96, ENCR_AES_CBC, INTEG_HMAC_SHA1_96, 32, 20),
]


@pytest.mark.parametrize("e,bits,integ,name,integ_name,klen,alen", ESP_SUITES)
def test_esp_suites(e, bits, integ, name, integ_name, klen, alen):
    p = Pair()
    p.start(profile(esp=[esp_proposal(e, bits, integ, b"")]))
    r, _ = _check_pair(p)
    assert (r.encr, r.encr_key_bits, r.integ) == (name, bits, integ_name)
    assert len(r.enc_key_in) == klen and len(r.integ_key_in) == alen
    assert len(r.salt_in) == (4 if e == Encr.AES_GCM_16 else 0)


def test_null_cipher_only_for_tunnels_that_allow_it():
    esp = [esp_proposal(Encr.NULL, 0, Integ.HMAC_SHA2_256_128, b"")]
    p = Pair()
    p.start(profile(esp=esp))
    assert p.ri.sas == {} and p.ii.sas == {}
    assert p.resp.stats["child_refused"] == 1
    assert len(p.resp.established_sas()) == 1  # RFC 7296 2.21.2: the IKE SA stands
    t = replace(TUNNEL, allow_null_cipher=True)
    p = Pair(tunnels=[t])
    p.start(profile(t, esp=esp))
    r, _ = _check_pair(p)
    assert (r.encr, r.integ, r.enc_key_in, len(r.integ_key_in)) == (ENCR_NULL, "hmac-sha2-256-128", b"", 32)


@pytest.mark.parametrize("id_type", [IdType.FQDN, IdType.RFC822_ADDR, IdType.KEY_ID, IdType.IPV4_ADDR])
def test_four_id_types_find_the_tunnel(id_type):
    other = replace(TUNNEL, name="other", tunnel_id="0" * 32, customer_endpoint="198.51.100.9",
                    psk=b"another-psk")
    p = Pair(tunnels=[other, TUNNEL])
    p.start(profile(id_type=id_type))
    r, _ = _check_pair(p)
    assert r.tunnel_name == "cust-a"
    (sa,) = p.resp.established_sas()
    assert sa.peer_ids[0] == id_type


def _auth_failed(p: Pair):
    assert p.resp.sas == {} and p.ri.sas == {} and p.ri.events == []
    assert p.init.sas == {} and p.ii.sas == {}
    last = Message.parse(p.wire[-1][1])
    assert last.exchange == ExchangeType.IKE_AUTH and last.is_response


@pytest.mark.parametrize("case", ["wrong_psk", "unknown_fqdn", "fqdn_as_keyid", "ambiguous_ipv4",
                                  "email_without_prefix"])
def test_authentication_failures_leave_no_state(case):
    tunnels = [TUNNEL]
    kw = {}
    if case == "wrong_psk":
        kw = {"psk": b"wrong"}
    elif case == "unknown_fqdn":
        kw = {"id_data": b"nope.123456789.ipsec.example.net"}
    elif case == "fqdn_as_keyid":  # the string of an FQDN ID sent with the KEY_ID type byte
        kw = {"id_type": IdType.KEY_ID, "id_data": f"{TUNNEL.tunnel_id}.123456789.ipsec.example.net".encode()}
    elif case == "ambiguous_ipv4":
        tunnels = [TUNNEL, replace(TUNNEL, name="twin", tunnel_id="1" * 32)]
        kw = {"id_type": IdType.IPV4_ADDR}
    elif case == "email_without_prefix":
        kw = {"id_type": IdType.RFC822_ADDR, "id_data": f"{TUNNEL.tunnel_id}.123456789.ipsec.example.net".encode()}
    p = Pair(tunnels=tunnels)
    p.start(profile(**kw))
    _auth_failed(p)
    key = "auth_failed" if case == "wrong_psk" else "auth_unknown_id"
    assert p.resp.stats[key] == 1
    assert p.init.stats["response_error_authentication_failed"] == 1


@pytest.mark.parametrize("prop,ke_len", [
    (ike_proposal(Encr.TRIPLE_DES, 0, Integ.HMAC_SHA2_256_128, Prf.HMAC_SHA2_256, DhGroup.MODP_2048), 256),
    (ike_proposal(Encr.AES_GCM_16, 256, 0, Prf.HMAC_SHA2_256, DhGroup.MODP_1024), 128),
    (ike_proposal(Encr.AES_GCM_16, 256, Integ.HMAC_SHA2_256_128, Prf.HMAC_SHA2_256, DhGroup.ECP_384), 96),
    (ike_proposal(Encr.AES_CBC, 128, Integ.HMAC_SHA2_256_128, Prf.HMAC_SHA2_256, DhGroup.ECP_384), 96),
    (ike_proposal(Encr.AES_CBC, 256, Integ.HMAC_SHA1_96, Prf.HMAC_SHA2_256, DhGroup.ECP_384), 96),
    (ike_proposal(Encr.AES_GCM_16, 256, 0, Prf.HMAC_SHA1, DhGroup.ECP_384), 96),
], ids=["3des", "modp1024", "gcm+integ", "cbc128", "cbc+sha1", "prf-sha1"])
def test_ike_proposals_refused_with_no_proposal_chosen(prop, ke_len):
    import os

    from pipeline.ike.constants import Flag
    from pipeline.ike.payloads import KePayload, NoncePayload, SaPayload

    p = Pair()
    group = prop.transforms[-1].id
    req = Message(os.urandom(8), bytes(8), ExchangeType.IKE_SA_INIT, Flag.INITIATOR, 0, [
        SaPayload([prop]), KePayload(group, os.urandom(ke_len)), NoncePayload(os.urandom(32))])
    (out,) = p.resp.handle(req.serialize(), (EDGE, 500), (CUSTOMER, 500), 0)
    resp = Message.parse(out.data)
    assert [(n.notify, n.data) for n in resp.notifies()] == [(Notify.NO_PROPOSAL_CHOSEN, b"")]
    assert resp.spi_r == bytes(8) and resp.spi_i == req.spi_i and p.resp.sas == {}
    assert p.resp.stats["init_refused_no_proposal_chosen"] == 1


def test_invalid_ke_payload_then_retry():
    """The initiator guesses group 5 but proposes 14 and 20: INVALID_KE_PAYLOAD with our
    preference among its offer (14, from its first proposal), then the retry succeeds."""
    ike = [ike_proposal(Encr.AES_GCM_16, 128, 0, Prf.HMAC_SHA2_256, DhGroup.MODP_2048),
           ike_proposal(Encr.AES_GCM_16, 128, 0, Prf.HMAC_SHA2_256, DhGroup.ECP_384, num=2)]
    p = Pair()
    p.start(profile(ike=ike, ke_group=DhGroup.MODP_1536))
    first_req = Message.parse(p.wire[0][1])
    assert first_req.get(34).group == DhGroup.MODP_1536
    first_reply = Message.parse(p.wire[1][1])
    assert [(n.notify, n.data) for n in first_reply.notifies()] == [
        (Notify.INVALID_KE_PAYLOAD, b"\x00\x0e")]
    assert first_reply.spi_r == bytes(8) and p.resp.stats["init_refused_invalid_ke_payload"] == 1
    retry = Message.parse(p.wire[2][1])
    assert retry.msg_id == 0 and retry.get(34).group == DhGroup.MODP_2048
    assert retry.spi_i == first_req.spi_i
    r, _ = _established(p)
    assert r.sel.dh == DhGroup.MODP_2048 and r.sel.number == 1
    _check_pair(p)


def test_esn_only_refused_both_offered_gets_no_esn():
    p = Pair()
    p.start(profile(esp=[esp_proposal(Encr.AES_GCM_16, 128, 0, b"", esn=(Esn.YES,))]))
    assert p.ri.sas == {}
    auth_resp = [Message.parse(d) for dirn, d in p.wire if dirn == "r>i"][-1]
    assert auth_resp.exchange == ExchangeType.IKE_AUTH
    assert p.init.stats["child_refused_by_peer"] == 1
    p = Pair()
    p.start(profile(esp=[esp_proposal(Encr.AES_GCM_16, 128, 0, b"", esn=(Esn.YES, Esn.NO))]))
    r, _ = _check_pair(p)
    assert r.esn is False


def test_transport_mode_refused():
    p = Pair()
    p.start(profile(transport_mode=True))
    assert p.ri.sas == {} and p.resp.stats["child_refused"] == 1


def test_traffic_selectors_narrowed_to_tunnel():
    t = replace(TUNNEL, local_ts=("10.10.2.0/25",), remote_ts=("10.10.0.0/16",))
    p = Pair(tunnels=[t])
    from pipeline.ike.payloads import TrafficSelector as TS

    p.start(profile(t, ts_i=[TS.from_network("0.0.0.0/0")], ts_r=[TS.from_network("0.0.0.0/0")]))
    r, i = _check_pair(p)
    assert [str(s) for s in r.ts_local] == ["10.10.2.0/25"]
    assert [str(s) for s in r.ts_remote] == ["10.10.0.0/16"]
    assert [str(s) for s in i.ts_local] == ["10.10.0.0/16"]  # the initiator sees the narrowing
    p = Pair(tunnels=[t])
    p.start(profile(t, ts_r=[TS.from_network("192.168.0.0/24")]))
    assert p.ri.sas == {} and p.resp.stats["request_error_ts_unacceptable"] == 0
    assert p.init.stats["child_refused_by_peer"] == 1


def test_cookie_engages_above_threshold_and_is_accepted():
    p = Pair(config_r=EngineConfig(half_open_cookie_threshold=0))
    p.start(profile())
    first = Message.parse(p.wire[1][1])
    assert first.spi_r == bytes(8) and [n.notify for n in first.notifies()] == [Notify.COOKIE]
    retry = Message.parse(p.wire[2][1])
    assert retry.payloads[0].notify == Notify.COOKIE and retry.payloads[0].data == first.payloads[0].data
    assert p.resp.stats["cookie_sent"] == 1 and p.resp.stats["cookie_accepted"] == 1
    _check_pair(p)


def test_spoofed_flood_then_legitimate_peer():
    """Spoofed IKE_SA_INIT requests fill the half-open table; cookies engage; the peer gets in."""
    from pipeline.ike.constants import Flag
    from pipeline.ike.crypto import dh_generate
    from pipeline.ike.payloads import KePayload, NoncePayload, NotifyPayload, SaPayload

    p = Pair(config_r=EngineConfig(half_open_cookie_threshold=20))
    ke = dh_generate(DhGroup.ECP_384)
    for n in range(60):
        m = Message(n.to_bytes(8, "big") or b"\1" * 8, bytes(8), ExchangeType.IKE_SA_INIT,
                    Flag.INITIATOR, 0, [
                        SaPayload([ike_proposal(Encr.AES_GCM_16, 256, 0, Prf.HMAC_SHA2_256,
                                                DhGroup.ECP_384)]),
                        KePayload(DhGroup.ECP_384, ke.public), NoncePayload(bytes(32))])
        p.resp.handle(m.serialize(), (EDGE, 500), (f"203.0.113.{n}", 500 + n), p.now)
    assert p.resp.half_open() == 20 and p.resp.stats["cookie_sent"] == 40
    p.start(profile())
    _check_pair(p)
    assert p.resp.stats["cookie_accepted"] == 1
    p.tick(31)  # half-open SAs expire
    assert p.resp.half_open() == 0 and len(p.resp.established_sas()) == 1
    assert NotifyPayload  # imported for readability of the payload list above


def test_retransmitted_request_gets_cached_response():
    p = Pair()
    p.start(profile())
    auth_req = [d for dirn, d in p.wire if dirn == "i>r"][1]
    auth_resp = [d for dirn, d in p.wire if dirn == "r>i"][1]
    init_req = next(d for dirn, d in p.wire if dirn == "i>r")
    init_resp = next(d for dirn, d in p.wire if dirn == "r>i")
    out = p.resp.handle(auth_req, (EDGE, 500), (CUSTOMER, 500), p.now)
    assert [d.data for d in out] == [auth_resp]
    out = p.resp.handle(init_req, (EDGE, 500), (CUSTOMER, 500), p.now)
    assert [d.data for d in out] == [init_resp]
    assert p.ri.events == [("install", p.only_sa(p.ri).spi_in)]
    assert p.resp.stats["retransmit_answered"] == 2 and len(p.resp.sas) == 1


def test_ike_sa_init_retransmit_answered_while_half_open():
    p = Pair()
    p.drop_to_initiator = True
    p.start(profile())
    init_req, init_resp = p.wire[0][1], p.wire[1][1]
    out = p.resp.handle(init_req, (EDGE, 500), (CUSTOMER, 500), p.now)
    assert [d.data for d in out] == [init_resp]
    assert p.resp.half_open() == 1
    p.now = 31
    p.resp.tick(p.now)
    assert p.resp.sas == {} and p.resp.stats["ike_destroyed_half_open_timeout"] == 1


def test_tampered_and_unexpected_messages_are_dropped_and_counted():
    p = Pair()
    p.start(profile())
    (sa,) = p.resp.established_sas()
    req = Message(sa.spi_i, sa.spi_r, ExchangeType.INFORMATIONAL, 0x08, 2)
    from pipeline.ike.message import encrypt

    good = encrypt(req, [], p.init.established_sas()[0].sk)
    bad = good[:-1] + bytes([good[-1] ^ 1])
    assert p.resp.handle(bad, (EDGE, 500), (CUSTOMER, 500), 0) == []
    assert p.resp.stats["drop_integrity_check_failed"] == 1
    wrong_id = Message(sa.spi_i, sa.spi_r, ExchangeType.INFORMATIONAL, 0x08, 7)
    assert p.resp.handle(encrypt(wrong_id, [], p.init.established_sas()[0].sk),
                         (EDGE, 500), (CUSTOMER, 500), 0) == []
    assert p.resp.stats["drop_unexpected_message_id"] == 1
    assert len(p.resp.handle(good, (EDGE, 500), (CUSTOMER, 500), 0)) == 1


def test_child_rekey_by_edge_with_pfs_before_hard_lifetime():
    p = Pair()
    p.start(profile())
    old_r = p.only_sa(p.ri)
    p.tick(0.91 * TUNNEL.child_lifetime)  # past the jittered soft lifetime (85-90%)
    new_r, new_i = _check_pair(p)
    assert new_r.spi_in != old_r.spi_in
    assert p.ri.events == [("install", old_r.spi_in), ("replace", new_r.spi_in)]
    assert p.resp.stats["child_rekeyed"] == 1 and p.init.stats["child_rekeyed"] == 1
    # the rekey went with a KE payload of the IKE SA's group (PFS), then the old SA was deleted
    (r_sa,) = p.resp.established_sas()
    assert list(r_sa.children) == [new_r.spi_in]
    assert p.init.established_sas()[0].children.keys() == {new_i.spi_in}


@pytest.mark.parametrize("group", [DhGroup.ECP_384, DhGroup.MODP_2048, DhGroup.MODP_1536])
def test_child_rekey_by_initiator_with_pfs(group):
    p = Pair()
    p.start(profile(esp=[esp_proposal(Encr.AES_CBC, 128, Integ.HMAC_SHA2_256_128, b"", dh=group)]))
    old = p.only_sa(p.ii)
    (i_sa,) = p.init.established_sas()
    child = i_sa.children[old.spi_in]
    p.deliver_from_i(p.init.start(i_sa, ChildCreateTask(rekey=child, pfs_group=group), p.now))
    r, _i = _check_pair(p)
    assert r.spi_in != old.spi_out and (r.encr, r.encr_key_bits) == (ENCR_AES_CBC, 128)
    (r_sa,) = p.resp.established_sas()
    assert len(r_sa.children) == 1 and next(iter(r_sa.children.values())).sel.dh == group


def test_new_child_sa_on_existing_ike_sa():
    p = Pair()
    p.start(profile())
    (i_sa,) = p.init.established_sas()
    task = ChildCreateTask(proposals=[esp_proposal(Encr.AES_GCM_16, 128, 0, b"")])
    p.deliver_from_i(p.init.start(i_sa, task, p.now))
    assert len(p.ri.sas) == 2 and len(p.ii.sas) == 2
    assert {s.encr_key_bits for s in p.ri.sas.values()} == {128, 256}


def test_ike_rekey_moves_children_and_deletes_old_sa():
    p = Pair()
    p.start(profile())
    child_before = p.only_sa(p.ri)
    (i_sa,) = p.init.established_sas()
    (r_old,) = p.resp.established_sas()
    p.deliver_from_i(p.init.start(i_sa, IkeRekeyTask(), p.now))
    (r_new,) = p.resp.established_sas()
    (i_new,) = p.init.established_sas()
    assert r_new is not r_old and r_new.spi_i == i_new.spi_i and r_new.spi_r == i_new.spi_r
    assert r_new.keys.sk_d == i_new.keys.sk_d != r_old.keys.sk_d
    assert list(r_new.children) == [child_before.spi_in]
    assert r_old.state == IkeState.DEAD and len(p.resp.sas) == 1
    assert p.only_sa(p.ri) == child_before  # children untouched by the IKE rekey
    # the new SA works: a liveness check and then a Child SA rekey over it
    p.deliver_from_i(p.init.start(i_new, InformationalTask(), p.now))
    assert r_new.expected_peer_id == 1
    p.deliver_from_r(p.resp.start(r_new, ChildCreateTask(rekey=r_new.children[child_before.spi_in],
                                                         pfs_group=DhGroup.ECP_384), p.now))
    _check_pair(p)


def test_delete_child_from_edge_and_ike_from_peer():
    p = Pair()
    p.start(profile())
    (r_sa,) = p.resp.established_sas()
    spi = p.only_sa(p.ri).spi_in
    p.deliver_from_r(p.resp.start(r_sa, InformationalTask(
        [DeletePayload(3, [spi.to_bytes(4, "big")])]), p.now))
    assert p.ri.sas == {} and p.ii.sas == {}
    assert ("delete", spi) in p.ri.events
    # new child then IKE DELETE from the peer removes everything
    (i_sa,) = p.init.established_sas()
    p.deliver_from_i(p.init.start(i_sa, ChildCreateTask(
        proposals=[esp_proposal(Encr.AES_GCM_16, 128, 0, b"")]), p.now))
    assert len(p.ri.sas) == 1
    p.deliver_from_i(p.init.start(i_sa, InformationalTask([DeletePayload(1, [])]), p.now))
    assert p.resp.sas == {} and p.ri.sas == {} and p.init.sas == {} and p.ii.sas == {}


def test_liveness_and_dead_peer():
    p = Pair()
    p.start(profile())
    p.tick(TUNNEL.dpd_interval + 1)
    assert p.resp.stats["liveness_sent"] == 1 and len(p.resp.established_sas()) == 1
    p.drop_to_initiator = False
    # the peer goes away: liveness requests are retransmitted, then the SA is torn down
    p.init = type(p.init)(p.init.directory, p.ii)  # a peer that lost all state (no answers)
    p.drop_to_initiator = True
    for _ in range(12):
        p.tick(TUNNEL.dpd_interval)
    assert p.resp.sas == {} and p.ri.sas == {}
    assert p.resp.stats["ike_destroyed_peer_dead"] == 1


def test_initial_contact_removes_older_sas_of_the_tunnel():
    p = Pair()
    p.start(profile())
    first = p.only_sa(p.ri)
    p.init = type(p.init)(p.init.directory, p.ii)  # peer restarts
    p.start(profile(initial_contact=True))
    assert len(p.resp.sas) == 1 and first.spi_in not in p.ri.sas and len(p.ri.sas) == 1
    assert p.resp.stats["ike_destroyed_initial_contact"] == 1


def test_nat_detected_floats_to_4500_and_sa_gets_udp_encap():
    p = Pair(nat="203.0.113.7")
    p.start(profile())
    r, _i = _check_pair(p)
    (sa,) = p.resp.established_sas()
    assert sa.nat_remote and not sa.nat_local
    assert sa.remote == ("203.0.113.7", p._nat_ports[("10.0.0.2", 4500)]) and sa.local == (EDGE, 4500)
    assert (r.encap_local_port, r.encap_remote_port) == (4500, sa.remote[1])
    assert r.remote_addr == "203.0.113.7"


def test_fragmented_ike_auth_is_reassembled():
    cfg = EngineConfig(fragment_size=200)
    p = Pair(config_r=cfg, config_i=EngineConfig(fragment_size=200))
    many_ts = [__import__("pipeline.ike.payloads", fromlist=["x"]).TrafficSelector.from_network(
        f"10.10.{n}.0/24") for n in range(1, 20)]
    p.start(profile(ts_i=many_ts))
    r, _ = _check_pair(p)
    assert p.init.stats["fragmented_messages"] >= 1 and p.resp.stats["fragments_reassembled"] == 1
    assert p.resp.stats["fragmented_messages"] >= 1 and p.init.stats["fragments_reassembled"] == 1
    assert len(r.ts_remote) == 19
    assert max(len(d) for _, d in p.wire if Message.parse(d).exchange != ExchangeType.IKE_SA_INIT) <= 200


def test_unknown_critical_payload_in_ike_sa_init():
    from pipeline.ike.constants import Flag
    from pipeline.ike.crypto import dh_generate
    from pipeline.ike.payloads import KePayload, NoncePayload, SaPayload, UnknownPayload

    p = Pair()
    m = Message(b"\7" * 8, bytes(8), ExchangeType.IKE_SA_INIT, Flag.INITIATOR, 0, [
        SaPayload([ike_proposal(Encr.AES_GCM_16, 256, 0, Prf.HMAC_SHA2_256, DhGroup.ECP_384)]),
        KePayload(DhGroup.ECP_384, dh_generate(DhGroup.ECP_384).public), NoncePayload(bytes(32)),
        UnknownPayload(222, b"??", critical=True)])
    (out,) = p.resp.handle(m.serialize(), (EDGE, 500), (CUSTOMER, 500), 0)
    resp = Message.parse(out.data)
    assert [(n.notify, n.data) for n in resp.notifies()] == [
        (Notify.UNSUPPORTED_CRITICAL_PAYLOAD, bytes([222]))]
    assert p.resp.sas == {}


def test_no_secret_in_logs_or_repr(caplog):
    caplog.set_level(logging.DEBUG)
    p = Pair()
    p.start(profile())
    p.tick(0.91 * TUNNEL.child_lifetime)
    r, _ = _check_pair(p)
    (sa,) = p.resp.established_sas()
    secrets = [PSK, r.enc_key_in, r.enc_key_out, r.salt_in, sa.keys.sk_d, sa.keys.sk_ei,
               sa.keys.sk_pi]
    text = caplog.text + repr(r) + repr(sa) + repr(sa.keys) + repr(sa.sk) + repr(TUNNEL)
    text += repr(list(sa.children.values()))
    for s in secrets:
        assert s.hex() not in text and repr(s) not in text and s.decode("latin-1") not in text
    assert "SA installed" in caplog.text


def test_nat_rebinding_moves_installed_sas_to_the_new_port():
    p = Pair(nat="203.0.113.7")
    p.start(profile())
    before = p.only_sa(p.ri)
    (i_sa,) = p.init.established_sas()
    p._nat_ports[("10.0.0.2", 4500)] = 40001  # the NAT forgets the mapping and picks a new port
    p.deliver_from_i(p.init.start(i_sa, InformationalTask(), p.now))
    after = p.only_sa(p.ri)
    assert before.encap_remote_port != 40001
    assert (after.spi_in, after.encap_remote_port, after.remote_addr) == (before.spi_in, 40001,
                                                                        "203.0.113.7")
    assert p.ri.events[-2:] == [("delete", before.spi_in), ("install", before.spi_in)]


def test_edge_rekeys_ike_sa_at_its_lifetime():
    p = Pair()
    p.start(profile())
    (r_old,) = p.resp.established_sas()
    child = p.only_sa(p.ri)
    for sa in (*p.resp.sas.values(), *p.init.sas.values()):
        for c in sa.children.values():  # keep the Child SAs out of the way
            c.rekey_at = c.expire_at = 10 * TUNNEL.ike_lifetime
    p.tick(0.91 * TUNNEL.ike_lifetime)
    (r_new,) = p.resp.established_sas()
    (i_new,) = p.init.established_sas()
    # the edge started the rekey, so it is the initiator of the new IKE SA (RFC 7296 2.18)
    assert r_new is not r_old and r_new.initiator and not i_new.initiator
    assert (r_new.spi_i, r_new.spi_r) == (i_new.spi_i, i_new.spi_r)
    assert p.resp.stats["ike_rekeyed"] == 1 and r_old.state == IkeState.DEAD
    assert list(r_new.children) == [child.spi_in] and p.only_sa(p.ri) == child
    # and the new SA carries exchanges both ways
    p.deliver_from_i(p.init.start(i_new, InformationalTask(), p.now))
    p.deliver_from_r(p.resp.start(r_new, InformationalTask(), p.now))
    assert r_new.expected_peer_id == 1 and i_new.expected_peer_id == 1


def test_response_goes_to_the_source_of_the_request():
    """RFC 7296 2.11: without NAT the SA's address stays, but each answer follows its request."""
    p = Pair()
    p.start(profile())
    (r_sa,) = p.resp.established_sas()
    (i_sa,) = p.init.established_sas()
    (req,) = p.init.start(i_sa, InformationalTask(), p.now)
    (resp,) = p.resp.handle(req.data, (EDGE, 500), (CUSTOMER, 33333), p.now)
    assert resp.remote == (CUSTOMER, 33333) and resp.local == (EDGE, 500)
    assert r_sa.remote == (CUSTOMER, 500)  # no NAT detected: the SA does not move
    (again,) = p.resp.handle(req.data, (EDGE, 500), (CUSTOMER, 44444), p.now)
    assert again.remote == (CUSTOMER, 44444) and again.data == resp.data


def test_rekeyed_child_never_deleted_by_peer_is_removed_at_expiry():
    p = Pair()
    p.start(profile())
    (r_sa,) = p.resp.established_sas()
    old = next(iter(r_sa.children.values()))
    (i_sa,) = p.init.established_sas()
    i_child = next(iter(i_sa.children.values()))
    # the initiator rekeys (later on) but its DELETE of the old SA is lost
    p.now = 1000.0
    (req,) = p.init.start(i_sa, ChildCreateTask(rekey=i_child, pfs_group=0,
                                                proposals=[esp_proposal(Encr.AES_GCM_16, 256, 0, b"")]),
                          p.now)
    (resp,) = p.resp.handle(req.data, req.remote, req.local, p.now)
    p.init.handle(resp.data, resp.remote, resp.local, p.now)  # the DELETE it returns is dropped
    assert old.rekeyed and len(r_sa.children) == 2
    p.now = old.expire_at + 1
    p.resp.tick(p.now)
    assert old.spi_in not in r_sa.children and len(r_sa.children) == 1


@pytest.mark.parametrize("attempt", range(4))
def test_simultaneous_child_rekey_collision_leaves_one_pair(attempt):
    """Both ends rekey the same Child SA at once (RFC 7296 2.8.1): requests cross, then the SA
    from the exchange with the lowest nonce is deleted by its creator; one pair remains."""
    p = Pair()
    p.start(profile())
    (r_sa,) = p.resp.established_sas()
    (i_sa,) = p.init.established_sas()
    old_r = next(iter(r_sa.children.values()))
    old_i = next(iter(i_sa.children.values()))
    (req_i,) = p.init.start(i_sa, ChildCreateTask(rekey=old_i, pfs_group=DhGroup.ECP_384), p.now)
    (req_r,) = p.resp.start(r_sa, ChildCreateTask(rekey=old_r, pfs_group=DhGroup.ECP_384), p.now)
    (resp_to_i,) = p.resp.handle(req_i.data, req_i.remote, req_i.local, p.now)
    (resp_to_r,) = p.init.handle(req_r.data, req_r.remote, req_r.local, p.now)
    # each side now gets the answer to its own request (and the DELETEs that follow run on)
    p.deliver_from_i(p.init.handle(resp_to_i.data, resp_to_i.remote, resp_to_i.local, p.now))
    p.deliver_from_r(p.resp.handle(resp_to_r.data, resp_to_r.remote, resp_to_r.local, p.now))
    r, i = _check_pair(p)  # exactly one installed pair on each side, matching keys
    assert r.spi_in not in (old_r.spi_in,) and set(r_sa.children) == {r.spi_in}
    assert set(i_sa.children) == {i.spi_in}
    lost = p.resp.stats["rekey_collision_lost"] + p.init.stats["rekey_collision_lost"]
    won = p.resp.stats["rekey_collision_won"] + p.init.stats["rekey_collision_won"]
    assert (lost, won) == (1, 1)


def test_half_open_count_follows_every_path():
    p = Pair()
    p.start(profile())
    assert p.resp.half_open() == 0
    (i_sa,) = p.init.established_sas()
    p.deliver_from_i(p.init.start(i_sa, IkeRekeyTask(), p.now))
    assert p.resp.half_open() == 0 and len(p.resp.established_sas()) == 1
    p2 = Pair()
    p2.start(profile(psk=b"wrong"))  # half-open, then AUTHENTICATION_FAILED
    assert p2.resp.half_open() == 0 and p2.resp.sas == {}
    p3 = Pair()
    p3.drop_to_initiator = True
    p3.start(profile())
    assert p3.resp.half_open() == 1
    p3.resp.tick(31.0)  # (not p3.tick: the initiator's retransmission would open a new one)
    assert p3.resp.half_open() == 0 and p3.resp.sas == {}


def test_liveness_retried_until_the_tunnels_dead_peer_timeout():
    t = replace(TUNNEL, dpd_interval=10, dpd_timeout=150)
    p = Pair(tunnels=[t])
    p.start(profile(t))
    p.drop_to_initiator = True  # the peer's answers are lost from now on
    p.tick(11)  # liveness request sent
    assert p.resp.stats["liveness_sent"] == 1
    for _ in range(13):
        p.tick(10)  # t = 141 s: still retrying, well past the default 5 tries
    assert len(p.resp.established_sas()) == 1 and p.resp.stats["retransmitted"] >= 6
    p.tick(10)  # t = 151 s: 140 s after the first liveness check
    p.tick(10)
    assert p.resp.sas == {} and p.ri.sas == {} and p.resp.stats["ike_destroyed_peer_dead"] == 1


def test_max_half_open_drops_new_requests():
    p = Pair(config_r=EngineConfig(max_half_open=1, half_open_cookie_threshold=100))
    p.drop_to_initiator = True
    p.start(profile())
    p.init = type(p.init)(p.init.directory, p.ii)
    p.start(profile())
    assert p.resp.half_open() == 1 and p.resp.stats["drop_half_open_limit"] == 1

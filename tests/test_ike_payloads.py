"""IKE message and payload parsing: the real NAT-T capture, hand-built bytes, error mapping."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pipeline.ike.constants import (
    DhGroup,
    Encr,
    ExchangeType,
    Flag,
    IdType,
    Notify,
    PayloadType,
    ProtocolId,
    TransformType,
)
from pipeline.ike.engine import IkeEngine
from pipeline.ike.message import DropMessage, Message
from pipeline.ike.payloads import (
    DeletePayload,
    EncryptedPayload,
    IdPayload,
    IkeProtocolError,
    KePayload,
    NoncePayload,
    NotifyPayload,
    SaPayload,
    TrafficSelector,
    TsPayload,
    UnknownPayload,
    decode_chain,
    encode_chain,
)
from pipeline.ike.proposal import IKE_POLICY, select
from pipeline.ike.tunnels import TunnelDirectory
from pipeline.sa import RecordingSaInstaller

CAPTURE = Path(__file__).resolve().parent.parent.parent / "shared" / "captures" / "ikev2_nat_t.pcapng"


def _capture_ike():
    from scapy.all import UDP, rdpcap  # independent dissector for the framing

    out = []
    for i, pkt in enumerate(rdpcap(str(CAPTURE))):
        udp = pkt[UDP]
        data = bytes(udp.payload)
        assert udp.dport == 4500 or udp.sport == 4500
        if data[:4] == b"\0\0\0\0":  # non-ESP marker (RFC 3948 section 2.2)
            out.append((i, data[4:]))
    return out


IKE = _capture_ike()


def test_capture_has_the_documented_ike_messages():
    assert len(IKE) == 30  # 54 packets, 24 of them ESP-in-UDP
    kinds = [(Message.parse(d).exchange, Message.parse(d).is_response) for _, d in IKE]
    assert kinds.count((ExchangeType.IKE_SA_INIT, False)) == 3
    assert kinds.count((ExchangeType.IKE_AUTH, True)) == 3
    assert kinds.count((ExchangeType.INFORMATIONAL, False)) == 9


@pytest.mark.parametrize("idx,data", IKE, ids=[f"pkt{i}" for i, _ in IKE])
def test_capture_message_parses_and_reserializes_exactly(idx, data):
    msg = Message.parse(data)
    # header fields straight from the bytes (RFC 7296 section 3.1)
    assert msg.spi_i == data[0:8] and msg.spi_r == data[8:16]
    assert msg.version == 0x20
    assert msg.msg_id == struct.unpack("!I", data[20:24])[0]
    assert struct.unpack("!I", data[24:28])[0] == len(data)
    if msg.exchange != ExchangeType.IKE_SA_INIT:
        assert isinstance(msg.payloads[-1], EncryptedPayload)
        assert msg.payloads[-1].offset == 28
    assert msg.serialize() == data


def test_capture_first_exchange_details():
    req = Message.parse(IKE[0][1])
    assert req.spi_i.hex() == "89922c915f35570e" and req.spi_r == bytes(8)
    assert req.exchange == ExchangeType.IKE_SA_INIT and req.flags == Flag.INITIATOR
    sa = req.get(PayloadType.SA)
    (prop,) = sa.proposals
    assert prop.protocol == ProtocolId.IKE and prop.spi == b""
    assert [(t.type, t.id, t.key_length) for t in prop.transforms] == [
        (TransformType.ENCR, Encr.AES_GCM_16, 256), (TransformType.PRF, 5, None),
        (TransformType.DH, 19, None)]
    assert req.get(PayloadType.KE).group == 19 and len(req.get(PayloadType.KE).data) == 64
    assert req.notify(Notify.IKEV2_FRAGMENTATION_SUPPORTED) is not None
    assert req.notify(16406) is not None  # unknown status notify stays representable
    resp = Message.parse(IKE[1][1])
    assert resp.flags == Flag.RESPONSE and resp.spi_r.hex() == "98d56d32e2a04742"
    certreq = resp.get(PayloadType.CERTREQ)
    assert isinstance(certreq, UnknownPayload) and certreq.data == b"\x04"


@pytest.mark.parametrize("n", [0, 18, 36])
def test_capture_proposals_refused_cleanly(n):
    """AES-GCM/CTR/CBC with group 19 only: NO_PROPOSAL_CHOSEN, not a crash."""
    req = Message.parse(dict(IKE)[n])
    with pytest.raises(IkeProtocolError) as e:
        select(req.get(PayloadType.SA).proposals, IKE_POLICY, ke_group=req.get(PayloadType.KE).group)
    assert e.value.notify == Notify.NO_PROPOSAL_CHOSEN


def test_engine_answers_captured_ike_sa_init_with_no_proposal_chosen():
    eng = IkeEngine(TunnelDirectory([], "example.net"), RecordingSaInstaller())
    out = eng.handle(IKE[0][1], ("172.16.15.92", 4500), ("192.168.245.131", 10954), now=0.0)
    assert len(out) == 1
    resp = Message.parse(out[0].data)
    assert out[0].remote == ("192.168.245.131", 10954) and out[0].local == ("172.16.15.92", 4500)
    assert resp.spi_i.hex() == "89922c915f35570e" and resp.spi_r == bytes(8)
    assert resp.flags == Flag.RESPONSE and resp.msg_id == 0
    assert [(n.notify, n.data) for n in resp.notifies()] == [(Notify.NO_PROPOSAL_CHOSEN, b"")]
    assert eng.sas == {}
    # an encrypted message for an SA we do not know is dropped and counted
    assert eng.handle(IKE[2][1], ("172.16.15.92", 4500), ("192.168.245.131", 10954), 0.0) == []
    assert eng.stats["drop_unknown_spi"] == 1


# ------------------------------------------------------------------ hand-built payloads


def test_ke_nonce_id_ts_wire_format():
    first, data = encode_chain([
        KePayload(DhGroup.ECP_384, b"\xaa" * 96),
        NoncePayload(b"\x01" * 32),
        IdPayload(PayloadType.IDI, IdType.KEY_ID, b"123_abc"),
        TsPayload(PayloadType.TSI, [TrafficSelector.from_network("10.10.1.0/24")]),
    ])
    assert first == PayloadType.KE
    assert data[:8] == bytes([PayloadType.NONCE, 0]) + struct.pack("!H", 104) + b"\x00\x14\x00\x00"
    assert data[104:108] == bytes([PayloadType.IDI, 0]) + struct.pack("!H", 36)
    assert data[140:155] == bytes([PayloadType.TSI, 0, 0, 15, IdType.KEY_ID, 0, 0, 0]) + b"123_abc"
    assert data[155:] == bytes([0, 0, 0, 24, 1, 0, 0, 0, 7, 0, 0, 16, 0, 0, 0xFF, 0xFF,
                                10, 10, 1, 0, 10, 10, 1, 255])
    again = decode_chain(first, data)
    assert again[2].data == b"123_abc" and again[3].selectors[0].end_addr == bytes([10, 10, 1, 255])


def test_sa_payload_bytes_and_attribute_key_length():
    body = bytes.fromhex(
        "0000002c" "01010004"          # last proposal, len 44, #1 IKE, SPI size 0, 4 transforms
        "0300000c" "01000014" "800e0100"  # ENCR AES-GCM-16, key length 256 (TV attribute)
        "03000008" "02000005"          # PRF SHA2-256
        "03000008" "04000014"          # DH 20
        "00000008" "0400000e")         # DH 14, last
    sa = SaPayload.parse(body)
    (p,) = sa.proposals
    assert [(t.type, t.id, t.key_length) for t in p.transforms] == [
        (1, 20, 256), (2, 5, None), (4, 20, None), (4, 14, None)]
    assert sa.body() == body


@pytest.mark.parametrize("body,why", [
    (bytes.fromhex("00000024010100040300000c01000014800e0100"), "proposal overruns"),
    (bytes.fromhex("0000000c01010002" "00000008"), "transform count"),
    (bytes.fromhex("0200000801010000"), "last flag"),
    (bytes.fromhex("00000008010100000000000801010000"), "data after last"),
    (b"", "no proposals"),
])
def test_sa_payload_malformed(body, why):
    with pytest.raises(IkeProtocolError) as e:
        SaPayload.parse(body)
    assert e.value.notify == Notify.INVALID_SYNTAX


def test_chain_errors_map_to_invalid_syntax():
    with pytest.raises(IkeProtocolError) as e:
        decode_chain(PayloadType.NONCE, b"\x00\x00\x00\x03")  # length below 4
    assert e.value.notify == Notify.INVALID_SYNTAX
    with pytest.raises(IkeProtocolError):
        decode_chain(PayloadType.NONCE, b"\x00\x00\x00\x30" + bytes(20))  # overruns
    with pytest.raises(IkeProtocolError):
        decode_chain(PayloadType.NONCE, b"\x00\x00\x00\x08abcd")  # nonce shorter than 16
    # a payload "loop" is impossible to express, but a long chain is bounded
    many = b"".join(bytes([PayloadType.VENDOR, 0, 0, 4]) for _ in range(100))
    with pytest.raises(IkeProtocolError):
        decode_chain(PayloadType.VENDOR, many)


def test_unknown_critical_payload_rejected_unknown_noncritical_kept():
    first, data = encode_chain([UnknownPayload(200, b"xyz", critical=False),
                                NoncePayload(b"n" * 16)])
    msg = Message(bytes(8), bytes(8), 34, Flag.INITIATOR, 0, decode_chain(first, data))
    msg.check_critical()
    assert msg.payloads[0] == UnknownPayload(200, b"xyz", False)
    first, data = encode_chain([UnknownPayload(200, b"xyz", critical=True)])
    msg.payloads = decode_chain(first, data)
    with pytest.raises(IkeProtocolError) as e:
        msg.check_critical()
    assert e.value.notify == Notify.UNSUPPORTED_CRITICAL_PAYLOAD and e.value.data == bytes([200])


def test_header_errors():
    with pytest.raises(DropMessage):
        Message.parse(bytes(27))
    m = Message(b"\x01" * 8, bytes(8), 34, Flag.INITIATOR, 0, [NoncePayload(b"n" * 16)]).serialize()
    with pytest.raises(DropMessage):
        Message.parse(m + b"\x00")  # length field disagrees with the datagram
    bad = bytearray(m)
    bad[17] = 0x30  # major version 3
    with pytest.raises(IkeProtocolError) as e:
        Message.parse(bytes(bad))
    assert e.value.notify == Notify.INVALID_MAJOR_VERSION


def test_notify_delete_roundtrip_and_repr():
    n = NotifyPayload.parse(bytes.fromhex("0304400900000001") + b"")
    assert (n.protocol, n.spi, n.notify) == (ProtocolId.ESP, b"\0\0\0\1", Notify.REKEY_SA)
    d = DeletePayload.parse(bytes.fromhex("03040002" "c0ffee01" "c0ffee02"))
    assert d.spis == [bytes.fromhex("c0ffee01"), bytes.fromhex("c0ffee02")]
    assert d.body() == bytes.fromhex("03040002c0ffee01c0ffee02")
    with pytest.raises(IkeProtocolError):
        DeletePayload.parse(bytes.fromhex("03040002c0ffee01"))
    assert "REKEY_SA" in repr(n)


def test_higher_major_version_gets_invalid_major_version():
    m = bytearray(Message(b"\x05" * 8, bytes(8), ExchangeType.IKE_SA_INIT, Flag.INITIATOR, 0,
                          [NoncePayload(b"n" * 16)]).serialize())
    m[17] = 0x30
    eng = IkeEngine(TunnelDirectory([], "example.net"), RecordingSaInstaller())
    (out,) = eng.handle(bytes(m), ("192.0.2.1", 500), ("198.51.100.2", 500), 0.0)
    resp = Message.parse(out.data)
    assert out.data[17] == 0x20 and resp.flags == Flag.RESPONSE and resp.spi_i == b"\x05" * 8
    assert [n.notify for n in resp.notifies()] == [Notify.INVALID_MAJOR_VERSION]
    m[19] = Flag.RESPONSE  # never answer a response
    assert eng.handle(bytes(m), ("192.0.2.1", 500), ("198.51.100.2", 500), 0.0) == []

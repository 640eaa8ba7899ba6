"""Fuzz targets for the IKE core, shared by the quick test and ``make fuzz-ike``.

Three targets: (1) mutated datagrams (the capture and our own exchanges as seeds) into the parser
and a responder; (2) arbitrary inner payload chains, correctly encrypted, into IKE_AUTH of a
half-open SA; (3) the same into INFORMATIONAL / CREATE_CHILD_SA of an established SA. The
property: only the documented exceptions leave the parser, and the engine never counts an
internal error (an exception escaping a task).
"""
from __future__ import annotations

from pathlib import Path

from hypothesis import strategies as st
from ike_peers import CUSTOMER, EDGE, TUNNEL, Pair, profile

from pipeline.ike.constants import ExchangeType, Flag, PayloadType
from pipeline.ike.message import DropMessage, Message, encrypt_raw
from pipeline.ike.payloads import (
    AuthPayload,
    DeletePayload,
    IdPayload,
    IkeProtocolError,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Proposal,
    SaPayload,
    TrafficSelector,
    Transform,
    TsPayload,
    UnknownPayload,
    encode_chain,
)

CAPTURE = Path(__file__).resolve().parent.parent.parent / "shared" / "captures" / "ikev2_nat_t.pcapng"


def seed_messages() -> list[bytes]:
    from scapy.all import UDP, rdpcap

    seeds = []
    for pkt in rdpcap(str(CAPTURE)):
        data = bytes(pkt[UDP].payload)
        if data[:4] == b"\0\0\0\0":
            seeds.append(data[4:])
    p = Pair()
    p.start(profile())
    seeds += [d for _, d in p.wire]
    return seeds


SEEDS = seed_messages()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 5))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == 0 and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == 1 and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == 2:
            data = data[: draw(st.integers(0, len(data)))]
        elif op == 3:
            data[pos:pos] = draw(st.binary(max_size=16))
        elif op == 4 and len(data) > pos + 1:
            # rewrite a 16-bit field: payload lengths, transform lengths, counts
            v = draw(st.sampled_from([0, 1, 3, 4, 7, 8, 0xFFFF, len(data), len(data) - pos]))
            data[pos : pos + 2] = (v & 0xFFFF).to_bytes(2, "big")
        elif op == 5 and len(data) >= 28:
            data[24:28] = len(data).to_bytes(4, "big")  # keep the header length consistent
    return bytes(data)


u8 = st.integers(0, 255)
u16 = st.integers(0, 0xFFFF)
small = st.binary(max_size=40)

transforms = st.builds(lambda t, i, kl: Transform(t, i, [(14, kl)] if kl is not None else []),
                       st.integers(0, 6), st.sampled_from([0, 2, 3, 5, 11, 12, 13, 14, 20, 1000]),
                       st.one_of(st.none(), st.sampled_from([0, 128, 192, 256, 65535])))
proposals = st.builds(Proposal, st.integers(0, 3), st.integers(0, 4),
                      st.sampled_from([b"", b"\0\0\0\0", b"\1\2\3\4", b"\x99" * 8, b"\1"]),
                      st.lists(transforms, max_size=6))
selectors = st.builds(TrafficSelector, st.just(7), u8, u16, u16, st.binary(min_size=4, max_size=4),
                      st.binary(min_size=4, max_size=4))
payloads = st.one_of(
    st.builds(SaPayload, st.lists(proposals, min_size=1, max_size=3)),
    st.builds(KePayload, st.sampled_from([0, 2, 5, 14, 19, 20]), st.binary(max_size=300)),
    st.builds(NoncePayload, st.binary(min_size=16, max_size=64)),
    st.builds(IdPayload, st.sampled_from([PayloadType.IDI, PayloadType.IDR]),
              st.sampled_from([1, 2, 3, 5, 11, 77]),
              st.one_of(small, st.just(TUNNEL.key_id()), st.just(b"\xc6\x33\x64\x02"))),
    st.builds(AuthPayload, st.sampled_from([1, 2, 14]), small),
    st.builds(NotifyPayload, st.one_of(u16, st.sampled_from([16384, 16388, 16390, 16391, 16393, 17])),
              small, st.sampled_from([0, 1, 3]), st.sampled_from([b"", b"\0\0\0\1", b"\1" * 8])),
    st.builds(DeletePayload, st.sampled_from([1, 2, 3, 9]),
              st.lists(st.binary(min_size=4, max_size=4), max_size=3)),
    st.builds(TsPayload, st.sampled_from([PayloadType.TSI, PayloadType.TSR]),
              st.lists(selectors, max_size=3)),
    st.builds(UnknownPayload, st.sampled_from([37, 38, 47, 48, 99, 200]), small, st.booleans()),
)


@st.composite
def inner_plaintext(draw) -> tuple[int, bytes]:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from([0, 33, 35, 39, 41, 42, 44, 46, 99])), draw(st.binary(max_size=200))
    return encode_chain(draw(st.lists(payloads, max_size=8)))


def check_parse(data: bytes) -> None:
    try:
        Message.parse(data)
    except (DropMessage, IkeProtocolError):
        pass


class InnerTarget:
    """Encrypt arbitrary inner payload chains with real keys and send them to a responder."""

    def __init__(self) -> None:
        self.pair = Pair()
        self.pair.start(profile())

    def half_open(self):
        p = Pair()
        (req,) = p.init.initiate(profile(), (CUSTOMER, 500), (EDGE, 500), 0.0)
        (resp,) = p.resp.handle(req.data, req.remote, req.local, 0.0)
        p.init.handle(resp.data, resp.remote, resp.local, 0.0)  # returns IKE_AUTH, not sent
        (isa,) = p.init.sas.values()
        return p, isa

    def send(self, p: Pair, isa, exchange: int, msg_id: int, first: int, plain: bytes) -> None:
        msg = Message(isa.spi_i, isa.spi_r, exchange, Flag.INITIATOR, msg_id)
        data = encrypt_raw(msg, first, plain, isa.sk)
        p.resp.handle(data, (EDGE, 500), (CUSTOMER, 500), 1.0)
        assert p.resp.stats["internal_error"] == 0, (exchange, first, plain.hex())

    def auth(self, first: int, plain: bytes) -> None:
        p, isa = self.half_open()
        self.send(p, isa, ExchangeType.IKE_AUTH, 1, first, plain)

    def established(self, exchange: int, first: int, plain: bytes) -> None:
        p = self.pair
        if not p.init.established_sas() or not p.resp.established_sas():
            self.pair = p = Pair()
            p.start(profile())
        (isa,) = p.init.established_sas()
        (rsa,) = p.resp.established_sas()
        self.send(p, isa, exchange, rsa.expected_peer_id, first, plain)

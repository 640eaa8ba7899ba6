"""sa list rows never carry keys; the Wireshark tables carry the right keys in the right form."""
from __future__ import annotations

import csv
import io

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from ike_peers import PSK, Pair, profile

from pipeline.ike.constants import Encr, ExchangeType, Integ
from pipeline.ike.export import sa_rows, wireshark_esp_table, wireshark_ikev2_table
from pipeline.ike.message import Message
from pipeline.ike.payloads import decode_chain
from pipeline.ike.proposal import esp_proposal


def test_sa_rows_have_no_secrets():
    p = Pair()
    p.start(profile(esp=[esp_proposal(Encr.AES_CBC, 128, Integ.HMAC_SHA2_256_128, b"")]))
    (row,) = sa_rows(p.resp, now=5.0)
    (sa,) = p.resp.established_sas()
    (child,) = row["children"]
    installed = p.only_sa(p.ri)
    assert (row["tunnel"], row["state"], row["role"], row["nat_t"]) == ("cust-a", "established",
                                                                        "responder", False)
    assert row["algorithms"] == "AES_GCM_16-256/PRF_HMAC_SHA2_256/ECP_384"
    assert child["spi_in"] == f"{installed.spi_in:08x}" and child["age_s"] == 5.0
    assert child["algorithms"] == "AES_CBC-128/HMAC_SHA2_256_128"
    text = repr(row)
    for secret in (PSK, sa.keys.sk_d, sa.keys.sk_ei, installed.enc_key_in, installed.integ_key_in):
        assert secret.hex() not in text


def test_wireshark_ikev2_table_decrypts_a_captured_message_independently():
    p = Pair()
    p.start(profile())
    (line,) = wireshark_ikev2_table(p.resp).splitlines()
    spi_i, spi_r, _sk_ei, sk_er, encr, sk_ai, sk_ar, integ = next(csv.reader(io.StringIO(line)))
    assert (encr, integ, sk_ai, sk_ar) == ("AES-GCM-256 with 16 octet ICV [RFC5282]",
                                          "NONE [RFC4306]", "", "")
    # decrypt the IKE_AUTH response off the wire with only the exported SK_er (key|salt)
    raw = next(d for dirn, d in p.wire if dirn == "r>i" and d[18] == ExchangeType.IKE_AUTH)
    assert raw[:16].hex() == spi_i + spi_r
    key = bytes.fromhex(sk_er)
    assert len(key) == 36
    iv, ct = raw[32:40], raw[40:]
    plain = AESGCM(key[:32]).decrypt(key[32:] + iv, ct, raw[:32])
    inner = decode_chain(raw[28], plain[: len(plain) - plain[-1] - 1])
    assert [type(x).__name__ for x in inner][:2] == ["IdPayload", "AuthPayload"]
    assert Message.parse(raw).msg_id == 1


def test_wireshark_esp_table_rows():
    p = Pair()
    p.start(profile(esp=[esp_proposal(Encr.AES_CBC, 256, Integ.HMAC_SHA1_96, b"")]))
    rows = list(csv.reader(io.StringIO(wireshark_esp_table(p.resp))))
    sa = p.only_sa(p.ri)
    assert rows == [
        ["IPv4", sa.remote_addr, sa.local_addr, f"0x{sa.spi_in:08x}", "AES-CBC [RFC3602]",
         "0x" + sa.enc_key_in.hex(), "HMAC-SHA-1-96 [RFC2404]", "0x" + sa.integ_key_in.hex()],
        ["IPv4", sa.local_addr, sa.remote_addr, f"0x{sa.spi_out:08x}", "AES-CBC [RFC3602]",
         "0x" + sa.enc_key_out.hex(), "HMAC-SHA-1-96 [RFC2404]", "0x" + sa.integ_key_out.hex()],
    ]
    p = Pair()
    p.start(profile())
    rows = list(csv.reader(io.StringIO(wireshark_esp_table(p.resp))))
    sa = p.only_sa(p.ri)
    assert rows[0][4:] == ["AES-GCM with 16 octet ICV [RFC4106]",
                           "0x" + (sa.enc_key_in + sa.salt_in).hex(), "NULL", ""]

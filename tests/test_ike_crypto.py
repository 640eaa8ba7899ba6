"""IKEv2 crypto against independent known answers (../shared/vectors)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.ike.constants import DhGroup, Encr, Integ, Prf, ProtocolId
from pipeline.ike.crypto import (
    MODP_PRIMES,
    AesCbcHmac,
    AesGcm16,
    CryptoError,
    IntegAlg,
    PrfAlg,
    child_keymat,
    derive_ike_keys,
    dh_generate,
    skeyseed,
    skeyseed_rekey,
)
from pipeline.ike.proposal import Selection
from pipeline.ike.state import split_child_keymat

VECTORS = Path(__file__).resolve().parent.parent.parent / "shared" / "vectors"
PRF_IDS = {"PRF_HMAC_SHA2_256": Prf.HMAC_SHA2_256, "PRF_HMAC_SHA2_384": Prf.HMAC_SHA2_384,
           "PRF_HMAC_SHA2_512": Prf.HMAC_SHA2_512}


def _load(name):
    return json.loads((VECTORS / name).read_text())


KDF = _load("ikev2_kdf.json")["vectors"]
HMAC = _load("hmac_prf.json")
DH = _load("dh.json")["vectors"]
H = bytes.fromhex


@pytest.mark.parametrize("v", HMAC["prf_hmac_sha2"], ids=lambda v: v["id"])
def test_prf_hmac_sha2(v):
    prf = PrfAlg(PRF_IDS[v["alg"]])
    assert prf(H(v["key"]), H(v["data"])) == H(v["output"])


@pytest.mark.parametrize("v", [v for v in HMAC["auth_hmac_sha2"] if v["alg"] == "HMAC-SHA2-256-128"],
                         ids=lambda v: v["id"])
def test_auth_hmac_sha2_256_128(v):
    integ = IntegAlg(Integ.HMAC_SHA2_256_128)
    assert integ.icv(H(v["key"]), H(v["data"])) == H(v["icv"])
    assert integ.icv_size == v["icv_len"] == 16


@pytest.mark.parametrize("v", HMAC["hmac_sha1_rfc2202"], ids=lambda v: v["id"])
def test_hmac_sha1_96(v):
    assert IntegAlg(Integ.HMAC_SHA1_96).icv(H(v["key"]), H(v["data"])) == H(v["icv_96"])


@pytest.mark.parametrize("v", KDF, ids=lambda v: v["id"])
def test_ikev2_kdf(v):
    prf = PrfAlg(PRF_IDS[v["prf"]])
    i = {k: H(x) for k, x in v["inputs"].items()}
    n = v["output_len"]
    if v["kind"] == "skeyseed":
        out = skeyseed(prf, i["ni"], i["nr"], i["g_ir"])
    elif v["kind"] == "skeyseed_rekey":
        out = skeyseed_rekey(prf, i["sk_d_old"], i["g_ir_new"], i["ni"], i["nr"])
    elif v["kind"] == "dkm_ike_sa":
        out = prf.plus(i["skeyseed"], i["ni"] + i["nr"] + i["spi_i"] + i["spi_r"], n)
    elif v["kind"] == "dkm_child_sa":
        out = child_keymat(prf, i["sk_d"], i["ni"], i["nr"], n)
    else:
        out = child_keymat(prf, i["sk_d"], i["ni"], i["nr"], n, i["g_ir_new"])
    assert out == H(v["output"])


def test_ike_keys_split_in_rfc_order():
    """SK_d|SK_ai|SK_ar|SK_ei|SK_er|SK_pi|SK_pr for AES-CBC-256 + SHA2-256: 224 bytes."""
    v = next(x for x in KDF if x["id"] == "openssl-selftest-sha256-dkm")
    i = {k: H(x) for k, x in v["inputs"].items()}
    dkm = H(v["output"])
    keys = derive_ike_keys(PrfAlg(Prf.HMAC_SHA2_256), i["skeyseed"], i["ni"], i["nr"],
                           i["spi_i"], i["spi_r"], integ_key_len=32, encr_key_len=32)
    assert keys.sk_d == dkm[0:32]
    assert keys.sk_ai == dkm[32:64] and keys.sk_ar == dkm[64:96]
    assert keys.sk_ei == dkm[96:128] and keys.sk_er == dkm[128:160]
    assert keys.sk_pi == dkm[160:192] and keys.sk_pr == dkm[192:224]
    assert dkm.hex() not in repr(keys) and keys.sk_d.hex() not in repr(keys)


def test_kdf_chaining():
    """SKEYSEED -> DKM -> SK_d -> child KEYMAT, as the vectors chain them."""
    by_id = {v["id"]: v for v in KDF}
    gen = by_id["openssl-selftest-sha256-skeyseed"]
    dkm = by_id["openssl-selftest-sha256-dkm"]
    child = by_id["openssl-selftest-sha256-child-dkm"]
    assert gen["output"] == dkm["inputs"]["skeyseed"]
    assert dkm["output"][:64] == child["inputs"]["sk_d"]


def _esp(encr, bits, integ=0):
    return Selection(1, ProtocolId.ESP, b"\0\0\1\0", encr, bits, integ)


def test_child_keymat_gcm_includes_salt():
    """RFC 4106 8.1 / RFC 7296 2.17: 20 bytes per direction for GCM-128, 36 for GCM-256."""
    km = H(next(x for x in KDF if x["kind"] == "dkm_child_sa")["output"])
    k = split_child_keymat(_esp(Encr.AES_GCM_16, 128), km[:40])
    assert (k.encr_i, k.encr_r, k.integ_i, k.integ_r) == (km[:20], km[20:40], b"", b"")
    k = split_child_keymat(_esp(Encr.AES_GCM_16, 256), km[:72])
    assert (k.encr_i, k.encr_r) == (km[:36], km[36:72])
    k = split_child_keymat(_esp(Encr.AES_CBC, 128, Integ.HMAC_SHA1_96), km[:72])
    assert (k.encr_i, k.integ_i, k.encr_r, k.integ_r) == (km[:16], km[16:36], km[36:52], km[52:72])
    k = split_child_keymat(_esp(Encr.NULL, 0, Integ.HMAC_SHA2_256_128), km[:64])
    assert (k.encr_i, k.integ_i, k.encr_r, k.integ_r) == (b"", km[:32], b"", km[32:64])


# ------------------------------------------------------------------ Diffie-Hellman


def _rfc3526_prime(bits: int, k: int) -> int:
    """p = 2^n - 2^(n-64) - 1 + 2^64 * (floor(2^(n-130) * pi) + k), pi by Machin's formula."""
    prec = bits - 130 + 64

    def atan_inv(x):
        one = 1 << prec
        total = term = one // x
        n, sign = 1, -1
        while term:
            term //= x * x
            total += sign * (term // (2 * n + 1))
            sign, n = -sign, n + 1
        return total

    pi_scaled = (4 * (4 * atan_inv(5) - atan_inv(239))) >> 64
    return 2**bits - 2 ** (bits - 64) - 1 + 2**64 * (pi_scaled + k)


def test_modp_primes_match_rfc3526_formula():
    assert MODP_PRIMES[DhGroup.MODP_1536] == _rfc3526_prime(1536, 741804)
    assert MODP_PRIMES[DhGroup.MODP_2048] == _rfc3526_prime(2048, 124476)


@pytest.mark.parametrize("v", DH, ids=lambda v: v["id"])
def test_dh_known_answers(v):
    a = dh_generate(v["group"], int(v["private_i"], 16))
    b = dh_generate(v["group"], int(v["private_r"], 16))
    assert a.public == H(v["public_i"])
    assert b.public == H(v["public_r"])
    assert a.shared(b.public) == H(v["shared"])
    assert b.shared(a.public) == H(v["shared"])


@pytest.mark.parametrize("group", [DhGroup.MODP_1536, DhGroup.MODP_2048])
def test_modp_rejects_degenerate_peer_values(group):
    me = dh_generate(group)
    p = MODP_PRIMES[group]
    n = (p.bit_length() + 7) // 8
    for bad in (0, 1, p - 1, p, p + 1):
        with pytest.raises(CryptoError):
            me.shared(bad.to_bytes(n, "big") if bad < 256**n else bytes([255]) * n)
    with pytest.raises(CryptoError):
        me.shared(b"\x02" * (n - 1))


def test_ecp384_rejects_point_off_curve_and_bad_length():
    me = dh_generate(DhGroup.ECP_384)
    with pytest.raises(CryptoError):
        me.shared(b"\x01" * 96)
    with pytest.raises(CryptoError):
        me.shared(me.public[:-1])


def test_dh_private_not_in_repr():
    a = dh_generate(DhGroup.MODP_2048, 0x1234567)
    assert "1234567" not in repr(a) and "MODP_2048" in repr(a)


# ------------------------------------------------------------------ SK payload ciphers


def test_gcm_sk_known_answer_independent():
    """RFC 5282: nonce = salt (last 4 key bytes) | 8-byte IV; checked with AESGCM directly."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = bytes(range(16)) + b"SALT"
    iv = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    aad = b"A" * 32
    c = AesGcm16(128)
    body = c.encrypt(key, b"", aad, b"inner payloads", iv=iv)
    padded = b"inner payloads" + b"\x00\x01"  # 14 bytes + 1 pad + pad length: multiple of 4
    expected = iv + AESGCM(bytes(range(16))).encrypt(b"SALT" + iv, padded, aad)
    assert body == expected
    assert c.decrypt(key, b"", aad, body) == b"inner payloads"
    with pytest.raises(CryptoError):
        c.decrypt(key, b"", b"B" + aad[1:], body)


def test_cbc_hmac_sk_known_answer_independent():
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import hmac as chmac
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    ekey, akey, iv = b"\x11" * 32, b"\x22" * 32, b"\x33" * 16
    prefix = b"P" * 32
    c = AesCbcHmac(256, IntegAlg(Integ.HMAC_SHA2_256_128))
    body = c.encrypt(ekey, akey, prefix, b"hello", iv=iv)
    plain = b"hello" + bytes(10) + b"\x0a"  # 16 bytes: 5 data, 10 pad, pad length 10
    enc = Cipher(algorithms.AES(ekey), modes.CBC(iv)).encryptor()
    ct = iv + enc.update(plain) + enc.finalize()
    h = chmac.HMAC(akey, hashes.SHA256())
    h.update(prefix + ct)
    assert body == ct + h.finalize()[:16]
    assert c.decrypt(ekey, akey, prefix, body) == b"hello"
    tampered = body[:20] + bytes([body[20] ^ 1]) + body[21:]
    with pytest.raises(CryptoError):
        c.decrypt(ekey, akey, prefix, tampered)

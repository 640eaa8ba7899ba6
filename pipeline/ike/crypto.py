"""IKEv2 cryptography: PRFs, prf+, key derivation, Diffie-Hellman groups, SK payload ciphers.

Key derivation follows RFC 7296 sections 2.13-2.18. Secret material lives in ``Secret``-holding
dataclasses whose ``repr`` never shows the bytes.

Diffie-Hellman implementation choice (issue 6): ``cryptography`` 50 deprecates finite-field DH,
so the MODP groups 5 and 14 are implemented here with Python's ``pow()`` on the RFC 3526 primes
(generator 2). The primes are constants below; tests recompute them from the RFC 3526 formula
(2^n - 2^(n-64) - 1 + 2^64 * (floor(2^(n-130) pi) + k)) and check them against the known-answer
vectors, so a transcription error fails loudly. The peer's value is validated (1 < y < p-1,
RFC 6989 section 2.1) before use. ``pow()`` is not constant-time; the private exponent is fresh
per exchange and never reused, which bounds what timing can reveal. ECP-384 (group 20) goes
through ``cryptography``'s ECDH: public value x||y (no 0x04 prefix), shared secret x only
(RFC 5903 sections 7 and 9); the peer point is checked to lie on the curve by ``cryptography``.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .constants import DhGroup, Encr, Integ, Prf


class CryptoError(Exception):
    """Raised for invalid peer key material or a failed integrity check (no secrets inside)."""


# --------------------------------------------------------------------------- PRF and prf+

_PRF_HASH = {
    Prf.HMAC_SHA2_256: "sha256",
    Prf.HMAC_SHA2_384: "sha384",
    Prf.HMAC_SHA2_512: "sha512",
}


class PrfAlg:
    """PRF_HMAC_SHA2_* (RFC 4868 section 2.7.1): key size = output size."""

    def __init__(self, prf_id: int):
        if prf_id not in _PRF_HASH:
            raise ValueError(f"unsupported PRF {prf_id}")
        self.id = Prf(prf_id)
        self.hash = _PRF_HASH[self.id]
        self.size = hashlib.new(self.hash).digest_size

    @property
    def key_size(self) -> int:
        return self.size

    def __call__(self, key: bytes, data: bytes) -> bytes:
        return hmac.digest(key, data, self.hash)

    def plus(self, key: bytes, seed: bytes, length: int) -> bytes:
        """prf+ (RFC 7296 section 2.13): T1 = prf(K, S|0x01), Tn = prf(K, Tn-1|S|n)."""
        if length > 255 * self.size:
            raise ValueError("prf+ output limited to 255 blocks")
        out = bytearray()
        t = b""
        n = 1
        while len(out) < length:
            t = hmac.digest(key, t + seed + bytes([n]), self.hash)
            out += t
            n += 1
        return bytes(out[:length])

    def __repr__(self) -> str:
        return f"PrfAlg({self.id.name})"


# --------------------------------------------------------------------------- integrity

_INTEG = {
    # id: (hash, key length, ICV length)
    Integ.HMAC_SHA2_256_128: ("sha256", 32, 16),
    Integ.HMAC_SHA1_96: ("sha1", 20, 12),
}


class IntegAlg:
    def __init__(self, integ_id: int):
        if integ_id not in _INTEG:
            raise ValueError(f"unsupported integrity algorithm {integ_id}")
        self.id = Integ(integ_id)
        self.hash, self.key_size, self.icv_size = _INTEG[self.id]

    def icv(self, key: bytes, data: bytes) -> bytes:
        return hmac.digest(key, data, self.hash)[: self.icv_size]

    def verify(self, key: bytes, data: bytes, icv: bytes) -> bool:
        return hmac.compare_digest(self.icv(key, data), icv)


# --------------------------------------------------------------------------- Diffie-Hellman

# RFC 3526 section 2 (1536-bit, group 5) and section 3 (2048-bit, group 14); generator 2.
MODP_PRIMES = {
    DhGroup.MODP_1536: int(
        "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0879"
        "8E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B"
        "0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA4836"
        "1C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804"
        "F1746C08CA237327FFFFFFFFFFFFFFFF",
        16,
    ),
    DhGroup.MODP_2048: int(
        "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A0879"
        "8E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B"
        "0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA4836"
        "1C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804"
        "F1746C08CA18217C32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6"
        "955817183995497CEA956AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF",
        16,
    ),
}
MODP_GENERATOR = 2
# Private exponent length in bits: at least twice the group's security strength
# (NIST SP 800-56A; RFC 3526 section 8 estimates ~90-110 bits for 1536/2048-bit groups).
_MODP_EXP_BITS = {DhGroup.MODP_1536: 256, DhGroup.MODP_2048: 256}

SUPPORTED_DH_GROUPS = (DhGroup.ECP_384, DhGroup.MODP_2048, DhGroup.MODP_1536)


def dh_public_size(group: int) -> int:
    if group == DhGroup.ECP_384:
        return 96
    if group in MODP_PRIMES:
        return (MODP_PRIMES[group].bit_length() + 7) // 8
    raise ValueError(f"unsupported DH group {group}")


class DhPrivate:
    """One side of one key exchange. ``public`` is the KE payload data."""

    group: DhGroup
    public: bytes

    def shared(self, peer_public: bytes) -> bytes:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(group={self.group.name})"


class ModpPrivate(DhPrivate):
    def __init__(self, group: int, private: int | None = None):
        self.group = DhGroup(group)
        self._p = MODP_PRIMES[self.group]
        self._len = (self._p.bit_length() + 7) // 8
        if private is None:
            private = secrets.randbits(_MODP_EXP_BITS[self.group]) | (1 << (_MODP_EXP_BITS[self.group] - 1))
        self._x = private
        self.public = pow(MODP_GENERATOR, self._x, self._p).to_bytes(self._len, "big")

    def shared(self, peer_public: bytes) -> bytes:
        if len(peer_public) != self._len:
            raise CryptoError(f"MODP public value has {len(peer_public)} bytes, expected {self._len}")
        y = int.from_bytes(peer_public, "big")
        # RFC 6989 section 2.1: reject 0, 1, p-1 and anything >= p.
        if not 1 < y < self._p - 1:
            raise CryptoError("MODP public value out of range")
        return pow(y, self._x, self._p).to_bytes(self._len, "big")


_EC_CURVES = {DhGroup.ECP_384: (ec.SECP384R1, 48)}


class EcpPrivate(DhPrivate):
    def __init__(self, group: int, private: int | None = None):
        self.group = DhGroup(group)
        curve_cls, self._clen = _EC_CURVES[self.group]
        self._curve = curve_cls()
        if private is None:
            self._key = ec.generate_private_key(self._curve)
        else:
            self._key = ec.derive_private_key(private, self._curve)
        # X9.62 uncompressed point without its 0x04 prefix: x || y (RFC 5903 section 7).
        self.public = self._key.public_key().public_bytes(
            Encoding.X962, PublicFormat.UncompressedPoint
        )[1:]

    def shared(self, peer_public: bytes) -> bytes:
        if len(peer_public) != 2 * self._clen:
            raise CryptoError(f"ECP public value has {len(peer_public)} bytes, expected {2 * self._clen}")
        try:
            peer = ec.EllipticCurvePublicKey.from_encoded_point(self._curve, b"\x04" + peer_public)
            # The exchange result is the x coordinate only (RFC 5903 section 9).
            return self._key.exchange(ec.ECDH(), peer)
        except ValueError as exc:
            raise CryptoError("ECP public value is not a point on the curve") from exc


def dh_generate(group: int, private: int | None = None) -> DhPrivate:
    if group in MODP_PRIMES:
        return ModpPrivate(group, private)
    if group == DhGroup.ECP_384:
        return EcpPrivate(group, private)
    raise ValueError(f"unsupported DH group {group}")


# --------------------------------------------------------------------------- key derivation


def skeyseed(prf: PrfAlg, ni: bytes, nr: bytes, g_ir: bytes) -> bytes:
    """SKEYSEED = prf(Ni | Nr, g^ir) (RFC 7296 section 2.14)."""
    return prf(ni + nr, g_ir)


def skeyseed_rekey(prf: PrfAlg, sk_d_old: bytes, g_ir_new: bytes, ni: bytes, nr: bytes) -> bytes:
    """SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) (RFC 7296 section 2.18)."""
    return prf(sk_d_old, g_ir_new + ni + nr)


@dataclass(frozen=True)
class IkeKeys:
    """SK_d, SK_ai, SK_ar, SK_ei, SK_er, SK_pi, SK_pr (RFC 7296 section 2.14). Never printed."""

    sk_d: bytes = field(repr=False)
    sk_ai: bytes = field(repr=False)
    sk_ar: bytes = field(repr=False)
    sk_ei: bytes = field(repr=False)
    sk_er: bytes = field(repr=False)
    sk_pi: bytes = field(repr=False)
    sk_pr: bytes = field(repr=False)


def derive_ike_keys(
    prf: PrfAlg, seed_key: bytes, ni: bytes, nr: bytes, spi_i: bytes, spi_r: bytes,
    integ_key_len: int, encr_key_len: int,
) -> IkeKeys:
    """{SK_d | SK_ai | SK_ar | SK_ei | SK_er | SK_pi | SK_pr} = prf+(SKEYSEED, Ni|Nr|SPIi|SPIr).

    ``encr_key_len`` includes the salt for AEAD ciphers (RFC 5282 section 7.1).
    """
    n = prf.key_size
    total = 3 * n + 2 * integ_key_len + 2 * encr_key_len
    km = prf.plus(seed_key, ni + nr + spi_i + spi_r, total)
    parts = []
    off = 0
    for size in (n, integ_key_len, integ_key_len, encr_key_len, encr_key_len, n, n):
        parts.append(km[off : off + size])
        off += size
    return IkeKeys(*parts)


def child_keymat(prf: PrfAlg, sk_d: bytes, ni: bytes, nr: bytes, length: int,
                 g_ir_new: bytes = b"") -> bytes:
    """KEYMAT = prf+(SK_d, [g^ir (new) |] Ni | Nr) (RFC 7296 sections 2.17 and 1.3.1)."""
    return prf.plus(sk_d, g_ir_new + ni + nr, length)


# --------------------------------------------------------------------------- SK payload ciphers


class SkCipher:
    """Protection of the Encrypted payload. Subclasses: AEAD (GCM) and encrypt-then-MAC (CBC)."""

    iv_size: int
    icv_size: int
    block_size: int
    encr_key_size: int  # including salt for AEAD
    integ_key_size: int
    aead: bool

    def encrypt(self, ekey: bytes, akey: bytes, aad_or_prefix: bytes, plaintext: bytes) -> bytes:
        raise NotImplementedError

    def decrypt(self, ekey: bytes, akey: bytes, aad_or_prefix: bytes, body: bytes) -> bytes:
        raise NotImplementedError

    def pad(self, inner: bytes) -> bytes:
        """Append padding and the Pad Length byte (RFC 7296 section 3.14)."""
        padlen = (-(len(inner) + 1)) % self.block_size
        return inner + bytes(padlen) + bytes([padlen])

    @staticmethod
    def unpad(data: bytes) -> bytes:
        if not data:
            raise CryptoError("empty encrypted payload")
        padlen = data[-1]
        if padlen + 1 > len(data):
            raise CryptoError("bad pad length")
        return data[: len(data) - padlen - 1]


class AesGcm16(SkCipher):
    """ENCR_AES_GCM_16 for IKEv2 (RFC 5282): 8-byte explicit IV, 4-byte salt, 16-byte ICV.

    AAD is the IKE header through the end of the Encrypted payload header (RFC 5282 section 5.1);
    the nonce is salt (last 4 bytes of SK_e*) | IV.
    """

    iv_size = 8
    icv_size = 16
    block_size = 4  # RFC 5282 section 3: padding to a multiple of 4 is allowed, 1 would do
    integ_key_size = 0
    aead = True

    def __init__(self, key_bits: int):
        if key_bits not in (128, 256):
            raise ValueError("AES-GCM-16 key length must be 128 or 256")
        self.key_bits = key_bits
        self.encr_key_size = key_bits // 8 + 4

    def encrypt(self, ekey, akey, aad, plaintext, iv: bytes | None = None):
        iv = os.urandom(8) if iv is None else iv
        key, salt = ekey[:-4], ekey[-4:]
        return iv + AESGCM(key).encrypt(salt + iv, self.pad(plaintext), aad)

    def decrypt(self, ekey, akey, aad, body):
        if len(body) < self.iv_size + self.icv_size + 1:
            raise CryptoError("encrypted payload too short")
        key, salt = ekey[:-4], ekey[-4:]
        iv, ct = body[:8], body[8:]
        try:
            return self.unpad(AESGCM(key).decrypt(salt + iv, ct, aad))
        except InvalidTag as exc:
            raise CryptoError("ICV mismatch") from exc


class AesCbcHmac(SkCipher):
    """ENCR_AES_CBC + AUTH_HMAC_SHA2_256_128 (RFC 7296 section 3.14, RFC 3602, RFC 4868).

    The ICV covers the message from the first octet of the IKE header through the encrypted data
    (the prefix passed in plus IV and ciphertext).
    """

    iv_size = 16
    block_size = 16
    aead = False

    def __init__(self, key_bits: int, integ: IntegAlg):
        if key_bits not in (128, 256):
            raise ValueError("AES-CBC key length must be 128 or 256")
        self.key_bits = key_bits
        self.encr_key_size = key_bits // 8
        self.integ = integ
        self.integ_key_size = integ.key_size
        self.icv_size = integ.icv_size

    def encrypt(self, ekey, akey, prefix, plaintext, iv: bytes | None = None):
        iv = os.urandom(16) if iv is None else iv
        enc = Cipher(algorithms.AES(ekey), modes.CBC(iv)).encryptor()
        body = iv + enc.update(self.pad(plaintext)) + enc.finalize()
        return body + self.integ.icv(akey, prefix + body)

    def decrypt(self, ekey, akey, prefix, body):
        n = len(body) - self.iv_size - self.icv_size
        if n <= 0 or n % self.block_size:
            raise CryptoError("encrypted payload length is not a multiple of the block size")
        icv = body[-self.icv_size :]
        if not self.integ.verify(akey, prefix + body[: -self.icv_size], icv):
            raise CryptoError("ICV mismatch")
        iv = body[: self.iv_size]
        dec = Cipher(algorithms.AES(ekey), modes.CBC(iv)).decryptor()
        return self.unpad(dec.update(body[self.iv_size : -self.icv_size]) + dec.finalize())


def sk_cipher(encr: int, key_bits: int, integ: int) -> SkCipher:
    if encr == Encr.AES_GCM_16:
        return AesGcm16(key_bits)
    if encr == Encr.AES_CBC:
        return AesCbcHmac(key_bits, IntegAlg(integ))
    raise ValueError(f"unsupported IKE encryption {encr}")

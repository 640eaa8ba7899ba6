"""Views of the IKE state for operators: ``sa list`` rows (never keys) and, only on explicit
request, Wireshark key tables (``ikev2_decryption_table`` and ``esp_sa`` UAT files).

Wireshark's UAT files store enum fields by their label, so the labels below are Wireshark's own
(packet-isakmp.c ``ikev2_encr_algs``/``ikev2_integ_algs``, packet-ipsec.c
``esp_encryption_type_vals``/``esp_authentication_type_vals``). For AES-GCM the key columns carry
the key followed by its 4-byte salt, which is how Wireshark expects them.
"""
from __future__ import annotations

from .constants import DhGroup, Encr, Integ
from .engine import IkeEngine
from .state import ChildSa

_IKE_ENCR = {
    (Encr.AES_GCM_16, 128): "AES-GCM-128 with 16 octet ICV [RFC5282]",
    (Encr.AES_GCM_16, 256): "AES-GCM-256 with 16 octet ICV [RFC5282]",
    (Encr.AES_CBC, 128): "AES-CBC-128 [RFC3602]",
    (Encr.AES_CBC, 256): "AES-CBC-256 [RFC3602]",
}
_IKE_INTEG = {Integ.NONE: "NONE [RFC4306]", Integ.HMAC_SHA2_256_128: "HMAC_SHA2_256_128 [RFC4868]"}
_ESP_ENCR = {Encr.AES_GCM_16: "AES-GCM with 16 octet ICV [RFC4106]", Encr.AES_CBC: "AES-CBC [RFC3602]",
             Encr.NULL: "NULL"}
_ESP_INTEG = {Integ.NONE: "NULL", Integ.HMAC_SHA2_256_128: "HMAC-SHA-256-128 [RFC4868]",
              Integ.HMAC_SHA1_96: "HMAC-SHA-1-96 [RFC2404]"}


def _alg(sa_sel) -> str:
    return sa_sel.describe() if sa_sel is not None else "-"


def sa_rows(engine: IkeEngine, now: float) -> list[dict]:
    """One dict per IKE SA with its Child SAs: SPIs, algorithms, peer, NAT-T, age, bytes."""
    rows = []
    for sa in engine.sas.values():
        rows.append({
            "ike_spi_i": sa.spi_i.hex(), "ike_spi_r": sa.spi_r.hex(), "state": sa.state.value,
            "role": "initiator" if sa.initiator else "responder",
            "tunnel": sa.tunnel.name if sa.tunnel else None,
            "peer": f"{sa.remote[0]}:{sa.remote[1]}", "local": f"{sa.local[0]}:{sa.local[1]}",
            "nat_t": sa.nat_detected, "algorithms": _alg(sa.sel),
            "age_s": round(now - sa.established_at if sa.established_at else now - sa.created, 1),
            "children": [_child_row(c, now) for c in sa.children.values()],
        })
    return rows


def _child_row(c: ChildSa, now: float) -> dict:
    return {"spi_in": f"{c.spi_in:08x}", "spi_out": f"{c.spi_out:08x}", "algorithms": _alg(c.sel),
            "pfs": DhGroup(c.sel.dh).name if c.sel.dh else None, "rekeyed": c.rekeyed,
            "age_s": round(now - c.created, 1), "bytes_in": c.bytes_in, "bytes_out": c.bytes_out,
            "ts_local": [str(t) for t in c.ts_local], "ts_remote": [str(t) for t in c.ts_remote]}


def wireshark_ikev2_table(engine: IkeEngine) -> str:
    """Rows for Wireshark's ``ikev2_decryption_table``. Contains keys: debugging only."""
    lines = []
    for sa in engine.sas.values():
        if sa.keys is None or sa.sel is None:
            continue
        k, s = sa.keys, sa.sel
        lines.append(",".join([
            sa.spi_i.hex(), sa.spi_r.hex(), k.sk_ei.hex(), k.sk_er.hex(),
            f'"{_IKE_ENCR[(Encr(s.encr), s.key_bits)]}"', k.sk_ai.hex(), k.sk_ar.hex(),
            f'"{_IKE_INTEG[Integ(s.integ)]}"']))
    return "".join(line + "\n" for line in lines)


def wireshark_esp_table(engine: IkeEngine) -> str:
    """Rows for Wireshark's ``esp_sa`` table (both directions of every Child SA): keys inside."""
    lines = []
    for sa in engine.sas.values():
        for c in sa.children.values():
            p = c.params(sa)
            for src, dst, spi, ekey, salt, akey in (
                    (p.remote_addr, p.local_addr, p.spi_in, p.enc_key_in, p.salt_in, p.integ_key_in),
                    (p.local_addr, p.remote_addr, p.spi_out, p.enc_key_out, p.salt_out,
                     p.integ_key_out)):
                lines.append(",".join([
                    '"IPv4"', f'"{src}"', f'"{dst}"', f'"0x{spi:08x}"',
                    f'"{_ESP_ENCR[Encr(c.sel.encr)]}"', f'"0x{(ekey + salt).hex()}"',
                    f'"{_ESP_INTEG[Integ(c.sel.integ)]}"',
                    f'"0x{akey.hex()}"' if akey else '""']))
    return "".join(line + "\n" for line in lines)


__all__ = ["sa_rows", "wireshark_esp_table", "wireshark_ikev2_table"]

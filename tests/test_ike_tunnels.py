"""Tunnel lookup by ID type, and the adapter from the configuration module."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import config
from pipeline.ike.constants import IdType
from pipeline.ike.tunnels import IkeTunnel, TunnelDirectory, from_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "edge.toml"


def test_from_config_example():
    cfg = config.load(EXAMPLE)
    d = from_config(cfg)
    t = d.lookup(IdType.FQDN, b"f5407d8db1a542b196c59f6d04ba8bd1.123456789.ipsec.example.net",
                 "192.0.2.2")
    assert t is not None and t.name == "site-b"
    assert t.psk_bytes == cfg.tunnel("site-b").psk.reveal() and t.psk_bytes
    assert (t.edge_endpoint, t.customer_endpoint, t.child_lifetime, t.replay_protection) == (
        "192.0.2.2", "203.0.113.20", 3600, False)
    assert t.psk_bytes.hex() not in repr(t) and repr(t.psk_bytes) not in repr(t)
    assert d.lookup(IdType.KEY_ID, b"123456789_f5407d8db1a542b196c59f6d04ba8bd1", "x") is t
    assert d.lookup(IdType.RFC822_ADDR,
                    b"ipsec@F5407D8DB1A542B196C59F6D04BA8BD1.123456789.ipsec.example.net", "x") is t
    assert d.lookup(IdType.IPV4_ADDR, bytes([203, 0, 113, 20]), "192.0.2.2") is t
    assert d.lookup(IdType.IPV4_ADDR, bytes([203, 0, 113, 20]), "192.0.2.1") is None
    assert d.edge_id(t) == (IdType.FQDN, b"f5407d8db1a542b196c59f6d04ba8bd1.123456789.ipsec.example.net")


@pytest.mark.parametrize("id_type,data", [
    (IdType.FQDN, b"ipsec@a.1.ipsec.example.net"),        # an e-mail string with the FQDN type
    (IdType.RFC822_ADDR, b"a.1.ipsec.example.net"),        # no "ipsec@"
    (IdType.KEY_ID, b"a.1.ipsec.example.net"),
    (IdType.FQDN, b"1_a"),
    (IdType.IPV6_ADDR, bytes(16)),
    (IdType.DER_ASN1_DN, b"0\x00"),
    (IdType.FQDN, b"\xff\xfe"),
    (IdType.IPV4_ADDR, b"198.51.100.2"),                   # text, not 4 bytes
])
def test_lookup_goes_by_type_byte_never_by_string_shape(id_type, data):
    t = IkeTunnel(name="a", tunnel_id="a", account_id="1", edge_endpoint="192.0.2.1",
                  customer_endpoint="198.51.100.2", psk=b"k")
    assert TunnelDirectory([t], "example.net").lookup(id_type, data, "192.0.2.1") is None


def test_child_lifetime_bounds():
    with pytest.raises(ValueError):
        IkeTunnel(name="a", tunnel_id="a", account_id="1", edge_endpoint="x", child_lifetime=60)

"""Configuration of pinned IPsec tunnels: `[node] fleet_address`, `[[fleet.nodes]]`, the
tunnel's `pin_node`, their checks, and the pin through the store (config push)."""
from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from pipeline.config import ConfigError, FleetNode, loads
from pipeline.fleet_config import documents
from pipeline.store.schema import decode_tunnel, encode_tunnel
from pipeline.xdp.dataplane import (
    DECAP_FLEET_PEER,
    EP_FLEET,
    EP_TUNNEL,
    KIND_GRE,
    TUN_F_PIN_FWD,
    _be32,
    desired_state,
)

ENV = {"PSK": "p" * 20}


def text(node_extra: str = 'fleet_address = "172.31.0.2"', tunnel_extra: str = "pin_node = 1",
         fleet: str | None = None) -> str:
    if fleet is None:
        fleet = ('[[fleet.nodes]]\nid = 1\naddress = "172.31.0.1"\n'
                 '[[fleet.nodes]]\nid = 2\naddress = "172.31.0.2"\n')
    return f"""
[node]
id = 2
name = "b"
ipsec_domain = "ipsec.example.net"
tunnel_endpoints = ["192.0.2.1"]
{node_extra}

[[node.interfaces]]
name = "eth0"
role = "both"

[tunnels.ipsec.site]
id = "site"
account_id = "acct"
index = 7
edge_endpoint = "192.0.2.1"
interface_address = "10.255.0.0/31"
psk_env = "PSK"
{tunnel_extra}

[[routes]]
prefix = "10.10.1.0/24"
tunnel = "site"

{fleet}
"""


def errors(t: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as e:
        loads(t, file="f.toml", env=ENV)
    return [(x.field, x.message) for x in e.value.errors]


def test_pinned_tunnel_and_fleet_are_read():
    cfg = loads(text(), file="f.toml", env=ENV)
    assert cfg.node.fleet_address == IPv4Address("172.31.0.2")
    assert cfg.fleet_nodes == (FleetNode(1, IPv4Address("172.31.0.1")),
                               FleetNode(2, IPv4Address("172.31.0.2")))
    assert cfg.ipsec_tunnels[0].pin_node == 1
    assert cfg.fleet_address_of(1) == IPv4Address("172.31.0.1")
    assert cfg.fleet_address_of(2) == IPv4Address("172.31.0.2")
    assert cfg.fleet_address_of(3) is None


def test_defaults_unpinned_no_fleet():
    cfg = loads(text(node_extra="", tunnel_extra="", fleet=""), file="f.toml", env=ENV)
    assert (cfg.node.fleet_address, cfg.fleet_nodes, cfg.ipsec_tunnels[0].pin_node) == (
        None, (), None)


@pytest.mark.parametrize("kw,want", [
    ({"node_extra": ""},
     [("fleet.nodes[1].address", ("this node (id 2): 172.31.0.2 differs from "
                                  "node.fleet_address (not set)"))]),
    ({"node_extra": "", "fleet": ""},
     [("tunnels.ipsec.site.pin_node", ("a pinned tunnel needs this node's node.fleet_address "
                                       "(fleet traffic in GRE)"))]),
    ({"tunnel_extra": "pin_node = 5"},
     [("tunnels.ipsec.site.pin_node", ("node 5 is not this node (id 2) and not in "
                                       "[[fleet.nodes]] (ids: 1, 2)"))]),
    ({"tunnel_extra": "pin_node = 70000"},
     [("tunnels.ipsec.site.pin_node", "must be between 0 and 65535, got 70000")]),
    ({"tunnel_extra": 'pin_node = "a"'},
     [("tunnels.ipsec.site.pin_node", "expected an integer, got string 'a'")]),
    ({"node_extra": 'fleet_address = "192.0.2.1"', "fleet": ""},
     [("node.fleet_address", ("192.0.2.1 is one of tunnel_endpoints: the fleet address must "
                              "be this node's own unicast address"))]),
    ({"node_extra": 'fleet_address = "224.0.0.1"', "fleet": ""},
     [("node.fleet_address", "not a unicast address (multicast): '224.0.0.1'")]),
    ({"fleet": '[[fleet.nodes]]\nid = 1\naddress = "172.31.0.1"\n'
               '[[fleet.nodes]]\nid = 1\naddress = "172.31.0.3"\n'},
     [("fleet.nodes[1].id", "node id 1 already listed as fleet.nodes[0]")]),
    ({"fleet": '[[fleet.nodes]]\nid = 1\naddress = "172.31.0.1"\n'
               '[[fleet.nodes]]\nid = 3\naddress = "172.31.0.1"\n'},
     [("fleet.nodes[1].address", "172.31.0.1 already listed as fleet.nodes[0]")]),
    ({"fleet": '[[fleet.nodes]]\nid = 1\naddress = "172.31.0.2"\n'},
     [("fleet.nodes[0].address", "172.31.0.2 is this node's fleet_address, listed for node 1")]),
    ({"fleet": '[[fleet.nodes]]\nid = 1\naddress = "192.0.2.1"\n'},
     [("fleet.nodes[0].address", ("192.0.2.1 is one of node.tunnel_endpoints (the anycast "
                                  "address): a fleet address is one node's own"))]),
    ({"fleet": '[[fleet.nodes]]\nid = 1\nadress = "172.31.0.1"\n'},
     [("fleet.nodes[0].address", "missing (required)"),
      ("fleet.nodes[0].adress", "unknown key (did you mean 'address'?)")]),
    ({"fleet": "[fleet]\nnode = 1\n"},
     [("fleet.node", "unknown key (did you mean 'nodes'?)")]),
], ids=["own-entry-without-address", "no-own-address", "unknown-node", "range", "type", "anycast-as-fleet", "multicast",
        "dup-id", "dup-address", "own-address-elsewhere", "endpoint-listed", "typo",
        "fleet-typo"])
def test_errors(kw, want):
    assert errors(text(**kw)) == want


def test_pin_node_only_on_ipsec_tunnels():
    t = text() + """
[tunnels.gre.g]
id = "g"
customer_endpoint = "198.51.100.10"
edge_endpoint = "192.0.2.1"
interface_address = "10.255.0.2/31"
pin_node = 1
"""
    assert errors(t) == [("tunnels.gre.g.pin_node", "unknown key (did you mean 'index'?)")]


def test_pin_goes_through_the_store_record():
    cfg = loads(text(), file="f.toml", env=ENV)
    rec = decode_tunnel("k", encode_tunnel(cfg.ipsec_tunnels[0]))
    assert rec["pin_node"] == 1
    doc = documents([rec], list(cfg.routes))
    assert doc["tunnels"]["ipsec"]["site"]["pin_node"] == 1
    unpinned = loads(text(tunnel_extra=""), file="f.toml", env=ENV)
    assert "pin_node" not in decode_tunnel("k", encode_tunnel(unpinned.ipsec_tunnels[0]))


def test_desired_maps():
    """B (id 2) with the tunnel pinned to A (id 1): the tunnel entry's flag and node, A's GRE
    entry, A's fleet-peer decap entry, B's fleet address among its endpoints."""
    st = desired_state(loads(text(), file="f.toml", env=ENV))
    a, b, any_ = (_be32(IPv4Address(x)) for x in ("172.31.0.1", "172.31.0.2", "192.0.2.1"))
    assert st.endpoints == {any_: EP_TUNNEL, b: EP_FLEET}
    assert st.decap == {(b, a, 0, 0): DECAP_FLEET_PEER}
    assert st.pin_nodes == {1: (KIND_GRE, 0, b, a, 0, 0, 0, 64, 0)}
    assert st.tunnels[7][1] == TUN_F_PIN_FWD and st.tunnels[7][8] == 1
    here = desired_state(loads(text(tunnel_extra="pin_node = 2"), file="f.toml", env=ENV))
    assert here.tunnels[7][1] == 0 and here.tunnels[7][8] == 0     # pinned here: encrypt


def test_config_check_shows_the_fleet_and_the_pin():
    from pipeline.commands.config import summary
    lines = summary(loads(text(), file="f.toml", env=ENV))
    assert "fleet       this node 172.31.0.2; others 1=172.31.0.1" in lines
    row = next(line for line in lines if line.startswith("site "))
    assert row.endswith("pinned-to-node=1")

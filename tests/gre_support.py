"""Shared pieces of the GRE data plane tests: configs and the compiled program."""
from __future__ import annotations

from pipeline.config import loads

EDGE = "192.0.2.1"
CUSTOMER = "198.51.100.10"
CUSTOMER2 = "198.51.100.20"


def config(node: str = "edge-test", interfaces: tuple[str, ...] = ("eth0",), extra: str = "",
           routes: str | None = None) -> object:
    return loads(toml(node, interfaces, extra, routes), file="test.toml")


def toml(node: str = "edge-test", interfaces: tuple[str, ...] = ("eth0",), extra: str = "",
         routes: str | None = None) -> str:
    ifs = "\n".join(f"[[node.interfaces]]\nname = \"{i}\"\nrole = \"both\"\n" for i in interfaces)
    if routes is None:
        routes = """
[[routes]]
prefix = "203.0.113.0/24"
tunnel = "keyed"
[[routes]]
prefix = "2001:db8:100::/48"
tunnel = "keyed"
[[routes]]
prefix = "203.0.113.128/25"
tunnel = "plain"
priority = 50
[[routes]]
prefix = "203.0.113.128/25"
tunnel = "keyed"
priority = 200
[[routes]]
prefix = "198.18.0.0/24"
tunnel = "keyed"
[[routes]]
prefix = "198.18.0.0/24"
tunnel = "other"
"""
    return f"""
[node]
id = 1
name = "{node}"
ipsec_domain = "ipsec.example.net"
tunnel_endpoints = ["{EDGE}"]
{ifs}
[tunnels.gre.plain]
id = "t-plain"
index = 1
customer_endpoint = "{CUSTOMER}"
edge_endpoint = "{EDGE}"
interface_address = "10.200.0.0/31"

[tunnels.gre.keyed]
id = "t-keyed"
index = 2
customer_endpoint = "{CUSTOMER}"
edge_endpoint = "{EDGE}"
interface_address = "10.200.0.2/31"
key = 42

[tunnels.gre.other]
id = "t-other"
index = 3
customer_endpoint = "{CUSTOMER2}"
edge_endpoint = "{EDGE}"
interface_address = "10.200.0.4/31"
{extra}
{routes}
"""

"""Config loader: good files load into exact values, every rule rejects with a named field, and a
pre-shared key never shows up in an error, a repr or the CLI output."""
from __future__ import annotations

import copy
import json
import pickle
import re
import shutil
import subprocess
import traceback
from ipaddress import IPv4Address, IPv4Interface, ip_network
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipeline import config as C
from pipeline.cli import cli
from pipeline.secret import Secret
from pipeline.store.crypto import FleetKey

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
EDGE_PSK = b"sw-test-psk-0123456789"
PSK = "correct-horse-battery-staple-77"          # used by the generated files below


# --- a tiny TOML writer for the subset the config uses (tables, arrays of tables, scalars) -----

def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _val(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_val(x) for x in v) + "]"
    raise TypeError(type(v))


def _is_aot(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def dump(d: dict, prefix: str = "") -> str:
    lines = [f"{_key(k)} = {_val(v)}" for k, v in d.items()
             if not isinstance(v, dict) and not _is_aot(v)]
    for k, v in d.items():
        path = f"{prefix}.{_key(k)}" if prefix else _key(k)
        if isinstance(v, dict):
            lines += [f"[{path}]", dump(v, path)]
        elif _is_aot(v):
            for item in v:
                lines += [f"[[{path}]]", dump(item, path)]
    return "\n".join(lines)


BASE = {
    "node": {
        "id": 3, "name": "edge-test", "ipsec_domain": "example.net",
        "tunnel_endpoints": ["192.0.2.1", "192.0.2.2"],
        "interfaces": [{"name": "eth0", "role": "internet"},
                       {"name": "eth1", "role": "customer", "xdp_mode": "generic"}],
    },
    "tunnels": {
        "gre": {
            "site-a": {"id": "gre-a", "customer_endpoint": "198.51.100.10",
                       "edge_endpoint": "192.0.2.1", "interface_address": "10.200.0.0/31"},
        },
        "ipsec": {
            "site-b": {"id": "f5407d8db1a542b196c59f6d04ba8bd1", "account_id": "123456789",
                       "customer_endpoint": "203.0.113.20", "edge_endpoint": "192.0.2.2",
                       "interface_address": "10.200.0.2/31", "psk_file": "site-b.psk"},
        },
    },
    "routes": [{"prefix": "203.0.113.128/25", "tunnel": "site-a"},
               {"prefix": "10.10.1.0/24", "tunnel": "site-b", "priority": 50}],
}


@pytest.fixture
def write(tmp_path):
    """write(doc_or_text) -> path of a config file next to a valid site-b.psk."""
    (tmp_path / "site-b.psk").write_text(PSK + "\n")

    def _write(doc, name: str = "cfg.toml") -> Path:
        p = tmp_path / name
        p.write_text(doc if isinstance(doc, str) else dump(doc))
        return p
    return _write


def base() -> dict:
    return copy.deepcopy(BASE)


def errors_of(path: Path, env=None) -> list[tuple[str | None, str]]:
    with pytest.raises(C.ConfigError) as ei:
        C.load(path, env=env if env is not None else {})
    for e in ei.value.errors:
        assert e.file == str(path)
    return [(e.field, e.message) for e in ei.value.errors]


def only_error(path: Path, env=None) -> tuple[str | None, str]:
    errs = errors_of(path, env)
    assert len(errs) == 1, errs
    return errs[0]


# --- good files ------------------------------------------------------------------------------

def test_edge_example_loads_exact_values():
    cfg = C.load(EXAMPLES / "edge.toml", env={})
    n = cfg.node
    assert (n.id, n.name, n.ipsec_domain) == (1, "edge-ams-1", "example.net")
    assert n.tunnel_endpoints == (IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2"))
    assert n.interfaces == (C.Interface("eth0", "internet", "native"),
                            C.Interface("eth1", "customer", "generic"))
    (gre,) = cfg.gre_tunnels
    assert gre == C.GreTunnel(
        name="site-a", id="c4a7362d577a6c3019a474fd6f485821", index=1,
        customer_endpoint=IPv4Address("198.51.100.10"), edge_endpoint=IPv4Address("192.0.2.1"),
        interface_address=IPv4Interface("10.200.0.0/31"), key=42, ttl=64, mtu=1476, mss=1436,
        index_configured=True, description="Site A, primary router")
    (ips,) = cfg.ipsec_tunnels
    assert ips.psk.reveal() == EDGE_PSK      # trailing newline of the file stripped
    assert ips.psk_source == f"file:{EXAMPLES / 'keys' / 'site-b.psk'}"
    assert (ips.name, ips.id, ips.account_id, ips.index) == (
        "site-b", "f5407d8db1a542b196c59f6d04ba8bd1", "123456789", 2)
    assert ips.customer_endpoint == IPv4Address("203.0.113.20")
    assert ips.interface_address == IPv4Interface("10.200.0.2/31")
    assert (ips.ttl, ips.mtu, ips.mss) == (64, 1436, 1360)
    assert (ips.allow_null_cipher, ips.replay_protection) == (False, False)
    assert (ips.ike_lifetime, ips.child_lifetime, ips.dpd_interval, ips.dpd_timeout) == (
        28800, 3600, 30, 150)
    assert ips.identities == C.IkeIdentities(
        "f5407d8db1a542b196c59f6d04ba8bd1.123456789.ipsec.example.net",
        "ipsec@f5407d8db1a542b196c59f6d04ba8bd1.123456789.ipsec.example.net",
        b"123456789_f5407d8db1a542b196c59f6d04ba8bd1")
    assert cfg.routes == (
        C.Route(ip_network("203.0.113.128/25"), "site-a", 100),
        C.Route(ip_network("203.0.113.128/25"), "site-b", 200),
        C.Route(ip_network("10.10.1.0/24"), "site-b", 100),
        C.Route(ip_network("2001:db8:100::/48"), "site-a", 100),
    )
    assert cfg.state == C.SqliteState(Path("/var/lib/xtransit/state.db"))
    assert cfg.analytics == C.Analytics(1000, IPv4Address("127.0.0.1"), 9469, 60, 2592000)
    assert [t.name for t in cfg.tunnels] == ["site-a", "site-b"]
    assert cfg.tunnel("site-b") is ips
    assert cfg.routes_for("site-a") == (cfg.routes[0], cfg.routes[3])
    with pytest.raises(KeyError):
        cfg.tunnel("nope")


def test_minimal_example_defaults():
    cfg = C.load(EXAMPLES / "minimal.toml", env={})
    assert cfg.node.interfaces == (C.Interface("eth0", "both", "native"),)
    assert (cfg.gre_tunnels, cfg.ipsec_tunnels, cfg.routes) == ((), (), ())
    assert cfg.state == C.SqliteState(Path("/var/lib/xtransit/state.db"))
    assert cfg.analytics == C.Analytics(1000, IPv4Address("127.0.0.1"), 9469, 60, 30 * 86400)


@pytest.fixture
def etcd_example(tmp_path) -> Path:
    """examples/ copied, with the fleet key made owner-only (git cannot record mode 0600)."""
    ex = tmp_path / "examples"
    shutil.copytree(EXAMPLES, ex)
    (ex / "keys" / "fleet.key").chmod(0o600)
    return ex / "etcd.toml"


def test_fleet_example_env_psk_and_assigned_indexes():
    cfg = C.load(EXAMPLES / "fleet.toml", env={"SITE_C_PSK": "  " + PSK + "\n"})
    assert [(t.name, t.index, t.index_configured) for t in cfg.tunnels] == [
        ("branch-1", 1, False), ("branch-2", 2, False), ("site-c", 3, False)]
    b2 = cfg.tunnel("branch-2")
    assert (b2.mtu, b2.mss, b2.key) == (1400, 1360, None)   # mss follows a lowered mtu
    c = cfg.tunnel("site-c")
    assert c.customer_endpoint is None
    assert c.psk.reveal() == PSK.encode() and c.psk_source == "env:SITE_C_PSK"
    assert cfg.state == C.SqliteState(Path("/var/lib/xtransit/state.db"))
    assert [(r.prefix, r.tunnel, r.priority) for r in cfg.routes_for("branch-2")] == [
        (ip_network("172.21.0.0/16"), "branch-2", 100)]


def test_etcd_example_loads_the_fleet_key_through_the_store(etcd_example):
    cfg = C.load(etcd_example, env={})
    s = cfg.state
    assert isinstance(s, C.EtcdState)
    assert s.endpoints == ("http://127.0.0.1:2379",) and s.prefix == "/xtransit/"
    assert s.fleet_key_file == etcd_example.parent / "keys" / "fleet.key"
    material = b"example-fleet-key-do-not-use-in-production-0123456789"
    assert s.fleet_key.key_id == FleetKey(Secret(material)).key_id
    assert s.fleet_key.open(FleetKey(material).seal(b"x", "/k"), "/k") == b"x"
    assert material.decode() not in repr(cfg)
    assert (s.ca_file, s.cert_file, s.key_file) == (None, None, None)


def test_cli_check_etcd_example(etcd_example):
    r = CliRunner().invoke(cli, ["config", "check", str(etcd_example)])
    assert r.exit_code == 0, r.output
    key = etcd_example.parent / "keys" / "fleet.key"
    assert (f"state       etcd http://127.0.0.1:2379 prefix /xtransit/ (no tls, fleet key from "
            f"{key})") in r.stdout.splitlines()
    assert "example-fleet-key" not in r.output


def test_fleet_key_readable_by_others_is_refused_like_the_store_does(etcd_example):
    key = etcd_example.parent / "keys" / "fleet.key"
    key.chmod(0o644)
    assert only_error(etcd_example) == (
        "state.fleet_key_file",
        (f"fleet key file '{key}' has mode 0644: it must be readable by its owner only "
        f"(chmod 600 '{key}')"))


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_every_example_is_valid(tmp_path, name):
    """Every shipped example loads (etcd.toml once its fleet key is owner-only, as it says)."""
    ex = tmp_path / "examples"
    shutil.copytree(EXAMPLES, ex)
    (ex / "keys" / "fleet.key").chmod(0o600)
    cfg = C.load(ex / name, env={"SITE_C_PSK": PSK})
    assert cfg.node.interfaces


def test_generated_base_defaults(write):
    cfg = C.load(write(base()), env={})
    gre, ips = cfg.tunnel("site-a"), cfg.tunnel("site-b")
    assert (gre.key, gre.ttl, gre.mtu, gre.mss) == (None, 64, 1476, 1436)
    assert (ips.ttl, ips.mtu, ips.mss) == (64, 1436, 1360)
    assert (ips.ike_lifetime, ips.child_lifetime, ips.dpd_interval, ips.dpd_timeout) == (
        8 * 3600, 3600, 30, 150)
    assert ips.psk.reveal() == PSK.encode()
    assert cfg.routes[1] == C.Route(ip_network("10.10.1.0/24"), "site-b", 50)


def test_auto_index_takes_lowest_free_gre_first_then_by_name(write):
    d = base()
    d["tunnels"]["gre"]["site-z"] = {"id": "gre-z", "customer_endpoint": "198.51.100.11",
                                     "edge_endpoint": "192.0.2.1",
                                     "interface_address": "10.200.0.4/31", "index": 1}
    d["tunnels"]["gre"]["site-0"] = {"id": "gre-0", "customer_endpoint": "198.51.100.12",
                                     "edge_endpoint": "192.0.2.1",
                                     "interface_address": "10.200.0.6/31"}
    d["tunnels"]["ipsec"]["site-b"]["index"] = 3
    cfg = C.load(write(d), env={})
    assert [(t.name, t.index, t.index_configured) for t in cfg.tunnels] == [
        ("site-z", 1, True), ("site-0", 2, False), ("site-b", 3, True), ("site-a", 4, False)]


def test_same_gre_endpoints_with_distinct_keys_are_fine(write):
    d = base()
    d["tunnels"]["gre"]["site-a"]["key"] = 1
    d["tunnels"]["gre"]["site-a2"] = dict(d["tunnels"]["gre"]["site-a"], id="gre-a2", key=2,
                                          interface_address="10.200.0.4/31")
    cfg = C.load(write(d), env={})
    assert [t.key for t in cfg.gre_tunnels] == [1, 2]


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    sub = tmp_path / "conf"
    sub.mkdir()
    (sub / "site-b.psk").write_text(PSK)
    d = base()
    d["state"] = {"backend": "sqlite", "path": "state/x.db"}
    (sub / "edge.toml").write_text(dump(d))
    cfg = C.load(sub / "edge.toml", env={})
    assert cfg.state.path == sub / "state" / "x.db"
    assert cfg.tunnel("site-b").psk.reveal() == PSK.encode()


# --- file-level errors -----------------------------------------------------------------------

def test_file_not_found(tmp_path):
    p = tmp_path / "nope.toml"
    assert only_error(p) == (None, "file not found")
    assert str(pytest.raises(C.ConfigError, C.load, p).value) == f"{p}: file not found"


def test_directory(tmp_path):
    assert only_error(tmp_path) == (None, "is a directory, not a config file")


def test_toml_syntax_error_names_the_line(write):
    p = write("[node]\nid = 1\nname = \"x\nipsec_domain = \"a.b\"\n")
    field, msg = only_error(p)
    assert field is None
    assert msg.startswith("TOML syntax error: ") and "line 3" in msg


def test_not_utf8(write, tmp_path):
    p = tmp_path / "bin.toml"
    p.write_bytes(b"[node]\nname = \"\xff\"\n")
    assert only_error(p) == (None, "not UTF-8 text (byte 15)")


def test_missing_node(write):
    assert only_error(write("")) == ("node", "missing (required): add a [node] table")


# --- one rule per case: (mutation, field, exact message) --------------------------------------

def _set(path: str, value):
    """A mutation setting d[a][b]... = value; value None deletes the key."""
    def m(d):
        *parents, last = path.split("/")
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        if value is None:
            del d[last]
        else:
            d[last] = value
    return m


def _gre_b(**kw):
    def m(d):
        d["tunnels"]["gre"]["site-c"] = {"id": "gre-c", "customer_endpoint": "198.51.100.30",
                                         "edge_endpoint": "192.0.2.1",
                                         "interface_address": "10.200.0.8/31", **kw}
    return m


G = "tunnels/gre/site-a/"
I = "tunnels/ipsec/site-b/"
GF = "tunnels.gre.site-a."
IF = "tunnels.ipsec.site-b."

CASES = [
    # node
    (_set("node/id", 65536), "node.id", "must be between 0 and 65535, got 65536"),
    (_set("node/id", True), "node.id", "expected an integer, got true"),
    (_set("node/id", "1"), "node.id", "expected an integer, got string '1'"),
    (_set("node/name", "edge_1"), "node.name",
     "not a DNS label (letters, digits and '-', at most 63): 'edge_1'"),
    (_set("node/ipsec_domain", "localhost"), "node.ipsec_domain",
     "not a DNS domain name: 'localhost'"),
    (_set("node/tunnel_endpoints", []), "node.tunnel_endpoints", "must not be empty"),
    (_set("node/tunnel_endpoints", ["192.0.2.1", "192.0.2.1"]), "node.tunnel_endpoints",
     "listed twice: '192.0.2.1'"),
    (_set("node/tunnel_endpoints", ["192.0.2.1", "192.0.2"]), "node.tunnel_endpoints",
     "item 1: not an IPv4 address: '192.0.2'"),
    (_set("node/tunnel_endpoints", "192.0.2.1"), "node.tunnel_endpoints",
     "expected an array, got string '192.0.2.1'"),
    (_set("node/interfaces", None), "node.interfaces",
     "missing (required): add at least one [[node.interfaces]]"),
    (_set("node/interfaces", []), "node.interfaces",
     "must not be empty: add at least one [[node.interfaces]]"),
    (_set("node/interfaces/1/name", "eth0"), "node.interfaces[1].name",
     "interface 'eth0' already listed as node.interfaces[0]"),
    (_set("node/interfaces/0/name", "a-very-long-interface"), "node.interfaces[0].name",
     ("not a Linux interface name (at most 15 characters, no '/', ':' or spaces): "
     "'a-very-long-interface'")),
    (_set("node/interfaces/0/role", "wan"), "node.interfaces[0].role",
     "must be one of 'internet', 'customer', 'both', got 'wan'"),
    (_set("node/interfaces/0/xdp_mode", "offload"), "node.interfaces[0].xdp_mode",
     "must be one of 'native', 'generic', got 'offload'"),
    (_set("node/interfaces/0/role", "customer"), "node.interfaces",
     'no interface faces the internet (role "internet" or "both"): tunnels could not arrive'),
    # unknown keys everywhere
    (_set("colour", "blue"), "colour",
     "unknown key; known keys: analytics, fleet, node, routes, state, tunnels"),
    (_set("node/tunnel_endpoint", ["192.0.2.1"]), "node.tunnel_endpoint",
     "unknown key (did you mean 'tunnel_endpoints'?)"),
    (_set("node/interfaces/0/mtu", 1500), "node.interfaces[0].mtu",
     "unknown key; known keys: name, role, xdp_mode"),
    (_set(G + "costumer_endpoint", "1.2.3.4"), GF + "costumer_endpoint",
     "unknown key (did you mean 'customer_endpoint'?)"),
    (_set(I + "replay_protect", True), IF + "replay_protect",
     "unknown key (did you mean 'replay_protection'?)"),
    (_set("tunnels/l2tp", {}), "tunnels.l2tp", "unknown key; known keys: gre, ipsec"),
    (_set(G + "cloudflare_gre_endpoint", "192.0.2.1"), GF + "cloudflare_gre_endpoint",
     "this file calls it edge_endpoint"),
    (_set(I + "name", "site-b"), IF + "name",
     "the tunnel's name is its table name: [tunnels.<kind>.<name>]"),
    (_set("routes/0/weight", 5), "routes[0].weight",
     "unknown key; known keys: prefix, priority, tunnel"),
    # GRE fields
    (_set(G + "customer_endpoint", "10.0.0.300"), GF + "customer_endpoint",
     "not an IPv4 address: '10.0.0.300'"),
    (_set(G + "customer_endpoint", "224.0.0.5"), GF + "customer_endpoint",
     "not a unicast address (multicast): '224.0.0.5'"),
    (_set(G + "customer_endpoint", "2001:db8::1"), GF + "customer_endpoint",
     "not an IPv4 address: '2001:db8::1'"),
    (_set(G + "customer_endpoint", None), GF + "customer_endpoint", "missing (required)"),
    (_set(G + "id", None), GF + "id", "missing (required)"),
    (_set(G + "description", "two\nlines"), GF + "description",
     "must be one line of at most 255 characters"),
    (_set(I + "description", 7), IF + "description", "expected a string, got integer 7"),
    (_set(I + "description", ""), None, None),
    (_set(G + "id", " "), GF + "id", "must not be empty"),
    (_set(G + "edge_endpoint", "192.0.2.9"), GF + "edge_endpoint",
     "192.0.2.9 is not one of node.tunnel_endpoints (192.0.2.1, 192.0.2.2)"),
    (_set(G + "interface_address", "10.200.0.0"), GF + "interface_address",
     "missing prefix length (a /31 or /30 like '10.200.0.0/31'): '10.200.0.0'"),
    (_set(G + "interface_address", "10.200.0.0/24"), GF + "interface_address",
     "must be a /31 or /30 point-to-point network, got /24"),
    (_set(G + "interface_address", "10.200.0.4/30"), GF + "interface_address",
     "10.200.0.4 is the network or broadcast address of 10.200.0.4/30"),
    (_set(G + "interface_address", "10.200.0.300/31"), GF + "interface_address",
     "not an IPv4 address with prefix length: '10.200.0.300/31'"),
    (_set(G + "key", 2**32), GF + "key", "must be between 0 and 4294967295, got 4294967296"),
    (_set(G + "ttl", 0), GF + "ttl", "must be between 1 and 255, got 0"),
    (_set(G + "ttl", 256), GF + "ttl", "must be between 1 and 255, got 256"),
    (_set(G + "mtu", 575), GF + "mtu", "must be between 576 and 9000, got 575"),
    (_set(G + "mtu", 9001), GF + "mtu", "must be between 576 and 9000, got 9001"),
    (_set(G + "mss", 1437), GF + "mss", "1437 is larger than mtu - 40 = 1436 (IPv4 + TCP headers)"),
    (_set(G + "mss", 535), GF + "mss", "must be between 536 and 8960, got 535"),
    (_set(G + "index", 0), GF + "index", "must be between 1 and 65535, got 0"),
    (_set(G + "index", 65536), GF + "index", "must be between 1 and 65535, got 65536"),
    (_set("tunnels/gre/site a", {}), 'tunnels.gre."site a"',
     "tunnel names use letters, digits, '-' and '_' (at most 63)"),
    (_set("tunnels/gre/site-x", "yes"), "tunnels.gre.site-x", "expected a table, got string 'yes'"),
    # IPsec fields
    (_set(I + "id", "not.a.label"), IF + "id",
     "not a DNS label (letters, digits and '-', at most 63): 'not.a.label'"),
    (_set(I + "account_id", None), IF + "account_id", "missing (required)"),
    (_set(I + "customer_endpoint", "0.0.0.0"), IF + "customer_endpoint",
     "not a unicast address (unspecified): '0.0.0.0'"),
    (_set(I + "allow_null_cipher", "no"), IF + "allow_null_cipher",
     "expected true or false, got string 'no'"),
    (_set(I + "replay_protection", 1), IF + "replay_protection",
     "expected true or false, got integer 1"),
    (_set(I + "child_lifetime", 1799), IF + "child_lifetime",
     "must be between 1800 and 28800, got 1799"),
    (_set(I + "child_lifetime", 28801), IF + "child_lifetime",
     "must be between 1800 and 28800, got 28801"),
    (_set(I + "ike_lifetime", 86401), IF + "ike_lifetime",
     "must be between 1800 and 86400, got 86401"),
    (_set(I + "dpd_interval", 3601), IF + "dpd_interval", "must be between 0 and 3600, got 3601"),
    (_set(I + "dpd_timeout", 30), IF + "dpd_timeout",
     "must be longer than dpd_interval (30), got 30"),
    (_set(I + "mtu", 1400), IF + "mtu", None),     # valid: mss default 1360 = 1400 - 40
    (_set(I + "psk_file", None), IF + "psk_file",
     "set exactly one of psk_file or psk_env (neither is set)"),
    (_set(I + "psk_env", "SITE_B_PSK"), IF + "psk_file",
     "set exactly one of psk_file or psk_env (both are set)"),
    (_set(I + "psk_file", "missing.psk"), IF + "psk_file", "file not found: '{dir}/missing.psk'"),
    (_set(I + "psk_file", "."), IF + "psk_file", "is a directory, not a file: '{dir}'"),
    # cross-table rules
    (_gre_b(index=7), None, None),                 # valid on its own
    (lambda d: (_set(G + "index", 7)(d), _gre_b(index=7)(d)), "tunnels.gre.site-c.index",
     "index 7 already used by tunnels.gre.site-a"),
    (lambda d: (_set(G + "index", 9)(d), _set(I + "index", 9)(d)), IF + "index",
     "index 9 already used by tunnels.gre.site-a"),
    (_gre_b(id="gre-a"), "tunnels.gre.site-c.id", "id 'gre-a' already used by tunnels.gre.site-a"),
    (_gre_b(customer_endpoint="198.51.100.10"), "tunnels.gre.site-c.customer_endpoint",
     ("same edge_endpoint, customer_endpoint and key as tunnels.gre.site-a: the data plane "
     "could not tell them apart (set a distinct key)")),
    (_gre_b(interface_address="10.200.0.1/31"), "tunnels.gre.site-c.interface_address",
     "10.200.0.0/31 overlaps tunnels.gre.site-a.interface_address (10.200.0.0/31)"),
    (_set(I + "interface_address", "10.200.0.0/30"), IF + "interface_address",
     "10.200.0.0 is the network or broadcast address of 10.200.0.0/30"),
    (_set(I + "interface_address", "10.200.0.1/30"), IF + "interface_address",
     "10.200.0.0/30 overlaps tunnels.gre.site-a.interface_address (10.200.0.0/31)"),
    (_set(G + "interface_address", "192.0.2.2/31"), GF + "interface_address",
     "192.0.2.2/31 contains a tunnel endpoint: 192.0.2.2"),
    (_set(G + "interface_address", "203.0.113.20/31"), GF + "interface_address",
     ("203.0.113.20/31 contains a tunnel endpoint: 203.0.113.20 "
     "(tunnels.ipsec.site-b.customer_endpoint)")),
    (_set(G + "customer_endpoint", "192.0.2.2"), GF + "customer_endpoint",
     "192.0.2.2 is one of this node's tunnel_endpoints"),
    (lambda d: d["tunnels"]["ipsec"].__setitem__("site-d", dict(
        d["tunnels"]["ipsec"]["site-b"], id="F5407D8DB1A542B196C59F6D04BA8BD1",
        interface_address="10.200.0.10/31")), "tunnels.ipsec.site-d.id",
     ("same IKE identity as tunnels.ipsec.site-b (DNS names ignore case): a peer could not be "
     "told apart")),
    (_set("tunnels/ipsec/site-a", {}), "tunnels.ipsec.site-a",
     "tunnel name also used by tunnels.gre.site-a; routes could not tell them apart"),
    # routes
    (_set("routes/0/tunnel", "site-q"), "routes[0].tunnel",
     "unknown tunnel 'site-q' (tunnels: site-a, site-b)"),
    (_set("routes/0/prefix", "203.0.113.129/25"), "routes[0].prefix",
     "host bits set in '203.0.113.129/25' (the network is 203.0.113.128/25)"),
    (_set("routes/0/prefix", "203.0.113.0"), "routes[0].prefix",
     ("missing prefix length (write 203.0.113.0/32 or 203.0.113.0/128 for one host): "
     "'203.0.113.0'")),
    (_set("routes/0/prefix", "203.0.113.0/33"), "routes[0].prefix",
     "not an IPv4 or IPv6 prefix: '203.0.113.0/33'"),
    (_set("routes/0/prefix", "2001:db8::/32"), None, None),     # IPv6 inner prefixes are fine
    (_set("routes/0/priority", -1), "routes[0].priority", "must be between 0 and 65535, got -1"),
    (_set("routes/0/prefix", "192.0.2.0/24"), "routes[0].prefix",
     ("192.0.2.0/24 contains a tunnel endpoint, so encapsulated packets would be routed into a "
     "tunnel: 192.0.2.1 (node.tunnel_endpoints), 192.0.2.2 (node.tunnel_endpoints)")),
    (_set("routes/0/prefix", "198.51.100.0/24"), "routes[0].prefix",
     ("198.51.100.0/24 contains a tunnel endpoint, so encapsulated packets would be routed into a "
     "tunnel: 198.51.100.10 (tunnels.gre.site-a.customer_endpoint)")),
    (lambda d: d["routes"].append({"prefix": "203.0.113.128/25", "tunnel": "site-a",
                                   "priority": 5}),
     "routes[2].prefix", "203.0.113.128/25 via 'site-a' is already listed as routes[0]"),
    (_set("routes", {"prefix": "10.0.0.0/8"}), "routes",
     "expected an array of tables ([[routes]]), got table"),
    # state and analytics
    (_set("state", {"backend": "consul"}), "state.backend",
     "must be one of 'sqlite', 'etcd', got 'consul'"),
    (_set("state", {"backend": "sqlite", "endpoints": ["http://127.0.0.1:2379"]}),
     "state.endpoints", 'only valid with backend = "etcd"'),
    (_set("state", {"backend": "etcd", "endpoints": ["http://127.0.0.1:2379"]}),
     "state.fleet_key_file", "missing (required)"),
    (_set("state", {"backend": "etcd", "endpoints": ["127.0.0.1:2379"],
                    "fleet_key_file": "fleet.key"}),
     "state.endpoints", ("item 0: not an etcd endpoint like 'https://10.0.0.1:2379': "
                        "'127.0.0.1:2379'")),
    (_set("state", {"backend": "etcd", "endpoints": ["https://10.0.0.1:2379"],
                    "fleet_key_file": "fleet.key", "cert_file": "site-b.psk"}),
     "state.key_file", "cert_file and key_file go together (TLS client authentication)"),
    (_set("state", {"backend": "etcd", "endpoints": ["https://10.0.0.1:2379"],
                    "fleet_key_file": "fleet.key", "ca_file": "ca.pem"}),
     "state.ca_file", "file not found: '{dir}/ca.pem'"),
    (_set("state", {"backend": "etcd", "endpoints": ["http://10.0.0.1:2379"],
                    "fleet_key_file": "short.key"}),
     "state.fleet_key_file", "fleet key in '{dir}/short.key' is shorter than 32 bytes"),
    (_set("state", {"backend": "etcd", "endpoints": ["http://10.0.0.1:2379"],
                    "fleet_key_file": "nope.key"}),
     "state.fleet_key_file", "fleet key file not found: '{dir}/nope.key'"),
    (_set("state", {"backend": "etcd", "endpoints": ["http://10.0.0.1:2379"],
                    "fleet_key_file": "fleet.key", "path": "x.db"}),
     "state.path", 'only valid with backend = "sqlite"'),
    (_set("state", {"backend": "etcd", "endpoints": ["https://10.0.0.1:2379"],
                    "fleet_key_file": "fleet.key"}),
     "state.ca_file", ("missing: https:// endpoints need the CA that signed the servers' "
                      "certificates")),
    (_set("state", {"backend": "etcd", "fleet_key_file": "fleet.key",
                    "endpoints": ["https://10.0.0.1:2379", "http://10.0.0.2:2379"]}),
     "state.endpoints", "mixes http:// and https:// endpoints: use TLS for all or none"),
    (_set("state", {"backend": "etcd", "endpoints": ["http://10.0.0.1:2379"],
                    "fleet_key_file": "fleet.key", "ca_file": "site-b.psk"}),
     "state.ca_file", "set, but the endpoints are plain http://"),
    (_set("state", {"backend": "etcd", "endpoints": ["https://10.0.0.1:2379"],
                    "fleet_key_file": "fleet.key", "ca_file": "site-b.psk",
                    "cert_file": "site-b.psk", "key_file": "site-b.psk"}), None, None),
    (_set("analytics", {"sample_rate": 0}), "analytics.sample_rate",
     "must be between 1 and 1000000, got 0"),
    (_set("analytics", {"http_address": "localhost"}), "analytics.http_address",
     "not an IPv4 address: 'localhost'"),
    (_set("analytics", {"history_interval": 600, "history_retention": 300}),
     "analytics.history_retention", "must be at least history_interval (600)"),
]


@pytest.mark.parametrize("mutate,field,message", CASES,
                         ids=[f"{i}-{c[1]}" for i, c in enumerate(CASES)])
def test_rule(write, tmp_path, mutate, field, message):
    for name, data in (("fleet.key", "k" * 40), ("short.key", "k" * 31)):
        (tmp_path / name).write_text(data)
        (tmp_path / name).chmod(0o600)
    d = base()
    mutate(d)
    p = write(d)
    if message is None:
        C.load(p, env={})
        return
    assert only_error(p) == (field, message.format(dir=tmp_path))


def test_every_error_names_file_and_field_in_its_text(write):
    d = base()
    _set(G + "customer_endpoint", "10.0.0.300")(d)
    p = write(d)
    with pytest.raises(C.ConfigError) as ei:
        C.load(p, env={})
    assert str(ei.value) == f"{p}: tunnels.gre.site-a.customer_endpoint: " \
                            "not an IPv4 address: '10.0.0.300'"


def test_all_errors_are_collected(write):
    d = base()
    _set("node/id", -1)(d)
    _set(G + "ttl", 300)(d)
    _set(G + "mttu", 1400)(d)
    _set(I + "psk_file", None)(d)
    _set("routes/1/tunnel", "ghost")(d)
    p = write(d)
    with pytest.raises(C.ConfigErrors) as ei:
        C.load(p, env={})
    e = ei.value
    assert [(x.field, x.message) for x in e.errors] == [
        ("node.id", "must be between 0 and 65535, got -1"),
        (GF + "ttl", "must be between 1 and 255, got 300"),
        (GF + "mttu", "unknown key (did you mean 'mtu'?)"),
        (IF + "psk_file", "set exactly one of psk_file or psk_env (neither is set)"),
        ("routes[1].tunnel", "unknown tunnel 'ghost' (tunnels: site-a, site-b)"),
    ]
    assert (e.file, e.field, e.message) == (str(p), "node.id",
                                            "must be between 0 and 65535, got -1")
    assert str(e).splitlines() == [str(x) for x in e.errors]
    assert isinstance(e, C.ConfigError)
    again = pickle.loads(pickle.dumps(e))
    assert [str(x) for x in again.errors] == [str(x) for x in e.errors]


# --- PSK sources and secrecy ------------------------------------------------------------------

@pytest.mark.parametrize("content,message", [
    ("", "file is empty: '{p}'"),
    ("  \n", "file is empty: '{p}'"),
    ("short-psk\n", "key in '{p}' is shorter than 16 bytes"),
])
def test_psk_file_content_rules(write, tmp_path, content, message):
    (tmp_path / "site-b.psk").write_text(content)
    assert only_error(write(base())) == (IF + "psk_file",
                                         message.format(p=tmp_path / "site-b.psk"))


@pytest.mark.parametrize("env,message", [
    ({}, "environment variable SITE_B_PSK is not set"),
    ({"SITE_B_PSK": " \n"}, "environment variable SITE_B_PSK is empty"),
    ({"SITE_B_PSK": "tiny-psk"}, "key in environment variable SITE_B_PSK is shorter than 16 bytes"),
])
def test_psk_env_rules(write, env, message):
    d = base()
    del d["tunnels"]["ipsec"]["site-b"]["psk_file"]
    d["tunnels"]["ipsec"]["site-b"]["psk_env"] = "SITE_B_PSK"
    assert only_error(write(d), env) == (IF + "psk_env", message)


def test_psk_env_name_must_be_a_variable_name(write):
    d = base()
    del d["tunnels"]["ipsec"]["site-b"]["psk_file"]
    d["tunnels"]["ipsec"]["site-b"]["psk_env"] = "SITE-B"
    assert only_error(write(d)) == (IF + "psk_env",
                                    "not an environment variable name: 'SITE-B'")


def _formatted(e: BaseException) -> str:
    return "".join(traceback.format_exception(e)) + repr(e) + str(e) + repr(e.args)


def test_inline_psk_is_rejected_without_echoing_it(write):
    d = base()
    d["tunnels"]["ipsec"]["site-b"]["psk"] = "inline-secret-value-123456"
    p = write(d)
    with pytest.raises(C.ConfigError) as ei:
        C.load(p, env={})
    assert (ei.value.field, ei.value.message) == (
        IF + "psk", ("inline keys are not accepted (they end up in backups, diffs and tickets): "
                    "put the key in a file (psk_file) or an environment variable (psk_env)"))
    assert "inline-secret-value-123456" not in _formatted(ei.value)


def test_psk_never_in_exceptions(write, tmp_path):
    """A file whose PSK loads fine but which has other errors: the formatted exception, with its
    traceback and chained causes, carries none of the PSK's bytes."""
    d = base()
    _set(I + "mss", 5000)(d)
    _set(I + "colour", "x")(d)
    p = write(d)
    with pytest.raises(C.ConfigError) as ei:
        C.load(p, env={})
    text = _formatted(ei.value)
    assert len(ei.value.errors) == 2
    assert PSK not in text and PSK.encode().hex() not in text


def test_short_psk_error_does_not_show_it(write, tmp_path):
    (tmp_path / "site-b.psk").write_text("abc123xyz")
    with pytest.raises(C.ConfigError) as ei:
        C.load(write(base()), env={})
    assert "abc123xyz" not in _formatted(ei.value)


def test_psk_not_in_repr_of_config(write):
    cfg = C.load(write(base()), env={})
    for text in (repr(cfg), str(cfg), repr(cfg.tunnel("site-b")), f"{cfg.tunnel('site-b').psk}"):
        assert PSK not in text
    assert "psk=Secret(<redacted>)" in repr(cfg.tunnel("site-b"))


def test_secret_type():
    s = Secret(b"k3y-material-0123")
    assert (repr(s), str(s), f"{s}", f"{s:>12}", len(s)) == (
        "Secret(<redacted>)", "<redacted>", "<redacted>", "  <redacted>", 17)
    assert s.reveal() == b"k3y-material-0123"
    assert s == Secret("k3y-material-0123") and s != Secret(b"other") and hash(s) == hash(
        Secret(b"k3y-material-0123"))
    assert copy.deepcopy(s) is s
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(s)
    with pytest.raises(AttributeError):
        s._value = b"x"
    with pytest.raises(TypeError) as ei:
        Secret(12345678901234567890)
    assert str(ei.value) == "Secret needs bytes or str, not int"


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_check_good_file_prints_summary():
    r = CliRunner().invoke(cli, ["config", "check", str(EXAMPLES / "edge.toml")])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == f"{EXAMPLES / 'edge.toml'}: OK"
    assert "node        edge-ams-1 (id 1)" in lines
    assert "endpoints   192.0.2.1, 192.0.2.2" in lines
    assert "interfaces  eth0 (internet, xdp native), eth1 (customer, xdp generic)" in lines
    rows = [re.split(r"\s{2,}", x) for x in lines]
    assert ["site-a", "gre", "1", "c4a7362d577a6c3019a474fd6f485821", "192.0.2.1",
            "198.51.100.10", "10.200.0.0/31", "1476", "1436", "64", "key=42"] in rows
    assert ["site-b", "ipsec", "2", "f5407d8db1a542b196c59f6d04ba8bd1", "192.0.2.2",
            "203.0.113.20", "10.200.0.2/31", "1436", "1360", "64",
            (f"account=123456789 psk=file:{EXAMPLES / 'keys' / 'site-b.psk'} ike=8h child=1h "
            "dpd=30s/150s")] in rows
    assert ["203.0.113.128/25", "site-b", "200"] in rows
    assert ["2001:db8:100::/48", "site-a", "100"] in rows
    assert "state       sqlite /var/lib/xtransit/state.db" in lines
    assert "analytics   1 in 1000 packets, http 127.0.0.1:9469, history 1m for 30d" in lines
    assert EDGE_PSK.decode() not in r.output


def test_cli_check_marks_assigned_indexes():
    r = CliRunner().invoke(cli, ["config", "check", str(EXAMPLES / "fleet.toml")],
                           env={"SITE_C_PSK": PSK})
    assert r.exit_code == 0, r.output
    assert "* index assigned automatically; set `index` to keep counters stable" in r.stdout
    assert ["site-c", "ipsec", "3*"] == re.split(r"\s{2,}", next(
        x for x in r.stdout.splitlines() if x.startswith("site-c")))[:3]
    assert PSK not in r.output


def test_cli_check_bad_file_exit_2_every_error(write):
    d = base()
    _set(G + "customer_endpoint", "10.0.0.300")(d)
    _set(I + "child_lifetime", 60)(d)
    _set("routes/0/tunnel", "nope")(d)
    p = write(d)
    r = CliRunner().invoke(cli, ["config", "check", str(p)])
    assert r.exit_code == 2
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        f"{p}: tunnels.gre.site-a.customer_endpoint: not an IPv4 address: '10.0.0.300'",
        f"{p}: tunnels.ipsec.site-b.child_lifetime: must be between 1800 and 28800, got 60",
        f"{p}: routes[0].tunnel: unknown tunnel 'nope' (tunnels: site-a, site-b)",
        f"{p}: 3 errors",
    ]
    assert PSK not in r.output


def test_cli_check_missing_file_exit_2(tmp_path):
    r = CliRunner().invoke(cli, ["config", "check", str(tmp_path / "x.toml")])
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [f"{tmp_path / 'x.toml'}: file not found",
                                     f"{tmp_path / 'x.toml'}: 1 error"]


def test_cli_subprocess_real_console_script(write):
    exe = REPO / ".venv" / "bin" / "xtransit"
    ok = subprocess.run([str(exe), "config", "check", "examples/edge.toml"], cwd=REPO,
                        capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0] == "examples/edge.toml: OK"
    assert EDGE_PSK.decode() not in ok.stdout + ok.stderr
    d = base()
    _set("node/tunnel_endpoints", ["192.0.2.1", "192.0.2.256"])(d)
    p = write(d)
    bad = subprocess.run([str(exe), "config", "check", str(p)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert bad.returncode == 2
    assert bad.stdout == ""
    # the GRE/IPsec edge_endpoint checks are skipped: the node itself did not validate
    assert bad.stderr.splitlines() == [
        f"{p}: node.tunnel_endpoints: item 1: not an IPv4 address: '192.0.2.256'",
        f"{p}: 1 error"]
    assert PSK not in bad.stdout + bad.stderr


# --- robustness: any mutation gives a config or a ConfigError, never another exception ---------

def _paths(d, prefix=()):
    for k, v in d.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from _paths(v, (*prefix, k))
        elif _is_aot(v):
            for i, item in enumerate(v):
                yield from _paths(item, (*prefix, k, i))


_PATHS = list(_paths(BASE))
_scalars = st.one_of(st.integers(-2**70, 2**70), st.booleans(), st.text(max_size=20),
                     st.floats(allow_nan=False), st.sampled_from(
                         ["10.0.0.1", "10.0.0.1/31", "::/0", "192.0.2.1", "site-a", "eth0"]))
_values = st.one_of(_scalars, st.lists(_scalars, max_size=4),
                    st.dictionaries(st.text(min_size=1, max_size=8), _scalars, max_size=3))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(_PATHS), st.text(max_size=6) | st.none(),
                                _values | st.none()), min_size=1, max_size=4))
def test_mutations_never_crash(tmp_path, edits):
    (tmp_path / "site-b.psk").write_text(PSK)
    d = base()
    for path, new_key, value in edits:
        parent = d
        try:
            for p in path[:-1]:
                parent = parent[p]
        except (KeyError, IndexError, TypeError):
            continue            # an earlier edit replaced this part of the tree
        if not isinstance(parent, dict):
            continue
        key = path[-1] if new_key is None else new_key or path[-1]
        if value is None:
            parent.pop(key, None)
        else:
            parent[key] = value
    p = tmp_path / "fuzz.toml"
    p.write_text(dump(d))
    try:
        cfg = C.load(p, env={})
    except C.ConfigError as e:
        event(f"{len(e.errors)} error(s)" if len(e.errors) < 3 else "3+ errors")
        assert e.errors and all(x.file == str(p) for x in e.errors)
        assert PSK not in str(e)
    else:
        event("valid")
        assert PSK not in repr(cfg)

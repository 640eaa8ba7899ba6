"""Tunnels and routes from the store (`[state] config_source = "store"`): `xtransit config push`,
the same validation as a file, and live application by a running `xtransit run`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import fleet_config
from pipeline.config import ConfigError, load
from pipeline.store import open_store
from pipeline.store.schema import Layout

REPO = Path(__file__).resolve().parents[1]
PSK = "a-pre-shared-key-of-32-bytes-or-more!"

NODE = """
[node]
id = {id}
name = "{name}"
ipsec_domain = "example.net"
tunnel_endpoints = ["192.0.2.1"]

[[node.interfaces]]
name = "{ifname}"
role = "both"

[state]
path = "{db}"
config_source = "store"

[analytics]
http_port = 0
history_file = "{history}"
"""

FLEET = """
[tunnels.gre.site-a]
id = "0123456789abcdef0123456789abcdef"
index = 1
customer_endpoint = "198.51.100.10"
edge_endpoint = "192.0.2.1"
interface_address = "10.200.0.0/31"
key = 77
description = "site A, 2 Gbit/s"

[tunnels.ipsec.site-b]
id = "fedcba9876543210fedcba9876543210"
account_id = "acct1"
index = 2
edge_endpoint = "192.0.2.1"
interface_address = "10.200.0.2/31"
psk_file = "{psk}"
child_lifetime = 3600
replay_protection = true

[[routes]]
prefix = "{prefix}"
tunnel = "site-a"

[[routes]]
prefix = "10.3.0.0/24"
tunnel = "site-b"
priority = 50
"""


def files(tmp_path: Path, prefix: str = "10.1.0.0/24", *, name: str = "fleet-node",
          ifname: str = "eth0", node_id: int = 7) -> tuple[Path, Path]:
    psk = tmp_path / "site-b.psk"
    psk.write_text(PSK)
    psk.chmod(0o600)
    node = tmp_path / "node.toml"
    node.write_text(NODE.format(id=node_id, name=name, ifname=ifname, db=tmp_path / "state.db",
                                history=tmp_path / "history.db"))
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET.format(psk=psk, prefix=prefix))
    return node, fleet


def as_one_file(tmp_path: Path, node: Path, fleet: Path) -> Path:
    """The same node and tunnels in one ordinary file (config_source = "file")."""
    one = tmp_path / "one.toml"
    one.write_text(node.read_text().replace('config_source = "store"\n', "")
                   + fleet.read_text())
    return one


def cli(*args: str, netns: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    if netns:
        cmd = ["nsenter", f"--net=/run/netns/{netns}", "--", *cmd]
    return subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_push_then_a_node_loads_what_the_file_says(tmp_path):
    node, fleet = files(tmp_path)
    r = cli("config", "push", "-c", str(node), str(fleet))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:4] == ["added    tunnel site-a", "added    tunnel site-b",
                         "added    route 10.1.0.0/24 -> site-a", "added    route 10.3.0.0/24 -> site-b"]
    assert lines[4].startswith("pushed: 4 added, 0 changed, 0 removed, 0 unchanged")
    assert PSK not in r.stdout + r.stderr
    from_store = fleet_config.load_node(node)
    from_file = load(as_one_file(tmp_path, node, fleet))
    assert from_store.gre_tunnels == from_file.gre_tunnels
    assert [t.__dict__ | {"psk": None} for t in from_store.ipsec_tunnels] == \
        [t.__dict__ | {"psk": None} for t in from_file.ipsec_tunnels]
    assert from_store.ipsec_tunnels[0].psk.reveal() == PSK.encode()
    assert from_store.routes == from_file.routes
    # the PSK itself never reaches the store
    with open_store(from_store.state) as s:
        values = b"".join(rec.value for rec in s.list("/xtransit/").records)
    assert PSK.encode() not in values and str(tmp_path / "site-b.psk").encode() in values


def test_push_again_changes_only_what_differs(tmp_path):
    node, fleet = files(tmp_path)
    assert cli("config", "push", "-c", str(node), str(fleet)).returncode == 0
    again = cli("config", "push", "-c", str(node), str(fleet))
    assert again.stdout.startswith("pushed: 0 added, 0 changed, 0 removed, 4 unchanged")
    # one route moved, the IPsec tunnel and its route gone
    text = fleet.read_text().replace("10.1.0.0/24", "10.9.0.0/24")
    text = text[:text.index("[tunnels.ipsec.site-b]")] + text[text.index("[[routes]]"):]
    text = text[:text.rindex("[[routes]]")]
    fleet.write_text(text)
    dry = cli("config", "push", "--dry-run", "-c", str(node), str(fleet))
    assert dry.stdout.splitlines() == [   # in the order a push applies them
        "removed  route 10.1.0.0/24 -> site-a", "removed  route 10.3.0.0/24 -> site-b",
        "added    route 10.9.0.0/24 -> site-a", "removed  tunnel site-b",
        "dry run: would push 1 added, 0 changed, 3 removed, 1 unchanged; nothing written"]
    r = cli("config", "push", "-c", str(node), str(fleet))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:5] == [
        "added    route 10.9.0.0/24 -> site-a", "removed  route 10.1.0.0/24 -> site-a",
        "removed  route 10.3.0.0/24 -> site-b", "removed  tunnel site-b",
        "pushed: 1 added, 0 changed, 3 removed, 1 unchanged" + r.stdout.splitlines()[4][50:]]
    cfg = fleet_config.load_node(node)
    assert [t.name for t in cfg.tunnels] == ["site-a"]
    assert [str(r.prefix) for r in cfg.routes] == ["10.9.0.0/24"]


def test_an_invalid_fleet_is_refused_before_anything_is_written(tmp_path):
    node, fleet = files(tmp_path)
    fleet.write_text(fleet.read_text().replace('tunnel = "site-b"', 'tunnel = "site-z"'))
    r = cli("config", "push", "-c", str(node), str(fleet))
    assert r.returncode == 2
    assert f"{fleet}: routes[1].tunnel: unknown tunnel 'site-z'" in r.stderr
    with open_store(load(node).state) as s:
        assert s.list("/xtransit/").records == ()
    fleet.write_text("[node]\nid = 1\n" + FLEET)
    r = cli("config", "push", "-c", str(node), str(fleet))
    assert r.returncode == 2
    assert "only [tunnels] and [[routes]] are published; node belong in each node's own " \
           "file" in r.stderr


def test_a_store_node_file_with_its_own_tunnels_is_refused(tmp_path):
    node, fleet = files(tmp_path)
    node.write_text(node.read_text() + fleet.read_text())
    with pytest.raises(ConfigError) as e:
        load(node)
    msgs = [str(x) for x in e.value.errors]
    assert any("tunnels: [tunnels] come from the store here" in m for m in msgs), msgs
    assert any("routes: [[routes]] come from the store here" in m for m in msgs), msgs


def test_a_bad_record_is_skipped_and_named(tmp_path, caplog):
    node, fleet = files(tmp_path)
    assert cli("config", "push", "-c", str(node), str(fleet)).returncode == 0
    with open_store(load(node).state) as s:
        s.put(Layout().tunnel("garbage"), b"not json")
    with caplog.at_level("WARNING", logger="xtransit"):
        cfg = fleet_config.load_node(node)
    assert [t.name for t in cfg.tunnels] == ["site-a", "site-b"]
    assert "store record skipped: /xtransit/v1/tunnel/garbage: not JSON" in caplog.text


def test_config_check_shows_the_store_tunnels(tmp_path):
    node, fleet = files(tmp_path)
    assert cli("config", "push", "-c", str(node), str(fleet)).returncode == 0
    r = cli("config", "check", str(node))
    assert r.returncode == 0, r.stderr
    assert "site-a" in r.stdout and "site-b" in r.stdout
    assert r.stdout.rstrip().endswith("tunnels and routes: from the state store ([state] "
                                      "config_source)")
    assert PSK not in r.stdout


@pytest.mark.netns
def test_a_running_node_applies_a_push_live(lab, tmp_path):
    """`xtransit run` on a store-configured node: a push is applied as map updates, without a
    signal and without detaching."""
    from test_run import Log, _routes4, _xdp
    a, b = lab.namespace("fleet"), lab.namespace("peer")
    lab.veth(a, "e0", b, "p0", "10.99.0.1/24", "10.99.0.2/24")
    a.add_address("lo", "192.0.2.1/32")
    name = f"t-fleet-{os.getpid()}-{a.name.rsplit('-', 1)[1]}"
    node, fleet = files(tmp_path, name=name, ifname="e0")
    assert cli("config", "push", "-c", str(node), str(fleet)).returncode == 0
    cmd = ["nsenter", f"--net=/run/netns/{a.name}", "--", sys.executable, "-m", "pipeline.cli",
           "run", "--config", str(node), "--log-format", "json"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        log = Log(proc)
        started = log.wait("started", 90)
        assert (started["gre_tunnels"], started["ipsec_tunnels"], started["routes"]) == (1, 1, 2)
        assert _routes4(name) == {"10.1.0.0/24", "10.3.0.0/24"}
        fleet.write_text(fleet.read_text().replace("10.1.0.0/24", "10.5.0.0/24"))
        assert cli("config", "push", "-c", str(node), str(fleet)).returncode == 0
        ev = log.wait("config_reloaded", 30)
        assert ev["needs_restart"] == "none"
        assert _routes4(name) == {"10.5.0.0/24", "10.3.0.0/24"}
        assert _xdp(a, "e0")["mode"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert json.dumps(log.seen).count(PSK) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_the_shipped_fleet_example_pushes_and_loads(tmp_path, monkeypatch):
    """examples/fleet/: a store-configured node and the fleet's tunnels file."""
    node = tmp_path / "node.toml"
    node.write_text((REPO / "examples/fleet/node.toml").read_text().replace(
        "/var/lib/xtransit/state.db", str(tmp_path / "state.db")))
    env = dict(os.environ, SITE_C_PSK=PSK)
    cmd = [sys.executable, "-m", "pipeline.cli", "config", "push", "-c", str(node),
           str(REPO / "examples/fleet/tunnels.toml")]
    dry = subprocess.run([*cmd, "--dry-run"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "added    tunnel branch-1", "added    tunnel site-c",
        "added    route 172.21.0.0/16 -> branch-1", "added    route 10.30.0.0/16 -> site-c",
        "dry run: would push 4 added, 0 changed, 0 removed, 0 unchanged; nothing written"]
    assert not (tmp_path / "state.db").exists()   # a dry run writes nothing, not even a file
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith("pushed: 4 added, 0 changed, 0 removed")
    monkeypatch.setenv("SITE_C_PSK", PSK)
    cfg = fleet_config.load_node(node)
    assert [(t.name, t.index) for t in cfg.tunnels] == [("branch-1", 1), ("site-c", 2)]
    assert sorted(str(r.prefix) for r in cfg.routes) == ["10.30.0.0/16", "172.21.0.0/16"]

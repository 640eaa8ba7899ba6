"""`xtransit tunnel list|show`: state and counters per configured tunnel (status file + pins)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_stats_cli import CFG

from pipeline.commands.tunnel import render, tunnel_rows
from pipeline.config import loads
from pipeline.xdp import maps

REPO = Path(__file__).resolve().parents[1]

STATUS = {
    "node": "n", "pid": 1, "gre": {"g": {"up": True}},
    "ike_sas": [{"ike_spi_i": "aa", "ike_spi_r": "bb", "state": "established", "tunnel": "s",
                 "peer": "203.0.113.9:4500", "nat_t": True, "algorithms": "AES_GCM_16-256",
                 "children": [{"spi_in": "c0000001", "spi_out": "c0000002",
                               "algorithms": "AES_GCM_16-256"}]}],
    "ipsec": {"tunnels": {"s": {
        "in": {"packets": 5, "bytes": 500, "drops": {}},
        "out": {"packets": 7, "bytes": 700, "drops": {}},
        "sas": [{"direction": "in", "spi": 0xc0000001}, {"direction": "out",
                                                           "spi": 0xc0000002}]}}},
}


def test_rows_from_status_and_counters():
    cfg = loads(CFG, env={"T_PSK": "x" * 32})
    counters = maps.Counters(tunnels={1: maps.TunnelCounters(3, 300, 4, 400)},
                             tunnel_reasons={}, reasons={})
    rows = tunnel_rows(cfg, STATUS, counters)
    assert [(r["name"], r["state"], r["packets_in"], r["packets_out"], r["ike_sas"],
             r["child_sas"]) for r in rows] == [("g", "up", 4, 3, None, None),
                                                ("s", "up", 7, 5, 1, 1)]
    assert rows[1]["peer"] == "203.0.113.9:4500" and rows[1]["customer"] == "(dynamic)"
    assert rows[1]["pin_node"] is None
    lines = render(rows)
    assert lines[0].split() == ["TUNNEL", "TYPE", "INDEX", "EDGE", "CUSTOMER", "STATE", "IKE/CHILD",
                                "SAS", "PKTS", "IN", "PKTS", "OUT"]
    assert lines[1].split() == ["g", "gre", "1", "192.0.2.1", "198.51.100.1", "up", "-", "4", "3"]
    assert lines[2].split() == ["s", "ipsec", "2", "192.0.2.1", "(dynamic)", "up", "1/1", "7", "5"]
    # an IKE SA without a Child SA in the data path yet; no daemon at all
    neg = dict(STATUS, ipsec={"tunnels": {}})
    assert tunnel_rows(cfg, neg, None)[1]["state"] == "negotiating"
    assert [r["state"] for r in tunnel_rows(cfg, {}, None)] == ["-", "-"]


def test_cli_without_a_daemon(tmp_path):
    cfg = tmp_path / "n.toml"
    cfg.write_text(CFG.replace('name = "n"', 'name = "no-such-daemon-node"'))
    env = {"T_PSK": "x" * 32, "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "tunnel", "list", "-c", str(cfg)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert [line.split()[5] for line in r.stdout.splitlines()[1:]] == ["-", "-"]
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "tunnel", "show", "-c", str(cfg),
                        "s"], capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "tunnel      s (ipsec, index 2, id s1)"
    assert "psk from env:T_PSK" in r.stdout and "x" * 32 not in r.stdout
    assert "encrypts    not pinned (each node encrypts what reaches it)" in r.stdout
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "tunnel", "show", "-c", str(cfg),
                        "nope"], capture_output=True, text=True, cwd=REPO, env=env, timeout=60,
                       check=False)
    assert r.returncode == 1
    assert "no tunnel named 'nope'" in r.stderr and "(tunnels: g, s)" in r.stderr

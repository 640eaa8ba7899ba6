"""`make demo` run non-interactively (`python -m pipeline.demo --ci`), its output checked.

Real everything: namespaces, two `xtransit run` daemons (edge and GRE customer router), the
strongSwan peer, ping, iperf3 and the live-frames generator. About 25 s.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.netns, pytest.mark.peer]


@pytest.fixture(scope="module")
def demo():
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.demo", "--ci"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.terminate()          # the demo tears down on SIGTERM
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"demo did not finish in 240 s:\n{out[-3000:]}")
    m = re.search(r"^DEMO SUMMARY (.*)$", out, re.MULTILINE)
    assert m, f"no summary line in the demo output:\n{out[-3000:]}"
    return proc.pid, out, json.loads(m.group(1))


def test_tunnels_come_up(demo):
    _, out, _ = demo
    assert re.search(r"\[edge\] started .* interfaces=inet0:native,cust0:native "
                     r"endpoints=192\.0\.2\.1 gre_tunnels=1 ipsec_tunnels=1 routes=2", out)
    assert re.search(r"\[gre-cpe\] started .* endpoints=203\.0\.113\.2 gre_tunnels=1 "
                     r"ipsec_tunnels=0 routes=1", out)
    assert re.search(r"\[edge\] ike_sa_up +tunnel=site-ipsec .* peer=203\.0\.113\.6:4500 "
                     r"algorithms=AES_GCM_16-256/PRF_HMAC_SHA2_256/ECP_384 nat_t=True", out)
    assert re.search(r"\[edge\] child_sa_up +tunnel=site-ipsec .* algorithms=AES_GCM_16-256 "
                     r"ts_local=198\.51\.100\.0-198\.51\.100\.255", out)
    assert re.search(r"\[edge\] sa_installed +tunnel=site-ipsec .* algorithms=aes-gcm-16-256 "
                     r"local=192\.0\.2\.1 peer=203\.0\.113\.6 udp_encap=4500->4500", out)
    assert re.search(r"\[edge\] tunnel_up +kind=ipsec tunnel=site-ipsec", out)
    assert re.search(r"\[edge\] tunnel_up +kind=gre tunnel=site-gre peer=203\.0\.113\.2", out)
    assert re.search(r"\[gre-cpe\] tunnel_up +kind=gre tunnel=to-edge peer=192\.0\.2\.1", out)


def test_traffic_both_ways_through_both_tunnels(demo):
    _, _, r = demo
    for label in ("Internet -> GRE site 10.20.0.2", "GRE site -> Internet 198.51.100.2",
                  "Internet -> IPsec site 10.10.1.2", "IPsec site -> Internet 198.51.100.2"):
        assert r[f"ping {label}"] is True, label
    assert r["iperf3 GRE 10.20.0.2"] is True
    assert r["iperf3 IPsec 10.10.1.2"] is True
    assert r["iperf3 -R GRE 10.20.0.2"] is True      # the servers sending to the Internet
    assert r["iperf3 -R IPsec 10.10.1.2"] is True
    # the SYN as the servers saw it: 1460 from the Internet host, clamped by the edge
    assert r["mss GRE 10.20.0.2"] == 1432
    assert r["mss IPsec 10.10.1.2"] == 1360
    # 2000 generator frames per tunnel, each counted at the edge: encapsulated, or (IPsec on
    # 2 cores) dropped by the kernel at the AF_XDP socket under a named counter
    assert r["burst site-gre"] == 2000
    lost = r["burst ipsec not encrypted"]
    assert r["burst site-ipsec"] + lost.get("k_rx_dropped", 0) + lost.get("k_rx_ring_full", 0) \
        == 2000, lost
    assert r["tunnel states"] == {"site-gre": "up", "site-ipsec": "up"}
    c = r["counters"]
    for tunnel in ("site-gre", "site-ipsec"):
        assert c[tunnel]["decap_packets"] > 0, tunnel        # customer -> Internet
        assert c[tunnel]["encap_packets"] >= 2000, tunnel    # Internet -> customer
    assert r["esp in"] > 0 and r["esp out"] >= 2000


def test_analytics_from_the_running_edge(demo):
    _, out, r = demo
    assert r["prometheus"] == 4          # packets_total for 2 tunnels x 2 directions
    assert re.search(r'xtransit_tunnel_packets_total\{direction="ingress",tunnel="site-gre"\} '
                     r"\d+", out)
    assert r["plot site-gre"] is True and r["plot site-ipsec"] is True
    for t in ("site-gre", "site-ipsec"):
        png = REPO / "demo-output" / f"{t}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clean_teardown(demo):
    pid, out, _ = demo
    assert "xtransit run (edge) exited with status 0" in out
    assert "xtransit run (gre-cpe) exited with status 0" in out
    assert "namespaces removed: 7 of 7" in out
    assert re.search(r"\[edge\] ike_sa_down +tunnel=site-ipsec .* reason=deleted_by_peer", out)
    _nothing_left(pid)
    assert not Path(f"/run/xtransit/demo-edge-{pid}").exists()


def _nothing_left(pid: int) -> None:
    netns_dir = Path("/run/netns")
    left = [n.name for n in netns_dir.iterdir() if f"-{pid}-" in n.name] \
        if netns_dir.exists() else []
    assert left == []
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert [a for a in ps.stdout.splitlines()
            if f"demo-edge-{pid}" in a or ("demo-output/" in a and " run " in a)] == []
    assert not Path(f"/sys/fs/bpf/xtransit/demo-edge-{pid}").exists()
    assert not Path(f"/sys/fs/bpf/xtransit/demo-grecpe-{pid}").exists()


def test_ctrl_c_tears_everything_down():
    """SIGINT (Ctrl-C) once both daemons and the strongSwan peer run: same clean teardown."""
    import signal
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.demo", "--ci"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("== Ping"):
                proc.send_signal(signal.SIGINT)
                break
        out = "".join(seen) + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 130
    assert "\ninterrupted\n" in out
    assert "strongSwan peer stopped" in out
    assert "xtransit run (edge) exited with status 0" in out
    assert "xtransit run (gre-cpe) exited with status 0" in out
    assert "namespaces removed: 7 of 7" in out
    _nothing_left(proc.pid)

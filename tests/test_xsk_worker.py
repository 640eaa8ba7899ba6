"""The AF_XDP worker's lifecycle: argument checks, errors that name the device, no leaked sockets
or UMEM across create/close cycles, stop within the poll interval, and a clean shutdown of a
whole data path on SIGTERM (programs detached, internal veth removed)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import esp, xsk

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def worker():
    ctx = esp.EspContext()
    w = ctx.worker()
    yield w
    w.close()
    ctx.close()


@pytest.mark.parametrize("kw,match", [
    ({"mode": "turbo"}, "mode must be one of"),
    ({"batch": 0}, "batch must be 1..64"),
    ({"batch": 65}, "batch must be 1..64"),
    ({"ring_size": 1000}, "power of two"),
    ({"frame_size": 1500}, "frame_size must be 2048 or 4096"),
    ({"tx_src_mac": "02:00:00:00:00"}, "tx_src_mac must be a MAC"),
    ({"tx_ifname": "x" * 16}, "TX device must be an interface name"),
    ({"rx": []}, "need 1..16 RX"),
    ({"rx": [("v0", 0)] * 17}, "need 1..16 RX"),
])
def test_arguments_checked_before_c(worker, kw, match):
    args = {"rx": [("v0", 0)], "tx_ifname": "t0", "tx_src_mac": "02:00:00:00:00:01",
            "tx_dst_mac": "02:00:00:00:00:02"}
    args.update(kw)
    with pytest.raises(xsk.XskError, match=match):
        xsk.XskWorker(worker, **args)


@pytest.fixture
def ns_pair(lab):
    ns = lab.namespace("xsk")
    lab.veth(ns, "v0", ns, "v1")
    lab.veth(ns, "t0", ns, "t1")
    return ns


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _maps() -> int:
    return len(Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.netns
def test_errors_name_the_device(worker, ns_pair):
    with ns_pair.enter():
        with pytest.raises(xsk.XskError, match="nosuch0: AF_XDP RX socket"):
            xsk.XskWorker(worker, [("nosuch0", 0)], "t0", "02:00:00:00:00:01",
                          "02:00:00:00:00:02")
        with pytest.raises(xsk.XskError, match="TX device must not be an RX device"):
            xsk.XskWorker(worker, [("v0", 0)], "v0", "02:00:00:00:00:01", "02:00:00:00:00:02")
        with pytest.raises(xsk.XskError, match="nosuch1: AF_XDP TX socket"):
            xsk.XskWorker(worker, [("v0", 0)], "nosuch1", "02:00:00:00:00:01",
                          "02:00:00:00:00:02")


@pytest.mark.netns
def test_no_leak_across_cycles_and_prompt_stop(worker, ns_pair):
    def cycle() -> None:
        with ns_pair.enter():
            x = xsk.XskWorker(worker, [("v0", 0), ("v1", 0)], "t0", "02:00:00:00:00:01",
                              "02:00:00:00:00:02", ring_size=256, poll_ms=20)
        st = x.stats()
        assert (st.frames_total, st.zerocopy, st.running) == (4 * 256, False, False)
        assert st.frames_free == 4 * 256 - 2 * 256      # both fill rings filled at creation
        x.start()
        deadline = time.monotonic() + 2
        while not x.stats().running and time.monotonic() < deadline:
            time.sleep(0.005)
        assert x.stats().running
        x.stop(timeout=1.0)                              # poll_ms 20: returns promptly
        assert x.exit_code == 0 and not x.stats().running
        x.close()
        x.close()                                        # idempotent
        with pytest.raises(xsk.XskError, match="closed"):
            x.stats()

    cycle()                                              # warm-up (lazy imports, caches)
    fds, maps = _fds(), _maps()
    for _ in range(5):
        cycle()
    assert _fds() == fds                                 # every socket closed
    assert _maps() == maps                               # UMEM and rings unmapped


CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {repo!r})
from pipeline import ipsec, xsk
dp = ipsec.IpsecDataPath({{}})
fds0 = len(os.listdir("/proc/self/fd"))
edge = ipsec.IpsecEdge(dp, [ipsec.RxDevice("v0")], ["192.0.2.1"])
xsk.stop_on_sigterm(edge)
print("ready", flush=True)
try:
    while True:
        time.sleep(0.05)
finally:
    edge.close()
    dp.close()
    print(json.dumps({{"fds_before": fds0, "fds_after": len(os.listdir("/proc/self/fd"))}}),
          flush=True)
"""


@pytest.mark.netns
def test_sigterm_shuts_down_cleanly(ns_pair):
    proc = ns_pair.popen(sys.executable, "-c", CHILD.format(repo=str(REPO)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read()
        links = ns_pair.run("ip", "-d", "link", "show").stdout
        assert "xtesp0" in links and "prog/xdp" in links, links
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["fds_after"] == counts["fds_before"], (counts, err)
    links = ns_pair.run("ip", "-d", "link", "show").stdout
    assert "xtesp0" not in links and "xtesp1" not in links, (links, err)
    assert "prog/xdp" not in links, (links, err)


STATIC = """
[[sa]]
tunnel = "debug-1"
index = 77
local = "192.0.2.1"
remote = "192.0.2.2"
spi_in = 0x10000001
spi_out = 0x20000001
encryption = "aes-gcm-16"
enc_key_in = "000102030405060708090a0b0c0d0e0f01020304"
enc_key_out = "101112131415161718191a1b1c1d1e1f05060708"
"""


@pytest.mark.netns
def test_operator_static_mode_runs_and_stops_on_sigterm(ns_pair, tmp_path):
    f = tmp_path / "static.toml"
    f.write_text(STATIC)
    f.chmod(0o600)
    proc = ns_pair.popen(sys.executable, "-m", "pipeline.ipsec", "static", str(f), "--dev", "v0",
                         "--endpoint", "192.0.2.1", "--route", "10.10.0.0/24=77", "--stats",
                         "0.2", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=str(REPO))
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        stats = json.loads(proc.stdout.readline())
        t = stats["tunnels"]["debug-1"]
        assert t["index"] == 77
        assert sorted((s["direction"], s["spi"]) for s in t["sas"]) == [
            ("in", 0x10000001), ("out", 0x20000001)]
        assert stats["steering"]["decrypt"] == 0 and len(stats["workers"]) == 1
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "0001020304" not in out + err          # keys never printed
    links = ns_pair.run("ip", "-d", "link", "show").stdout
    assert "xtesp0" not in links and "prog/xdp" not in links, (links, err)


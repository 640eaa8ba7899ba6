"""The namespace harness itself: exact frames across a veth pair, teardown in every case."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
from pyroute2 import netns as pnetns

from pipeline import netns

pytestmark = pytest.mark.netns


def test_frame_crosses_veth_byte_for_byte(two_hosts):
    lab, a, b = two_hosts
    tx = lab.port(a, "veth0")
    rx = lab.port(b, "veth0")
    rx.drain()
    frame = bytes.fromhex("020000000002" "020000000001" "88b5") + bytes(range(50))
    tx.send(frame)
    got = rx.recv(timeout=2, match=lambda f: f[12:14] == b"\x88\xb5")
    assert got == frame


def test_ping_between_namespaces(two_hosts):
    _, a, _ = two_hosts
    out = a.run("ping", "-c", "1", "-W", "2", "10.99.0.2")
    assert "1 received" in out.stdout


def test_lab_removes_namespaces_after_exception():
    names = []
    with pytest.raises(RuntimeError, match="boom"), netns.Lab("x") as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        lab.veth(a, "v0", b, "v1")
        names = [a.name, b.name]
        raise RuntimeError("boom")
    assert names and not set(names) & set(pnetns.listnetns())


def test_namespace_of_killed_process_is_swept():
    code = (
        "import time, sys; from pipeline import netns; lab = netns.Lab('k');"
        "ns = lab.namespace('k'); print(ns.name, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    name = proc.stdout.readline().strip()
    assert name in pnetns.listnetns()
    proc.kill()
    proc.wait()
    removed = netns.sweep_stale()
    assert name in removed
    assert name not in pnetns.listnetns()


def test_sigterm_runs_teardown(tmp_path):
    # A child pytest-like process: SIGTERM must still remove its namespace (Lab in a with block,
    # SIGTERM turned into KeyboardInterrupt as conftest does).
    code = (
        "import signal, time; from pipeline import netns\n"
        "def term(s, f): raise KeyboardInterrupt\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "with netns.Lab('s') as lab:\n"
        "    ns = lab.namespace('s'); print(ns.name, flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    name = proc.stdout.readline().strip()
    assert name in pnetns.listnetns()
    proc.terminate()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 5
    while name in pnetns.listnetns() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert name not in pnetns.listnetns()

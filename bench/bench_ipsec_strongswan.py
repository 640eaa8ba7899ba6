"""Baseline for the IPsec data path: strongSwan to strongSwan, iperf3 through the tunnel.

Two charons from ../shared/peers/strongswan/peer.sh (strongSwan 5.9.8, userspace ESP through
kernel-libipsec: this kernel has no ESP transform), in namespaces joined by a routing hub:

    swa 192.0.2.10 --- hub (192.0.2.1 | 198.51.100.1, forwarding) --- 198.51.100.20 swb
    10.10.1.1 (lo, iperf3 server)                                  10.10.2.1 (lo, iperf3 client)

``swa`` only loads its connection and answers; ``swb`` initiates. Same ESP transform as our
benchmark (AES-GCM-16 with a 128-bit key). iperf3 TCP from swb to swa for a few seconds; the
figure is the receiver's bits per second.

    .venv/bin/python -m bench.bench_ipsec_strongswan      # prints JSON
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

from pipeline import netns

PEER_SH = Path(__file__).resolve().parents[2] / "shared" / "peers" / "strongswan" / "peer.sh"
PSK = "bench-psk-0123456789abcdef"


class StrongswanError(RuntimeError):
    pass


def _peer(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(PEER_SH), *args], capture_output=True, text=True, check=False,
                          timeout=timeout)
    if proc.returncode != 0:
        raise StrongswanError(f"peer.sh {args[0]} failed: {(proc.stderr or proc.stdout)[-800:]}")
    return proc


class StrongswanTunnel:
    """Two charons with the tunnel up (``with`` block); :meth:`iperf` measures through it, as
    often as wanted, so the benchmark can interleave it with its own rounds."""

    def __init__(self, esp: str = "aes128gcm16-modp2048") -> None:
        if not PEER_SH.exists():
            raise StrongswanError(f"no strongSwan peer script at {PEER_SH}")
        pid = os.getpid()
        self.esp = esp
        self.na, self.nb = f"xtswa-{pid}-1", f"xtswb-{pid}-1"
        self._started: list[str] = []
        self._lab = netns.Lab("swhub")
        try:
            hub = self._lab.namespace("swhub")
            hub.sysctl("net.ipv4.ip_forward", 1)
            _peer("up", "--ns", self.na, "--local", "192.0.2.10/24", "--link-ns", hub.name,
                  "--link-addr", "192.0.2.1/24", "--gw", "192.0.2.1", "--remote", "198.51.100.20",
                  "--id", "a.bench.example", "--psk", PSK, "--esp", esp, "--local-ts",
                  "10.10.1.0/24", "--remote-ts", "10.10.2.0/24", "--inner", "10.10.1.1/24",
                  "--no-initiate", "--loglevel", "0")
            self._started.append(self.na)
            _peer("up", "--ns", self.nb, "--local", "198.51.100.20/24", "--link-ns", hub.name,
                  "--link-addr", "198.51.100.1/24", "--gw", "198.51.100.1", "--remote",
                  "192.0.2.10", "--id", "b.bench.example", "--psk", PSK, "--esp", esp,
                  "--local-ts", "10.10.2.0/24", "--remote-ts", "10.10.1.0/24", "--inner",
                  "10.10.2.1/24", "--loglevel", "0")
            self._started.append(self.nb)
        except BaseException:
            self.close()
            raise

    def iperf(self, seconds: float) -> dict:
        """Receiver-side bits per second of one iperf3 TCP run from swb to swa."""
        server = subprocess.Popen(["ip", "netns", "exec", self.na, "iperf3", "-s", "-1", "-B",
                                   "10.10.1.1", "-J"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(0.3)
            client = subprocess.run(
                ["ip", "netns", "exec", self.nb, "iperf3", "-c", "10.10.1.1", "-B", "10.10.2.1",
                 "-t", str(seconds), "-J"], capture_output=True, text=True, check=False,
                timeout=seconds + 30)
            out, _ = server.communicate(timeout=30)
        finally:
            if server.poll() is None:
                server.kill()
        if client.returncode != 0:
            raise StrongswanError(f"iperf3 client: {client.stdout[-500:]}{client.stderr[-500:]}")
        recv = json.loads(out)["end"]["sum_received"]
        return {"bits_per_second": recv["bits_per_second"], "seconds": recv["seconds"],
                "bytes": recv["bytes"], "esp": self.esp, "backend": "kernel-libipsec"}

    def close(self) -> None:
        for ns in reversed(self._started):
            with contextlib.suppress(StrongswanError, subprocess.TimeoutExpired):
                _peer("down", "--ns", ns, timeout=30)
        self._started.clear()
        self._lab.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def measure(seconds: float = 5.0, esp: str = "aes128gcm16-modp2048") -> dict:
    """One iperf3 run through a fresh strongSwan-to-strongSwan tunnel."""
    with StrongswanTunnel(esp) as t:
        return t.iperf(seconds)


if __name__ == "__main__":
    print(json.dumps(measure(float(sys.argv[1]) if len(sys.argv) > 1 else 5.0), indent=2))

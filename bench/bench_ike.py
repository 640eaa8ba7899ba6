"""IKE SAs established per second: our responder against a strongSwan responder.

Both responders run in the same "edge" network namespace setup, pinned to CPU 1, and are driven by
the same initiator load: our IKE core in its initiator role (pipeline.ike, the same tasks and
payload code), pinned to CPU 0, keeping ``--window`` IKE SAs in flight over UDP through a veth
pair. Proposal for both: aes256gcm16-prfsha256-ecp384, one Child SA (aes256gcm16) in IKE_AUTH,
PSK authentication. Each round runs ``--seconds`` after a warm-up.

Two figures per responder: the rate of IKE SAs established during the round, and IKE SAs per
CPU-second of the responder process (utime+stime from /proc/PID/stat, all threads). The second
is the per-core capacity even when the single initiator cannot saturate the responder; the ratio
ours/strongSwan is reported on it. strongSwan installs its Child SAs into kernel-libipsec (its
userspace ESP), ours into a counting SaInstaller.

    .venv/bin/python -m bench.bench_ike              # full run (root; strongSwan installed)
    .venv/bin/python -m bench.bench_ike --quick      # smoke run
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline import netns
from pipeline.ike.constants import DhGroup, Encr, IdType, Prf
from pipeline.ike.engine import EngineConfig, IkeEngine
from pipeline.ike.proposal import esp_proposal, ike_proposal
from pipeline.ike.server import IkeServer
from pipeline.ike.state import IkeState
from pipeline.ike.tasks import InitiatorProfile
from pipeline.ike.tunnels import IkeTunnel, TunnelDirectory

EDGE, LOAD = "192.0.2.1", "192.0.2.2"
DOMAIN = "example.net"
PSK = b"bench-psk-0123456789"
TUNNEL = IkeTunnel(name="bench", tunnel_id="f5407d8db1a542b196c59f6d04ba8bd1",
                   account_id="123456789", edge_endpoint=EDGE, customer_endpoint=LOAD, psk=PSK,
                   dpd_interval=0, ike_lifetime=0)
HERE = Path(__file__).resolve().parent
CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


class CountingInstaller:
    def __init__(self) -> None:
        self.installed = 0

    def install(self, sa) -> None:
        self.installed += 1

    def replace(self, old_spi_in, sa) -> None:
        pass

    def delete(self, spi_in) -> None:
        pass


# ---------------------------------------------------------------- our responder (subprocess)


def responder_main() -> int:
    logging.basicConfig(level=logging.WARNING)
    engine = IkeEngine(TunnelDirectory([TUNNEL], DOMAIN), CountingInstaller(),
                       EngineConfig(half_open_cookie_threshold=1_000_000))

    async def run() -> None:
        server = IkeServer(engine, [EDGE], tick=1.0)
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await server.close()

    asyncio.run(run())
    return 0


# ---------------------------------------------------------------- responders under test


class OurResponder:
    name = "ours (pipeline.ike)"

    def __init__(self, ns: netns.Namespace, cpu: int):
        self.proc = ns.popen("taskset", "-c", str(cpu), sys.executable, "-m", "bench.bench_ike",
                             "--responder", stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError("our responder did not start")
        self.pid = self.proc.pid

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class StrongswanResponder:
    name = "strongSwan 5.9 charon"

    def __init__(self, ns: netns.Namespace, cpu: int):
        self.state = Path(tempfile.mkdtemp(prefix="xt-bench-swan-"))
        (self.state / "run").mkdir()
        subst = {"STATE": str(self.state), "LOCAL": EDGE, "LOCAL_ID": f"fqdn:{TUNNEL.fqdn(DOMAIN)}",
                 "PSK_HEX": PSK.hex()}
        for name in ("strongswan.conf", "swanctl.conf"):
            text = (HERE / "ike_strongswan" / f"{name}.tmpl").read_text()
            for k, v in subst.items():
                text = text.replace(f"@{k}@", v)
            (self.state / name).write_text(text)
        os.chmod(self.state / "swanctl.conf", 0o600)
        charon = "/usr/lib/ipsec/charon"
        self.proc = subprocess.Popen(
            ["setsid", "ip", "netns", "exec", ns.name, "env",
             f"STRONGSWAN_CONF={self.state / 'strongswan.conf'}", "taskset", "-c", str(cpu),
             "bash", "-c", f"mount --bind '{self.state / 'run'}' /run && exec {charon}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        uri = f"unix://{self.state / 'charon.vici'}"
        for _ in range(100):
            if (self.state / "charon.vici").exists():
                break
            time.sleep(0.1)
        subprocess.run(["swanctl", "--load-all", "--file", str(self.state / "swanctl.conf"),
                        "--uri", uri], check=True, capture_output=True)
        self.pid = self.proc.pid

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.state, ignore_errors=True)


# ---------------------------------------------------------------- the initiator load


async def drive(load_ns: netns.Namespace, responder, window: int, warmup: float,
                seconds: float) -> dict:
    engine = IkeEngine(TunnelDirectory([], DOMAIN), CountingInstaller(),
                       EngineConfig(retransmit_timeout=1.0, retransmit_tries=3))

    def factory(addr, port):
        with load_ns.enter():
            return IkeServer.make_socket(addr, port)

    server = IkeServer(engine, [LOAD], socket_factory=factory, tick=0.5)
    await server.start()
    profile = InitiatorProfile(
        TUNNEL, IdType.FQDN, TUNNEL.fqdn(DOMAIN).encode(),
        [ike_proposal(Encr.AES_GCM_16, 256, 0, Prf.HMAC_SHA2_256, DhGroup.ECP_384)],
        [esp_proposal(Encr.AES_GCM_16, 256, 0, b"")], initial_contact=False)
    started = 0

    def done() -> int:
        return engine.stats["ike_established"]

    def failed() -> int:
        return sum(v for k, v in engine.stats.items() if k.startswith("ike_destroyed_")
                   and k != "ike_destroyed_bench")

    def reap() -> None:
        for sa in [s for s in engine.sas.values() if s.state == IkeState.ESTABLISHED]:
            engine.destroy(sa, "bench", uninstall=False)  # keep the initiator lean

    async def pump(until: float) -> None:
        nonlocal started
        while time.monotonic() < until:
            reap()
            while started - done() - failed() < window:
                started += 1
                server.send(engine.initiate(profile, (LOAD, 500), (EDGE, 500), server.clock()))
            await asyncio.sleep(0.002)

    await pump(time.monotonic() + warmup)
    n0, c0, t0 = done(), cpu_seconds(responder.pid), time.monotonic()
    await pump(t0 + seconds)
    n1, c1, t1 = done(), cpu_seconds(responder.pid), time.monotonic()
    await server.close()
    return {"established": n1 - n0, "seconds": t1 - t0, "rate": (n1 - n0) / (t1 - t0),
            "responder_cpu": c1 - c0, "per_cpu_second": (n1 - n0) / max(c1 - c0, 1e-9),
            "failed": failed()}


def one_round(kind, window: int, warmup: float, seconds: float) -> dict:
    with netns.Lab("bike") as lab:
        edge = lab.namespace("edge")
        load = lab.namespace("load")
        lab.veth(load, "l0", edge, "e0", f"{LOAD}/24", f"{EDGE}/24",
                 mac_a="02:00:00:00:1d:01", mac_b="02:00:00:00:1e:01")
        edge.add_neighbour("e0", LOAD, "02:00:00:00:1d:01")
        load.add_neighbour("l0", EDGE, "02:00:00:00:1e:01")
        responder = kind(edge, cpu=1)
        try:
            os.sched_setaffinity(0, {0})
            return asyncio.run(drive(load, responder, window, warmup, seconds))
        finally:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
            responder.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_ike", description=__doc__.split("\n")[0])
    ap.add_argument("--responder", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke run: one short round each")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--window", type=int, default=32)
    args = ap.parse_args(argv)
    if args.responder:
        return responder_main()
    rounds, seconds, warmup = (1, 2.0, 0.5) if args.quick else (args.rounds, args.seconds, 2.0)
    best: dict[str, dict] = {}
    for _ in range(rounds):  # interleaved: ours, strongSwan, ours, ...
        for kind in (OurResponder, StrongswanResponder):
            r = one_round(kind, args.window, warmup, seconds)
            print(f"{kind.name:24} {r['rate']:8.1f} SA/s  {r['per_cpu_second']:8.1f} SA/CPU-s  "
                  f"(responder CPU {r['responder_cpu']:.2f}s in {r['seconds']:.1f}s, "
                  f"{r['established']} SAs, failed {r['failed']})", flush=True)
            if kind.name not in best or r["per_cpu_second"] > best[kind.name]["per_cpu_second"]:
                best[kind.name] = r
    ours, swan = best[OurResponder.name], best[StrongswanResponder.name]
    print(f"\nbest of {rounds}: ours {ours['per_cpu_second']:.0f} SA/CPU-s "
          f"({ours['rate']:.0f} SA/s), strongSwan {swan['per_cpu_second']:.0f} SA/CPU-s "
          f"({swan['rate']:.0f} SA/s); ratio ours/strongSwan per CPU-second "
          f"{ours['per_cpu_second'] / swan['per_cpu_second']:.2f}, per wall-second "
          f"{ours['rate'] / swan['rate']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 7 end to end: three edge nodes share one anycast tunnel endpoint and their SA state
through a 3-member etcd cluster; a strongSwan peer negotiates with node A; the route to the
anycast address moves A -> B -> C. Real processes: etcd, `xtransit run` x3, charon.

Topology (every box a network namespace)::

    [swan] strongSwan (peer.sh), 203.0.113.6, inner 10.10.1.1 (the IPsec site)
       | s0
    [rtr] the router in front of the edges: 192.0.2.1/32 and 10.10.1.0/24 via edge A, B or C
       | cX (100.64.X.0/30)          | iX (10.0.X.0/30)              | n0
    [edgeX] cust0 ... inet0 (X = 1, 2, 3)                          [inet] Internet host
            xtransit run, 192.0.2.1 on lo                             198.51.100.2

The edge daemons reach etcd (which listens on the host's loopback) through TCP forwarders
whose listening sockets live in each edge namespace (127.0.0.1:<member port>); TLS goes end
to end.

Anti-replay: the peer's userspace ESP (strongSwan kernel-libipsec, the only ESP this kernel
has) checks sequence numbers with a fixed 128-packet window whatever ``replay_window`` says
(libipsec esp_context.c, ESP_DEFAULT_WINDOW_SIZE), and every edge node numbers its own
outbound packets from 1. So after a switch, the first packets the new node encrypts, up to
the highest sequence number the peer accepted from the nodes before, are dropped by the peer
as replays: the test asserts exactly that many lost replies, then the tunnel carries traffic
without any new IKE exchange. A customer side with anti-replay off loses none (README).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import selectors
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from etcd_cluster import EtcdCluster, require_etcd

from pipeline.demo import Daemon

pytestmark = [pytest.mark.netns, pytest.mark.peer, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PEER_SH = REPO.parent / "shared" / "peers" / "strongswan" / "peer.sh"
ANYCAST = "192.0.2.1"
SWAN_WAN, RTR_SWAN = "203.0.113.6", "203.0.113.5"
INET_HOST, RTR_INET = "198.51.100.2", "198.51.100.1"
SITE_PREFIX, SITE_HOST = "10.10.1.0/24", "10.10.1.1"
DOMAIN, TID, ACCOUNT = "example.net", "a11ca57a11ca57a11ca57a11ca57a001", "4242"
PSK = "anycast-test-psk-of-enough-length-0123"
NODES = (1, 2, 3)


def mac(*parts: int) -> str:
    return "02:00:00:00:" + ":".join(f"{p:02x}" for p in parts)


# --- etcd reachable from inside the edge namespaces ------------------------------------------

class NsForwarder:
    """127.0.0.1:<port> inside a namespace -> 127.0.0.1:<port> of the host (one thread)."""

    def __init__(self, ns, ports: list[int]) -> None:
        self.sel = selectors.DefaultSelector()
        self.listeners = []
        with ns.enter():
            for port in ports:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
                s.listen(64)
                s.setblocking(False)
                self.listeners.append(s)
                self.sel.register(s, selectors.EVENT_READ, ("listen", port))
        self.stop_r, self.stop_w = os.pipe()
        self.sel.register(self.stop_r, selectors.EVENT_READ, ("stop", None))
        self.socks: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            for key, _ in self.sel.select(1.0):
                kind, arg = key.data
                if kind == "stop":
                    return
                if kind == "listen":
                    conn, _ = key.fileobj.accept()
                    out = socket.create_connection(("127.0.0.1", arg), timeout=5)
                    for a, b in ((conn, out), (out, conn)):
                        a.setblocking(False)
                        self.sel.register(a, selectors.EVENT_READ, ("pipe", b))
                        self.socks.append(a)
                    continue
                src, dst = key.fileobj, arg
                try:
                    data = src.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    for s in (src, dst):
                        with contextlib.suppress(KeyError, ValueError):
                            self.sel.unregister(s)
                        s.close()
                    continue
                with contextlib.suppress(OSError):
                    dst.setblocking(True)
                    dst.sendall(data)
                    dst.setblocking(False)

    def close(self) -> None:
        os.write(self.stop_w, b"x")
        self.thread.join(5)
        for s in self.listeners + self.socks:
            with contextlib.suppress(OSError):
                s.close()
        os.close(self.stop_r)
        os.close(self.stop_w)


# --- configuration --------------------------------------------------------------------------

def node_config(x: int, name: str, cluster: EtcdCluster, tmp: Path, prefix: str,
                dpd: tuple[int, int] = (0, 150), node_extra: str = "", tunnel_extra: str = "",
                tail: str = "") -> str:
    eps = ", ".join(f'"{e}"' for e in cluster.endpoints)
    return f"""
[node]
id = {x}
name = "{name}"
ipsec_domain = "{DOMAIN}"
tunnel_endpoints = ["{ANYCAST}"]
{node_extra}

[[node.interfaces]]
name = "inet0"
role = "internet"
xdp_mode = "native"

[[node.interfaces]]
name = "cust0"
role = "customer"
xdp_mode = "native"

[tunnels.ipsec.site-any]
id = "{TID}"
account_id = "{ACCOUNT}"
index = 1
edge_endpoint = "{ANYCAST}"
interface_address = "10.255.0.0/31"
psk_file = "{tmp / 'site-any.psk'}"
dpd_interval = {dpd[0]}
dpd_timeout = {dpd[1]}
{tunnel_extra}

[[routes]]
prefix = "{SITE_PREFIX}"
tunnel = "site-any"

[state]
backend = "etcd"
endpoints = [{eps}]
ca_file = "{cluster.pki['ca']}"
cert_file = "{cluster.pki['client_cert']}"
key_file = "{cluster.pki['client_key']}"
fleet_key_file = "{tmp / 'fleet.key'}"
prefix = "{prefix}"

[analytics]
http_port = 0
history_file = "{tmp / f'analytics-{x}.db'}"
{tail}
"""


def write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


# --- the lab ----------------------------------------------------------------------------------

class Anycast:
    def __init__(self, lab, tmp: Path, cluster: EtcdCluster,
                 dpd: tuple[int, int] = (0, 150)) -> None:
        self.lab, self.tmp, self.cluster, self.dpd = lab, tmp, cluster, dpd
        self.rtr, self.swan, self.inet = (lab.namespace(r) for r in ("rtr", "swan", "inet"))
        self.edges = {x: lab.namespace(f"edge{x}") for x in NODES}
        self.macs: dict[tuple[str, str], str] = {}
        self.link(self.swan, "w0", f"{SWAN_WAN}/30", self.rtr, "s0", f"{RTR_SWAN}/30", 1)
        self.link(self.inet, "i0", f"{INET_HOST}/24", self.rtr, "n0", f"{RTR_INET}/24", 2)
        for x, ns in self.edges.items():
            self.link(ns, "cust0", f"100.64.{x}.1/30", self.rtr, f"c{x}", f"100.64.{x}.2/30",
                      10 + x)
            self.link(ns, "inet0", f"10.0.{x}.1/30", self.rtr, f"i{x}", f"10.0.{x}.2/30",
                      20 + x)
            ns.add_address("lo", f"{ANYCAST}/32")
            ns.add_route("203.0.113.0/24", gateway=f"100.64.{x}.2")
            ns.add_route("0.0.0.0/0", gateway=f"10.0.{x}.2")
            ns.sysctl("net.ipv4.ip_forward", 1)
        self.swan.add_route("0.0.0.0/0", gateway=RTR_SWAN)
        self.inet.add_route("0.0.0.0/0", gateway=RTR_INET)
        self.rtr.sysctl("net.ipv4.ip_forward", 1)
        self.rtr.sysctl("net.ipv4.conf.all.send_redirects", 0)
        self.current: int | None = None
        self.route_to(1)
        self.forwarders = [NsForwarder(ns, [int(e.rsplit(":", 1)[1])
                                            for e in cluster.endpoints])
                           for ns in self.edges.values()]
        self.prefix = f"/anycast-{os.getpid()}/"
        self.names = {x: f"t-any-{os.getpid()}-{x}" for x in NODES}
        write_secret(tmp / "fleet.key", os.urandom(32).hex())
        write_secret(tmp / "site-any.psk", PSK)
        self.daemons: dict[int, Daemon] = {}
        self.peer_env = dict(os.environ, STATE_ROOT=str(tmp / "strongswan"))
        self.peer_up = False

    def link(self, a, if_a, addr_a, b, if_b, addr_b, n: int) -> None:
        ma, mb = mac(n, 1), mac(n, 2)
        self.lab.veth(a, if_a, b, if_b, addr_a, addr_b, mac_a=ma, mac_b=mb)
        self.macs[(a.name, if_a)], self.macs[(b.name, if_b)] = ma, mb
        a.add_neighbour(if_a, addr_b.split("/")[0], mb)
        b.add_neighbour(if_b, addr_a.split("/")[0], ma)
        # XDP forwards frames as they are: checksums in software (see pipeline/demo.py)
        a.ethtool(if_a, "tx", "off")
        b.ethtool(if_b, "tx", "off")

    def route_to(self, x: int) -> None:
        """The router's path to the anycast address (and back to the IPsec site) -> node x."""
        for dst, gw in ((f"{ANYCAST}/32", f"100.64.{x}.1"), (SITE_PREFIX, f"10.0.{x}.1")):
            self.rtr.run("ip", "route", "replace", dst, "via", gw)
        self.current = x

    # daemons
    def config_text(self, x: int) -> str:
        return node_config(x, self.names[x], self.cluster, self.tmp, self.prefix, self.dpd)

    def start(self) -> None:
        for x in NODES:
            cfg = self.tmp / f"edge{x}.toml"
            cfg.write_text(self.config_text(x))
            d = Daemon(f"edge{x}", self.edges[x], cfg, self.tmp / f"edge{x}.log")
            d.start()
            self.daemons[x] = d
        for d in self.daemons.values():
            d.wait_event("started", 240)

    def status(self, x: int) -> dict:
        path = Path(f"/run/xtransit/{self.names[x]}/status.json")
        return json.loads(path.read_text())

    def fresh_status(self, x: int) -> dict:
        """A status written after now (the daemon writes it every second)."""
        t0 = time.time()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                st = self.status(x)
                if st["time"] > t0:
                    return st
            time.sleep(0.2)
        raise AssertionError(f"edge{x}: no fresh status.json")

    def tunnel(self, x: int) -> dict:
        return self.fresh_status(x)["ipsec"]["tunnels"]["site-any"]

    def spis_in(self, x: int) -> set[int]:
        return {s["spi"] for s in self.tunnel(x)["sas"] if s["direction"] == "in"}

    def events(self, x: int, name: str) -> list[dict]:
        d = self.daemons[x]
        d.poll_events()
        return [e for e in d.events if e.get("event") == name]

    # the peer
    def peer(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(PEER_SH), *args], check=False, capture_output=True,
                              text=True, env=self.peer_env, timeout=timeout)

    def swanctl(self, *args: str) -> str:
        uri = f"unix://{self.tmp / 'strongswan' / self.swan.name / 'charon.vici'}"
        p = self.swan.run("swanctl", *args, "--uri", uri, check=False)
        assert p.returncode == 0, p.stderr
        return p.stdout

    def peer_sas(self) -> dict:
        """strongSwan's view: IKE SA unique id and SPIs, Child SA SPIs and packet counters."""
        text = self.swanctl("--list-sas")
        ike = re.search(r"peer: #(\d+), ESTABLISHED, IKEv2, ([0-9a-f]{16})_i\*? "
                        r"([0-9a-f]{16})_r", text)
        assert ike, text
        child = re.search(r"net: #(\d+),.*?INSTALLED.*?\n\s+\S+.*?\n\s+in\s+([0-9a-f]{8}).*?"
                          r"(\d+) packets.*?\n\s+out\s+([0-9a-f]{8}).*?(\d+) packets", text,
                          re.DOTALL)
        assert child, text
        return {"ike": (int(ike.group(1)), ike.group(2), ike.group(3)),
                "child": int(child.group(1)), "spi_in": int(child.group(2), 16),
                "in_packets": int(child.group(3)), "spi_out": int(child.group(4), 16),
                "out_packets": int(child.group(5))}

    def connect(self) -> None:
        """strongSwan negotiates with whichever node the route points at."""
        self.peer_up = True
        up = self.peer("up", "--ns", self.swan.name, "--local", f"{SWAN_WAN}/30",
                       "--remote", ANYCAST, "--id-type", "fqdn",
                       "--id", f"{TID}.{ACCOUNT}.ipsec.{DOMAIN}", "--psk", PSK,
                       "--ike", "aes256gcm16-prfsha256-ecp384", "--esp", "aes256gcm16-modp2048",
                       "--local-ts", SITE_PREFIX, "--remote-ts", "198.51.100.0/24",
                       "--inner", f"{SITE_HOST}/24", "--natt", "auto", "--timeout", "15",
                       timeout=120)
        assert up.returncode == 0, up.stderr[-3000:] + self.daemons[self.current].tail(30)

    def ping(self, count: int) -> int:
        """Echo requests from the IPsec site to the Internet host; replies received."""
        p = self.swan.run("ping", "-I", SITE_HOST, "-c", str(count), "-i", "0.2", "-W", "2",
                          INET_HOST, check=False, timeout=count + 30)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", p.stdout)
        assert m, p.stdout + p.stderr
        assert int(m.group(1)) == count
        return int(m.group(2))

    def tcp_transfer(self, size: int = 256 * 1024) -> tuple[int, str]:
        """The IPsec site sends ``size`` bytes to a server on the Internet host, which answers
        with the count and SHA-256 of what it got."""
        server = self.inet.popen(
            "python3", "-c",
            "import socket,hashlib\n"
            "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(('{INET_HOST}',5201));s.listen(1);s.settimeout(60)\n"
            "c,_=s.accept();c.settimeout(60);h=hashlib.sha256();n=0\n"
            "while True:\n"
            " d=c.recv(65536)\n"
            " if not d: break\n"
            " h.update(d);n+=len(d)\n"
            "c.sendall(f'{n} {h.hexdigest()}'.encode());c.close()\n",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(0.5)
            client = self.swan.run(
                "python3", "-c",
                "import socket,os\n"
                f"s=socket.create_connection(('{INET_HOST}',5201),timeout=60,"
                f"source_address=('{SITE_HOST}',0))\n"
                f"s.sendall(bytes(range(256))*{size // 256});s.shutdown(socket.SHUT_WR)\n"
                "print(s.recv(200).decode())\n", check=False, timeout=90)
            assert client.returncode == 0, client.stderr
            n, digest = client.stdout.split()
            return int(n), digest
        finally:
            server.wait(30)

    def close(self) -> None:
        if self.peer_up:
            self.peer("down", "--ns", self.swan.name, timeout=60)
        for d in self.daemons.values():
            d.stop()
        for f in getattr(self, "forwarders", []):
            f.close()


@pytest.fixture
def etcd3(tmp_path_factory):
    require_etcd()
    with EtcdCluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


def _esp_from_peer(frame: bytes) -> int | None:
    """The SPI of an ESP-in-UDP frame (RFC 3948) from the peer to the anycast address."""
    if len(frame) < 14 + 20 + 8 + 8 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    udp = 14 + ihl
    if socket.inet_ntoa(frame[30:34]) != ANYCAST:
        return None
    if struct.unpack_from("!H", frame, udp + 2)[0] != 4500:
        return None
    spi = struct.unpack_from("!I", frame, udp + 8)[0]
    return spi or None       # 0: the non-ESP marker of an IKE message


def test_three_nodes_carry_one_tunnel_without_renegotiation(lab, tmp_path, etcd3):
    net = Anycast(lab, tmp_path, etcd3)
    try:
        net.start()
        net.connect()
        a_up = net.daemons[1].wait_event("ike_sa_up", 10)
        assert a_up["tunnel"] == "site-any"
        first = net.peer_sas()
        spi = first["spi_out"]                 # the edge's inbound SPI
        for x in NODES:                        # installed everywhere from the store
            net.daemons[x].wait_event("sa_installed", 30, spi_in=f"0x{spi:08x}")
            assert net.spis_in(x) == {spi}

        # --- through A -------------------------------------------------------------------
        assert net.ping(5) == 5
        seq = {1: net.tunnel(1)["out"]["packets"]}
        assert seq[1] == 5

        # --- through B: no IKE message; the first replies B encrypts carry sequence numbers
        # the peer already accepted from A (libipsec's fixed window): exactly seq[1] lost ---
        net.route_to(2)
        n = seq[1] + 5
        assert net.ping(n) == 5
        tb = net.tunnel(2)
        assert (tb["in"]["packets"], tb["out"]["packets"]) == (n, n)
        assert net.tunnel(1)["in"]["packets"] == 5            # nothing more reached A
        got = net.tcp_transfer()
        assert got == (256 * 1024, hashlib.sha256(bytes(range(256)) * 1024).hexdigest())
        seq[2] = net.tunnel(2)["out"]["packets"]

        # --- through C ---------------------------------------------------------------------
        net.route_to(3)
        n = max(seq.values()) + 5
        assert net.ping(n) == 5
        tc = net.tunnel(3)
        assert (tc["in"]["packets"], tc["out"]["packets"]) == (n, n)
        got = net.tcp_transfer()
        assert got == (256 * 1024, hashlib.sha256(bytes(range(256)) * 1024).hexdigest())
        now = net.peer_sas()
        assert now["ike"] == first["ike"] and now["child"] == first["child"]  # same SAs
        for x in NODES:
            assert [e["tunnel"] for e in net.events(x, "ike_sa_up")] == (
                ["site-any"] if x == 1 else [])
            assert net.events(x, "ike_sa_adopted") == []      # no IKE message reached B, C
        assert [(r["ike_spi_i"], r["ike_spi_r"]) for r in net.fresh_status(1)["ike_sas"]] == [
            (now["ike"][1], now["ike"][2])]                 # A, the writer, still holds it

        # --- Child SA rekey by the peer while the route points at C --------------------------
        port = lab.port(net.rtr, "s0")
        port.drain()
        assert net.ping(1) == 1
        old_frame = port.recv(5, match=lambda f: _esp_from_peer(f) == spi)
        assert old_frame is not None
        net.swanctl("--rekey", "--child", "net")
        ev = net.daemons[3].wait_event("child_sa_rekeyed", 30)
        assert ev["old_spi_in"] == f"0x{spi:08x}"
        new_spi = int(ev["spi_in"], 16)
        (adopted,) = net.events(3, "ike_sa_adopted")
        assert (adopted["expected_peer_id"], adopted["next_request_id"]) == (2, 0)
        for x in NODES:
            net.daemons[x].wait_event("sa_deleted", 30, spi_in=f"0x{spi:08x}")
            assert net.spis_in(x) == {new_spi}
        after = net.peer_sas()
        assert after["ike"] == first["ike"] and after["spi_out"] == new_spi
        # C wrote the IKE SA last: it holds it (and runs its timers); A dropped its copy.
        ike_spis = (first["ike"][1], first["ike"][2])
        rows = net.fresh_status(3)["ike_sas"]
        assert [(r["ike_spi_i"], r["ike_spi_r"], r["state"]) for r in rows] == [
            (*ike_spis, "established")]
        assert [c["spi_in"] for c in rows[0]["children"]] == [f"{new_spi:08x}"]
        assert net.fresh_status(1)["ike_sas"] == [] and net.fresh_status(2)["ike_sas"] == []
        # The old SPI stops decrypting everywhere: a packet the peer sent under it, sent again
        # to each node, is dropped before any SA (no SA for its SPI).
        for x in NODES:
            before = net.fresh_status(x)["ipsec"]["no_sa"]
            frame = (bytes.fromhex(net.macs[(net.edges[x].name, "cust0")].replace(":", ""))
                     + bytes.fromhex(net.macs[(net.rtr.name, f"c{x}")].replace(":", ""))
                     + old_frame[12:])
            lab.port(net.rtr, f"c{x}").send(frame)
            time.sleep(1.5)
            after_drops = net.fresh_status(x)["ipsec"]["no_sa"]
            diff = {k: after_drops.get(k, 0) - before.get(k, 0)
                    for k in set(after_drops) | set(before)}
            assert {k: v for k, v in diff.items() if v} == {"unknown_spi": 1}, (x, diff)
        assert net.ping(3) == 3                       # the new SA carries traffic at C

        # --- IKE SA rekey by the peer through C: one IKE record, with the new SPIs ------------
        old_name = "/".join(first["ike"][1:])
        net.swanctl("--rekey", "--ike", "peer")
        up_c = net.daemons[3].wait_event("ike_sa_up", 30)
        down_c = net.daemons[3].wait_event("ike_sa_down", 30)
        assert (down_c["ike_sa"], down_c["reason"]) == (old_name, "deleted_by_peer")
        new_name = up_c["ike_sa"]
        rekeyed = net.peer_sas()
        assert "/".join(rekeyed["ike"][1:]) == new_name != old_name
        assert rekeyed["spi_out"] == new_spi                  # the Child SA moved along
        with etcd3.client() as store:
            keys = [r.key for r in store.list(f"{net.prefix}v1/ike/").records]
        assert keys == [f"{net.prefix}v1/ike/{new_name.replace('/', '_')}"]
        for x in NODES:
            assert net.spis_in(x) == {new_spi}
        assert net.ping(3) == 3

        # --- DELETE through C: every node removes the SAs -------------------------------------
        down = net.peer("down", "--ns", net.swan.name, timeout=60)
        net.peer_up = False
        assert down.returncode == 0, down.stderr
        ev = net.daemons[3].wait_event("ike_sa_down", 30, ike_sa=new_name)
        assert ev["reason"] == "deleted_by_peer"
        for x in NODES:
            net.daemons[x].wait_event("sa_deleted", 30, spi_in=f"0x{new_spi:08x}")
            net.daemons[x].wait_event("tunnel_down", 30, tunnel="site-any")
            assert net.spis_in(x) == set()
        with etcd3.client() as store:
            assert store.list(net.prefix).records == ()
    finally:
        net.close()


def test_the_edges_liveness_check_answered_to_another_node(lab, tmp_path, etcd3):
    """Node A, which holds the IKE SA, checks liveness (every 5 s of IKE silence) after the
    route moved to B: strongSwan's answer reaches B, which adopts the SA with A's request in
    flight and completes it. A drops its copy instead of retrying until its dead-peer timeout
    (10 s) and tearing the tunnel down for every node."""
    net = Anycast(lab, tmp_path, etcd3, dpd=(5, 10))
    try:
        net.start()
        net.connect()
        net.route_to(2)                        # before A's first liveness check (5 s)
        first = net.peer_sas()
        ev = net.daemons[2].wait_event("ike_sa_adopted", 20)
        # A's liveness check (our message ID 0) was in flight in the record B adopted
        assert (ev["next_request_id"], ev["expected_peer_id"]) == (0, 2)
        assert net.events(1, "ike_sa_adopted") == [] and net.events(3, "ike_sa_adopted") == []
        time.sleep(12)                         # past A's dead-peer timeout
        for x in NODES:
            assert net.events(x, "ike_sa_down") == []
            assert net.events(x, "sa_deleted") == []
        rows = net.fresh_status(2)["ike_sas"]
        assert [(r["ike_spi_i"], r["ike_spi_r"]) for r in rows] == [first["ike"][1:]]
        assert net.fresh_status(1)["ike_sas"] == [] and net.fresh_status(3)["ike_sas"] == []
        assert net.peer_sas()["ike"] == first["ike"]
        assert net.ping(3) == 3                # A encrypted nothing: no replay gap at B
    finally:
        net.close()

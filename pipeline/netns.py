"""Network namespaces, veth pairs and raw packet ports, on pyroute2.

Used by `xtransit doctor` (a scratch namespace for the XDP attach check), by `make demo` and by
the test suite. Everything created here is owned by a :class:`Lab`, which removes it again on
exit, on an exception and on SIGTERM/Ctrl-C (a ``with`` block or an explicit ``close()``).
Removing a namespace removes the veth ends inside it, and a veth pair dies with either end.

Names: a namespace is ``xt<tag>-<pid>-<n>``, so concurrent runs never collide and a later run can
sweep the namespaces of a crashed one (:func:`sweep_stale`: the pid is no longer alive).
"""
from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Self

from pyroute2 import IPRoute, netns

_COUNTER = itertools.count(1)
_NAME_RE = re.compile(r"^xt[a-z0-9]*-(\d+)-\d+$")
ETH_P_ALL = 0x0003


class NetnsError(RuntimeError):
    """A namespace, link or address operation failed; the message says which and why."""


def _unique_name(tag: str) -> str:
    tag = re.sub(r"[^a-z0-9]", "", tag.lower())[:8]
    return f"xt{tag}-{os.getpid()}-{next(_COUNTER)}"


@dataclass
class Namespace:
    """One network namespace. Create through :meth:`Lab.namespace`."""

    name: str

    def ipr(self) -> IPRoute:
        """A pyroute2 netlink socket inside the namespace (use as a context manager).

        Opened from inside the namespace with setns(2) instead of pyroute2's NetNS, which forks
        a helper process per socket (slow, and fragile under a test runner's signal handlers).
        """
        with self.enter():
            return IPRoute()

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        """Run the body with the calling thread inside this namespace.

        setns(2) on a network namespace affects only the calling thread, and sockets keep the
        namespace they were created in, so a socket opened in the body stays usable after it.
        """
        netns.pushns(self.name)
        try:
            yield
        finally:
            netns.popns()

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a command inside the namespace; output is captured as text."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        proc = subprocess.run(["ip", "netns", "exec", self.name, *cmd], check=False,
                              timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise NetnsError(
                f"{self.name}: {' '.join(cmd)} exited {proc.returncode}: "
                f"{(proc.stderr or '').strip()[-500:]}"
            )
        return proc

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)

    def index(self, ifname: str) -> int:
        with self.ipr() as ipr:
            found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise NetnsError(f"{self.name}: no interface {ifname!r}")
        return found[0]

    def mac(self, ifname: str) -> str:
        with self.ipr() as ipr:
            return ipr.get_links(self.index(ifname))[0].get("IFLA_ADDRESS")

    def add_address(self, ifname: str, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        with self.ipr() as ipr:
            ipr.addr("add", index=self.index(ifname), address=str(iface.ip),
                     prefixlen=iface.network.prefixlen)

    def add_route(self, dst: str, gateway: str | None = None, dev: str | None = None) -> None:
        net = ipaddress.ip_network(dst)
        args: dict = {"dst": str(net.network_address), "dst_len": net.prefixlen}
        if gateway:
            args["gateway"] = gateway
        if dev:
            args["oif"] = self.index(dev)
        if net.version == 6:
            args["family"] = socket.AF_INET6
        with self.ipr() as ipr:
            ipr.route("add", **args)

    def add_neighbour(self, ifname: str, ip: str, mac: str) -> None:
        """A permanent neighbour entry, so tests do not depend on ARP/ND timing."""
        family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
        with self.ipr() as ipr:
            ipr.neigh("replace", dst=ip, lladdr=mac, ifindex=self.index(ifname), state="permanent",
                      family=family)

    def sysctl(self, key: str, value: str | int) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def set_up(self, ifname: str) -> None:
        with self.ipr() as ipr:
            ipr.link("set", index=self.index(ifname), state="up")

    def ethtool(self, ifname: str, *args: str) -> None:
        self.run("ethtool", "-K", ifname, *args)

    def port(self, ifname: str) -> PacketPort:
        """A raw AF_PACKET socket bound to ``ifname`` in this namespace."""
        with self.enter():
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((ifname, 0))
        return PacketPort(sock, f"{self.name}/{ifname}")


@dataclass
class PacketPort:
    """Send and capture exact Ethernet frames on one interface."""

    sock: socket.socket
    label: str

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def recv(self, timeout: float = 2.0, match=None, outgoing: bool = False) -> bytes | None:
        """The next frame received (not our own transmissions unless ``outgoing``) for which
        ``match(frame)`` is true, or None when ``timeout`` seconds pass without one."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            frame, addr = self.sock.recvfrom(65535)
            if addr[2] == socket.PACKET_OUTGOING and not outgoing:
                continue
            if match is None or match(frame):
                return frame

    def recv_all(self, count: int, timeout: float = 2.0, match=None) -> list[bytes]:
        """Up to ``count`` matching frames, waiting at most ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        frames: list[bytes] = []
        while len(frames) < count:
            frame = self.recv(max(0.0, deadline - time.monotonic()), match)
            if frame is None:
                break
            frames.append(frame)
        return frames

    def drain(self) -> int:
        n = 0
        while self.recv(0.0, outgoing=True) is not None:
            n += 1
        return n

    def close(self) -> None:
        self.sock.close()


@dataclass
class Lab:
    """Owner of namespaces and ports; removes all of them on close (idempotent)."""

    tag: str = "lab"
    namespaces: list[Namespace] = field(default_factory=list)
    ports: list[PacketPort] = field(default_factory=list)

    def namespace(self, role: str = "") -> Namespace:
        ns = Namespace(_unique_name(role or self.tag))
        try:
            netns.create(ns.name)
        except OSError as exc:
            raise NetnsError(f"cannot create network namespace {ns.name}: {exc}") from exc
        self.namespaces.append(ns)
        with ns.ipr() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return ns

    def veth(self, a: Namespace, if_a: str, b: Namespace, if_b: str,
             addr_a: str | None = None, addr_b: str | None = None,
             mac_a: str | None = None, mac_b: str | None = None, up: bool = True) -> None:
        """A veth pair with one end in each namespace (names only need be unique there)."""
        peer: dict = {"ifname": if_b, "net_ns_fd": b.name}
        if mac_b:
            peer["address"] = mac_b
        args: dict = {"ifname": if_a, "kind": "veth", "peer": peer}
        if mac_a:
            args["address"] = mac_a
        with a.ipr() as ipr:
            ipr.link("add", **args)
        for ns, ifname, addr in ((a, if_a, addr_a), (b, if_b, addr_b)):
            if addr:
                ns.add_address(ifname, addr)
            if up:
                ns.set_up(ifname)

    def port(self, ns: Namespace, ifname: str) -> PacketPort:
        p = ns.port(ifname)
        self.ports.append(p)
        return p

    def close(self) -> None:
        for p in self.ports:
            with contextlib.suppress(OSError):
                p.close()
        self.ports.clear()
        for ns in reversed(self.namespaces):
            _kill_processes_in(ns.name)
            with contextlib.suppress(OSError, FileNotFoundError):
                netns.remove(ns.name)
        self.namespaces.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kill_processes_in(name: str) -> None:
    """Kill what still runs in a namespace so removing it really frees it."""
    proc = subprocess.run(["ip", "netns", "pids", name], check=False, capture_output=True,
                          text=True)
    for pid in proc.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)


def ours() -> list[str]:
    """Names of existing namespaces created by this module (any process)."""
    return [n for n in netns.listnetns() if _NAME_RE.match(n)]


def sweep_stale() -> list[str]:
    """Remove namespaces left by runs whose process is gone (a crash or kill -9)."""
    removed = []
    for name in ours():
        pid = int(_NAME_RE.match(name).group(1))
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            _kill_processes_in(name)
            with contextlib.suppress(OSError):
                netns.remove(name)
            removed.append(name)
    return removed
